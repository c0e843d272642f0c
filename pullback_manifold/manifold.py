"""The latent space as a geomstats manifold with the decoder's pull-back metric.

:class:`PullbackManifold` is an open subset of ``R^d`` (a geomstats
``VectorSpaceOpenSet``) equipped with :class:`DecoderPullbackMetric`, a geomstats
``RiemannianMetric``. ``exp`` and ``log`` are reached through geomstats' solver
slots (``metric.exp_solver``, ``metric.log_solver``), so every geomstats tool that
calls ``metric.exp``, ``metric.log``, ``metric.dist`` or ``metric.geodesic``
(``FrechetMean``, ``TangentPCA``, ``RiemannianKMeans``, ``KMedoids``, ...) works
on latent codes unchanged.

Shape conventions are geomstats': a point is ``(d,)``, a batch ``(n, d)``, and
batch shapes broadcast (one base point against many points). Results have the
dtype and device of the inputs.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ._backend import import_geomstats

gs = import_geomstats()

from geomstats.geometry.base import VectorSpaceOpenSet  # noqa: E402
from geomstats.geometry.euclidean import Euclidean  # noqa: E402
from geomstats.geometry.riemannian_metric import RiemannianMetric  # noqa: E402
from geomstats.numerics.geodesic import ExpSolver, LogSolver  # noqa: E402

from . import geometry  # noqa: E402
from .decoders import Decoder, MetricDecoder, as_decoder  # noqa: E402
from .errors import ConvergenceError, ConvergenceWarning, DecoderError, is_positive_float, is_positive_int  # noqa: E402
from .discrete import arc_length_times, end_velocity, energy_log, interpolate_curve, metric_norm  # noqa: E402
from .geodesics import LogResult, ODEOptions, exp, geodesic_flow, geodesic_ivp  # noqa: E402
from .logarithm import METHODS, _Curves, log_map, own_polygons, piecewise_linear_pairs  # noqa: E402
from .transport import parallel_transport, transport_along_polygon  # noqa: E402

__all__ = ["PullbackManifold", "DecoderPullbackMetric", "ODEExpSolver", "ShootingLogSolver"]

_ON_FAILURE = ("warn", "raise", "ignore")


class PullbackManifold(VectorSpaceOpenSet):
    """Latent space ``R^d`` of a decoder, with the decoder's pull-back metric.

    Parameters
    ----------
    decoder : callable, nn.Module or :class:`~pullback_manifold.Decoder`
        Maps latent points ``(n, d)`` to outputs ``(n, *out)``: an ``nn.Module``, a
        method of one (``vae.decode``: cast and run in eval mode like the module), or
        any callable. A plain callable
        or module is a deterministic decoder (metric ``J^T J``); wrap it in
        :class:`~pullback_manifold.GaussianDecoder` or
        :class:`~pullback_manifold.EnsembleDecoder` for the expected metric.
    dim : int
        Latent dimension ``d``.
    regularization : float
        Opt-in ``eps >= 0``: the metric becomes ``J^T J + eps I``. Use it for
        decoders whose Jacobian loses rank (dead units, ``d > rank``).
    ode_options : ODEOptions, optional
        Method, tolerances and step cap of the geodesic ODE solves.
    log_tol : float, optional
        Convergence threshold of ``log`` on the latent end-point error, relative
        to ``1 + max|point|`` (default ``1e-8`` for float64, ``2e-5`` for float32).
    max_iter : int
        Newton iterations of ``log`` per pair (shooting; ``"auto"`` polishes a
        discrete geodesic, or goes on from a warm start, with at most 4).
    log_method : {"auto", "shooting", "energy"}
        How ``log`` solves the boundary-value problem (see
        :mod:`pullback_manifold.logarithm`): ``"auto"`` (default) shoots from a
        discrete geodesic's initial velocity and falls back to the energy
        method; ``"energy"`` is the method for ReLU-like decoders, which
        ``"auto"`` detects.
    energy_rtol : float, optional
        Tolerance of the energy method on its estimated relative length error
        (default ``1e-5`` for float64, ``1e-4`` for float32).
    chunk_size : int, optional
        ``log`` solves at most this many pairs at once (bounded memory);
        default 256 (on the digits VAE, 1024 pairs by the energy method took
        117 ms per pair in chunks of 256, 126 in 512 and 137 in 1024: the
        finest polygons' Jacobians outgrow the caches).
    on_failure : {"warn", "raise", "ignore"}
        What ``exp``/``log`` do when a pair fails: warn with
        :class:`~pullback_manifold.ConvergenceWarning` (default), raise
        :class:`~pullback_manifold.ConvergenceError`, or stay silent. The
        per-pair report is always available from ``metric.solve_log``.
    equip : bool
        Equip the space with its metric (geomstats' convention).

    Examples
    --------
    >>> import torch
    >>> from pullback_manifold import PullbackManifold
    >>> A = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    >>> space = PullbackManifold(lambda z: z @ A.T, dim=2)
    >>> z0 = torch.zeros(2, dtype=torch.float64)
    >>> z1 = torch.ones(2, dtype=torch.float64)
    >>> float(space.metric.dist(z0, z1))  # ||A (z1 - z0)||
    3.0
    """

    def __init__(
        self,
        decoder: Callable[[Tensor], Tensor] | Decoder,
        dim: int,
        *,
        regularization: float = 0.0,
        ode_options: ODEOptions | None = None,
        log_tol: float | None = None,
        max_iter: int = 50,
        log_method: str = "auto",
        energy_rtol: float | None = None,
        chunk_size: int | None = 256,
        on_failure: str = "warn",
        equip: bool = True,
    ):
        if not is_positive_int(dim):
            raise ValueError(f"dim must be a positive int (the latent dimension), got {dim!r}")
        dim = int(dim)  # numpy integers too
        # Checked here, so that a wrong setting fails at construction, before any decoder call.
        if isinstance(regularization, bool) or not isinstance(regularization, numbers.Real):
            raise TypeError(
                f"regularization must be a float eps >= 0 (the metric becomes J^T J + eps I), "
                f"got {type(regularization).__name__}"
            )
        if not 0 <= regularization < float("inf"):  # also rejects NaN
            raise ValueError(
                f"regularization must be a finite float >= 0 (the metric becomes J^T J + eps I), got {regularization}"
            )
        if ode_options is not None and not isinstance(ode_options, ODEOptions):
            raise TypeError(
                f"ode_options must be an ODEOptions, e.g. ODEOptions(max_num_steps=2000), got {type(ode_options).__name__}"
            )
        if log_tol is not None and not is_positive_float(log_tol):
            raise ValueError(f"log_tol must be a positive float or None (dtype default), got {log_tol!r}")
        if not is_positive_int(max_iter):
            raise ValueError(f"max_iter must be a positive int (Newton iterations of log per pair), got {max_iter!r}")
        if on_failure not in _ON_FAILURE:
            raise ValueError(f"on_failure must be one of {_ON_FAILURE}, got {on_failure!r}")
        if log_method not in METHODS:
            raise ValueError(f"log_method must be one of {METHODS}, got {log_method!r}")
        if energy_rtol is not None and not (is_positive_float(energy_rtol) and energy_rtol < 1):
            raise ValueError(
                "energy_rtol must be a float in (0, 1), the energy method's tolerance on its estimated "
                f"relative length error, or None (1e-5 in float64, 1e-4 in float32), got {energy_rtol!r}"
            )
        _check_chunk_size(chunk_size)
        self.decoder = as_decoder(decoder)
        self._metric_kwargs = dict(
            regularization=float(regularization),
            ode_options=ode_options or ODEOptions(),
            log_tol=log_tol,
            max_iter=int(max_iter),
            log_method=log_method,
            energy_rtol=None if energy_rtol is None else float(energy_rtol),
            chunk_size=None if chunk_size is None else int(chunk_size),
            on_failure=on_failure,
        )
        super().__init__(dim=dim, embedding_space=Euclidean(dim, equip=False), equip=equip)

    def default_metric(self):
        """The pull-back metric, with this space's solver settings."""
        return DecoderPullbackMetric, dict(self._metric_kwargs)

    def belongs(self, point, atol=gs.atol):
        """Whether ``point`` is a finite latent point of dimension ``d``.

        Parameters
        ----------
        point : array-like, shape=[..., d]
        atol : float
            Unused (the space is open).

        Returns
        -------
        belongs : Tensor, shape=[...], bool
        """
        point = _as_tensor(point)
        if point.shape[-1:] != (self.dim,):
            return torch.zeros(point.shape[:-1], dtype=torch.bool, device=point.device)
        return torch.isfinite(point).all(-1)

    def projection(self, point):
        """Identity: every finite point of ``R^d`` is a latent point.

        Parameters
        ----------
        point : array-like, shape=[..., d]

        Returns
        -------
        point : Tensor, shape=[..., d]
        """
        return _as_tensor(point)


# Latent points' dtypes: half precision has no Cholesky or scipy kernels, and its rounding
# error is above every tolerance the solvers use.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and not is_positive_int(chunk_size):
        raise ValueError(f"chunk_size must be a positive int (pairs solved at once) or None (all), got {chunk_size!r}")


def _as_tensor(value) -> Tensor:
    """A tensor as it is, anything else as a tensor.

    Not ``torch.as_tensor`` on a tensor: under ``torch.set_default_device`` it
    moves the tensor to that device, and the solvers never move data.
    """
    return value if isinstance(value, Tensor) else torch.as_tensor(value)


def _nan_rows(x: Tensor, ok: Tensor) -> Tensor:
    return torch.where(ok.reshape(ok.shape + (1,) * (x.dim() - ok.dim())), x, torch.full_like(x, float("nan")))


class DecoderPullbackMetric(RiemannianMetric):
    """Pull-back metric ``G = J^T J`` of a decoder, as a geomstats ``RiemannianMetric``.

    Built by :class:`PullbackManifold`; the parameters are documented there.
    """

    def __init__(
        self,
        space: PullbackManifold,
        regularization: float = 0.0,
        ode_options: ODEOptions | None = None,
        log_tol: float | None = None,
        max_iter: int = 50,
        log_method: str = "auto",
        energy_rtol: float | None = None,
        chunk_size: int | None = 256,
        on_failure: str = "warn",
    ):
        super().__init__(space=space)
        if on_failure not in _ON_FAILURE:
            raise ValueError(f"on_failure must be one of {_ON_FAILURE}, got {on_failure!r}")
        if log_method not in METHODS:
            raise ValueError(f"log_method must be one of {METHODS}, got {log_method!r}")
        self.regularization = regularization
        self.ode_options = ode_options or ODEOptions()
        self.log_tol = log_tol
        self.max_iter = max_iter
        self.log_method = log_method
        self.energy_rtol = energy_rtol
        self.chunk_size = chunk_size
        self.on_failure = on_failure
        self.exp_solver = ODEExpSolver(self)
        self.log_solver = ShootingLogSolver(self)
        self._validated: set = set()

    # ------------------------------------------------------------------ inputs
    @property
    def _log_solver_replaced(self) -> bool:
        """Whether ``log_solver`` holds another solver than this metric's own: then distances
        are the norms of its logs, not the lengths of this library's discrete geodesics."""
        solver = self.log_solver
        return type(solver) is not ShootingLogSolver or solver.metric is not self

    @property
    def decoder(self) -> Decoder:
        """The decoder whose pull-back this metric is."""
        return self._space.decoder

    @property
    def dim(self) -> int:
        """Latent dimension ``d``."""
        return self._space.dim

    @property
    def _embed(self):
        """What the geometry functions differentiate: the decoder (callable as its embedding,
        with Taylor-mode derivatives; a :class:`MetricDecoder` gives its metric directly)."""
        return self.decoder

    def _prepare(self, _points: str, _detach: bool = False, **arrays) -> tuple[list[Tensor], tuple[int, ...]]:
        """Check and broadcast named inputs of shape ``(..., d)``; flatten them to ``(n, d)``.

        Raises a ``TypeError``/``ValueError`` naming the offending argument
        before any expensive work; the decoder is validated on the input named
        ``_points``. ``_detach`` cuts autograd history (for the iterative solvers).
        """
        tensors = {}
        for name, value in arrays.items():
            if not isinstance(value, Tensor):
                try:
                    value = _as_tensor(value)
                except (TypeError, ValueError, RuntimeError) as err:
                    raise TypeError(f"{name} must be a tensor of shape (..., {self.dim}), got {type(value).__name__}") from err
            if value.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"{name} has dtype {value.dtype}: expected float32 or float64 (the solvers' Cholesky "
                    f"factorizations and ODE tolerances need one of them); convert it with {name}.to(torch.float64)"
                )
            if value.dim() == 0 or value.shape[-1] != self.dim:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}: expected (..., {self.dim}), "
                    f"the latent dimension of this space being {self.dim}"
                )
            tensors[name] = value
        devices = {t.device for t in tensors.values()}
        if len(devices) > 1:
            listing = ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
            raise ValueError(f"inputs are on different devices ({listing}): move them to one device")
        # After the device check: finiteness reads the data, which a meta tensor does not have.
        for name, value in tensors.items():
            if value.device.type == "meta":
                raise ValueError(f"{name} is on the meta device, which holds no data: pass tensors on cpu or cuda")
            if not torch.isfinite(value).all():
                bad = (~torch.isfinite(value)).reshape(-1, self.dim).any(-1).nonzero()[0, 0].item()
                raise ValueError(
                    f"{name} contains NaN or Inf (first at flat index {bad} of its {tuple(value.shape[:-1])} "
                    "batch): pass finite latent points"
                )
        dtype = tensors[next(iter(tensors))].dtype
        for t in tensors.values():
            dtype = torch.promote_types(dtype, t.dtype)
        try:
            batch_shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors.values()))
        except RuntimeError:
            listing = ", ".join(f"{k} {tuple(t.shape)}" for k, t in tensors.items())
            raise ValueError(f"batch shapes do not broadcast: {listing}") from None
        # contiguous(): a broadcast row keeps a stride-0 view, on which torch.func's
        # forward-mode derivatives (plain-callable decoders) fail to write.
        flat = [
            (t.detach() if _detach else t).to(dtype).expand(*batch_shape, self.dim).reshape(-1, self.dim).contiguous()
            for t in tensors.values()
        ]
        self._validate_decoder(flat[list(tensors).index(_points)].detach())
        return flat, tuple(batch_shape)

    def _validate_decoder(self, z: Tensor) -> None:
        """Check the decoder once per dtype/device on real points: output shape, finiteness, derivative."""
        self.decoder.prepare(z.dtype, z.device)
        key = (z.dtype, z.device)
        if key in self._validated or z.shape[0] == 0:
            return
        probe = z[:2]
        trial = probe.clone()  # the caller's points stay intact if the decoder writes into its input
        try:
            out = self._embed(trial)
        except (DecoderError, TypeError):  # the library's own checks of the output (TypeError: its dtype)
            raise
        except Exception as err:  # noqa: BLE001 -- whatever the user's code raises, with this context
            raise DecoderError(
                f"the decoder failed on latent points of shape {tuple(probe.shape)}, dtype {z.dtype}, "
                f"device {z.device}: {type(err).__name__}: {err}. It must map a batch (n, {self.dim}) to "
                f"(n, ...), row by row: check that dim={self.dim} is the decoder's latent dimension, and pass "
                "points with the decoder's dtype and device, or an nn.Module or a method of one such as "
                "vae.decode (cast to the points' dtype and device automatically)."
            ) from err
        if not torch.equal(trial, probe):
            raise DecoderError(
                "the decoder modified its input in place (e.g. z.mul_(2), z += 1, or an in-place "
                "activation applied to z itself): the solvers pass it their own tensors. Compute on a "
                "copy (z = z * 2) instead"
            )
        if not torch.isfinite(out).all():
            raise DecoderError(
                f"the decoder returned NaN or Inf at latent points {probe.tolist()}: "
                "the pull-back metric needs finite outputs"
            )
        if out.dtype != z.dtype:
            raise DecoderError(
                f"the decoder returned dtype {out.dtype} for {z.dtype} points: make it follow the input's "
                "dtype (an nn.Module is cast automatically; for a plain callable, cast its weights)"
            )
        self._check_row_by_row(probe, out)
        if isinstance(self.decoder, MetricDecoder):
            G = self.decoder.metric(probe)
            if G.shape != (probe.shape[0], self.dim, self.dim) or not torch.isfinite(G).all():
                raise DecoderError(
                    f"{type(self.decoder).__name__}.metric returned shape {tuple(G.shape)} with "
                    f"finite={bool(torch.isfinite(G).all())} for input {tuple(probe.shape)}: expected finite "
                    f"({probe.shape[0]}, {self.dim}, {self.dim})"
                )
            self._validated.add(key)
            return
        try:
            J = geometry.jacobian(self._embed, probe)
        except RuntimeError as err:  # e.g. .numpy() on a dual tensor, data-dependent Python control flow
            raise DecoderError(
                f"the decoder cannot be differentiated by torch.func forward-mode autodiff ({err}). "
                "Keep it in torch operations end to end (no .numpy(), .item() or .tolist() on its input)."
            ) from err
        if not torch.any(J != 0) and not self._differentiable_elsewhere(z):
            raise DecoderError(
                "the decoder's Jacobian is exactly zero at the probe points: its output does not depend "
                "differentiably on z. Remove .detach(), .item(), rounding or integer casts from the decoder."
            )
        self._check_second_derivatives(probe)
        self._validated.add(key)

    def _check_second_derivatives(self, probe: Tensor) -> None:
        """The decoder's second derivative ``d^2 f[u, u]`` at the probe points by nested
        forward mode (what the geometry uses), checked in float64.

        Christoffel symbols, the geodesic equation, shooting and transport rest on second
        derivatives by nested forward-mode autodiff, which torch gets wrong for some
        operations (see ``jets._ELEMENTARY``, rewritten there) and lacks for others. Wrong
        means: off the central differences of the first derivatives (Richardson-extrapolated
        from two steps that agree with each other far better), while the second derivative
        is continuous there (not so where a unit's second derivative jumps at the probe
        point: ELU at 0, where the differences average the two sides) and reverse mode,
        where it exists, disagrees too (not so where saturated outputs make the first
        derivatives too coarse to difference: sigmoid at logits ~30). Reverse mode alone is
        no reference: torch's higher-order backward of ``layer_norm`` is wrong as well.
        """
        if probe.dtype != torch.float64:
            return
        n, d = probe.shape
        u = torch.linspace(1.0, 0.3, d, dtype=probe.dtype, device=probe.device)
        u = (u * torch.tensor([1.0, -1.0], dtype=probe.dtype, device=probe.device).repeat(d)[:d] / u.norm()).expand(n, d)

        def second(at: Tensor) -> Tensor:  # at (m, n, d) -> (m, n, D), in one pass
            along = u.repeat(len(at), 1)[None]
            return geometry.embedding_jet(self._embed, at.reshape(-1, d), along, pair=(0, 0)).second.reshape(len(at), n, -1)

        def first(at: Tensor) -> Tensor:
            along = u.repeat(len(at), 1)[None]
            return geometry.embedding_jet(self._embed, at.reshape(-1, d), along).first[0].reshape(len(at), n, -1)

        try:
            forward = second(probe[None])[0]
        except (DecoderError, TypeError):
            raise
        except Exception as err:  # noqa: BLE001 -- torch's missing nested derivative rules, with this context
            raise DecoderError(
                f"the decoder's second derivatives cannot be computed by torch.func's nested forward-mode "
                f"autodiff ({type(err).__name__}: {err}). The geodesic equation needs them: write the "
                "operation it names in elementary torch operations."
            ) from err
        h = 5e-4 * (1 + probe.abs().amax(-1, keepdim=True))
        shifts = torch.tensor([2.0, -2.0, 1.0, -1.0], dtype=probe.dtype, device=probe.device)[:, None, None]
        ahead2, behind2, ahead, behind = first(probe + shifts * h * u)
        coarse, fine = (ahead2 - behind2) / (4 * h), (ahead - behind) / (2 * h)
        extrapolated = (4 * fine - coarse) / 3
        size = torch.maximum(extrapolated.abs().amax(-1), forward.abs().amax(-1))
        gap = (forward - extrapolated).abs().amax(-1)
        noise = (coarse - fine).abs().amax(-1)
        right, left = second(probe + shifts[2:] * h * u)
        jump = (right - left).abs().amax(-1)
        wrong = (gap > 1e-4 * size) & (gap > 100 * noise) & (gap > 10 * jump) & torch.isfinite(gap)
        if wrong.any():
            reverse = _reverse_second_derivative(self._embed, probe, u)
            if reverse is not None:
                wrong &= (forward - reverse).abs().amax(-1) > 1e-6 * size
        if wrong.any():
            i = int(wrong.nonzero()[0, 0])
            raise DecoderError(
                f"the decoder's second derivatives by nested forward-mode autodiff are wrong at the probe "
                f"point {probe[i].tolist()}: d^2f[u, u] is {float(gap[i] / size[i]):.2g} (relative) off the "
                "central differences of its first derivatives. An operation in the decoder has a wrong "
                "nested forward-mode derivative in this torch version (this library rewrites those it knows: "
                "layer_norm, instance_norm, det, slogdet, logdet, linalg.solve, glu), so Christoffel symbols, "
                "geodesics, exp, shooting and parallel transport would be wrong. Write that operation in "
                "elementary torch operations (torch.linalg.inv(A) @ b for a solve, mean and rsqrt for a "
                "normalization)."
            )

    def _check_row_by_row(self, probe: Tensor, out: Tensor) -> None:
        """Each probe point decoded alone must give its row of the batch's output: the
        geometry differentiates the decoder one point at a time (``torch.func.vmap``)."""
        if probe.shape[0] < 2:
            return
        try:
            with torch.no_grad():
                alone = torch.cat([self._embed(probe[i : i + 1].clone()) for i in range(probe.shape[0])])
        except (DecoderError, TypeError):
            raise
        except Exception as err:  # noqa: BLE001 -- whatever the user's code raises, with this context
            raise DecoderError(
                f"the decoder failed on a batch of one latent point ({type(err).__name__}: {err}), where a batch "
                f"of {probe.shape[0]} worked: it must map any batch (n, {self.dim}) to (n, ...), n = 1 included"
            ) from err
        # Rounding of a batched against a single-row matrix product differs in the last bits only.
        tolerance = 1e3 * torch.finfo(out.dtype).eps * (1 + out.abs().max())
        if alone.shape != out.shape or (alone - out).abs().max() > tolerance:
            gap = float((alone - out).abs().max()) if alone.shape == out.shape else float("nan")
            raise DecoderError(
                f"the decoder's output for a point depends on the other rows of its batch, or changes from "
                f"call to call (largest difference {gap:.3g} between a batch of {probe.shape[0]} and its points "
                "decoded one at a time). The geometry needs a deterministic map z -> x applied row by row: "
                "no batch statistics (x - x.mean(0), F.batch_norm(training=True)) and no sampling (torch.randn, "
                "F.dropout(training=True)); for a stochastic decoder pass its mean and std as "
                "GaussianDecoder(mean, std)."
            )

    def _differentiable_elsewhere(self, z: Tensor) -> bool:
        """Whether the Jacobian is nonzero at a few points around the origin.

        A differentiable decoder is flat where its units saturate (points far
        from the data): a zero Jacobian at the given points alone is not proof
        that the decoder cut the autodiff graph.
        """
        g = torch.Generator(device="cpu").manual_seed(0)
        elsewhere = torch.randn(4, self.dim, generator=g, dtype=z.dtype, device="cpu").to(z.device)
        try:
            J = geometry.jacobian(self._embed, elsewhere)
        except RuntimeError:
            return False
        return bool(torch.any((J != 0) & torch.isfinite(J)))

    def _check_finite(self, value: Tensor, what: str, points: Tensor) -> Tensor:
        if not torch.isfinite(value).all():
            rows = (~torch.isfinite(value.reshape(points.shape[0], -1))).any(-1).nonzero().squeeze(-1)
            decoder_nan = what == "decoder output"
            if not decoder_nan and not isinstance(self.decoder, MetricDecoder):
                # Tell a decoder returning NaN/Inf apart from a singular metric: the fixes differ.
                with torch.no_grad():
                    decoder_nan = not bool(torch.isfinite(self._embed(points[rows[:1]])).all())
            hint = (
                "the decoder returns NaN/Inf there: keep the points inside the decoder's domain"
                if decoder_nan
                else "the metric is singular there (rank-deficient Jacobian): pass regularization=eps "
                "to PullbackManifold"
            )
            raise DecoderError(
                f"{what} is not finite at {len(rows)} point(s), first {points[rows[0]].tolist()}: {hint}"
            )
        return value

    def _report(self, n_failed: int, n_total: int, what: str, n_nonsmooth: int = 0, kind: str = "log") -> None:
        """Warn or raise per ``on_failure`` about ``n_failed`` of ``n_total`` results of ``what``:
        ``kind`` ``"log"`` (boundary-value solves: unconverged answers), ``"ode"`` (initial-value
        solves: NaN rows) or ``"transport"`` (a log, then a transport: NaN rows)."""
        if n_failed == 0 or self.on_failure == "ignore":
            return
        if kind == "ode":
            msg = (
                f"{what}: {n_failed} of {n_total} geodesic ODE solves failed; their results are NaN. The "
                "geodesic left the decoder's domain, met NaN, or needed more than ode_options.max_num_steps "
                "steps: raise ODEOptions(max_num_steps=...) for stiff geodesics, or use shorter tangent "
                "vectors or pass regularization."
            )
        else:
            result = "NaN" if kind == "transport" else "the best approximations found, not certified"
            msg = (
                f"{what}: {n_failed} of {n_total} pairs did not converge; their results are {result}. "
                "Call metric.solve_log(...) for the per-pair report"
            )
            if n_nonsmooth < n_failed:
                msg += ", or raise max_iter or ode_options.max_num_steps, or pass regularization."
            else:
                msg += "."
        if n_nonsmooth:
            msg += (
                f" {n_nonsmooth} of them lie where the decoder is not smooth (piecewise linear, or "
                "activations whose derivative jumps: ReLU, leaky ReLU, hardtanh, SELU, ...): their geodesics "
                "come from the energy method and are approximate (typically within ~1%), never certified. "
                "Use smooth activations (softplus, SiLU, GELU, tanh) for exact geodesics."
            )
        if self.on_failure == "raise":
            raise ConvergenceError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=4)

    # ------------------------------------------------------------------ tensors
    def metric_matrix(self, base_point=None):
        """Metric matrix ``G = J^T J (+ eps I)``.

        Parameters
        ----------
        base_point : array-like, shape=[..., d]

        Returns
        -------
        mat : Tensor, shape=[..., d, d]
        """
        (z,), batch = self._prepare("base_point", base_point=base_point)
        G = geometry.metric_matrix(self._embed, z, self.regularization)
        return self._check_finite(G, "the metric", z).reshape(*batch, self.dim, self.dim)

    def cometric_matrix(self, base_point=None):
        """Inverse of the metric matrix.

        Parameters
        ----------
        base_point : array-like, shape=[..., d]

        Returns
        -------
        cometric : Tensor, shape=[..., d, d]
        """
        (z,), batch = self._prepare("base_point", base_point=base_point)
        G = self._check_finite(geometry.metric_matrix(self._embed, z, self.regularization), "the metric", z)
        eye = torch.eye(self.dim, dtype=G.dtype, device=G.device).expand_as(G)
        cometric = self._check_finite(geometry._solve_spd(G, eye), "the inverse metric", z)
        return cometric.reshape(*batch, self.dim, self.dim)

    def inner_product_derivative_matrix(self, base_point=None):
        """Derivative of the metric, ``mat[..., i, j, k] = d_k G_ij``.

        Parameters
        ----------
        base_point : array-like, shape=[..., d]

        Returns
        -------
        dG : Tensor, shape=[..., d, d, d]
        """
        (z,), batch = self._prepare("base_point", base_point=base_point)
        dG = geometry.metric_derivative(self._embed, z)
        return dG.reshape(*batch, self.dim, self.dim, self.dim)

    def christoffels(self, base_point=None):
        """Christoffel symbols by autodiff of the metric, contravariant index first.

        Parameters
        ----------
        base_point : array-like, shape=[..., d]

        Returns
        -------
        gamma : Tensor, shape=[..., d, d, d]
            ``gamma[..., k, i, j]`` is ``Gamma^k_ij``.
        """
        (z,), batch = self._prepare("base_point", base_point=base_point)
        gamma = geometry.christoffels(self._embed, z, self.regularization)
        return self._check_finite(gamma, "the Christoffel symbols", z).reshape(*batch, *(self.dim,) * 3)

    def riemann_tensor(self, base_point=None):
        """Riemann tensor ``R_{ijk}^l`` (geomstats' index convention), by forward-mode autodiff.

        Parameters
        ----------
        base_point : array-like, shape=[..., d]

        Returns
        -------
        riemann : Tensor, shape=[..., d, d, d, d]
        """
        (z,), batch = self._prepare("base_point", base_point=base_point)
        d = self.dim

        def gamma_fn(x):
            return geometry.christoffels(self._embed, x, self.regularization)

        gamma = gamma_fn(z)
        basis = geometry._basis(z)
        dgamma = torch.func.vmap(lambda t: torch.func.jvp(gamma_fn, (z,), (t,))[1])(basis).permute(1, 2, 3, 4, 0)
        prod = torch.einsum("...ijk,...klm->...ijlm", gamma, gamma)
        riemann = (
            torch.einsum("...ijlm->...lmji", dgamma)
            - torch.einsum("...ijlm->...ljmi", dgamma)
            + torch.einsum("...ijlm->...mjli", prod)
            - torch.einsum("...ijlm->...lmji", prod)
        )
        return self._check_finite(riemann, "the Riemann tensor", z).reshape(*batch, d, d, d, d)

    def geodesic_acceleration(self, position, velocity):
        """Geodesic acceleration ``-G^{-1} J^T d^2 f[v, v]`` by nested JVPs.

        Parameters
        ----------
        position, velocity : array-like, shape=[..., d]

        Returns
        -------
        acceleration : Tensor, shape=[..., d]
        """
        (z, v), batch = self._prepare("position", position=position, velocity=velocity)
        acc = geometry.geodesic_acceleration(self._embed, z, v, self.regularization)
        return self._check_finite(acc, "the geodesic acceleration", z).reshape(*batch, self.dim)

    def geodesic_equation(self, state):
        """Vector field of the geodesic ODE, geomstats' layout.

        Parameters
        ----------
        state : array-like, shape=[..., 2, d]
            Position ``state[..., 0, :]`` and velocity ``state[..., 1, :]``.

        Returns
        -------
        derivative : Tensor, shape=[..., 2, d]
        """
        state = _as_tensor(state)
        if state.dim() < 2 or state.shape[-2] != 2:
            raise ValueError(f"state has shape {tuple(state.shape)}: expected (..., 2, {self.dim})")
        velocity = state[..., 1, :]
        return torch.stack([velocity, self.geodesic_acceleration(state[..., 0, :], velocity)], dim=-2)

    # ------------------------------------------------------------- products
    def inner_product(self, tangent_vec_a, tangent_vec_b, base_point=None):
        """Inner product ``a^T G b`` at ``base_point``.

        Parameters
        ----------
        tangent_vec_a, tangent_vec_b, base_point : array-like, shape=[..., d]

        Returns
        -------
        inner_product : Tensor, shape=[...]
        """
        (a, b, z), batch = self._prepare(
            "base_point", tangent_vec_a=tangent_vec_a, tangent_vec_b=tangent_vec_b, base_point=base_point
        )
        return self._inner(a, b, z).reshape(batch)

    def _inner(self, a: Tensor, b: Tensor, z: Tensor) -> Tensor:
        """``a^T G(z) b`` of prepared ``(n, d)`` inputs."""
        G = self._check_finite(geometry.metric_matrix(self._embed, z, self.regularization), "the metric", z)
        return torch.einsum("ni,nij,nj->n", a, G, b)

    def squared_norm(self, vector, base_point=None):
        """Squared norm ``v^T G v``.

        Parameters
        ----------
        vector, base_point : array-like, shape=[..., d]

        Returns
        -------
        sq_norm : Tensor, shape=[...]
        """
        (v, z), batch = self._prepare("base_point", vector=vector, base_point=base_point)  # errors name `vector`
        return self._inner(v, v, z).reshape(batch)

    def norm(self, vector, base_point=None):
        """Norm ``sqrt(v^T G v)``.

        Parameters
        ----------
        vector, base_point : array-like, shape=[..., d]

        Returns
        -------
        norm : Tensor, shape=[...]
        """
        return _sqrt_with_zero_subgradient(self.squared_norm(vector, base_point))

    def angle(self, tangent_vec_a, tangent_vec_b, base_point=None):
        """Angle between two tangent vectors, in radians, in ``[0, pi]``.

        Parameters
        ----------
        tangent_vec_a, tangent_vec_b, base_point : array-like, shape=[..., d]

        Returns
        -------
        angle : Tensor, shape=[...]
            NaN where either vector is zero.
        """
        (a, b, z), batch = self._prepare(
            "base_point", tangent_vec_a=tangent_vec_a, tangent_vec_b=tangent_vec_b, base_point=base_point
        )
        G = self._check_finite(geometry.metric_matrix(self._embed, z, self.regularization), "the metric", z)
        ab = torch.einsum("ni,nij,nj->n", a, G, b)
        aa = torch.einsum("ni,nij,nj->n", a, G, a)
        bb = torch.einsum("ni,nij,nj->n", b, G, b)
        cos = ab / (aa * bb).sqrt()
        return torch.arccos(cos.clamp(-1.0, 1.0)).reshape(batch)

    def curve_length(self, curve):
        """Length of a discretized latent curve, measured on the decoded curve (with the
        ``regularization`` term ``eps |dz|^2`` added, as in :meth:`dist`).

        Parameters
        ----------
        curve : array-like, shape=[..., n_nodes, d]

        Returns
        -------
        length : Tensor, shape=[...]
        """
        curve = self._prepare_curve(curve)
        return geometry.curve_length(geometry.regularized(self._embed, self.regularization), curve)

    def curve_energy(self, curve):
        """Energy ``1/2 int |d/dt f(c)|^2 dt`` of a discretized latent curve on ``t in [0, 1]``
        (plus ``eps/2 int |dc/dt|^2 dt`` with ``regularization`` eps).

        Parameters
        ----------
        curve : array-like, shape=[..., n_nodes, d]

        Returns
        -------
        energy : Tensor, shape=[...]
        """
        curve = self._prepare_curve(curve)
        return geometry.curve_energy(geometry.regularized(self._embed, self.regularization), curve)

    def _prepare_curve(self, curve) -> Tensor:
        curve = _as_tensor(curve)
        if curve.dim() < 2 or curve.shape[-2] < 2:
            raise ValueError(f"curve has shape {tuple(curve.shape)}: expected (..., n_nodes >= 2, {self.dim})")
        (flat,), _ = self._prepare("curve", curve=curve)
        return flat.reshape(curve.shape).to(flat.dtype)

    # ------------------------------------------------------------ geodesics
    def solve_log(
        self,
        point,
        base_point,
        initial_tangent_vec=None,
        method: str | None = None,
        chunk_size: int | None = None,
        progress: bool = False,
        polish: bool = True,
        lengths_only: bool = False,
    ) -> LogResult:
        """Logarithm map with a per-pair convergence report; never warns.

        Parameters
        ----------
        point, base_point : array-like, shape=[..., d]
        initial_tangent_vec : array-like, shape=[..., d], optional
            Warm start (e.g. the previous solution in an iterative algorithm):
            Newton shooting starts from it (under ``method="auto"``, for at most
            4 iterations; the pairs it does not solve go the discrete route).
        method : {"auto", "shooting", "energy"}, optional
            Default: the space's ``log_method``.
        chunk_size : int, optional
            Pairs solved at once; default: the space's ``chunk_size``.
        progress : bool
            Print progress on stderr after each chunk.
        polish : bool
            ``method="auto"``: False to keep the certified discrete answers
            without shooting the pairs near their end point, which costs
            several times more (see :func:`~pullback_manifold.logarithm.log_map`);
            ``lengths_only`` implies it.
        lengths_only : bool
            Only the norms ``|v|_G`` matter (``dist`` and ``pairwise_dists``
            pass True): no polish, and the discrete geodesics are refined until
            their lengths are certified, at coarser levels than the tangent
            vectors' directions need (on the digits VAE, 22% fewer decoder
            passes and about 1.4 times faster), which are then less accurate
            (see :func:`~pullback_manifold.logarithm.log_map`).

        Returns
        -------
        result : LogResult
            ``tangent_vec`` ``(..., d)``; ``converged``, ``residual``,
            ``n_iterations``, ``from_energy`` ``(...)``. Not differentiable: see
            :meth:`squared_dist` for gradients of distances.
        """
        method = self.log_method if method is None else method
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if initial_tangent_vec is None:
            (z1, z0), batch = self._prepare("base_point", True, point=point, base_point=base_point)
            init = None
        else:
            (z1, z0, init), batch = self._prepare(
                "base_point", True, point=point, base_point=base_point, initial_tangent_vec=initial_tangent_vec
            )
        result = self._log_map(z1, z0, init, method, chunk_size, progress, polish, lengths_only)
        return result.reshape(batch)

    def _log_map(
        self,
        point: Tensor,
        base_point: Tensor,
        initial_tangent_vec: Tensor | None,
        method: str,
        chunk_size: int | None = None,
        progress: bool = False,
        polish: bool = True,
        lengths_only: bool = False,
        curves: _Curves | None = None,
    ) -> LogResult:
        """:func:`~pullback_manifold.logarithm.log_map` of checked, flat ``(n, d)`` arguments with
        this space's settings (a NaN row of ``initial_tangent_vec``: no warm start there); the
        discrete geodesics it solves go to ``curves``."""
        _check_chunk_size(chunk_size)
        return log_map(
            self._embed,
            point,
            base_point,
            initial_tangent_vec=initial_tangent_vec,
            method=method,
            options=self.ode_options,
            regularization=self.regularization,
            tol=self.log_tol,
            max_iter=self.max_iter,
            energy_rtol=self.energy_rtol,
            chunk_size=self.chunk_size if chunk_size is None else int(chunk_size),
            progress=progress,
            polish=polish,
            lengths_only=lengths_only,
            curves=curves,
        )

    def _reported_log(self, point, base_point, what: str, **kwargs) -> LogResult:
        """:meth:`solve_log`, then warn or raise per ``on_failure`` under the name ``what``."""
        result = self.solve_log(point, base_point, **kwargs)
        n_nonsmooth = int((result.nonsmooth & ~result.converged).sum())
        self._report(result.n_failed, result.converged.numel(), what, n_nonsmooth)
        return result

    def geodesic_from_log(self, result: LogResult, point, base_point):
        """The geodesics of a :meth:`DecoderPullbackMetric.solve_log` result, without solving again.

        ODE geodesics from ``result.tangent_vec`` for the pairs shooting
        solved; for the pairs the energy method answered (``from_energy``),
        their discrete geodesic, solved again for those pairs only: where two
        geodesics join a pair, it can end on another one than the log's (the
        grid start spans the end points solved together).
        ``metric.geodesic(initial_point=..., end_point=...)`` follows the log's own.

        Parameters
        ----------
        result : LogResult
            ``metric.solve_log(point, base_point)``.
        point, base_point : Tensor, shape=[..., d]
            The arguments of that call.

        Returns
        -------
        path : callable
            ``path(t)``, ``t`` of shape ``(n_t,)``: ``(..., n_t, d)``; ``t`` in ``[0, 1]``
            joins the points, and outside it the geodesic goes on (for a discrete
            geodesic: the ODE geodesics leaving its ends with its end velocities).
        """
        (z1, z0), batch = self._prepare("base_point", True, point=point, base_point=base_point)
        flat = result.reshape((-1,))
        if flat.tangent_vec.shape != z0.shape:
            raise ValueError(
                f"result has {tuple(result.tangent_vec.shape)} tangent vectors for {tuple(z0.shape)} flattened "
                "pairs: pass the point and base_point given to solve_log"
            )
        return _geodesic_paths(self, z1, z0, flat, batch)

    def squared_dist(self, point_a, point_b):
        """Squared geodesic distance, ``||log_a(b)||^2_G``, differentiable in both points.

        With ``log_method="auto"`` or ``"energy"`` the value is the certified
        length of the discrete geodesic (``solve_log(..., lengths_only=True)``):
        a distance needs no end-point-accurate tangent vector. When an input
        requires a gradient, the full :meth:`solve_log` answers instead (the
        gradient needs the tangent vectors): the value may then differ within
        ``energy_rtol``.

        Gradients (when an input requires them) come from the first variation
        of the energy, not from differentiating the solver: with ``v = log_a(b)``
        and ``u`` the geodesic's velocity on arrival at ``b``,
        ``d/da = -2 G(a) v`` and ``d/db = 2 G(b) u``. For a pair that the energy
        method answers (``solve_log``'s ``from_energy``; under ``"auto"``, a pair
        whose geodesic from that velocity misses ``b`` by more than ``1e-3``), ``v``
        and ``u`` carry the discrete geodesic's direction error (on the digits VAE
        ``3.6e-4`` relative in median, up to ``3e-2``), and so do the gradients:
        ``log_method="shooting"`` makes them exact to the ODE's tolerance where
        shooting converges. First order only: the gradient is not itself
        differentiable (``create_graph=True`` gives no second derivatives).

        With a solver of your own in ``log_solver`` (geomstats' slot), the
        squared norm of its log (geomstats' definition), and its gradients.

        Parameters
        ----------
        point_a, point_b : array-like, shape=[..., d]

        Returns
        -------
        sq_dist : Tensor, shape=[...]
        """
        # validated here, so that errors name this method's own arguments
        self._prepare("point_a", True, point_a=point_a, point_b=point_b)
        if self._log_solver_replaced:
            # A solver of the user's in geomstats' slot: the norm of its log, as geomstats defines it.
            return super().squared_dist(point_a, point_b)
        a, b = _as_tensor(point_a), _as_tensor(point_b)
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return _SquaredDistance.apply(a, b, self)
        # Not self.log: a distance is reported under its own name, and does not depend on the
        # last call (log's warm start). A length needs no end-point-accurate tangent vector.
        return self.squared_norm(self._reported_log(b, a, "dist", lengths_only=True).tangent_vec, a)

    def dist(self, point_a, point_b):
        """Geodesic distance.

        Parameters
        ----------
        point_a, point_b : array-like, shape=[..., d]

        Returns
        -------
        dist : Tensor, shape=[...]
        """
        return _sqrt_with_zero_subgradient(self.squared_dist(point_a, point_b))

    def parallel_transport(self, tangent_vec, base_point, direction=None, end_point=None):
        """Parallel transport of ``tangent_vec`` along the geodesic from ``base_point``.

        The geodesic is ``t -> exp(t direction)``, or the one reaching
        ``end_point`` (through ``log``), for ``t`` in ``[0, 1]``. The transport
        preserves ``G``-inner products.

        Parameters
        ----------
        tangent_vec : array-like, shape=[..., d]
        base_point : array-like, shape=[..., d]
        direction : array-like, shape=[..., d], optional
        end_point : array-like, shape=[..., d], optional
            Exactly one of ``direction`` and ``end_point``.

        Returns
        -------
        transported : Tensor, shape=[..., d]
            At the end of the geodesic; NaN where the ODE solve failed and, with
            ``end_point``, where the log did not converge or the decoder is not
            smooth along the pair (reported as not converged, per ``on_failure``).

        Notes
        -----
        With ``end_point``, the transport follows the geodesic of the log: the
        ODE geodesic where shooting answered the pair, and for a pair that the
        energy method answered (``solve_log``'s ``from_energy``, whose ``exp``
        does not reach the point) its discrete geodesic
        (:func:`~pullback_manifold.transport.transport_along_polygon`).
        Transporting along ``exp`` of the energy answer went up to 90% wrong on
        digits-VAE pairs; shooting those pairs again from their velocity made
        the call on 24 pairs take 293 s and left 4 without an answer, against
        36 s (32 s of it the log) and 1 (its log unconverged) along their
        discrete geodesics, which were within ``2e-4`` (``7e-5`` in median) of
        the transport along the ODE geodesic where shooting found it.
        """
        if (direction is None) == (end_point is None):
            raise ValueError("pass exactly one of direction= and end_point= to parallel_transport")
        if direction is not None:
            (w, z, v), batch = self._prepare(
                "base_point", True, tangent_vec=tangent_vec, base_point=base_point, direction=direction
            )
            reached = torch.ones(len(z), dtype=torch.bool, device=z.device)
            discrete = torch.zeros(0, dtype=torch.long, device=z.device)
        else:
            (w, z, z1), batch = self._prepare(
                "base_point", True, tangent_vec=tangent_vec, base_point=base_point, end_point=end_point
            )
            curves = _Curves()
            result = self._log_map(z1, z, None, self.log_method, curves=curves)
            v, reached = result.tangent_vec, result.converged & ~result.from_energy
            discrete = (result.from_energy & result.converged & ~result.nonsmooth).nonzero().squeeze(-1)
        by_ode = reached.nonzero().squeeze(-1)
        transported = torch.full_like(w, float("nan"))
        ok = torch.zeros_like(reached)
        if len(by_ode):
            along, _, solved = parallel_transport(
                self._embed, w[by_ode], z[by_ode], v[by_ode], self.ode_options, self.regularization
            )
            transported[by_ode], ok[by_ode] = along, solved
        if len(discrete):
            for positions, polygons in curves.of(discrete):
                rows = discrete[positions]  # along the log's own discrete geodesics
                along, ok[rows] = transport_along_polygon(self._embed, w[rows], polygons, self.regularization)
                transported[rows] = along
        n_nonsmooth = 0 if direction is not None else int((result.nonsmooth & ~ok).sum())
        self._report(int((~ok).sum()), len(ok), "parallel_transport", n_nonsmooth, kind="ode" if direction is not None else "transport")
        return _nan_rows(transported, ok).reshape(*batch, self.dim)

    # ----------------------------------------------------------- statistics
    def dist_pairwise(self, points, n_jobs=1, **joblib_kwargs):
        """Pairwise geodesic distance matrix, all pairs in one batched solve.

        Overrides geomstats' ``RiemannianMetric.dist_pairwise``, which calls
        ``dist`` once per pair, so that geomstats' tools built on it
        (``RiemannianKMedoids``) are batched. Same result as
        :func:`pullback_manifold.statistics.pairwise_dists`: only the pairs
        ``i < j`` are solved, the diagonal is exactly zero, and non-converged
        pairs follow the space's ``on_failure`` policy, as in ``dist``. With a
        solver of your own in ``log_solver``, the norms of its logs, all pairs
        in one call of ``dist`` (its own failure handling).

        Parameters
        ----------
        points : array-like, shape=[n, d]
        n_jobs : int
            Ignored (geomstats' signature): the pairs are solved in one batch,
            not by parallel jobs.
        **joblib_kwargs
            Ignored (geomstats' signature).

        Returns
        -------
        dists : Tensor, shape=[n, n]
        """
        from .statistics import pairwise_dists  # noqa: PLC0415  (statistics imports this module)

        return pairwise_dists(self._space, points)

    def log(self, point, base_point):
        """Logarithm map: the initial velocity of a geodesic from ``base_point`` to ``point``.

        Run by ``log_solver`` (geomstats' slot; this metric's own solver unless replaced):
        ``log_method`` of the space, by default ``"auto"`` -- discrete geodesics (energy
        method, refined until their length is certified to ``energy_rtol``), polished by
        Newton shooting to an end-point residual of ``log_tol`` where the ODE geodesic
        from their velocity ends near the point. Pairs left to the energy method
        (``LogResult.from_energy``) have a certified length but a velocity whose direction
        carries the discretization error, so ``exp`` of it is not promised to return the
        point; ``log_method="shooting"`` promises that, where it converges. Pairs that do
        not converge warn, raise or pass per ``on_failure``; :meth:`solve_log` returns the
        per-pair report (and takes the method, chunking and a warm start per call). A call
        with the previous call's points and base points moved a little (a Fréchet-mean
        iteration) starts from the previous solution.

        Parameters
        ----------
        point, base_point : array-like, shape=[..., d]

        Returns
        -------
        tangent_vec : Tensor, shape=[..., d]
            With ``|tangent_vec|_G = dist(base_point, point)`` (constant speed on ``[0, 1]``).
            Not differentiable: for gradients use :meth:`squared_dist` or :meth:`exp`.
        """
        return super().log(point, base_point)

    def geodesic(self, initial_point, end_point=None, initial_tangent_vec=None):
        """The geodesic from ``initial_point`` with a given end point or initial velocity.

        Give exactly one of ``end_point`` (a boundary-value problem: the geodesic of
        :meth:`log`'s solution; for pairs the energy method answered, its discrete geodesic
        on ``[0, 1]``, continued beyond by the ODE) or ``initial_tangent_vec`` (the ODE
        geodesic ``t -> exp(t v)``).

        Parameters
        ----------
        initial_point : array-like, shape=[..., d]
        end_point : array-like, shape=[..., d], optional
        initial_tangent_vec : array-like, shape=[..., d], optional

        Returns
        -------
        path : callable
            ``path(t)`` for times ``t`` (a number or ``(n_t,)``): points of shape
            ``(n_t, d)`` for one geodesic, ``(..., n_t, d)`` for a batch. NaN rows where an
            ODE solve failed (reported per ``on_failure``).
        """
        return super().geodesic(initial_point, end_point=end_point, initial_tangent_vec=initial_tangent_vec)

    def exp(self, tangent_vec, base_point):
        """Exponential map, differentiable in both arguments.

        The end point comes from ``exp_solver`` (geomstats' slot), unchanged.
        When an input requires gradients, they are those of the linearization
        ``exp(v, z) + Phi (z' - z) + Psi (v' - v)``, with ``Phi = dexp/dz`` and
        ``Psi = dexp/dv`` from the variational (Jacobi) equations integrated
        along the geodesic; geomstats' Riemannian geodesic regression
        differentiates its loss through ``exp`` this way.

        Parameters
        ----------
        tangent_vec, base_point : array-like, shape=[..., d]

        Returns
        -------
        end_point : Tensor, shape=[..., d]
            NaN where the ODE solve failed (with gradients: where either solve failed).
        """
        from .geodesics import _odeint_flagged, _times, _variational_rhs  # noqa: PLC0415

        end = super().exp(tangent_vec, base_point)
        v_in, z_in = _as_tensor(tangent_vec), _as_tensor(base_point)
        if not (torch.is_grad_enabled() and (v_in.requires_grad or z_in.requires_grad)):
            return end
        (v, z), batch = self._prepare("base_point", True, tangent_vec=v_in, base_point=z_in)
        n, d = z.shape
        eye = torch.eye(d, dtype=z.dtype, device=z.device).reshape(1, d * d).expand(n, d * d)
        zero = torch.zeros_like(eye)
        # Columns of (dz(t), dv(t)) from (I, 0) at t = 0 give Phi, from (0, I) give Psi: one batched solve.
        y0 = torch.cat([torch.cat([z, v, eye, zero], -1), torch.cat([z, v, zero, eye], -1)])
        rhs = _variational_rhs(self._embed, d, self.regularization)
        ys, ok = _odeint_flagged(rhs, y0, _times(0.0, 1.0, y0), self.ode_options, 2 * d)
        ok = ok[:n] & ok[n:]
        self._report(int((~ok).sum()), n, "exp (Jacobian, for gradients)", kind="ode")
        jac = ys[-1, :, 2 * d : 2 * d + d * d].reshape(2, n, d, d)
        phi, psi = _nan_rows(jac[0], ok), _nan_rows(jac[1], ok)
        dz = z_in.expand(*batch, d).reshape(n, d).to(z.dtype)
        dv = v_in.expand(*batch, d).reshape(n, d).to(z.dtype)
        delta = (phi @ (dz - dz.detach()).unsqueeze(-1) + psi @ (dv - dv.detach()).unsqueeze(-1)).squeeze(-1)
        return end + delta.reshape(*batch, d)


