import math

import numpy as np
import torch
from sklearn.neighbors import RadiusNeighborsClassifier

import pullback_manifold  # noqa: F401  (import it before geomstats: selects the pytorch backend)
from pullback_manifold import PullbackManifold, pairwise_dists

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

bandwidth = 0.5


def gaussian(distances):
    """exp(-d^2 / (2 bandwidth^2)). scikit-learn passes the radius neighbours' distances as
    one array per query; with an infinite radius they all have the same length."""
    if distances.dtype == object:
        return np.array([gaussian(d) for d in distances])
    return np.exp(-np.asarray(distances, dtype=float) ** 2 / (2 * bandwidth**2))


# The distance matrices, each in one batched solve.
distances = pairwise_dists(space, new_points, points)  # (2, 6)
train = pairwise_dists(space, points)  # (6, 6)

kde = RadiusNeighborsClassifier(radius=math.inf, metric="precomputed", weights=gaussian)
kde.fit(train.numpy(), labels.numpy())
predicted = kde.predict(distances.numpy())
probabilities = kde.predict_proba(distances.numpy())
print("predicted", predicted.tolist())
print("probabilities", probabilities.round(4).tolist())
assert predicted.tolist() == [0, 1]
# the class probabilities are the per-class sums of kernels of the geodesic distances
density = gaussian(distances.numpy())
per_class = np.stack([density[:, labels.numpy() == c].sum(1) for c in (0, 1)], axis=1)
assert np.allclose(probabilities, per_class / per_class.sum(1, keepdims=True))
