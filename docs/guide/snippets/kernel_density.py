import torch

import pullback_manifold  # noqa: F401  (import it before geomstats: selects the pytorch backend)
from pullback_manifold import PullbackManifold
from geomstats.learning.kernel_density_estimation_classifier import KernelDensityEstimationClassifier
from geomstats.learning.radial_kernel_functions import gaussian_radial_kernel

# geomstats' tools create their own tensors in torch's default dtype: make it float64.
torch.set_default_dtype(torch.float64)


def hill(z):
    """The latent plane lifted onto a surface with a Gaussian hill at the origin."""
    bump = 1.5 * torch.exp(-(z**2).sum(-1, keepdim=True) / (2 * 0.7**2))
    return torch.cat([z, bump], dim=-1)


space = PullbackManifold(hill, dim=2)

offsets = torch.tensor([[0.0, 0.0], [0.15, 0.1], [-0.1, 0.15]])
points = torch.cat([torch.tensor([-1.3, 0.0]) + offsets, torch.tensor([1.3, 0.0]) + offsets])
labels = torch.tensor([0, 0, 0, 1, 1, 1])

# A Gaussian kernel of the geodesic distance, exp(-d^2 / (2 * 0.5^2)). The kernel must be a
# function: a string is passed to scikit-learn as its `weights` ("uniform" or "distance").
kde = KernelDensityEstimationClassifier(space, kernel=gaussian_radial_kernel, bandwidth=0.5)
kde.fit(points, labels)
new_points = torch.tensor([[-1.0, -0.3], [1.0, 0.3]])
predicted = kde.predict(new_points)
probabilities = kde.predict_proba(new_points)
print("predicted", predicted.tolist())
print("probabilities", probabilities.round(4).tolist())
assert predicted.tolist() == [0, 1]
assert probabilities[0, 0] > 0.9 and probabilities[1, 1] > 0.9  # the other class is far away
