r"""Discrete geodesics: the boundary-value problem solved by minimizing curve energy.

A latent curve is a polygon ``c_0 = z0, c_1, ..., c_N = z1`` at uniform times;
its energy is that of the decoded polygon,

.. math:: E(c) = \frac N2 \sum_{i<N} \|f(c_{i+1}) - f(c_i)\|^2 ,

a nonlinear least-squares problem in the interior nodes. It is minimized by
Levenberg-Marquardt (Gauss-Newton) with the exact block-tridiagonal normal
matrix ``N [2 G_k on the diagonal, -J_k^T J_{k+1} beside it]``, per pair and
batched. Only first derivatives of the decoder enter, so this works where the
geodesic ODE is degenerate (ReLU networks have ``d^2 f = 0`` almost
everywhere: their ODE geodesics are straight lines, which are not the shortest
curves), and it sees the whole curve at once, so it does not get lost on
strongly bending geodesics the way shooting from a straight line can.

The answer converges as ``O(1/N^2)`` in the number of segments: the solver
refines ``N -> 2N -> 4N``, extrapolates the length (Richardson) and reports the
estimated discretization error, which decides convergence.

For a :class:`~pullback_manifold.decoders.MetricDecoder` (the metric is not a
pull-back through one map) the energy uses ``G`` at segment midpoints and is
minimized by L-BFGS.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp, vmap

from .decoders import MetricDecoder
from .geodesics import LogResult
from .geometry import Embedding, curve_energy, curve_length, metric_matrix

__all__ = ["discrete_geodesic", "energy_log", "interpolate_curve"]


def _straight_curve(point: Tensor, base_point: Tensor, n_segments: int) -> Tensor:
    t = torch.linspace(0, 1, n_segments + 1, dtype=point.dtype, device=point.device)[:, None]
    return base_point[:, None] + t * (point - base_point)[:, None]


def _refine(curve: Tensor) -> Tensor:
    """Insert the midpoint of every segment: ``N -> 2N`` segments."""
    n, k, d = curve.shape
    mids = 0.5 * (curve[:, 1:] + curve[:, :-1])
    out = torch.empty(n, 2 * k - 1, d, dtype=curve.dtype, device=curve.device)
    out[:, 0::2] = curve
    out[:, 1::2] = mids
    return out


def _values_and_jacobians(embed, nodes: Tensor) -> tuple[Tensor, Tensor]:
    """``f`` ``(m, D)`` and ``J`` ``(m, D, d)`` at ``nodes`` ``(m, d)`` from one vmapped JVP."""
    m, d = nodes.shape
    basis = torch.eye(d, dtype=nodes.dtype, device=nodes.device)[:, None, :].expand(d, m, d)
    values, columns = vmap(lambda t: jvp(embed, (nodes,), (t,)), out_dims=(None, 0))(basis)
    return values, columns.permute(1, 2, 0)


def _energy(embed, curve: Tensor) -> Tensor:
    n, k, d = curve.shape
    decoded = embed(curve.reshape(-1, d)).reshape(n, k, -1)
    return 0.5 * (k - 1) * (decoded[:, 1:] - decoded[:, :-1]).pow(2).sum((1, 2))


@torch.no_grad()
def _gauss_newton(embed, curve: Tensor, max_iter: int, xtol: float) -> tuple[Tensor, Tensor]:
    """Levenberg-Marquardt on the polygon energy; returns ``(curve, converged (n,))``.

    Converged: the last accepted step moved no interior node by more than
    ``xtol * (1 + max|node|)``, or the energy is stationary to rounding.
    """
    curve = curve.clone()
    n, k, d = curve.shape
    N, m = k - 1, k - 2
    if m == 0:
        return curve, torch.ones(n, dtype=torch.bool, device=curve.device)
    scale = 1 + curve.abs().amax((1, 2))
    energy = _energy(embed, curve)
    damping = torch.full((n,), 1e-6, dtype=curve.dtype, device=curve.device)
    converged = torch.zeros(n, dtype=torch.bool, device=curve.device)
    failed = torch.zeros_like(converged)
    idx_m = torch.arange(m, device=curve.device)
    eps = torch.finfo(curve.dtype).eps
    for _ in range(max_iter):
        active = (~converged & ~failed).nonzero().squeeze(-1)
        if len(active) == 0:
            break
        c = curve[active]
        na = len(active)
        values, J = _values_and_jacobians(embed, c.reshape(-1, d))
        values = values.reshape(na, k, -1)
        J = J.reshape(na, k, -1, d)
        segments = values[:, 1:] - values[:, :-1]  # (na, N, D)
        Jt = J.transpose(-1, -2)
        inner = Jt[:, 1:-1]  # interior nodes
        gradient = N * (inner @ (segments[:, :-1] - segments[:, 1:]).unsqueeze(-1)).squeeze(-1)  # (na, m, d)
        H = torch.zeros(na, m, m, d, d, dtype=c.dtype, device=c.device)
        H[:, idx_m, idx_m] = 2 * N * (inner @ J[:, 1:-1])
        if m > 1:
            coupling = -N * (inner[:, :-1] @ J[:, 2:-1])  # between interior nodes k and k + 1
            H[:, idx_m[:-1], idx_m[1:]] = coupling
            H[:, idx_m[1:], idx_m[:-1]] = coupling.transpose(-1, -2)
        H = H.permute(0, 1, 3, 2, 4).reshape(na, m * d, m * d)
        g = gradient.reshape(na, m * d)
        diag = H.diagonal(dim1=-2, dim2=-1)
        mean_diag = diag.mean(-1).clamp_min(torch.finfo(c.dtype).tiny)
        accepted = torch.zeros(na, dtype=torch.bool, device=c.device)
        lam = damping[active]
        for _ in range(8):
            todo = (~accepted).nonzero().squeeze(-1)
            if len(todo) == 0:
                break
            A = H[todo] + (lam[todo] * mean_diag[todo])[:, None, None] * torch.eye(m * d, dtype=c.dtype, device=c.device)
            step = -torch.linalg.solve(A, g[todo].unsqueeze(-1)).squeeze(-1).reshape(len(todo), m, d)
            trial = c[todo].clone()
            trial[:, 1:-1] += step
            e_trial = _energy(embed, trial)
            e_now = energy[active[todo]]
            ok = torch.isfinite(e_trial) & (e_trial <= e_now)
            rows = active[todo[ok]]
            curve[rows] = trial[ok]
            energy[rows] = e_trial[ok]
            small = step.abs().amax((1, 2)) <= xtol * scale[active[todo]]
            # stationary: no decrease is possible beyond rounding of the energy itself
            flat = (e_now - e_trial).abs() <= 4 * eps * e_now.abs()
            converged[active[todo[(ok & small) | (~ok & flat & small)]]] = True
            accepted[todo[ok]] = True
            lam[todo[ok]] = lam[todo[ok]] / 3
            lam[todo[~ok]] = lam[todo[~ok]] * 10
        damping[active] = lam.clamp(1e-12, 1e12)
        failed[active[~accepted & (lam > 1e10)]] = True
    return curve, converged


def _lbfgs(embed, curve: Tensor, max_iter: int) -> tuple[Tensor, Tensor]:
    """L-BFGS on the energy of a metric-field curve (first derivatives only)."""
    inner = curve[:, 1:-1].detach().clone().requires_grad_(True)
    ends = curve[:, :1], curve[:, -1:]
    optimizer = torch.optim.LBFGS(
        [inner], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-13, tolerance_change=0
    )

    def closure():
        energy = curve_energy(embed, torch.cat([ends[0], inner, ends[1]], dim=1)).sum()
        # autograd.grad, not backward(): nothing accumulates into decoder parameters
        (grad,) = torch.autograd.grad(energy, inner)
        inner.grad = grad.contiguous()
        return energy

    with torch.enable_grad():
        optimizer.step(closure)
    grad_norm = inner.grad.abs().amax((1, 2)) if inner.grad is not None else torch.zeros(len(curve))
    out = torch.cat([ends[0], inner.detach(), ends[1]], dim=1)
    return out, torch.isfinite(grad_norm) & (grad_norm <= 1e-6 * (1 + out.abs().amax((1, 2))))


def discrete_geodesic(
    embed: Embedding,
    point: Tensor,
    base_point: Tensor,
    n_segments: int = 16,
    max_iter: int = 50,
    initial_curve: Tensor | None = None,
    xtol: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimize the energy of polygons with fixed end points, batched.

    Parameters
    ----------
    embed : callable ``(m, d) -> (m, D)``, or a MetricDecoder
    point, base_point : Tensor, shape=[n, d]
    n_segments : int
        Segments of the polygon (``n_segments + 1`` nodes).
    max_iter : int
        Levenberg-Marquardt iterations (L-BFGS iterations for a MetricDecoder).
    initial_curve : Tensor, shape=[n, n_segments + 1, d], optional
        First guess; the straight segment if None.
    xtol : float, optional
        Node-step tolerance, relative to ``1 + max|node|``. Default ``1e-10``
        (float64) or ``1e-5`` (float32).

    Returns
    -------
    curve : Tensor, shape=[n, n_segments + 1, d]
        Nodes at uniform times ``0, 1/N, ..., 1``.
    converged : Tensor, shape=[n], bool
        The optimizer's stopping test held (not a statement on the
        discretization error: see :func:`energy_log`).
    """
    curve = _straight_curve(point, base_point, n_segments) if initial_curve is None else initial_curve
    if xtol is None:
        xtol = 1e-10 if point.dtype == torch.float64 else 1e-5
    if isinstance(embed, MetricDecoder):
        return _lbfgs(embed, curve, max_iter * 10)
    return _gauss_newton(embed, curve, max_iter, xtol)


