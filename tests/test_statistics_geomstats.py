"""geomstats' statistics tools on the latent spaces of nonlinear decoders, and pairwise_dists.

Two decoders:

* ``tanh_mlp`` (decoders_zoo): a generic curved latent space, for the Fréchet mean and
  tangent PCA, checked by their defining properties.
* ``cliff``: ``f(z) = (g(z_1), z_2)`` with ``g(x) = x + S tanh(x / W)``, a nonlinear
  decoder onto the plane. Its pull-back metric is flat, so everything is known in closed
  form: ``d(a, b) = |f(a) - f(b)|`` and ``exp_z(v) = f^{-1}(f(z) + J(z) v)``; its geodesics
  are still curves in the latent plane, and the ODE solvers do not know it is flat. The
  steep step of ``g`` at ``z_1 = 0`` (height ``2 S``, width ``~W``) makes points on either
  side of it geodesically far and Euclidean-near: clustering and classification get one
  answer from geodesic distances and another from latent Euclidean ones, by construction.

geomstats' tools create tensors in torch's default dtype, hence ``float64_default``.
The geodesic regressions are slow (minutes: every loss evaluation solves a batch of
geodesics) and marked ``slow``.
"""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from geomstats.learning.frechet_mean import FrechetMean
from geomstats.learning.geodesic_regression import GeodesicRegression
from geomstats.learning.kernel_density_estimation_classifier import KernelDensityEstimationClassifier
from geomstats.learning.kmedoids import RiemannianKMedoids
from geomstats.learning.knn import KNearestNeighborsClassifier
from geomstats.learning.pca import TangentPCA
from geomstats.learning.radial_kernel_functions import gaussian_radial_kernel
from sklearn.neighbors import KNeighborsClassifier, RadiusNeighborsClassifier

from decoders_zoo import tanh_mlp
from pullback_manifold import ConvergenceError, ConvergenceWarning, ODEOptions, PullbackManifold, pairwise_dists

F64 = torch.float64
S, W = 2.0, 0.6  # half height and width of the cliff


def cliff(z):
    """The latent plane, stretched across ``z_1 = 0``: a flat metric in curved coordinates."""
    return torch.stack([z[..., 0] + S * torch.tanh(z[..., 0] / W), z[..., 1]], dim=-1)


def cliff_inverse(u):
    """``f^{-1}``, by bisection on ``g`` (increasing, ``|g(x) - x| <= S``)."""
    lo, hi = u[..., 0] - S, u[..., 0] + S
    for _ in range(80):
        mid = (lo + hi) / 2
        below = mid + S * torch.tanh(mid / W) < u[..., 0]
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return torch.stack([(lo + hi) / 2, u[..., 1]], dim=-1)


def cliff_exp(v, z):
    """Closed-form ``exp_z(v) = f^{-1}(f(z) + J(z) v)``."""
    slope = 1 + (S / W) / torch.cosh(z[..., 0] / W) ** 2
    return cliff_inverse(cliff(z) + torch.stack([slope * v[..., 0], v[..., 1]], dim=-1))


def cliff_dists(a, b):
    return torch.cdist(cliff(a), cliff(b))


