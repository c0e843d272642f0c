import torch
from sklearn.neighbors import KNeighborsClassifier

import pullback_manifold  # noqa: F401  (import it before geomstats: selects the pytorch backend)
from pullback_manifold import PullbackManifold, pairwise_dists

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
new_points = torch.tensor([[-1.0, -0.3], [1.0, 0.3]])

# Geodesic distances from the new points to the training points, and between the training
# points, each matrix in one batched solve.
distances = pairwise_dists(space, new_points, points)  # (2, 6): dist(new_points[i], points[j])
train = pairwise_dists(space, points)  # (6, 6): the 15 pairs i < j, mirrored, zero diagonal

knn = KNeighborsClassifier(n_neighbors=3, metric="precomputed")
knn.fit(train.numpy(), labels.numpy())
predicted = knn.predict(distances.numpy())
print("predicted", predicted.tolist())
assert predicted.tolist() == [0, 1]
