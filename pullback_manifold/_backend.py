"""Import geomstats with the pytorch backend, once, before anyone else does.

geomstats reads ``GEOMSTATS_BACKEND`` a single time, at its first import, and
this library needs ``pytorch``. Three release-specific problems are handled here:

* geomstats 2.8.0 imports ``numpy.trapz``, removed in numpy 2.4. When it is
  missing we alias it to ``numpy.trapezoid`` (same signature and result),
  which is exactly the upstream fix made after the 2.8.0 release.
* geomstats 2.8.0's ``TangentPCA`` calls scikit-learn's ``svd_flip`` (and
  ``stable_cumsum``), which fail on torch tensors with recent scikit-learn (1.9
  here); its module gets torch-aware versions when it is imported (see
  ``_patch_tangent_pca_svd_flip``).
* importing geomstats' pytorch backend calls ``torch.set_default_dtype(float64)``.
  We restore the user's default dtype right after the import, so importing this
  package never changes global torch state.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

import numpy as np
import torch

REQUIRED_BACKEND = "pytorch"


class BackendError(ImportError):
    """geomstats was already imported with a backend other than pytorch."""


def _patch_numpy_trapz() -> None:
    if not hasattr(np, "trapz") and hasattr(np, "trapezoid"):
        np.trapz = np.trapezoid  # removed in numpy 2.4, still imported by geomstats 2.8.0


def _patch_tangent_pca_svd_flip() -> None:
    """Make geomstats 2.8's ``TangentPCA`` work on torch tensors.

    ``geomstats.learning.pca`` calls scikit-learn's ``svd_flip`` on the torch
    tensors of its SVD; recent scikit-learn (1.9 here) routes them through its
    array-API layer to numpy, which cannot read a torch dtype (``TypeError:
    Cannot interpret 'torch.float64' as a data type``). We rebind that module's
    own name ``svd_flip`` to a version that flips torch tensors in torch, with
    scikit-learn's sign convention, and hands anything else to scikit-learn
    (itself untouched); likewise ``stable_cumsum`` (same failure, for a
    fractional ``n_components``). The rebinding happens when the module is
    first imported (importing it here would import scikit-learn: about a
    second), or now if it already was.
    """
    name = "geomstats.learning.pca"

    def patch(module) -> None:
        sklearn_svd_flip, sklearn_stable_cumsum = module.svd_flip, module.stable_cumsum
        if getattr(sklearn_svd_flip, "torch_aware", False):
            return

        def svd_flip(u, v, u_based_decision=True):
            if not isinstance(u if u is not None else v, torch.Tensor):
                return sklearn_svd_flip(u, v, u_based_decision)
            if u_based_decision:  # the largest |entry| of each column of u is made positive
                signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True))).squeeze(0)
            else:  # of each row of v
                signs = torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True))).squeeze(1)
            return (None if u is None else u * signs), (None if v is None else v * signs[:, None])

        def stable_cumsum(arr, axis=None, rtol=1e-05, atol=1e-08):  # n_components in (0, 1): same failure
            if not isinstance(arr, torch.Tensor):
                return sklearn_stable_cumsum(arr, axis, rtol, atol)
            return torch.cumsum(arr.reshape(-1) if axis is None else arr, dim=0 if axis is None else axis)

        svd_flip.torch_aware = True
        module.svd_flip, module.stable_cumsum = svd_flip, stable_cumsum

    class PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            spec = importlib.machinery.PathFinder.find_spec(fullname, path, target) if fullname == name else None
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module
                spec.loader.exec_module = lambda module: (exec_module(module), patch(module))
            return spec

    if name in sys.modules:
        patch(sys.modules[name])
    elif not any(type(finder).__name__ == "PatchOnImport" for finder in sys.meta_path):
        sys.meta_path.insert(0, PatchOnImport())


def _loaded_geomstats_backend() -> str | None:
    backend = sys.modules.get("geomstats.backend")
    if backend is None:
        return None
    return backend.__name__.rsplit(".", 1)[-1]


def import_geomstats():
    """Import ``geomstats.backend`` with the pytorch backend and return it.

    Raises
    ------
    BackendError
        If geomstats was imported earlier in this process with another backend.
    """
    loaded = _loaded_geomstats_backend()
    if loaded is not None and loaded != REQUIRED_BACKEND:
        raise BackendError(
            f"geomstats was already imported with the {loaded!r} backend; "
            "pullback_manifold needs 'pytorch'. Import pullback_manifold before "
            "geomstats, or set GEOMSTATS_BACKEND=pytorch in the environment."
        )
    requested = os.environ.get("GEOMSTATS_BACKEND")
    if loaded is None and requested not in (None, REQUIRED_BACKEND):
        raise BackendError(
            f"GEOMSTATS_BACKEND={requested!r} is set, but pullback_manifold needs "
            "'pytorch'. Unset it or set GEOMSTATS_BACKEND=pytorch."
        )
    os.environ["GEOMSTATS_BACKEND"] = REQUIRED_BACKEND
    _patch_numpy_trapz()
    _patch_tangent_pca_svd_flip()

    user_dtype = torch.get_default_dtype()
    try:
        import geomstats.backend as gs
    finally:
        torch.set_default_dtype(user_dtype)
    return gs
