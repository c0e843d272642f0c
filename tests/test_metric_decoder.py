"""Decoders that give their metric directly (MetricDecoder): the Koszul/JVP path against closed forms."""

import math

import torch

from decoders_zoo import great_circle, inverse_stereographic, sample_cap
from pullback_manifold import MetricDecoder, PullbackManifold

F64 = torch.float64


class StereographicSphereMetric(MetricDecoder):
    """The round sphere in stereographic coordinates, G = 4 / (1 + |z|^2)^2 I, given in closed form."""

    def _embed(self, z):
        return inverse_stereographic(z)

    def metric(self, z):
        factor = 4 / (1 + (z**2).sum(-1)) ** 2
        return factor[:, None, None] * torch.eye(2, dtype=z.dtype, device=z.device)


def test_metric_field_matches_the_pullback_it_equals():
    by_metric = PullbackManifold(StereographicSphereMetric(), dim=2)
    by_pullback = PullbackManifold(inverse_stereographic, dim=2)
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
    for name in ("metric_matrix", "christoffels"):
        torch.testing.assert_close(
            getattr(by_metric.metric, name)(z), getattr(by_pullback.metric, name)(z), rtol=1e-10, atol=1e-12
        )
    torch.testing.assert_close(
        by_metric.metric.geodesic_acceleration(z, v),
        by_pullback.metric.geodesic_acceleration(z, v),
        rtol=1e-10,
        atol=1e-12,
    )


def test_metric_field_distances_are_great_circles():
    space = PullbackManifold(StereographicSphereMetric(), dim=2)
    g = torch.Generator().manual_seed(1)
    z0, z1 = sample_cap(12, 1.2, g), sample_cap(12, 1.2, g)
    truth = great_circle(inverse_stereographic(z0), inverse_stereographic(z1))
    dist = space.metric.dist(z0, z1)
    torch.testing.assert_close(dist, truth, rtol=1e-6, atol=1e-9)
    # midpoint-rule curve length of a fine straight segment vs its closed form on the sphere
    t = torch.linspace(0, 1, 2001, dtype=F64)[:, None]
    segment = torch.tensor([0.0, -1.0], dtype=F64) * (1 - t) + torch.tensor([0.0, 1.0], dtype=F64) * t
    # the z_0 = 0 meridian through both poles' stereographic images: +-1 are on the equator, a half great circle
    torch.testing.assert_close(space.metric.curve_length(segment), torch.tensor(math.pi, dtype=F64), rtol=1e-6, atol=0)
