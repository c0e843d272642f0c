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
from .geometry import Embedding, connection, geodesic_acceleration

__all__ = ["parallel_transport"]


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