class _SquaredDistance(torch.autograd.Function):
    """``d(a, b)^2`` with the first-variation gradients (see ``DecoderPullbackMetric.squared_dist``)."""

    @staticmethod
    def forward(ctx, point_a, point_b, metric):
        (b, a), batch = metric._prepare("point_a", True, point_b=point_b, point_a=point_a)
        result = metric._reported_log(b, a, "squared_dist")
        v = result.tangent_vec
        G_a = geometry.metric_matrix(metric._embed, a, metric.regularization)
        arrival = torch.empty_like(v)
        ok = torch.ones(len(v), dtype=torch.bool, device=v.device)
        # Shooting answers: the ODE's velocity at t = 1. An energy answer's velocity is
        # approximate and the ODE from it drifts (sigma walls): minus the velocity of the
        # reversed discrete geodesic.
        shot = (~result.from_energy).nonzero().squeeze(-1)
        if len(shot):
            _, arrival[shot], ok[shot] = geodesic_flow(
                metric._embed, v[shot], a[shot], metric.ode_options, metric.regularization
            )
        answered = result.from_energy.nonzero().squeeze(-1)
        if len(answered):
            reverse = metric.solve_log(a[answered], b[answered], method="energy").tangent_vec
            arrival[answered], ok[answered] = -reverse, torch.isfinite(reverse).all(-1)
        G_b = geometry.metric_matrix(metric._embed, b, metric.regularization)
        grad_a = -2 * (G_a @ v.unsqueeze(-1)).squeeze(-1)
        grad_b = _nan_rows(2 * (G_b @ arrival.unsqueeze(-1)).squeeze(-1), ok)
        ctx.save_for_backward(grad_a, grad_b)
        ctx.shapes = (point_a.shape, point_b.shape, batch)
        return torch.einsum("ni,nij,nj->n", v, G_a, v).reshape(batch)

    @staticmethod
    def backward(ctx, grad_output):
        grad_a, grad_b = ctx.saved_tensors
        shape_a, shape_b, batch = ctx.shapes
        g = grad_output.reshape(-1, 1)

        def reduce(grad, shape):
            grad = (g * grad).reshape(*batch, grad.shape[-1])
            return grad.sum_to_size(shape) if grad.shape != shape else grad

        return reduce(grad_a, shape_a), reduce(grad_b, shape_b), None


