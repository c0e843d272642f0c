r"""CUDA check and GPU timings: does every public operation give the CPU's answer on a GPU, and how fast are logs there?

Three parts, on a machine with a CUDA GPU::

    python benchmarks/gpu_check.py run --out /tmp/gpu

1. **Same answers.** Each public operation (metric, Christoffel symbols, inner
   product, exp, log by every method, dist, curve length, parallel transport) on
   five decoders (sphere chart, tanh MLP, digits VAE with the expected metric, an
   ensemble, a Gaussian process), float64, once on the CPU and once on the GPU: the
   largest relative difference of the results. Part ``frechet``: geomstats'
   ``FrechetMean`` on the digits VAE, likewise.
2. **Accuracy and speed** of ``solve_log`` (energy and auto) on the benchmark's
   problems (b) and (d) (see ``run_benchmarks.py``), 30 pairs, against the
   benchmark's reference distances.
3. **Throughput**: 10,000 energy logs on (d) at several chunk sizes, auto on fewer;
   the same work on the machine's CPU for the ratio.

The reference distances and the digits VAE are built on the CPU. ``prepare``
builds them once and saves them, so that a GPU run spends its time on the GPU
and uses the very model trained here (a VAE trained with another thread count
differs slightly, see ``pullback_manifold.vae.digits_vae``)::

    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py prepare --file .gpu/prepared.pt
    python benchmarks/gpu_check.py run --prepared .gpu/prepared.pt --out /tmp/gpu

``run`` writes ``gpu_check.md`` under ``--out`` and prints it. Steps that would
not fit in ``--budget`` seconds are skipped (and say so).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

import pullback_manifold  # noqa: F401  (before geomstats: selects the pytorch backend)
from pullback_manifold import EnsembleDecoder, GaussianDecoder, GaussianProcessDecoder, PullbackManifold

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_benchmarks as rb  # noqa: E402  (problems and references shared with the benchmark)

F64 = torch.float64
N_PAIRS = 30


# ---------------------------------------------------------------------------------- prepare
def prepare(n_pairs: int, seed: int, n_throughput: int, api_pairs: int) -> dict:
    """Problems (b) and (d), their reference distances and CPU solutions, on the CPU."""
    from pullback_manifold.vae import digits_vae

    torch.set_default_dtype(F64)
    data = {"seed": seed}
    b = rb.build_problem("b", n_pairs, seed)
    d = rb.build_problem("d", n_pairs, seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        vae = digits_vae(seed=0, latent_dim=2)  # the cached model problem (d) was built from
    finally:
        torch.set_default_dtype(previous)
    data["vae"] = {"mean": vae.mean_decoder, "std": vae.std, "codes": vae.codes, "labels": vae.labels}
    for problem in (b, d):
        ref = rb.reference_distances(problem.embed, problem.z0, problem.z1)
        space = PullbackManifold(problem.decoder, problem.dim, on_failure="ignore")
        cpu = {}
        for method in ("energy", "auto"):
            space.metric.solve_log(problem.z1[:2] * 0.9, problem.z0[:2] * 0.9, method=method)  # warm-up, as on the GPU
            start = time.perf_counter()
            result = space.metric.solve_log(problem.z1, problem.z0, method=method)
            cpu[method] = {"tangent_vec": result.tangent_vec, "converged": result.converged,
                           "seconds": time.perf_counter() - start}
        data[problem.key] = {"z0": problem.z0, "z1": problem.z1, "ref": ref.dist, "ref_unc": ref.uncertainty, "cpu": cpu}
        print(f"({problem.key}) reference {ref.seconds:.0f} s; cpu energy {cpu['energy']['seconds']:.1f} s, "
              f"auto {cpu['auto']['seconds']:.1f} s", flush=True)
    z1, z0 = d.throughput_pairs(n_throughput)
    data["throughput"] = {"z0": z0, "z1": z1}
    data["threads"] = torch.get_num_threads()
    add_cpu_answers(data, api_pairs)
    return data


def add_cpu_answers(data: dict, n_pairs: int) -> None:
    """Part 1's CPU side, so that the GPU machine computes only the GPU side."""
    cpu = torch.device("cpu")
    data["api_cpu"] = {label: api_results(dec, z0[:n_pairs], z1[:n_pairs], cpu)
                       for label, (dec, z0, z1) in api_cases(data).items()}
    data["api_pairs"] = n_pairs
    data["frechet_cpu"] = frechet_on(_vae_decoder(data), frechet_points(data), cpu)


