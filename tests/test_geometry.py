"""Metric tensor, Christoffel symbols, geodesic equation, curves: against closed forms."""

import math

import pytest
import torch

from decoders_zoo import inverse_stereographic, linear_decoder, spherical_chart, tanh_mlp
from pullback_manifold import PullbackManifold

F64 = torch.float64


@pytest.fixture
def linear_space():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, 3, generator=g, dtype=F64)
    b = torch.randn(7, generator=g, dtype=F64)
    return PullbackManifold(linear_decoder(A, b), dim=3), A


def test_linear_metric_is_AtA_everywhere(linear_space):
    space, A = linear_space
    z = torch.randn(11, 3, dtype=F64)
    G = space.metric.metric_matrix(z)
    torch.testing.assert_close(G, (A.T @ A).expand(11, 3, 3), rtol=1e-12, atol=1e-12)


def test_linear_christoffels_vanish(linear_space):
    space, _ = linear_space
    gamma = space.metric.christoffels(torch.randn(5, 3, dtype=F64))
    assert gamma.shape == (5, 3, 3, 3)
    assert gamma.abs().max() < 1e-12


def test_sphere_chart_metric_and_christoffels_closed_form():
    space = PullbackManifold(spherical_chart, dim=2)
    theta = torch.linspace(0.3, 2.8, 7, dtype=F64)
    z = torch.stack([theta, torch.linspace(-1, 3, 7, dtype=F64)], -1)
    G = space.metric.metric_matrix(z)
    expected = torch.zeros(7, 2, 2, dtype=F64)
    expected[:, 0, 0] = 1
    expected[:, 1, 1] = theta.sin() ** 2
    torch.testing.assert_close(G, expected, rtol=0, atol=1e-13)
    gamma = space.metric.christoffels(z)
    # Gamma^theta_{phi phi} = -sin cos, Gamma^phi_{theta phi} = cot
    torch.testing.assert_close(gamma[:, 0, 1, 1], -theta.sin() * theta.cos(), rtol=0, atol=1e-12)
    torch.testing.assert_close(gamma[:, 1, 0, 1], theta.cos() / theta.sin(), rtol=0, atol=1e-12)
    torch.testing.assert_close(gamma[:, 1, 1, 0], theta.cos() / theta.sin(), rtol=0, atol=1e-12)


def test_sphere_has_unit_sectional_curvature():
    space = PullbackManifold(inverse_stereographic, dim=2)
    z = torch.randn(4, 2, dtype=F64) * 0.5
    a = torch.tensor([1.0, 0.0], dtype=F64).expand(4, 2)
    b = torch.tensor([0.3, 1.0], dtype=F64).expand(4, 2)
    k = space.metric.sectional_curvature(a, b, z)
    torch.testing.assert_close(k, torch.ones(4, dtype=F64), rtol=1e-9, atol=1e-9)


def test_jvp_acceleration_equals_christoffel_contraction():
    """DESIGN §2: -G^{-1} J^T d2f[v,v] == -Gamma^k_ij v^i v^j, to 1e-10 (float64)."""
    space = PullbackManifold(tanh_mlp(3, 20), dim=3)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(16, 3, generator=g, dtype=F64)
    v = torch.randn(16, 3, generator=g, dtype=F64)
    gamma = space.metric.christoffels(z)
    from_christoffels = -torch.einsum("nkij,ni,nj->nk", gamma, v, v)
    from_jvp = space.metric.geodesic_acceleration(z, v)
    scale = from_christoffels.abs().max()
    assert scale > 1e-2  # the decoder is genuinely curved
    assert (from_jvp - from_christoffels).abs().max() <= 1e-10 * max(1.0, float(scale))


def test_geodesic_equation_layout():
    space = PullbackManifold(tanh_mlp(2, 5), dim=2)
    state = torch.randn(4, 2, 2, dtype=F64)
    out = space.metric.geodesic_equation(state)
    assert out.shape == (4, 2, 2)
    torch.testing.assert_close(out[:, 0], state[:, 1])
    torch.testing.assert_close(out[:, 1], space.metric.geodesic_acceleration(state[:, 0], state[:, 1]))


def test_inner_product_norm_angle(linear_space):
    space, A = linear_space
    z = torch.randn(3, dtype=F64)
    a, b = torch.randn(2, 3, dtype=F64)
    torch.testing.assert_close(space.metric.inner_product(a, b, z), (A @ a) @ (A @ b))
    torch.testing.assert_close(space.metric.norm(a, z), (A @ a).norm())
    cos = (A @ a) @ (A @ b) / ((A @ a).norm() * (A @ b).norm())
    torch.testing.assert_close(space.metric.angle(a, b, z), torch.arccos(cos))


def test_angle_is_conformal_on_stereographic_chart():
    space = PullbackManifold(inverse_stereographic, dim=2)
    z = torch.tensor([[0.4, -0.7]], dtype=F64)
    a = torch.tensor([[1.0, 0.0]], dtype=F64)
    b = torch.tensor([[math.cos(0.9), math.sin(0.9)]], dtype=F64)
    torch.testing.assert_close(space.metric.angle(a, b, z), torch.tensor([0.9], dtype=F64))


def test_curve_length_and_energy_of_a_decoded_great_circle():
    space = PullbackManifold(spherical_chart, dim=2)
    t = torch.linspace(0, 1, 2001, dtype=F64)
    equator = torch.stack([torch.full_like(t, math.pi / 2), 2.0 * t], -1)  # arc of length 2
    length = space.metric.curve_length(equator)
    energy = space.metric.curve_energy(equator)
    assert abs(float(length) - 2.0) < 1e-6
    assert abs(float(energy) - 2.0) < 1e-5  # 1/2 * speed^2 = 1/2 * 4
    batch = torch.stack([equator, equator[:, [1, 0]] * 0 + equator])
    assert space.metric.curve_length(batch).shape == (2,)
