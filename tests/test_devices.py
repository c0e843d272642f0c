"""Device hygiene, checked without a GPU.

CI has no GPU, and a tensor made on the default device inside a solver only fails
where the points live elsewhere: the first GPU run of ``benchmarks/gpu_check.py``
found ``torch.full((n,), nan, dtype=v.dtype)`` in the shooting solver, which broke
``log(method="auto")`` on CUDA. So every call in the package that makes a new
tensor (``torch.zeros``, ``torch.full``, ``torch.Generator``, ...) names its device:
the device of an input, or ``"cpu"`` where the CPU is meant (a CPU generator's
draws, pictures). Not the default device: the second GPU run found that under
``torch.set_default_device("cuda")`` (how geomstats' ``FrechetMean`` runs on a
GPU) ``torch.randn(..., generator=<CPU generator>)`` fails. (``new_*`` and
``*_like`` take the device of their input by construction.)
"""

import ast
import pathlib

import pullback_manifold

CONSTRUCTORS = {"full", "zeros", "ones", "empty", "empty_strided", "tensor", "scalar_tensor", "arange", "range", "eye",
                "linspace", "logspace", "rand", "randn", "randint", "randperm", "tril_indices", "triu_indices",
                "Generator"}


def _constructor_calls_without_device(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def function_of(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name
        return "<module>"

    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func = node.func
        if not (isinstance(func.value, ast.Name) and func.value.id == "torch" and func.attr in CONSTRUCTORS):
            continue
        device = next((k.value for k in node.keywords if k.arg == "device"), None)
        generator = next((k.value for k in node.keywords if k.arg == "generator"), None)
        where = f"{path.name}:{node.lineno} in {function_of(node)}(): torch.{func.attr}(...)"
        if device is None or (isinstance(device, ast.Constant) and device.value is None):
            yield f"{where} without device="
        elif generator is not None and not (
            (isinstance(device, ast.Constant) and device.value == "cpu") or ast.dump(device) == ast.dump(
                ast.Attribute(value=generator, attr="device", ctx=ast.Load()))
        ):
            # a generator draws on its own device: "cpu" for the package's, or generator.device
            yield f"{where} with a generator and a device other than 'cpu' or the generator's"


def test_new_tensors_take_the_device_of_the_inputs():
    package = pathlib.Path(pullback_manifold.__file__).parent
    offenders = [line for path in sorted(package.rglob("*.py")) for line in _constructor_calls_without_device(path)]
    assert not offenders, "tensors made on the default device (fails for CUDA points):\n" + "\n".join(offenders)


def test_the_check_sees_an_offender(tmp_path):
    """The scan is not vacuous: it flags the very line the GPU run found."""
    bad = tmp_path / "solver.py"
    bad.write_text("import torch\n\ndef f(v, n):\n    return torch.full((n,), float('nan'), dtype=v.dtype)\n")
    assert list(_constructor_calls_without_device(bad)) == [
        "solver.py:4 in f(): torch.full(...) without device="
    ]
    drawn = tmp_path / "noise.py"
    drawn.write_text("import torch\n\ndef f(g, x):\n    return torch.randn(3, generator=g, device=x.device)\n")
    assert list(_constructor_calls_without_device(drawn)) == [
        "noise.py:4 in f(): torch.randn(...) with a generator and a device other than 'cpu' or the generator's"
    ]
    good = tmp_path / "fixed.py"
    good.write_text("import torch\n\ndef f(v, n):\n    return torch.full((n,), 0.0, dtype=v.dtype, device=v.device)\n")
    assert list(_constructor_calls_without_device(good)) == []


# ------------------------------------------------------------------ the default device elsewhere
# A CPU stand-in for "points on the GPU, default device set elsewhere": with the
# default device set to "meta" (tensors without data), any tensor the library
# makes on the default device, or any input it moves there, fails or comes back
# on the wrong device. Every operation must instead give, on CPU points, exactly
# the answer it gives without that setting.

import pytest  # noqa: E402
import torch  # noqa: E402

from decoders_zoo import inverse_stereographic, tanh_mlp  # noqa: E402
from pullback_manifold import EnsembleDecoder, GaussianDecoder, GaussianProcessDecoder, PullbackManifold  # noqa: E402


def _relu_mlp():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)).to(torch.float64)


