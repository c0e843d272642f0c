"""Decoders that give their metric directly (MetricDecoder): the Koszul/JVP path against closed forms."""

import math

import torch

from decoders_zoo import great_circle, inverse_stereographic, sample_cap
from pullback_manifold import MetricDecoder, PullbackManifold

F64 = torch.float64


class StereographicSphereMetric(MetricDecoder):
    """The round sphere in stereographic coordinates, G = 4 / (1 + |z|^2)^2 I, given in closed form."""

    def _embed(self, z):
        return inverse_stereographic(z)

    def metric(self, z):
        factor = 4 / (1 + (z**2).sum(-1)) ** 2
        return factor[:, None, None] * torch.eye(2, dtype=z.dtype, device=z.device)


def test_metric_field_matches_the_pullback_it_equals():
    by_metric = PullbackManifold(StereographicSphereMetric(), dim=2)
    by_pullback = PullbackManifold(inverse_stereographic, dim=2)
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
    for name in ("metric_matrix", "christoffels"):
        torch.testing.assert_close(
            getattr(by_metric.metric, name)(z), getattr(by_pullback.metric, name)(z), rtol=1e-10, atol=1e-12
        )
    torch.testing.assert_close(
        by_metric.metric.geodesic_acceleration(z, v),
        by_pullback.metric.geodesic_acceleration(z, v),
        rtol=1e-10,
        atol=1e-12,
    )


def test_metric_field_distances_are_great_circles():
    space = PullbackManifold(StereographicSphereMetric(), dim=2)
    g = torch.Generator().manual_seed(1)
    z0, z1 = sample_cap(12, 1.2, g), sample_cap(12, 1.2, g)
    truth = great_circle(inverse_stereographic(z0), inverse_stereographic(z1))
    dist = space.metric.dist(z0, z1)
    torch.testing.assert_close(dist, truth, rtol=1e-6, atol=1e-9)
    # midpoint-rule curve length of a fine straight segment vs its closed form on the sphere
    t = torch.linspace(0, 1, 2001, dtype=F64)[:, None]
    segment = torch.tensor([0.0, -1.0], dtype=F64) * (1 - t) + torch.tensor([0.0, 1.0], dtype=F64) * t
    # the z_0 = 0 meridian through both poles' stereographic images: +-1 are on the equator, a half great circle
    torch.testing.assert_close(space.metric.curve_length(segment), torch.tensor(math.pi, dtype=F64), rtol=1e-6, atol=0)


class ConformalSphereMetric(MetricDecoder):
    """The round unit sphere S^d in stereographic coordinates of any dimension d."""

    def _embed(self, z):
        return inverse_stereographic(z)

    def metric(self, z):
        factor = 4 / (1 + (z**2).sum(-1)) ** 2
        return factor[:, None, None] * torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)


class WarpedMetric(MetricDecoder):
    """A non-conformal metric field with off-diagonal terms, in any dimension: ``A(z)^T A(z) + I``."""

    def __init__(self, d: int):
        g = torch.Generator().manual_seed(d)
        self.W = torch.randn(d, d, d, generator=g, dtype=F64) / d

    def _embed(self, z):
        return z

    def metric(self, z):
        A = torch.tanh(torch.einsum("kij,nk->nij", self.W, z) + 0.3)
        return A.transpose(-1, -2) @ A + torch.eye(z.shape[-1], dtype=z.dtype)


