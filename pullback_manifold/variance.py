r"""A decoder variance that grows away from the data: the RBF precision network.

"Latent Space Oddity" (Arvanitidis, Hansen, Hauberg, ICLR 2018) models the
decoder's precision (inverse variance) in every output dimension ``j`` as a
radial-basis-function network plus a floor,

.. math::

    \beta_j(z) = \sum_{k=1}^K w_{kj} \exp(-\lambda_k \|z - c_k\|^2) + \zeta,
    \qquad \sigma_j(z) = \beta_j(z)^{-1/2},

with non-negative weights ``w``. Near the training codes the RBF terms make the
precision large (``sigma`` small, of the size of the decoder's residuals); far
from every centre they vanish and ``sigma -> zeta^{-1/2}``. Used as the ``std``
of a :class:`~pullback_manifold.GaussianDecoder`, the expected metric
``J_mu^T J_mu + J_sigma^T J_sigma`` becomes large where ``sigma`` changes, so
geodesics avoid the regions without data.

A user with a trained VAE adds it in a few lines::

    std = fit_rbf_precision(codes, data, mean_decoder)
    space = PullbackManifold(GaussianDecoder(mean_decoder, std), dim=2)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .jets import Jet

__all__ = ["RBFPrecision", "fit_rbf_precision"]


class RBFPrecision(nn.Module):
    r"""Standard deviation ``sigma(z) = beta(z)^{-1/2}`` from an RBF precision network.

    :math:`\beta_j(z) = \sum_k w_{kj} \exp(-\lambda_k \|z - c_k\|^2) + \zeta`.
    Smooth in ``z`` (forward- and reverse-mode differentiable), so it can be
    the ``std`` of a :class:`~pullback_manifold.GaussianDecoder`. The centres,
    bandwidths and weights are buffers (fitted, not trained): the module
    follows ``.to(dtype)`` and is cast automatically by the geometry.

    Parameters
    ----------
    centers : Tensor, shape=[K, d]
        RBF centres ``c_k``.
    bandwidths : Tensor, shape=[K]
        Inverse squared length scales ``lambda_k > 0``.
    weights : Tensor, shape=[K, D]
        Non-negative weights ``w_kj``.
    zeta : float
        Precision floor ``> 0``; ``sigma`` tends to ``zeta^{-1/2}`` far from all centres.

    Examples
    --------
    >>> import torch
    >>> std = RBFPrecision(torch.zeros(1, 2), torch.ones(1), torch.full((1, 3), 99.0), zeta=1.0)
    >>> std(torch.zeros(1, 2))  # beta = 99 + 1
    tensor([[0.1000, 0.1000, 0.1000]])
    """

    def __init__(self, centers: Tensor, bandwidths: Tensor, weights: Tensor, zeta: float):
        super().__init__()
        centers, bandwidths, weights = (torch.as_tensor(t) for t in (centers, bandwidths, weights))
        if centers.dim() != 2:
            raise ValueError(f"centers must have shape (K, d), got {tuple(centers.shape)}")
        n_centers = centers.shape[0]
        if bandwidths.shape != (n_centers,):
            raise ValueError(f"bandwidths must have shape ({n_centers},) (one per centre), got {tuple(bandwidths.shape)}")
        if weights.dim() != 2 or weights.shape[0] != n_centers:
            raise ValueError(f"weights must have shape ({n_centers}, D), got {tuple(weights.shape)}")
        if not bool((bandwidths > 0).all()) or not bool(torch.isfinite(bandwidths).all()):
            raise ValueError("bandwidths must be finite and > 0")
        if not bool((weights >= 0).all()) or not bool(torch.isfinite(weights).all()):
            raise ValueError("weights must be finite and >= 0 (a negative weight can make the precision negative)")
        if not zeta > 0:
            raise ValueError(f"zeta must be > 0 (it bounds sigma by zeta**-0.5), got {zeta}")
        dtype = torch.promote_types(torch.promote_types(centers.dtype, bandwidths.dtype), weights.dtype)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        self.register_buffer("centers", centers.to(dtype))
        self.register_buffer("bandwidths", bandwidths.to(dtype))
        self.register_buffer("weights", weights.to(dtype))
        self.zeta = float(zeta)

    @property
    def max_std(self) -> float:
        """``zeta^{-1/2}``, the standard deviation far from every centre."""
        return self.zeta**-0.5

    def rbf_features(self, z: Tensor) -> Tensor:
        """RBF activations ``exp(-lambda_k ||z - c_k||^2)``.

        Parameters
        ----------
        z : Tensor, shape=[..., d]

        Returns
        -------
        phi : Tensor, shape=[..., K]
        """
        # Explicit squared differences (not torch.cdist): smooth at z = c_k, and
        # forward-mode AD / vmap run through it.
        sq = (z.unsqueeze(-2) - self.centers).pow(2).sum(-1)
        return torch.exp(-self.bandwidths * sq)

    def precision(self, z: Tensor) -> Tensor:
        """Precision ``beta(z)``.

        Parameters
        ----------
        z : Tensor, shape=[..., d]

        Returns
        -------
        beta : Tensor, shape=[..., D]
        """
        return self.rbf_features(z) @ self.weights + self.zeta

    def forward(self, z: Tensor) -> Tensor:
        """Standard deviation ``sigma(z) = beta(z)^{-1/2}``.

        Parameters
        ----------
        z : Tensor, shape=[..., d]

        Returns
        -------
        sigma : Tensor, shape=[..., D]
        """
        return torch.rsqrt(self.precision(z))

    def jet_rule(self, jet: Jet, state: dict[str, Tensor]) -> Jet:
        """Closed-form Taylor-mode derivatives (see :mod:`~pullback_manifold.jets`).

        With ``q_k = ||z - c_k||^2``: ``dq[t] = 2 (z - c_k) . t``,
        ``d^2 q[t, u] = 2 t . u``; then ``phi = exp(-lambda q)``, ``beta = phi W + zeta``
        (linear) and ``sigma = beta^{-1/2}`` (elementwise).
        """
        centers, bandwidths, weights = state["centers"], state["bandwidths"], state["weights"]
        z, first = jet.value, jet.first
        offset = z.unsqueeze(-2) - centers  # (n, K, d)
        phi = torch.exp(-bandwidths * offset.pow(2).sum(-1))  # (n, K)
        dq = 2 * torch.einsum("nkd,jnd->jnk", offset, first)  # (k, n, K)
        first_phi = -bandwidths * phi * dq
        second = None
        if jet.second is not None:
            a, b = jet.pair
            d2q = 2 * (first[a] * first[b]).sum(-1, keepdim=True)
            d2q = d2q + 2 * torch.einsum("nkd,...nd->...nk", offset, jet.second)
            second_phi = phi * (bandwidths.pow(2) * dq[a] * dq[b] - bandwidths * d2q)
        beta = phi @ weights + self.zeta
        sigma = torch.rsqrt(beta)
        s1 = -0.5 * sigma / beta  # d beta^{-1/2} / d beta
        first_beta = first_phi @ weights
        if jet.second is not None:
            second_beta = second_phi @ weights
            second = s1 * second_beta + (-1.5 * s1 / beta) * first_beta[a] * first_beta[b]
        return jet.replace(sigma, s1 * first_beta, second)


def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def _fit_weights(phi: np.ndarray, sq_residuals: np.ndarray, zeta: float, max_iter: int) -> np.ndarray:
    r"""Maximum-likelihood non-negative weights: the residuals as draws of ``N(0, 1/beta)``.

    Minimizes the mean negative log-likelihood
    :math:`\frac1{nD}\sum_{i,j} \tfrac12(\beta_{ij} r_{ij}^2 - \log\beta_{ij})`, with
    :math:`\beta = \Phi W + \zeta`. It is convex in ``W`` (``-log`` of an affine map
    plus a linear term), so L-BFGS-B with the bound ``W >= 0`` finds the global
    optimum; the ``D`` columns are independent problems solved jointly.
    """
    from scipy.optimize import minimize

    n, n_centers = phi.shape
    n_out = sq_residuals.shape[1]
    scale = 1.0 / (n * n_out)

    def objective(flat):
        W = flat.reshape(n_centers, n_out)
        beta = phi @ W + zeta
        value = 0.5 * scale * (beta * sq_residuals - np.log(beta)).sum()
        grad = 0.5 * scale * phi.T @ (sq_residuals - 1.0 / beta)
        return value, grad.ravel()

    # Start at the precision of each output's mean squared residual, spread over the centres.
    start = np.maximum(1.0 / sq_residuals.mean(0) - zeta, 0.0) / max(phi.sum(1).mean(), 1e-12)
    W0 = np.tile(start, (n_centers, 1))
    result = minimize(
        objective,
        W0.ravel(),
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, None)] * W0.size,
        options={"maxiter": max_iter, "ftol": 1e-12, "gtol": 1e-9},
    )
    return np.maximum(result.x.reshape(n_centers, n_out), 0.0)


def fit_rbf_precision(
    latent_codes: Tensor,
    data: Tensor | None = None,
    mean_decoder: Callable[[Tensor], Tensor] | None = None,
    *,
    residuals: Tensor | None = None,
    n_centers: int = 64,
    zeta: float = 1e-2,
    curvature: float = 1.0,
    min_std: float = 1e-2,
    seed: int = 0,
    max_iter: int = 500,
) -> RBFPrecision:
    r"""Fit an :class:`RBFPrecision` to a trained decoder's residuals.

    Three steps, as in "Latent Space Oddity":

    1. centres ``c_k``: k-means (scikit-learn, seeded) on the training latent codes;
    2. bandwidths ``lambda_k = 0.5 * (a * s_k)^{-2}``, ``s_k`` the mean distance of
       cluster ``k``'s members to its centre and ``a = curvature``. Larger ``a``
       gives wider RBFs: ``sigma`` rises more slowly away from the data and the
       metric is less curved. Clusters of one point (``s_k = 0``) get the median
       ``s`` of the others;
    3. weights ``W >= 0``: maximum likelihood of the squared residuals
       ``r^2 = (x - mu(z))^2 + min_std^2`` under ``N(0, 1/beta(z))`` per output
       dimension, a convex problem solved by L-BFGS-B with the bound ``W >= 0``
       (scipy). This is the reconstruction term of the VAE's ELBO with the mean
       fixed, the paper's second training stage, at the encoder means. ``min_std``
       keeps outputs that the decoder reproduces exactly (e.g. constant pixels)
       from getting an unbounded precision.

    Parameters
    ----------
    latent_codes : Tensor, shape=[n, d]
        Training latent codes (e.g. the encoder means).
    data : Tensor, shape=[n, *out], optional
        Training data; with ``mean_decoder``, gives the residuals ``data - mean_decoder(codes)``.
    mean_decoder : callable or nn.Module, optional
        ``(n, d) -> (n, *out)``, the decoder mean. Evaluated without gradients.
    residuals : Tensor, shape=[n, *out], optional
        The residuals directly, instead of ``data`` and ``mean_decoder``.
    n_centers : int
        Number of RBF centres ``K`` (at most ``n``).
    zeta : float
        Precision floor; far from the data ``sigma -> zeta^{-1/2}``. Choose it
        from the data's scale: the default ``1e-2`` gives ``sigma = 10`` far out,
        for data of order one.
    curvature : float
        The factor ``a`` of the bandwidths.
    min_std : float
        Standard-deviation floor added in quadrature to the residuals.
    seed : int
        Seed of k-means.
    max_iter : int
        L-BFGS-B iterations of the weight fit.

    Returns
    -------
    std : RBFPrecision
        In the dtype of ``latent_codes`` (float32 unless they are float64).

    Examples
    --------
    >>> std = fit_rbf_precision(codes, data, model.decoder)  # doctest: +SKIP
    >>> space = PullbackManifold(GaussianDecoder(model.decoder, std), dim=2)  # doctest: +SKIP
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError as err:  # pragma: no cover - scikit-learn is an optional dependency
        raise ImportError(
            "fit_rbf_precision needs scikit-learn for k-means: pip install scikit-learn "
            "(or pip install 'pullback-manifold[examples]')"
        ) from err

    codes_t = torch.as_tensor(latent_codes)
    if codes_t.dim() != 2:
        raise ValueError(f"latent_codes must have shape (n, d), got {tuple(codes_t.shape)}")
    n = codes_t.shape[0]
    if residuals is None:
        if data is None or mean_decoder is None:
            raise ValueError("pass either residuals=..., or both data and mean_decoder (residuals = data - mean)")
        with torch.no_grad():
            data_t = torch.as_tensor(data)
            if data_t.dim() == 0 or data_t.shape[0] != n:
                raise ValueError(f"data has shape {tuple(data_t.shape)}: expected {n} rows, one per latent code")
            mean = mean_decoder(codes_t.to(_decoder_dtype(mean_decoder, codes_t)))
            residuals = data_t.reshape(n, -1).to(torch.float64) - mean.reshape(n, -1).to(torch.float64)
    elif data is not None or mean_decoder is not None:
        raise ValueError("pass residuals=... or (data, mean_decoder), not both")
    codes = _as_numpy(codes_t, "latent_codes")
    res = _as_numpy(residuals, "residuals")
    # Rows first: a reshape to (n, -1) would accept twice the rows as twice the outputs.
    if res.ndim == 0 or res.shape[0] != n:
        raise ValueError(f"residuals/data have shape {res.shape}: expected {n} rows, one per latent code")
    res = res.reshape(n, -1)
    if not 1 <= n_centers <= n:
        raise ValueError(f"n_centers must be in [1, n={n}], got {n_centers}")
    if not curvature > 0 or not min_std >= 0 or not zeta > 0:
        raise ValueError(f"need curvature > 0, min_std >= 0, zeta > 0; got {curvature}, {min_std}, {zeta}")

    kmeans = KMeans(n_clusters=n_centers, n_init=4, random_state=seed).fit(codes)
    centers = kmeans.cluster_centers_
    labels = kmeans.labels_
    spread = np.array(
        [np.linalg.norm(codes[labels == k] - centers[k], axis=1).mean() if (labels == k).any() else 0.0 for k in range(n_centers)]
    )
    if (spread > 0).any():
        spread[spread <= 0] = np.median(spread[spread > 0])
    else:  # every code its own cluster (n_centers == n distinct points): use the mean nearest-centre gap
        gaps = np.linalg.norm(centers[:, None] - centers[None], axis=-1) + np.diag(np.full(n_centers, np.inf))
        spread[:] = gaps.min(1).mean() if n_centers > 1 else 1.0
    bandwidths = 0.5 * (curvature * spread) ** -2.0

    phi = np.exp(-bandwidths * ((codes[:, None, :] - centers[None]) ** 2).sum(-1))
    weights = _fit_weights(phi, res**2 + min_std**2, zeta, max_iter)
    dtype = codes_t.dtype if codes_t.is_floating_point() else torch.get_default_dtype()
    return RBFPrecision(
        torch.as_tensor(centers, dtype=dtype),
        torch.as_tensor(bandwidths, dtype=dtype),
        torch.as_tensor(weights, dtype=dtype),
        zeta,
    )


def _decoder_dtype(decoder, codes: Tensor) -> torch.dtype:
    """The dtype to call ``decoder`` with: its parameters' dtype for a module, else the codes'."""
    if isinstance(decoder, nn.Module):
        for p in decoder.parameters():
            return p.dtype
    return codes.dtype
