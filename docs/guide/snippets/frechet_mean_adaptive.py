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

angles = torch.linspace(-0.9, 0.9, 8)
points = torch.stack([0.9 * angles.cos(), 0.9 * angles.sin()], dim=-1)

# geomstats' adaptive step-size gradient descent
estimator = FrechetMean(space, method="adaptive")
estimator.optimizer.epsilon = 1e-12
mean = estimator.fit(points).estimate_
print("Frechet mean (adaptive)", mean.tolist())

report = space.metric.solve_log(points, mean)
print(report.summary())
assert report.tangent_vec.mean(0).norm() < 1e-6
