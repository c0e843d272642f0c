"""Quickstart: geodesics, distances and a Fréchet mean in the latent space of a decoder.

The decoder lifts the latent plane onto a surface with a steep hill in the
middle, f(z) = (z, h * exp(-|z|^2 / (2 s^2))). Shortest paths *on the surface*
go around the hill, so in latent space the geodesic bends away from the
straight line, the geodesic distance exceeds nothing the Euclidean latent
distance can tell you, and the Fréchet mean of points around the hill differs
from their average.

Run:  python examples/quickstart.py [--out examples/output]
Writes quickstart.png (latent space, magnification factor, geodesic vs straight line, means).
"""

import argparse
import pathlib
import time

import pullback_manifold  # noqa: F401  (import before geomstats: selects its pytorch backend)
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from geomstats.learning.frechet_mean import FrechetMean  # noqa: E402

from pullback_manifold import PullbackManifold  # noqa: E402
from pullback_manifold.plotting import plot_curves, plot_magnification  # noqa: E402


class HillDecoder(torch.nn.Module):
    """Latent plane -> surface in R^3 with a Gaussian hill of height `height` and width `width`."""

    def __init__(self, height: float = 1.5, width: float = 0.7):
        super().__init__()
        self.height = height
        self.width = width

    def forward(self, z):
        bump = self.height * torch.exp(-(z**2).sum(-1, keepdim=True) / (2 * self.width**2))
        return torch.cat([z, bump], dim=-1)


def main(out: pathlib.Path) -> None:
    torch.manual_seed(0)
    # geomstats' tools (FrechetMean below) make their own tensors in torch's default
    # dtype: run them with points of that dtype.
    torch.set_default_dtype(torch.float64)
    dtype = torch.float64
    space = PullbackManifold(HillDecoder(), dim=2)
    metric = space.metric

    # A geodesic across the hill, and the straight line it replaces.
    z0 = torch.tensor([-1.5, -0.45], dtype=dtype)
    z1 = torch.tensor([1.5, 0.05], dtype=dtype)
    t = torch.linspace(0, 1, 200, dtype=dtype)
    start = time.perf_counter()
    report = metric.solve_log(z1, z0)
    geodesic = metric.geodesic_from_log(report, z1, z0)(t)
    straight = z0 + t[:, None] * (z1 - z0)
    elapsed = time.perf_counter() - start
    dist = metric.dist(z0, z1)
    print(f"log: {report.summary()}  ({elapsed:.2f} s with the geodesic curve)")
    print(f"geodesic distance            {float(dist):.4f}")
    print(f"decoded geodesic length      {float(metric.curve_length(geodesic)):.4f}")
    print(f"decoded straight-line length {float(metric.curve_length(straight)):.4f}")
    print(f"Euclidean latent distance    {float((z1 - z0).norm()):.4f}")

    # Fréchet mean of points on an arc along the hill's flank: the Euclidean
    # average falls inside the arc, up the slope; the Fréchet mean stays near the arc.
    angles = torch.linspace(-0.9, 0.9, 10, dtype=dtype)
    points = torch.stack([0.9 * angles.cos(), 0.9 * angles.sin()], -1)
    estimator = FrechetMean(space)
    estimator.optimizer.epsilon = 1e-12
    start = time.perf_counter()
    mean = estimator.fit(points).estimate_
    print(f"Fréchet mean {mean.tolist()} vs Euclidean mean {points.mean(0).tolist()} ({time.perf_counter() - start:.1f} s)")
    first_order = metric.solve_log(points, mean).tangent_vec.mean(0)
    print(f"first-order condition |mean of logs| = {float(first_order.norm()):.2e}")

    fig, ax = plt.subplots(figsize=(7, 6))
    plot_magnification(ax, space, (-2.2, 2.2), (-2.2, 2.2), resolution=150)
    plot_curves(ax, straight, color="white", linestyle="--", label="straight line")
    plot_curves(ax, geodesic, color="tab:red", linewidth=2.5, label="geodesic")
    ax.scatter(*points.T.numpy(), color="white", edgecolor="black", s=30, label="points", zorder=3)
    ax.scatter(*points.mean(0).numpy(), marker="x", color="white", s=120, linewidth=3, label="Euclidean mean", zorder=4)
    ax.scatter(*mean.numpy(), marker="*", color="tab:red", edgecolor="black", s=250, label="Fréchet mean", zorder=4)
    ax.set_title("Latent space of a hill decoder: pull-back geometry")
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    ax.legend(loc="lower left", framealpha=0.9)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quickstart.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "output")
    main(parser.parse_args().out)
