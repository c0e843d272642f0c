"""Shape, dtype, device and module-handling contract; input validation; backend setup."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from decoders_zoo import inverse_stereographic, tanh_mlp
from pullback_manifold import DecoderError, PullbackManifold

F64 = torch.float64


@pytest.fixture(scope="module")
def space():
    return PullbackManifold(tanh_mlp(2, 6, hidden=8, seed=1), dim=2)


def test_single_point_and_batch_shapes(space):
    m = space.metric
    z = torch.tensor([0.1, -0.2], dtype=F64)
    Z = torch.randn(4, 2, dtype=F64) * 0.3
    assert m.metric_matrix(z).shape == (2, 2)
    assert m.metric_matrix(Z).shape == (4, 2, 2)
    assert m.metric_matrix(Z.reshape(2, 2, 2)).shape == (2, 2, 2, 2)
    assert m.christoffels(z).shape == (2, 2, 2)
    assert m.inner_product(z, z, z).shape == ()
    assert m.exp(z, z).shape == (2,)
    assert m.exp(Z, Z).shape == (4, 2)
    assert m.log(z, z * 0).shape == (2,)
    assert m.dist(z, z * 0).shape == ()


def test_one_base_point_broadcasts_against_many(space):
    m = space.metric
    base = torch.tensor([0.2, 0.1], dtype=F64)
    points = torch.randn(5, 2, dtype=F64) * 0.4
    many = m.log(points, base)
    assert many.shape == (5, 2)
    one_by_one = torch.stack([m.log(p, base) for p in points])
    torch.testing.assert_close(many, one_by_one, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(m.dist(base, points), m.dist(points, base), rtol=1e-6, atol=1e-8)
    assert m.inner_product(points, points, base).shape == (5,)


def test_float32_decoder_with_float32_points_gives_float32():
    net = tanh_mlp(2, 6, hidden=8, seed=1, dtype=torch.float32)
    space = PullbackManifold(net, dim=2)
    z0 = torch.tensor([[0.1, -0.2], [0.3, 0.2]])
    z1 = torch.tensor([[-0.4, 0.5], [0.0, -0.3]])
    for out in (space.metric.metric_matrix(z0), space.metric.exp(z1, z0), space.metric.log(z1, z0), space.metric.dist(z0, z1)):
        assert out.dtype == torch.float32
    report = space.metric.solve_log(z1, z0)
    assert report.all_converged, report.summary()


def test_float32_and_float64_agree():
    net = tanh_mlp(2, 6, hidden=8, seed=1, dtype=torch.float32)
    space = PullbackManifold(net, dim=2)  # the module is cast to the points' dtype
    z0 = torch.tensor([[0.1, -0.2], [0.3, 0.2]])
    z1 = torch.tensor([[-0.4, 0.5], [0.0, -0.3]])
    d32 = space.metric.dist(z0, z1)
    d64 = space.metric.dist(z0.double(), z1.double())
    assert d64.dtype == F64
    torch.testing.assert_close(d32.double(), d64, rtol=1e-4, atol=1e-5)


def test_import_keeps_torch_default_dtype():
    code = "import torch; import pullback_manifold; print(torch.get_default_dtype())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch.float32"


def test_geomstats_imported_with_another_backend_is_a_clear_error():
    code = "import geomstats.backend\nimport pullback_manifold"
    env = {**os.environ, "GEOMSTATS_BACKEND": "numpy"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert out.returncode != 0
    if np.__version__ < "2.4":  # geomstats 2.8 itself imports under older numpy
        assert "BackendError" in out.stderr and "'numpy' backend" in out.stderr


def test_requesting_another_backend_is_a_clear_error():
    env = {**os.environ, "GEOMSTATS_BACKEND": "autograd"}
    out = subprocess.run(
        [sys.executable, "-c", "import pullback_manifold"], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode != 0 and "GEOMSTATS_BACKEND='autograd'" in out.stderr


def test_module_left_untouched():
    net = tanh_mlp(2, 6, hidden=8, seed=1)
    net.train()
    space = PullbackManifold(net, dim=2)
    z0 = torch.zeros(2, dtype=F64)
    z1 = torch.tensor([0.3, 0.4], dtype=F64, requires_grad=True)
    space.metric.dist(z0, z1)
    space.metric.metric_matrix(z1).sum().backward()
    assert net.training  # eval mode only during geometry
    assert all(p.grad is None for p in net.parameters())
    assert next(net.parameters()).dtype == F64


def test_dropout_is_off_during_geometry():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4))
    net.train()
    space = PullbackManifold(net, dim=2)
    z = torch.randn(3, 2)
    torch.testing.assert_close(space.metric.metric_matrix(z), space.metric.metric_matrix(z))


def test_one_module_decoder_serves_threads_in_different_dtypes():
    """Decoders call their module with cast parameters (swapped in for the call) in eval
    mode: two threads using one module, in float32 and float64, must not see each
    other's parameters or mode (they did: "mat1 and mat2 must have the same dtype")."""
    import threading

    from pullback_manifold.decoders import as_decoder
    from pullback_manifold.geometry import embedding_jet

    net = tanh_mlp(2, 50, hidden=64, seed=3, dtype=torch.float32).train()
    decoder = as_decoder(net)
    z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    directions = torch.eye(2)[:, None, :].expand(2, 64, 2)

    def raw_jet():  # the module itself, with its own parameters (the low-level functions take one)
        return embedding_jet(net, z.float(), directions).first

    calls = {"float32": lambda: decoder.embed(z.float()), "float64": lambda: decoder.embed(z), "raw jet": raw_jet}
    expected = {name: call() for name, call in calls.items()}
    failures = []

    def work(name):
        try:
            for _ in range(300):
                out = calls[name]()
                assert out.dtype == expected[name].dtype and torch.equal(out, expected[name]), name
        except Exception as err:  # noqa: BLE001 -- reported by the main thread
            failures.append(repr(err))

    threads = [threading.Thread(target=work, args=(name,)) for name in list(calls) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    assert net.training  # every call restored the module's mode
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in net.parameters())


