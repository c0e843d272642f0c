import torch
from sklearn.decomposition import PCA

import pullback_manifold  # noqa: F401  (import it before geomstats: selects the pytorch backend)
from pullback_manifold import PullbackManifold
from geomstats.learning.frechet_mean import FrechetMean
from geomstats.learning.pca import TangentPCA

# geomstats' tools create their own tensors in torch's default dtype: make it float64.
torch.set_default_dtype(torch.float64)


def hill(z):
    """The latent plane lifted onto a surface with a Gaussian hill at the origin."""
    bump = 1.5 * torch.exp(-(z**2).sum(-1, keepdim=True) / (2 * 0.7**2))
    return torch.cat([z, bump], dim=-1)


space = PullbackManifold(hill, dim=2)

# Eight points around the hill's flank, at two radii.
angles = torch.linspace(-0.9, 0.9, 8)
radii = torch.tensor([0.8, 1.0]).repeat(4)
points = torch.stack([radii * angles.cos(), radii * angles.sin()], dim=-1)

estimator = FrechetMean(space)
estimator.optimizer.init_point = points.mean(0)  # start from the Euclidean mean
mean = estimator.fit(points).estimate_

# geomstats' tangent PCA at the Frechet mean: a PCA of the logs' latent coordinates.
pca = TangentPCA(space, n_components=2)
scores = pca.fit_transform(points, base_point=mean)
print("components (latent coordinates)", pca.components_.tolist())
print("explained variance ratio       ", pca.explained_variance_ratio_.tolist())
# With every component kept, inverse_transform (exp at the mean) gives the points back.
assert torch.allclose(pca.inverse_transform(scores), points, atol=1e-6)

# The same PCA in the metric at the mean: whiten the logs with G = L L^T, so that the
# Euclidean norm of the coordinates is the G-norm of the logs.
logs = space.metric.log(points, mean)
L = torch.linalg.cholesky(space.metric.metric_matrix(mean))
whitened = PCA(n_components=2).fit(logs @ L)
components = torch.linalg.solve(L.T, torch.as_tensor(whitened.components_).T).T  # back to latent vectors
print("components (G-orthonormal)     ", components.tolist())
print("explained variance ratio       ", whitened.explained_variance_ratio_.tolist())
G = space.metric.metric_matrix(mean)
assert torch.allclose(components @ G @ components.T, torch.eye(2), atol=1e-10)