def test_newton_terms_of_the_midpoint_energy_are_its_gradient_and_hessian():
    """The block-tridiagonal gradient and Hessian that Newton's method uses on metric-field
    polygons, from G, dG and d^2 G at the midpoints, against autograd's gradient and Hessian
    of the midpoint-rule energy (curve_energy) itself, in d = 1, 2, 3."""
    from pullback_manifold.discrete import _metric_field_newton_terms
    from pullback_manifold.geometry import curve_energy

    g = torch.Generator().manual_seed(4)
    for decoder, d in [
        (StereographicSphereMetric(), 2),
        (WarpedMetric(1), 1),
        (WarpedMetric(2), 2),
        (WarpedMetric(3), 3),
    ]:
        curves = torch.randn(2, 7, d, generator=g, dtype=F64)
        gradient, diagonal, coupling = _metric_field_newton_terms(decoder, curves)
        for c, grad_i, diag_i, coup_i in zip(curves, gradient, diagonal, coupling):

            def energy(inner, c=c, decoder=decoder, d=d):
                return curve_energy(decoder, torch.cat([c[:1], inner.reshape(-1, d), c[-1:]]))

            inner = c[1:-1].reshape(-1)
            m = len(c) - 2
            hessian = torch.zeros(m * d, m * d, dtype=F64)
            for i in range(m):
                hessian[i * d : (i + 1) * d, i * d : (i + 1) * d] = diag_i[i]
                if i < m - 1:
                    hessian[i * d : (i + 1) * d, (i + 1) * d : (i + 2) * d] = coup_i[i]
                    hessian[(i + 1) * d : (i + 2) * d, i * d : (i + 1) * d] = coup_i[i].T
            reference = torch.func.hessian(energy)(inner)
            scale = reference.abs().max().item()
            torch.testing.assert_close(grad_i.reshape(-1), torch.func.grad(energy)(inner), rtol=0, atol=1e-11 * scale)
            torch.testing.assert_close(hessian, reference, rtol=0, atol=1e-11 * scale)


def test_metric_field_discrete_geodesics_converge_by_newton_in_a_few_steps():
    """With the exact Hessian, 32-segment polygons from the straight line reach the node
    tolerance within 4 Newton iterations on the sphere (measured: 3; with the matrix of G
    alone, without the dG and d^2 G terms, two of the six pairs needed 12); their lengths are
    the great circles' up to the discretization error."""
    from pullback_manifold.discrete import discrete_geodesic

    g = torch.Generator().manual_seed(2)
    z0, z1 = sample_cap(6, 1.3, g), sample_cap(6, 1.3, g)
    decoder = StereographicSphereMetric()
    curve, converged = discrete_geodesic(decoder, z1, z0, n_segments=32, max_iter=4)
    assert converged.all()
    truth = great_circle(inverse_stereographic(z0), inverse_stereographic(z1))
    length = PullbackManifold(decoder, dim=2).metric.curve_length(curve)
    torch.testing.assert_close(length, truth, rtol=2e-3, atol=0)


def test_metric_field_distances_in_higher_dimensions_are_great_circles():
    """S^5 and S^9 in stereographic coordinates: d = 5 by Newton's method (up to d = 8),
    d = 9 by L-BFGS and Gauss-Newton; both give the great-circle distances."""
    for d in (5, 9):
        space = PullbackManifold(ConformalSphereMetric(), dim=d)
        g = torch.Generator().manual_seed(d)
        z0, z1 = 0.5 * torch.randn(4, d, generator=g, dtype=F64), 0.5 * torch.randn(4, d, generator=g, dtype=F64)
        x0, x1 = inverse_stereographic(z0), inverse_stereographic(z1)
        truth = 2 * torch.asin((x0 - x1).norm(dim=-1) / 2)
        torch.testing.assert_close(space.metric.dist(z0, z1), truth, rtol=1e-6, atol=1e-9)


class _BackwardOnlySquare(torch.autograd.Function):
    """``x * x`` with a backward formula only: no forward-mode autodiff."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class ConformalMetric(MetricDecoder):
    """``(1 + |z|^2) I``; with ``backward_only``, ``|z|^2`` by a backward-only autograd.Function."""

    def __init__(self, backward_only: bool):
        self.backward_only = backward_only

    def _embed(self, z):
        return z

    def metric(self, z):
        squares = _BackwardOnlySquare.apply(z) if self.backward_only else z * z
        return (1 + squares.sum(-1))[:, None, None] * torch.eye(z.shape[-1], dtype=z.dtype)


def test_a_metric_without_forward_mode_autodiff_gets_the_first_order_energy_method():
    """Newton's method needs d^2 G, by forward-mode JVPs by default; a metric built on a
    backward-only autograd.Function cannot give them, and is minimized by L-BFGS (reverse
    mode only), as before Newton was used on metric fields. Same lengths as the same metric
    in plain torch (Newton), within the certified error."""
    from pullback_manifold.discrete import energy_log

    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 2, generator=g, dtype=F64), torch.randn(3, 2, generator=g, dtype=F64)
    first_order, _, lengths = energy_log(ConformalMetric(backward_only=True), z1, z0)
    newton, _, reference = energy_log(ConformalMetric(backward_only=False), z1, z0)
    assert first_order.converged.all() and newton.converged.all()
    assert ((lengths - reference).abs() / reference <= first_order.residual + newton.residual).all()
