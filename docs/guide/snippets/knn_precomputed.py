import torch
from sklearn.neighbors import KNeighborsClassifier

import pullback_manifold  # noqa: F401  (import it before geomstats: selects the pytorch backend)
from pullback_manifold import PullbackManifold

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

# All geodesic distances from the new points to the training points, in one batched call.
n_new, n_train = len(new_points), len(points)
queries = new_points[:, None].expand(n_new, n_train, 2)
references = points[None].expand(n_new, n_train, 2)
distances = space.metric.dist(queries, references)  # (2, 6)

# The (symmetric) training distance matrix, upper triangle only, also batched.
i, j = torch.triu_indices(n_train, n_train, offset=1)
train = torch.zeros(n_train, n_train)
train[i, j] = space.metric.dist(points[i], points[j])
train = train + train.T

knn = KNeighborsClassifier(n_neighbors=3, metric="precomputed")
knn.fit(train.numpy(), labels.numpy())
predicted = knn.predict(distances.numpy())
print("predicted", predicted.tolist())
assert predicted.tolist() == [0, 1]