def _decoder(name):
    if name == "chart":
        return inverse_stereographic
    if name == "mlp":
        return tanh_mlp(2, 5, hidden=8, seed=1)
    if name == "relu":
        return _relu_mlp()
    if name == "gaussian":
        std = torch.nn.Sequential(tanh_mlp(2, 5, hidden=8, seed=2), torch.nn.Softplus())
        return GaussianDecoder(tanh_mlp(2, 5, hidden=8, seed=1), std)
    if name == "ensemble":
        return EnsembleDecoder([tanh_mlp(2, 5, hidden=8, seed=1), tanh_mlp(2, 5, hidden=8, seed=4)])
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 2, generator=g, dtype=torch.float64)
    return GaussianProcessDecoder(X, torch.cat([X.sin(), X.cos()], dim=-1), noise_variance=1e-3)


def _operations(space, z0, z1):
    m = space.metric
    v = 0.3 * (z1 - z0)
    t = torch.linspace(0, 1, 5, dtype=torch.float64, device="cpu")
    curve = z0[:, None] + t[:, None] * (z1 - z0)[:, None]
    out = {
        "metric_matrix": lambda: m.metric_matrix(z0),
        "curve_length": lambda: m.curve_length(curve),
        "energy": lambda: m.solve_log(z1, z0, method="energy").tangent_vec,
        "dist": lambda: m.dist(z0, z1),
    }
    out.update({
        "christoffels": lambda: m.christoffels(z0),
        "exp": lambda: m.exp(v, z0),
        "auto": lambda: m.solve_log(z1, z0, method="auto").tangent_vec,
        "shooting": lambda: m.solve_log(z1, z0, method="shooting").tangent_vec,
        "parallel_transport": lambda: m.parallel_transport(v, z0, end_point=z1),
        "geodesic": lambda: m.geodesic(initial_point=z0, end_point=z1)(t),
    })
    return out


# Every operation on the module decoder (fast); on the others, the ones that reach
# their own code (the GP's constants, the ReLU decoder's jitter, the compact map of the
# Gaussian and ensemble decoders, the plain callable's generic jets) at a few seconds each.
CASES = [
    ("mlp", None),
    ("chart", ("metric_matrix", "christoffels", "exp", "energy")),
    ("relu", ("energy",)),  # one pair: the nonsmooth energy solve takes seconds
    ("gaussian", ("metric_matrix", "energy", "dist")),
    ("ensemble", ("metric_matrix", "energy", "dist")),
    ("gp", ("metric_matrix", "christoffels", "energy")),
]


@pytest.mark.parametrize(("name", "which"), CASES, ids=[c[0] for c in CASES])
def test_default_device_elsewhere_changes_nothing(name, which, float64_default):
    z0 = torch.tensor([[0.1, 0.2], [0.5, -0.3]], dtype=torch.float64)
    z1 = torch.tensor([[-0.4, 0.3], [0.2, 0.6]], dtype=torch.float64)
    if name == "relu":
        z0, z1 = z0[1:], z1[1:]

    def operations(space):
        ops = _operations(space, z0, z1)
        return {k: ops[k] for k in (which or ops)}

    expected = {k: fn() for k, fn in operations(PullbackManifold(_decoder(name), 2, on_failure="ignore")).items()}
    space = PullbackManifold(_decoder(name), 2, on_failure="ignore")
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        got = {}
        for k, fn in operations(space).items():
            try:
                got[k] = fn()
            except Exception as err:  # noqa: BLE001 -- collected: one report for all operations
                got[k] = err
    finally:
        torch.set_default_device(previous)
    problems = [f"{k}: {type(v).__name__}: {v}" for k, v in got.items() if isinstance(v, Exception)]
    problems += [f"{k}: on {v.device}" for k, v in got.items() if not isinstance(v, Exception) and v.device.type != "cpu"]
    assert not problems, "\n".join(problems)
    for k, value in got.items():
        torch.testing.assert_close(value, expected[k], rtol=0, atol=0, equal_nan=True, msg=k)


@pytest.mark.parametrize("name", ["mlp", "gaussian", "ensemble", "gp"])
def test_decoders_evaluate_where_the_points_are(name, float64_default):
    """A decoder's own constants follow the points (the GP kept its data on the CPU).

    ``meta`` points stand in for CUDA ones: a CPU tensor met there fails, as on a GPU.
    """
    space = PullbackManifold(_decoder(name), 2)
    decoder = space.decoder
    z = torch.tensor([[0.1, 0.2], [0.5, -0.3]], dtype=torch.float64, device="meta")
    decoder.prepare(torch.float64, z.device)
    outputs = [decoder.embed(z)]
    if name == "gp":
        outputs += [decoder.metric(z), *decoder.posterior_mean_and_variance(z), decoder.posterior_covariance(z)]
    assert all(out.device.type == "meta" for out in outputs)
    G = space.metric.metric_matrix(torch.tensor([[0.1, 0.2]], dtype=torch.float64))  # the CPU still works after
    assert G.device.type == "cpu" and torch.isfinite(G).all()
