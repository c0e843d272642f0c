"""exp, log, dist and geodesics against closed-form truth; convergence reporting."""

import warnings

import pytest
import torch

from decoders_zoo import great_circle, inverse_stereographic, linear_decoder, sample_cap, tanh_mlp
from pullback_manifold import ODEOptions, ConvergenceError, ConvergenceWarning, PullbackManifold

F64 = torch.float64


@pytest.fixture(scope="module")
def linear():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(6, 3, generator=g, dtype=F64)
    b = torch.randn(6, generator=g, dtype=F64)
    return PullbackManifold(linear_decoder(A, b), dim=3), A


@pytest.fixture(scope="module")
def sphere():
    return PullbackManifold(inverse_stereographic, dim=2)


def test_linear_exp_is_straight_line(linear):
    space, _ = linear
    z0, v = torch.randn(2, 10, 3, dtype=F64)
    torch.testing.assert_close(space.metric.exp(v, z0), z0 + v, rtol=1e-12, atol=1e-12)


def test_linear_log_and_dist(linear):
    space, A = linear
    z0, z1 = torch.randn(2, 10, 3, dtype=F64) * 2
    result = space.metric.solve_log(z1, z0)
    assert result.all_converged
    torch.testing.assert_close(result.tangent_vec, z1 - z0, rtol=1e-10, atol=1e-10)
    dist = space.metric.dist(z0, z1)
    expected = ((z1 - z0) @ A.T).norm(dim=-1)
    assert ((dist - expected).abs() / expected).max() < 1e-8


def test_linear_geodesic_is_straight(linear):
    space, _ = linear
    z0, z1 = torch.randn(2, 3, dtype=F64)
    t = torch.linspace(0, 1, 5, dtype=F64)
    path = space.metric.geodesic(initial_point=z0, end_point=z1)(t)
    torch.testing.assert_close(path, z0 + t[:, None] * (z1 - z0), rtol=1e-9, atol=1e-9)


def test_sphere_dist_is_great_circle_up_to_2_5_rad(sphere):
    g = torch.Generator().manual_seed(0)
    z0, z1 = sample_cap(60, 1.25, g), sample_cap(60, 1.25, g)
    angle = great_circle(inverse_stereographic(z0), inverse_stereographic(z1))
    assert angle.max() > 2.0  # the test covers long geodesics
    result = sphere.metric.solve_log(z1, z0)
    assert result.all_converged, result.summary()
    dist = sphere.metric.dist(z0, z1)
    rel = (dist - angle).abs() / angle
    assert rel.max() < 1e-6, rel.max()


def test_sphere_exp_of_log_returns_end_point(sphere):
    g = torch.Generator().manual_seed(1)
    z0, z1 = sample_cap(40, 1.25, g), sample_cap(40, 1.25, g)
    v = sphere.metric.log(z1, z0)
    assert (sphere.metric.exp(v, z0) - z1).norm(dim=-1).max() < 1e-7


def test_sphere_exp_matches_closed_form(sphere):
    """exp of a unit-speed vector at the north pole lands at that angle from the pole."""
    z0 = torch.zeros(5, 2, dtype=F64)
    direction = torch.nn.functional.normalize(torch.randn(5, 2, dtype=F64), dim=-1)
    angle = torch.linspace(0.2, 2.5, 5, dtype=F64)
    v = direction * angle[:, None] / 2  # metric at 0 is 4 I
    end = sphere.metric.exp(v, z0)
    torch.testing.assert_close(great_circle(inverse_stereographic(end), inverse_stereographic(z0)), angle)


def test_geodesic_ivp_times_and_shapes(sphere):
    z0 = torch.tensor([[0.1, 0.2], [-0.3, 0.1]], dtype=F64)
    v = torch.tensor([[0.5, 0.0], [0.1, -0.4]], dtype=F64)
    path = sphere.metric.geodesic(initial_point=z0, initial_tangent_vec=v)
    t = torch.tensor([1.0, 0.0, -0.5, 0.5, 1.0], dtype=F64)
    points = path(t)
    assert points.shape == (2, 5, 2)
    torch.testing.assert_close(points[:, 1], z0)
    torch.testing.assert_close(points[:, 0], points[:, 4])
    torch.testing.assert_close(points[:, 0], sphere.metric.exp(v, z0))
    torch.testing.assert_close(points[:, 2], sphere.metric.exp(-0.5 * v, z0))
    single = sphere.metric.geodesic(initial_point=z0[0], initial_tangent_vec=v[0])(0.5)
    assert single.shape == (1, 2)


