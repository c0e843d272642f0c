r"""A Gaussian-process (GP-LVM-style) decoder and its expected metric.

Every output dimension ``j = 1..D`` of the decoder is an independent GP with a
shared squared-exponential kernel

.. math::

    k(a, b) = s^2 \exp\Big(-\tfrac12 \sum_i (a_i - b_i)^2 / \ell_i^2\Big)

(one length scale, or one per latent dimension: ARD), a constant mean per output
(the data mean) and Gaussian observation noise ``noise``, conditioned on latent
inputs ``X`` ``(n, d)`` and outputs ``Y`` ``(n, D)``. The derivative of a GP is a
GP, so the Jacobian ``J`` ``(D, d)`` at ``z`` is Gaussian: its rows are
independent with mean and common covariance

.. math::

    E[J_{j,:}] = \partial_z k(z, X) K^{-1} (Y_{:,j} - m_j), \qquad
    \Sigma_J = \partial_z \partial_{z'} k(z, z')|_{z'=z}
               - \partial_z k(z, X) K^{-1} \partial_z k(X, z),

``K = k(X, X) + noise I`` (for this kernel
:math:`\partial_{z_i}\partial_{z'_j} k(z, z) = s^2 \delta_{ij} / \ell_i^2`).
The expected metric (Tosi, Hauberg, Vellido, Lawrence, UAI 2014) is

.. math::

    G(z) = E[J^T J] = E[J]^T E[J] + D \, \Sigma_J(z).

It is not the pull-back through one map, so :class:`GaussianProcessDecoder` is
a :class:`~pullback_manifold.decoders.MetricDecoder`: the geometry
differentiates :meth:`GaussianProcessDecoder.metric` directly. ``Sigma_J``
grows from ~0 near the data to the prior ``s^2 / l^2`` away from it, so
geodesics keep to the data.

All posterior algebra is in float64 (Cholesky of ``K`` with jitter);
outputs have the dtype of ``z``.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from .decoders import MetricDecoder

__all__ = ["GaussianProcessDecoder"]

_F64 = torch.float64
# Float64 numbers that the intermediates of one metric_second_derivatives pass may take, as
# estimated there (measured peak for 2048 points at d = 8, n = 300: 0.5 GB, against 7.7 GB in
# one pass, which also took 38 s against 13).
_SECOND_DERIVATIVE_NUMBERS = 2**25


class _Constants(NamedTuple):
    """The posterior's z-independent tensors, on one device."""

    inputs: Tensor  # X, (n, d)
    inv_sq_ell: Tensor  # 1 / l^2, (d,)
    alpha: Tensor  # K^{-1} (Y - m), (n, D)
    output_mean: Tensor  # m, (D,)
    chol_inv: Tensor  # L^{-1}, (n, n)


def _sq_dists(a: Tensor, b: Tensor, inv_sq_lengthscale: Tensor) -> Tensor:
    """Scaled squared distances ``sum_i (a_i - b_i)^2 / l_i^2``: ``(n, m)``.

    Explicit differences (not the expanded quadratic): exact at ``a = b`` and
    smooth for forward-mode autodiff.
    """
    diff = a.unsqueeze(-2) - b.unsqueeze(-3)
    return (diff.pow(2) * inv_sq_lengthscale).sum(-1)


