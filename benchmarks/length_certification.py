"""How the energy method's length estimates and stopping rules do against a dense reference.

Solves the throughput pairs of problem (d) (digits VAE, expected metric) with
``discrete.energy_log`` refined on every pair from 16 to ``16 * 2**LEVELS`` segments,
keeping each level's polygon. The reference length of each pair is the chord length of
its own polygons extrapolated three times (Romberg: ``h^2``, ``h^4``, ``h^6``) from the
finest four levels. Per level it reports the relative errors of the chord length, its
Richardson extrapolation and the spline length (:func:`discrete._spline_length`); then,
for the two stopping rules of :func:`discrete._certify` (a log's and ``lengths_only``),
at ``rtol = 1e-5``: at how many segments the pairs stop, the segments per pair that costs,
the error of the length they report, how many certified pairs are off by more than
``rtol``, and the error of the initial direction (against the extrapolated direction of
the finest two levels).

Run:  OMP_NUM_THREADS=1 python benchmarks/length_certification.py --pairs 200
      OMP_NUM_THREADS=1 python benchmarks/length_certification.py --pairs 300 --skip 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_benchmarks as rb  # imports pullback_manifold first: the geomstats backend

from pullback_manifold import PullbackManifold, discrete, geometry


def level_polygons(embed, point, base_point, levels: int) -> list[torch.Tensor]:
    """The polygons of every level of one ``energy_log`` call refined ``levels`` times on all
    pairs, each started from the latent-grid route where that is shorter than the straight
    line (``energy_log``'s own start, without its straight-line runner-up)."""
    from pullback_manifold.graph_start import shortest_path_start

    start, _ = shortest_path_start(embed, point, base_point, 16)
    polygons = []
    minimize = discrete._minimize

    def recording(*args, **kwargs):
        out = minimize(*args, **kwargs)
        polygons.append(out[0])
        return out

    discrete._minimize = recording
    try:
        discrete.energy_log(
            embed, point, base_point, n_refinements=levels, max_refinements=levels, initial_curve=start
        )
    finally:
        discrete._minimize = minimize
    return polygons


def richardson(values: torch.Tensor, order: int) -> torch.Tensor:
    """Extrapolations ``(n, K - 1)`` of values ``(n, K)`` at halving steps, error ``O(h^order)``."""
    return values[:, 1:] + (values[:, 1:] - values[:, :-1]) / (2**order - 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first SKIP throughput pairs")
    parser.add_argument("--levels", type=int, default=6, help="refinements: 16 * 2**LEVELS segments at the finest")
    parser.add_argument("--rtol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    problem = rb.build_problem("d", args.pairs, 0)
    z1, z0 = problem.throughput_pairs(args.skip + args.pairs)
    z1, z0 = z1[args.skip :], z0[args.skip :]
    metric = PullbackManifold(problem.decoder, problem.dim).metric
    embed = geometry.energy_embedding(metric._embed, metric.regularization)
    start = time.perf_counter()
    polygons = level_polygons(embed, z1, z0, args.levels)
    with torch.no_grad():
        chord = torch.stack([discrete._level_lengths(embed, c, False)[:, 0] for c in polygons], 1)
        spline = torch.stack([discrete._spline_length(embed, c) for c in polygons], 1)
    directions = torch.stack([discrete._initial_direction(c) for c in polygons], 1)
    K = chord.shape[1]
    r1 = richardson(chord, 2)
    romberg = richardson(richardson(r1, 4), 6)
    reference, uncertainty = romberg[:, -1], (romberg[:, -1] - romberg[:, -2]).abs()
    keep = reference > 0  # pairs of equal points have nothing to measure
    sizes = [16 * 2**k for k in range(K)]
    print(
        f"(d) throughput pairs {args.skip}-{args.skip + args.pairs - 1} ({int(keep.sum())} of distinct points), "
        f"16-{sizes[-1]} segments, {time.perf_counter() - start:.0f} s; reference: the chord lengths Romberg-"
        f"extrapolated (its change from the previous extrapolation, its uncertainty here: median "
        f"{(uncertainty / reference)[keep].median():.1e}, max {(uncertainty / reference)[keep].max():.1e})"
    )
    chord, spline, r1, directions = chord[keep], spline[keep], r1[keep], directions[keep]
    reference, uncertainty = reference[keep], uncertainty[keep]

    def rel(x):
        return (x - reference).abs() / reference

    def stats(x):
        return f"{x.median():.1e} / {x.quantile(0.9):.1e} / {x.max():.1e}"

    print("\n| segments | chord: median / 90% / max | Richardson | spline | spline below the reference |")
    print("|---|---|---|---|---|")
    for k in range(K - 1):
        r = stats(rel(r1[:, k - 1])) if k else "–"
        below = int((spline[:, k] < reference - uncertainty).sum())  # beyond the reference's uncertainty
        print(f"| {sizes[k]} | {stats(rel(chord[:, k]))} | {r} | {stats(rel(spline[:, k]))} | {below} pairs |")

    extrapolated_directions = richardson(directions, 2)  # (n, K - 1, d)
    true_direction = extrapolated_directions[:, -1]
    # Segments solved per pair over all levels; a pair never certified stops at the second finest.
    segments = torch.tensor(sizes).cumsum(0)
    print(f"\nStopping rules at rtol {args.rtol:g} (first check at {sizes[2]} segments, as energy_log's defaults):\n")
    print("| rule | pairs stopping at " + ", ".join(map(str, sizes[2:-1])) + ", never | segments per pair, all levels "
          "| length error of certified pairs: median / max | the chord extrapolation's there | certified but > rtol "
          "| initial direction error "
          "(pairs stopped before the finest level): median / 90% / max |")
    print("|---|---|---|---|---|---|---|")
    n = len(reference)
    for name, lengths_only in (("log (default)", False), ("lengths_only", True)):
        stop = torch.full((n,), K - 1)
        length = torch.full((n,), float("nan"), dtype=reference.dtype)
        done = torch.zeros(n, dtype=torch.bool)
        for k in range(2, K - 1):  # the finest level only serves the direction reference
            levels = [torch.stack([chord[:, j], spline[:, j]], 1) for j in range(k + 1)]
            estimate, error = discrete._certify(levels, True, lengths_only)
            new = ~done & (error <= args.rtol)
            stop[new], length[new] = k, estimate[new]
            done |= new
        err = rel(length)[done]
        chord_err = rel(r1[torch.arange(n), stop - 1])[done]
        dir_err = (extrapolated_directions[torch.arange(n), stop - 1] - true_direction).norm(dim=-1)
        dir_err = (dir_err / true_direction.norm(dim=-1))[done]
        counts = [int((stop[done] == k).sum()) for k in range(2, K - 1)] + [int((~done).sum())]
        print(
            f"| {name} | {', '.join(map(str, counts))} | {segments[stop.clamp_max(K - 2)].double().mean():.0f} | "
            f"{err.median():.1e} / {err.max():.1e} | {chord_err.median():.1e} / {chord_err.max():.1e} | "
            f"{int((err > args.rtol).sum())} | {stats(dir_err)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