def test_log_norm_equals_geodesic_length(sphere):
    """Constant speed: ||log||_G equals the length of the decoded geodesic."""
    z0 = torch.tensor([0.3, -0.2], dtype=F64)
    z1 = torch.tensor([-0.6, 0.5], dtype=F64)
    curve = sphere.metric.geodesic(initial_point=z0, end_point=z1)(torch.linspace(0, 1, 4001, dtype=F64))
    length = sphere.metric.curve_length(curve)
    torch.testing.assert_close(length, sphere.metric.dist(z0, z1), rtol=1e-6, atol=0)


def test_nonconvergence_is_flagged_and_warned():
    space = PullbackManifold(tanh_mlp(2, 8, seed=2), dim=2, max_iter=1, log_method="shooting")
    z0 = torch.zeros(3, 2, dtype=F64)
    # Pair 0 is far enough that one Newton step from either first guess does not reach it.
    z1 = torch.tensor([[-5.0, 4.0], [-2.5, 2.0], [1e-3, 0.0]], dtype=F64)
    report = space.metric.solve_log(z1, z0)
    assert not report.all_converged
    assert not report.converged[0]  # (one step from the discrete geodesic's guess may solve pair 1)
    failed = ~report.converged
    assert (report.residual[failed] > report.tol * (1 + z1[failed].abs().amax(-1))).all()
    assert (report.n_iterations <= 2).all()  # one Newton step from each of the two first guesses
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        space.metric.log(z1, z0)


def test_auto_answers_what_shooting_cannot_from_the_energy_method_and_says_so():
    z0 = torch.zeros(3, 2, dtype=F64)
    z1 = torch.tensor([[2.0, -1.5], [-2.5, 2.0], [1e-3, 0.0]], dtype=F64)
    # A step cap no geodesic ODE solve fits in: every shooting solve fails.
    starved = PullbackManifold(tanh_mlp(2, 8, seed=2), dim=2, ode_options=ODEOptions(max_num_steps=2))
    report = starved.metric.solve_log(z1, z0)
    assert report.method == "auto" and report.all_converged
    assert report.from_energy.all()
    assert (report.residual[:2] <= report.energy_rtol).all()
    # The truth from tight ODE solves: at the default ones (rtol 1e-7) shooting's lengths
    # are good to ~2e-8, no better than the energy answer being checked.
    tight = ODEOptions(rtol=1e-11, atol=1e-13, max_num_steps=20000)
    reference = PullbackManifold(
        tanh_mlp(2, 8, seed=2), dim=2, log_method="shooting", ode_options=tight, log_tol=1e-11
    ).metric.solve_log(z1, z0)
    assert reference.all_converged and not reference.from_energy.any()
    lengths = starved.metric.norm(report.tangent_vec, z0)
    truth = starved.metric.norm(reference.tangent_vec, z0)
    # the energy answer's length is as accurate as its own error estimate claims
    assert ((lengths - truth).abs() / truth <= report.residual.clamp_min(1e-12) + 1e-9).all()
    # and its direction is a close (O(h^2)) approximation of the exact one
    torch.testing.assert_close(report.tangent_vec, reference.tangent_vec, rtol=0, atol=1e-3 * truth.max())