def test_image_decoder_outputs_are_flattened():
    lin = torch.nn.Linear(2, 2 * 3 * 3).double()
    decoder = lambda z: lin(z).reshape(*z.shape[:-1], 2, 3, 3)  # noqa: E731
    space = PullbackManifold(decoder, dim=2)
    z = torch.randn(4, 2, dtype=F64)
    torch.testing.assert_close(space.metric.metric_matrix(z), (lin.weight.T @ lin.weight).expand(4, 2, 2))


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(base_point=torch.zeros(3, dtype=F64)), ValueError, "base_point has shape (3,)"),
        (dict(base_point=torch.zeros(2, dtype=torch.int64)), TypeError, "base_point has dtype torch.int64"),
        (dict(base_point=torch.tensor([0.0, float("nan")], dtype=F64)), ValueError, "base_point contains NaN"),
    ],
)
def test_bad_points(space, kwargs, error, fragment):
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        space.metric.metric_matrix(**kwargs)


def test_mismatched_batch_shapes(space):
    with pytest.raises(ValueError, match="batch shapes do not broadcast"):
        space.metric.log(torch.zeros(3, 2, dtype=F64), torch.zeros(4, 2, dtype=F64))


def test_decoder_with_wrong_batch_shape():
    space = PullbackManifold(lambda z: z.sum(0), dim=2)
    with pytest.raises(ValueError, match=r"decoder returned shape \(2,\) for input \(2, 2\)"):
        space.metric.metric_matrix(torch.zeros(2, 2, dtype=F64))


def test_decoder_with_no_outputs_or_meta_parameters():
    empty = PullbackManifold(lambda z: z[:, :0], dim=2)
    for z in (torch.zeros(5, 2, dtype=F64), torch.zeros(2, dtype=F64)):
        with pytest.raises(DecoderError, match="no outputs per point"):
            empty.metric.metric_matrix(z)
    meta = PullbackManifold(torch.nn.Linear(2, 3, device="meta"), dim=2)
    with pytest.raises(DecoderError, match="meta device"):
        meta.metric.dist(torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))


def test_decoder_returning_nan():
    space = PullbackManifold(lambda z: z.log(), dim=2)
    with pytest.raises(DecoderError, match="NaN or Inf"):
        space.metric.metric_matrix(torch.tensor([-1.0, 1.0], dtype=F64))


def test_decoder_without_derivative():
    space = PullbackManifold(lambda z: torch.tanh(z).detach(), dim=2)
    with pytest.raises(DecoderError, match="Jacobian is exactly zero"):
        space.metric.metric_matrix(torch.ones(2, dtype=F64))
    integer = PullbackManifold(lambda z: (z * 10).long(), dim=2)
    with pytest.raises(TypeError, match="floating"):
        integer.metric.metric_matrix(torch.ones(2, dtype=F64))


def test_space_construction_errors():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        PullbackManifold(inverse_stereographic, dim=0)
    with pytest.raises(ValueError, match="on_failure"):
        PullbackManifold(inverse_stereographic, dim=2, on_failure="explode")
    with pytest.raises(TypeError, match="decoder must be a torch callable"):
        PullbackManifold("not a decoder", dim=2)


