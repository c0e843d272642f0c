"""Global first guesses of the energy method: shortest paths on a latent grid."""

import torch

from pullback_manifold import MetricDecoder
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

    _, local_curve, local_length = energy_log(hills, b, a, global_start=False)
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


class HillsMetric(MetricDecoder):
    """The pull-back metric of ``hills``, given as a metric field: ``I + sum_k grad h_k grad h_k^T``."""

    def _embed(self, z):
        return hills(z)

    def metric(self, z):
        G = torch.eye(2, dtype=z.dtype).expand(len(z), 2, 2)
        for centre in ([0.0, -0.05], [0.0, 0.75]):
            offset = z - torch.tensor(centre, dtype=z.dtype)
            gradient = -6.0 * torch.exp(-(offset**2).sum(-1, keepdim=True) / 0.1) * offset / 0.05
            G = G + gradient[:, :, None] * gradient[:, None, :]
        return G


def test_metric_field_edge_lengths_are_the_edges_lengths():
    """Simpson's rule on each grid edge (G at the end nodes and the shared midpoints) against
    the midpoint rule on 256 pieces of the edge, on the 64 x 64 grid over the hills. Measured:
    median 9e-9 (relative), 1.4e-2 at the 99th percentile and 18% on the steepest flank
    edges, where the speed changes several times along one edge; the midpoint rule on the
    edge's two halves (the rule before, four times the metric evaluations): 1.1e-7, 2.6e-2, 11%."""
    from pullback_manifold.geometry import curve_length
    from pullback_manifold.graph_start import _GRID, _decoded_lengths, _grid, _metric_edge_lengths

    a = torch.tensor([[-1.0, 0.0]], dtype=F64)
    b = torch.tensor([[1.0, 0.0]], dtype=F64)
    nodes, _ = _grid(b, a, _GRID[2])
    edges = torch.as_tensor(_edges(_GRID[2], 2))
    simpson = _metric_edge_lengths(HillsMetric(), nodes, edges)
    start, end = nodes[edges[:, 0]], nodes[edges[:, 1]]
    halves = _decoded_lengths(HillsMetric(), torch.stack([start, 0.5 * (start + end), end], 1))
    t = torch.linspace(0, 1, 257, dtype=F64)[:, None]
    dense = torch.cat(
        [
            curve_length(HillsMetric(), s[:, None] + t * (e - s)[:, None])
            for s, e in zip(start.split(4096), end.split(4096))
        ]
    )
    error, before = ((simpson - dense).abs() / dense), ((halves - dense).abs() / dense)
    assert error.median() <= 1e-7 and error.quantile(0.99) <= 2e-2 and error.max() <= 0.25
    assert error.median() <= before.median() and error.quantile(0.99) <= before.quantile(0.99)


def test_the_global_start_finds_the_way_around_in_a_metric_field():
    """The hills' detour, for the same geometry given as a MetricDecoder (Simpson edge lengths)."""
    a = torch.tensor([[-1.0, 0.0]], dtype=F64)
    b = torch.tensor([[1.0, 0.0]], dtype=F64)
    start, from_graph = shortest_path_start(HillsMetric(), b, a, 16)
    assert from_graph.item() and start[0, 8, 1] < -0.3
    result, curve, length = energy_log(HillsMetric(), b, a)
    _, _, local_length = energy_log(HillsMetric(), b, a, global_start=False)
    assert result.converged.item() and result.residual.item() <= 1e-5
    assert curve[0, curve.shape[1] // 2, 1] < -0.3
    assert length.item() < 0.6 * local_length.item()