def test_on_failure_raise_and_ignore():
    z0 = torch.zeros(2, 2, dtype=F64)
    z1 = torch.tensor([[-5.0, 4.0], [-2.5, 2.0]], dtype=F64)
    raising = PullbackManifold(tanh_mlp(2, 8, seed=2), dim=2, max_iter=1, log_method="shooting", on_failure="raise")
    with pytest.raises(ConvergenceError):
        raising.metric.log(z1, z0)
    silent = PullbackManifold(tanh_mlp(2, 8, seed=2), dim=2, max_iter=1, log_method="shooting", on_failure="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        silent.metric.log(z1, z0)


def test_warm_start_from_solution_needs_no_iteration(sphere):
    g = torch.Generator().manual_seed(5)
    z0, z1 = sample_cap(8, 1.0, g), sample_cap(8, 1.0, g)
    cold = sphere.metric.solve_log(z1, z0)
    warm = sphere.metric.solve_log(z1, z0, initial_tangent_vec=cold.tangent_vec)
    assert cold.n_iterations.sum() >= 4  # (a pair can converge from the discrete geodesic's guess)
    assert warm.all_converged and (warm.n_iterations == 0).all()


def test_geodesic_of_pairs_answered_by_the_energy_method_is_their_discrete_geodesic():
    """metric.geodesic must not integrate the ODE from an energy answer's approximate velocity."""
    z0 = torch.zeros(3, 2, dtype=F64)
    z1 = torch.tensor([[2.0, -1.5], [-2.5, 2.0], [1e-3, 0.0]], dtype=F64)
    starved = PullbackManifold(tanh_mlp(2, 8, seed=2), dim=2, ode_options=ODEOptions(max_num_steps=2))
    assert starved.metric.solve_log(z1, z0).from_energy.all()
    path = starved.metric.geodesic(initial_point=z0, end_point=z1)(torch.linspace(0, 1, 5, dtype=F64))
    torch.testing.assert_close(path[:, 0], z0, rtol=0, atol=1e-12)
    torch.testing.assert_close(path[:, -1], z1, rtol=0, atol=1e-12)
    exact = PullbackManifold(tanh_mlp(2, 8, seed=2), dim=2, log_method="shooting")
    reference = exact.metric.geodesic(initial_point=z0, end_point=z1)(torch.linspace(0, 1, 5, dtype=F64))
    # the discrete geodesic at arc-length times follows the exact one (O(h^2) nodes)
    assert (path - reference).norm(dim=-1).max() < 1e-2
    # the same curves from the report, without solving again, for every pair or a selection
    report = starved.metric.solve_log(z1, z0)
    again = starved.metric.geodesic_from_log(report, z1, z0)(torch.linspace(0, 1, 5, dtype=F64))
    torch.testing.assert_close(again, path, rtol=0, atol=1e-12)
    one = starved.metric.geodesic_from_log(report[1:2], z1[1:2], z0[1:2])(torch.linspace(0, 1, 5, dtype=F64))
    torch.testing.assert_close(one, path[1:2], rtol=0, atol=1e-12)


def test_discrete_geodesic_paths_go_on_beyond_their_end_points():
    """path(t) outside [0, 1] raised for pairs the energy method answered (and only for
    them): it now follows the ODE geodesics that leave the ends with the discrete geodesic's
    end velocities. On the sphere, the point at time t is |t| times the great-circle
    distance from the start (measured: within 2e-8; the shooting geodesic within 3e-6)."""
    g = torch.Generator().manual_seed(3)
    z0, z1 = sample_cap(4, 1.0, g), sample_cap(4, 1.0, g)
    t = torch.tensor([-0.5, -0.1, 0.0, 0.5, 1.0, 1.1, 1.5], dtype=F64)
    energy = PullbackManifold(inverse_stereographic, dim=2, log_method="energy")
    path = energy.metric.geodesic(initial_point=z0, end_point=z1)(t)
    assert path.shape == (4, 7, 2)
    x0 = inverse_stereographic(z0)
    x = inverse_stereographic(path.reshape(-1, 2)).reshape(4, 7, 3)
    angle = torch.atan2(torch.linalg.cross(x, x0[:, None].expand_as(x)).norm(dim=-1), (x * x0[:, None]).sum(-1))
    distance = great_circle(x0, inverse_stereographic(z1))
    torch.testing.assert_close(angle, t.abs() * distance[:, None], rtol=0, atol=1e-6)
    shot = PullbackManifold(inverse_stereographic, dim=2, log_method="shooting")
    reference = shot.metric.geodesic(initial_point=z0, end_point=z1)(t)
    assert (path - reference).norm(dim=-1).max() < 1e-4


def test_shooting_with_reused_jacobians_reaches_the_same_geodesics_with_fewer_variational_solves(sphere, monkeypatch):
    from pullback_manifold import geodesics

    g = torch.Generator().manual_seed(5)
    z0, z1 = sample_cap(6, 1.0, g), sample_cap(6, 1.0, g)
    angle = great_circle(inverse_stereographic(z0), inverse_stereographic(z1))
    embed = sphere.decoder
    exact = geodesics.shooting_log(embed, z1, z0)
    assert exact.all_converged
    near = exact.tangent_vec * (1 + 1e-4 * torch.randn(6, 1, generator=g, dtype=F64))  # e.g. a discrete geodesic's
    calls = {"variational": 0}
    shoot = geodesics._shoot

    def counted(*args):
        calls["variational"] += 1
        return shoot(*args)

    monkeypatch.setattr(geodesics, "_shoot", counted)
    for start in (near, None):  # inside Newton's quadratic range, and from the straight line
        calls["variational"] = 0
        result = geodesics.shooting_log(embed, z1, z0, start, reuse_jacobian=True)
        assert result.all_converged, result.summary()
        torch.testing.assert_close(result.tangent_vec, exact.tangent_vec, rtol=0, atol=1e-7)
        norm = sphere.metric.norm(result.tangent_vec, z0)
        assert ((norm - angle).abs() / angle).max() < 1e-7
        if start is near:
            # one Jacobian at the start; the trial geodesics are shot without it
            assert calls["variational"] == 1, calls


def test_shooting_halves_each_pairs_failed_step_up_to_its_own_limit(sphere, monkeypatch):
    """Per-pair line searches in one batch (auto polishes pairs inside and outside its gate
    together): with every trial geodesic failing, a pair allowed h halvings is shot h + 1
    times in its first iteration, whatever the others' limits."""
    from pullback_manifold import geodesics

    g = torch.Generator().manual_seed(8)
    z0, z1 = sample_cap(3, 1.0, g), sample_cap(3, 1.0, g)
    tries = torch.zeros(3, dtype=torch.long)

    def failing(embed, velocity, base_point, options, regularization):
        rows = [int(((z0 - b).abs().amax(-1) == 0).nonzero()[0]) for b in base_point]
        tries[rows] += 1
        return torch.full_like(velocity, float("nan")), torch.zeros(len(velocity), dtype=torch.bool)

    monkeypatch.setattr(geodesics, "exp", failing)
    limits = torch.tensor([0, 3, 1])
    # A first guess keeps the first solve at full accuracy (from the straight line, shooting may
    # first solve loosely and spend its iteration measuring again).
    result = geodesics.shooting_log(
        sphere.decoder, z1, z0, z1 - z0, max_iter=1, max_halvings=limits, reuse_jacobian=True
    )
    assert tries.tolist() == (limits + 1).tolist()
    assert not result.converged.any()


def test_geodesic_to_an_end_point_follows_the_logs_own_discrete_geodesics(monkeypatch):
    """metric.geodesic(initial_point, end_point) under auto solved the discrete geodesics of
    the energy answers a second time, for those pairs alone: where two geodesics join a pair,
    which one the solver ends on depends on the pairs solved with it (the grid start spans
    their end points), so the path could follow another geodesic than the log's (a digits-VAE
    pair: a discrete geodesic 2e-4 longer). It follows the log's own."""
    from pullback_manifold import manifold

    z0 = torch.zeros(3, 2, dtype=F64)
    z1 = torch.tensor([[2.0, -1.5], [-2.5, 2.0], [1e-3, 0.0]], dtype=F64)
    starved = PullbackManifold(tanh_mlp(2, 8, seed=2), dim=2, ode_options=ODEOptions(max_num_steps=2))
    expected = starved.metric.geodesic_from_log(starved.metric.solve_log(z1, z0), z1, z0)

    def no_second_solve(*args, **kwargs):
        raise AssertionError("the discrete geodesics were solved again")

    energy = PullbackManifold(tanh_mlp(2, 8, seed=2), dim=2, log_method="energy")
    expected_energy = energy.metric.geodesic_from_log(energy.metric.solve_log(z1, z0), z1, z0)
    monkeypatch.setattr(manifold, "energy_log", no_second_solve)
    t = torch.linspace(0, 1, 5, dtype=F64)
    path = starved.metric.geodesic(initial_point=z0, end_point=z1)(t)
    torch.testing.assert_close(path, expected(t), rtol=0, atol=1e-12)
    # log_method="energy" too (it solved the whole batch again, unchunked: a reviewer's find)
    path = energy.metric.geodesic(initial_point=z0, end_point=z1)(t)
    torch.testing.assert_close(path, expected_energy(t), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="NaN or Inf"):  # was uninitialized memory, silently
        path = energy.metric.geodesic(initial_point=z0, end_point=z1)(torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        energy.metric.geodesic(initial_point=z0, initial_tangent_vec=z1)(float("nan"))
    with pytest.raises(ValueError, match=r"t has shape \(2, 3\): pass a number or a 1-D sequence"):
        energy.metric.geodesic(initial_point=z0, end_point=z1)(torch.rand(2, 3, dtype=F64))  # was (6, d), silently


def test_geodesic_path_beyond_its_end_points_reports_failed_solves():
    """A continuation outside [0, 1] that runs off (the metric vanishes far out) is NaN and
    reported per on_failure, as exp and the initial-value geodesic are (it was NaN, silently;
    a reviewer's find)."""
    torch.manual_seed(2)
    decoder = torch.nn.Sequential(
        torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)
    ).double()
    with torch.no_grad():
        decoder[0].weight.mul_(3)
    z0 = torch.tensor([0.31076852559876356, 0.998389794144314], dtype=F64)
    z1 = torch.tensor([-2.0406231602818203, -1.7628567964602637], dtype=F64)
    space = PullbackManifold(decoder, dim=2, log_method="energy", on_failure="raise")
    path = space.metric.geodesic(initial_point=z0, end_point=z1)
    torch.testing.assert_close(path(torch.tensor([1.0], dtype=F64))[0], z1, rtol=0, atol=1e-12)
    with pytest.raises(ConvergenceError, match="geodesic: 1 of 1 geodesic ODE solves failed"):
        path(torch.tensor([1.0, 1.3], dtype=F64))
