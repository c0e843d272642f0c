"""The library's promise: geodesic distances and means do not depend on the latent parametrization.

Decoder f on latent codes z; the same model reparametrized by the
norm-dependent rotation h(z) = R(theta(|z|)) z has decoder f o h^{-1} on codes
h(z). Euclidean latent geometry changes; the pull-back geometry must not.
"""

import pytest
import torch
from geomstats.learning.frechet_mean import FrechetMean

from decoders_zoo import swirl, tanh_mlp, unswirl
from pullback_manifold import PullbackManifold

F64 = torch.float64



@pytest.fixture(scope="module")
def two_parametrizations():
    f = tanh_mlp(2, 12, hidden=16, seed=4)
    original = PullbackManifold(f, dim=2)
    reparametrized = PullbackManifold(lambda w: f(unswirl(w)), dim=2)
    return original, reparametrized


def test_swirl_is_a_reparametrization():
    z = torch.randn(50, 2, dtype=F64)
    torch.testing.assert_close(unswirl(swirl(z)), z, rtol=1e-12, atol=1e-12)


def test_geodesic_distances_are_invariant_euclidean_are_not(two_parametrizations):
    original, reparametrized = two_parametrizations
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(6, 2, generator=g, dtype=F64) * 0.45
    z1 = torch.randn(6, 2, generator=g, dtype=F64) * 0.45
    w0, w1 = swirl(z0), swirl(z1)

    euclidean_z = (z1 - z0).norm(dim=-1)
    euclidean_w = (w1 - w0).norm(dim=-1)
    assert ((euclidean_w - euclidean_z).abs() / euclidean_z).max() > 0.2  # the reparametrization matters

    d_original = original.metric.dist(z0, z1)
    d_reparametrized = reparametrized.metric.dist(w0, w1)
    rel = (d_reparametrized - d_original).abs() / d_original
    assert rel.max() < 1e-6, rel.max()


def _frechet_mean(space, points):
    estimator = FrechetMean(space)
    estimator.optimizer.epsilon = 1e-16
    estimator.optimizer.max_iter = 100
    return estimator.fit(points).estimate_


def test_frechet_mean_maps_by_the_reparametrization(two_parametrizations, float64_default):
    original, reparametrized = two_parametrizations
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 2, generator=g, dtype=F64) * 0.3 + torch.tensor([0.4, -0.2], dtype=F64)
    mean_z = _frechet_mean(original, z)
    mean_w = _frechet_mean(reparametrized, swirl(z))
    torch.testing.assert_close(mean_w, swirl(mean_z), rtol=0, atol=1e-6)
    # while the Euclidean means disagree
    assert (swirl(z.mean(0)) - swirl(z).mean(0)).norm() > 1e-2
