r"""Discrete geodesics: the boundary-value problem solved by minimizing curve energy.

A latent curve is a polygon ``c_0 = z0, c_1, ..., c_N = z1`` at uniform times;
its energy is that of the decoded polygon,

.. math:: E(c) = \frac N2 \sum_{i<N} \|f(c_{i+1}) - f(c_i)\|^2 ,

a nonlinear least-squares problem in the interior nodes. It is minimized by
damped Newton (Levenberg-Marquardt) with the block-tridiagonal Hessian, per
pair and batched: the Gauss-Newton part ``N [2 G_k on the diagonal,
-J_k^T J_{k+1} beside it]`` plus, for ``d <= 4``, the decoder's second
derivatives weighted by the residuals; the derivatives in float32 where that
is safe (:func:`newton_derivative_dtype`), energies and residuals in the
points' dtype. It sees the whole curve at once, so it does not get lost on
strongly bending geodesics the way shooting from a straight line can, and it
works where the geodesic ODE is degenerate (ReLU networks have ``d^2 f = 0``
almost everywhere: their ODE geodesics are straight lines, which are not the
shortest curves; their energy is piecewise smooth, and L-BFGS minimizes it).

The nodes converge as ``O(1/N^2)`` in the number of segments: the solver
refines ``N -> 2N -> 4N``, reports the length of the cubic spline through the
nodes (``O(1/N^4)``, an upper bound), checked against the Richardson-extrapolated
chord length, and the estimated discretization error, which decides convergence.

For a :class:`~pullback_manifold.decoders.MetricDecoder` (the metric is not a
pull-back through one map) the energy uses ``G`` at segment midpoints,
``E = N/2 sum_k (c_{k+1} - c_k)^T G(m_k) (c_{k+1} - c_k)``, and is minimized by the
same damped Newton method with its exact block-tridiagonal Hessian (from ``G``,
``dG`` and ``d^2 G`` at the midpoints) for ``d <= 8``; above, by L-BFGS, then
Gauss-Newton steps with ``G``'s block-tridiagonal matrix.
"""

from __future__ import annotations

import itertools
import operator

import torch
from torch import Tensor

from .block_tridiagonal import solve_block_tridiagonal
from .decoders import MetricDecoder, casts_to_input
from .geodesics import LogResult
from .geometry import (
    Embedding,
    _squared_speeds,
    curve_energy,
    curve_length,
    embedding_jet,
    geodesic_acceleration,
    metric_matrix,
    midpoint_speeds,
)

__all__ = ["discrete_geodesic", "energy_log", "newton_derivative_dtype", "interpolate_curve", "arc_length_times"]


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


# Nodes per decoder pass: a jet's intermediate tensors for ~2000 nodes stay in cache;
# one pass over 10^5 nodes was measured 3x slower per node (memory traffic, page faults).
_NODE_CHUNK = 2048


def _refine_cubic(curve: Tensor) -> Tensor:
    """:func:`_refine` with midpoints from the cubic through the four nearest nodes (the
    quadratic through three at the ends): ``O(h^4)`` off a smooth curve, not ``O(h^2)``."""
    k = curve.shape[1]
    if k < 3:
        return _refine(curve)
    out = _refine(curve)
    c = curve
    if k > 3:
        out[:, 3:-3:2] = (9 * (c[:, 1:-2] + c[:, 2:-1]) - (c[:, :-3] + c[:, 3:])) / 16
    out[:, 1] = (3 * c[:, 0] + 6 * c[:, 1] - c[:, 2]) / 8
    out[:, -2] = (3 * c[:, -1] + 6 * c[:, -2] - c[:, -3]) / 8
    return out


def _node_derivatives(
    embed, nodes: Tensor, hessian: bool, dtype: torch.dtype, fallback: bool = True
) -> tuple[Tensor, Tensor | None]:
    """The transposed Jacobians ``J^T`` ``(m, d, D)`` (rows: derivatives along the
    coordinate directions) and, if ``hessian``, the second derivatives ``d^2 f[e_a, e_b]``
    ``(m, P, D)`` for the ``P = d (d + 1) / 2`` pairs ``a <= b`` (:func:`torch.triu_indices`
    order), from one Taylor-mode pass per chunk of nodes, computed in ``dtype`` and returned
    in the nodes' dtype. With ``fallback``, a chunk with a non-finite derivative in a lower
    ``dtype`` (overflow) is computed again, in the nodes' own."""
    m, d = nodes.shape
    pairs = tuple(torch.triu_indices(d, d, device=nodes.device)) if hessian else None
    if m == 0:
        return nodes.new_empty(0, d, 0), nodes.new_empty(0, len(pairs[0]), 0) if hessian else None
    firsts = seconds = None
    for start in range(0, m, _NODE_CHUNK):
        chunk = nodes[start : start + _NODE_CHUNK]
        for precision in (dtype, nodes.dtype):
            basis = torch.eye(d, dtype=precision, device=nodes.device)[:, None, :].expand(d, len(chunk), d)
            jet = embedding_jet(embed, chunk.to(precision), basis, pair=pairs)
            first, second = jet.first, jet.second  # (d, c, D), (P, c, D)
            # One reduction per tensor: any inf or nan makes the sum non-finite.
            if not fallback or precision == nodes.dtype:
                break
            if torch.isfinite(first.sum() + (0 if second is None else second.sum())):
                break
        if firsts is None:
            firsts = nodes.new_empty(m, d, first.shape[-1])
            seconds = nodes.new_empty(m, len(second), first.shape[-1]) if hessian else None
        firsts[start : start + len(chunk)] = first.transpose(0, 1)
        if hessian:
            seconds[start : start + len(chunk)] = second.transpose(0, 1)
    return firsts, seconds


def _gram_blocks(Jt: Tensor) -> tuple[Tensor, Tensor]:
    """``J_i^T J_i`` ``(n, m, d, d)`` and ``J_i^T J_{i+1}`` ``(n, m - 1, d, d)`` from the
    transposed Jacobians ``J_i^T`` ``(n, m, d, D)`` of consecutive nodes.

    For ``d <= 4``, as dot products of rows: batched matrix products of ``(d, D)``
    blocks are overhead-bound (measured in float64, ``d = 2``, ``D = 128``: 2.7 times
    slower for 9,300 nodes)."""
    n, m, d, _ = Jt.shape
    if d > _NEWTON_MAX_DIM:
        return Jt @ Jt.transpose(-1, -2), Jt[:, :-1] @ Jt[:, 1:].transpose(-1, -2)
    gram = Jt.new_empty(n, m, d, d)
    cross = Jt.new_empty(n, max(m - 1, 0), d, d)
    for a in range(d):
        for b in range(a, d):
            gram[..., a, b] = gram[..., b, a] = (Jt[..., a, :] * Jt[..., b, :]).sum(-1)
        for b in range(d):
            cross[..., a, b] = (Jt[:, :-1, a, :] * Jt[:, 1:, b, :]).sum(-1)
    return gram, cross


def _symmetric_blocks(values: Tensor, d: int) -> Tensor:
    """``(..., d, d)`` symmetric blocks from their upper triangles ``(..., P)`` in
    :func:`torch.triu_indices` order."""
    a, b = torch.triu_indices(d, d, device=values.device)
    blocks = values.new_zeros(*values.shape[:-1], d, d)
    blocks[..., a, b] = values
    blocks[..., b, a] = values
    return blocks