def test_cliff_closed_forms_are_right():
    """The reference formulas themselves (cheap): f^{-1} inverts f, and exp_z(v) moves f(z) by J v."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 2, generator=g, dtype=F64)
    torch.testing.assert_close(cliff_inverse(cliff(z)), z, rtol=0, atol=1e-13)
    v = 1e-6 * torch.randn(50, 2, generator=g, dtype=F64)
    J = torch.func.vmap(torch.func.jacfwd(cliff))(z)
    step = cliff(cliff_exp(v, z)) - cliff(z)
    torch.testing.assert_close(step, (J @ v.unsqueeze(-1)).squeeze(-1), rtol=0, atol=1e-13)


# ------------------------------------------------------------------ pairwise_dists
def test_pairwise_dists_is_metric_dist_pair_by_pair(float64_default):
    # 1e-8 relative agreement between differently batched solves needs an integrator
    # accurate beyond that: at the default rtol 1e-7 they differ by ~1e-7.
    space = PullbackManifold(cliff, dim=2, ode_options=ODEOptions(rtol=1e-9, atol=1e-11), log_tol=1e-10)
    Z = torch.tensor([[-0.2, 0.0], [0.1, 0.2], [0.3, -0.1]], dtype=F64)  # short, across the cliff: cheap
    dists = pairwise_dists(space, Z)
    assert dists.shape == (3, 3) and dists.dtype == F64
    assert torch.equal(dists, dists.T)
    assert torch.equal(dists.diagonal(), torch.zeros(3, dtype=F64))
    for i, j in itertools.combinations(range(3), 2):
        single = space.metric.dist(Z[i], Z[j])
        torch.testing.assert_close(dists[i, j], single, rtol=1e-8, atol=0)
    torch.testing.assert_close(dists, cliff_dists(Z, Z), rtol=1e-8, atol=0)  # the truth
    # two sets: row i is points_a[i]; identical points give exactly 0, unsolved
    two_sets = pairwise_dists(space, Z[:2], Z)
    assert two_sets.shape == (2, 3)
    assert two_sets[0, 0] == 0 and two_sets[1, 1] == 0
    torch.testing.assert_close(two_sets, dists[:2], rtol=1e-8, atol=0)


def test_pairwise_dists_follows_on_failure_like_dist(float64_default):
    # No pair meets a tolerance of 1e-300 (one Newton iteration, no energy fallback: cheap).
    Z = torch.tensor([[0.5, 0.0], [0.7, 0.1]], dtype=F64)
    failing = dict(log_method="shooting", max_iter=1, log_tol=1e-300)
    space = PullbackManifold(cliff, dim=2, **failing)
    with pytest.warns(ConvergenceWarning, match="pairwise_dists: 1 of 1 pairs did not converge"):
        dists = pairwise_dists(space, Z)
    # the value is kept, as dist keeps it: the norm of the unconverged logarithm, not NaN
    with pytest.warns(ConvergenceWarning, match="dist: 1 of 1 pairs did not converge"):
        single = space.metric.dist(Z[0], Z[1])
    assert torch.isfinite(dists).all()
    torch.testing.assert_close(dists[0, 1], single, rtol=1e-12, atol=0)

    raising = PullbackManifold(cliff, dim=2, **failing, on_failure="raise")
    with pytest.raises(ConvergenceError, match="pairwise_dists"):
        pairwise_dists(raising, Z)
    silent = PullbackManifold(cliff, dim=2, **failing, on_failure="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        pairwise_dists(silent, Z)


def test_pairwise_dists_on_another_geomstats_space_uses_its_dist():
    from geomstats.geometry.euclidean import Euclidean

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    torch.testing.assert_close(pairwise_dists(Euclidean(3), a, b), torch.cdist(a, b), rtol=1e-12, atol=1e-12)
    within = pairwise_dists(Euclidean(3), a)
    assert torch.equal(within, within.T) and torch.equal(within.diagonal(), torch.zeros(4, dtype=F64))
    torch.testing.assert_close(within, torch.cdist(a, a), rtol=1e-12, atol=1e-12)
    # An embedded manifold: points in the ambient space (they were checked against dim = 2).
    from geomstats.geometry.hypersphere import Hypersphere

    x = torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=F64), dim=-1)
    angles = (x @ x.T).clamp(-1, 1).arccos().fill_diagonal_(0)
    torch.testing.assert_close(pairwise_dists(Hypersphere(2), x), angles, rtol=1e-10, atol=1e-10)
    # Matrix-shaped points (they were asked for flattened).
    from geomstats.geometry.spd_matrices import SPDMatrices

    spd = SPDMatrices(2)
    m = torch.randn(3, 2, 2, generator=g, dtype=F64)
    m = m @ m.transpose(-1, -2) + torch.eye(2, dtype=F64)
    expected = torch.stack([spd.metric.dist(m[i].expand(3, 2, 2), m) for i in range(3)])
    torch.testing.assert_close(pairwise_dists(spd, m), expected, rtol=1e-10, atol=1e-10)


def test_distances_follow_a_log_solver_of_the_users():
    """A solver put in geomstats' ``log_solver`` slot answers every distance: ``dist``,
    ``squared_dist`` (with its gradients), ``dist_pairwise`` and ``pairwise_dists`` are the
    norms of its logs, not this library's discrete-geodesic lengths."""
    from decoders_zoo import inverse_stereographic
    from geomstats.numerics.geodesic import LogSolver

    class StraightLine(LogSolver):  # a deliberately poor log: the chord, in latent coordinates
        def log(self, point, base_point):
            return point - base_point

    space = PullbackManifold(inverse_stereographic, dim=2)
    metric = space.metric
    z = torch.tensor([[0.0, 0.0], [0.9, 0.1], [-0.4, 0.8]], dtype=F64)
    own = metric.dist(z[0], z[1])
    metric.log_solver = StraightLine()

    def chord(a, b):
        return metric.norm(b - a, a)

    assert not torch.allclose(own, chord(z[0], z[1]), rtol=1e-3)  # the test can tell them apart
    torch.testing.assert_close(metric.dist(z[0], z[1]), chord(z[0], z[1]), rtol=1e-14, atol=0)
    expected = torch.zeros(3, 3, dtype=F64)
    for i, j in itertools.combinations(range(3), 2):
        expected[i, j] = expected[j, i] = chord(z[i], z[j])
    torch.testing.assert_close(pairwise_dists(space, z), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(metric.dist_pairwise(z), expected, rtol=1e-14, atol=0)
    a = z[1].clone().requires_grad_(True)
    metric.squared_dist(a, z[2]).backward()
    b = z[1].clone().requires_grad_(True)
    chord(b, z[2]).pow(2).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)


