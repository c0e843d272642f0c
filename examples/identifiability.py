"""Identifiability: the same VAE in two latent parametrizations, one pull-back geometry.

A VAE's latent codes are only defined up to a smooth reparametrization: the model with
codes ``w = h(z)`` and decoder ``f ∘ h⁻¹`` decodes every point exactly as the original
does, and fits the data exactly as well. Here ``h(z) = R(alpha |z|²) z`` is a rotation
by an angle that grows with the norm (a swirl). We take the digits VAE of
``examples/digits_vae.py`` (``pullback_manifold.vae.digits_vae``) and compare:

* Euclidean latent distances and class means: they change with the parametrization;
* geodesic distances and Fréchet means of the pull-back (expected) metric: they do not
  (up to the solvers' tolerance), and the Fréchet mean in ``z`` mapped by ``h`` lands on
  the Fréchet mean in ``w``.

Run:  python examples/identifiability.py [--out examples/output] [--quick]
Writes identifiability.png (the two latent spaces side by side) and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import time
import warnings

import pullback_manifold  # noqa: F401  (import before geomstats: selects its pytorch backend)
import matplotlib

matplotlib.use("Agg")
import matplotlib.patheffects as path_effects  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from geomstats.learning.frechet_mean import FrechetMean  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from torch import nn  # noqa: E402

from pullback_manifold import ConvergenceWarning, GaussianDecoder, PullbackManifold  # noqa: E402
from pullback_manifold.plotting import plot_curves, plot_latent_points, plot_magnification  # noqa: E402
from pullback_manifold.vae import digits_vae  # noqa: E402

ALPHA = 0.25  # swirl strength: h rotates by ALPHA |z|^2 radians (1 rad at |z| = 2)

# (class, class) pairs of class-centre codes, and the classes whose means are compared.
PAIRS = ((0, 0), (4, 4), (7, 7), (0, 6), (1, 7))
MEAN_CLASSES = (0, 4, 7)
FULL = dict(pairs=PAIRS, mean_classes=MEAN_CLASSES, per_class=8, frechet_max_iter=3, resolution=140)
QUICK = dict(pairs=((4, 4),), mean_classes=(1, 6), per_class=3, frechet_max_iter=1, resolution=50)


# ----------------------------------------------------------------------------- the swirl
def swirl(z: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """``h(z) = R(alpha |z|^2) z`` (norm-preserving, smooth, invertible); shape ``(..., 2)``."""
    return _rotate(z, alpha * (z**2).sum(-1))


def unswirl(w: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """``h^{-1}(w) = R(-alpha |w|^2) w`` (``|h(z)| = |z|``); shape ``(..., 2)``."""
    return _rotate(w, -alpha * (w**2).sum(-1))


def _rotate(z, angle):
    c, s = angle.cos(), angle.sin()
    return torch.stack([c * z[..., 0] - s * z[..., 1], s * z[..., 0] + c * z[..., 1]], dim=-1)


class Unswirl(nn.Module):
    """``h^{-1}`` as a layer: ``nn.Sequential(Unswirl(), decoder)`` is ``decoder ∘ h^{-1}``, the
    decoder of the reparametrized model. Kept a Sequential so the geometry still uses the
    closed-form derivatives of the decoder's own layers (``pullback_manifold.jets``)."""

    def __init__(self, alpha: float = ALPHA):
        super().__init__()
        self.alpha = alpha

    def forward(self, w):
        return unswirl(w, self.alpha)


# ----------------------------------------------------------------------------- helpers
class Stages:
    """Wall time of each stage, printed as it ends."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - start
        print(f"   [{name}: {self.times[name]:.1f} s]", flush=True)

    def summary(self) -> None:
        print("\nTimings")
        for name, seconds in self.times.items():
            print(f"  {name:<40s} {seconds:7.1f} s")
        print(f"  {'total':<40s} {time.perf_counter() - self.start:7.1f} s")


def class_centre(codes, labels, k):
    """The code of class ``k`` nearest to the class's coordinate-wise median."""
    idx = (labels == k).nonzero().squeeze(-1)
    median = codes[idx].median(0).values
    return idx[(codes[idx] - median).norm(dim=-1).argmin()]