def test_belongs_and_random_point():
    space = PullbackManifold(inverse_stereographic, dim=2)
    assert space.belongs(torch.zeros(2)).item()
    assert not space.belongs(torch.tensor([float("inf"), 0.0])).item()
    assert space.belongs(torch.zeros(3, 2)).shape == (3,)
    assert space.random_point(5).shape == (5, 2)


def test_one_row_of_a_batch_as_base_point_with_a_plain_callable():
    """A row view such as points[1] broadcast against the batch once reached torch.func as a
    stride-0 view, which its forward-mode derivatives cannot write to: geomstats' k-means
    (dist(center, points)) failed on every plain-callable decoder."""
    A = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=F64)
    metric = PullbackManifold(lambda z: z @ A.T, dim=2).metric
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]], dtype=F64)
    expected = ((points[1] - points) @ A.T).norm(dim=-1)
    torch.testing.assert_close(metric.dist(points[1], points), expected, rtol=1e-10, atol=1e-12)
    vectors = torch.randn(3, 2, dtype=F64)
    torch.testing.assert_close(
        metric.inner_product(vectors, vectors, points[1]), ((vectors @ A.T) ** 2).sum(-1), rtol=1e-12, atol=0
    )
    assert torch.equal(metric.geodesic_acceleration(points[1], vectors), torch.zeros(3, 2, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32 model", "float64 model"])
def test_parameters_changed_through_data_are_seen(dtype):
    """The cast copies of a model's parameters once went stale when the parameters changed
    through .data (manual updates, nn.utils.vector_to_parameters): neither a tensor's
    identity nor its version changes then."""
    net = tanh_mlp(2, 4, hidden=8, dtype=dtype)
    metric = PullbackManifold(net, dim=2).metric
    a, b = torch.zeros(2, dtype=F64), torch.tensor([0.5, 0.5], dtype=F64)
    before = metric.dist(a, b)
    torch.nn.utils.vector_to_parameters(2 * torch.nn.utils.parameters_to_vector(net.parameters()), net.parameters())
    torch.testing.assert_close(metric.dist(a, b), PullbackManifold(net, dim=2).metric.dist(a, b), rtol=1e-12, atol=0)
    net[4].weight.data.mul_(2)
    z = torch.tensor([[0.1, -0.3]], dtype=F64)
    expected = PullbackManifold(net, dim=2).metric.metric_matrix(z)
    torch.testing.assert_close(metric.metric_matrix(z), expected, rtol=1e-12, atol=0)
    assert not torch.allclose(metric.dist(a, b), before)
    # A widening output layer: the metric and the energy method use a factor of its weight.
    wide = tanh_mlp(2, 30, hidden=8, dtype=dtype)
    metric = PullbackManifold(wide, dim=2).metric
    metric.dist(a, b), metric.metric_matrix(z)
    wide[4].weight.data.mul_(2)
    fresh = PullbackManifold(wide, dim=2).metric
    torch.testing.assert_close(metric.metric_matrix(z), fresh.metric_matrix(z), rtol=1e-12, atol=0)
    torch.testing.assert_close(metric.dist(a, b), fresh.dist(a, b), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32 model", "float64 model"])
def test_small_parameter_changes_reach_the_float32_derivatives(dtype):
    """A float64 solve also runs the decoder in float32 (the energy method's Newton
    derivatives). Those copies once went stale after a write through .data: a small change
    passes the float32-float64 agreement check, and Newton then converged with the old
    model's derivatives, to nodes off the new model's discrete geodesic."""
    from pullback_manifold import discrete, geometry

    net = tanh_mlp(2, 4, hidden=8, dtype=dtype)
    metric = PullbackManifold(net, dim=2).metric
    a, b = torch.zeros(2, dtype=F64), torch.tensor([0.5, 0.5], dtype=F64)
    metric.dist(a, b)  # caches the cast copies, float32 ones included
    torch.nn.utils.vector_to_parameters(
        (1 + 1e-6) * torch.nn.utils.parameters_to_vector(net.parameters()), net.parameters()
    )
    fresh = PullbackManifold(net, dim=2).metric
    assert metric.dist(a, b).item() == fresh.dist(a, b).item()
    nodes = torch.tensor([[0.1, -0.3], [0.25, 0.25]], dtype=F64)
    derivatives = [
        discrete._node_derivatives(geometry.energy_embedding(m._embed, m.regularization), nodes, True, torch.float32)
        for m in (metric, fresh)
    ]
    for old, new in zip(*derivatives):
        assert torch.equal(old, new)