def test_pairwise_dists_rejects_malformed_points():
    space = PullbackManifold(cliff, dim=2)
    with pytest.raises(ValueError, match=r"points_a has shape \(2,\): expected \(n, 2\)"):
        pairwise_dists(space, torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match=r"points_b has shape \(3, 3\)"):
        pairwise_dists(space, torch.zeros(2, 2, dtype=F64), torch.zeros(3, 3, dtype=F64))
    with pytest.raises(TypeError, match="points_a has dtype torch.int64"):
        pairwise_dists(space, torch.zeros(2, 2, dtype=torch.long))


# -------------------------------------------------------------------- Fréchet mean
# the adaptive optimizer needs more iterations (51 s on a loaded machine): slow
@pytest.mark.parametrize("method", ["default", pytest.param("adaptive", marks=pytest.mark.slow)])
def test_frechet_mean_first_order_condition(float64_default, method):
    space = PullbackManifold(tanh_mlp(2, 10, hidden=16, seed=7), dim=2)
    g = torch.Generator().manual_seed(2)
    # 20 points for geomstats' default optimizer (the core issue's acceptance test); the
    # adaptive optimizer takes more iterations, so 5 keep it affordable
    points = torch.randn(20 if method == "default" else 5, 2, generator=g, dtype=F64) * 0.5
    estimator = FrechetMean(space, method=method)
    # default stops on |tangent mean|_G^2 <= epsilon d, adaptive on |tangent mean|_G <= epsilon
    estimator.optimizer.epsilon = 1e-16 if method == "default" else 1e-8
    estimator.optimizer.max_iter = 100
    estimator.optimizer.init_point = points.mean(0)  # the Euclidean mean: fewer iterations
    mean = estimator.fit(points).estimate_
    assert mean.shape == (2,)
    report = space.metric.solve_log(points, mean)
    assert report.all_converged, report.summary()
    mean_log = report.tangent_vec.mean(0)
    # first-order condition: the mean of the logs vanishes (in the metric at the mean)
    assert float(space.metric.norm(mean_log, mean)) < 1e-6
    assert mean_log.abs().max() < 1e-6
    # and it differs from the Euclidean mean: the decoder is curved
    assert (mean - points.mean(0)).norm() > 1e-3


# ---------------------------------------------------------------------- tangent PCA
def test_tangent_pca_variances_components_and_round_trip(float64_default):
    space = PullbackManifold(tanh_mlp(2, 10, hidden=16, seed=7), dim=2)
    g = torch.Generator().manual_seed(3)
    points = torch.randn(6, 2, generator=g, dtype=F64) * 0.5
    base_point = torch.tensor([0.1, -0.2], dtype=F64)
    pca = TangentPCA(space, n_components=2)
    scores = pca.fit_transform(points, base_point=base_point)  # geomstats' svd_flip path (shimmed)

    # geomstats' convention: PCA of the logs' latent coordinates (sklearn's, n - 1 normalization)
    report = space.metric.solve_log(points, base_point)
    assert report.all_converged, report.summary()
    centered = report.tangent_vec - report.tangent_vec.mean(0)
    total_variance = (centered**2).sum() / (len(points) - 1)
    torch.testing.assert_close(pca.explained_variance_.sum(), total_variance, rtol=1e-7, atol=0)
    assert torch.all(pca.explained_variance_[:-1] >= pca.explained_variance_[1:])
    torch.testing.assert_close(pca.components_ @ pca.components_.T, torch.eye(2, dtype=F64), rtol=0, atol=1e-12)
    # scores = centered logs in the components' basis; sklearn's sign convention: the
    # largest |score| of each component is positive
    torch.testing.assert_close(scores, centered @ pca.components_.T, rtol=0, atol=1e-7)
    assert torch.all(scores.gather(0, scores.abs().argmax(0, keepdim=True)) > 0)
    # with all components, inverse_transform is exp at the base point: it returns the points
    torch.testing.assert_close(pca.inverse_transform(scores), points, rtol=0, atol=1e-6)