def _symmetric_indices(d: int, device: torch.device) -> tuple[Tensor, ...]:
    """Index tensors for derivatives symmetric in their indices, in latent dimension ``d``:
    the pairs ``c <= b`` (``cs``, ``bs``, ``(P,)``, :func:`torch.triu_indices` order),
    ``pair_of`` ``(d, d)`` (the pair of ``(b, a)`` in either order), the sorted triples
    ``c <= b <= a`` ``(T, 3)``, and ``gather`` ``(P, d)`` (the triple of ``(c, b, a)`` for
    the pair ``c <= b`` and every ``a``). Made once per ``(d, device)``, the geodesic ODE
    asks for them at every step; not cached inside a ``torch.func`` transform (JVPs of the
    closed form), where new tensors belong to the transform's level."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return _make_symmetric_indices(d, device)
    return _cached_symmetric_indices(d, device)


def _make_symmetric_indices(d: int, device: torch.device) -> tuple[Tensor, ...]:
    pairs = [(c, b) for c in range(d) for b in range(c, d)]
    pair_index = {pair: i for i, pair in enumerate(pairs)}
    pair_of = [[pair_index[(min(b, a), max(b, a))] for a in range(d)] for b in range(d)]
    sorted_triples = list(itertools.combinations_with_replacement(range(d), 3))
    triple_index = {t: i for i, t in enumerate(sorted_triples)}
    gather = [[triple_index[tuple(sorted((c, b, a)))] for a in range(d)] for c, b in pairs]
    out = ([c for c, _ in pairs], [b for _, b in pairs], pair_of, sorted_triples, gather)
    return tuple(torch.tensor(t, dtype=torch.long, device=device) for t in out)


_cached_symmetric_indices = functools.cache(_make_symmetric_indices)


class GaussianProcessDecoder(MetricDecoder):
    r"""GP decoder with a shared RBF kernel; expected metric ``E[J]^T E[J] + D Sigma_J``.

    Parameters
    ----------
    inputs : Tensor, shape=[n, d]
        Latent inputs ``X`` (e.g. GP-LVM latent points, or a VAE's codes).
    outputs : Tensor, shape=[n, *out]
        Observations ``Y``; flattened to ``(n, D)``. The prior mean of each
        output is the data mean of its column (``outputs.mean(0)``, in
        ``output_mean``), not zero: the posterior mean is
        ``m + k(z, X) K^{-1} (Y - m)``.
    lengthscale : float or Tensor, shape=[] or [d]
        Kernel length scale(s) ``l`` (a vector of ``d`` for ARD).
    signal_variance : float
        Kernel amplitude ``s^2``.
    noise_variance : float
        Observation noise added to the diagonal of ``K``.
    jitter : float
        Extra diagonal term, relative to ``signal_variance``, for the Cholesky
        factorization.

    Notes
    -----
    Use :meth:`fit` to choose the hyperparameters by maximizing the log
    marginal likelihood. Give it to :class:`~pullback_manifold.PullbackManifold`
    like any decoder; ``embed`` (the posterior mean) is used for decoding only.

    Examples
    --------
    >>> gp = GaussianProcessDecoder.fit(X, Y)  # doctest: +SKIP
    >>> space = PullbackManifold(gp, dim=2)  # doctest: +SKIP
    >>> space.metric.dist(z0, z1)  # doctest: +SKIP
    """

    def __init__(
        self,
        inputs: Tensor,
        outputs: Tensor,
        lengthscale: float | Tensor = 1.0,
        signal_variance: float = 1.0,
        noise_variance: float = 1e-2,
        jitter: float = 1e-10,
    ):
        X, Y = self._check_data(inputs, outputs)
        n, d = X.shape
        ell = torch.as_tensor(lengthscale, dtype=_F64, device=X.device).detach().reshape(-1)
        if ell.numel() not in (1, d):
            raise ValueError(f"lengthscale must be a scalar or have {d} entries (ARD), got {ell.numel()}")
        if not bool((ell > 0).all()) or not signal_variance > 0 or not noise_variance >= 0 or not jitter >= 0:
            raise ValueError(
                "need lengthscale > 0, signal_variance > 0, noise_variance >= 0, jitter >= 0; got "
                f"{ell.tolist()}, {signal_variance}, {noise_variance}, {jitter}"
            )
        self.inputs, self.outputs = X, Y
        self.lengthscale = ell.expand(d).clone()
        self.signal_variance = float(signal_variance)
        self.noise_variance = float(noise_variance)
        self.output_mean = Y.mean(0)
        self._inv_sq_ell = self.lengthscale.pow(-2)
        ridge = (self.noise_variance + jitter * self.signal_variance) * torch.eye(n, dtype=_F64, device=X.device)
        K = self._kernel(X, X, self._inv_sq_ell) + ridge
        L, info = torch.linalg.cholesky_ex(K)
        if info != 0:
            raise ValueError(
                "the kernel matrix is not positive definite (duplicate inputs with no noise?): "
                "raise noise_variance or jitter"
            )
        eye = torch.eye(n, dtype=_F64, device=X.device)
        # Explicit inverses of the constant factors: every z-dependent quantity is then
        # plain matmuls, which torch.func.jvp/vmap and autograd differentiate cheaply.
        self._chol_inv = torch.linalg.solve_triangular(L, eye, upper=False)  # L^{-1}
        self._alpha = torch.cholesky_solve(Y - self.output_mean, L)  # K^{-1} (Y - m), (n, D)
        self._chol = L

    def _constants(self, device: torch.device) -> _Constants:
        """The constants on ``device``, copied there once (not per call)."""
        sources = (self.inputs, self._inv_sq_ell, self._alpha, self.output_mean, self._chol_inv)
        key = tuple((id(t), t._version) for t in sources)  # a reassigned or edited constant is copied again
        cache = self.__dict__.setdefault("_device_constants", {})
        cached = cache.get(device)
        if cached is not None and cached[0] == key:
            return cached[1]
        constants = _Constants(*(t.detach().to(device) for t in sources))
        # Tensors made inside a torch.func transform belong to its level: cache at top level only.
        if torch._C._functorch.peek_interpreter_stack() is None:
            cache[device] = (key, constants)
        return constants

    def prepare(self, dtype: torch.dtype, device: torch.device) -> None:
        """Copy the posterior's constants to ``device`` (all algebra stays in float64)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the key points' .device will have
            device = torch.device("cuda", torch.cuda.current_device())
        self._constants(device)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_device_constants", None)  # device copies are not pickled
        return state

    @staticmethod
    def _check_data(inputs, outputs) -> tuple[Tensor, Tensor]:
        X = torch.as_tensor(inputs).detach().to(_F64)
        Y = torch.as_tensor(outputs).detach().to(_F64)
        if X.dim() != 2:
            raise ValueError(f"inputs must have shape (n, d), got {tuple(X.shape)}")
        if Y.dim() < 2 or Y.shape[0] != X.shape[0]:
            raise ValueError(f"outputs must have shape (n, *out) with n = {X.shape[0]} rows, got {tuple(Y.shape)}")
        Y = Y.reshape(X.shape[0], -1)
        if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
            raise ValueError("inputs and outputs must be finite")
        return X, Y

    # ----------------------------------------------------------- kernel
    def _kernel(self, a: Tensor, b: Tensor, inv_sq_ell: Tensor) -> Tensor:
        return self.signal_variance * torch.exp(-0.5 * _sq_dists(a, b, inv_sq_ell))

    def _kernel_grad(self, z: Tensor, c: _Constants, second: bool = False) -> tuple[Tensor, ...]:
        """``k(z, X)`` ``(m, n)`` and its gradient in ``z``, ``dk[m, i, n] = d k(z_m, X_n) / d z_i``;
        with ``second``, also ``ddk[m, b, a, n] = d_b d_a k(z_m, X_n)``
        ``= (lambda_a lambda_b r_a r_b - delta_ab lambda_a) k`` (``r = z_m - X_n``, ``lambda = 1 / l^2``)."""
        k = self._kernel(z, c.inputs, c.inv_sq_ell)
        scaled = (z.unsqueeze(-2) - c.inputs) * c.inv_sq_ell  # lambda_a r_a, (m, n, d)
        dk = -scaled.transpose(-1, -2) * k.unsqueeze(-2)
        if not second:
            return k, dk
        ddk = torch.einsum("mnb,mna,mn->mban", scaled, scaled, k)
        ddk = ddk - torch.diag(c.inv_sq_ell)[None, :, :, None] * k[:, None, None, :]
        return k, dk, ddk

    @staticmethod
    def _kernel_third(z: Tensor, k: Tensor, c: _Constants, triples: Tensor) -> Tensor:
        """``d_c d_b d_a k(z_m, X_n)`` ``(m, T, n)`` for the index ``triples`` ``(T, 3)``:
        ``(delta_ac lambda_a u_b + delta_bc lambda_b u_a + delta_ab lambda_a u_c - u_a u_b u_c) k``
        with ``u = lambda (z_m - X_n)`` (symmetric in the three indices)."""
        u = ((z.unsqueeze(-2) - c.inputs) * c.inv_sq_ell).transpose(-1, -2)  # (m, d, n)
        ci, bi, ai = triples.unbind(-1)
        uc, ub, ua = u[:, ci], u[:, bi], u[:, ai]  # (m, T, n)
        lam = c.inv_sq_ell
        linear = ((ai == ci) * lam[ai])[:, None] * ub + ((bi == ci) * lam[bi])[:, None] * ua
        linear = linear + ((ai == bi) * lam[ai])[:, None] * uc
        return (linear - ua * ub * uc) * k[:, None, :]

    # ---------------------------------------------------------- posterior
    def _posterior_mean64(self, z: Tensor) -> Tensor:
        c = self._constants(z.device)
        return self._kernel(z, c.inputs, c.inv_sq_ell) @ c.alpha + c.output_mean

    def _embed(self, z: Tensor) -> Tensor:
        return self._posterior_mean64(z.to(_F64)).to(z.dtype)

    def posterior_mean_and_variance(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and variance of the noise-free function at ``z``.

        Parameters
        ----------
        z : Tensor, shape=[n, d]

        Returns
        -------
        mean : Tensor, shape=[n, D]
        variance : Tensor, shape=[n]
            The same for every output dimension (shared kernel).
        """
        z64 = z.to(_F64)
        c = self._constants(z.device)
        k = self._kernel(z64, c.inputs, c.inv_sq_ell)
        A = k @ c.chol_inv.T  # rows: L^{-1} k(X, z)
        variance = (self.signal_variance - A.pow(2).sum(-1)).clamp_min(0)
        return (k @ c.alpha + c.output_mean).to(z.dtype), variance.to(z.dtype)

    def posterior_covariance(self, z: Tensor) -> Tensor:
        """Joint posterior covariance of the noise-free function at the points ``z``.

        Parameters
        ----------
        z : Tensor, shape=[n, d]

        Returns
        -------
        cov : Tensor, shape=[n, n]
            Shared by every output dimension.
        """
        z64 = z.to(_F64)
        c = self._constants(z.device)
        A = self._kernel(z64, c.inputs, c.inv_sq_ell) @ c.chol_inv.T
        return (self._kernel(z64, z64, c.inv_sq_ell) - A @ A.T).to(z.dtype)

    def _jacobian_moments64(self, z: Tensor) -> tuple[Tensor, Tensor]:
        c = self._constants(z.device)
        _, dk = self._kernel_grad(z, c)  # (m, d, n)
        mean, _, cov_J = self._moments(dk, c)
        return mean.transpose(-1, -2), cov_J

    def _moments(self, dk: Tensor, c: _Constants) -> tuple[Tensor, Tensor, Tensor]:
        """``E[J]^T`` ``(m, d, D)``, ``B = dk L^{-T}`` ``(m, d, n)`` (rows ``L^{-1} dk(X, z)``)
        and ``Sigma_J = prior - B B^T`` ``(m, d, d)`` from the kernel gradient ``dk``."""
        B = dk @ c.chol_inv.T
        prior = self.signal_variance * torch.diag(c.inv_sq_ell)
        return dk @ c.alpha, B, prior - B @ B.transpose(-1, -2)

    def jacobian_mean_and_covariance(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Mean of the Jacobian and the covariance shared by its rows.

        Parameters
        ----------
        z : Tensor, shape=[n, d]

        Returns
        -------
        mean_J : Tensor, shape=[n, D, d]
            ``E[J]``, the Jacobian of the posterior mean.
        cov_J : Tensor, shape=[n, d, d]
            ``Sigma_J``: ``Cov(J[j, :]) = Sigma_J`` for every output ``j``,
            rows independent.
        """
        mean_J, cov_J = self._jacobian_moments64(z.to(_F64))
        return mean_J.to(z.dtype), cov_J.to(z.dtype)

    def metric(self, z: Tensor) -> Tensor:
        """Expected metric ``E[J]^T E[J] + D Sigma_J``.

        Parameters
        ----------
        z : Tensor, shape=[n, d]

        Returns
        -------
        G : Tensor, shape=[n, d, d]
        """
        mean_J, cov_J = self._jacobian_moments64(z.to(_F64))
        G = mean_J.transpose(-1, -2) @ mean_J + self.outputs.shape[1] * cov_J
        return G.to(z.dtype)

    def metric_and_derivatives(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The expected metric and its partial derivatives, in closed form.

        With ``r_i = z - x_i``, ``lambda = 1 / l^2`` and ``k_i = k(z, x_i)``:
        ``d_a k_i = -lambda_a r_ia k_i`` and
        ``d_b d_a k_i = (lambda_a lambda_b r_ia r_ib - delta_ab lambda_a) k_i``, so
        ``d_b E[J]`` and ``d_b Sigma_J = -(C_b B^T + B C_b^T)`` (``B = dk L^{-T}``,
        ``C_b = d_b dk L^{-T}``) come from the kernel's first and second derivatives,
        without differentiating :meth:`metric` by ``torch.func`` (several times slower).
        A subclass that redefines :meth:`metric` gets the JVPs of its own metric.

        Parameters
        ----------
        z : Tensor, shape=[n, d]

        Returns
        -------
        G : Tensor, shape=[n, d, d]
        dG : Tensor, shape=[d, n, d, d]
            ``dG[a] = dG / dz_a``.
        """
        if type(self).metric is not GaussianProcessDecoder.metric:
            return super().metric_and_derivatives(z)
        G, dG = self._metric_derivatives64(z.to(_F64), order=1)
        return G.to(z.dtype), dG.to(z.dtype)

    def metric_second_derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The expected metric with its first and second partial derivatives, in closed form.

        As :meth:`metric_and_derivatives`, one order higher: ``d_c d_b E[J]`` and
        ``d_c d_b Sigma_J = -(E_cb B^T + C_b C_c^T + C_c C_b^T + B E_cb^T)``
        (``E_cb = d_c d_b dk L^{-T}``) from the kernel's third derivatives, each made once
        per sorted index triple; measured 230 against 850 µs per point for JVPs of the first
        derivatives (300 inputs, ``d = 2``, one thread).
        A subclass that redefines :meth:`metric` or :meth:`metric_and_derivatives`
        gets the JVPs of its own.

        Parameters
        ----------
        z : Tensor, shape=[n, d]

        Returns
        -------
        G : Tensor, shape=[n, d, d]
        dG : Tensor, shape=[d, n, d, d]
            ``dG[a] = dG / dz_a``.
        ddG : Tensor, shape=[d, d, n, d, d]
            ``ddG[b, a] = d^2 G / dz_b dz_a``.
        """
        cls = GaussianProcessDecoder
        if type(self).metric is not cls.metric or type(self).metric_and_derivatives is not cls.metric_and_derivatives:
            return super().metric_second_derivatives(z)
        # Points per pass, by the numbers a point's intermediates take: about eight arrays of
        # (sorted triples) x n in the third derivatives and two of (pairs c <= b) x d x (n + D)
        # gathered from them (measured: 7.7 GB for 2048 points at once at d = 8, n = 300).
        n_inputs, n_outputs = self.outputs.shape
        d = z.shape[-1]
        triples, pairs = math.comb(d + 2, 3), d * (d + 1) // 2
        per_point = 8 * triples * n_inputs + 2 * pairs * d * (n_inputs + n_outputs) + d**4
        chunk = max(1, _SECOND_DERIVATIVE_NUMBERS // per_point)
        parts = [self._metric_derivatives64(part.to(_F64), order=2) for part in z.split(chunk)]
        G, dG, ddG = (torch.cat([part[i] for part in parts], dim) for i, dim in ((0, 0), (1, 1), (2, 2)))
        return G.to(z.dtype), dG.to(z.dtype), ddG.to(z.dtype)

    def _metric_derivatives64(self, z: Tensor, order: int) -> tuple[Tensor, ...]:
        """``G`` ``(m, d, d)``, ``dG`` ``(d, m, d, d)`` and, for ``order`` 2, ``ddG``
        ``(d, d, m, d, d)`` at float64 points ``z`` ``(m, d)``."""
        c = self._constants(z.device)
        k, dk, ddk = self._kernel_grad(z, c, second=True)  # dk (m, a, n), ddk (m, b, a, n)
        mean, B, cov_J = self._moments(dk, c)  # E[J]^T (m, a, D), (m, a, n), (m, d, d)
        # d_b d_a k is symmetric: its products with alpha and L^{-T} (n^2 per row), once per pair.
        d = z.shape[-1]
        cs, bs, pair_of, triples, gather = _symmetric_indices(d, z.device)
        unique = ddk[:, cs, bs]  # (m, P, n)
        d_mean = (unique @ c.alpha)[:, pair_of]  # (m, b, a, D)
        C = (unique @ c.chol_inv.T)[:, pair_of]  # (m, b, a, n)
        n_outputs = self.outputs.shape[1]
        G = mean @ mean.transpose(-1, -2) + n_outputs * cov_J
        mean_b, B_b = mean.unsqueeze(1), B.unsqueeze(1)
        dG = d_mean @ mean_b.transpose(-1, -2) + mean_b @ d_mean.transpose(-1, -2)
        dG = dG - n_outputs * (C @ B_b.transpose(-1, -2) + B_b @ C.transpose(-1, -2))
        if order == 1:
            return G, dG.permute(1, 0, 2, 3)
        # d_c d_b G is symmetric in (c, b), and d_c d_b d_a k in all three indices: the kernel's
        # third derivatives and their products with L^{-T} and alpha (the costly part, n^2 per
        # row) are made once per sorted triple, then gathered for the pairs c <= b and every a.
        dddk = self._kernel_third(z, k, c, triples)  # (m, T, n)
        dd_mean = (dddk @ c.alpha)[:, gather]  # (m, P, a, D)
        E = (dddk @ c.chol_inv.T)[:, gather]  # (m, P, a, n)
        mean_p, B_p = mean.unsqueeze(1), B.unsqueeze(1)
        d_mean_b, d_mean_c, C_b, C_c = d_mean[:, bs], d_mean[:, cs], C[:, bs], C[:, cs]
        upper = dd_mean @ mean_p.transpose(-1, -2) + mean_p @ dd_mean.transpose(-1, -2)
        upper = upper + d_mean_b @ d_mean_c.transpose(-1, -2) + d_mean_c @ d_mean_b.transpose(-1, -2)
        upper = upper - n_outputs * (
            E @ B_p.transpose(-1, -2)
            + B_p @ E.transpose(-1, -2)
            + C_b @ C_c.transpose(-1, -2)
            + C_c @ C_b.transpose(-1, -2)
        )  # (m, P, d, d)
        ddG = upper.new_empty(d, d, *G.shape)
        ddG[cs, bs] = upper.transpose(0, 1)
        ddG[bs, cs] = upper.transpose(0, 1)
        return G, dG.permute(1, 0, 2, 3), ddG

    # ------------------------------------------------------------ fitting
    def log_marginal_likelihood(self) -> float:
        """Log marginal likelihood of the outputs (all ``D`` dimensions) at these hyperparameters."""
        n, D = self.outputs.shape
        fit = ((self.outputs - self.output_mean) * self._alpha).sum()
        logdet = 2 * self._chol.diagonal().log().sum()
        return float(-0.5 * fit - 0.5 * D * logdet - 0.5 * n * D * math.log(2 * math.pi))

    @classmethod
    def fit(
        cls,
        inputs: Tensor,
        outputs: Tensor,
        *,
        ard: bool = False,
        n_steps: int = 300,
        lr: float = 0.05,
        min_noise_variance: float = 1e-6,
        jitter: float = 1e-10,
    ) -> GaussianProcessDecoder:
        """A decoder whose hyperparameters maximize the log marginal likelihood.

        Adam on the log-hyperparameters, started from the median pairwise
        input distance (length scale), the output variance (signal) and a
        tenth of it (noise). Deterministic (no randomness involved).

        Parameters
        ----------
        inputs : Tensor, shape=[n, d]
        outputs : Tensor, shape=[n, *out]
        ard : bool
            One length scale per latent dimension.
        n_steps : int
            Adam steps.
        lr : float
            Adam learning rate on the log-hyperparameters.
        min_noise_variance : float
            Lower bound of the noise variance (keeps ``K`` well conditioned).
        jitter : float

        Returns
        -------
        decoder : GaussianProcessDecoder
        """
        X, Y = cls._check_data(inputs, outputs)
        n, d = X.shape
        D = Y.shape[1]
        Yc = Y - Y.mean(0)
        pairwise = torch.pdist(X)
        ell0 = float(pairwise.median()) if pairwise.numel() else 1.0
        var0 = float(Yc.pow(2).mean().clamp_min(1e-12))
        log_ell0 = math.log(max(ell0, 1e-6))
        log_ell = torch.full((d if ard else 1,), log_ell0, dtype=_F64, device=X.device, requires_grad=True)
        log_s2 = torch.tensor(math.log(var0), dtype=_F64, device=X.device, requires_grad=True)
        log_noise0 = math.log(max(0.1 * var0, 2 * min_noise_variance))
        log_noise = torch.tensor(log_noise0, dtype=_F64, device=X.device, requires_grad=True)
        optimizer = torch.optim.Adam([log_ell, log_s2, log_noise], lr=lr)
        eye = torch.eye(n, dtype=_F64, device=X.device)

        def negative_lml() -> Tensor:
            s2 = log_s2.exp()
            noise = min_noise_variance + log_noise.exp()
            K = s2 * torch.exp(-0.5 * _sq_dists(X, X, (-2 * log_ell).exp().expand(d))) + (noise + jitter * s2) * eye
            L = torch.linalg.cholesky(K)
            alpha = torch.cholesky_solve(Yc, L)
            return 0.5 * (Yc * alpha).sum() + D * L.diagonal().log().sum()

        with torch.enable_grad():
            for _ in range(n_steps):
                optimizer.zero_grad()
                negative_lml().backward()
                optimizer.step()
        return cls(
            X,
            Y,
            lengthscale=log_ell.detach().exp(),
            signal_variance=float(log_s2.detach().exp()),
            noise_variance=min_noise_variance + float(log_noise.detach().exp()),
            jitter=jitter,
        )

    def __repr__(self) -> str:
        n, D = self.outputs.shape
        return (
            f"GaussianProcessDecoder(n={n}, d={self.inputs.shape[1]}, D={D}, lengthscale={self.lengthscale.tolist()}, "
            f"signal_variance={self.signal_variance:.4g}, noise_variance={self.noise_variance:.4g})"
        )
