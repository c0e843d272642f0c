r"""Logarithm maps and distances on a Gaussian-process decoder, against stochman and the previous solver.

A GP decoder (:class:`~pullback_manifold.gaussian_process.GaussianProcessDecoder`, the
expected metric ``E[J]^T E[J] + D Sigma_J``) fitted to ``--points`` random images of
scikit-learn's digits (``D = 64``) at their ``--dim``-D PCA coordinates (standardized), with
hyperparameters by maximum marginal likelihood; ``--pairs`` random pairs of those inputs.
Its metric is given directly (a ``MetricDecoder``), so the energy method minimizes the
midpoint-rule energy, by damped Newton with its exact Hessian since a785a63.

Methods, on the same pairs, in one process:

- ours, ``solve_log(method="energy")``, ``metric.dist`` (lengths only) and
  ``solve_log(method="shooting")``, each one batched call;
- the previous energy solver (L-BFGS, then Gauss-Newton steps with ``G``'s matrix; still
  the method above ``d = 8``), called here through the same ``energy_log`` on the first
  ``--previous-pairs`` pairs;
- stochman's ``connecting_geodesic`` (cubic spline, energy by gradient descent) on a
  stochman ``Manifold`` whose metric is the GP's, one pair per call with a time cap; its
  length by the midpoint rule on 2048 pieces of its curve;
- the straight line (same quadrature).

Reference: the shooting lengths where shooting converged (end point to ``1e-8``), cross-checked
with the energy method's lengths (an independent method: the table reports their difference).
Seconds per pair: a batched call's time over its pairs (ours, the previous solver), the mean
of the per-pair calls (stochman).

Run:  OMP_NUM_THREADS=1 python benchmarks/gp_cost.py [--output benchmarks/GP.md]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from run_benchmarks import _capped  # the per-pair time cap of the main benchmark (same folder)

from pullback_manifold import PullbackManifold, discrete
from pullback_manifold.gaussian_process import GaussianProcessDecoder
from pullback_manifold.geometry import curve_length

F64 = torch.float64


def build(n_points: int, seed: int, dim: int = 2) -> tuple[GaussianProcessDecoder, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    images = load_digits().data / 16.0
    rows = np.random.default_rng(seed).choice(len(images), n_points, replace=False)
    codes = PCA(dim, random_state=seed).fit_transform(images)[rows]
    inputs = torch.tensor(codes / codes.std(), dtype=F64)
    return GaussianProcessDecoder.fit(inputs, torch.tensor(images[rows], dtype=F64)), inputs


def _previous_minimize(embed, curve, max_iter, xtol, smooth, derivative_dtype, known=None):
    """discrete._minimize as it was before a785a63 for a MetricDecoder: L-BFGS, then Gauss-Newton."""
    if xtol is None:
        xtol = discrete._default_xtol(curve)
    return (*discrete._lbfgs(embed, curve, max_iter * 10, xtol), None)


def _dense_length(gp, curves: torch.Tensor) -> torch.Tensor:
    return torch.cat([curve_length(gp, part) for part in curves.split(8)])


def run_stochman(gp, z0, z1, cap: float):
    from stochman.manifold import Manifold

    class GPManifold(Manifold):
        def metric(self, points):
            return gp.metric(points.reshape(-1, points.shape[-1]))

    manifold = GPManifold()
    t = torch.linspace(0, 1, 2049, dtype=F64)
    lengths = torch.full((len(z0),), float("nan"), dtype=F64)
    flagged = torch.zeros(len(z0), dtype=torch.bool)
    times = []
    manifold.connecting_geodesic(z0[:1] + 1e-3, z1[:1])  # first-call costs
    for i in range(len(z0)):
        out, secs, finished = _capped(lambda i=i: manifold.connecting_geodesic(z0[i : i + 1], z1[i : i + 1]), cap)
        times.append(secs)
        if finished:
            curve, success = out
            flagged[i] = bool(success)
            with torch.no_grad():
                lengths[i] = _dense_length(gp, curve(t).reshape(1, len(t), -1))[0]
    return lengths, flagged, np.array(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=300, help="GP inputs (digits images)")
    parser.add_argument("--dim", type=int, default=2, help="latent dimension (PCA components)")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--previous-pairs", type=int, default=5)
    parser.add_argument("--stochman-pairs", type=int, default=5)
    parser.add_argument("--stochman-cap", type=float, default=120.0, help="seconds per stochman pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the results markdown here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start_all = time.perf_counter()

    t = time.perf_counter()
    gp, inputs = build(args.points, args.seed, args.dim)
    fit_seconds = time.perf_counter() - t
    g = torch.Generator().manual_seed(args.seed + 1)
    first, second = torch.randperm(args.points, generator=g)[: 2 * args.pairs].reshape(2, -1)
    z0, z1 = inputs[first], inputs[second]
    space = PullbackManifold(gp, dim=args.dim, on_failure="ignore")
    metric = space.metric
    G0 = gp.metric(z0)

    def norm(v, G=G0):
        return torch.einsum("ni,nij,nj->n", v, G, v).clamp_min(0).sqrt()

    rows, notes = [], []

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    print("ours: shooting", flush=True)
    shooting, shooting_s = timed(lambda: metric.solve_log(z1, z0, method="shooting"))
    reference = norm(shooting.tangent_vec)
    good = shooting.converged.clone()
    print("ours: energy", flush=True)
    energy, energy_s = timed(lambda: metric.solve_log(z1, z0, method="energy"))
    energy_length = norm(energy.tangent_vec)
    good &= energy.converged
    print("ours: dist", flush=True)
    dist, dist_s = timed(lambda: metric.dist(z0, z1))
    k = args.previous_pairs
    print(f"previous solver: {k} pairs", flush=True)
    with mock.patch.object(discrete, "_minimize", _previous_minimize):
        (previous, _, previous_length), previous_s = timed(lambda: discrete.energy_log(gp, z1[:k], z0[:k]))
    m = args.stochman_pairs
    print(f"stochman: {m} pairs", flush=True)
    st_error = "not run (--stochman-pairs 0)" if m == 0 else None
    try:
        if m:
            st_length, st_flag, st_times = run_stochman(gp, z0[:m], z1[:m], args.stochman_cap)
    except Exception as err:  # noqa: BLE001
        st_error = f"failed: {type(err).__name__}: {err}"
    line = z0[:, None] + torch.linspace(0, 1, 2049, dtype=F64)[:, None] * (z1 - z0)[:, None]
    line_length = _dense_length(gp, line)

    def errors(values: torch.Tensor, n: int) -> tuple[str, str]:
        rel = ((values - reference[:n]).abs() / reference[:n])[good[:n]]
        rel = rel[torch.isfinite(rel)]
        if len(rel) == 0:
            return "n/a", "n/a"
        return f"{rel.median().item():.1e}", f"{rel.max().item():.1e}"

    n = args.pairs
    per_energy = energy_s / n
    rows.append(
        (
            'ours, `solve_log(method="energy")`',
            n,
            per_energy,
            *errors(energy_length, n),
            f"{int(energy.converged.sum())}/{n}",
        )
    )
    rows.append(("ours, `metric.dist`", n, dist_s / n, *errors(dist, n), "–"))
    rows.append(
        (
            'ours, `solve_log(method="shooting")` (reference)',
            n,
            shooting_s / n,
            "0",
            "0",
            f"{int(shooting.converged.sum())}/{n}",
        )
    )
    rows.append(
        (
            "previous energy solver (L-BFGS + Gauss-Newton)",
            k,
            previous_s / k,
            *errors(previous_length, k),
            f"{int(previous.converged.sum())}/{k}",
        )
    )
    if st_error is None:
        rows.append(
            (
                "stochman `connecting_geodesic`",
                m,
                float(np.mean(st_times)),
                *errors(st_length, m),
                f"{int(st_flag.sum())}/{m} (its flag)",
            )
        )
    rows.append(("straight line", n, float("nan"), *errors(line_length, n), "–"))

    cross = ((energy_length - reference).abs() / reference)[good]
    out = [
        "# Benchmark results: logs and distances on a Gaussian-process decoder",
        "",
        "Written by `benchmarks/gp_cost.py` (see its docstring for the problem and the methods).",
        "",
        "Command:",
        "",
        "```",
        "OMP_NUM_THREADS=1 python benchmarks/gp_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "```",
        "",
    ]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = "?"
    out += [
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {platform.system()} {platform.machine()}, torch threads {torch.get_num_threads()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, pullback-manifold commit {commit}",
        f"- GP: {gp!r}; hyperparameter fit {fit_seconds:.1f} s",
        f"- total run time: {time.perf_counter() - start_all:.0f} s",
        "",
        (
            f"Reference: shooting lengths on the {int(good.sum())} pairs where shooting and the energy method "
            f"both converged; the energy method's lengths differ from them by {cross.median().item():.1e} "
            f"(median), {cross.max().item():.1e} at most."
        ),
        "",
        "| method | pairs | s / pair | median rel. err | max rel. err | converged |",
        "|---|---|---|---|---|---|",
    ]
    for name, count, secs, med, mx, conv in rows:
        shown = "–" if not np.isfinite(secs) else f"{secs:.3g}"
        out.append(f"| {name} | {count} | {shown} | {med} | {mx} | {conv} |")
    out.append("")
    out.append(
        f"Speed-up of the energy method: {rows[3][2] / per_energy:.0f}x over the previous solver"
        + ("" if st_error else f", {rows[4][2] / per_energy:.1f}x over stochman")
        + " (per pair; ours batched)."
    )
    if st_error:
        out.append(f"\nstochman {st_error}")
    else:
        notes.append(f"stochman per-pair seconds: {', '.join(f'{x:.2f}' for x in st_times)}")
    out += [""] + notes + [""]
    text = "\n".join(out)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
