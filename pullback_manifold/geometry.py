r"""Pull-back geometry of a map ``embed: (n, d) -> (n, D)``, by forward-mode autodiff.

All functions take a batch of latent points ``z`` of shape ``(n, d)`` and are
vectorized over it: the map is always called on the whole batch, so any decoder
that accepts a batch works, whatever it does inside. Derivatives come from one
second-order Taylor-mode pass (:mod:`~pullback_manifold.jets`): closed-form
layer rules where the decoder is built of known layers, ``torch.func``
otherwise.

With ``J = d embed / d z`` (``(n, D, d)``):

* metric ``G = J^T J + eps I`` (``eps`` is the opt-in regularizer, default 0);
* geodesic acceleration, without Christoffel symbols,
  :math:`\ddot z = -G^{-1} J^T \, d^2 f(z)[\dot z, \dot z]`, where the second
  derivative is one nested JVP;
* Christoffel symbols by the Koszul formula from ``dG`` (autodiff of ``G``),
  used for geomstats' tensor API and as an independent check of the above.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp, vmap

from .decoders import Decoder, MetricDecoder, _concatenate, _flatten_jet, casts_to_input
from .jets import Jet, propagate, stacked_gram
from .jets import coordinate_basis as _basis

# A map whose pull-back is the metric, or a MetricDecoder giving the metric directly.
Embedding = Callable[[Tensor], Tensor] | MetricDecoder

__all__ = [
    "embedding_jet",
    "embedding_gram",
    "jacobian",
    "metric_matrix",
    "metric_derivative",
    "christoffels",
    "second_derivative",
    "geodesic_acceleration",
    "connection",
    "curve_length",
    "curve_energy",
]


def _directional_derivatives(fn: Callable[[Tensor], Tensor], z: Tensor, tangents: Tensor) -> Tensor:
    """``[d fn(z)[t_k] for k]`` stacked on a new leading axis; ``tangents`` is ``(k, n, d)``."""
    return vmap(lambda t: jvp(fn, (z,), (t,))[1])(tangents)


def _latent_jet(z: Tensor, directions: Tensor, pair) -> Jet:
    """The identity's jet at ``z``: a straight line has no second derivative."""
    if pair is None:
        return Jet(z, directions)
    many = isinstance(pair[0], Tensor)
    return Jet(z, directions, z.new_zeros(len(pair[0]), *z.shape) if many else torch.zeros_like(z), pair)


def embedding_jet(embed: Embedding, z: Tensor, directions: Tensor, pair=None) -> Jet:
    """Value ``(n, D)``, derivatives along ``directions`` ``(k, n, d)`` -> ``(k, n, D)``, and, if
    ``pair = (a, b)``, the second derivative ``d^2 f[directions[a], directions[b]]`` ``(n, D)``
    (``(P, n, D)`` when ``a`` and ``b`` are index tensors of shape ``(P,)``)."""
    return propagate(embed, _latent_jet(z, directions, pair))


def embedding_gram(embed: Embedding, z: Tensor, directions: Tensor, pair: tuple[int, int] | None = None) -> Tensor:
    """Inner products ``(n, m, m)`` of the derivatives in :func:`embedding_jet`, stacked
    ``[df[t_1], ..., df[t_k], d^2 f[t_a, t_b]]`` (``m = k + 1``, or ``k`` without ``pair``)."""
    jet = _latent_jet(z, directions, pair)
    gram = getattr(embed, "gram", None)
    return gram(jet) if callable(gram) else stacked_gram(propagate(embed, jet))


class _RegularizedEmbedding:
    """``z -> [f(z), sqrt(eps) z]``: its pull-back metric is ``J^T J + eps I``, so the
    energy method solves for the same regularized metric as the geodesic ODE."""

    def __init__(self, embed: Embedding, eps: float):
        self.embed, self.scale = embed, eps**0.5

    def _casts_to_input(self) -> bool:
        return casts_to_input(self.embed)

    def __call__(self, z: Tensor) -> Tensor:
        out = self.embed(z)
        return torch.cat([out.reshape(len(z), math.prod(out.shape[1:])), self.scale * z], dim=-1)

    def jet(self, jet: Jet) -> Jet:
        out = _flatten_jet(propagate(self.embed, jet), jet.value, "decoder")
        second = None if jet.second is None else self.scale * jet.second
        return _concatenate([out, jet.replace(self.scale * jet.value, self.scale * jet.first, second)], 1.0)


