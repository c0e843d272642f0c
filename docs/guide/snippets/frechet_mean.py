import torch

import pullback_manifold  # noqa: F401  (import it before geomstats: selects the pytorch backend)
from pullback_manifold import PullbackManifold
from geomstats.learning.frechet_mean import FrechetMean

# geomstats' tools create their own tensors in torch's default dtype: make it float64.
torch.set_default_dtype(torch.float64)


def hill(z):
    """The latent plane lifted onto a surface with a Gaussian hill at the origin."""
    bump = 1.5 * torch.exp(-(z**2).sum(-1, keepdim=True) / (2 * 0.7**2))
    return torch.cat([z, bump], dim=-1)


space = PullbackManifold(hill, dim=2)

# Eight points on an arc around the hill's flank.
angles = torch.linspace(-0.9, 0.9, 8)
points = torch.stack([0.9 * angles.cos(), 0.9 * angles.sin()], dim=-1)

estimator = FrechetMean(space)  # geomstats' default gradient descent
estimator.optimizer.epsilon = 1e-12  # stop on a smaller step than geomstats' default 1e-4
mean = estimator.fit(points).estimate_
print("Frechet mean  ", mean.tolist())
print("Euclidean mean", points.mean(0).tolist())

# First-order condition of a Frechet mean: the logs of the points from it average to zero.
report = space.metric.solve_log(points, mean)
assert report.all_converged, report.summary()
print("|mean of logs| =", float(report.tangent_vec.mean(0).norm()))
assert report.tangent_vec.mean(0).norm() < 1e-6