class ODEExpSolver(ExpSolver):
    """geomstats exp solver: the geodesic ODE integrated with torchdiffeq."""

    def __init__(self, metric: DecoderPullbackMetric):
        super().__init__(solves_ivp=True)
        self.metric = metric

    def exp(self, tangent_vec, base_point):
        """End point of the geodesic, shape ``(..., d)`` (see ``Connection.exp``)."""
        m = self.metric
        (v, z), batch = m._prepare("base_point", True, tangent_vec=tangent_vec, base_point=base_point)
        end, ok = exp(m._embed, v, z, m.ode_options, m.regularization)
        m._report(int((~ok).sum()), len(ok), "exp", kind="ode")
        return _nan_rows(end, ok).reshape(*batch, m.dim)

    def geodesic_ivp(self, tangent_vec, base_point):
        """Geodesic ``t -> exp(t v)``; ``path(t)`` is ``(n_t, d)`` or ``(n, n_t, d)``."""
        m = self.metric
        (v, z), batch = m._prepare("base_point", True, tangent_vec=tangent_vec, base_point=base_point)

        def path(t):
            times = _path_times(t, z)
            points, ok = geodesic_ivp(m._embed, v, z, times, m.ode_options, m.regularization)
            m._report(int((~ok).sum()), len(ok), "geodesic", kind="ode")
            return _nan_rows(points, ok).reshape(*batch, times.shape[0], m.dim)

        return path


