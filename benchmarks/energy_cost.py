"""What one energy-method solve costs: time, decoder passes and refinement levels per log.

Calls ``solve_log(..., method="energy")`` once, batched, on the first ``--pairs`` pairs
of a benchmark problem (``run_benchmarks.py``: (a) sphere chart, (b) tanh MLP, (d)
digits VAE with the expected metric; for (d) the pairs of its throughput run), and
counts the decoder passes the Newton iterations make (second-order Taylor passes:
value, ``d`` first and ``d (d + 1) / 2`` second derivatives per node). Best of
``--repeats`` timed calls, after a warm-up call.

To compare two commits, run this file from one checkout with the package of another
first on the path (``PYTHONPATH=/path/to/other/checkout``), alternating runs: the
machine's speed drifts. ``--save FILE`` keeps the answers (log vectors, their lengths,
convergence flags, error estimates); ``--compare FILE`` prints how far this run's are
from those.

Run:  OMP_NUM_THREADS=1 python benchmarks/energy_cost.py --problem d --pairs 200
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_benchmarks as rb  # noqa: E402  (imports pullback_manifold first: the geomstats backend)

from pullback_manifold import discrete  # noqa: E402
from pullback_manifold import PullbackManifold  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="d", choices=["a", "b", "d"])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rtol", type=float, help="the energy method's rtol (default: the library's, 1e-5 in float64)")
    parser.add_argument("--save", help="write the answers to this file (torch.save)")
    parser.add_argument("--compare", help="compare the answers with those saved in this file")
    parser.add_argument(
        "--lengths-only",
        action="store_true",
        help="solve_log(..., lengths_only=True), as dist and pairwise_dists call it (with a package from "
        "before that option: the plain solve_log, which they called then)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    problem = rb.build_problem(args.problem, args.pairs, 0)
    if args.problem == "d":
        z1, z0 = problem.throughput_pairs(args.pairs)
    else:
        z0, z1 = problem.z0, problem.z1
    space = PullbackManifold(problem.decoder, problem.dim, on_failure="ignore", energy_rtol=args.rtol)

    passes = [0]
    # The derivative pass of the Newton iteration (named _node_jet before commit 4d77e1b).
    name = "_node_derivatives" if hasattr(discrete, "_node_derivatives") else "_node_jet"
    node_derivatives = getattr(discrete, name)

    def counting(embed, nodes, *args, **kwargs):
        passes[0] += len(nodes)
        return node_derivatives(embed, nodes, *args, **kwargs)

    setattr(discrete, name, counting)
    options = {"method": "energy"}
    if args.lengths_only and "lengths_only" in inspect.signature(space.metric.solve_log).parameters:
        options["lengths_only"] = True
    try:
        space.metric.solve_log(z1[:2] * 0.9, z0[:2] * 0.9, **options)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            passes[0] = 0
            start = time.perf_counter()
            result = space.metric.solve_log(z1, z0, **options)
            best = min(best, time.perf_counter() - start)
    finally:
        setattr(discrete, name, node_derivatives)
    n = len(z0)
    levels = torch.bincount(result.n_iterations).tolist()
    print(
        f"({args.problem}) {n} pairs, {args.threads} thread(s), {options}, package at "
        f"{os.path.dirname(discrete.__file__)}: {best / n * 1e3:.1f} ms per log (best of {args.repeats}), "
        f"{passes[0] / n:.0f} Newton node passes per log, converged {result.converged.float().mean():.4f}, "
        f"pairs per number of levels {levels}"
    )
    answers = {
        "tangent": result.tangent_vec,
        "length": space.metric.norm(result.tangent_vec, z0),
        "converged": result.converged,
        "residual": result.residual,
    }
    if args.save:
        torch.save(answers, args.save)
    if args.compare:
        saved = torch.load(args.compare)
        moved = answers["length"] > 0  # pairs of equal points have no direction
        q = torch.tensor([0.5, 1.0], dtype=saved["length"].dtype)
        length = ((answers["length"] - saved["length"]).abs() / saved["length"])[moved].quantile(q)
        tangent = (answers["tangent"] - saved["tangent"]).norm(dim=-1) / saved["tangent"].norm(dim=-1)
        estimate = ((answers["residual"] - saved["residual"]).abs() / saved["residual"])[moved].quantile(q)
        print(
            f"against {args.compare}: lengths differ by {length[0]:.1e} (median), {length[1]:.1e} (max) relative; "
            f"log vectors by {tangent[moved].quantile(q)[0]:.1e}, {tangent[moved].quantile(q)[1]:.1e}; "
            f"error estimates by {estimate[0]:.1e}, {estimate[1]:.1e}; "
            f"same convergence flags: {bool((answers['converged'] == saved['converged']).all())}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
