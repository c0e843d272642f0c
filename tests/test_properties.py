"""Property-based tests over random decoders, points and batch shapes (hypothesis).

Decoders are seeded random tanh MLPs (``decoders_zoo.tanh_mlp``, 8 hidden units) with
``d`` in {2, 3} and ``D`` in ``d+1 .. d+3``; points are drawn in the box
``|z_i| <= BOX = 0.5``.

Why that region: the MLP's first layer has weights of size ``~1/sqrt(d)``, so inside
the box its units stay in tanh's near-linear range and the decoder is a small
perturbation of an immersion of a convex set. Its metric varies slowly there and
geodesics between two points of the box exist, stay nearby and are unique (the box is
well inside the injectivity radius). A random MLP can still be nearly rank-deficient
somewhere; examples whose metric has a condition number above ``MAX_CONDITION`` at
the drawn points are rejected (``assume``), since the degenerate case is
``test_reliability.py``'s subject, not these properties'.

Profiles: ``HYPOTHESIS_PROFILE=default`` (the default: few, derandomized examples,
the file stays within about a minute on one core, part of the plain ``pytest`` run)
or ``HYPOTHESIS_PROFILE=ci-long`` (more, random examples). Tests that solve
boundary-value problems run a third of the profile's examples (at least 3).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from decoders_zoo import swirl, tanh_mlp, unswirl
from pullback_manifold import PullbackManifold

F64 = torch.float64
BOX = 0.5
MAX_CONDITION = 100.0

# Inside the box every solve must converge: a ConvergenceWarning is a failure.
pytestmark = pytest.mark.filterwarnings("error::pullback_manifold.ConvergenceWarning")

_COMMON = dict(
    deadline=None,
    database=None,  # write nothing into the working tree
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
settings.register_profile("default", max_examples=10, derandomize=True, **_COMMON)
settings.register_profile("ci-long", max_examples=60, **_COMMON)
# Applied per test, not with load_profile: other test modules keep hypothesis' own settings.
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
CHEAP = settings(PROFILE)
SOLVES = settings(PROFILE, max_examples=max(3, PROFILE.max_examples // 3))


@st.composite
def decoders(draw, dims=(2, 3)):
    """``(seed, d, D)`` of a random tanh MLP."""
    d = draw(st.sampled_from(dims))
    return draw(st.integers(0, 10_000)), d, draw(st.integers(d + 1, d + 3))


def points(d, n):
    """``n`` points of the box, as nested lists (hypothesis shrinks coordinates towards 0)."""
    coordinate = st.floats(-BOX, BOX, allow_nan=False, allow_infinity=False, width=32)
    return st.lists(st.lists(coordinate, min_size=d, max_size=d), min_size=n, max_size=n)


def space_for(seed, d, D, dtype=F64):
    return PullbackManifold(tanh_mlp(d, D, hidden=8, seed=seed, dtype=dtype), dim=d)


def assume_well_conditioned(space, z):
    eigenvalues = torch.linalg.eigvalsh(space.metric.metric_matrix(z.reshape(-1, z.shape[-1])))
    assume(bool((eigenvalues[:, -1] <= MAX_CONDITION * eigenvalues[:, 0]).all()))


# ------------------------------------------------------------ local (no ODE)


@CHEAP
@given(decoder=decoders(), data=st.data(), batch=st.sampled_from([(3,), (2, 2), (1, 3, 1)]))
def test_batched_metric_and_christoffels_equal_single_calls(decoder, data, batch):
    seed, d, D = decoder
    n = int(torch.tensor(batch).prod())
    z = torch.tensor(data.draw(points(d, n)), dtype=F64).reshape(*batch, d)
    m = space_for(seed, d, D).metric
    flat = z.reshape(-1, d)
    G = m.metric_matrix(z)
    gamma = m.christoffels(z)
    assert G.shape == (*batch, d, d) and gamma.shape == (*batch, d, d, d)
    # the decoder sees batches of other sizes: only floating-point reassociation may differ
    torch.testing.assert_close(G.reshape(-1, d, d), torch.stack([m.metric_matrix(p) for p in flat]), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(
        gamma.reshape(-1, d, d, d), torch.stack([m.christoffels(p) for p in flat]), rtol=1e-10, atol=1e-12
    )


@CHEAP
@given(decoder=decoders(), data=st.data())
def test_float32_metric_matches_float64(decoder, data):
    seed, d, D = decoder
    z = torch.tensor(data.draw(points(d, 4)), dtype=F64)
    space = space_for(seed, d, D)  # one float64 module, evaluated in both dtypes
    G64 = space.metric.metric_matrix(z)
    G32 = space.metric.metric_matrix(z.float())
    assert G32.dtype == torch.float32
    # float32 rounding of a few dozen products: ~1e-6 relative to the metric's scale
    scale = G64.abs().amax()
    torch.testing.assert_close(G32.double(), G64, rtol=1e-5, atol=1e-6 * float(scale))


@CHEAP
@given(seed=st.integers(0, 10_000), D=st.integers(3, 5), data=st.data())
def test_metric_transforms_as_a_tensor_under_reparametrization(seed, D, data):
    """For codes w = h(z) and decoder f o h^-1: G_w(h(z)) = Dh^-T G_z(z) Dh^-1."""
    f = tanh_mlp(2, D, hidden=8, seed=seed)
    z = torch.tensor(data.draw(points(2, 3)), dtype=F64)
    G_z = PullbackManifold(f, dim=2).metric.metric_matrix(z)
    G_w = PullbackManifold(lambda w: f(unswirl(w)), dim=2).metric.metric_matrix(swirl(z))
    Dh_inv = torch.linalg.inv(torch.func.vmap(torch.func.jacfwd(swirl))(z))
    torch.testing.assert_close(G_w, Dh_inv.transpose(-1, -2) @ G_z @ Dh_inv, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------- geodesic solves


@SOLVES
@given(decoder=decoders(), data=st.data())
def test_dist_is_a_distance(decoder, data):
    """Symmetry, dist(a, a) == 0 and the triangle inequality, from one batched solve.

    Each distance is the length of a converged geodesic, accurate to ~1e-8 relative:
    1e-6 of the sum is a tolerance the axioms must meet.
    """
    seed, d, D = decoder
    a, b, c = torch.tensor(data.draw(points(d, 3)), dtype=F64)
    space = space_for(seed, d, D)
    assume_well_conditioned(space, torch.stack([a, b, c]))
    start = torch.stack([a, b, a, b, a])
    end = torch.stack([b, a, a, c, c])
    report = space.metric.solve_log(end, start)
    assert report.all_converged, report.summary()  # inside the box geodesics exist
    d_ab, d_ba, d_aa, d_bc, d_ac = space.metric.norm(report.tangent_vec, start)
    torch.testing.assert_close(d_ab, d_ba, rtol=1e-6, atol=1e-10)
    assert d_aa == 0
    assert d_ac <= (d_ab + d_bc) * (1 + 1e-6)


@SOLVES
@given(decoder=decoders(), data=st.data())
def test_exp_of_log_returns_the_point(decoder, data):
    seed, d, D = decoder
    z = torch.tensor(data.draw(points(d, 4)), dtype=F64)
    space = space_for(seed, d, D)
    assume_well_conditioned(space, z)
    z0, z1 = z[:2], z[2:]
    report = space.metric.solve_log(z1, z0)
    assert report.all_converged, report.summary()
    shot = report.converged & ~report.from_energy  # energy-method pairs do not promise an exact exp
    # log's end-point tolerance is 1e-8 (1 + max|z1|); the ODE's own error is below it
    torch.testing.assert_close(space.metric.exp(report.tangent_vec[shot], z0[shot]), z1[shot], rtol=0, atol=2e-8)


@SOLVES
@given(decoder=decoders(), data=st.data(), batch=st.sampled_from([(2,), (1, 2), (2, 1)]))
def test_batched_log_equals_single_calls(decoder, data, batch):
    seed, d, D = decoder
    z = torch.tensor(data.draw(points(d, 4)), dtype=F64)
    space = space_for(seed, d, D)
    assume_well_conditioned(space, z)
    z0, z1 = z[:2].reshape(*batch, d), z[2:].reshape(*batch, d)
    batched = space.metric.log(z1, z0)
    assert batched.shape == (*batch, d)
    single = torch.stack([space.metric.log(q, p) for p, q in zip(z0.reshape(-1, d), z1.reshape(-1, d))])
    # both solved to the end-point tolerance 1e-8; tangent vectors agree to that times dz/dv's conditioning
    torch.testing.assert_close(batched.reshape(-1, d), single, rtol=1e-6, atol=1e-8)


@SOLVES
@given(decoder=decoders(), data=st.data())
def test_float32_dist_matches_float64(decoder, data):
    seed, d, D = decoder
    z = torch.tensor(data.draw(points(d, 4)), dtype=F64)
    space = space_for(seed, d, D)
    assume_well_conditioned(space, z)
    d64 = space.metric.dist(z[:2], z[2:])
    d32 = space.metric.dist(z[:2].float(), z[2:].float())
    assert d32.dtype == torch.float32
    # float32 solves: ODE rtol 1e-5, log end-point tolerance 2e-5 (1 + max|z|)
    torch.testing.assert_close(d32.double(), d64, rtol=1e-4, atol=2e-5)


@SOLVES
@given(seed=st.integers(0, 10_000), D=st.integers(3, 5), data=st.data())
def test_dist_is_invariant_under_reparametrization(seed, D, data):
    """dist of f on (z0, z1) equals dist of f o h^-1 on (h(z0), h(z1)), h = swirl."""
    f = tanh_mlp(2, D, hidden=8, seed=seed)
    z = torch.tensor(data.draw(points(2, 4)), dtype=F64)
    original = PullbackManifold(f, dim=2)
    assume_well_conditioned(original, z)
    reparametrized = PullbackManifold(lambda w: f(unswirl(w)), dim=2)
    d_z = original.metric.dist(z[:2], z[2:])
    d_w = reparametrized.metric.dist(swirl(z[:2]), swirl(z[2:]))
    torch.testing.assert_close(d_w, d_z, rtol=1e-6, atol=1e-10)