class _RegularizedMetric(MetricDecoder):
    def __init__(self, decoder: MetricDecoder, eps: float):
        self.decoder, self.eps = decoder, eps

    def _functions(self):
        return self.decoder._functions()

    def _embed(self, z: Tensor) -> Tensor:
        return self.decoder.embed(z)

    def metric(self, z: Tensor) -> Tensor:
        return self.decoder.metric(z) + self.eps * torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)

    def metric_and_derivatives(self, z: Tensor) -> tuple[Tensor, Tensor]:
        G, dG = self.decoder.metric_and_derivatives(z)  # the constant eps I has no derivative
        return G + self.eps * torch.eye(z.shape[-1], dtype=z.dtype, device=z.device), dG

    def metric_second_derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        G, dG, ddG = self.decoder.metric_second_derivatives(z)  # the decoder's closed form, if it has one
        return G + self.eps * torch.eye(z.shape[-1], dtype=z.dtype, device=z.device), dG, ddG


def regularized(embed: Embedding, eps: float) -> Embedding:
    """An embedding whose metric is that of ``embed`` plus ``eps I`` (``embed`` itself if ``eps == 0``)."""
    if eps == 0:
        return embed
    if isinstance(embed, MetricDecoder):
        return _RegularizedMetric(embed, eps)
    return _RegularizedEmbedding(embed, eps)


def energy_embedding(embed: Embedding, eps: float) -> Embedding:
    """The map whose polygons the energy method minimizes: ``embed`` with its widening output
    layers compacted (:meth:`~pullback_manifold.Decoder.compact`: the same chord lengths
    for a fraction of the cost), regularized by ``eps I`` (:func:`regularized`)."""
    return regularized(embed.compact() if isinstance(embed, Decoder) else embed, eps)


def jacobian(embed: Embedding, z: Tensor) -> Tensor:
    """Jacobian of the embedding.

    Parameters
    ----------
    embed : callable, ``(n, d) -> (n, D)``
    z : Tensor, shape=[n, d]

    Returns
    -------
    J : Tensor, shape=[n, D, d]
    """
    if isinstance(embed, MetricDecoder):
        raise TypeError(f"{type(embed).__name__} gives its metric directly and has no single Jacobian")
    return embedding_jet(embed, z, _basis(z)).first.permute(1, 2, 0)


def _regularize(G: Tensor, regularization: float) -> Tensor:
    if regularization:
        G = G + regularization * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return G


def metric_matrix(embed: Embedding, z: Tensor, regularization: float = 0.0) -> Tensor:
    """Pull-back metric ``G = J^T J + regularization * I``.

    Parameters
    ----------
    embed : callable, ``(n, d) -> (n, D)``
    z : Tensor, shape=[n, d]
    regularization : float
        ``eps >= 0`` added to the diagonal.

    Returns
    -------
    G : Tensor, shape=[n, d, d]
    """
    if isinstance(embed, MetricDecoder):
        return _regularize(embed.metric(z), regularization)
    return _regularize(embedding_gram(embed, z, _basis(z)), regularization)


def metric_derivative(embed: Embedding, z: Tensor) -> Tensor:
    """Derivative of the metric, ``dG[..., i, j, k] = d_k G_ij`` (derivation index last).

    Computed by forward-mode autodiff of :func:`metric_matrix` (the
    regularizer is constant and drops out); for a metric given directly, by
    :meth:`~pullback_manifold.decoders.MetricDecoder.metric_and_derivatives`.

    Parameters
    ----------
    embed : callable, ``(n, d) -> (n, D)``
    z : Tensor, shape=[n, d]

    Returns
    -------
    dG : Tensor, shape=[n, d, d, d]
    """
    if isinstance(embed, MetricDecoder):
        return embed.metric_and_derivatives(z)[1].permute(1, 2, 3, 0)
    dG = _directional_derivatives(lambda x: metric_matrix(embed, x), z, _basis(z))
    return dG.permute(1, 2, 3, 0)