def test_tangent_pca_shim_agrees_with_scikit_learn_on_numpy():
    """The torch sign flip and cumulative sum give scikit-learn's numbers (no geometry: cheap)."""
    import geomstats.learning.pca as geomstats_pca
    from sklearn.utils.extmath import svd_flip

    rng = np.random.default_rng(0)
    u, v = rng.standard_normal((7, 3)), rng.standard_normal((3, 3))
    for u_based in (True, False):
        expected_u, expected_v = svd_flip(u.copy(), v.copy(), u_based_decision=u_based)
        got_u, got_v = geomstats_pca.svd_flip(torch.tensor(u), torch.tensor(v), u_based_decision=u_based)
        np.testing.assert_allclose(got_u.numpy(), expected_u, rtol=0, atol=1e-15)
        np.testing.assert_allclose(got_v.numpy(), expected_v, rtol=0, atol=1e-15)
    ratios = torch.tensor([0.6, 0.3, 0.1], dtype=F64)
    np.testing.assert_allclose(geomstats_pca.stable_cumsum(ratios).numpy(), np.cumsum(ratios.numpy()), rtol=1e-15)


# ------------------------------------------------------------------------ k-medoids
def _best_two_medoids(dists):
    """Exact k-medoids optimum (k = 2) by enumeration: (cost, labels)."""
    best = None
    for i, j in itertools.combinations(range(len(dists)), 2):
        cost = torch.minimum(dists[i], dists[j]).sum()
        if best is None or cost < best[0]:
            best = (cost, (dists[j] < dists[i]).long())
    return best


def _same_partition(labels, truth):
    labels, truth = list(map(int, labels)), list(map(int, truth))
    return labels == truth or labels == [1 - t for t in truth]


def test_kmedoids_finds_the_geodesic_clusters_where_euclidean_does_not(float64_default):
    # Two columns of points either side of the cliff, 0.6 apart in the latent plane but
    # g(0.3) - g(-0.3) = 2.45 apart geodesically; each column spans 2 vertically.
    ys = torch.tensor([-1.0, 0.0, 1.0], dtype=F64)
    left = torch.stack([torch.full_like(ys, -0.3), ys], -1)
    points = torch.cat([left, -left.flip(0)])
    truth = [0, 0, 0, 1, 1, 1]
    _, labels = _best_two_medoids(torch.cdist(points, points))
    assert not _same_partition(labels, truth)  # the optimal Euclidean k-medoids clustering is wrong
    _, labels = _best_two_medoids(cliff_dists(points, points))
    assert _same_partition(labels, truth)  # the optimal geodesic one is right

    space = PullbackManifold(cliff, dim=2)
    metric, solves, matrices = space.metric, [], []
    solve_log, dist_pairwise = metric.solve_log, metric.dist_pairwise
    metric.solve_log = lambda point, base_point, **kw: solves.append(len(point)) or solve_log(point, base_point, **kw)
    metric.dist_pairwise = lambda *args, **kw: matrices.append(dist_pairwise(*args, **kw)) or matrices[-1]
    torch.manual_seed(0)
    kmedoids = RiemannianKMedoids(space, n_clusters=2).fit(points)
    assert solves == [15]  # our dist_pairwise: the 15 pairs i < j in one batched solve
    (dists,) = matrices
    assert torch.equal(dists, dists.T) and torch.equal(dists.diagonal(), torch.zeros(6, dtype=F64))
    torch.testing.assert_close(dists, cliff_dists(points, points), rtol=1e-6, atol=0)
    assert _same_partition(kmedoids.labels_, truth)
    medoids = {tuple(m.tolist()) for m in kmedoids.cluster_centers_}
    assert medoids == {(-0.3, 0.0), (0.3, 0.0)}  # each column's middle point


