import torch

import pullback_manifold  # noqa: F401  (import it before geomstats: selects the pytorch backend)
from pullback_manifold import PullbackManifold
from geomstats.learning.knn import KNearestNeighborsClassifier

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

knn = KNearestNeighborsClassifier(space, n_neighbors=3)
knn.fit(points, labels)
new_points = torch.tensor([[-1.0, -0.3], [1.0, 0.3]])
predicted = knn.predict(new_points)  # scikit-learn calls metric.dist pair by pair
print("predicted", predicted.tolist())
assert predicted.tolist() == [0, 1]
