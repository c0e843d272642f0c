"""What one energy-method solve costs: time, decoder passes and refinement levels per log.

Calls ``solve_log(..., method="energy")`` once, batched, on the first ``--pairs`` pairs
of a benchmark problem (``run_benchmarks.py``: (a) sphere chart, (b) tanh MLP, (d)
digits VAE with the expected metric; for (d) the pairs of its throughput run), and
counts the decoder passes the Newton iterations make (second-order Taylor passes:
value, ``d`` first and ``d (d + 1) / 2`` second derivatives per node). Best of
``--repeats`` timed calls, after a warm-up call.

To compare two commits, run this file from one checkout with the package of another
first on the path (``PYTHONPATH=/path/to/other/checkout``), alternating runs: the
machine's speed drifts.

Run:  OMP_NUM_THREADS=1 python benchmarks/energy_cost.py --problem d --pairs 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_benchmarks as rb  # noqa: E402  (imports pullback_manifold first: the geomstats backend)

import pullback_manifold.discrete as discrete  # noqa: E402
from pullback_manifold import PullbackManifold  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="d", choices=["a", "b", "d"])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    problem = rb.build_problem(args.problem, args.pairs, 0)
    if args.problem == "d":
        z1, z0 = problem.throughput_pairs(args.pairs)
    else:
        z0, z1 = problem.z0, problem.z1
    space = PullbackManifold(problem.decoder, problem.dim, on_failure="ignore")

    passes = [0]
    node_derivatives = discrete._node_derivatives

    def counting(embed, nodes, *args):
        passes[0] += len(nodes)
        return node_derivatives(embed, nodes, *args)

    discrete._node_derivatives = counting
    try:
        space.metric.solve_log(z1[:2] * 0.9, z0[:2] * 0.9, method="energy")  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            passes[0] = 0
            start = time.perf_counter()
            result = space.metric.solve_log(z1, z0, method="energy")
            best = min(best, time.perf_counter() - start)
    finally:
        discrete._node_derivatives = node_derivatives
    n = len(z0)
    levels = torch.bincount(result.n_iterations).tolist()
    print(
        f"({args.problem}) {n} pairs, {args.threads} thread(s), package at "
        f"{os.path.dirname(discrete.__file__)}: {best / n * 1e3:.1f} ms per log (best of {args.repeats}), "
        f"{passes[0] / n:.0f} Newton node passes per log, converged {result.converged.float().mean():.4f}, "
        f"pairs per number of levels {levels}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