def _geodesic_paths(
    m: DecoderPullbackMetric, z1: Tensor, z0: Tensor, result: LogResult, batch, solved: _Curves | None = None
):
    """``path(t)`` joining flat pairs: ODE geodesics of ``result`` where shooting solved
    them, discrete geodesics (energy method) elsewhere: those of ``solved`` (the log's), or
    solved again."""
    linear = piecewise_linear_pairs(m._embed, z1, z0)
    by_ode = ~result.nonsmooth.reshape(-1) & ~result.from_energy.reshape(-1)
    curves = []
    energy_embed = geometry.energy_embedding(m._embed, m.regularization)
    if by_ode.any():
        rows = by_ode.nonzero().squeeze(-1)
        curves.append((rows, None, result.tangent_vec.reshape(-1, m.dim)[rows]))
    rest, done = (~by_ode).nonzero().squeeze(-1), by_ode.clone()
    for positions, curve in [] if solved is None or len(rest) == 0 else solved.of(rest):
        rows = rest[positions]
        first = result.tangent_vec.reshape(-1, m.dim)[rows]
        ends = (first, end_velocity(energy_embed, curve, metric_norm(energy_embed, z0[rows], first)))
        curves.append((rows, curve, (arc_length_times(energy_embed, curve), ends)))
        done[rows] = True
    for is_linear in (False, True):
        rows = ((linear == is_linear) & ~done).nonzero().squeeze(-1)
        if len(rows) == 0:
            continue
        energy, curve, length = energy_log(energy_embed, z1[rows], z0[rows], rtol=m.energy_rtol, smooth=not is_linear)
        for sub, polygons in own_polygons(curve, energy.n_iterations):
            ends = (energy.tangent_vec[sub], end_velocity(energy_embed, polygons, length[sub]))
            curves.append((rows[sub], polygons, (arc_length_times(energy_embed, polygons), ends)))

    def path(t):
        times = _path_times(t, z0)
        out = torch.empty(z0.shape[0], times.shape[0], m.dim, dtype=z0.dtype, device=z0.device)
        failed = torch.zeros(z0.shape[0], dtype=torch.bool, device=z0.device)

        def ode(velocity: Tensor, start: Tensor, times: Tensor) -> Tensor:
            points, ok = geodesic_ivp(m._embed, velocity, start, times, m.ode_options, m.regularization)
            failed[rows[~ok]] = True
            return _nan_rows(points, ok)

        for rows, curve, extra in curves:
            if curve is None:
                out[rows] = ode(extra, z0[rows], times)
                continue
            # A discrete geodesic spans [0, 1]; beyond its ends, the ODE geodesics that leave
            # them with its end velocities continue it.
            node_times, (first, last) = extra
            smooth = ~result.nonsmooth.reshape(-1)[rows]
            block = torch.empty(len(rows), times.shape[0], m.dim, dtype=z0.dtype, device=z0.device)
            inside, before, after = (times >= 0) & (times <= 1), times < 0, times > 1
            if inside.any():
                block[:, inside] = interpolate_curve(curve, times[inside], node_times, cubic=smooth)
            if before.any():
                block[:, before] = ode(first, z0[rows], times[before])
            if after.any():
                block[:, after] = ode(last, z1[rows], times[after] - 1)
            out[rows] = block
        # NaN rows where an ODE solve failed (a geodesic running off), as exp reports them.
        m._report(int(failed.sum()), len(failed), "geodesic", kind="ode")
        return out.reshape(*batch, times.shape[0], m.dim)

    return path