def _solve_spd(G: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``G x = rhs`` for a batch of SPD ``G`` (``rhs`` is ``(n, d)`` or ``(n, d, k)``).

    Rows where ``G`` is not numerically positive definite come back as NaN,
    so the caller can flag them instead of propagating garbage.
    """
    L, info = torch.linalg.cholesky_ex(G)
    vector = rhs.dim() == G.dim() - 1
    x = torch.cholesky_solve(rhs.unsqueeze(-1) if vector else rhs, L)
    x = x.squeeze(-1) if vector else x
    # A rank-deficient G can still factor by rounding (a pivot ~ sqrt(eps)): the solve
    # is then meaningless. (min/max pivot)^2 estimates 1/cond(G); below 10 eps the
    # solution has less than one correct digit.
    pivots = L.diagonal(dim1=-2, dim2=-1).abs()
    ratio = (pivots.amin(-1) / pivots.amax(-1).clamp_min(torch.finfo(G.dtype).tiny)) ** 2
    singular = (info != 0) | ~(ratio > 10 * torch.finfo(G.dtype).eps)
    bad = singular.reshape(info.shape + (1,) * (x.dim() - info.dim()))
    return torch.where(bad, torch.full_like(x, float("nan")), x)


def christoffels(embed: Embedding, z: Tensor, regularization: float = 0.0) -> Tensor:
    r"""Christoffel symbols of the Levi-Civita connection of ``G``.

    :math:`\Gamma^k_{ij} = \tfrac12 G^{kl}(\partial_i G_{lj} + \partial_j G_{li} - \partial_l G_{ij})`,
    contravariant index first (geomstats' convention).

    Parameters
    ----------
    embed : callable, ``(n, d) -> (n, D)``
    z : Tensor, shape=[n, d]
    regularization : float

    Returns
    -------
    gamma : Tensor, shape=[n, d, d, d]
        ``gamma[..., k, i, j]`` is :math:`\Gamma^k_{ij}`.
    """
    G = metric_matrix(embed, z, regularization)
    dG = metric_derivative(embed, z)  # dG[n, a, b, c] = d_c G_ab
    # first kind: Gamma_{l,ij} = 1/2 (d_i G_lj + d_j G_li - d_l G_ij)
    first_kind = 0.5 * (dG.permute(0, 1, 3, 2) + dG - dG.permute(0, 3, 1, 2))
    n, d = z.shape
    gamma = _solve_spd(G, first_kind.reshape(n, d, d * d))
    return gamma.reshape(n, d, d, d)


def second_derivative(embed: Embedding, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """First and second directional derivatives ``(df[v], d^2 f[v, v])`` by nested JVP.

    Parameters
    ----------
    embed : callable, ``(n, d) -> (n, D)``
    z, v : Tensor, shape=[n, d]

    Returns
    -------
    first, second : Tensor, shape=[n, D]
    """
    jet = embedding_jet(embed, z, v[None], pair=(0, 0))
    return jet.first[0], jet.second


def geodesic_acceleration(embed: Embedding, z: Tensor, v: Tensor, regularization: float = 0.0) -> Tensor:
    r"""Right-hand side of the geodesic equation, :math:`-G^{-1} J^T d^2 f[v, v]`.

    Equal to :math:`-\Gamma^k_{ij} v^i v^j` at a cost of ``d + 2`` decoder
    JVPs instead of the ``O(d^2)`` of the Christoffel symbols.

    Parameters
    ----------
    embed : callable, ``(n, d) -> (n, D)``
    z, v : Tensor, shape=[n, d]
        Positions and velocities.
    regularization : float

    Returns
    -------
    acceleration : Tensor, shape=[n, d]
        NaN in rows where ``G`` is not positive definite.
    """
    if isinstance(embed, MetricDecoder):
        return _metric_field_acceleration(embed, z, v, regularization)
    d = z.shape[-1]
    # One Taylor-mode pass: G = <df[e_i], df[e_j]> and J^T d2f[v, v] = <df[e_i], d2f[v, v]>.
    gram = embedding_gram(embed, z, torch.cat([_basis(z), v[None]], dim=0), pair=(d, d))
    G = _regularize(gram[:, :d, :d], regularization)
    return -_solve_spd(G, gram[:, :d, d + 1])


def connection(embed: Embedding, z: Tensor, v: Tensor, w: Tensor, regularization: float = 0.0) -> Tensor:
    r"""The Christoffel contraction :math:`\Gamma(v, w)^k = \Gamma^k_{ij} v^i w^j`, without Christoffel symbols.

    For a pull-back, :math:`\Gamma(v, w) = G^{-1} J^T d^2 f[v, w]` (one nested JVP
    and ``d`` JVPs); for a metric given directly, the Koszul formula
    :math:`\Gamma(v, w) = \tfrac12 G^{-1}(dG[v] w + dG[w] v - \nabla_z (v^T G w))`.
    A parallel field along a curve with velocity ``v`` obeys :math:`\dot w = -\Gamma(v, w)`.

    Parameters
    ----------
    embed : callable ``(n, d) -> (n, D)``, or a MetricDecoder
    z, v, w : Tensor, shape=[n, d]
    regularization : float

    Returns
    -------
    gamma_vw : Tensor, shape=[n, d]
        NaN in rows where ``G`` is not positive definite.
    """
    d = z.shape[-1]
    if isinstance(embed, MetricDecoder):
        return _metric_field_connection(embed, z, v, w, regularization)
    gram = embedding_gram(embed, z, torch.cat([_basis(z), v[None], w[None]], dim=0), pair=(d, d + 1))
    G = _regularize(gram[:, :d, :d], regularization)
    return _solve_spd(G, gram[:, :d, d + 2])


def _metric_field_connection(field: MetricDecoder, z: Tensor, v: Tensor, w: Tensor, regularization: float) -> Tensor:
    r"""``Gamma(v, w) = 1/2 G^{-1} (dG[v] w + dG[w] v - grad_z (v^T G w))`` (Koszul) from the
    partial derivatives of ``G`` (:meth:`~pullback_manifold.decoders.MetricDecoder.metric_and_derivatives`)."""
    G, dGs = field.metric_and_derivatives(z)  # (n, d, d), (d, n, d, d)
    gradient = torch.einsum("ni,knij,nj->nk", v, dGs, w)  # d_k (v^T G w)
    dG_v_w = torch.einsum("kn,knij,nj->ni", v.T, dGs, w)  # dG[v] w, dG[v] = sum_k v_k dG[k]
    dG_w_v = dG_v_w if w is v else torch.einsum("kn,knij,nj->ni", w.T, dGs, v)  # dG[w] v (the geodesic equation: v = w)
    return _solve_spd(_regularize(G, regularization), 0.5 * (dG_v_w + dG_w_v - gradient))


def _metric_field_acceleration(field: MetricDecoder, z: Tensor, v: Tensor, regularization: float) -> Tensor:
    r"""``-Gamma(v, v)``: the geodesic equation of a metric given directly."""
    return -_metric_field_connection(field, z, v, v, regularization)


def _squared_speeds(embed: Embedding, curve: Tensor) -> Tensor:
    """``|f(c_{i+1}) - f(c_i)|^2`` per segment, or ``dc^T G(midpoint) dc`` for a metric field."""
    if isinstance(embed, MetricDecoder):
        return midpoint_speeds(embed, curve)[0]
    return _decoded_increments(embed, curve).pow(2).sum(-1)


def midpoint_speeds(embed: MetricDecoder, curve: Tensor) -> tuple[Tensor, Tensor]:
    """``dc^T G(midpoint) dc`` per segment ``(..., N)``, and ``G`` at the midpoints ``(..., N, d, d)``."""
    *batch, n_nodes, d = curve.shape
    steps = curve[..., 1:, :] - curve[..., :-1, :]
    midpoints = (0.5 * (curve[..., 1:, :] + curve[..., :-1, :])).reshape(-1, d)
    G = embed.metric(midpoints).reshape(*batch, n_nodes - 1, d, d)
    return torch.einsum("...i,...ij,...j->...", steps, G, steps), G


def _decoded_increments(embed: Embedding, curve: Tensor) -> Tensor:
    *batch, n_nodes, d = curve.shape
    out = embed(curve.reshape(-1, d))
    decoded = out.reshape(*batch, n_nodes, math.prod(out.shape[1:]))  # not -1: an empty batch has no size to infer
    return decoded[..., 1:, :] - decoded[..., :-1, :]


def curve_length(embed: Embedding, curve: Tensor) -> Tensor:
    """Length of the decoded polygon ``embed(c_0), ..., embed(c_{n-1})``.

    Converges to the Riemannian length of the latent curve as it is refined.
    For a :class:`~pullback_manifold.decoders.MetricDecoder`, the sum of
    ``sqrt(dc^T G(midpoint) dc)`` over the segments.

    Parameters
    ----------
    embed : callable, ``(m, d) -> (m, D)``
    curve : Tensor, shape=[..., n_nodes, d]

    Returns
    -------
    length : Tensor, shape=[...]
    """
    if isinstance(embed, MetricDecoder):
        return _squared_speeds(embed, curve).clamp_min(0).sqrt().sum(-1)
    return torch.linalg.vector_norm(_decoded_increments(embed, curve), dim=-1).sum(-1)


def curve_energy(embed: Embedding, curve: Tensor) -> Tensor:
    r"""Energy :math:`\tfrac12\int_0^1 \|\tfrac{d}{dt} f(c(t))\|^2 dt` of the decoded polygon.

    The nodes are taken at uniform times ``t_i = i / (n_nodes - 1)``.

    Parameters
    ----------
    embed : callable, ``(m, d) -> (m, D)``
    curve : Tensor, shape=[..., n_nodes, d]

    Returns
    -------
    energy : Tensor, shape=[...]
    """
    squared = _squared_speeds(embed, curve)
    return 0.5 * squared.shape[-1] * squared.sum(-1)