def _initial_velocity(embed, curve: Tensor, length: Tensor) -> Tensor:
    """Velocity at ``t = 0`` of the geodesic the polygon approximates, with ``|v|_G = length``.

    Direction by a second-order one-sided difference of the nodes; speed from the
    (extrapolated) length, since a geodesic has constant speed ``|v|_G = L``.
    """
    N = curve.shape[1] - 1
    direction = (-3 * curve[:, 0] + 4 * curve[:, 1] - curve[:, 2]) * (N / 2)
    G = metric_matrix(embed, curve[:, 0])
    speed = torch.einsum("ni,nij,nj->n", direction, G, direction).clamp_min(0).sqrt()
    factor = torch.where(speed > 0, length / speed, torch.zeros_like(speed))
    return direction * factor[:, None]


def _extrapolate(lengths: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Richardson extrapolation of ``O(h^2)`` lengths at halving steps, and its relative error estimate.

    With three levels or more, the error of the extrapolated value is estimated
    by comparing it with the extrapolation one level coarser; with two, by the
    (larger) error of the finer raw length.
    """
    tiny = torch.finfo(lengths[-1].dtype).tiny
    if len(lengths) >= 3:
        previous = lengths[-2] + (lengths[-2] - lengths[-3]) / 3
        best = lengths[-1] + (lengths[-1] - lengths[-2]) / 3
        return best, (best - previous).abs() / best.clamp_min(tiny)
    coarse, fine = lengths[-2], lengths[-1]
    return fine + (fine - coarse) / 3, (fine - coarse).abs() / (3 * fine.clamp_min(tiny))


@torch.no_grad()
def energy_log(
    embed: Embedding,
    point: Tensor,
    base_point: Tensor,
    n_segments: int = 16,
    n_refinements: int = 2,
    rtol: float | None = None,
    max_iter: int = 50,
):
    """Logarithm map from discrete geodesics, with a discretization-error estimate.

    Solves with ``n_segments``, then ``2 n_segments``, ... (``n_refinements``
    doublings, each warm-started from the previous curve), extrapolates the
    decoded length as ``L_2N + (L_2N - L_N) / 3`` and takes the initial
    velocity from the finest curve, scaled to that length.

    Parameters
    ----------
    embed : callable ``(m, d) -> (m, D)``, or a MetricDecoder
    point, base_point : Tensor, shape=[n, d]
    n_segments : int
        Segments of the coarsest polygon.
    n_refinements : int
        Doublings (>= 1, for the error estimate).
    rtol : float, optional
        Convergence threshold on the estimated relative length error.
        Default ``1e-5`` (float64) or ``1e-4`` (float32).
    max_iter : int
        Optimizer iterations per level.

    Returns
    -------
    result : LogResult
        ``residual`` is the estimated relative error of the extrapolated
        length (the change of the extrapolation between the two finest level
        pairs, or ``|L_2N - L_N| / (3 L_2N)`` with one refinement);
        ``converged`` also requires the optimizer to have converged at every
        level; ``n_iterations`` counts levels.
    curve : Tensor, shape=[n, n_segments * 2**n_refinements + 1, d]
        The finest polygon.
    length : Tensor, shape=[n]
        Extrapolated length.
    """
    if n_refinements < 1:
        raise ValueError(f"n_refinements must be >= 1 (the error estimate needs two levels), got {n_refinements}")
    if rtol is None:
        rtol = 1e-5 if point.dtype == torch.float64 else 1e-4
    curve, ok = discrete_geodesic(embed, point, base_point, n_segments, max_iter)
    lengths = [curve_length(embed, curve)]
    for _ in range(n_refinements):
        curve, ok_level = discrete_geodesic(embed, point, base_point, max_iter=max_iter, initial_curve=_refine(curve))
        ok = ok & ok_level
        lengths.append(curve_length(embed, curve))
    length, error = _extrapolate(lengths)
    same = (point == base_point).all(-1)
    error = torch.where(same, torch.zeros_like(error), error)
    tangent_vec = torch.where(same[:, None], torch.zeros_like(point), _initial_velocity(embed, curve, length))
    converged = ok & torch.isfinite(error) & (error <= rtol) & torch.isfinite(tangent_vec).all(-1)
    n_levels = torch.full((len(point),), n_refinements + 1, dtype=torch.long, device=point.device)
    result = LogResult(
        tangent_vec,
        converged,
        error,
        n_levels,
        tol=rtol,
        method="energy",
        from_energy=torch.ones_like(converged),
        energy_rtol=rtol,
    )
    return result, curve, length


def interpolate_curve(curve: Tensor, times: Tensor) -> Tensor:
    """Evaluate polygons with nodes at uniform times ``0, 1/N, ..., 1`` at ``times``.

    Parameters
    ----------
    curve : Tensor, shape=[n, N + 1, d]
    times : Tensor, shape=[n_t]
        In ``[0, 1]``.

    Returns
    -------
    points : Tensor, shape=[n, n_t, d]
    """
    if torch.any((times < 0) | (times > 1)):
        raise ValueError("a discrete geodesic is defined for times in [0, 1] only")
    N = curve.shape[1] - 1
    position = times.to(curve.dtype) * N
    left = position.floor().long().clamp(max=N - 1)
    frac = (position - left.to(curve.dtype))[None, :, None]
    return curve[:, left] * (1 - frac) + curve[:, left + 1] * frac
