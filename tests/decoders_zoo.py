"""Decoders with known geometry, shared by the tests."""

import math

import torch


def linear_decoder(A: torch.Tensor, b: torch.Tensor):
    """PPCA-style ``f(z) = A z + b``: G = A^T A, straight geodesics."""
    return lambda z: z @ A.T + b


def spherical_chart(z: torch.Tensor) -> torch.Tensor:
    """(theta, phi) -> unit sphere, geomstats' convention (theta from the north pole)."""
    theta, phi = z[..., 0], z[..., 1]
    return torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()], dim=-1)


def inverse_stereographic(z: torch.Tensor) -> torch.Tensor:
    """R^2 -> unit sphere minus the south pole; z = 0 is the north pole."""
    sq = (z**2).sum(-1, keepdim=True)
    return torch.cat([2 * z / (1 + sq), (1 - sq) / (1 + sq)], dim=-1)


def stereographic(x: torch.Tensor) -> torch.Tensor:
    """Unit sphere minus the south pole -> R^2."""
    return x[..., :2] / (1 + x[..., 2:])


def sample_cap(n: int, max_angle: float, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Stereographic coordinates of points within ``max_angle`` of the north pole."""
    angle = torch.rand(n, generator=generator, dtype=dtype) * max_angle
    azimuth = torch.rand(n, generator=generator, dtype=dtype) * 2 * math.pi
    radius = torch.tan(angle / 2)
    return torch.stack([radius * azimuth.cos(), radius * azimuth.sin()], dim=-1)


def great_circle(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Angle between unit vectors, stable for small and large angles."""
    return torch.atan2(torch.linalg.cross(x0, x1).norm(dim=-1), (x0 * x1).sum(-1))


def tanh_mlp(latent_dim: int, output_dim: int, hidden: int = 32, seed: int = 0, dtype=torch.float64):
    """A random nonlinear decoder."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(latent_dim, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, output_dim),
    )
    return net.to(dtype)


def rotation_angle(z: torch.Tensor) -> torch.Tensor:
    """theta(|z|) = |z|^2 of the norm-dependent rotation (smooth at 0: no sqrt)."""
    return (z**2).sum(-1)


def _rotate(z: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    c, s = angle.cos(), angle.sin()
    return torch.stack([c * z[..., 0] - s * z[..., 1], s * z[..., 0] + c * z[..., 1]], dim=-1)


def swirl(z: torch.Tensor) -> torch.Tensor:
    """h(z) = R(theta(|z|)) z, a smooth reparametrization of R^2 (norm-preserving)."""
    return _rotate(z, rotation_angle(z))


def unswirl(w: torch.Tensor) -> torch.Tensor:
    """h^{-1}(w) = R(-theta(|w|)) w."""
    return _rotate(w, -rotation_angle(w))