def _vae_decoder(data: dict) -> GaussianDecoder:
    return GaussianDecoder(data["vae"]["mean"], data["vae"]["std"])


# -------------------------------------------------------------------------------- utilities
class Report:
    def __init__(self, out: str, budget: float):
        self.lines: list[str] = []
        self.out = out
        self.start = time.perf_counter()
        self.budget = budget

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def add(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        with open(os.path.join(self.out, "gpu_check.md"), "w") as f:  # incremental: a killed run keeps its part
            f.write("\n".join(self.lines) + "\n")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - start


def _rel(a, b) -> float:
    """Largest difference relative to the largest magnitude of ``a`` (inf for other shapes, NaN where NaNs differ)."""
    a, b = (torch.as_tensor(x).detach().to("cpu", F64) for x in (a, b))
    if a.shape != b.shape:
        return float("inf")
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not bool((torch.isfinite(a) == torch.isfinite(b)).all()):
        return float("nan")
    scale = max(float(a[finite].abs().max()) if finite.any() else 0.0, 1e-300)
    return float((a - b)[finite].abs().max()) / scale if finite.any() else 0.0


# ------------------------------------------------------------------------- 1. same answers
def _tanh(seed: int, out: int = 64) -> torch.nn.Module:
    return rb._tanh_mlp(2, out, hidden=32, seed=seed)


def api_cases(data: dict) -> dict[str, tuple[object, torch.Tensor, torch.Tensor]]:
    """Decoder, base points (8, 2) and end points (8, 2) for each decoder kind."""
    gen = torch.Generator().manual_seed(5)
    codes = data["vae"]["codes"].to(F64)
    idx = torch.randint(len(codes), (16,), generator=gen)
    code_pairs = (codes[idx[:8]], codes[idx[8:]])
    normal = (torch.randn(8, 2, generator=gen, dtype=F64), torch.randn(8, 2, generator=gen, dtype=F64))
    small = (0.6 * torch.randn(8, 2, generator=gen, dtype=F64), 0.6 * torch.randn(8, 2, generator=gen, dtype=F64))
    gp_inputs = torch.randn(40, 2, generator=gen, dtype=F64)
    gp_outputs = torch.cat([gp_inputs.sin(), (gp_inputs**2).sum(-1, keepdim=True).cos()], dim=-1)
    return {
        "sphere chart (callable)": (rb._inverse_stereographic, *small),
        "tanh MLP (module)": (rb.build_problem("b", 1, data["seed"]).decoder, *normal),
        "digits VAE (Gaussian, expected metric)": (_vae_decoder(data), *code_pairs),
        "ensemble of 2 tanh MLPs": (EnsembleDecoder([_tanh(1), _tanh(2)]), *normal),
        "Gaussian process": (GaussianProcessDecoder(gp_inputs, gp_outputs, lengthscale=1.0, noise_variance=1e-3), *small),
    }


def api_results(decoder, z0: torch.Tensor, z1: torch.Tensor, device: torch.device) -> dict:
    """Every public operation, on ``device``; values moved to the CPU."""
    space = PullbackManifold(decoder, 2, on_failure="ignore")
    m = space.metric
    z0, z1 = z0.to(device), z1.to(device)
    v = 0.3 * (z1 - z0)
    out = {}

    def record(name, fn):
        try:
            value = fn()
            out[name] = value if isinstance(value, str) else torch.as_tensor(value).detach().cpu()
        except Exception as err:  # noqa: BLE001 -- reported, the run goes on
            out[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            traceback.print_exc()

    record("metric_matrix", lambda: m.metric_matrix(z0))
    record("christoffels", lambda: m.christoffels(z0))
    record("inner_product", lambda: m.inner_product(v, z1 - z0, z0))
    record("exp", lambda: m.exp(v, z0))
    t = torch.linspace(0, 1, 17, dtype=F64, device=device)
    curve = z0[:, None] + t[:, None] * (z1 - z0)[:, None]
    record("curve_length", lambda: m.curve_length(curve))
    for method in ("energy", "auto", "shooting"):
        def solve(method=method):
            result = m.solve_log(z1, z0, method=method)
            if result.tangent_vec.device != z0.device:
                return f"result on {result.tangent_vec.device}, points on {z0.device}"
            return torch.cat([result.tangent_vec, result.converged[:, None].to(F64)], dim=-1)
        record(f"solve_log {method}", solve)
    record("dist", lambda: m.dist(z0, z1))
    record("parallel_transport", lambda: m.parallel_transport(v, z0, end_point=z1))
    record("geodesic (9 points)", lambda: m.geodesic(initial_point=z0[:2], end_point=z1[:2])(t[::2]))
    return out


def frechet_on(decoder, points: torch.Tensor, device: torch.device) -> torch.Tensor:
    """geomstats' FrechetMean ("batch": one mean per column); geomstats makes tensors on the default device."""
    from geomstats.learning.frechet_mean import FrechetMean

    space = PullbackManifold(decoder, 2, on_failure="ignore")
    previous = torch.get_default_device()
    torch.set_default_device(device)
    try:
        estimator = FrechetMean(space, method="batch")
        estimator.optimizer.init_point = points.to(device).mean(0)
        estimator.optimizer.max_iter = 3
        return estimator.fit(points.to(device)).estimate_.detach().cpu()
    finally:
        torch.set_default_device(previous)


def frechet_points(data: dict) -> torch.Tensor:
    """Six codes of each of three digit classes, ``(6, 3, 2)``: geomstats' batch layout."""
    codes, labels = data["vae"]["codes"].to(F64), data["vae"]["labels"]
    return torch.stack([codes[labels == k][:6] for k in (0, 3, 7)], dim=1)


def part_same_answers(report: Report, data: dict, device: torch.device, n_pairs: int) -> None:
    report.add("## 1. Same answers on the GPU as on the CPU (float64)")
    report.add("")
    if "api_pairs" in data and data["api_pairs"] != n_pairs:
        print(f"--api-pairs {n_pairs} ignored: the prepared CPU answers are for {data['api_pairs']} pairs", file=sys.stderr)
        n_pairs = data["api_pairs"]
    report.add(f"Largest difference relative to the largest magnitude, GPU vs CPU, {n_pairs} pairs per decoder "
               "(for `solve_log`: the tangent vectors and the converged flags together). Differences come from "
               "the order of floating-point sums (cuBLAS vs MKL/OpenBLAS) and grow through iterative solves.")
    report.add("")
    cases = api_cases(data)
    names, header_done = None, False
    for label, (decoder, z0, z1) in cases.items():
        if report.left() < 30:
            report.add(f"{label}: skipped (budget)")
            continue
        z0, z1 = z0[:n_pairs], z1[:n_pairs]
        cpu = data["api_cpu"][label] if "api_cpu" in data else api_results(decoder, z0, z1, torch.device("cpu"))
        gpu, seconds = _timed(lambda: api_results(decoder, z0, z1, device), device)
        names = names or list(cpu)
        cells = []
        for name in names:
            a, b = cpu.get(name), gpu.get(name)
            if isinstance(b, str):
                cells.append(f"GPU error: {b}")
            elif isinstance(a, str):
                cells.append(f"CPU error: {a}")
            else:
                cells.append(f"{_rel(a, b):.1e}")
        if not header_done:
            report.add("| decoder | " + " | ".join(names) + " | GPU seconds (all) |")
            report.add("|---|" + "---|" * (len(names) + 1))
            header_done = True
        report.add(f"| {label} | " + " | ".join(cells) + f" | {seconds:.1f} |")
    report.add("")


def part_frechet(report: Report, data: dict, device: torch.device) -> None:
    """geomstats' FrechetMean on the GPU (it makes its tensors on the default device)."""
    report.add("## 1b. geomstats' FrechetMean on the GPU")
    report.add("")
    points = frechet_points(data)
    if report.left() < 60:
        report.add("geomstats `FrechetMean` on the GPU: skipped (budget)")
        return
    try:
        cpu = data["frechet_cpu"] if "frechet_cpu" in data else frechet_on(_vae_decoder(data), points, torch.device("cpu"))
        gpu, seconds = _timed(lambda: frechet_on(_vae_decoder(data), points, device), device)
        report.add(f"geomstats `FrechetMean(space, method='batch')`, digits VAE, 3 classes x 6 codes, 3 iterations, "
                   f"`torch.set_default_device({device.type!r})`: GPU vs CPU {_rel(cpu, gpu):.1e} ({seconds:.1f} s on the GPU).")
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        report.add(f"geomstats `FrechetMean` on the GPU: **error** `{type(err).__name__}: {str(err).splitlines()[0][:200]}`")
    report.add("")


# --------------------------------------------------------------------- 2. accuracy and speed
def part_accuracy(report: Report, data: dict, device: torch.device) -> None:
    report.add("## 2. Accuracy and speed on problems (b) and (d), 30 pairs, one batched call")
    report.add("")
    report.add("| problem | method | GPU s/log | CPU s/log (prepared here) | converged | rel. error vs reference: median | max "
               "| GPU vs CPU tangent vectors |")
    report.add("|---|---|---|---|---|---|---|---|")
    decoders = {"b": rb.build_problem("b", 1, data["seed"]).decoder, "d": _vae_decoder(data)}
    for key, decoder in decoders.items():
        p = data[key]
        z0, z1 = p["z0"].to(device), p["z1"].to(device)
        space = PullbackManifold(decoder, 2, on_failure="ignore")
        for method in ("energy", "auto"):
            if report.left() < 60:
                report.add(f"| ({key}) | {method} | skipped: budget | | | | | |")
                continue
            space.metric.solve_log(z1[:2] * 0.9, z0[:2] * 0.9, method=method)  # warm-up (kernels, casts)
            result, seconds = _timed(lambda: space.metric.solve_log(z1, z0, method=method), device)
            ok = result.converged.cpu()
            with torch.no_grad():
                length = space.metric.norm(result.tangent_vec, z0).cpu()
            err = ((length - p["ref"]) / p["ref"]).abs()
            cpu = p["cpu"][method]
            report.add(f"| ({key}) | {method} | {seconds / len(z0):.3g} | {cpu['seconds'] / len(z0):.3g} | "
                       f"{int(ok.sum())}/{len(ok)} | {float(err.median()):.1e} | {float(err.max()):.1e} | "
                       f"{_rel(cpu['tangent_vec'], result.tangent_vec):.1e} |")
    report.add("")


# ------------------------------------------------------------------------------ 3. throughput
def _throughput(space, z1, z0, method, chunk, device):
    space.metric.solve_log(z1[:2] * 0.9, z0[:2] * 0.9, method=method)
    result, seconds = _timed(lambda: space.metric.solve_log(z1, z0, method=method, chunk_size=chunk), device)
    return seconds, float(result.converged.float().mean())


def part_throughput(report: Report, data: dict, device: torch.device, sizes: list[tuple[str, str, int, int]]) -> None:
    report.add("## 3. Throughput on (d): many logs in one `solve_log` call")
    report.add("")
    report.add("| device | method | logs | chunk_size | wall s | ms / log | converged |")
    report.add("|---|---|---|---|---|---|---|")
    z0_all, z1_all = data["throughput"]["z0"], data["throughput"]["z1"]
    space = PullbackManifold(_vae_decoder(data), 2, on_failure="ignore")
    for where, method, n, chunk in sizes:
        dev = device if where == "gpu" else torch.device("cpu")
        if report.left() < 45:
            report.add(f"| {where} | {method} | {n} | {chunk} | skipped: budget | | |")
            continue
        try:
            seconds, conv = _throughput(space, z1_all[:n].to(dev), z0_all[:n].to(dev), method, chunk, dev)
            report.add(f"| {where} ({'GPU' if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}) | "
                       f"{method} | {n} | {chunk} | {seconds:.1f} | {seconds / n * 1e3:.2f} | {conv * 100:.2f}% |")
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            report.add(f"| {where} | {method} | {n} | {chunk} | **error** `{type(err).__name__}: "
                       f"{str(err).splitlines()[0][:120]}` | | |")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report.add("")


def part_profile(report: Report, data: dict, device: torch.device, n: int) -> None:
    """Where an energy solve spends its time (torch.profiler, top operators)."""
    from torch.profiler import ProfilerActivity, profile

    report.add(f"## 4. Profile: energy `solve_log` of {n} (d) pairs in one chunk")
    report.add("")
    z0, z1 = data["throughput"]["z0"][:n].to(device), data["throughput"]["z1"][:n].to(device)
    space = PullbackManifold(_vae_decoder(data), 2, on_failure="ignore")
    space.metric.solve_log(z1[:2] * 0.9, z0[:2] * 0.9, method="energy")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        space.metric.solve_log(z1, z0, method="energy", chunk_size=n)
        _sync(device)
    wall = time.perf_counter() - start
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=40)
    with open(os.path.join(report.out, "profile.txt"), "w") as f:
        f.write(table + "\n\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=40) + "\n")
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync"))
    report.add(f"{wall:.1f} s under the profiler; kernel launches {launches}, copies/syncs {syncs}. "
               "Top operators by GPU time in profile.txt.")
    report.add("")
    report.add("```")
    report.add("\n".join(table.splitlines()[:16]))
    report.add("```")
    report.add("")


def run(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    torch.set_default_dtype(F64)
    report = Report(args.out, args.budget)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    data = torch.load(args.prepared, weights_only=False) if args.prepared else prepare(N_PAIRS, 0, 10_000, args.api_pairs)
    name = "cpu (a smoke run of this script)"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    report.add("# GPU check: pullback-manifold on CUDA")
    report.add("")
    report.add(f"- device: {name}; torch {torch.__version__}; "
               f"CPU threads {torch.get_num_threads()} ({os.cpu_count()} logical CPUs)")
    report.add(f"- command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`")
    report.add("")
    for part in (a.strip() for a in args.parts.split(",")):  # in the order given
        if part == "same":
            part_same_answers(report, data, device, args.api_pairs)
        elif part == "frechet":
            part_frechet(report, data, device)
        elif part == "accuracy":
            part_accuracy(report, data, device)
        elif part == "profile":
            part_profile(report, data, device, args.profile_pairs)
        elif part == "throughput":
            sizes = []
            for item in args.throughput.split(","):
                where, method, n, chunk = item.split(":")
                sizes.append((where, method, int(n), int(chunk)))
            part_throughput(report, data, device, sizes)
        else:
            raise ValueError(f"unknown part {part!r}: use same, frechet, accuracy, throughput, profile")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    report.add(f"Total {time.perf_counter() - report.start:.0f} s; peak GPU memory {peak:.2f} GiB.")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build problems, references and CPU solutions (CPU)")
    p.add_argument("--file", required=True)
    p.add_argument("--pairs", type=int, default=N_PAIRS)
    p.add_argument("--throughput-pairs", type=int, default=10_000)
    p.add_argument("--api-pairs", type=int, default=8, help="pairs per decoder in part 1 (at most 8)")
    r = sub.add_parser("run", help="the checks and timings on the GPU")
    r.add_argument("--prepared", default=None, help="file written by `prepare` (else built here, on the CPU)")
    r.add_argument("--out", required=True)
    r.add_argument("--budget", type=float, default=1e9, help="seconds; later steps are skipped past it")
    r.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke run of the script)")
    r.add_argument("--parts", default="same,frechet,accuracy,throughput", help="run in this order")
    r.add_argument("--api-pairs", type=int, default=8, help="pairs per decoder in part 1 (at most 8)")
    r.add_argument("--profile-pairs", type=int, default=1000, help="pairs of the profiled energy solve (part 4)")
    r.add_argument("--throughput", default="gpu:energy:10000:256,gpu:energy:10000:2048,gpu:energy:10000:10000,"
                   "gpu:auto:1000:1000,cpu:energy:1000:256",
                   help="comma-separated where:method:n:chunk_size runs")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        os.makedirs(os.path.dirname(os.path.abspath(args.file)), exist_ok=True)
        torch.save(prepare(args.pairs, 0, args.throughput_pairs, args.api_pairs), args.file)
        print(f"wrote {args.file}")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