def _path_times(t, like: Tensor) -> Tensor:
    """A geodesic path's times ``(n_t,)`` from a number, list or array; NaN or Inf raise."""
    times = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if times.dim() > 1:
        raise ValueError(
            f"path(t): t has shape {tuple(times.shape)}: pass a number or a 1-D sequence of times (n_t,); "
            "the path of every pair is evaluated at all of them"
        )
    times = times.reshape(-1)
    if not torch.isfinite(times).all():
        raise ValueError(f"path(t): t contains NaN or Inf ({times.tolist()[:8]}): pass finite times")
    return times


def _reverse_second_derivative(embed, z: Tensor, u: Tensor) -> Tensor | None:
    """``d^2 f[u, u]`` ``(n, D)`` at points ``z`` ``(n, d)`` by reverse mode only (Jacobian-vector
    products by the double-backward trick); None where an operation has no double backward."""
    try:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            out = embed(z).reshape(len(z), -1)

            def along_u(y: Tensor) -> Tensor:  # (dy/dz) u, differentiable in z
                w = torch.zeros_like(y, requires_grad=True)
                (pulled,) = torch.autograd.grad(y, z, w, create_graph=True)
                (pushed,) = torch.autograd.grad((pulled * u).sum(), w, create_graph=True)
                return pushed

            return along_u(along_u(out)).detach()
    except RuntimeError:
        return None