# ------------------------------------------------------------------ classification
# The first query sits right of the cliff: its nearest training point in the latent plane is
# the class-0 point across the cliff (0.55 away; geodesically 2.21), its geodesically nearest
# the class-1 point on its side (0.85 away; geodesically 1.62). The second is class 0 either way.
TRAIN = torch.tensor([[-0.15, 0.0], [1.25, 0.0]], dtype=F64)
TRAIN_LABELS = np.array([0, 1])
QUERIES = torch.tensor([[0.4, 0.0], [-0.6, 0.0]], dtype=F64)
QUERY_LABELS = [1, 0]
BANDWIDTH = 0.5


def _gaussian_density(dists):
    """Gaussian kernel weights for scikit-learn: of a distance array, or, for radius neighbours,
    of one array per query (all of one length, the radius being infinite)."""
    if dists.dtype == object:
        return np.array([_gaussian_density(d) for d in dists])
    return np.exp(-np.asarray(dists, dtype=float) ** 2 / (2 * BANDWIDTH**2))


def test_classification_data_defeats_euclidean_distances():
    knn = KNeighborsClassifier(n_neighbors=1).fit(TRAIN.numpy(), TRAIN_LABELS)
    assert knn.predict(QUERIES.numpy()).tolist() == [0, 0]  # the first is wrong
    kde = RadiusNeighborsClassifier(radius=math.inf, weights=_gaussian_density).fit(TRAIN.numpy(), TRAIN_LABELS)
    assert kde.predict(QUERIES.numpy()).tolist() == [0, 0]
    geodesic = cliff_dists(QUERIES, TRAIN)
    assert TRAIN_LABELS[geodesic.argmin(1).numpy()].tolist() == QUERY_LABELS


def test_knn_classifier_predicts_the_geodesic_labels(float64_default):
    space = PullbackManifold(cliff, dim=2)
    knn = KNearestNeighborsClassifier(space, n_neighbors=1).fit(TRAIN, TRAIN_LABELS)
    assert knn.predict(QUERIES).tolist() == QUERY_LABELS  # scikit-learn calls metric.dist pair by pair


def test_kernel_density_classifier_predicts_the_geodesic_labels(float64_default):
    space = PullbackManifold(cliff, dim=2)
    kde = KernelDensityEstimationClassifier(space, kernel=gaussian_radial_kernel, bandwidth=BANDWIDTH)
    kde.fit(TRAIN, TRAIN_LABELS)
    assert kde.predict(QUERIES).tolist() == QUERY_LABELS


def test_precomputed_distances_give_the_same_classifiers(float64_default):
    """The fast path for many points: pairwise_dists, then scikit-learn's metric="precomputed"."""
    space = PullbackManifold(cliff, dim=2)
    dists = pairwise_dists(space, QUERIES, TRAIN)  # (n_queries, n_train), one batched solve
    torch.testing.assert_close(dists, cliff_dists(QUERIES, TRAIN), rtol=1e-6, atol=0)
    train = pairwise_dists(space, TRAIN).numpy()  # (n_train, n_train): what fit expects
    knn = KNeighborsClassifier(n_neighbors=1, metric="precomputed").fit(train, TRAIN_LABELS)
    assert knn.predict(dists.numpy()).tolist() == QUERY_LABELS
    kde = RadiusNeighborsClassifier(radius=math.inf, metric="precomputed", weights=_gaussian_density)
    kde.fit(train, TRAIN_LABELS)
    assert kde.predict(dists.numpy()).tolist() == QUERY_LABELS
    # the densities themselves: per class, the sum of kernels of the geodesic distances
    density = _gaussian_density(dists.numpy())
    np.testing.assert_allclose(kde.predict_proba(dists.numpy()), density / density.sum(1, keepdims=True), rtol=1e-12)