def frechet_mean(space, points, init):
    """geomstats' FrechetMean, all classes batched: ``points (n, n_classes, 2)`` -> ``(n_classes, 2)``.

    Returns the means, the per-pair report of the logarithms at the means, and the
    first-order residual ``|mean of logs|_G / mean distance`` per class (0 at a Fréchet mean).
    """
    estimator = FrechetMean(space, method="batch")
    estimator.optimizer.init_point = init.clone()
    estimator.optimizer.epsilon = 1e-15  # sum over classes of |mean of logs|_G^2
    estimator.optimizer.max_iter = SETTINGS["frechet_max_iter"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        mean = estimator.fit(points).estimate_
        # (flattened as FrechetMean flattens them, so that the solver recognizes them)
        flat_points, flat_means = points.reshape(-1, 2), mean[None].expand_as(points).reshape(-1, 2)
        logs = space.metric.log(flat_points, flat_means).reshape(points.shape)
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            print(f"   ConvergenceWarning during the iterations: {str(w.message).split(';')[0]}")
    # every logarithm at the means checked by solve_log, started from the warm solution
    report = space.metric.solve_log(points, mean[None].expand_as(points), initial_tangent_vec=logs)
    logs = report.tangent_vec
    gradient = space.metric.norm(logs.mean(0), mean)
    spread = space.metric.norm(logs, mean[None].expand_as(points)).mean(0)
    return mean, report, gradient / spread


SETTINGS = FULL


def main(out: pathlib.Path, quick: bool) -> None:
    global SETTINGS
    SETTINGS = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    with stages("train the VAE (digits_vae(seed=0))"):
        vae = digits_vae(seed=0)  # before the default dtype changes (the VAE trains in float32)
    torch.set_default_dtype(torch.float64)  # geomstats' FrechetMean makes tensors in the default dtype

    # The same model twice: codes z with decoder (mu, sigma), codes w = h(z) with (mu, sigma) o h^-1.
    space_z = PullbackManifold(vae.decoder, dim=2)
    space_w = PullbackManifold(GaussianDecoder(nn.Sequential(Unswirl(), vae.mean_decoder), nn.Sequential(Unswirl(), vae.std)), dim=2)
    codes, labels = vae.codes, vae.labels
    codes_w = swirl(codes)
    with torch.no_grad():
        x_z = vae.decoder.embed(codes[:50])
        x_w = space_w.decoder.embed(codes_w[:50])
    print(f"   the two models decode every code identically: max |f(z) - (f o h^-1)(h(z))| = "
          f"{float((x_z - x_w).abs().max()):.1e}")

    # ------------------------------------------------------------------ distances
    with stages("distances between class codes, in z and in w"):
        idx = torch.tensor([[class_centre(codes, labels, a), class_centre(codes, labels, b)] for a, b in SETTINGS["pairs"]])
        # same-class pairs: the class centre and the class code at the 90th percentile of distance from it
        for row, (a, b) in enumerate(SETTINGS["pairs"]):
            if a == b:
                members = (labels == a).nonzero().squeeze(-1)
                gap = (codes[members] - codes[idx[row, 0]]).norm(dim=-1)
                idx[row, 1] = members[gap.argsort()[int(0.9 * len(members))]]
        z0, z1 = codes[idx[:, 0]], codes[idx[:, 1]]
        w0, w1 = swirl(z0), swirl(z1)
        report_z = space_z.metric.solve_log(z1, z0)
        report_w = space_w.metric.solve_log(w1, w0)
        print(f"   z: {report_z.summary()}")
        print(f"   w: {report_w.summary()}")
        ok = report_z.converged & report_w.converged
        d_z = space_z.metric.norm(report_z.tangent_vec, z0)
        d_w = space_w.metric.norm(report_w.tangent_vec, w0)
        e_z, e_w = (z1 - z0).norm(dim=-1), (w1 - w0).norm(dim=-1)
        print(f"\n   {'pair':<8s} {'|z1-z0|':>8s} {'|w1-w0|':>8s} {'rel. diff':>9s}   {'geodesic z':>11s} {'geodesic w':>11s} {'rel. diff':>9s}")
        for i, (a, b) in enumerate(SETTINGS["pairs"]):
            name = f"{a} to {b}"
            geo = (
                f"{float(d_z[i]):11.6f} {float(d_w[i]):11.6f} {float((d_w[i] - d_z[i]).abs() / d_z[i]):9.1e}"
                if ok[i]
                else f"{'not converged: left out':>33s}"
            )
            print(f"   {name:<8s} {float(e_z[i]):8.4f} {float(e_w[i]):8.4f} {float((e_w[i] - e_z[i]).abs() / e_z[i]):9.1e}   {geo}")
        rel_euclidean = ((e_w - e_z).abs() / e_z).max()
        rel_geodesic = ((d_w - d_z).abs() / d_z)[ok].max() if ok.any() else float("nan")
        print(f"\n   max relative difference, Euclidean latent distances: {float(rel_euclidean):.1e}")
        print(f"   max relative difference, geodesic distances:         {float(rel_geodesic):.1e}"
              f"   ({int(ok.sum())}/{len(ok)} pairs converged in both)")
        t = torch.linspace(0, 1, 101, dtype=torch.float64)
        geodesics_z = space_z.metric.geodesic_from_log(report_z[ok], z1[ok], z0[ok])(t)
        geodesics_w = space_w.metric.geodesic_from_log(report_w[ok], w1[ok], w0[ok])(t)
        print(f"   geodesic in w vs h(geodesic in z), max latent gap along the curves: "
              f"{float((geodesics_w - swirl(geodesics_z)).norm(dim=-1).max()):.1e}")

    # ------------------------------------------------------------------ means
    with stages("class means, in z and in w"):
        classes = list(SETTINGS["mean_classes"])
        n = SETTINGS["per_class"]
        g = torch.Generator().manual_seed(0)
        sample = torch.stack(
            [(labels == k).nonzero().squeeze(-1)[torch.randperm(int((labels == k).sum()), generator=g)[:n]] for k in classes],
            dim=1,
        )  # (n, n_classes)
        pz = codes[sample]
        pw = swirl(pz)
        euclid_z, euclid_w = pz.mean(0), pw.mean(0)
        # Riemannian gradient descent (geomstats' FrechetMean) is run in each parametrization
        # with its own metric, logs and exps, from corresponding starting points (the
        # Euclidean mean in z, and its image by h): if the geometry does not depend on the
        # parametrization, every iterate in w is h of the iterate in z.
        frechet_z, check_z, grad_z = frechet_mean(space_z, pz, euclid_z)
        frechet_w, check_w, grad_w = frechet_mean(space_w, pw, swirl(euclid_z))
        print(f"   FrechetMean(space, method='batch'), {n} codes per class of classes {classes}, "
              f"at most {SETTINGS['frechet_max_iter']} gradient steps, started from the Euclidean mean in z "
              "and from its image by h in w")
        print(f"   logarithms at the means, z: {check_z.summary()}")
        print(f"   logarithms at the means, w: {check_w.summary()}")
        ok_means = check_z.converged.all(0) & check_w.converged.all(0)
        print(f"\n   {'class':>5s} {'|h(Euclid z) - Euclid w|':>25s} {'|h(Frechet z) - Frechet w|':>27s} "
              f"{'first-order z':>14s} {'first-order w':>14s}")
        for c, k in enumerate(classes):
            frechet_gap = (
                f"{float((swirl(frechet_z[c]) - frechet_w[c]).norm()):27.1e}"
                if ok_means[c]
                else f"{'not converged: left out':>27s}"
            )
            print(f"   {k:>5d} {float((swirl(euclid_z[c]) - euclid_w[c]).norm()):25.1e} {frechet_gap} "
                  f"{float(grad_z[c]):14.1e} {float(grad_w[c]):14.1e}")
        print("   (first-order: |mean of logs|_G / mean distance at the estimate; 0 at an exact Fréchet mean)")
        if ok_means.any():
            print(f"   max |h(Frechet z) - Frechet w| = {float((swirl(frechet_z) - frechet_w).norm(dim=-1)[ok_means].max()):.1e}, "
                  f"max |h(Euclid z) - Euclid w| = {float((swirl(euclid_z) - euclid_w).norm(dim=-1).max()):.1e}")

    # ------------------------------------------------------------------ picture
    with stages("picture"):
        lim = float(codes.norm(dim=-1).max()) + 0.3
        fig, axes = plt.subplots(1, 2, figsize=(15, 7))
        outline = [path_effects.Stroke(linewidth=4.5, foreground="black"), path_effects.Normal()]
        colours = matplotlib.colormaps["tab10"]
        straight_z = z0[ok][:, None] + t[:, None] * (z1 - z0)[ok][:, None]
        straight_w = w0[ok][:, None] + t[:, None] * (w1 - w0)[ok][:, None]
        panels = [
            (axes[0], space_z, codes, geodesics_z, straight_z, euclid_z, frechet_z, unswirl(frechet_w), "original codes $z$", "z"),
            (axes[1], space_w, codes_w, geodesics_w, straight_w, euclid_w, swirl(frechet_z), frechet_w,
             r"reparametrized codes $w = h(z) = R(\alpha|z|^2)\,z$", "w"),
        ]
        for ax, space, points, geos, lines, euclid, frechet_mark, frechet_ring, title, v in panels:
            plot_magnification(ax, space, (-lim, lim), (-lim, lim), resolution=SETTINGS["resolution"], cmap="Greys")
            plot_latent_points(ax, points, labels, s=6, alpha=0.8, legend=False)
            plot_curves(ax, lines, color="white", linewidth=2, linestyle=(0, (4, 2)), path_effects=outline)
            plot_curves(ax, geos, color="white", linewidth=2.5, path_effects=outline)
            for c, k in enumerate(classes):
                ax.scatter(*euclid[c].numpy(), marker="X", s=100, color=colours(k), edgecolor="black", zorder=6)
                if ok_means[c]:
                    ax.scatter(*frechet_mark[c].numpy(), marker="*", s=300, color=colours(k), edgecolor="black", zorder=6)
                    ax.scatter(*frechet_ring[c].numpy(), marker="o", s=420, facecolor="none", edgecolor="red",
                               linewidth=1.8, zorder=7)
            ax.set_title(title, fontsize=11)
            ax.set_xlabel(f"${v}_1$")
            ax.set_ylabel(f"${v}_2$")
        class_handles = [Line2D([], [], marker="o", linestyle="", color=colours(k), label=str(k)) for k in range(10)]
        legend = axes[0].legend(handles=class_handles, title="class", loc="upper left", fontsize=8, framealpha=0.9)
        axes[0].add_artist(legend)
        style_handles = [
            Line2D([], [], color="white", linewidth=2.5, path_effects=outline, label="geodesic"),
            Line2D([], [], color="white", linewidth=2, linestyle=(0, (4, 2)), path_effects=outline, label="straight line"),
            Line2D([], [], marker="X", linestyle="", markersize=9, color="lightgray", markeredgecolor="black",
                   label="Euclidean class mean"),
            Line2D([], [], marker="*", linestyle="", markersize=14, color="lightgray", markeredgecolor="black",
                   label="Fréchet mean in z (right: mapped by h)"),
            Line2D([], [], marker="o", linestyle="", markersize=14, markerfacecolor="none", markeredgecolor="red",
                   label="Fréchet mean in w (left: mapped by h⁻¹)"),
        ]
        axes[1].legend(handles=style_handles, loc="lower right", fontsize=8, framealpha=0.9)
        fig.suptitle(
            f"One model, two latent parametrizations (swirl h, alpha = {ALPHA}): straight lines and Euclidean means "
            "change, geodesics and Fréchet means do not\nbackground: magnification factor "
            r"$\sqrt{\det G}$ of the expected metric (dark: long distances)",
            fontsize=11,
        )
        path = out / "identifiability.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        print(f"   wrote {path}")
    stages.summary()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "output")
    parser.add_argument("--quick", action="store_true", help="fewer pairs and classes (for tests)")
    args = parser.parse_args()
    main(args.out, args.quick)