def _sqrt_with_zero_subgradient(squared: Tensor) -> Tensor:
    """``sqrt(max(squared, 0))``, with derivative 0 where it is 0. sqrt's derivative there is
    infinite, and ``inf * 0`` made the gradient of a distance or norm NaN at coinciding points
    or a zero vector, where it has none (a cone); 0 is a subgradient."""
    positive = squared > 0
    # Not a constant 0 where it is not positive: a NaN (a failed pair) must stay NaN.
    return torch.where(positive, torch.where(positive, squared, 1).sqrt(), squared.clamp_min(0) * 0)


# A warm start is used for a pair whose base point moved by at most this fraction of the
# length of its last geodesic (a Fréchet-mean step, not a new problem).
_WARM_START_MOVE = 0.1


class ShootingLogSolver(LogSolver):
    """geomstats log solver: batched damped-Newton shooting, warm-started.

    Iterative algorithms (geomstats' ``FrechetMean``, k-means) call ``log`` of
    the same points from a base point that moves a little each iteration. The
    solver keeps the last solution where shooting converged (not the energy
    method's answers: see :meth:`log`) and, when the same points come back (same
    batch shape and dtype), starts Newton from it, shifted by the base point's
    move (the first-order change of ``log`` in the base point is ``-I``), for
    the pairs whose base point moved by at most a tenth of their geodesic's
    length; the others are solved from scratch. Every pair is still solved to
    tolerance. A warm-started pair stays on the geodesic it followed: if
    another, shorter one appears as the base point moves, a solve from scratch
    may find it and a warm start will not.
    """

    def __init__(self, metric: DecoderPullbackMetric, warm_start: bool = True):
        super().__init__(solves_bvp=True)
        self.metric = metric
        self.warm_start = warm_start
        self._last: tuple[Tensor, Tensor, Tensor] | None = None

    def _initial_guess(self, point, base_point) -> Tensor | None:
        """The last solution shifted by the base points' move, ``(..., d)``; NaN for the pairs
        whose base point moved by more than ``_WARM_START_MOVE`` of their geodesic's length
        (in the metric at the old base point). None when the points, or the base points'
        shape, dtype or device, are not the last call's."""
        if not self.warm_start or self._last is None:
            return None
        last_point, last_base, last_vec = self._last
        point = _as_tensor(point)
        base_point = _as_tensor(base_point)
        for new, old in ((point, last_point), (base_point, last_base)):
            # Another batch shape or dtype: the guess would impose the last call's on this one.
            if new.shape != old.shape or new.dtype != old.dtype or new.device != old.device:
                return None
        if not torch.equal(point, last_point):
            return None
        move = base_point - last_base
        # Newton goes to the geodesic nearest its start: from a base point that moved far, that
        # can be another, longer one than a cold solve finds.
        G = self.metric.metric_matrix(last_base)  # (..., d, d)
        moved, length = (torch.einsum("...i,...ij,...j->...", v, G, v) for v in (move, last_vec))
        near = moved <= _WARM_START_MOVE**2 * length
        return torch.where(near.unsqueeze(-1), last_vec - move, torch.nan)

    def log(self, point, base_point):
        """Initial velocity of the geodesic from ``base_point`` to ``point``, shape ``(..., d)``.

        Not differentiable (an iterative solve, on detached points): for gradients of
        distances use ``metric.squared_dist`` (first variation of the energy), and of
        points along a geodesic ``metric.exp`` (variational equations).
        """
        m = self.metric
        guess = self._initial_guess(point, base_point)
        if guess is None or torch.isfinite(guess).all():
            result = m._reported_log(point, base_point, "log", initial_tangent_vec=guess)
        else:
            result = self._partly_warm_log(point, base_point, guess)
        if self.warm_start and isinstance(point, Tensor) and isinstance(base_point, Tensor):
            # Only a shooting answer starts shooting: from an energy answer's velocity (a sigma
            # wall's geodesic, sensitive to it) Newton spent its 4 iterations on ODE solves and
            # went the discrete route anyway (a FrechetMean step of 2 digits-VAE pairs: 16.7 s
            # against 1.3 s cold). NaN: no warm start, the pair goes the discrete route directly.
            ok = (result.converged & ~result.from_energy).unsqueeze(-1)
            vec = torch.where(ok, result.tangent_vec, torch.nan)
            self._last = (point.detach().clone(), base_point.detach().clone(), vec.detach().clone())
        return result.tangent_vec

    def _partly_warm_log(self, point, base_point, guess: Tensor) -> LogResult:
        """:meth:`log`'s result when only the pairs with a finite ``guess`` are warm-started."""
        m = self.metric
        (z1, z0), batch = m._prepare("base_point", True, point=point, base_point=base_point)
        flat_guess = guess.expand(*batch, m.dim).reshape(-1, m.dim).to(dtype=z1.dtype, device=z1.device)
        # One solve: under auto, the pairs without a warm start go the discrete route in the same
        # batches as those their warm start left (two solves, one after the other, cost an
        # energy call and several ODE solves more per FrechetMean iteration).
        result = m._log_map(z1, z0, flat_guess, m.log_method)
        m._report(result.n_failed, len(z1), "log", int((result.nonsmooth & ~result.converged).sum()))
        return result.reshape(batch)

    def geodesic_bvp(self, point, base_point):
        """Geodesic from ``base_point`` to ``point``; ``path(t)`` is ``(n_t, d)`` or ``(n, n_t, d)``.

        The ODE geodesic of the ``log`` vector where shooting solved the pair;
        the refined discrete geodesic, for ``t`` in ``[0, 1]``, where the energy
        method answered it (``log_method="energy"``, ``auto``'s ``from_energy``
        pairs: the ODE from their approximate initial velocity would drift off
        a geodesic that is sensitive to it) or where the decoder is not smooth
        (ReLU: its ODE geodesics are straight lines), continued outside
        ``[0, 1]`` by the ODE geodesics that leave its ends with its end
        velocities.
        """
        m = self.metric
        (z1, z0), batch = m._prepare("base_point", True, point=point, base_point=base_point)
        solved = _Curves()
        result = m._log_map(z1, z0, None, m.log_method, curves=solved)
        n_nonsmooth = int((result.nonsmooth & ~result.converged).sum())
        m._report(result.n_failed, result.converged.numel(), "geodesic", n_nonsmooth)
        return _geodesic_paths(m, z1, z0, result, batch, solved)

