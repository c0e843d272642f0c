"""Batched helpers for statistics on a latent space: geodesic distance matrices.

One logarithm is a boundary-value problem (a few ODE solves), not a formula, and
the log solver is far cheaper per pair on a batch than on one pair.
:func:`pairwise_dists` computes a whole distance matrix in one batched solve;
:meth:`DecoderPullbackMetric.dist_pairwise
<pullback_manifold.DecoderPullbackMetric.dist_pairwise>` uses it, so geomstats'
``RiemannianKMedoids`` is batched too. geomstats' ``KNearestNeighborsClassifier``
and ``KernelDensityEstimationClassifier`` hand ``metric.dist`` to scikit-learn as
a callable, which calls it one pair at a time: for more than a handful of points,
give scikit-learn's estimators a matrix from :func:`pairwise_dists` with
``metric="precomputed"`` instead (see the guide).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .manifold import SUPPORTED_DTYPES, DecoderPullbackMetric, _as_tensor

__all__ = ["pairwise_dists"]


def pairwise_dists(space, points_a, points_b=None, *, chunk_size: int | None = None, progress: bool = False) -> Tensor:
    """Geodesic distance matrix between two sets of latent points, in one batched solve.

    ``dists[i, j]`` is ``space.metric.dist(points_a[i], points_b[j])``: the
    ``G``-norm at ``points_a[i]`` of ``log_{points_a[i]}(points_b[j])``. Without
    ``points_b``, the distances within ``points_a``: only the pairs ``i < j``
    are solved, the matrix is mirrored, and its diagonal is exactly zero. Pairs
    of identical points are ``0`` and never solved.

    Non-converged pairs are handled as :meth:`metric.dist
    <pullback_manifold.DecoderPullbackMetric.dist>` handles them: the value is
    kept (the norm of the last, unconverged logarithm) and the space's
    ``on_failure`` policy applies, a
    :class:`~pullback_manifold.ConvergenceWarning` by default, a
    :class:`~pullback_manifold.ConvergenceError` with ``on_failure="raise"``.
    ``space.metric.solve_log`` gives the per-pair report.

    Parameters
    ----------
    space : PullbackManifold
        The latent space. Any other equipped geomstats space works too: its
        ``metric.dist`` is then called once, on all pairs at once; so is a
        PullbackManifold's whose metric has a log solver of the user's in
        ``log_solver`` (geomstats' slot). Then failures are that solver's to
        handle, and ``chunk_size`` and ``progress`` have no effect.
    points_a : array-like, shape=[n_a, d]
    points_b : array-like, shape=[n_b, d], optional
        Default: ``points_a`` (a symmetric matrix).
    chunk_size : int, optional
        Pairs solved at once (bounded memory). Default: the space's
        ``chunk_size``.
    progress : bool
        Print a progress line on stderr after each chunk.

    Returns
    -------
    dists : Tensor, shape=[n_a, n_b]
        Dtype and device of the points (the promoted dtype of the two sets).
        Not differentiable: use ``metric.squared_dist`` for gradients.

    Raises
    ------
    ConvergenceError
        If a pair did not converge and the space has ``on_failure="raise"``.

    Examples
    --------
    >>> import torch
    >>> from pullback_manifold import PullbackManifold, pairwise_dists
    >>> A = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    >>> space = PullbackManifold(lambda z: z @ A.T, dim=2)
    >>> points = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    >>> pairwise_dists(space, points).round(decimals=6)  # ||A (z_i - z_j)||
    tensor([[0.0000, 3.0000, 1.4142],
            [3.0000, 0.0000, 2.2361],
            [1.4142, 2.2361, 0.0000]], dtype=torch.float64)
    """
    metric = space.metric
    symmetric = points_b is None
    # A point's shape: (d,) here; another space's own (a sphere's ambient (3,), an SPD matrix's (3, 3)).
    shape = (space.dim,) if isinstance(metric, DecoderPullbackMetric) else tuple(space.shape)
    a = _as_points(points_a, "points_a", shape)
    b = a if symmetric else _as_points(points_b, "points_b", shape)
    if a.device != b.device:
        raise ValueError(f"points_a is on {a.device} and points_b on {b.device}: move them to one device")
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    n_a, n_b = len(a), len(b)
    dists = torch.zeros(n_a, n_b, dtype=dtype, device=a.device)

    if symmetric:
        rows, cols = torch.triu_indices(n_a, n_a, offset=1, device=a.device)
    else:
        grid = torch.meshgrid(torch.arange(n_a, device=a.device), torch.arange(n_b, device=a.device), indexing="ij")
        rows, cols = (idx.reshape(-1) for idx in grid)
    distinct = (a[rows] != b[cols]).flatten(1).any(-1)  # identical points: distance 0, nothing to solve
    rows, cols = rows[distinct], cols[distinct]

    if len(rows):
        base, end = a[rows], b[cols]
        if isinstance(metric, DecoderPullbackMetric) and not metric._log_solver_replaced:
            # The same report, and on_failure policy, as metric.dist: values are kept.
            result = metric._reported_log(
                end, base, "pairwise_dists", chunk_size=chunk_size, progress=progress, lengths_only=True
            )
            values = metric.norm(result.tangent_vec, base)
        else:
            values = torch.as_tensor(metric.dist(base, end), dtype=dtype, device=a.device)
        dists[rows, cols] = values
        if symmetric:
            dists[cols, rows] = values
    return dists


def _as_points(points, name: str, shape: tuple[int, ...]) -> Tensor:
    points = _as_tensor(points)
    if points.dim() != 1 + len(shape) or tuple(points.shape[1:]) != shape:
        expected = ", ".join(map(str, ("n", *shape)))
        raise ValueError(f"{name} has shape {tuple(points.shape)}: expected ({expected}), a batch of points")
    if points.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {points.dtype}: expected float32 or float64; convert it with {name}.to(torch.float64)"
        )
    return points
