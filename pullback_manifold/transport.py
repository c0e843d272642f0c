r"""Parallel transport along geodesics, by the JVP form of the connection.

Along the geodesic :math:`z(t)` with :math:`z(0) = z_0`, :math:`\dot z(0) = v`,
a vector field :math:`w(t)` is parallel when

.. math:: \dot w = -\Gamma(\dot z, w) = -G^{-1} J^T \, d^2 f(z)[\dot z, w]

(:func:`~pullback_manifold.geometry.connection`). The state ``(z, z', w)`` is
integrated in one adaptive solve for the whole batch; the error control
covers the transported vector too, so its G-norm is preserved to the ODE
tolerance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .geodesics import ODEOptions, _odeint_flagged, _times
from .geometry import Embedding, christoffels, connection, geodesic_acceleration

__all__ = ["parallel_transport", "transport_along_polygon"]


def _transport_rhs(embed: Embedding, d: int, regularization: float):
    def rhs(t: Tensor, y: Tensor) -> Tensor:
        z, v, w = y[:, :d], y[:, d : 2 * d], y[:, 2 * d :]
        # one batched call for the geodesic and the transport terms
        acceleration = geodesic_acceleration(embed, z, v, regularization)
        return torch.cat([v, acceleration, -connection(embed, z, v, w, regularization)], dim=-1)

    return rhs


@torch.no_grad()
def parallel_transport(
    embed: Embedding,
    tangent_vec: Tensor,
    base_point: Tensor,
    direction: Tensor,
    options: ODEOptions = ODEOptions(),
    regularization: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Transport ``tangent_vec`` from ``base_point`` along the geodesic ``t -> exp(t direction)``, ``t`` in [0, 1].

    Parameters
    ----------
    embed : callable ``(n, d) -> (n, D)``, or a MetricDecoder
    tangent_vec, base_point, direction : Tensor, shape=[n, d]
    options : ODEOptions
    regularization : float

    Returns
    -------
    transported : Tensor, shape=[n, d]
        The vector at ``exp(direction)``; NaN where the solve failed.
    end_point : Tensor, shape=[n, d]
    ok : Tensor, shape=[n], bool
    """
    d = base_point.shape[-1]
    y0 = torch.cat([base_point, direction, tangent_vec], dim=-1)
    ys, ok = _odeint_flagged(_transport_rhs(embed, d, regularization), y0, _times(0.0, 1.0, y0), options)
    y1 = ys[-1]
    return y1[:, 2 * d :], y1[:, :d], ok


# Points per batched Christoffel evaluation (bounded memory: d^3 numbers per point).
_POINT_CHUNK = 2048


def _along_polygon(embed: Embedding, w: Tensor, curve: Tensor, steps: int, regularization: float) -> Tensor:
    """``w`` transported along polygons ``(n, N + 1, d)`` traversed at uniform times: on each
    chord, velocity ``N (c_{k+1} - c_k)``, ``steps`` classical Runge-Kutta steps of
    ``w' = -Gamma(c', w)``. ``Gamma`` is bilinear and its stage points are known in advance:
    the Christoffel symbols at all of them come from one batched pass (chunked), and the
    steps are small matrix products."""
    n, k, d = curve.shape
    N = k - 1
    h = 1.0 / (N * steps)
    # Stage points: 2 * steps + 1 per chord (start, the half steps, end), shared ends dropped.
    fractions = torch.arange(2 * steps, dtype=curve.dtype, device=curve.device) / (2 * steps)
    chords = curve[:, 1:] - curve[:, :-1]
    points = curve[:, :-1, None] + fractions[:, None] * chords[:, :, None]  # (n, N, 2 steps, d)
    points = torch.cat([points.reshape(n, -1, d), curve[:, -1:]], dim=1).reshape(-1, d)
    gamma = torch.cat(
        [christoffels(embed, chunk, regularization) for chunk in points.split(_POINT_CHUNK)]
    ).reshape(n, -1, d, d, d)
    for segment in range(N):
        # -Gamma(c', .) at this chord's stage points, as matrices: (n, 2 steps + 1, d, d)
        stage = gamma[:, segment * 2 * steps : (segment + 1) * 2 * steps + 1]
        A = -torch.einsum("nskij,ni->nskj", stage, chords[:, segment] * N)
        for step in range(steps):
            start, middle, end = A[:, 2 * step], A[:, 2 * step + 1], A[:, 2 * step + 2]
            k1 = (start @ w[..., None])[..., 0]
            k2 = (middle @ (w + 0.5 * h * k1)[..., None])[..., 0]
            k3 = (middle @ (w + 0.5 * h * k2)[..., None])[..., 0]
            k4 = (end @ (w + h * k3)[..., None])[..., 0]
            w = w + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return w


@torch.no_grad()
def transport_along_polygon(
    embed: Embedding, tangent_vec: Tensor, curve: Tensor, regularization: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Transport ``tangent_vec`` along polygons with nodes at uniform times (discrete geodesics).

    Each chord is traversed in time ``1 / N`` at velocity ``N (c_{k+1} - c_k)``, and
    ``w' = -Gamma(c', w)`` is integrated along it by a classical Runge-Kutta step, with the
    Christoffel symbols at every stage point from one batched pass. The
    polygon's chords cut its arcs, an ``O(1 / N^2)`` error, which Richardson extrapolation
    against the polygon through every other node removes (integrated with two steps per
    chord, the same density of points): on the sphere chart at 64 segments, the transported
    vector ``5e-6`` off the closed form without, ``3e-10`` with. What stays is how far the
    nodes are from the smooth geodesic: on the digits VAE (512 segments) ``7e-5`` (median;
    ``2e-4`` at most) from the transport along the ODE geodesic that shooting found.

    Parameters
    ----------
    embed : callable ``(n, d) -> (n, D)``, or a MetricDecoder
    tangent_vec : Tensor, shape=[n, d]
        At the first node.
    curve : Tensor, shape=[n, N + 1, d]
    regularization : float

    Returns
    -------
    transported : Tensor, shape=[n, d]
        At the last node.
    ok : Tensor, shape=[n], bool
        Finite (``G`` positive definite along the polygon).
    """
    N = curve.shape[1] - 1
    fine = _along_polygon(embed, tangent_vec, curve, 1, regularization)
    if N % 2 or N < 4:
        return fine, torch.isfinite(fine).all(-1)
    coarse = _along_polygon(embed, tangent_vec, curve[:, ::2], 2, regularization)
    transported = fine + (fine - coarse) / 3
    return transported, torch.isfinite(transported).all(-1)
