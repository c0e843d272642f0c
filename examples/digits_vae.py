"""Pull-back geometry of a VAE's latent space: scikit-learn's digits.

A small Gaussian-decoder VAE with a 2-D latent space is trained on the 8x8 digits
bundled with scikit-learn (no download; ``pullback_manifold.vae.digits_vae``). Its
decoder standard deviation ``sigma(z)`` is an RBF-precision network that grows away from
the data, and the latent space carries the expected metric
``G = J_mu^T J_mu + J_sigma^T J_sigma``: long where the decoder changes fast *or* where
it is uncertain, so geodesics follow the data.

1. Per-class Fréchet means (geomstats' ``FrechetMean``) vs Euclidean means of the codes,
   decoded (``digits_means.png``).
2. Geodesic vs straight-line interpolation between a few pairs of codes, decoded
   (``digits_interpolations.png``).
3. k-medoids clustering and leave-one-out k-nearest-neighbour classification of a small
   subsample, with the geodesic distance matrix vs Euclidean latent distances.
4. The latent space: codes coloured by class over the magnification factor
   ``sqrt(det G)``, with the geodesics, straight lines and means (``digits_latent.png``).

Geodesics on this decoder are expensive (the RBF bumps of ``sigma`` take a few hundred
ODE steps per geodesic, and one logarithm is several geodesic solves), and a batch of
logarithms costs about as much as a single one up to ~100 pairs: every logarithm of
parts 2 and 3 is solved in one batched ``space.metric.solve_log`` call. Its per-pair
report is checked: the number of converged pairs is printed, and a pair that did not
converge is left out of what follows (and counted), never used as if it had converged.

Run:  python examples/digits_vae.py [--out examples/output] [--quick]
(``--quick``: fewer pairs, classes and iterations, used by the tests.) Use
``OMP_NUM_THREADS=1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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

from pullback_manifold import ConvergenceWarning, ODEOptions, PullbackManifold  # noqa: E402
from pullback_manifold.plotting import (  # noqa: E402
    plot_curves,
    plot_image_strip,
    plot_latent_points,
    plot_magnification,
)
from pullback_manifold.vae import digits_vae  # noqa: E402

# Solver settings. Geodesics of this decoder need many ODE steps; ODE tolerances of 1e-5
# (the default is 1e-7) make them cheaper and still give distances far more accurate
# than the statistics below can tell apart. A logarithm is "converged" when its geodesic
# ends within 1e-6 (relative) of the target point.
ODE_OPTIONS = ODEOptions(rtol=1e-5, atol=1e-7)
LOG_TOL = 1e-6
MAX_NEWTON = 15

FULL = dict(
    same_class=(2,),  # a pair of codes of one class whose straight line leaves the data
    cross_class=((0, 7), (2, 6)),  # class centres on opposite sides of the latent plane
    frechet_classes=tuple(range(10)),
    frechet_per_class=8,
    frechet_max_iter=2,
    neighbour_classes=(3, 5, 8, 9),  # neighbouring clusters in the middle-left of the plane
    neighbour_per_class=3,
    resolution=160,
)
QUICK = dict(
    same_class=(),
    cross_class=((1, 8),),  # neighbouring clusters: a short geodesic
    frechet_classes=(1, 6),  # compact classes
    frechet_per_class=3,
    frechet_max_iter=1,
    neighbour_classes=(1, 6),
    neighbour_per_class=2,
    resolution=50,
)

IMAGE_SHAPE = (8, 8)


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
            print(f"  {name:<44s} {seconds:7.1f} s")
        print(f"  {'total':<44s} {time.perf_counter() - self.start:7.1f} s")


class Float64Views:
    """float64 copies of the decoder mean and sigma, for decoding and evaluating sigma
    (the VAE returned by ``digits_vae``, cached and shared, is left untouched)."""

    def __init__(self, vae):
        self.mean = copy.deepcopy(vae.mean_decoder).to(torch.float64)
        self.std = copy.deepcopy(vae.std).to(torch.float64)

    def decode(self, z):
        """Decoder mean images, ``(..., 2) -> (..., 64)``."""
        with torch.no_grad():
            return self.mean(z.reshape(-1, 2)).reshape(*z.shape[:-1], -1)

    def sigma(self, z):
        """Decoder sigma averaged over the pixels, ``(..., 2) -> (...)``."""
        with torch.no_grad():
            return self.std(z.reshape(-1, 2)).mean(-1).reshape(z.shape[:-1])


def class_sample(labels, sigma, k, n, generator):
    """``n`` random indices of class ``k`` among its typical codes (sigma below the class median).

    Typical codes lie inside the class's cluster: geodesics between them stay short,
    and short geodesics are cheap to solve.
    """
    idx = (labels == k).nonzero().squeeze(-1)
    idx = idx[sigma[idx] <= sigma[idx].median()]
    return idx[torch.randperm(len(idx), generator=generator)[:n]]


def choose_pairs(codes, labels, views, settings, generator):
    """Index pairs ``(n_pairs, 2)`` and their names.

    Same class: among 200 random pairs of codes with sigma below the class median,
    the one whose straight line reaches the largest sigma (it leaves the data).
    Different classes: the codes nearest to the two classes' medians.
    """
    sigma = views.sigma(codes)
    t = torch.linspace(0, 1, 51, dtype=codes.dtype)
    pairs, names = [], []
    for k in settings["same_class"]:
        idx = (labels == k).nonzero().squeeze(-1)
        core = idx[sigma[idx] <= sigma[idx].median()]
        cand = core[torch.randint(len(core), (200, 2), generator=generator)]
        lines = codes[cand[:, 0], None] + t[:, None] * (codes[cand[:, 1]] - codes[cand[:, 0]])[:, None]
        best = views.sigma(lines).amax(-1).argmax()
        pairs.append(cand[best].tolist())
        names.append(f"{k} to {k}")
    for a, b in settings["cross_class"]:
        ends = []
        for k in (a, b):
            idx = (labels == k).nonzero().squeeze(-1)
            ends.append(int(idx[(codes[idx] - codes[idx].median(0).values).norm(dim=-1).argmin()]))
        pairs.append(ends)
        names.append(f"{a} to {b}")
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), names


# ------------------------------------------------------------------------------ 1. means
def frechet_means(space, vae, views, settings, generator):
    """geomstats' FrechetMean, all classes at once (its "batch" method)."""
    codes, labels = vae.codes, vae.labels
    sigma = views.sigma(codes)
    n, classes = settings["frechet_per_class"], settings["frechet_classes"]
    idx = torch.stack([class_sample(labels, sigma, k, n, generator) for k in classes], dim=1)
    points = codes[idx]  # (n, n_classes, 2): geomstats' batch layout, one column per class
    euclidean = points.mean(0)
    estimator = FrechetMean(space, method="batch")
    estimator.optimizer.init_point = euclidean.clone()  # start from the Euclidean means
    estimator.optimizer.epsilon = 1e-12
    estimator.optimizer.max_iter = settings["frechet_max_iter"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        mean = estimator.fit(points).estimate_
        # First-order condition of a Fréchet mean: the logs of the points from it average
        # to 0. metric.log warm-starts from the last iteration's logs (same points) ...
        # (flattened as FrechetMean flattens them, so that the solver recognizes them)
        flat_points, flat_means = points.reshape(-1, 2), mean[None].expand_as(points).reshape(-1, 2)
        logs = space.metric.log(flat_points, flat_means).reshape(points.shape)
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            print(f"   ConvergenceWarning during the iterations: {str(w.message).split(';')[0]}")
    # ... and solve_log, started from those logs, checks every one of them (one ODE solve).
    report = space.metric.solve_log(points, mean[None].expand_as(points), initial_tangent_vec=logs)
    print(f"   FrechetMean(space, method='batch'), {n} codes per class, "
          f"at most {settings['frechet_max_iter']} gradient step(s) from the Euclidean means")
    print(f"   logarithms at the means: {report.summary()}")
    ok = report.converged.all(0)
    logs = report.tangent_vec
    gradient = space.metric.norm(logs.mean(0), mean)
    spread = space.metric.norm(logs, mean[None].expand_as(points)).mean(0)
    return dict(classes=list(classes), idx=idx, points=points, euclidean=euclidean, frechet=mean, ok=ok,
                gradient=gradient / spread)


def report_means(vae, views, means, settings, out):
    euclidean, frechet, ok = means["euclidean"], means["frechet"], means["ok"]
    print(f"\n   {'class':>5s} {'|Frechet - Euclidean|':>22s} {'|mean of logs|_G / mean dist':>29s}"
          f" {'sigma at Euclid':>16s} {'sigma at Frechet':>17s}")
    for c, k in enumerate(means["classes"]):
        if not ok[c]:
            print(f"   {k:>5d} {'a logarithm did not converge: left out':>52s}")
            continue
        print(f"   {k:>5d} {float((frechet[c] - euclidean[c]).norm()):22.3f} {float(means['gradient'][c]):29.1e}"
              f" {float(views.sigma(euclidean[c])):16.3f} {float(views.sigma(frechet[c])):17.3f}")
    print("   (latent units; sigma: decoder standard deviation averaged over pixels)")
    if not ok.any():
        return
    shown = ok.nonzero().squeeze(-1)
    images = torch.stack([
        vae.data[means["idx"]].mean(0)[shown],  # pixel average of the same images, for reference
        views.decode(euclidean[shown]),
        views.decode(frechet[shown]),
    ])
    fig, ax = plt.subplots(figsize=(max(2.5, 0.75 * len(shown)), 2.7))
    plot_image_strip(ax, images, IMAGE_SHAPE, row_labels=["pixel average", "Euclidean mean", "Fréchet mean"])
    ax.set_title(f"Class means of {settings['frechet_per_class']} codes per class (classes "
                 f"{', '.join(str(means['classes'][c]) for c in shown.tolist())}), decoded", fontsize=10)
    path = out / "digits_means.png"
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    print(f"   wrote {path}")


# ---------------------------------------------------------------------- 2. interpolations
def report_interpolations(space, views, z0, z1, report, names, out):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    straight = z0[:, None] + t[:, None] * (z1 - z0)[:, None]
    geodesic = torch.full_like(straight, float("nan"))
    tangent_vec, ok = report.tangent_vec, report.converged
    if ok.any():
        # ODE geodesics where shooting solved the pair, the discrete geodesic where the
        # energy method answered it (the ODE from its approximate velocity would drift)
        geodesic[ok] = space.metric.geodesic_from_log(report[ok], z1[ok], z0[ok])(t)
    dist = space.metric.norm(tangent_vec, z0)
    line_length = space.metric.curve_length(straight)
    print(f"   {'pair':<8s} {'geodesic length':>15s} {'straight-line length':>21s} {'Euclidean':>10s}"
          f" {'max sigma geodesic':>19s} {'max sigma line':>15s}")
    for i, name in enumerate(names):
        if not ok[i]:
            print(f"   {name:<8s} {'not converged: left out':>36s}")
            continue
        note = "   <- longer than the line: a geodesic, not the shortest" if dist[i] > line_length[i] else ""
        print(
            f"   {name:<8s} {float(dist[i]):15.3f} {float(line_length[i]):21.3f} {float((z1[i] - z0[i]).norm()):10.3f}"
            f" {float(views.sigma(geodesic[i]).max()):19.3f} {float(views.sigma(straight[i]).max()):15.3f}{note}"
        )
    print("   (lengths of the decoded curve [mu; sigma], i.e. in the expected metric; Euclidean: latent chord)")

    frames = torch.arange(0, 101, 10)  # 11 frames equally spaced in t: equally spaced in length on a geodesic
    shown = ok.nonzero().squeeze(-1).tolist()
    if shown:
        fig, axes = plt.subplots(len(shown), 1, figsize=(7.5, 1.55 * len(shown) + 0.5), squeeze=False)
        for ax, i in zip(axes[:, 0], shown):
            images = torch.stack([views.decode(geodesic[i, frames]), views.decode(straight[i, frames])])
            plot_image_strip(ax, images, IMAGE_SHAPE, row_labels=["geodesic", "straight line"])
            ax.set_title(f"{names[i]}: length {float(dist[i]):.2f} along the geodesic, "
                         f"{float(line_length[i]):.2f} along the straight line", fontsize=10)
        fig.suptitle("Interpolations decoded by the mean decoder, 11 frames", fontsize=11)
        fig.tight_layout()
        path = out / "digits_interpolations.png"
        fig.savefig(path, dpi=130, bbox_inches="tight")
        plt.close(fig)
        print(f"   wrote {path}")
    return dict(z0=z0, z1=z1, geodesic=geodesic, straight=straight, ok=ok, names=names)


# ------------------------------------------------------------------ 3. medoids and k-NN
def kmedoids(D: torch.Tensor, k: int, n_init: int = 20, seed: int = 0) -> torch.Tensor:
    """Alternating k-medoids on a distance matrix ``(n, n)``, best of ``n_init`` random starts."""
    generator = torch.Generator().manual_seed(seed)
    best, best_cost = None, float("inf")
    n = len(D)
    for _ in range(n_init):
        medoids = torch.randperm(n, generator=generator)[:k]
        for _ in range(100):
            assign = D[medoids].argmin(0)
            new = medoids.clone()
            for c in range(k):
                members = (assign == c).nonzero().squeeze(-1)
                if len(members):
                    new[c] = members[D[members][:, members].sum(0).argmin()]
            if torch.equal(new, medoids):
                break
            medoids = new
        cost = float(D[medoids].min(0).values.sum())
        if cost < best_cost:
            best, best_cost = D[medoids].argmin(0), cost
    return best


def purity(true: torch.Tensor, predicted: torch.Tensor) -> float:
    """Fraction of points in the majority class of their cluster."""
    return sum(int(torch.bincount(true[predicted == c]).max()) for c in predicted.unique()) / len(true)


def loo_knn_accuracy(D: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Leave-one-out k-NN accuracy (majority vote, ties to the nearest) from a distance matrix."""
    from sklearn.neighbors import KNeighborsClassifier

    correct = 0
    for i in range(len(D)):
        rest = torch.cat([torch.arange(i), torch.arange(i + 1, len(D))])
        knn = KNeighborsClassifier(n_neighbors=k, metric="precomputed").fit(D[rest][:, rest].numpy(), y[rest].numpy())
        correct += int(knn.predict(D[i : i + 1, rest].numpy())[0] == int(y[i]))
    return correct / len(D)


def report_neighbours(vae, a_idx, pairs, dist, ok, settings):
    from sklearn.metrics import adjusted_rand_score

    n = len(a_idx)
    i, j = pairs
    D = torch.zeros(n, n, dtype=torch.float64)
    D[i, j] = D[j, i] = dist
    # Leave out codes until no unconverged distance is left: the code with the most
    # unconverged distances first.
    failed = torch.zeros(n, n, dtype=torch.bool)
    failed[i[~ok], j[~ok]] = failed[j[~ok], i[~ok]] = True
    keep = torch.ones(n, dtype=torch.bool)
    while failed[keep][:, keep].any():
        counts = torch.where(keep, failed[:, keep].sum(1), torch.zeros(n, dtype=torch.long))
        keep[counts.argmax()] = False
    if not keep.all():
        print(f"   left out: {int((~keep).sum())} of {n} codes (to leave out every distance that did not converge)")
    y = vae.labels[a_idx][keep]
    if len(y.unique()) < 2 or len(y) < 4:
        print("   too few codes left for clustering and k-NN: skipped")
        return
    codes, images = vae.codes[a_idx][keep], vae.data[a_idx][keep]
    matrices = {
        "geodesic (pull-back)": D[keep][:, keep],
        "Euclidean latent": torch.cdist(codes, codes),
        "pixels (64-D, reference)": torch.cdist(images, images),
    }
    n_classes = len(settings["neighbour_classes"])
    print(f"   {int(keep.sum())} codes of classes {settings['neighbour_classes']} "
          f"({settings['neighbour_per_class']} per class); k-medoids with k = {n_classes} (best of 20 starts), "
          "leave-one-out k-NN")
    print(f"   {'distance':<26s} {'k-medoids ARI':>13s} {'purity':>7s} {'1-NN acc':>9s} {'3-NN acc':>9s}")
    for name, M in matrices.items():
        cluster = kmedoids(M, n_classes)
        print(f"   {name:<26s} {adjusted_rand_score(y.numpy(), cluster.numpy()):13.3f} {purity(y, cluster):7.3f}"
              f" {loo_knn_accuracy(M, y, 1):9.3f} {loo_knn_accuracy(M, y, 3):9.3f}")


# ------------------------------------------------------------------------- 4. the picture
def latent_picture(space, vae, paths, means, settings, out):
    codes, labels = vae.codes, vae.labels
    lim = float(codes.abs().max()) + 0.3
    fig, ax = plt.subplots(figsize=(9, 7.5))
    plot_magnification(ax, space, (-lim, lim), (-lim, lim), resolution=settings["resolution"], cmap="Greys")
    plot_latent_points(ax, codes, labels, s=7, alpha=0.8, legend=False)
    outline = [path_effects.Stroke(linewidth=4.5, foreground="black"), path_effects.Normal()]
    for i in paths["ok"].nonzero().squeeze(-1).tolist():
        plot_curves(ax, paths["straight"][i], color="white", linewidth=2, linestyle=(0, (4, 2)), path_effects=outline)
        plot_curves(ax, paths["geodesic"][i], color="white", linewidth=2.5, path_effects=outline)
        ends = torch.stack([paths["z0"][i], paths["z1"][i]])
        ax.scatter(*ends.T.numpy(), s=40, color="white", edgecolor="black", zorder=5)
        ax.annotate(paths["names"][i], paths["geodesic"][i][50].numpy(), xytext=(6, 6), textcoords="offset points",
                    fontsize=9, bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.85, lw=0))
    colours = matplotlib.colormaps["tab10"]
    for c in means["ok"].nonzero().squeeze(-1).tolist():
        k = means["classes"][c]
        ax.scatter(*means["euclidean"][c].numpy(), marker="X", s=90, color=colours(k), edgecolor="black", zorder=6)
        ax.scatter(*means["frechet"][c].numpy(), marker="*", s=260, color=colours(k), edgecolor="black", zorder=6)
    class_handles = [Line2D([], [], marker="o", linestyle="", color=colours(k), label=str(k)) for k in range(10)]
    ax.add_artist(ax.legend(handles=class_handles, title="class", loc="upper left", fontsize=8, framealpha=0.9))
    style_handles = [
        Line2D([], [], color="white", linewidth=2.5, path_effects=outline, label="geodesic"),
        Line2D([], [], color="white", linewidth=2, linestyle=(0, (4, 2)), path_effects=outline, label="straight line"),
        Line2D([], [], marker="*", linestyle="", markersize=13, color="lightgray", markeredgecolor="black",
               label="Fréchet mean of a class"),
        Line2D([], [], marker="X", linestyle="", markersize=9, color="lightgray", markeredgecolor="black",
               label="Euclidean mean of a class"),
    ]
    ax.legend(handles=style_handles, loc="lower right", fontsize=8, framealpha=0.9)
    ax.set_title("Latent space of a VAE on digits, expected metric of its Gaussian decoder\n"
                 r"background: magnification factor $\sqrt{\det G}$ (dark: distances are long)", fontsize=11)
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    path = out / "digits_latent.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"   wrote {path}")


def main(out: pathlib.Path, quick: bool) -> None:
    settings = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    with stages("train the VAE: digits_vae(seed=0)"):
        vae = digits_vae(seed=0)  # before the default dtype changes (the VAE trains in float32)
        print(f"   {len(vae.codes)} codes, 2-D latent space; trained and fitted in {vae.train_seconds:.1f} s")
    # geomstats' tools (FrechetMean) make their own tensors in torch's default dtype.
    torch.set_default_dtype(torch.float64)
    space = PullbackManifold(vae.decoder, dim=2, ode_options=ODE_OPTIONS, log_tol=LOG_TOL, max_iter=MAX_NEWTON)
    views = Float64Views(vae)
    codes = vae.codes
    generator = torch.Generator().manual_seed(0)

    with stages("1. Frechet means per class"):
        means = frechet_means(space, vae, views, settings, generator)
        report_means(vae, views, means, settings, out)

    with stages("2+3. all other logarithms, one batched solve"):
        pair_idx, names = choose_pairs(codes, vae.labels, views, settings, generator)
        sigma = views.sigma(codes)
        a_idx = torch.cat([class_sample(vae.labels, sigma, k, settings["neighbour_per_class"], generator)
                           for k in settings["neighbour_classes"]])
        i, j = torch.triu_indices(len(a_idx), len(a_idx), offset=1)
        base = torch.cat([codes[pair_idx[:, 0]], codes[a_idx[i]]])
        end = torch.cat([codes[pair_idx[:, 1]], codes[a_idx[j]]])
        report = space.metric.solve_log(end, base)
        print(f"   {len(base)} pairs ({len(pair_idx)} interpolations, {len(i)} for the distance matrix): "
              f"{report.summary()}")
        data_idx = torch.cat([pair_idx, torch.stack([a_idx[i], a_idx[j]], dim=1)])
        for p in (~report.converged).nonzero().squeeze(-1).tolist():
            print(f"   not converged: codes {data_idx[p, 0]} -> {data_idx[p, 1]} (classes {int(vae.labels[data_idx[p, 0]])}"
                  f" -> {int(vae.labels[data_idx[p, 1]])}), latent end-point residual {float(report.residual[p]):.1e}")
        n_pairs = len(pair_idx)
        dist = space.metric.norm(report.tangent_vec, base)

    with stages("2. geodesic vs straight interpolations"):
        paths = report_interpolations(
            space, views, base[:n_pairs], end[:n_pairs], report[:n_pairs], names, out,
        )

    with stages("3. k-medoids and k-NN"):
        report_neighbours(vae, a_idx, (i, j), dist[n_pairs:], report.converged[n_pairs:], settings)

    with stages("4. latent picture"):
        latent_picture(space, vae, paths, means, settings, out)
    stages.summary()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "output")
    parser.add_argument("--quick", action="store_true", help="fewer pairs, classes and iterations (for tests)")
    args = parser.parse_args()
    main(args.out, args.quick)
