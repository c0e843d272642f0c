"""geomstats' FrechetMean on a nonlinear decoder's latent space."""

import torch
from geomstats.learning.frechet_mean import FrechetMean

from decoders_zoo import tanh_mlp
from pullback_manifold import PullbackManifold

F64 = torch.float64


def test_frechet_mean_first_order_condition(float64_default):
    space = PullbackManifold(tanh_mlp(2, 10, hidden=16, seed=7), dim=2)
    g = torch.Generator().manual_seed(2)
    points = torch.randn(20, 2, generator=g, dtype=F64) * 0.7
    estimator = FrechetMean(space)
    estimator.optimizer.epsilon = 1e-16
    estimator.optimizer.max_iter = 100
    mean = estimator.fit(points).estimate_
    assert mean.shape == (2,)
    report = space.metric.solve_log(points, mean)
    assert report.all_converged
    mean_log = report.tangent_vec.mean(0)
    # first-order condition: the mean of the logs vanishes (in the metric at the mean)
    assert float(space.metric.norm(mean_log, mean)) < 1e-6
    assert mean_log.abs().max() < 1e-6
    # and it differs from the Euclidean mean: the decoder is curved
    assert (mean - points.mean(0)).norm() > 1e-3
