r"""The logarithm map: one entry point, three methods, a report for every pair.

``method="shooting"``
    Newton shooting (:func:`~pullback_manifold.geodesics.shooting_log`) from the
    straight line (or a warm start); pairs it does not solve are shot again from
    the initial velocity of a discrete geodesic. Every answer is an ODE geodesic
    whose end point is checked.
``method="energy"``
    Discrete geodesics (:func:`~pullback_manifold.discrete.energy_log`):
    first derivatives only, so it is the method for decoders whose second
    derivative vanishes (ReLU networks), where the geodesic ODE is degenerate.
``method="auto"`` (default)
    A coarse discrete geodesic gives the first guess (it sees the whole curve,
    so strongly bending geodesics do not mislead it), Newton shooting polishes
    it to the end-point tolerance in a few iterations, and a pair shooting
    cannot finish is answered by the refined energy method, marked
    ``from_energy``, converged only if its own error estimate says so. With a
    warm start, shooting goes first from it. For a piecewise-linear decoder
    ``auto`` is the energy method.

Large batches are split in chunks (bounded memory), with an optional progress
line on stderr.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import Tensor

from .discrete import energy_log
from .geodesics import LogResult, ODEOptions, shooting_log
from .geometry import Embedding

__all__ = ["METHODS", "log_map", "is_piecewise_linear"]

METHODS = ("auto", "shooting", "energy")


@torch.no_grad()
def is_piecewise_linear(embed: Embedding, z: Tensor, n_directions: int = 3) -> bool:
    """Whether the decoder looks piecewise linear (ReLU-like) around ``z``.

    True when its second derivative vanishes along random directions at
    ``z`` while its Jacobian differs between the points of ``z`` (or points
    near them): the geodesic ODE is then degenerate (its solutions are straight
    lines), although the metric is not constant. A linear decoder is not
    piecewise linear in this sense (its straight lines are the geodesics).

    Parameters
    ----------
    embed : callable ``(n, d) -> (n, D)``
    z : Tensor, shape=[n, d]
    n_directions : int

    Returns
    -------
    piecewise_linear : bool
    """
    from torch.func import jvp

    from .decoders import MetricDecoder
    from .geometry import jacobian

    if isinstance(embed, MetricDecoder):
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(n_directions):
        v = torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device)
        second = jvp(lambda x: jvp(embed, (x,), (v,))[1], (z,), (v,))[1]
        if torch.any(second != 0):
            return False
    spread = 0.5 * (1 + z.abs().amax())
    probes = torch.cat([z, z + spread * torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device)])
    J = jacobian(embed, probes)
    return bool(torch.any((J - J[:1]).abs() > 1e-6 * J.abs().amax().clamp_min(1e-300)))


def _merge(result: LogResult, rows: Tensor, other: LogResult, take: Tensor) -> None:
    """Overwrite ``result`` at ``rows[take]`` with ``other[take]`` (``other`` is indexed like ``rows``)."""
    target = rows[take]
    result.tangent_vec[target] = other.tangent_vec[take]
    result.converged[target] = other.converged[take]
    result.residual[target] = other.residual[take]
    result.from_energy[target] = other.from_energy[take]
    result.n_iterations[rows] += other.n_iterations


def _log_chunk(
    embed: Embedding,
    point: Tensor,
    base_point: Tensor,
    initial_tangent_vec: Tensor | None,
    method: str,
    piecewise_linear: bool,
    shooting: dict,
    energy_rtol: float | None,
) -> LogResult:
    if method == "energy" or (method == "auto" and piecewise_linear):
        result, _, _ = energy_log(embed, point, base_point, rtol=energy_rtol)
        result.method = method
        return result

    if method == "shooting" or initial_tangent_vec is not None:
        result = shooting_log(embed, point, base_point, initial_tangent_vec, **shooting)
        result.method = method
        if result.all_converged:
            return result
        todo = (~result.converged).nonzero().squeeze(-1)
    else:
        result = None
        todo = torch.arange(len(point), device=point.device)

    # A coarse discrete geodesic's initial velocity: Newton converges from it in a few steps.
    guess, _, _ = energy_log(embed, point[todo], base_point[todo], n_segments=8, n_refinements=1)
    polished = shooting_log(embed, point[todo], base_point[todo], guess.tangent_vec, **shooting)
    if result is None:
        result = polished
        result.method = method
    else:
        better = polished.converged | ~(polished.residual >= result.residual[todo])  # NaN-safe: keep the smaller
        _merge(result, todo, polished, better)
    if method == "shooting" or result.all_converged:
        return result

    todo = (~result.converged).nonzero().squeeze(-1)
    refined, _, _ = energy_log(embed, point[todo], base_point[todo], rtol=energy_rtol)
    _merge(result, todo, refined, refined.converged)
    result.energy_rtol = refined.energy_rtol
    return result


def log_map(
    embed: Embedding,
    point: Tensor,
    base_point: Tensor,
    initial_tangent_vec: Tensor | None = None,
    method: str = "auto",
    options: ODEOptions = ODEOptions(),
    regularization: float = 0.0,
    tol: float | None = None,
    max_iter: int = 50,
    energy_rtol: float | None = None,
    piecewise_linear: bool = False,
    chunk_size: int | None = None,
    progress: bool = False,
) -> LogResult:
    """Logarithm map of a batch of pairs, by the chosen method.

    Parameters
    ----------
    embed : callable ``(n, d) -> (n, D)``, or a MetricDecoder
    point, base_point : Tensor, shape=[n, d]
    initial_tangent_vec : Tensor, shape=[n, d], optional
        Warm start for shooting.
    method : {"auto", "shooting", "energy"}
    options : ODEOptions
    regularization : float
    tol : float, optional
        End-point tolerance of shooting (see :func:`shooting_log`).
    max_iter : int
        Newton iterations per pair.
    energy_rtol : float, optional
        Relative length-error tolerance of the energy method (see
        :func:`~pullback_manifold.discrete.energy_log`).
    piecewise_linear : bool
        The decoder is ReLU-like (:func:`is_piecewise_linear`): ``auto`` uses
        the energy method.
    chunk_size : int, optional
        Pairs per chunk; all at once if None.
    progress : bool
        Print a progress line on stderr after each chunk.

    Returns
    -------
    result : LogResult
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    shooting = dict(options=options, regularization=regularization, tol=tol, max_iter=max_iter)
    n = len(point)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.bool, device=point.device)
        return LogResult(point.clone(), empty, point.new_zeros(0), torch.zeros(0, dtype=torch.long), 0.0, method)
    size = n if chunk_size is None else chunk_size
    parts = []
    start = time.perf_counter()
    for lo in range(0, max(n, 1), max(size, 1)):
        hi = min(lo + size, n)
        init = None if initial_tangent_vec is None else initial_tangent_vec[lo:hi]
        parts.append(
            _log_chunk(embed, point[lo:hi], base_point[lo:hi], init, method, piecewise_linear, shooting, energy_rtol)
        )
        if progress:
            done = sum(int(p.converged.numel()) for p in parts)
            failed = sum(p.n_failed for p in parts)
            print(
                f"\rlog: {done}/{n} pairs, {failed} not converged, {time.perf_counter() - start:.1f} s",
                end="" if hi < n else "\n",
                file=sys.stderr,
                flush=True,
            )
    if len(parts) == 1:
        return parts[0]
    return LogResult(
        tangent_vec=torch.cat([p.tangent_vec for p in parts]),
        converged=torch.cat([p.converged for p in parts]),
        residual=torch.cat([p.residual for p in parts]),
        n_iterations=torch.cat([p.n_iterations for p in parts]),
        tol=parts[0].tol,
        method=method,
        from_energy=torch.cat([p.from_energy for p in parts]),
        energy_rtol=next((p.energy_rtol for p in parts if p.energy_rtol is not None), None),
    )
