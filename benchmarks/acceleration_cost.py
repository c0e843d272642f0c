"""Cost of one geodesic-acceleration evaluation: closed-form jets vs torch.func nested JVPs.

The right-hand side of the geodesic ODE is what every solver calls thousands of times.
This times ``geometry.geodesic_acceleration`` on the same decoder and points two ways:

* ``jets``: the decoder as ``PullbackManifold`` sees it (closed-form layer rules,
  ``W^T W`` for a widening output layer);
* ``torch.func``: the same decoder as a plain callable, so its derivatives come from a
  vmapped nested ``torch.func.jvp`` (what the library did before the jet rules).

Run:  OMP_NUM_THREADS=1 python benchmarks/acceleration_cost.py
"""

from __future__ import annotations

import time

import pullback_manifold  # noqa: F401
import torch
from torch import nn

from pullback_manifold.decoders import as_decoder
from pullback_manifold.geometry import geodesic_acceleration


def _timed(fn, min_seconds: float = 0.5) -> float:
    fn()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn()
        reps += 1
    return (time.perf_counter() - start) / reps


def _mlp(out: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, out)).double()


def main() -> None:
    torch.set_num_threads(1)
    decoders = {"tanh MLP 2 -> 64 -> 64 -> 784": _mlp(784), "tanh MLP 2 -> 64 -> 64 -> 64": _mlp(64)}
    print(f"torch {torch.__version__}, 1 thread, float64; milliseconds per acceleration evaluation\n")
    print(f"{'decoder':32s} {'points':>7s} {'jets':>9s} {'torch.func':>11s} {'ratio':>7s}  max |difference|")
    for name, net in decoders.items():
        fast_decoder = as_decoder(net)
        fast_decoder.prepare(torch.float64, torch.device("cpu"))
        for n in (5, 64, 256, 1024):
            gen = torch.Generator().manual_seed(n)
            z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
            v = torch.randn(n, 2, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                fast = _timed(lambda: geodesic_acceleration(fast_decoder, z, v))
                slow = _timed(lambda: geodesic_acceleration(lambda x: net(x), z, v))
                gap = (geodesic_acceleration(fast_decoder, z, v) - geodesic_acceleration(lambda x: net(x), z, v))
            print(f"{name:32s} {n:7d} {1e3 * fast:9.2f} {1e3 * slow:11.2f} {slow / fast:6.1f}x  {gap.abs().max():.1e}")


if __name__ == "__main__":
    main()
