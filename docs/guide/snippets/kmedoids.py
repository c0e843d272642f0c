import torch

import pullback_manifold  # noqa: F401  (import it before geomstats: selects the pytorch backend)
from pullback_manifold import PullbackManifold
from geomstats.learning.kmedoids import RiemannianKMedoids

# geomstats' tools create their own tensors in torch's default dtype: make it float64.
torch.set_default_dtype(torch.float64)


def hill(z):
    """The latent plane lifted onto a surface with a Gaussian hill at the origin."""
    bump = 1.5 * torch.exp(-(z**2).sum(-1, keepdim=True) / (2 * 0.7**2))
    return torch.cat([z, bump], dim=-1)


space = PullbackManifold(hill, dim=2)

offsets = torch.tensor([[0.0, 0.0], [0.15, 0.1], [-0.1, 0.15]])
points = torch.cat([torch.tensor([-1.3, 0.0]) + offsets, torch.tensor([1.3, 0.0]) + offsets])

torch.manual_seed(0)  # geomstats picks the initial medoids at random
kmedoids = RiemannianKMedoids(space, n_clusters=2)
kmedoids.fit(points)  # the 6 x 6 geodesic distance matrix: 15 pairs, one batched solve
print("labels ", kmedoids.labels_.tolist())
print("medoids", kmedoids.cluster_centers_.tolist())
labels = kmedoids.labels_
assert len(set(labels[:3].tolist())) == 1 and len(set(labels[3:].tolist())) == 1 and labels[0] != labels[3]