# --------------------------------------------------------------- geodesic regression
def test_exp_is_differentiable_like_the_closed_form(float64_default):
    """The gradients geomstats' Riemannian regression uses: d exp / d(z, v), against autograd of the closed form."""
    space = PullbackManifold(cliff, dim=2)
    z = torch.tensor([[0.5, 0.0], [-0.3, 0.2]], dtype=F64, requires_grad=True)
    v = torch.tensor([[0.3, 1.0], [0.8, -0.5]], dtype=F64, requires_grad=True)
    weights = torch.tensor([[0.7, -1.1], [0.2, 0.4]], dtype=F64)
    end = space.metric.exp(v, z)
    torch.testing.assert_close(end, cliff_exp(v, z), rtol=0, atol=1e-7)
    grad_z, grad_v = torch.autograd.grad((end * weights).sum(), (z, v))
    # closed form: f^{-1}(f(z) + J v) differentiated through f^{-1}'s derivative 1 / g'
    zz, vv = z.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    u = cliff(zz) + torch.stack([(1 + (S / W) / torch.cosh(zz[:, 0] / W) ** 2) * vv[:, 0], vv[:, 1]], -1)
    x = cliff_inverse(u.detach())
    slope = 1 + (S / W) / torch.cosh(x[:, 0] / W) ** 2
    exact = torch.stack([x[:, 0] + (u[:, 0] - u[:, 0].detach()) / slope, u[:, 1]], -1)
    expected_z, expected_v = torch.autograd.grad((exact * weights).sum(), (zz, vv))
    torch.testing.assert_close(grad_z, expected_z, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_v, expected_v, rtol=1e-6, atol=1e-7)


def _regression_data():
    # The geodesic runs from (1.54, -1) to (0.52, 1), down the cliff's flank (g' from 1.1 to 2.7):
    # a curved line in the latent plane. x over [-1, 1] and an intercept where G is mild keep
    # the problem well conditioned for geomstats' plain gradient descent (~20 iterations).
    intercept = torch.tensor([0.9, 0.0], dtype=F64)
    coef = torch.tensor([-0.5, 1.0], dtype=F64)
    x = torch.linspace(-1.0, 1.0, 4, dtype=F64)
    y = cliff_exp(x[:, None] * coef, intercept)  # exact, noise-free observations
    start = (torch.tensor([0.85, 0.1], dtype=F64), torch.tensor([-0.4, 0.8], dtype=F64))
    return x, y, intercept, coef, start