def _metric_field_newton_terms(embed: MetricDecoder, curve: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Gradient ``(n, m, d)`` and exact Hessian blocks (diagonal ``(n, m, d, d)``, coupling
    ``(n, m - 1, d, d)``) at the ``m = N - 1`` interior nodes of the midpoint-rule energy
    ``E = N/2 sum_k D_k^T G(M_k) D_k`` of metric-field polygons ``(n, N + 1, d)``
    (``D_k = c_{k+1} - c_k``, ``M_k`` the midpoint), from ``G``, ``dG`` and ``d^2 G`` at
    the midpoints (:meth:`MetricDecoder.metric_second_derivatives`, chunked).

    Per segment, with ``p = N G D``, ``r_a = N/2 D^T d_a G D``, ``C_ia = (d_a G D)_i`` and
    ``S_ab = D^T d_a d_b G D``: the gradient is ``-p + r/2`` at its first node and
    ``p + r/2`` at its second; the Hessian blocks are ``N G \mp N/2 (C + C^T) + N/8 S``
    (first node, second node) and ``-N G - N/2 C + N/2 C^T + N/8 S`` between them."""
    n, k, d = curve.shape
    N = k - 1
    steps = curve[:, 1:] - curve[:, :-1]  # (n, N, d)
    midpoints = 0.5 * (curve[:, 1:] + curve[:, :-1])
    # Per chunk of segments, contracted with the steps at once: d^2 G has d^4 numbers per point.
    parts = []
    for mid, step in zip(midpoints.reshape(-1, d).split(_NODE_CHUNK), steps.reshape(-1, d).split(_NODE_CHUNK)):
        G, dG, ddG = embed.metric_second_derivatives(mid)
        C = torch.einsum("axij,xj->xia", dG, step)
        S = torch.einsum("abxij,xi,xj->xab", ddG, step, step)
        parts.append((G, C, S))
    G, C, S = (torch.cat([part[i] for part in parts]).reshape(n, N, d, d) for i in range(3))
    p = N * (G @ steps.unsqueeze(-1)).squeeze(-1)
    r = 0.5 * N * torch.einsum("nxia,nxi->nxa", C, steps)
    symmetric = 0.5 * N * (C + C.transpose(-1, -2))
    shared = N * G + (N / 8) * S
    first = shared - symmetric  # the segment's block at its first node
    second = shared + symmetric  # at its second node
    gradient = (p + 0.5 * r)[:, :-1] + (0.5 * r - p)[:, 1:]
    diagonal = second[:, :-1] + first[:, 1:]
    coupling = ((N / 8) * S - N * G + 0.5 * N * (C.transpose(-1, -2) - C))[:, 1:-1]
    return gradient, diagonal, coupling


# The second-order term costs d (d + 1) / 2 more derivative streams per node: worth it
# for the small latent spaces where Gauss-Newton crawls along sigma walls; above, Gauss-Newton.
_NEWTON_MAX_DIM = 4
# Metric fields: Newton with d^2 G (d^4 numbers per point, contracted per chunk) up to this
# dimension, else L-BFGS. Measured on GP decoders fitted to 300 digits at their d-D PCA
# coordinates, 5 pairs (benchmarks/gp_cost.py --dim d): 0.44 against 11.8 s per pair for
# L-BFGS at d = 5, 1.7 against 14.1 at d = 8, the same lengths (within 1e-8 of shooting's).
_METRIC_NEWTON_MAX_DIM = 8
# Damping (relative to the mean diagonal) of the first, undamped try of each iteration.
_UNDAMPED = 1e-12
# Rounding noise of an energy difference, relative, in units of the dtype's eps, beyond which
# an increase counts. Measured on 200 converged 512-segment digits-VAE polygons: moving the
# nodes by 1e-12 (a true change of ~1e-18 relative) changed the computed energy by 2500 eps
# (median), 13,000 eps at most: differences of nearby decoded points cancel.
_ENERGY_ROUNDING = 2e4


def _decoded(embed, curve: Tensor) -> Tensor:
    """``f(c_i)`` ``(n, N + 1, D)``, decoding chunks of nodes."""
    n, k, d = curve.shape
    decoded = torch.cat([embed(chunk).reshape(len(chunk), -1) for chunk in curve.reshape(-1, d).split(_NODE_CHUNK)])
    return decoded.reshape(n, k, -1)


def _energy(decoded: Tensor) -> Tensor:
    """Energy ``(n,)`` of polygons from their decoded nodes ``(n, N + 1, D)``."""
    return 0.5 * (decoded.shape[1] - 1) * (decoded[:, 1:] - decoded[:, :-1]).pow(2).sum((1, 2))


# Float32 derivatives are used for node tolerances from this up (see newton_derivative_dtype).
_FLOAT32_XTOL = 1e-6
# Nodes at which float32 derivatives are compared with float64 ones before a float64 solve uses them.
_PROBE_NODES = 32
# Their largest relative difference (per node, Frobenius) for the float32 ones to be used.
# Measured (float32 rounding): 4e-7 - 8e-7 for J and up to 1.1e-6 for d^2 f on the digits VAE
# and the random tanh MLP of the benchmarks; 1e-3 for J of sin(1e4 z).
_FLOAT32_AGREEMENT = 1e-5


def _disagreement(exact: Tensor, approximate: Tensor) -> Tensor:
    """Largest relative difference of per-node derivatives ``(m, ...)``."""
    exact, approximate = exact.reshape(len(exact), -1), approximate.reshape(len(exact), -1)
    tiny = torch.finfo(exact.dtype).tiny
    return ((exact - approximate).norm(dim=-1) / exact.norm(dim=-1).clamp_min(tiny)).max()


def newton_derivative_dtype(embed, nodes: Tensor) -> torch.dtype:
    """The dtype of the decoder derivatives in the Newton matrices of a solve at ``nodes`` ``(m, d)``.

    float32 for float64 nodes when the decoder runs in float32 (it is made of
    ``nn.Module`` s, whose parameters the geometry casts to the points' dtype;
    a plain callable may close over float64 tensors) and its float32
    derivatives agree with its float64 ones to ``1e-5`` (relative, per node)
    at 32 of the nodes; else the nodes' dtype.

    The derivatives enter only the Newton step (matrix and gradient), not the
    energies, residuals or lengths, which stay in float64. Their rounding
    errors, about ``1e-7`` relative, slow Newton's convergence a little and
    move the point it converges to: measured on 60 digits-VAE pairs, by
    ``1e-8`` - ``4e-8`` of ``1 + max|node|`` (median) and at most ``6e-7``
    (256 segments; it grows with the number of nodes). That is why
    :func:`discrete_geodesic` uses them only for a node tolerance ``xtol``
    of ``1e-6`` or more (its float64 default). Lengths are stationary at the
    minimizer, so they move by the square of that. On a CPU, float32 passes of
    the digits VAE's decoder (an MLP and an RBF network) cost 15 µs per node
    against 34 µs in float64 (second order, one thread).
    """
    if nodes.dtype != torch.float64 or not casts_to_input(embed):
        return nodes.dtype
    finite = nodes[torch.isfinite(nodes).all(-1)]
    if len(finite) == 0:
        return nodes.dtype
    hessian = nodes.shape[-1] <= _NEWTON_MAX_DIM
    index = torch.linspace(0, len(finite) - 1, min(len(finite), _PROBE_NODES), device=nodes.device).round().long()
    sample = finite[index]
    try:
        out = embed(sample.to(torch.float32))
        if out.dtype != torch.float32:
            return nodes.dtype
        low = _node_derivatives(embed, sample, hessian, torch.float32, fallback=False)
    except Exception:  # noqa: BLE001 -- a module that cannot run in float32 (e.g. a float64 constant in forward())
        return nodes.dtype
    exact = _node_derivatives(embed, sample, hessian, nodes.dtype)
    for a, b in zip(exact, low):
        # Not "> tolerance": a NaN (non-finite float32 derivatives, or float64 ones) must fail.
        if a is not None and not _disagreement(a, b) <= _FLOAT32_AGREEMENT:
            return nodes.dtype
    return torch.float32


@torch.no_grad()
def _gauss_newton(
    embed, curve: Tensor, max_iter: int, xtol: float, derivative_dtype: torch.dtype, known: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Damped Newton (Levenberg-Marquardt) on the polygon energy: of the decoded
    polygon, or for a :class:`MetricDecoder` (``d <= 8``) the midpoint-rule energy with
    its exact Hessian (:func:`_metric_field_newton_terms`; ``decoded`` is then None).

    Returns ``(curve, converged (n,), decoded (n, N + 1, D))``, the last the decoded
    nodes. ``known``: the decoded even nodes of ``curve`` ``(n, N / 2 + 1, D)``, when
    it refines a polygon whose nodes were decoded (they are its even nodes).
    ``derivative_dtype``: that of the decoder derivatives in the Newton matrix and
    gradient (see :func:`newton_derivative_dtype`); the decoded nodes, the
    residuals and the energies are in the curve's dtype.

    The Hessian is the Gauss-Newton part ``N J^T J`` plus, for ``d <= 4``, the
    decoder's second derivatives weighted by the residuals (``d (d + 1) / 2`` more
    derivative streams per node, too many above that). Gauss-Newton
    alone converges only linearly here, and slowly where the decoded surface bends
    strongly (a sigma wall of an expected metric): hundreds of iterations. A damped
    matrix that is not positive definite counts as a rejected step.

    Every iteration tries the undamped step first, then damps on rejection.

    Converged: an accepted step moved no interior node by more than
    ``tol = xtol * (1 + max|node|)`` (by 100 times less if the step was damped by
    more than ``1e-4`` of the mean diagonal: a short step then says little about
    the distance to the minimum); or, with the full Hessian, two undamped steps
    in a row, the second at most a tenth of the first, predict the next step
    (``s_k^3 / s_{k-1}^2`` in the quadratic regime) below ``tol``: that step,
    which would only confirm convergence, is not taken. The nodes are then
    within about ``tol`` of the minimizer. Measured on 200 digits-VAE pairs
    against always taking the confirming step: 24% fewer second-order decoder
    passes, 15-24% less time, tangent vectors changed by <= 3e-6 relative (their
    own discretization error: ~1e-4), lengths by <= 4e-9.
    """
    curve = curve.clone()
    n, k, d = curve.shape
    m = k - 2
    field = isinstance(embed, MetricDecoder)  # the midpoint-rule energy; nothing is decoded
    if m == 0:
        return curve, torch.ones(n, dtype=torch.bool, device=curve.device), None if field else _decoded(embed, curve)
    scale = 1 + curve.abs().amax((1, 2))
    # Decoded nodes, from the energy evaluations: the residuals in the gradient are their
    # differences, in the curve's dtype whatever the derivatives' (see newton_derivative_dtype).
    # A pair whose last step skipped the energy (``sure`` below) has converged: its entry is
    # ``stale``, not read in the loop, and decoded again at the end.
    if field:
        decoded = None
    elif known is None:
        decoded = _decoded(embed, curve)
    else:
        decoded = torch.empty(n, k, known.shape[-1], dtype=known.dtype, device=known.device)
        decoded[:, 0::2] = known
        decoded[:, 1::2] = _decoded(embed, curve[:, 1::2])
    stale = torch.zeros(n, dtype=torch.bool, device=curve.device)
    energy = curve_energy(embed, curve) if field else _energy(decoded)
    damping = torch.full((n,), 1e-6, dtype=curve.dtype, device=curve.device)
    converged = torch.zeros(n, dtype=torch.bool, device=curve.device)
    failed = torch.zeros_like(converged)
    jitters = torch.zeros(n, dtype=torch.long, device=curve.device)
    # Size of each pair's last accepted step if it was a Newton step (else inf).
    newton_step = torch.full((n,), torch.inf, dtype=curve.dtype, device=curve.device)
    # Else Gauss-Newton: linear convergence, no extrapolation. A metric field's Hessian is exact.
    full_newton = field or d <= _NEWTON_MAX_DIM
    rounding = _ENERGY_ROUNDING * torch.finfo(curve.dtype).eps
    generator = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(max_iter):
        active = (~converged & ~failed).nonzero().squeeze(-1)
        if len(active) == 0:
            break
        c = curve[active]
        na = len(active)
        if field:
            gradient, diagonal, coupling = _metric_field_newton_terms(embed, c)
        else:
            gradient, diagonal, coupling = _pullback_newton_terms(
                embed, c, decoded[active], full_newton, derivative_dtype
            )
        mean_diag = diagonal.diagonal(dim1=-2, dim2=-1).mean((1, 2)).clamp_min(torch.finfo(c.dtype).tiny)
        eye = torch.eye(d, dtype=c.dtype, device=c.device)
        accepted = torch.zeros(na, dtype=torch.bool, device=c.device)
        lam = damping[active]
        for attempt in range(9):
            todo = (~accepted).nonzero().squeeze(-1)
            if len(todo) == 0:
                break
            # Every iteration first tries the undamped Newton step: near the minimum it is
            # accepted and converges quadratically, where a damping kept from earlier,
            # harder iterations would crawl (measured: most of the iterations at the fine levels).
            pure = (lam[todo] > _UNDAMPED) if attempt == 0 else torch.zeros_like(todo, dtype=torch.bool)
            lam_try = torch.where(pure, _UNDAMPED, lam[todo])
            damped = diagonal[todo] + (lam_try * mean_diag[todo])[:, None, None, None] * eye
            step, positive = solve_block_tridiagonal(damped, coupling[todo], gradient[todo])
            step = torch.where(positive[:, None, None], -step, torch.zeros_like(step))
            trial = c[todo].clone()
            trial[:, 1:-1] += step
            e_now = energy[active[todo]]
            newton_like = lam_try <= 1e-4
            tolerance = xtol * scale[active[todo]] * torch.where(newton_like, 1.0, 1e-2)
            size = step.abs().amax((1, 2))
            small = size <= tolerance
            # Two undamped Newton steps in a row, the second at most a tenth of the first: the
            # iteration is in its quadratic regime and the next step would be about
            # size^3 / previous^2. Below the tolerance, that step is not taken (it would cost
            # a Hessian per node). Not for damped or Gauss-Newton steps: they converge linearly.
            undamped = lam_try <= _UNDAMPED
            previous = newton_step[active[todo]]
            contracting = undamped & torch.isfinite(previous) & (size <= 0.1 * previous)
            predicted = size**3 / previous.clamp_min(torch.finfo(size.dtype).tiny) ** 2
            quadratic = full_newton & contracting & (predicted <= tolerance)
            # A short last step (positive definite matrix) is taken without evaluating the
            # energy: it can change it only at rounding level.
            sure = positive & newton_like & small
            e_trial = e_now.clone()
            evaluate = positive & ~sure  # a matrix that is not positive definite gave no step
            if evaluate.any() and field:
                e_trial[evaluate] = curve_energy(embed, trial[evaluate])
            elif evaluate.any():
                # The end points' values are known: only the interior is decoded.
                d_trial = decoded[active[todo[evaluate]]]
                d_trial[:, 1:-1] = _decoded(embed, trial[evaluate][:, 1:-1])
                e_trial[evaluate] = _energy(d_trial)
            finite = positive & torch.isfinite(e_trial)
            # A short damped step may change the energy by less than its rounding error: then
            # the sign of the change says nothing.
            within = small & (e_trial <= e_now * (1 + rounding))
            ok = finite & (sure | (e_trial <= e_now) | within)
            rows = active[todo[ok]]
            curve[rows] = trial[ok]
            energy[rows] = e_trial[ok]
            if evaluate.any() and not field:
                decoded[active[todo[evaluate & ok]]] = d_trial[ok[evaluate]]
            stale[rows] = sure[ok]  # accepted without a value pass: ``decoded`` is not theirs
            newton_step[rows] = torch.where(undamped[ok], size[ok], torch.inf)
            converged[active[todo[ok & (small | quadratic)]]] = True
            accepted[todo[ok]] = True
            lam[todo[ok]] = lam[todo[ok]] / 3
            raise_ = ~ok & ~pure
            lam[todo[raise_]] = lam[todo[raise_]] * 10
        damping[active] = lam.clamp(1e-12, 1e12)
        # No descent even along (nearly) the steepest direction: a kink of a ReLU-like
        # decoder (the energy is only piecewise smooth). Nudge the nodes off it and go
        # on, a few times; a pair still stuck is reported as not converged.
        stuck = active[~accepted & (lam > 1e6)]
        if len(stuck):
            retry = stuck[jitters[stuck] < 3]
            failed[stuck[jitters[stuck] >= 3]] = True
            if len(retry):
                shape = curve[retry, 1:-1].shape
                noise = torch.randn(shape, generator=generator, dtype=curve.dtype, device="cpu").to(curve.device)
                curve[retry, 1:-1] += 1e-6 * scale[retry, None, None] * noise
                if field:
                    energy[retry] = curve_energy(embed, curve[retry])
                else:
                    decoded[retry] = _decoded(embed, curve[retry])
                    energy[retry] = _energy(decoded[retry])
                stale[retry] = False
                damping[retry] = 1e-6
                newton_step[retry] = torch.inf
                jitters[retry] += 1
    if stale.any() and not field:
        decoded[stale] = _decoded(embed, curve[stale])
    return curve, converged, decoded


def _pullback_newton_terms(
    embed, curve: Tensor, decoded: Tensor, full_newton: bool, derivative_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient ``(n, m, d)`` and Hessian blocks (diagonal ``(n, m, d, d)``, coupling
    ``(n, m - 1, d, d)``) at the ``m`` interior nodes of the decoded-polygon energy of
    polygons ``(n, N + 1, d)`` whose decoded nodes are ``decoded`` ``(n, N + 1, D)``: the
    Gauss-Newton part, plus the second-order part with ``full_newton``."""
    n, k, d = curve.shape
    N, m = k - 1, k - 2
    # Derivatives at the interior nodes only: the end points are fixed.
    Jt, second = _node_derivatives(embed, curve[:, 1:-1].reshape(-1, d), full_newton, derivative_dtype)
    D = Jt.shape[-1]
    inner = Jt.reshape(n, m, d, D)  # J_i^T at the interior nodes
    segments = decoded[:, 1:] - decoded[:, :-1]  # (n, N, D)
    weights = N * (segments[:, :-1] - segments[:, 1:])  # (n, m, D): the gradient at node i is J_i^T weights_i
    gradient = (inner @ weights.unsqueeze(-1)).squeeze(-1)  # (n, m, d)
    gram, cross = _gram_blocks(inner)
    diagonal = (2 * N) * gram  # (n, m, d, d)
    coupling = -N * cross  # between interior nodes i and i + 1
    if second is not None:
        # The second-order part of the Hessian, which Gauss-Newton leaves out:
        # sum_D weights_i[D] d^2 f_D(node i), from the pairs a <= b of _node_derivatives.
        curvature = (second.reshape(n, m, -1, D) @ weights.unsqueeze(-1)).squeeze(-1)  # (n, m, P)
        diagonal = diagonal + _symmetric_blocks(curvature, d)
    return gradient, diagonal, coupling


def _lbfgs(embed, curve: Tensor, max_iter: int, xtol: float | None = None) -> tuple[Tensor, Tensor]:
    """L-BFGS on the energy of a polygon (first derivatives only): piecewise-linear
    decoders, and metric fields above ``d = 8``, where ``d^2 G`` would cost ``d^4``
    numbers per point; for a :class:`MetricDecoder`, then Gauss-Newton steps to node
    tolerance ``xtol`` (:func:`_metric_gauss_newton`)."""
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
    grad_norm = inner.grad.abs().amax((1, 2)) if inner.grad is not None else curve.new_zeros(len(curve))
    out = torch.cat([ends[0], inner.detach(), ends[1]], dim=1)
    ok = torch.isfinite(grad_norm) & (grad_norm <= 1e-6 * (1 + out.abs().amax((1, 2))))
    if isinstance(embed, MetricDecoder) and xtol is not None:
        out, polished = _metric_gauss_newton(embed, out, xtol)
        ok = ok | polished
    return out, ok


def _metric_gauss_newton(embed: MetricDecoder, curve: Tensor, xtol: float, max_steps: int = 8) -> tuple[Tensor, Tensor]:
    """Gauss-Newton steps on the energy of a metric-field polygon, after L-BFGS.

    L-BFGS stalls on the slow, smooth modes of a fine polygon: on a Gaussian
    process its nodes stayed ~4e-6 (relative) from the minimum at 64-512
    segments, and no pair passed its convergence test, although the lengths
    were right. The energy's Hessian without the derivatives of ``G`` is
    block-tridiagonal, ``N [G(m_{i-1}) + G(m_i)]`` on the diagonal and ``-N G(m_i)``
    beside it (``m_i``: segment midpoints), and resolves those modes. Each step
    is halved until the energy does not increase (at most 4 times). Converged:
    a step of positive-definite matrix at most ``xtol * (1 + max|node|)``, as in
    :func:`_gauss_newton`. Returns ``(curve, converged (n,))``.
    """
    curve = curve.clone()
    n, k, _ = curve.shape
    N = k - 1
    converged = torch.zeros(n, dtype=torch.bool, device=curve.device)
    if k < 3:
        return curve, ~converged
    scale = 1 + curve.abs().amax((1, 2))
    rounding = _ENERGY_ROUNDING * torch.finfo(curve.dtype).eps
    stuck = torch.zeros_like(converged)
    for _ in range(max_steps):
        active = (~converged & ~stuck).nonzero().squeeze(-1)
        if len(active) == 0:
            break
        c = curve[active]
        inner = c[:, 1:-1].clone().requires_grad_(True)
        with torch.enable_grad():
            # The energy (curve_energy's) and G at the midpoints from one metric evaluation.
            squared, G = midpoint_speeds(embed, torch.cat([c[:, :1], inner, c[:, -1:]], dim=1))
            energy = 0.5 * N * squared.sum(-1)
            (gradient,) = torch.autograd.grad(energy.sum(), inner)
        energy, G = energy.detach(), G.detach()
        step, positive = solve_block_tridiagonal(N * (G[:, :-1] + G[:, 1:]), -N * G[:, 1:-1], gradient)
        size = step.abs().amax((1, 2))
        small = positive & (size <= xtol * scale[active])
        accepted = small.clone()  # a step that short changes the energy at rounding level only
        factor = 1.0
        for _ in range(5):
            todo = (positive & ~accepted).nonzero().squeeze(-1)
            if len(todo) == 0:
                break
            trial = c[todo].clone()
            trial[:, 1:-1] -= factor * step[todo]
            better = curve_energy(embed, trial) <= energy[todo] * (1 + rounding)
            curve[active[todo[better]]] = trial[better]
            accepted[todo[better]] = True
            factor /= 2
        final = c[small].clone()
        final[:, 1:-1] -= step[small]
        curve[active[small]] = final
        converged[active[small]] = True
        stuck[active[~accepted]] = True
    return curve, converged


def discrete_geodesic(
    embed: Embedding,
    point: Tensor,
    base_point: Tensor,
    n_segments: int = 16,
    max_iter: int = 50,
    initial_curve: Tensor | None = None,
    xtol: float | None = None,
    smooth: bool = True,
    derivative_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimize the energy of polygons with fixed end points, batched.

    Parameters
    ----------
    embed : callable ``(m, d) -> (m, D)``, or a MetricDecoder
    point, base_point : Tensor, shape=[n, d]
    n_segments : int
        Segments of the polygon (``n_segments + 1`` nodes).
    max_iter : int
        Levenberg-Marquardt iterations (ten times as many L-BFGS iterations
        where L-BFGS runs: not ``smooth``, or a MetricDecoder with ``d > 8``).
    initial_curve : Tensor, shape=[n, N + 1, d], optional
        First guess (then ``n_segments = N``; its end nodes are replaced by
        ``base_point`` and ``point``); the straight segment if None.
    xtol : float, optional
        Node-step tolerance, relative to ``1 + max|node|``. Default, in float64:
        ``1e-6`` with Newton steps (``d <= 4``, ``d <= 8`` for a MetricDecoder; the
        nodes end within about that of the minimizer), ``1e-8`` with Gauss-Newton
        steps or L-BFGS (linear convergence: a short step says less); ``1e-5`` in
        float32.
    smooth : bool
        False for piecewise-linear (ReLU-like) decoders: their energy is only
        piecewise smooth, Newton steps land on its kinks and stall there, so
        L-BFGS is used instead.
    derivative_dtype : torch.dtype, optional
        Dtype in which the decoder's derivatives for the Newton matrices are
        computed; energies and residuals stay in the points' dtype. Default:
        :func:`newton_derivative_dtype` (float32 for float64 points where the
        decoder runs in float32 and agrees with itself in float64) when
        ``xtol >= 1e-6``, else the points' dtype: float32 derivatives put the
        converged nodes up to about ``6e-7`` (relative) off the minimizer.

    Returns
    -------
    curve : Tensor, shape=[n, n_segments + 1, d]
        Nodes at uniform times ``0, 1/N, ..., 1``.
    converged : Tensor, shape=[n], bool
        The optimizer's stopping test held (not a statement on the
        discretization error: see :func:`energy_log`).
    """
    curve, n_segments = _checked_start(point, base_point, n_segments, initial_curve, 1)
    if curve is None:
        curve = _first_guess(point, base_point, n_segments, smooth)
    if len(curve) == 0:
        return curve, torch.ones(0, dtype=torch.bool, device=curve.device)
    return _minimize(embed, curve, max_iter, xtol, smooth, derivative_dtype)[:2]


def _checked_start(
    point: Tensor, base_point: Tensor, n_segments: int, initial_curve: Tensor | None, min_segments: int
) -> tuple[Tensor | None, int]:
    """Validate the arguments that set a polygon; return ``initial_curve`` with its end
    points set to ``base_point`` and ``point`` (a copy) or None, and the number of segments."""
    if point.dim() != 2 or point.shape != base_point.shape:
        raise ValueError(
            f"point {tuple(point.shape)} and base_point {tuple(base_point.shape)}: expected the same shape (n, d)"
        )
    if initial_curve is None:
        try:
            count = None if isinstance(n_segments, bool) else operator.index(n_segments)  # numpy ints too
        except TypeError:
            count = None
        if count is None or count < min_segments:
            raise ValueError(f"n_segments must be an int >= {min_segments}, got {n_segments!r}")
        return None, count
    n, d = point.shape
    if initial_curve.dim() != 3 or initial_curve.shape[0] != n or initial_curve.shape[2] != d:
        raise ValueError(f"initial_curve has shape {tuple(initial_curve.shape)}: expected ({n}, N + 1, {d})")
    if initial_curve.shape[1] < min_segments + 1:
        raise ValueError(
            f"initial_curve has {initial_curve.shape[1]} nodes: expected at least {min_segments + 1} "
            f"({min_segments} segments)"
        )
    # A warm start from a neighbouring problem (its end points moved) joins the right points.
    curve = initial_curve.to(dtype=point.dtype, device=point.device).clone()
    curve[:, 0], curve[:, -1] = base_point, point
    return curve, curve.shape[1] - 1


def _first_guess(point: Tensor, base_point: Tensor, n_segments: int, smooth: bool) -> Tensor:
    """The straight polygon; for a piecewise-linear decoder, nudged off the kinks: a node
    exactly on one (a symmetric pair puts the middle node on z_i = 0) sees a one-sided
    derivative that can vanish there."""
    curve = _straight_curve(point, base_point, n_segments)
    if not smooth:
        generator = torch.Generator(device="cpu").manual_seed(1)
        noise = torch.randn(curve[:, 1:-1].shape, generator=generator, dtype=curve.dtype, device="cpu").to(curve.device)
        chord = (point - base_point).abs().amax(-1)
        curve[:, 1:-1] += 1e-7 * chord[:, None, None] * noise
    return curve


def _minimize(
    embed,
    curve: Tensor,
    max_iter: int,
    xtol: float | None,
    smooth: bool,
    derivative_dtype: torch.dtype | None,
    known: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`discrete_geodesic` from its first guess, also returning the decoded nodes
    (None where L-BFGS ran); ``known`` as in :func:`_gauss_newton`."""
    field = isinstance(embed, MetricDecoder)
    field_newton = smooth and field and _metric_newton_runs(embed, curve)
    if xtol is None:
        xtol = _default_xtol(curve, True if field_newton else None)
    if not smooth or (field and not field_newton):
        return (*_lbfgs(embed, curve, max_iter * 10, xtol), None)
    if field:
        derivative_dtype = curve.dtype  # the metric's own algebra decides its precision
    elif derivative_dtype is None:
        derivative_dtype = _derivative_dtype(embed, curve, xtol)
    return _gauss_newton(embed, curve, max_iter, xtol, derivative_dtype, known)


def _metric_newton_runs(embed: MetricDecoder, curve: Tensor) -> bool:
    """Whether Newton's method can run on the metric field's polygons ``(n, k, d)``: ``d <= 8``
    (``d^2 G`` has ``d^4`` entries per point) and ``metric_second_derivatives`` works, tried
    at one node. Its default differentiates the metric in forward mode, which a metric
    built on a backward-only ``torch.autograd.Function`` does not support: L-BFGS, which
    needs reverse mode only, minimizes those."""
    if curve.shape[-1] > _METRIC_NEWTON_MAX_DIM or curve.numel() == 0:
        return curve.shape[-1] <= _METRIC_NEWTON_MAX_DIM
    try:
        embed.metric_second_derivatives(curve[:1, 0])
    except Exception:  # noqa: BLE001 -- any failure: the first-order method, which may still run
        return False
    return True


def _default_xtol(point: Tensor, newton: bool | None = None) -> float:
    """:func:`discrete_geodesic`'s default node tolerance for points (or nodes) ``(..., d)``,
    with Newton steps or not (default: a pull-back decoder's choice, ``d <= 4``)."""
    if newton is None:
        newton = point.shape[-1] <= _NEWTON_MAX_DIM
    return (1e-6 if newton else 1e-8) if point.dtype == torch.float64 else 1e-5


def _derivative_dtype(embed, curve: Tensor, xtol: float) -> torch.dtype:
    """:func:`newton_derivative_dtype` at the nodes of ``curve`` where ``xtol`` allows float32."""
    if xtol < _FLOAT32_XTOL:
        return curve.dtype
    return newton_derivative_dtype(embed, curve.reshape(-1, curve.shape[-1]))


def _initial_direction(curve: Tensor) -> Tensor:
    """``c'(0)`` of the polygon's nodes by a second-order one-sided difference ``(n, d)``."""
    N = curve.shape[1] - 1
    return (-3 * curve[:, 0] + 4 * curve[:, 1] - curve[:, 2]) * (N / 2)


def _initial_velocity(embed, base_point: Tensor, directions: list[Tensor], length: Tensor) -> Tensor:
    """Velocity at ``t = 0`` of the geodesic the polygons approximate, with ``|v|_G = length``.

    The direction is Richardson-extrapolated from the two finest levels (the
    nodes and the difference are both second-order accurate); the speed comes
    from the length (:func:`_certify`'s), since a geodesic has constant speed ``|v|_G = L``.
    """
    direction = directions[-1] + (directions[-1] - directions[-2]) / 3
    return scaled_to_length(embed, base_point, direction, length)


def metric_norm(embed, point: Tensor, vector: Tensor) -> Tensor:
    """``|vector|_G`` at ``point`` ``(n, d)``: ``(n,)``."""
    G = metric_matrix(embed, point)
    return torch.einsum("ni,nij,nj->n", vector, G, vector).clamp_min(0).sqrt()


def scaled_to_length(embed, point: Tensor, direction: Tensor, length: Tensor) -> Tensor:
    """``direction`` ``(n, d)`` at ``point`` scaled to ``|v|_G = length`` (0 where it is 0):
    a geodesic's velocity has its length as constant speed."""
    speed = metric_norm(embed, point, direction)
    return direction * torch.where(speed > 0, length / speed, torch.zeros_like(speed))[:, None]


def end_velocity(embed, curve: Tensor, length: Tensor) -> Tensor:
    """Velocity at ``t = 1`` ``(n, d)`` of discrete geodesics ``(n, N + 1, d)`` of lengths
    ``(n,)``: the nodes' third-order one-sided difference (second-order where there are
    three nodes), scaled to the length."""
    last = curve[:, -4:].flip(1)
    steps = torch.arange(last.shape[1], dtype=curve.dtype, device=curve.device).expand(len(curve), -1)
    return scaled_to_length(embed, curve[:, -1], -_end_slope(last, steps).squeeze(1), length)


def _tiny_chords(point: Tensor, base_point: Tensor) -> Tensor:
    """Pairs ``(n,)`` whose chord is at most ``sqrt(eps) (1 + max|point|)``: there the nodes'
    differences are mostly rounding (a tanh MLP's pairs ``1e-8``, ``1e-10`` and ``1e-12`` apart:
    the polygons' initial directions ``4e-6``, ``9e-4`` and ``0.7`` off, relative)."""
    scale = 1 + torch.maximum(point.abs().amax(-1), base_point.abs().amax(-1))
    return (point - base_point).abs().amax(-1) <= torch.finfo(point.dtype).eps ** 0.5 * scale


def _taylor_log(embed, point: Tensor, base_point: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Logarithm of close pairs by its Taylor expansion: ``exp(v) = z0 + v + a(z0, v) / 2 + O(|v|^3)``
    (``a`` the geodesic acceleration), so ``v = u - a(z0, u) / 2 + O(|u|^3)`` for the chord ``u``.

    Returns the velocities ``(n, d)``, their lengths ``|v|_G`` ``(n,)``, and the estimated
    relative error ``(n,)``: the next term is of relative order ``(|a| / |u|)^2`` (the chord
    over the metric's length scale, squared), with rounding as its floor.
    """
    chord = point - base_point
    acceleration = geodesic_acceleration(embed, base_point, chord)
    velocity = chord - 0.5 * acceleration
    length = metric_norm(embed, base_point, velocity)
    ratio = acceleration.abs().amax(-1) / chord.abs().amax(-1)
    error = (ratio * ratio).clamp_min(torch.finfo(point.dtype).eps)
    return velocity, length, error


def _extrapolate(lengths: list[Tensor], smooth: bool = True) -> tuple[Tensor, Tensor]:
    """Richardson extrapolation of ``O(h^2)`` lengths at halving steps, and its relative error estimate.

    With three levels or more, the error of the extrapolated value is estimated
    by comparing it with the extrapolation one level coarser; with two, by the
    (larger) error of the finer raw length. Not smooth (ReLU-like decoders,
    first-order convergence: a chord across a kink cuts the corner): the finest
    length, with the last change as its error.
    """
    tiny = torch.finfo(lengths[-1].dtype).tiny
    if not smooth:
        return lengths[-1], (lengths[-1] - lengths[-2]).abs() / lengths[-1].clamp_min(tiny)
    if len(lengths) >= 3:
        previous = lengths[-2] + (lengths[-2] - lengths[-3]) / 3
        best = lengths[-1] + (lengths[-1] - lengths[-2]) / 3
        return best, (best - previous).abs() / best.clamp_min(tiny)
    coarse, fine = lengths[-2], lengths[-1]
    return fine + (fine - coarse) / 3, (fine - coarse).abs() / (3 * fine.clamp_min(tiny))


# Gauss-Legendre nodes and weights on [0, 1], three points: the spline's length per segment.
_GAUSS_NODES = (0.5 - 0.5 * 0.6**0.5, 0.5, 0.5 + 0.5 * 0.6**0.5)
_GAUSS_WEIGHTS = (5 / 18, 8 / 18, 5 / 18)


def _node_velocities(curve: Tensor) -> Tensor:
    """``dc/dt`` ``(n, N + 1, d)`` at the nodes of polygons at uniform times, by finite
    differences: fourth order (five-node stencils, one-sided at the ends) from ``N = 4``,
    second order below."""
    k = curve.shape[1]
    N = k - 1
    c = curve
    v = torch.empty_like(c)
    if k >= 5:
        v[:, 2:-2] = (c[:, :-4] - 8 * c[:, 1:-3] + 8 * c[:, 3:-1] - c[:, 4:]) * (N / 12)
        # One-sided stencils at the first two nodes, and mirrored at the last two.
        stencils = torch.tensor([[-25, 48, -36, 16, -3], [-3, -10, 18, -6, 1]], dtype=c.dtype, device=c.device)
        v[:, :2] = torch.einsum("js,nsd->njd", stencils, c[:, :5]) * (N / 12)
        v[:, -2:] = -torch.einsum("js,nsd->njd", stencils, c[:, -5:].flip(1)).flip(1) * (N / 12)
    elif k >= 3:
        v[:, 1:-1] = (c[:, 2:] - c[:, :-2]) * (N / 2)
        v[:, 0] = (-3 * c[:, 0] + 4 * c[:, 1] - c[:, 2]) * (N / 2)
        v[:, -1] = (3 * c[:, -1] - 4 * c[:, -2] + c[:, -3]) * (N / 2)
    else:
        v[:] = (c[:, -1:] - c[:, :1]) * N
    return v


def _polygon_length(embed, curve: Tensor) -> Tensor:
    """Riemannian length ``(n,)`` of the latent polygon itself, by Gauss-Legendre quadrature of
    ``|J(c(t)) dc|`` on each segment."""
    n, k, d = curve.shape
    nodes = torch.tensor(_GAUSS_NODES, dtype=curve.dtype, device=curve.device)
    weights = torch.tensor(_GAUSS_WEIGHTS, dtype=curve.dtype, device=curve.device)
    steps = curve[:, 1:] - curve[:, :-1]  # (n, N, d)
    points = curve[:, :-1, None] + nodes[:, None] * steps[:, :, None]  # (n, N, 3, d)
    directions = steps[:, :, None].expand_as(points).reshape(1, -1, d)
    return _quadrature(embed, points.reshape(-1, d), directions, weights).reshape(n, k - 1).sum(-1)


def _quadrature(embed, points: Tensor, velocities: Tensor, weights: Tensor) -> Tensor:
    """``sum_q weights_q |J(points) velocities|`` ``(n N,)``, one value per pair and segment,
    from ``points`` ``(n N Q, d)`` and ``velocities`` ``(1, n N Q, d)``, ordered pairs, then
    segments, then quadrature points."""
    speeds = torch.cat(
        [
            embedding_jet(embed, chunk, direction).first[0].reshape(len(chunk), -1).norm(dim=-1)
            for chunk, direction in zip(points.split(_NODE_CHUNK), velocities.split(_NODE_CHUNK, 1))
        ]
    )
    return (speeds.reshape(-1, len(weights)) * weights).sum(-1)


def _spline_length(embed, curve: Tensor) -> Tensor:
    """Riemannian length ``(n,)`` of the C^1 cubic (Hermite) latent curve through the nodes of
    polygons at uniform times, with node velocities from :func:`_node_velocities`, by
    Gauss-Legendre quadrature of ``|J(c(t)) c'(t)|`` on each segment.

    It is the length of a curve joining the end points, so (up to quadrature error) an
    upper bound on the distance; through the nodes of a discrete geodesic, which are
    ``O(h^2)`` off the geodesic, it is ``O(h^4)`` off its length (the length is stationary
    at a geodesic), where the polygon's own length and its chord length are ``O(h^2)`` off."""
    n, k, d = curve.shape
    s = torch.tensor(_GAUSS_NODES, dtype=curve.dtype, device=curve.device)[:, None]  # (3, 1)
    weights = torch.tensor(_GAUSS_WEIGHTS, dtype=curve.dtype, device=curve.device)
    tangents = _node_velocities(curve) / (k - 1)  # per unit of the segment's own parameter
    p0, p1 = curve[:, :-1, None], curve[:, 1:, None]  # (n, N, 1, d)
    m0, m1 = tangents[:, :-1, None], tangents[:, 1:, None]
    points = (2 * s**3 - 3 * s**2 + 1) * p0 + (s**3 - 2 * s**2 + s) * m0
    points = points + (3 * s**2 - 2 * s**3) * p1 + (s**3 - s**2) * m1
    velocities = (6 * s**2 - 6 * s) * (p0 - p1) + (3 * s**2 - 4 * s + 1) * m0 + (3 * s**2 - 2 * s) * m1
    per_segment = _quadrature(embed, points.reshape(-1, d), velocities.reshape(1, -1, d), weights)
    return per_segment.reshape(n, k - 1).sum(-1)


def _level_lengths(
    embed, curve: Tensor, cross_check: bool, decoded: Tensor | None = None, spline: bool = True
) -> Tensor:
    """``(n, 2)``: the decoded chord length (what the energy sees) and the length of the
    spline through the nodes (:func:`_spline_length`; NaN without ``spline``, for a level
    that no certificate reads); ``(n, 1)`` without the cross-check. ``decoded``: the
    decoded nodes, if known."""
    if isinstance(embed, MetricDecoder):
        chord = curve_length(embed, curve)
    else:
        if decoded is None:
            decoded = _decoded(embed, curve)
        chord = torch.linalg.vector_norm(decoded[:, 1:] - decoded[:, :-1], dim=-1).sum(-1)
    if not cross_check:
        return chord[:, None]
    return torch.stack([chord, _spline_length(embed, curve) if spline else torch.full_like(chord, torch.nan)], -1)


def _advance(window: list[Tensor], rows: Tensor, new: Tensor, size: int) -> list[Tensor]:
    """The last ``size`` levels (per-pair values, pairs first) after ``rows`` moved one level
    finer, to ``new``. The other pairs keep theirs (their last level repeated while the
    window fills up: their results are final, and only moved rows are read again)."""
    out = [level.clone() for level in window]
    if len(out) < size:
        out.append(out[-1].clone())
    else:
        for older, newer in itertools.pairwise(out):
            older[rows] = newer[rows]
    out[-1][rows] = new
    return out


# Floor of the length's error estimate, in units of the dtype's eps: the lengths are sums of
# hundreds of rounded terms. Measured on 200 float32 sphere-chart pairs (64 segments): lengths
# up to 8.8 eps off the great circle, and above the estimate without a floor on 63 of them (a
# log's rule) and 155 (lengths_only).
_LENGTH_ROUNDING = 64


def _chord_term(lengths: list[Tensor], smooth: bool) -> Tensor:
    """A log's certificate without its spline term (:func:`_certify`): a quarter of the change
    of the chord extrapolation between the last two level pairs, or, with two levels, the
    estimated error of the raw finer length (no regime argument there)."""
    _, error = _extrapolate([level[:, 0] for level in lengths], smooth)
    return error / 4 if len(lengths) >= 3 and smooth else error


def _certify(
    lengths: list[Tensor], smooth: bool, lengths_only: bool = False, pending: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Length and its estimated relative error, from levels of :func:`_level_lengths`.

    With the cross-check (smooth pull-back decoders), the length is the spline
    length of the finest level, ``O(h^4)`` accurate and, as the length of a
    curve, an upper bound; it is compared with the extrapolated chord length
    (Richardson, also ``O(h^4)``, from below before extrapolation, with a
    constant about ten times larger on the digits VAE). Error estimate:

    - for a log (default), the larger of ``4 |spline - chord|`` and a quarter of
      the change of the chord extrapolation between the last two level pairs
      (:func:`_chord_term`, which overestimates that extrapolation's error about
      15-fold in the asymptotic regime). It stops where the chord extrapolation
      is certified, which keeps the initial velocities (extrapolated from the
      same levels) at their accuracy: they converge more slowly than lengths.
    - ``lengths_only`` (distances), a quarter of the larger of ``|spline -
      chord|`` and the change of the spline length from the previous level
      (about 10 and 15 times the spline's error in the asymptotic regime).

    Both cross terms catch polygons whose chords jump over a thin region of
    large metric (a sigma wall) at every level so far, where the chord lengths
    alone can look converged. Without the cross-check (MetricDecoder,
    piecewise-linear decoders): :func:`_extrapolate`'s length and estimate. Every
    estimate is at least ``64 eps`` (rounding).

    ``pending`` (a log's rule only): pairs whose finest spline length was not
    computed, because the chord term alone fails; they get the chord
    extrapolation as a provisional length and the chord term as its error.
    """
    length, error = _extrapolate([level[:, 0] for level in lengths], smooth)
    rounding = _LENGTH_ROUNDING * torch.finfo(length.dtype).eps
    if lengths[-1].shape[1] == 1 or not smooth:
        return length, error.clamp_min(rounding)
    spline = lengths[-1][:, 1]
    tiny = torch.finfo(length.dtype).tiny
    cross = (spline - length).abs() / spline.clamp_min(tiny)
    if lengths_only:
        change = (lengths[-2][:, 1] - spline).abs() / spline.clamp_min(tiny)
        error = torch.maximum(change, cross) / 4
    else:
        chord_term = _chord_term(lengths, smooth)
        error = torch.maximum(4 * cross, chord_term)
        if pending is not None:
            spline = torch.where(pending, length, spline)
            error = torch.where(pending, chord_term, error)
    return spline, error.clamp_min(rounding)


def _spline_where_needed(
    embed, lengths: list[Tensor], curve: Tensor, ok: Tensor, rtol: float, smooth: bool, final: bool
) -> Tensor:
    """Fill in the finest level's spline lengths (``lengths[-1][:, 1]``, in place; a log's rule
    reads no other level's) that its certificate can pass with: where the optimizer converged and the chord term is within
    ``rtol`` (elsewhere the pair is refined again whatever its spline), or everywhere on the
    ``final`` level. Returns the rows left ``pending`` (for :func:`_certify`).

    On the digits VAE the quadrature took 17% of a log's time when it was computed at every
    level from the next-to-last mandatory one, and most of those lengths were never read."""
    if final:
        needed = torch.ones_like(ok)
    else:
        needed = ok & (_chord_term(lengths, smooth) <= rtol)
    rows = needed.nonzero().squeeze(-1)
    if len(rows):
        lengths[-1][rows, 1] = _spline_length(embed, curve[rows])
    return ~needed


@torch.no_grad()
def energy_log(
    embed: Embedding,
    point: Tensor,
    base_point: Tensor,
    n_segments: int = 16,
    n_refinements: int | None = None,
    rtol: float | None = None,
    max_iter: int = 50,
    smooth: bool = True,
    max_refinements: int | None = None,
    initial_curve: Tensor | None = None,
    global_start: bool = True,
    derivative_dtype: torch.dtype | None = None,
    lengths_only: bool = False,
):
    """Logarithm map from discrete geodesics, with a discretization-error estimate.

    Solves with ``n_segments``, then ``2 n_segments``, ... (``n_refinements``
    doublings, each warm-started from the previous curve), takes the length of
    the cubic spline through the finest polygon's nodes (for a smooth pull-back
    decoder; for a MetricDecoder, the decoded chord length extrapolated as
    ``L_2N + (L_2N - L_N) / 3``; for a piecewise-linear decoder, the finest
    chord length), certifies it against the extrapolated chord length, and
    takes the initial velocity, extrapolated from the two finest levels, scaled
    to that length.

    Parameters
    ----------
    embed : callable ``(m, d) -> (m, D)``, or a MetricDecoder
    point, base_point : Tensor, shape=[n, d]
    n_segments : int
        Segments of the coarsest polygon (>= 2: the initial direction is a
        three-node difference).
    n_refinements : int, optional
        Doublings for every pair (>= 1, for the error estimate). Default 2, or 3
        when not ``smooth``.
    max_refinements : int, optional
        Pairs whose error estimate is still above ``rtol`` after
        ``n_refinements`` are refined further, alone, up to this many doublings
        in all (smooth decoders only). Default ``n_refinements + 3`` (512
        segments from the default 16): a geodesic bending sharply around a
        sigma wall needs a much finer polygon than most.
    rtol : float, optional
        Convergence threshold on the estimated relative length error.
        Default ``1e-5`` (float64) or ``1e-4`` (float32); ``1e-3`` when not
        ``smooth``, where the discretization converges at first order only.
    max_iter : int
        Optimizer iterations per level.
    smooth : bool
        False for piecewise-linear (ReLU-like) decoders: L-BFGS, no
        extrapolation, the last change of the length as ``residual``, and no
        pair marked converged -- the nonsmooth energy has local minima that
        this estimate does not see.
    initial_curve : Tensor, shape=[n, N + 1, d], optional
        First guess of the coarsest polygon (then ``n_segments = N >= 2``; its end
        nodes are replaced by ``base_point`` and ``point``), e.g. a previous
        solution or another route to compare.
    global_start : bool
        Without ``initial_curve``, start each pair from a shortest path on a
        latent grid where that is shorter than the straight line
        (:func:`~pullback_manifold.graph_start.shortest_path_start`; latent
        dimension 2 or 3, smooth decoders), running the straight line too up
        to the second level and going on from the shorter. Newton finds the
        geodesic nearest its start, and from the straight line that is often
        not the shortest one. False: the straight line.
    derivative_dtype : torch.dtype, optional
        Dtype of the decoder derivatives in the Newton matrices, at every
        level (see :func:`discrete_geodesic`). Default: chosen once per call as
        there, at the first level's nodes (float32 for a float64 solve on a
        decoder made of ``nn.Module`` s with ``d <= 4``, where it passes
        :func:`newton_derivative_dtype`'s check).
    lengths_only : bool
        Only the lengths are needed (distances): refine until the length is
        certified, not until the chord extrapolation that the initial
        velocities follow is (see ``residual``). On 500 digits-VAE pairs this
        stopped at about 55% of the segments (22% fewer Newton decoder passes
        on 200 of them: the first levels cost the same), with lengths within
        ``rtol`` (median error ``2e-7``, ten times that of the default rule's
        lengths), and initial directions 5 times less accurate (median
        ``2e-3``, see docs/math.md). No effect for a MetricDecoder or a
        piecewise-linear decoder (no spline length).

    Returns
    -------
    result : LogResult
        ``residual`` is the estimated relative error of the length: for a
        smooth pull-back decoder, the larger of four times the distance of the
        spline length to the extrapolated chord length and a quarter of the
        change of the chord extrapolation between the two finest level pairs
        (``|L_2N - L_N| / (3 L_2N)`` with one refinement); with
        ``lengths_only``, a quarter of the larger of that distance and the
        change of the spline length from the previous level; for a
        MetricDecoder, the change of the chord extrapolation, in full; for a
        piecewise-linear decoder, the last change of the chord length.
        ``converged`` also requires the optimizer to have converged at every
        level; ``n_iterations`` counts levels.
    curve : Tensor, shape=[n, n_segments * 2**n_refinements + 1, d]
        The finest polygon (pairs refined fewer times: their polygon with
        midpoints inserted).
    length : Tensor, shape=[n]
        The spline length of the finest polygon (the extrapolated chord length
        for a MetricDecoder, the finest chord length for a piecewise-linear
        decoder); 0 for equal end points.
    """
    if n_refinements is None:
        n_refinements = 2 if smooth else 3
    if n_refinements < 1:
        raise ValueError(f"n_refinements must be >= 1 (the error estimate needs two levels), got {n_refinements}")
    if rtol is None:
        rtol = (1e-5 if point.dtype == torch.float64 else 1e-4) if smooth else 1e-3
    if max_refinements is None:
        max_refinements = n_refinements + 3 if smooth else n_refinements
    if max_refinements < n_refinements:
        raise ValueError(
            f"max_refinements ({max_refinements}) must be >= n_refinements ({n_refinements}): it counts all the "
            "doublings, those made for every pair included"
        )
    initial_curve, n_segments = _checked_start(point, base_point, n_segments, initial_curve, 2)
    cross_check = smooth and not isinstance(embed, MetricDecoder)
    n = len(point)
    if n == 0:
        empty = point.new_zeros(0)
        flags = torch.zeros(0, dtype=torch.bool, device=point.device)
        result = LogResult(
            point.clone(),
            flags,
            empty,
            torch.zeros(0, dtype=torch.long, device=point.device),
            tol=rtol,
            method="energy",
            from_energy=flags,
            energy_rtol=rtol,
            nonsmooth=flags,
        )
        return result, point.new_zeros(0, n_segments * 2**n_refinements + 1, point.shape[1]), empty
    runners_up = torch.zeros(0, dtype=torch.long, device=point.device)
    if initial_curve is None and global_start and smooth:
        from .graph_start import shortest_path_start  # it builds on this module's polygons

        initial_curve, from_graph = shortest_path_start(embed, point, base_point, n_segments)
        # Where the grid route won, the straight line runs too, as far as the second level.
        runners_up = from_graph.nonzero().squeeze(-1)
        initial_curve = torch.cat([initial_curve, _straight_curve(point, base_point, n_segments)[runners_up]])
    both = torch.cat([torch.arange(n, device=point.device), runners_up])
    if initial_curve is None:
        initial_curve = _first_guess(point, base_point, n_segments, smooth)
    if derivative_dtype is None and smooth:
        derivative_dtype = _derivative_dtype(embed, initial_curve, _default_xtol(point))
    options = dict(max_iter=max_iter, xtol=None, smooth=smooth, derivative_dtype=derivative_dtype)
    # ``decoded``: the decoded nodes of ``curve`` (None for L-BFGS), the next level's even nodes.
    curve, ok, decoded = _minimize(embed, initial_curve, **options)
    if len(both) > n:
        # A straight-line run that ended on the grid route's polygon would only repeat it (a third
        # of them on the digits VAE): it stops here.
        alternative = torch.arange(n, len(both), device=point.device)
        gap = (curve[alternative] - curve[runners_up]).abs().amax((1, 2))
        same = gap <= 1e-5 * (1 + curve[runners_up].abs().amax((1, 2)))
        keep = torch.cat([torch.arange(n, device=point.device), alternative[~same]])
        curve, ok, both, runners_up = curve[keep], ok[keep], both[keep], runners_up[~same]
        decoded = None if decoded is None else decoded[keep]
    # ``lengths_only`` reads the spline lengths of the last two levels: the first is made after
    # ``n_refinements`` (measured: the quadrature of the first level cost as much as choosing
    # between the runner-ups below). A log reads the finest one only, made after the loop.
    lengths = [_level_lengths(embed, curve, cross_check, decoded, spline=lengths_only and n_refinements <= 1)]
    oks, directions = [ok], [_initial_direction(curve)]
    for refinement in range(1, n_refinements + 1):
        guess = _refine_cubic(curve) if smooth else _refine(curve)
        curve, ok, decoded = _minimize(embed, guess, known=decoded, **options)
        spline = lengths_only and refinement >= n_refinements - 1
        lengths.append(_level_lengths(embed, curve, cross_check, decoded, spline=spline))
        oks.append(ok)
        directions.append(_initial_direction(curve))
        if len(both) > n:
            # Each pair goes on from the start whose second-level polygon is shorter (its own
            # length, an upper bound on its geodesic's; the chord length for a MetricDecoder).
            # Not the spline's: through the nodes of a coarse polygon that turns sharply it
            # overshoots, and picked the longer geodesic on 1 of 200 digits-VAE pairs.
            measure = lengths[-1][:, 0].clone()
            alternative = torch.arange(n, len(both), device=point.device)
            if cross_check:
                compared = torch.cat([runners_up, alternative])
                measure[compared] = _polygon_length(embed, curve[compared])
            pick = torch.arange(n, device=point.device)
            pick[runners_up] = torch.where(measure[alternative] < measure[runners_up], alternative, runners_up)
            lengths, oks, directions = ([level[pick] for level in window] for window in (lengths, oks, directions))
            curve, both = curve[pick], both[:n]
            decoded = None if decoded is None else decoded[pick]
    # The estimate is trusted when the optimizer converged at the levels it compares.
    lengths, oks, directions = lengths[-3:], oks[-3:], directions[-2:]
    ok = torch.stack(oks).all(0)
    # Equal end points: length 0 (the spline through equal nodes has a rounding-level length,
    # which no certificate would pass), nothing to refine.
    same = (point == base_point).all(-1)
    log_rule = cross_check and not lengths_only
    pending = None
    if log_rule:
        pending = _spline_where_needed(
            embed, lengths, curve, ok & ~same, rtol, smooth, final=max_refinements == n_refinements
        )
    length, error = _certify(lengths, smooth, lengths_only, pending)
    n_levels = torch.full((len(point),), n_refinements + 1, dtype=torch.long, device=point.device)
    decoded_rows = torch.arange(n, device=point.device)  # the pairs whose finest nodes ``decoded`` holds
    length = torch.where(same, torch.zeros_like(length), length)
    error = torch.where(same, torch.zeros_like(error), error)
    for extra in range(max_refinements - n_refinements):
        todo = (torch.isfinite(length) & ~same & ~(ok & (error <= rtol))).nonzero().squeeze(-1)
        if len(todo) == 0:
            break
        guess = _refine_cubic(curve[todo]) if smooth else _refine(curve[todo])
        # Pairs refined now were refined last time too (only those changed): their rows are
        # among ``decoded_rows``.
        known = None
        if decoded is not None:
            index = torch.searchsorted(decoded_rows, todo).clamp_max(len(decoded_rows) - 1)
            if not torch.equal(decoded_rows[index], todo):
                raise RuntimeError("energy_log: a pair to refine has no decoded finest level (internal error)")
            known = decoded[index]
        finer, ok_finer, decoded = _minimize(embed, guess, known=known, **options)
        decoded_rows = todo
        lengths = _advance(lengths, todo, _level_lengths(embed, finer, cross_check, decoded, spline=not log_rule), 3)
        oks = _advance(oks, todo, ok_finer, 3)
        directions = _advance(directions, todo, _initial_direction(finer), 2)
        ok[todo] = torch.stack([level[todo] for level in oks]).all(0)
        window = [level[todo] for level in lengths]
        if log_rule:
            final = extra == max_refinements - n_refinements - 1
            pending = _spline_where_needed(embed, window, finer, ok[todo], rtol, smooth, final)
        length[todo], error[todo] = _certify(window, smooth, lengths_only, pending)
        n_levels[todo] += 1
        curve = _refine(curve)
        curve[todo] = finer
    velocity = _initial_velocity(embed, base_point, directions, length)
    tiny = _tiny_chords(point, base_point) & ~same
    if tiny.any():
        rows = tiny.nonzero().squeeze(-1)
        velocity[rows], length[rows], error[rows] = _taylor_log(embed, point[rows], base_point[rows])
        ok[rows] = True  # not the polygons' answer: their optimizer's state says nothing here
    tangent_vec = torch.where(same[:, None], torch.zeros_like(point), velocity)
    # Where G is singular at the base point along the geodesic's direction (f(z) = z^3 at 0),
    # no tangent vector there has the length as its norm: scaled_to_length left the velocity
    # 0, and `dist`, its norm, 0 while the length was certified.
    represented = same | (length == 0) | (tangent_vec != 0).any(-1)
    converged = ok & represented & torch.isfinite(error) & (error <= rtol) & torch.isfinite(tangent_vec).all(-1)
    if not smooth:
        # Piecewise-smooth energy: the optimizer can stop in a local minimum that the
        # refinement estimate does not see (measured: 1% off on a one-crease fold).
        converged = torch.zeros_like(converged)
    result = LogResult(
        tangent_vec,
        converged,
        error,
        n_levels,
        tol=rtol,
        method="energy",
        from_energy=torch.ones_like(converged),
        energy_rtol=rtol,
        nonsmooth=torch.full_like(converged, not smooth),
    )
    return result, curve, length


def arc_length_times(embed: Embedding, curve: Tensor) -> Tensor:
    """Times of the nodes of polygons parametrized by (decoded) arc length.

    The optimizer leaves the nodes of a discrete geodesic only approximately at
    constant speed (the energy is flat along reparametrizations to second
    order); interpolating at these times gives a constant-speed path.

    Parameters
    ----------
    embed : callable ``(m, d) -> (m, D)``, or a MetricDecoder
    curve : Tensor, shape=[n, N + 1, d]

    Returns
    -------
    times : Tensor, shape=[n, N + 1]
        From 0 to 1, non-decreasing.
    """
    speeds = _squared_speeds(embed, curve).clamp_min(0).sqrt()
    cumulative = torch.cat([torch.zeros_like(speeds[:, :1]), speeds.cumsum(-1)], dim=-1)
    total = cumulative[:, -1:]
    uniform = torch.linspace(0, 1, curve.shape[1], dtype=curve.dtype, device=curve.device).expand_as(cumulative)
    return torch.where(total > 0, cumulative / total.clamp_min(torch.finfo(curve.dtype).tiny), uniform)


def interpolate_curve(curve: Tensor, times: Tensor, node_times: Tensor | None = None, cubic: bool | Tensor = False) -> Tensor:
    """Evaluate polygons at ``times``, linearly or by cubic Hermite pieces between nodes.

    Parameters
    ----------
    curve : Tensor, shape=[n, N + 1, d]
    times : Tensor, shape=[n_t]
        In ``[0, 1]``.
    node_times : Tensor, shape=[n, N + 1], optional
        Non-decreasing times of the nodes, from 0 to 1; uniform if None.
    cubic : bool or Tensor, shape=[n], bool
        Curves (all, or those marked) read as the :math:`C^1` cubic Hermite curve through
        their nodes, with node velocities from three-point differences in ``node_times``
        (one-sided at the ends): :math:`O(h^3)` between the nodes of a smooth curve, where
        straight pieces are :math:`O(h^2)` off. Leave False for a curve with kinks (a
        nonsmooth decoder's geodesic), where a cubic can overshoot.

    Returns
    -------
    points : Tensor, shape=[n, n_t, d]
    """
    if torch.any((times < 0) | (times > 1)):
        raise ValueError("a discrete geodesic is defined for times in [0, 1] only")
    n, k, d = curve.shape
    if node_times is None:
        node_times = torch.linspace(0, 1, k, dtype=curve.dtype, device=curve.device).expand(n, k)
    t = times.to(curve.dtype).expand(n, -1).contiguous()
    right = torch.searchsorted(node_times.contiguous(), t, right=True).clamp(1, k - 1)
    left = right - 1
    t_left, t_right = node_times.gather(1, left), node_times.gather(1, right)
    width = t_right - t_left
    frac = torch.where(width > 0, (t - t_left) / width.clamp_min(torch.finfo(curve.dtype).tiny), torch.zeros_like(t))
    frac = frac.clamp(0, 1)[..., None]
    c_left = curve.gather(1, left[..., None].expand(-1, -1, d))
    c_right = curve.gather(1, right[..., None].expand(-1, -1, d))
    linear = c_left + frac * (c_right - c_left)
    cubic = torch.as_tensor(cubic, device=curve.device).expand(n)
    if k < 3 or not cubic.any():
        return linear
    slopes, valid = _node_slopes(curve, node_times)
    m_left = slopes.gather(1, left[..., None].expand(-1, -1, d)) * width[..., None]
    m_right = slopes.gather(1, right[..., None].expand(-1, -1, d)) * width[..., None]
    # Hermite form: the chord plus a correction that vanishes at both nodes.
    s = frac
    hermite = linear + s * (1 - s) * ((1 - s) * (m_left - (c_right - c_left)) - s * (m_right - (c_right - c_left)))
    use = (cubic & valid)[:, None, None] & torch.isfinite(hermite).all(-1, keepdim=True)
    return torch.where(use, hermite, linear)


def _node_slopes(curve: Tensor, node_times: Tensor) -> tuple[Tensor, Tensor]:
    """``dz/dt`` at the nodes ``(n, N + 1, d)``: the derivative of the parabola through each
    node and its neighbours, and at the ends of the cubic through the first or last four
    nodes (one order more: a one-sided parabola made the ends the worst places); and which
    curves ``(n,)`` have them (not those with two nodes at one time: equal end points)."""
    tiny = torch.finfo(curve.dtype).tiny
    h = (node_times[:, 1:] - node_times[:, :-1])[..., None]  # (n, N, 1)
    dz = (curve[:, 1:] - curve[:, :-1]) / h.clamp_min(tiny)  # chord slopes
    h1, h2, s1, s2 = h[:, :-1], h[:, 1:], dz[:, :-1], dz[:, 1:]
    interior = (h2 * s1 + h1 * s2) / (h1 + h2).clamp_min(tiny)
    first = _end_slope(curve[:, :4], node_times[:, :4])
    last = _end_slope(curve[:, -4:].flip(1), node_times[:, -4:].flip(1))
    return torch.cat([first, interior, last], dim=1), (h > 0).all(1).squeeze(-1)


def _end_slope(nodes: Tensor, times: Tensor) -> Tensor:
    """``dz/dt`` at the first of 2 to 4 nodes ``(n, k, d)`` at times ``(n, k)``: the
    derivative there of the polynomial through them (Lagrange weights)."""
    k = nodes.shape[1]
    diff = times[:, 0:1] - times  # t_0 - t_j
    weights = []
    for j in range(k):
        if j == 0:
            w = sum(1 / diff[:, m] for m in range(1, k))
        else:
            w = 1 / (times[:, j] - times[:, 0])
            for m in range(1, k):
                if m != j:
                    w = w * diff[:, m] / (times[:, j] - times[:, m])
        weights.append(w)
    return (torch.stack(weights, 1)[..., None] * nodes).sum(1, keepdim=True)
