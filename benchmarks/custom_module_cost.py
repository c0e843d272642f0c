"""What a decoder written as a class costs, against the same network as an ``nn.Sequential``.

A custom module's jets go through its traced ``forward`` (:mod:`pullback_manifold.traced`);
before that existed they went through ``torch.func``'s nested forward mode, which this
script still measures by switching the tracer off. One network (2 -> 64 -> 64 -> 784,
tanh, softplus), with a sigmoid output or a linear one (a widening output layer, which
the metric and the energy method take in its input space: ``Decoder.compact``), written
three ways, in float64, one thread:

- ``sequential``: ``nn.Sequential`` (closed-form layer rules);
- ``class``: a class whose ``forward`` calls the layers and ``torch.tanh`` / ``F.softplus``
  (/ ``torch.sigmoid``), then reshapes to 28 x 28 (traced);
- ``class, torch.func``: the same class with the tracer off.

Timed per case (best of ``--repeats``, after a warm-up): the metric and the geodesic
equation's acceleration at ``--points`` points, and ``solve_log(..., method="energy")``
on ``--pairs`` random pairs (the same answers in all three, to the solver's tolerance).

Run:  OMP_NUM_THREADS=1 python benchmarks/custom_module_cost.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from pullback_manifold import PullbackManifold, traced


class Decoder(nn.Module):
    """The network as most people write it."""

    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.hidden, self.middle, self.out = layers[0], layers[2], layers[4]
        self.squash = len(layers) > 5

    def forward(self, z):
        h = torch.tanh(self.hidden(z))
        h = F.softplus(self.middle(h))
        x = self.out(h)
        return (torch.sigmoid(x) if self.squash else x).view(-1, 28, 28)


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _run(layers, custom, z, v, z0, z1, repeats):
    tracer = traced.traced_jet
    rows, tangents = [], {}
    for name, net, trace in [
        ("sequential", layers, True),
        ("class", custom, True),
        ("class, torch.func", custom, False),
    ]:
        # Off: every custom module goes to torch.func, its output layer included.
        traced.traced_jet = tracer if trace else (lambda module, state, jet: None)
        output_layer = traced.output_layer
        traced.output_layer = output_layer if trace else (lambda module: None)
        try:
            metric = PullbackManifold(net, dim=2, on_failure="ignore").metric
            times = [
                _best(lambda metric=metric: metric.metric_matrix(z), repeats),
                _best(lambda metric=metric: metric.geodesic_acceleration(z, v), repeats),
                _best(lambda m=metric, n=name: tangents.__setitem__(n, m.solve_log(z1, z0, method="energy")), 1),
            ]
        finally:
            traced.traced_jet, traced.output_layer = tracer, output_layer
        rows.append((name, times))
    return rows, tangents


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    z = torch.randn(args.points, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = torch.randn(args.points, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z0, z1 = torch.randn(2, args.pairs, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    header = [f"metric ({args.points})", f"acceleration ({args.points})", f"energy log ({args.pairs})"]
    for output in ("sigmoid", "linear"):
        torch.manual_seed(0)
        layers = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Softplus(), nn.Linear(64, 784))
        if output == "sigmoid":
            layers.append(nn.Sigmoid())
        custom = Decoder(layers)
        rows, tangents = _run(layers, custom, z, v, z0, z1, args.repeats)
        print(f"\n{output} output\n{'decoder':20s} {header[0]:>18s} {header[1]:>22s} {header[2]:>20s}")
        base = rows[0][1]
        for name, times in rows:
            cells = [f"{t * 1e3:8.2f} ms ({t / b:4.1f}x)" for t, b in zip(times, base)]
            print(f"{name:20s} {cells[0]:>18s} {cells[1]:>22s} {cells[2]:>20s}")
        slow, fast = rows[2][1], rows[1][1]
        print("tracing speed-up (class, torch.func / class): " + ", ".join(f"{a / b:.1f}x" for a, b in zip(slow, fast)))
        reference = tangents["sequential"].tangent_vec
        for name in ("class", "class, torch.func"):
            gap = ((tangents[name].tangent_vec - reference).norm(dim=-1) / reference.norm(dim=-1)).max()
            print(f"{name}: log vectors within {gap:.1e} (relative) of the sequential ones")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