# Both stop on a loss change below 1e-10 (a parameter error ~1e-5 from the truth, whose loss is 0).
@pytest.mark.slow
def test_geodesic_regression_extrinsic_recovers_the_geodesic(float64_default):
    space = PullbackManifold(cliff, dim=2)
    x, y, intercept, coef, start = _regression_data()
    regression = GeodesicRegression(space, center_X=False, method="extrinsic", initialization=start)
    regression.optimizer.autodiff_jac = True  # exp is differentiable: no finite differences
    regression.fit(x, y)
    torch.testing.assert_close(regression.intercept_, intercept, rtol=0, atol=1e-4)
    torch.testing.assert_close(regression.coef_, coef, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_geodesic_regression_riemannian_recovers_the_geodesic(float64_default):
    space = PullbackManifold(cliff, dim=2)
    x, y, intercept, coef, start = _regression_data()
    regression = GeodesicRegression(space, center_X=False, method="riemannian", initialization=start)
    regression.optimizer.tol = 1e-10  # on the loss change; geomstats' 1e-5 stops short of the truth
    regression.fit(x, y)
    torch.testing.assert_close(regression.intercept_, intercept, rtol=0, atol=1e-4)
    torch.testing.assert_close(regression.coef_, coef, rtol=0, atol=1e-4)


class _Hill(torch.nn.Module):
    """A bump: a pair on either side of it has one geodesic over each flank."""

    def forward(self, z):
        bump = 1.5 * torch.exp(-(z**2).sum(-1, keepdim=True) / (2 * 0.7**2))
        return torch.cat([z, bump], dim=-1)

    def jet_rule(self, jet, state):
        """Closed-form derivatives (torch.func's generic ones take 20 ms a call here)."""
        x, first, second = jet.value, jet.first, jet.second
        bump = 1.5 * torch.exp(-(x**2).sum(-1, keepdim=True) / (2 * 0.7**2))
        exponent_first = -(first * x).sum(-1, keepdim=True) / 0.7**2  # (k, n, 1)
        value, out_first = torch.cat([x, bump], -1), torch.cat([first, bump * exponent_first], -1)
        if second is None:
            return jet.replace(value, out_first, None)
        a, b = jet.pair  # ints, or index tensors for several pairs
        exponent_second = -((first[a] * first[b]).sum(-1, keepdim=True) + (x * second).sum(-1, keepdim=True)) / 0.7**2
        bump_second = bump * (exponent_second + exponent_first[a] * exponent_first[b])
        return jet.replace(value, out_first, torch.cat([second, bump_second], -1))


def test_log_warm_start_from_a_far_base_point_is_not_used():
    """metric.log reuses its last solution (for Fréchet-mean iterations) only where the base
    point moved by at most a tenth of the geodesic's length. From a base point on the other
    side of the bump, the warm start once followed a geodesic 11% longer than dist."""
    metric = PullbackManifold(_Hill(), dim=2).metric
    z0, z1 = torch.tensor([-1.5, -0.25], dtype=F64), torch.tensor([1.5, -0.15], dtype=F64)
    cold = PullbackManifold(_Hill(), dim=2).metric.log(z1, z0)
    metric.log(z1, torch.tensor([-1.5, 0.6], dtype=F64))  # over the bump's other flank
    torch.testing.assert_close(metric.log(z1, z0), cold, rtol=1e-7, atol=0)


def test_log_warm_start_keeps_each_calls_dtype_and_shape_and_moves_per_pair():
    """The warm start once imposed the last call's dtype and batch shape on the next call."""
    metric = PullbackManifold(tanh_mlp(2, 5, hidden=16, seed=1), dim=2).metric
    points = torch.tensor([[0.9, -0.2], [-0.4, 0.6], [0.2, 0.1]], dtype=F64)
    bases = torch.tensor([[0.1, 0.2], [0.3, -0.1], [-0.5, 0.4]], dtype=F64)
    points32 = points.float()
    metric.log(points32, bases)  # float64: promoted by the base points
    assert metric.log(points32, bases.float()).dtype == torch.float32
    metric.log(points[0], bases)
    assert metric.log(points[0], bases[0]).shape == (2,)
    # Partly warm: the second base point moves far, the others a little; each pair is
    # what a solve from scratch gives.
    metric.log(points, bases)
    moved = bases + torch.tensor([[1e-3, 0], [1.0, 0], [1e-3, 0]], dtype=F64)
    fresh = PullbackManifold(tanh_mlp(2, 5, hidden=16, seed=1), dim=2).metric.log(points, moved)
    calls, log_map = [], metric._log_map

    def spy(point, base_point, initial_tangent_vec, method, *args, **kwargs):
        calls.append(torch.isfinite(initial_tangent_vec).all(-1).tolist())
        return log_map(point, base_point, initial_tangent_vec, method, *args, **kwargs)

    metric._log_map = spy
    torch.testing.assert_close(metric.log(points, moved), fresh, rtol=1e-6, atol=1e-9)
    # one solve: pairs 0 and 2 warm, pair 1 (NaN warm start) from scratch
    assert calls == [[True, False, True]], calls


def test_log_warm_starts_only_from_shooting_answers():
    """An energy answer's velocity is no shooting start: on a digits-VAE sigma wall Newton spent
    its 4 warm iterations on ODE solves there and went the discrete route anyway (16.7 s
    against 1.3 s cold for two pairs). Such pairs, and unconverged ones, get no warm start."""
    metric = PullbackManifold(tanh_mlp(2, 5, hidden=16, seed=1), dim=2).metric
    points = torch.tensor([[0.9, -0.2], [-0.4, 0.6], [0.2, 0.1]], dtype=F64)
    bases = torch.tensor([[0.1, 0.2], [0.3, -0.1], [-0.5, 0.4]], dtype=F64)
    reported = metric._reported_log

    def partly_energy(*args, **kwargs):
        result = reported(*args, **kwargs)
        result.from_energy = torch.tensor([True, False, False])
        result.converged = torch.tensor([True, True, False])
        return result

    metric._reported_log = partly_energy
    solved = metric.log(points, bases)
    metric._reported_log = reported
    calls, log_map = [], metric._log_map

    def spy(point, base_point, initial_tangent_vec, method, *args, **kwargs):
        calls.append(torch.isfinite(initial_tangent_vec).all(-1).tolist())
        return log_map(point, base_point, initial_tangent_vec, method, *args, **kwargs)

    metric._log_map = spy
    moved = bases + 1e-3
    metric.log(points, moved)
    assert calls == [[False, True, False]], calls  # only the shooting answer starts shooting
    assert torch.isfinite(solved).all()
