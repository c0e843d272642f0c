r"""Geodesics: ``exp`` by ODE integration, ``log`` by shooting.

* :func:`exp` / :func:`geodesic_ivp` integrate the first-order system
  ``(z, v)' = (v, a(z, v))`` with :func:`torchdiffeq.odeint` (adaptive dopri5 by
  default), all pairs in one solve. The step size is controlled by the worst
  pair (a per-pair RMS error, maximized over pairs), so batching never trades
  one pair's accuracy for another's.
* :func:`shooting_log` solves ``exp_{z0}(v) = z1`` by damped Newton on the
  end-point residual. The Jacobian ``dz(1)/dv`` comes from the variational
  (Jacobi) equations integrated alongside the geodesic, by a JVP of the
  geodesic acceleration. Only pairs still iterating are integrated.

A solve that fails (step-size underflow, the step cap, non-finite values) is
isolated by bisecting the batch, so one bad pair is flagged without taking its
batch-mates down, and the work stays bounded.

The solvers run under ``torch.no_grad()``: forward-mode derivatives are all they
need, and a decoder closing over trainable parameters must not record an
autograd graph across hundreds of ODE steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torchdiffeq import odeint

from .errors import is_positive_float, is_positive_int
from .geometry import Embedding, geodesic_acceleration

__all__ = ["ODEOptions", "LogResult", "exp", "geodesic_flow", "geodesic_ivp", "shooting_log"]

_ADAPTIVE = {"dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"}
# torchdiffeq's fixed-grid methods: without a step size they take one step over the whole interval.
_FIXED_STEP = {"euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams"}


@dataclass(frozen=True)
class ODEOptions:
    """Options of the geodesic ODE solves.

    Parameters
    ----------
    method : str
        A :func:`torchdiffeq.odeint` method. Default ``"dopri5"``.
    rtol, atol : float, optional
        Error tolerances. ``None`` picks them from the dtype: ``1e-7, 1e-9``
        for float64 and ``1e-5, 1e-6`` for float32.
    max_num_steps : int
        Cap on the adaptive steps of one solve; a pair needing more is
        flagged as failed instead of running unbounded.
    step_size : float, optional
        Step size of fixed-step methods (``"rk4"``, ``"euler"`` ...), required
        by them; adaptive methods choose their own.

    Raises
    ------
    ValueError
        For an unknown method, a tolerance that is not a positive finite float, a
        ``max_num_steps`` that is not a positive int, or a fixed-step method without
        a positive ``step_size`` (it would take a single step over the whole
        interval, silently inaccurate), or an adaptive one with one.
    """

    method: str = "dopri5"
    rtol: float | None = None
    atol: float | None = None
    max_num_steps: int = 500
    step_size: float | None = None

    def __post_init__(self):
        if self.method not in _ADAPTIVE | _FIXED_STEP:
            raise ValueError(
                f"ODEOptions.method must be a torchdiffeq method, adaptive ({', '.join(sorted(_ADAPTIVE))}) or "
                f"fixed-step with a step_size ({', '.join(sorted(_FIXED_STEP))}); got {self.method!r}"
            )
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not is_positive_float(value):
                raise ValueError(f"ODEOptions.{name} must be a positive finite float or None (dtype default), got {value!r}")
        if not is_positive_int(self.max_num_steps):
            raise ValueError(f"ODEOptions.max_num_steps must be a positive int, got {self.max_num_steps!r}")
        step = self.step_size
        if self.method in _FIXED_STEP and not is_positive_float(step):
            raise ValueError(
                f"ODEOptions(method={self.method!r}) needs a positive step_size, e.g. step_size=0.01 (got "
                f"{step!r}): a fixed-step method without one takes a single step over the whole interval"
            )
        if self.method in _ADAPTIVE and step is not None:
            raise ValueError(
                f"ODEOptions.step_size is for fixed-step methods; {self.method!r} chooses its own steps "
                "(set rtol and atol instead)"
            )

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        """``(rtol, atol)`` for ``dtype``."""
        rtol_default, atol_default = (1e-7, 1e-9) if dtype == torch.float64 else (1e-5, 1e-6)
        return (
            rtol_default if self.rtol is None else self.rtol,
            atol_default if self.atol is None else self.atol,
        )


def _default_log_tol(dtype: torch.dtype) -> float:
    # Above the ODE's own local error (default atol 1e-9 / 1e-6); its global error can be
    # larger on long geodesics, hence the check of converged end points (_CHECK_FACTOR).
    return 1e-8 if dtype == torch.float64 else 2e-5


def _per_pair_norm(n_pairs: int, n_controlled: int | None) -> Callable[[Tensor], Tensor]:
    def norm(x: Tensor) -> Tensor:
        return x.reshape(n_pairs, -1)[:, :n_controlled].pow(2).mean(-1).sqrt().max()

    return norm


class _DivergenceGuard:
    """Freeze the pairs whose solution diverges, so the batch's other pairs are still solved.

    A pair is given up (its derivative set to zero from then on, its result
    flagged) when its derivative is not finite (singular metric, decoder
    NaN) or its controlled state leaves a generous bound (a geodesic running
    off to infinity in finite time, as on an incomplete chart). Without it a
    single diverging pair drives the shared step size to underflow or the step
    cap, and the whole batch has to be re-solved by bisection.
    """

    def __init__(self, rhs, y0: Tensor, n_controlled: int):
        self.rhs = rhs
        self.n_controlled = n_controlled
        self.bound = _DIVERGENCE_FACTOR * (1 + y0[:, :n_controlled].abs().amax(-1))
        self.dead = torch.zeros(y0.shape[0], dtype=torch.bool, device=y0.device)

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        dy = self.rhs(t, y)
        bad = ~torch.isfinite(dy).all(-1) | (y[:, : self.n_controlled].abs().amax(-1) > self.bound)
        self.dead |= bad
        return torch.where(self.dead[:, None], torch.zeros_like(dy), dy)


# A latent state 10^4 times larger than where it started: the geodesic leaves every
# region a decoder is trained on (its metric degenerates there).
_DIVERGENCE_FACTOR = 1e4


def _odeint_flagged(
    rhs, y0: Tensor, t: Tensor, options: ODEOptions, n_controlled: int | None = None
) -> tuple[Tensor, Tensor]:
    """Integrate ``(n, k)`` states; return ``(ys (n_t, n, k), ok (n,))``.

    Only the first ``n_controlled`` state columns enter the error control
    (all if None). Pairs whose solution diverges are frozen and flagged
    (:class:`_DivergenceGuard`); if the solve still fails (step cap, step-size
    underflow), it is retried on each half of the batch, so failing pairs end
    as NaN with ``ok = False`` and the others are still solved.
    """
    n, k = y0.shape
    if n == 0:
        return y0.new_empty(len(t), 0, k), torch.zeros(0, dtype=torch.bool, device=y0.device)
    rtol, atol = options.tolerances(y0.dtype)
    if options.method in _ADAPTIVE:
        solver_options = {"norm": _per_pair_norm(n, n_controlled), "max_num_steps": options.max_num_steps}
    else:
        solver_options = {} if options.step_size is None else {"step_size": options.step_size}
    guard = _DivergenceGuard(rhs, y0, k if n_controlled is None else n_controlled)
    try:
        ys = odeint(guard, y0, t, rtol=rtol, atol=atol, method=options.method, options=solver_options)
    except AssertionError:  # torchdiffeq: dt underflow, max_num_steps, non-finite state
        if n == 1:
            return torch.full((len(t), 1, k), float("nan"), dtype=y0.dtype, device=y0.device), torch.zeros(
                1, dtype=torch.bool, device=y0.device
            )
        half = n // 2
        ys_a, ok_a = _odeint_flagged(rhs, y0[:half], t, options, n_controlled)
        ys_b, ok_b = _odeint_flagged(rhs, y0[half:], t, options, n_controlled)
        return torch.cat([ys_a, ys_b], dim=1), torch.cat([ok_a, ok_b])
    ok = torch.isfinite(ys).all(dim=0).all(dim=-1) & ~guard.dead
    ys = torch.where(ok[None, :, None], ys, torch.full_like(ys, float("nan")))
    return ys, ok


def _geodesic_rhs(embed: Embedding, d: int, regularization: float):
    def rhs(t: Tensor, y: Tensor) -> Tensor:
        z, v = y[:, :d], y[:, d:]
        return torch.cat([v, geodesic_acceleration(embed, z, v, regularization)], dim=-1)

    return rhs


def _times(t0: float, t1: float, like: Tensor) -> Tensor:
    return torch.tensor([t0, t1], dtype=like.dtype, device=like.device)


@torch.no_grad()
def exp(
    embed: Embedding,
    tangent_vec: Tensor,
    base_point: Tensor,
    options: ODEOptions = ODEOptions(),
    regularization: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Exponential map: end point at ``t = 1`` of the geodesic with initial velocity ``tangent_vec``.

    Parameters
    ----------
    embed : callable, ``(n, d) -> (n, D)``
    tangent_vec, base_point : Tensor, shape=[n, d]
    options : ODEOptions
    regularization : float

    Returns
    -------
    end_point : Tensor, shape=[n, d]
        NaN where the solve failed.
    ok : Tensor, shape=[n], bool
    """
    end_point, _, ok = geodesic_flow(embed, tangent_vec, base_point, options, regularization)
    return end_point, ok


