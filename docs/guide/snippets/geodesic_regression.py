import torch

import pullback_manifold  # noqa: F401  (import it before geomstats: selects the pytorch backend)
from pullback_manifold import PullbackManifold
from geomstats.learning.geodesic_regression import GeodesicRegression

# geomstats' tools create their own tensors in torch's default dtype: make it float64.
torch.set_default_dtype(torch.float64)


def hill(z):
    """The latent plane lifted onto a surface with a Gaussian hill at the origin."""
    bump = 1.5 * torch.exp(-(z**2).sum(-1, keepdim=True) / (2 * 0.7**2))
    return torch.cat([z, bump], dim=-1)


space = PullbackManifold(hill, dim=2)

# Six noisy observations of the geodesic x -> exp_p(x v), on the hill's flank.
p = torch.tensor([0.9, 0.0])
v = torch.tensor([0.0, 0.5])
x = torch.linspace(-1.0, 1.0, 6)
truth = space.metric.geodesic(initial_point=p, initial_tangent_vec=v)(x)  # (6, 2)
generator = torch.Generator().manual_seed(0)
y = truth + 0.01 * torch.randn(truth.shape, generator=generator)

regression = GeodesicRegression(space, center_X=False, method="extrinsic", initialization="frechet")
regression.optimizer.autodiff_jac = True  # gradients by autograd through exp and squared_dist
regression.fit(x, y)
print("intercept", regression.intercept_.tolist(), "coef", regression.coef_.tolist())
# The fit recovers the geodesic up to the noise.
assert (regression.intercept_ - p).norm() < 0.05 and (regression.coef_ - v).norm() < 0.05
