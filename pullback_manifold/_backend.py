"""Import geomstats with the pytorch backend, once, before anyone else does.

geomstats reads ``GEOMSTATS_BACKEND`` a single time, at its first import, and
this library needs ``pytorch``. Two release-specific problems are handled here:

* geomstats 2.8.0 imports ``numpy.trapz``, removed in numpy 2.4. When it is
  missing we alias it to ``numpy.trapezoid`` (same signature and result),
  which is exactly the upstream fix made after the 2.8.0 release.
* importing geomstats' pytorch backend calls ``torch.set_default_dtype(float64)``.
  We restore the user's default dtype right after the import, so importing this
  package never changes global torch state.
"""

from __future__ import annotations

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

    user_dtype = torch.get_default_dtype()
    try:
        import geomstats.backend as gs
    finally:
        torch.set_default_dtype(user_dtype)
    return gs