@torch.no_grad()
def geodesic_flow(
    embed: Embedding,
    tangent_vec: Tensor,
    base_point: Tensor,
    options: ODEOptions = ODEOptions(),
    regularization: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Position and velocity at ``t = 1`` of the geodesic with initial velocity ``tangent_vec``.

    Parameters
    ----------
    embed : callable ``(n, d) -> (n, D)``, or a MetricDecoder
    tangent_vec, base_point : Tensor, shape=[n, d]
    options : ODEOptions
    regularization : float

    Returns
    -------
    end_point, end_velocity : Tensor, shape=[n, d]
        NaN where the solve failed.
    ok : Tensor, shape=[n], bool
    """
    d = base_point.shape[-1]
    y0 = torch.cat([base_point, tangent_vec], dim=-1)
    ys, ok = _odeint_flagged(_geodesic_rhs(embed, d, regularization), y0, _times(0.0, 1.0, y0), options)
    return ys[-1, :, :d], ys[-1, :, d:], ok


@torch.no_grad()
def geodesic_ivp(
    embed: Embedding,
    tangent_vec: Tensor,
    base_point: Tensor,
    times: Tensor,
    options: ODEOptions = ODEOptions(),
    regularization: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Points ``exp(t * tangent_vec)`` of the geodesic at the given times.

    Parameters
    ----------
    embed : callable, ``(n, d) -> (n, D)``
    tangent_vec, base_point : Tensor, shape=[n, d]
    times : Tensor, shape=[n_t]
        Any real times, in any order, repeats allowed.
    options : ODEOptions
    regularization : float

    Returns
    -------
    path : Tensor, shape=[n, n_t, d]
    ok : Tensor, shape=[n], bool
    """
    d = base_point.shape[-1]
    y0 = torch.cat([base_point, tangent_vec], dim=-1)
    times = times.to(dtype=y0.dtype, device=y0.device).reshape(-1)
    rhs = _geodesic_rhs(embed, d, regularization)
    out = torch.empty(y0.shape[0], times.shape[0], d, dtype=y0.dtype, device=y0.device)
    ok = torch.ones(y0.shape[0], dtype=torch.bool, device=y0.device)
    zero = torch.zeros(1, dtype=times.dtype, device=times.device)
    # exp(t v) = exp(|t| sign(t) v): negative times are a forward solve with -v.
    for sign in (1.0, -1.0):
        mask = times * sign > 0
        if not mask.any():
            continue
        grid, inverse = torch.unique(times[mask] * sign, sorted=True, return_inverse=True)
        y0_signed = torch.cat([y0[:, :d], sign * y0[:, d:]], dim=-1)
        ys, ok_part = _odeint_flagged(rhs, y0_signed, torch.cat([zero, grid]), options)
        out[:, mask] = ys[1:, :, :d][inverse].transpose(0, 1)
        ok &= ok_part
    out[:, times == 0] = base_point[:, None, :]
    return out, ok


def _variational_rhs(embed: Embedding, d: int, regularization: float):
    """Geodesic plus Jacobi equations for ``Phi = dz/dv0``, ``Psi = dv/dv0``.

    The Jacobi equation needs the derivative of the acceleration along each
    column ``(Phi_j, Psi_j)``. It is taken by a forward difference inside the
    right-hand side, all ``d`` columns stacked into one batched acceleration
    call: ``d + 1`` accelerations instead of a third-order nested JVP, several
    times cheaper, and accurate to ``~sqrt(eps)`` -- the Jacobian only steers
    Newton, whose fixed point (the residual) is computed exactly.
    """
    sqrt_eps = {torch.float64: 1.5e-8, torch.float32: 3.5e-4}

    def rhs(t: Tensor, y: Tensor) -> Tensor:
        n = y.shape[0]
        z, v = y[:, :d], y[:, d : 2 * d]
        phi = y[:, 2 * d : 2 * d + d * d].reshape(n, d, d)
        psi = y[:, 2 * d + d * d :].reshape(n, d, d)
        directions = torch.cat([phi, psi], dim=1).permute(2, 0, 1)  # (d, n, 2d): column j of [Phi; Psi]
        base = torch.cat([z, v], dim=-1)
        scale = sqrt_eps.get(y.dtype, 3.5e-4) * (1 + base.norm(dim=-1)) / directions.norm(dim=-1).clamp_min(1e-30)
        perturbed = (base + scale[..., None] * directions).reshape(d * n, 2 * d)
        states = torch.cat([base, perturbed], dim=0)
        acc = geodesic_acceleration(embed, states[:, :d], states[:, d:], regularization)
        a = acc[:n]
        da = (acc[n:].reshape(d, n, d) - a) / scale[..., None]  # (d, n, d): column j of dPsi/dt
        return torch.cat([v, a, psi.reshape(n, -1), da.permute(1, 2, 0).reshape(n, -1)], dim=-1)

    return rhs


def _shoot(embed, base_point, tangent_vec, options, regularization):
    """End points, their Jacobians ``dz(1)/dv`` and success flags."""
    n, d = base_point.shape
    eye = torch.eye(d, dtype=base_point.dtype, device=base_point.device).reshape(1, d * d).expand(n, d * d)
    y0 = torch.cat([base_point, tangent_vec, torch.zeros_like(eye), eye], dim=-1)
    # The Jacobian only steers Newton: error control on the geodesic itself is enough.
    ys, ok = _odeint_flagged(_variational_rhs(embed, d, regularization), y0, _times(0.0, 1.0, y0), options, 2 * d)
    y1 = ys[-1]
    return y1[:, :d], y1[:, 2 * d : 2 * d + d * d].reshape(n, d, d), ok


@dataclass
class LogResult:
    """Solution of a batch of logarithm problems, with a convergence report per pair.

    Attributes
    ----------
    tangent_vec : Tensor, shape=[..., d]
        Initial velocity at the base point of the geodesic reaching the point at ``t = 1``.
        For ``from_energy`` pairs, that of the discrete geodesic: its norm is the
        certified length, its direction carries the discretization error (on the
        digits VAE, ``3.6e-4`` relative in median, up to ``3e-2``; docs/math.md), and
        ``exp`` of it is not promised to return the point.
    converged : Tensor, shape=[...], bool
        ``residual <= tol * (1 + max|point|)`` by the accurate check (see ``residual``), and every solve succeeded.
    residual : Tensor, shape=[...]
        Latent end-point error ``||exp(tangent_vec) - point||`` of the geodesic
        (of a converged shooting pair, measured by a dopri5 solve at rtol
        ``0.1 min(rtol, tol)``: ``metric.exp`` at the ODE options themselves
        carries their own integration error, which can be larger);
        NaN where a solve failed.
    n_iterations : Tensor, shape=[...], int
        Newton iterations used for each pair.
    tol : float
        Convergence threshold on ``residual``, relative to ``1 + max|point|``
        (shooting pairs).
    method : str
        The method asked for: ``"shooting"``, ``"energy"`` or ``"auto"``.
    from_energy : Tensor, shape=[...], bool
        Pairs answered by the discrete-geodesic (energy) method. Their
        ``residual`` is the estimated relative error of the geodesic length,
        judged against ``energy_rtol``, not an end-point error.
    energy_rtol : float, optional
        Threshold on the energy method's relative length error.
    nonsmooth : Tensor, shape=[...], bool
        Pairs along which the decoder is not smooth: piecewise linear (a ReLU
        network: its geodesic ODE is degenerate), or a decoder with activations
        whose derivative jumps (:func:`~pullback_manifold.logarithm.kinked_activations`:
        its metric jumps where a unit switches, which the geodesic ODE does not
        see). They are answered by the energy method (under ``"shooting"``, shot; in
        latent dimension 1 by every method exactly, as a quadrature),
        and never marked converged: the energy of a nonsmooth problem can stop in
        a local minimum, and its error estimate assumes a smooth curve (the answer
        is a good approximation, typically within 1%, not certified).
    """

    tangent_vec: Tensor
    converged: Tensor
    residual: Tensor
    n_iterations: Tensor
    tol: float
    method: str = "shooting"
    from_energy: Tensor | None = None
    energy_rtol: float | None = None
    nonsmooth: Tensor | None = None

    def __post_init__(self):
        if self.from_energy is None:
            self.from_energy = torch.zeros_like(self.converged)
        if self.nonsmooth is None:
            self.nonsmooth = torch.zeros_like(self.converged)

    @property
    def all_converged(self) -> bool:
        """True when every pair converged."""
        return bool(self.converged.all())

    @property
    def n_failed(self) -> int:
        """Number of pairs that did not converge."""
        return int((~self.converged).sum())

    def summary(self) -> str:
        """One line: how many pairs converged, and for each kind of answer its criterion and
        its worst residual (shooting: the end-point error; the energy method: the estimated
        relative length error)."""
        n = self.converged.numel()

        def worst(rows: Tensor) -> str:
            values = self.residual[rows]
            failed = int(torch.isnan(values).sum())
            finite = values[torch.isfinite(values)]
            text = f"{float(finite.max()):.2e}" if finite.numel() else "none finite"
            return text + (f", {failed} failed solve{'s' * (failed > 1)} (NaN)" if failed else "")

        kinds = []
        n_shot = n - int(self.from_energy.sum())
        if n_shot:
            kinds.append(
                f"{n_shot} answered by shooting (end-point residual <= {self.tol:.1e} (1 + max|point|): "
                f"max {worst(~self.from_energy)})"
            )
        if n - n_shot:
            rtol = "energy_rtol" if self.energy_rtol is None else f"{self.energy_rtol:.1e}"
            verb = "by" if kinds else "answered by"
            kinds.append(
                f"{n - n_shot} {verb} the energy method (estimated relative length error <= {rtol}: "
                f"max {worst(self.from_energy)})"
            )
        # Under "shooting" such pairs are shot too (never converged): a clause of its own.
        n_nonsmooth = int(self.nonsmooth.sum())
        if n_nonsmooth:
            kinds.append(f"{n_nonsmooth} along a nonsmooth decoder (approximate)")
        iterations = int(self.n_iterations.max()) if n else 0
        head = f"{self.method}: {n - self.n_failed}/{n} pairs converged"
        return "; ".join([head, *([", ".join(kinds)] if kinds else []), f"max iterations {iterations}"])

    def __getitem__(self, index) -> LogResult:
        """The pairs ``index`` selects along the batch axes (a slice, mask or index tensor)."""
        return replace(
            self,
            tangent_vec=self.tangent_vec[index],
            converged=self.converged[index],
            residual=self.residual[index],
            n_iterations=self.n_iterations[index],
            from_energy=self.from_energy[index],
            nonsmooth=self.nonsmooth[index],
        )

    def reshape(self, batch_shape: tuple[int, ...]) -> LogResult:
        """The same result with batch shape ``batch_shape``."""
        return replace(
            self,
            tangent_vec=self.tangent_vec.reshape(*batch_shape, self.tangent_vec.shape[-1]),
            converged=self.converged.reshape(batch_shape),
            residual=self.residual.reshape(batch_shape),
            n_iterations=self.n_iterations.reshape(batch_shape),
            from_energy=self.from_energy.reshape(batch_shape),
            nonsmooth=self.nonsmooth.reshape(batch_shape),
        )


# Step halvings of shooting's line search before the damping grows.
DEFAULT_HALVINGS = 4


def shooting_log(
    embed: Embedding,
    point: Tensor,
    base_point: Tensor,
    initial_tangent_vec: Tensor | None = None,
    options: ODEOptions = ODEOptions(),
    regularization: float = 0.0,
    tol: float | None = None,
    max_iter: int = 50,
    max_halvings: int | Tensor = DEFAULT_HALVINGS,
    reuse_jacobian: bool = False,
) -> LogResult:
    """Logarithm map by damped Newton shooting from one first guess, batched.

    Parameters
    ----------
    embed : callable ``(n, d) -> (n, D)``, or a MetricDecoder
    point, base_point : Tensor, shape=[n, d]
    initial_tangent_vec : Tensor, shape=[n, d], optional
        First guess (a warm start); the straight line ``point - base_point`` if None.
    options : ODEOptions
    regularization : float
    tol : float, optional
        Convergence threshold on the latent end-point error, scaled by
        ``1 + max|point|``. Default ``1e-8`` (float64) or ``2e-5`` (float32),
        above the ODE's own error at the default tolerances.
    max_iter : int
        Newton iterations per pair.
    max_halvings : int or Tensor, shape=[n]
        Backtracking steps of the line search before the damping grows, for
        every pair or per pair.
    reuse_jacobian : bool
        Shoot trial velocities without the variational equations (a third of
        the cost at ``d = 2``) and keep the Jacobian after a step that cut the
        residual tenfold (a chord step follows; a failed step gets a new
        Jacobian first). Pays from a first guess inside Newton's quadratic
        range, such as a discrete geodesic's velocity (``method="auto"``
        polishes so: the whole ``log`` 13% faster on a tanh MLP decoder); from farther
        away it costs more solves than it saves (2.3 times the time, measured
        on the same decoder from 8-segment discrete geodesics).

    Returns
    -------
    result : LogResult
        ``residual`` of a converged pair is its end-point error measured by a
        dopri5 solve (dopri8 if asked for) at rtol ``0.1 min(rtol, tol)`` (1e-9
        at the defaults; atol in proportion), not by the solves Newton steered
        with.
    """
    return _newton_shooting(
        embed, point, base_point, initial_tangent_vec, options, regularization, tol, max_iter, max_halvings,
        reuse_jacobian,
    )


_STALL_WINDOW = 8
# Newton measures its residual with the ODE solves it steers with, whose own global error
# (rtol 1e-7 by default) grows along a long or strongly bending geodesic past the
# tolerance: on a reviewer's tanh MLPs, 7 of 24 converged pairs missed their point by
# more than 1e-8 (1 + max|point|), one by 1.3e-6 where Newton's residual was 3e-13. So a
# converged pair's end point is measured again by a more accurate solve, and where that
# misses, corrected by chord steps (the Jacobian Newton ended with: the corrections are of
# the size of the integration error). Its rtol is the smaller of a tenth of the log
# tolerance (the check must resolve it, whatever rtol steered Newton) and a tenth of the
# options' rtol (it must be tighter than they are): 1e-9 at the defaults, 100 times
# tighter. Measured on those pairs at the defaults: every converged pair then within its
# tolerance of the point by a solve at rtol 1e-11, for 25-56% more time under "shooting",
# 17-140% under "auto" (whose polish is short); 1000 times tighter cost a third more again.
_CHECK_FACTOR = 0.1
_CHECK_STEPS = 2


def _check_options(options: ODEOptions, dtype: torch.dtype, tol: float) -> ODEOptions | None:
    """The options of the check of converged end points: dopri5 (or dopri8 where it was
    asked for) at rtol ``_CHECK_FACTOR * min(rtol, tol)`` and atol in proportion (the
    dtype's default tolerances for a fixed-step method); None where the dtype cannot
    resolve them."""
    rtol, atol = options.tolerances(dtype)
    # Not below what the dtype resolves (float32: about 8 times tighter only).
    factor = max(_CHECK_FACTOR * min(rtol, tol) / rtol, 10 * torch.finfo(dtype).eps / rtol)
    if factor >= 0.5:
        return None
    # A low-order method's solve 100 times tighter still errs by more than the tolerance
    # (a reviewer's bosh3 pairs: up to 46 times; fehlberg2, 12), and a fixed-step one has no
    # tolerance to tighten: the check is fifth-order whatever steered Newton.
    method = "dopri8" if options.method == "dopri8" else "dopri5"
    # Tighter tolerances take more steps (about factor^(-1/5) for dopri5).
    steps = options.max_num_steps * math.ceil(2 * factor ** -0.2)
    return replace(options, method=method, rtol=rtol * factor, atol=atol * factor, max_num_steps=steps, step_size=None)


@torch.no_grad()
def _newton_shooting(
    embed, point, base_point, initial_tangent_vec, options, regularization, tol, max_iter, max_halvings, reuse_jacobian
) -> LogResult:
    """Damped Newton / Levenberg-Marquardt shooting from one first guess (see :func:`shooting_log`)."""
    n, d = base_point.shape
    tol = _default_log_tol(base_point.dtype) if tol is None else tol
    if n == 0:
        none = torch.zeros(0, dtype=torch.bool, device=base_point.device)
        iterations = torch.zeros(0, dtype=torch.long, device=base_point.device)
        return LogResult(base_point.clone(), none, base_point.new_zeros(0), iterations, tol=tol)
    rtol_final, atol_final = options.tolerances(base_point.dtype)
    scale = 1 + point.abs().amax(-1)
    pair_tol = tol * scale
    # Inexact Newton: while some pair is far from its solution (relative residual > 3e-2)
    # a looser ODE solve steers as well as a tight one. Residuals are only ever compared
    # with residuals computed at the same accuracy.
    loose_rtol = max(rtol_final, 1e-5)
    loose = replace(options, rtol=loose_rtol, atol=atol_final * loose_rtol / rtol_final)

    def level_for(relative_residual: float) -> ODEOptions:
        return loose if relative_residual > 3e-2 else options

    v = (point - base_point).clone() if initial_tangent_vec is None else initial_tangent_vec.clone()
    level = options if initial_tangent_vec is not None else level_for(float(((point - base_point).abs().amax(-1) / scale).max()))
    end, jac, ok = _shoot(embed, base_point, v, level, regularization)
    measured_at = torch.full((n,), level.rtol if level.rtol is not None else rtol_final, dtype=v.dtype, device=v.device)
    residual_vec = end - point
    residual = torch.linalg.vector_norm(residual_vec, dim=-1).masked_fill(~ok, float("nan"))
    n_iter = torch.zeros(n, dtype=torch.long, device=v.device)
    failed = ~ok

    def measure(rows: Tensor, opts: ODEOptions) -> None:
        """(Re)compute residual and Jacobian of ``rows`` at the accuracy of ``opts``."""
        end_new, jac_new, ok_new = _shoot(embed, base_point[rows], v[rows], opts, regularization)
        residual_vec[rows] = end_new - point[rows]
        norms = torch.linalg.vector_norm(residual_vec[rows], dim=-1)
        residual[rows] = torch.where(ok_new, norms, torch.full_like(norms, float("nan")))
        jac[rows] = jac_new
        fresh[rows] = True
        measured_at[rows] = opts.tolerances(v.dtype)[0]
        failed[rows[~ok_new]] = True

    # reuse_jacobian: trial velocities are shot without the variational equations; the
    # Jacobian is recomputed at an accepted velocity only where Newton contracted slowly.
    # Where it contracted fast, the old one steers the next step (a chord step), and a
    # pair whose step fails with an old Jacobian gets a new one first.
    fresh = torch.ones(n, dtype=torch.bool, device=v.device)  # jac is dz(1)/dv at v

    def refresh(rows: Tensor, opts: ODEOptions) -> None:
        # A variational solve that fails where the plain one succeeded gives the pair up
        # (without reuse its trial would have been halved instead): rare, and auto keeps
        # the discrete answer then.
        _, jac_new, ok_new = _shoot(embed, base_point[rows], v[rows], opts, regularization)
        jac[rows] = jac_new
        fresh[rows] = True
        failed[rows[~ok_new]] = True

    # Per pair: one batch serves pairs with different line searches (auto's polish).
    halvings = torch.as_tensor(max_halvings, device=v.device).expand(n)
    most_halvings = int(halvings.max())
    # Levenberg-Marquardt damping per pair: 0 is Newton; it grows when a line search
    # fails (the step turns towards steepest descent of |r|^2) and shrinks on success.
    damping = torch.zeros(n, dtype=v.dtype, device=v.device)
    eye = torch.eye(d, dtype=v.dtype, device=v.device)
    final_only = level is options
    # Stagnation: a pair whose residual has not halved in the last _STALL_WINDOW
    # iterations has no geodesic to find (or none this first guess reaches): give it up
    # rather than spend the iteration cap on trial geodesics that run off the chart.
    history: list[Tensor] = []
    for _ in range(max_iter):
        if len(history) >= _STALL_WINDOW:
            before = history[-_STALL_WINDOW]
            failed |= ~failed & (n_iter >= _STALL_WINDOW) & ~(residual <= 0.5 * before) & ~(residual <= pair_tol)
        history.append(residual.clone())
        active = ~failed & ~((residual <= pair_tol) & (measured_at == rtol_final))
        if not active.any():
            break
        # Once at full accuracy, stay there: switching back and forth only re-measures.
        opts = options if final_only else level_for(float((residual[active] / scale[active]).max()))
        final_only = opts is options
        rtol_now = opts.tolerances(v.dtype)[0]
        stale = active & (measured_at != rtol_now)
        if stale.any():
            measure(stale.nonzero().squeeze(-1), opts)
            continue
        idx = active.nonzero().squeeze(-1)
        n_iter[idx] += 1
        # Residuals of a loose solve carry its error: accept any step that ends below it.
        floor = torch.maximum(pair_tol[idx], 100 * rtol_now * scale[idx]) if opts is loose else pair_tol[idx]
        J, r = jac[idx], residual_vec[idx]
        JtJ = J.transpose(-1, -2) @ J
        trace = JtJ.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(J.dtype).tiny) / d
        # a tiny Tikhonov floor keeps a singular dz/dv (a conjugate point) finite
        lam = (damping[idx] + 1e-12) * trace
        step = -torch.linalg.solve(JtJ + lam[:, None, None] * eye, (J.transpose(-1, -2) @ r.unsqueeze(-1))).squeeze(-1)
        # Trust region: a step longer than the current velocity plus the chord is not
        # trusted (it sends trial geodesics far out, where solves are long and useless).
        radius = torch.linalg.vector_norm(v[idx], dim=-1) + torch.linalg.vector_norm(point[idx] - base_point[idx], dim=-1)
        step_norm = torch.linalg.vector_norm(step, dim=-1).clamp_min(torch.finfo(step.dtype).tiny)
        step = step * (radius / step_norm).clamp(max=1.0)[:, None]
        alpha = torch.ones(len(idx), dtype=v.dtype, device=v.device)
        pending = torch.ones(len(idx), dtype=torch.bool, device=v.device)
        before_step = residual[idx].clone() if reuse_jacobian else None
        for halving in range(most_halvings + 1):
            # A pair past its own number of halvings stays pending: its line search failed.
            sub = (pending & (halvings[idx] >= halving)).nonzero().squeeze(-1)
            if len(sub) == 0:
                break
            rows = idx[sub]
            v_try = v[rows] + alpha[sub, None] * step[sub]
            if reuse_jacobian:
                end_try, ok_try = exp(embed, v_try, base_point[rows], opts, regularization)
            else:
                end_try, jac_try, ok_try = _shoot(embed, base_point[rows], v_try, opts, regularization)
            r_try = end_try - point[rows]
            res_try = torch.linalg.vector_norm(r_try, dim=-1)
            accept = ok_try & ((res_try <= (1 - 1e-4 * alpha[sub]) * residual[rows]) | (res_try <= floor[sub]))
            acc_rows = rows[accept]
            v[acc_rows] = v_try[accept]
            residual_vec[acc_rows] = r_try[accept]
            residual[acc_rows] = res_try[accept]
            if reuse_jacobian:
                fresh[acc_rows] = False
            else:
                jac[acc_rows] = jac_try[accept]
            pending[sub[accept]] = False
            alpha[sub[~accept]] *= 0.5
        damping[idx[~pending]] *= 0.1
        stale = pending & ~fresh[idx]  # failed with an old Jacobian: retried with a new one, undamped
        if reuse_jacobian:
            slow = ~pending & ~(residual[idx] <= 0.1 * before_step) & ~(residual[idx] <= floor)
            if (slow | stale).any():
                refresh(idx[slow | stale], opts)
        stuck = idx[pending & ~stale]
        if len(stuck):
            if opts is loose:
                # The loose solve cannot resolve these pairs any further: go on at full accuracy.
                measure(stuck, options)
                final_only = True
            damping[stuck] = torch.where(damping[stuck] == 0, torch.full_like(damping[stuck], 1e-3), damping[stuck] * 100)
            # No decrease even along (nearly) steepest descent at full accuracy: stalled.
            failed[stuck[damping[stuck] > 1e5]] = True
    converged = ~torch.isnan(residual) & (residual <= pair_tol) & (measured_at == rtol_final)
    strict = _check_options(options, v.dtype, tol)
    rows = converged.nonzero().squeeze(-1)
    previous = None
    for check in range(_CHECK_STEPS + 1):
        if strict is None or len(rows) == 0:
            break
        end, ok = exp(embed, v[rows], base_point[rows], strict, regularization)
        miss_vec = end - point[rows]
        miss = torch.linalg.vector_norm(miss_vec, dim=-1).masked_fill(~ok, float("nan"))
        if previous is not None:  # the better of the velocities before and after the chord step
            worse = ~(miss <= residual[rows])
            v[rows[worse]] = previous[worse]
            miss = torch.where(worse, residual[rows], miss)
        residual[rows] = miss
        converged[rows] = miss <= pair_tol[rows]
        missing = ~converged[rows] & ~torch.isnan(miss)
        if check == _CHECK_STEPS or not missing.any():
            break
        rows, miss_vec = rows[missing], miss_vec[missing]
        previous = v[rows].clone()
        J = jac[rows]
        JtJ = J.transpose(-1, -2) @ J
        floor = 1e-12 * JtJ.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(J.dtype).tiny) / d
        step = torch.linalg.solve(JtJ + floor[:, None, None] * eye, J.transpose(-1, -2) @ miss_vec.unsqueeze(-1))
        v[rows] -= step.squeeze(-1)
        n_iter[rows] += 1
    return LogResult(tangent_vec=v, converged=converged, residual=residual, n_iterations=n_iter, tol=tol)
