"""Global first guesses of the energy method: shortest paths on a latent grid."""

import torch

from pullback_manifold.discrete import energy_log
from pullback_manifold.graph_start import _edges, shortest_path_start

F64 = torch.float64


def hills(z):
    """The plane with two tall Gaussian hills on the z_1 axis. Between a = (-1, 0) and
    b = (1, 0) the straight line crosses the lower hill just above its top, so bending
    the line upward squeezes it between the hills; the short way goes below both."""
    low = torch.tensor([0.0, -0.05], dtype=z.dtype)
    high = torch.tensor([0.0, 0.75], dtype=z.dtype)
    h1 = 6.0 * torch.exp(-((z - low) ** 2).sum(-1, keepdim=True) / 0.1)
    h2 = 6.0 * torch.exp(-((z - high) ** 2).sum(-1, keepdim=True) / 0.1)
    return torch.cat([z, h1, h2], -1)


def test_grid_edges_cover_sixteen_directions_once():
    edges = _edges(5, 2)
    steps = {tuple(int(v) for v in torch.tensor(divmod(int(j), 5)) - torch.tensor(divmod(int(i), 5))) for i, j in edges}
    assert len(steps) == 8  # 16 directions, each edge once
    assert len(edges) == len({(min(i, j), max(i, j)) for i, j in edges.tolist()})


def test_the_global_start_finds_the_way_around_that_the_straight_line_misses():
    a = torch.tensor([[-1.0, 0.0]], dtype=F64)
    b = torch.tensor([[1.0, 0.0]], dtype=F64)
    start, from_graph = shortest_path_start(hills, b, a, 16)
    assert from_graph.item() and start[0, 8, 1] < -0.3  # the grid route passes below

    local, local_curve, local_length = energy_log(hills, b, a, global_start=False)
    result, curve, length = energy_log(hills, b, a)
    assert result.converged.item() and result.residual.item() <= 1e-5
    middle = curve.shape[1] // 2
    assert curve[0, middle, 1] < -0.3 < 0.0 < local_curve[0, middle, 1]  # below both hills; between them
    assert length.item() < 0.6 * local_length.item()  # 2.47 against 4.55


def test_the_straight_line_is_kept_where_it_is_shorter():
    """On the plane every grid route is longer than the segment itself."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 2, generator=g, dtype=F64), torch.randn(20, 2, generator=g, dtype=F64)
    start, from_graph = shortest_path_start(lambda z: 2.0 * z, b, a, 16)
    assert not from_graph.any()
    line = a[:, None] + torch.linspace(0, 1, 17, dtype=F64)[:, None] * (b - a)[:, None]
    torch.testing.assert_close(start, line, rtol=0, atol=1e-15)


def test_no_grid_above_three_dimensions():
    a, b = torch.zeros(3, 4, dtype=F64), torch.ones(3, 4, dtype=F64)
    start, from_graph = shortest_path_start(lambda z: z, b, a, 8)
    assert not from_graph.any() and start.shape == (3, 9, 4)
