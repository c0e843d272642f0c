r"""The logarithm map: one entry point, three methods, a report for every pair.

``method="shooting"``
    Newton shooting (:func:`~pullback_manifold.geodesics.shooting_log`) from the
    straight line (or a warm start); pairs it does not solve are shot again from
    the initial velocity of a discrete geodesic. Every answer is an ODE geodesic
    whose end point is checked.
``method="energy"``
    Discrete geodesics (:func:`~pullback_manifold.discrete.energy_log`):
    first derivatives only, so it is the method for decoders whose second
    derivative vanishes (ReLU networks), where the geodesic ODE is degenerate.
``method="auto"`` (default)
    A discrete geodesic, refined per pair until its length is certified to
    ``energy_rtol``, answers every pair (it sees the whole curve, so strongly
    bending geodesics do not mislead it; its initial velocity is extrapolated
    from the two finest polygons). Pairs whose geodesic from that velocity ends
    within ``1e-3`` (relative) of the point are polished by Newton shooting to
    the end-point tolerance (at most 4 iterations); the others keep the
    discrete answer, marked ``from_energy``, converged only if its own error
    estimate says so; shooting is also tried on the pairs the discrete geodesic
    could not certify, which keep the discrete answer where it fails too.
    (Shooting the rest costs far more than it gains: on 30 digits-VAE pairs,
    200 s against 7 s for the discrete geodesics, and it polished 8 of them.) With a warm start, shooting goes first from it, for at
    most 4 Newton iterations; the pairs it leaves go the route above. Pairs along which
    the decoder is piecewise linear (ReLU networks:
    :func:`piecewise_linear_pairs`) go to the energy method directly, and so do
    all pairs of a decoder with an activation whose second derivative jumps (ELU,
    CELU, softsign: :func:`rough_activations`), where shooting crawls, or whose
    first derivative jumps (ReLU followed by smooth layers, leaky ReLU, SELU:
    :func:`kinked_activations`), where the ODE's curves are not geodesics.

Pairs of piecewise-linear or kinked decoders are marked ``nonsmooth`` and never
converged, whatever the method: their answers are approximations.

Large batches are split in chunks (bounded memory), with an optional progress
line on stderr.
"""

from __future__ import annotations

import inspect
import io
import re
import sys
import textwrap
import time
import tokenize
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import traced
from .decoders import MetricDecoder, _FunctionModule
from .discrete import energy_log
from .geodesics import DEFAULT_HALVINGS, LogResult, ODEOptions, _default_log_tol, exp, shooting_log
from .geometry import Embedding, _basis, embedding_jet, energy_embedding, metric_matrix

__all__ = ["METHODS", "flag_nonsmooth", "kinked_activations", "log_map", "piecewise_linear_pairs", "rough_activations"]

METHODS = ("auto", "shooting", "energy")

# Activations that are once but not twice continuously differentiable (ELU with alpha = 1,
# CELU, softsign): the geodesic equation's right-hand side jumps wherever a unit crosses 0,
# adaptive ODE steps pile up there, and shooting crawls, while the energy (first
# derivatives) is smooth enough for Newton. On 8 random pairs of a 2 -> 16 -> 16 -> 10 MLP
# (one thread), auto took 66 s with ELU and 331 s with CELU, polishing 2 and 1 pairs,
# against 0.05 and 0.13 s for the energy method, which certified all 8.
_ROUGH_MODULES = (nn.CELU, nn.Softsign)
_ROUGH_FUNCTIONS = {F.elu, F.elu_, F.celu, F.celu_, torch.celu, torch.celu_, F.softsign}
_ROUGH_METHODS = {"elu", "celu"}
# Activations whose first derivative jumps (the ReLU family, hard and shrink functions,
# SELU and ELU with alpha != 1): the metric jumps wherever a unit switches. The geodesic
# ODE does not see those jumps (autograd differentiates each side), so its solutions cross
# them unrefracted and their speed jumps there: on a 2 -> 16 (ReLU) -> 16 (tanh) -> 10 MLP,
# shooting "converged" on 6 of 6 pairs with |v|_G 0.31, 1.15, 0.65 where its own curves are
# 0.36, 0.93, 0.42 long. The energy of a decoded polygon is still the right problem.
# Max pooling and max/min reductions (maxout) switch between inputs the same way: on
# f = (z, 0.3 sin 2 z1, 2 max(z2, 0)) written with MaxPool1d, auto "converged" 17-21% short.
_KINKED_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.SELU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
)  # fmt: skip
_KINKED_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.hardtanh, F.hardtanh_,
    F.hardsigmoid, F.hardswish, F.hardshrink, F.softshrink, F.threshold, F.threshold_, torch.threshold,
    torch.threshold_, F.selu, F.selu_, torch.selu, torch.selu_, F.prelu, torch.prelu, F.rrelu, F.rrelu_,
    torch.rrelu, torch.rrelu_, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.max_pool1d_with_indices,
    F.max_pool2d_with_indices, F.max_pool3d_with_indices, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.adaptive_max_pool1d_with_indices, F.adaptive_max_pool2d_with_indices,
    F.adaptive_max_pool3d_with_indices, F.fractional_max_pool2d, F.fractional_max_pool3d, torch.max_pool1d,
    torch.max_pool2d, torch.max_pool3d, torch.amax, torch.amin,
}  # fmt: skip
_KINKED_METHODS = {"relu", "relu_", "prelu", "hardshrink", "amax", "amin"}
# torch.max / min and the methods: kinked as reductions (x.max(dim)), not as the elementwise
# max of two tensors (torch.max(a, b)), counted as a guard like clamp.
_REDUCING = {torch.max, torch.min, "max", "min"}


_ELU = {F.elu, F.elu_, "elu"}


def _elu_alpha(node) -> float:
    return node.kwargs.get("alpha", node.args[1] if len(node.args) > 1 else 1.0)


def _rough_module(module: nn.Module) -> bool:
    return isinstance(module, _ROUGH_MODULES) or (type(module) is nn.ELU and module.alpha == 1.0)


def _rough_call(node) -> bool:
    if not (
        (node.op == "call_function" and node.target in _ROUGH_FUNCTIONS)
        or (node.op == "call_method" and node.target in _ROUGH_METHODS)
    ):
        return False
    return _elu_alpha(node) == 1.0 if node.target in _ELU else True


def _kinked_module(module: nn.Module) -> bool:
    return isinstance(module, _KINKED_MODULES) or (type(module) is nn.ELU and module.alpha != 1.0)


def _kinked_call(node) -> bool:
    if node.op in ("call_function", "call_method") and node.target in _ELU:
        return _elu_alpha(node) != 1.0
    if node.op in ("call_function", "call_method") and node.target in _REDUCING:
        other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        return not isinstance(other, torch.fx.Node)
    return (node.op == "call_function" and node.target in _KINKED_FUNCTIONS) or (
        node.op == "call_method" and node.target in _KINKED_METHODS
    )


def _used_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``root`` and the submodules its ``forward`` calls (with theirs): for a method decoder
    (``vae.decode``) not the encoder. All of them where ``forward`` cannot be traced."""
    graph = traced.traced_graph(root, make=True)
    if graph is None:
        return list(root.named_modules())
    used = {"": root}
    for node in graph.nodes:
        if node.op == "call_module":
            for name, child in root.get_submodule(node.target).named_modules(prefix=node.target):
                used.setdefault(name, child)
    return list(used.items())


def _source_calls(module: nn.Module, pattern: re.Pattern) -> list[str]:
    """Activation names ``pattern`` finds in the source of a custom ``forward`` that fx cannot
    trace (``if z.dim() == 1``, ``assert``): read as text rather than not at all."""
    if type(module).__module__.startswith("torch.nn") or traced.traced_graph(module, make=True) is not None:
        return []
    function = getattr(module, "function", None) if isinstance(module, _FunctionModule) else None
    try:
        source = inspect.getsource(type(module).forward if function is None else function)
    except (OSError, TypeError):
        return []
    return [f"{name} (in {_body_name(module)}, its source)" for name in pattern.findall(_code_only(source))]


def _code_only(source: str) -> str:
    """``source`` without comments and string literals: a comment or docstring naming
    ``relu(`` is not a call. The source as it is where it does not tokenize (the line of a
    lambda inside a larger expression)."""
    try:
        tokens = tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline)
        return " ".join(t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.STRING))
    except (tokenize.TokenError, SyntaxError):
        return source


def _with_referenced_modules(module: _FunctionModule) -> nn.Module:
    """For reading kinks only: a plain callable that fx cannot trace because it calls an
    ``nn.Module`` (``lambda z: net(z)``) as a module holding the modules it can reach by
    name (its closure, the globals its code names, a callable object's attributes), so
    that a trace sees which of them it calls; where it still cannot be traced, all of
    them count (as all submodules of a module that cannot be traced)."""
    function = module.function
    targets = [function, getattr(function, "func", None), inspect.getattr_static(type(function), "__call__", None)]
    # (name, object) pairs; a partial's arguments by position
    candidates = [(f"argument_{i}", a) for i, a in enumerate(getattr(function, "args", ()))]
    candidates += list((getattr(function, "keywords", None) or {}).items())
    if not inspect.isfunction(function) and not inspect.ismethod(function):
        candidates += list(getattr(function, "__dict__", {}).items())
    for target in targets:
        target = getattr(target, "__func__", target)
        code = getattr(target, "__code__", None)
        if code is None:
            continue
        cells = zip(code.co_freevars, target.__closure__ or ())
        candidates += [(name, cell.cell_contents) for name, cell in cells if _filled(cell)]
        names = getattr(target, "__globals__", {})
        candidates += [(name, names[name]) for name in code.co_names if name in names]
    holder = _FunctionModule(function)
    seen: set[int] = set()
    for name, child in candidates:
        if isinstance(child, nn.Module) and id(child) not in seen and name.isidentifier() and not hasattr(holder, name):
            seen.add(id(child))
            holder.add_module(name, child)
    return holder if seen else module


def _filled(cell) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # an empty cell (a variable assigned after the function was made)
        return False
    return True


def _body_name(module: nn.Module) -> str:
    """What runs a module's traced calls: ``Class.forward``, or a plain callable's name."""
    if isinstance(module, _FunctionModule):
        return getattr(module.function, "__name__", type(module.function).__name__)
    return f"{type(module).__name__}.forward"


def _activations(embed: Embedding, module_test, call_test, source_pattern: re.Pattern) -> list[str]:
    """Names of the modules of a decoder (those its traced ``forward`` uses) that pass
    ``module_test``, of the calls of their traced ``forward`` that pass ``call_test``, and,
    where a ``forward`` cannot be traced, of the names ``source_pattern`` finds in its source."""
    functions = getattr(embed, "_functions", None)
    if callable(functions):
        # A plain callable as the module that traces its body (it has no submodules).
        roots = [fn.fn if getattr(fn, "traceable", None) is None else fn.traceable for fn in functions()]
    else:
        roots = [embed]  # a module passed as it is
    found: list[str] = []
    for module in roots:
        if not isinstance(module, nn.Module):
            continue
        if isinstance(module, _FunctionModule) and traced.traced_graph(module, make=True) is None:
            module = _with_referenced_modules(module)
        for name, child in _used_modules(module):
            if module_test(child):
                found.append(f"{type(child).__name__} ({name or 'the decoder'})")
                continue
            graph = traced.traced_graph(child, make=True)
            for node in [] if graph is None else graph.nodes:
                if call_test(node):
                    found.append(f"{getattr(node.target, '__name__', node.target)} (in {_body_name(child)})")
            found += _source_calls(child, source_pattern)
    return found


# Activation names in the source of a forward fx cannot trace (a call: the name and a parenthesis).
_KINKED_SOURCE = re.compile(
    r"\b(relu6?_?|leaky_relu_?|hardtanh_?|hardsigmoid|hardswish|hardshrink|softshrink|threshold_?|selu_?|prelu|rrelu_?"
    r"|ReLU6?|LeakyReLU|PReLU|RReLU|Hardtanh|Hardsigmoid|Hardswish|Hardshrink|Softshrink|Threshold|SELU"
    r"|(?:adaptive_|fractional_)?max_pool[123]d(?:_with_indices)?|(?:Adaptive|Fractional)?MaxPool[123]d|amax|amin)\s*\("
)
_ROUGH_SOURCE = re.compile(r"\b(elu_?|celu_?|softsign|ELU|CELU|Softsign)\s*\(")


def rough_activations(embed: Embedding) -> list[str]:
    """The activations of a decoder that are once but not twice continuously differentiable
    (ELU with ``alpha = 1``, CELU, softsign), as modules or as functions its traced
    ``forward`` (or a plain callable's traced body) calls; empty for other decoders.

    Parameters
    ----------
    embed : Decoder

    Returns
    -------
    names : list of str
    """
    return _activations(embed, _rough_module, _rough_call, _ROUGH_SOURCE)


def kinked_activations(embed: Embedding) -> list[str]:
    """The activations of a decoder whose first derivative jumps (ReLU, ReLU6, leaky ReLU,
    PReLU, RReLU, hardtanh, hardsigmoid, hardswish, the shrink functions, threshold, SELU,
    ELU with ``alpha != 1``), and max pooling and max/min reductions (maxout), as modules
    or as functions its traced ``forward`` (or a plain callable's traced body) calls; empty
    for other decoders. Clamps, ``abs`` and the elementwise ``max`` and
    ``min`` of two tensors in a ``forward`` are not counted: they are mostly guards that
    rarely switch (a floor on a standard deviation).

    Where a unit switches, the metric of such a decoder jumps: geodesics refract there,
    which the geodesic ODE does not see.

    Parameters
    ----------
    embed : Decoder

    Returns
    -------
    names : list of str
    """
    return _activations(embed, _kinked_module, _kinked_call, _KINKED_SOURCE)


@torch.no_grad()
def piecewise_linear_pairs(embed: Embedding, point: Tensor, base_point: Tensor) -> Tensor:
    """Pairs whose geodesic ODE is degenerate: a ReLU-like decoder along their chord.

    A pair is flagged when the decoder's second derivatives (along two fixed
    generic directions: zero for almost no nonzero Hessian) are exactly zero at
    both ends of the chord and its midpoint, while its
    Jacobian differs between them: the decoder is piecewise linear
    there, so the ODE's geodesics are straight lines although the metric
    changes (they are not the shortest curves). A linear decoder (same Jacobian
    everywhere) is not flagged: its straight lines are the geodesics.

    Parameters
    ----------
    embed : callable ``(n, d) -> (n, D)``, or a MetricDecoder
    point, base_point : Tensor, shape=[n, d]

    Returns
    -------
    flags : Tensor, shape=[n], bool
    """
    n, d = point.shape
    if isinstance(embed, MetricDecoder) or n == 0:
        return torch.zeros(n, dtype=torch.bool, device=point.device)
    z = torch.cat([base_point, 0.5 * (base_point + point), point])
    # The Hessian, not only along the chord: a bilinear decoder (z0 z1) is linear along an
    # axis-aligned chord, and was flagged piecewise linear there (never converged). Along two
    # fixed generic directions r, s (no coordinate structure: golden-angle phases),
    # d^2 f[r, r] and d^2 f[r, s] vanish for almost no nonzero Hessian, at the cost of 2
    # second derivatives, not d (d + 1) / 2.
    steps = torch.arange(1, d + 1, dtype=point.dtype, device=point.device)
    random = torch.stack([torch.cos(2.399963 * steps), torch.sin(1.618034 * steps + 0.5)])[:, None]  # (2, 1, d)
    directions = torch.cat([_basis(z), random.expand(2, 3 * n, d)])
    pairs = (torch.tensor([d, d], device=point.device), torch.tensor([d, d + 1], device=point.device))
    jet = embedding_jet(embed, z, directions, pair=pairs)
    flat = (jet.second.reshape(2, 3, n, -1) == 0).all(-1).all(0).all(0)
    J = jet.first[:d].permute(1, 2, 0).reshape(3, n, -1)
    varies = ((J - J[:1]).abs() > 1e-6 * J.abs().amax(-1, keepdim=True).clamp_min(1e-300)).any(-1).any(0)
    return flat & varies


def _merge(result: LogResult, rows: Tensor, other: LogResult, take: Tensor) -> None:
    """Overwrite ``result`` at ``rows[take]`` with ``other[take]`` (``other`` is indexed like ``rows``)."""
    target = rows[take]
    result.tangent_vec[target] = other.tangent_vec[take]
    result.converged[target] = other.converged[take]
    result.residual[target] = other.residual[take]
    result.from_energy[target] = other.from_energy[take]
    result.nonsmooth[target] = other.nonsmooth[take]
    result.n_iterations[rows] += other.n_iterations


def flag_nonsmooth(result: LogResult, nonsmooth: Tensor) -> None:
    """Mark the pairs ``nonsmooth`` (``(n,)`` bool) of ``result`` as such: never converged."""
    result.nonsmooth |= nonsmooth
    result.converged &= ~nonsmooth


def _energy_by_smoothness(
    embed, point, base_point, kinked: Tensor, energy_rtol, lengths_only: bool = False, curves=None
) -> LogResult:
    """The energy method, with the piecewise-linear pairs ``kinked`` solved as such; each
    discrete geodesic goes to ``curves`` (a :class:`_Curves` or None)."""
    options = {"rtol": energy_rtol, "lengths_only": lengths_only}
    if not kinked.any() or kinked.all():
        result, curve, _ = energy_log(embed, point, base_point, smooth=not kinked.any(), **options)
        if curves is not None:
            curves.add(torch.arange(len(point), device=point.device), curve, result.n_iterations)
        return result
    parts = []
    for rows in ((~kinked).nonzero().squeeze(-1), kinked.nonzero().squeeze(-1)):
        part, curve, _ = energy_log(embed, point[rows], base_point[rows], smooth=not bool(kinked[rows[0]]), **options)
        if curves is not None:
            curves.add(rows, curve, part.n_iterations)
        parts.append((rows, part))
    return _assembled(point, parts, "energy")


def own_polygons(curve: Tensor, levels: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Each discrete geodesic of :func:`~pullback_manifold.discrete.energy_log` at its own
    resolution: ``(positions, polygons)`` groups of the pairs of ``curve`` ``(n, N + 1, d)``
    with the same number of levels (``levels`` ``(n,)``, its ``n_iterations``). A pair that
    stopped refining early has its polygon filled with midpoints to the finest pair's size;
    those add nothing, and a Richardson step or an end velocity read from them is wrong."""
    finest = int(levels.max()) if len(levels) else 0
    groups = []
    for level in levels.unique().tolist():
        positions = (levels == level).nonzero().squeeze(-1)
        stride = 2 ** (finest - int(level))
        if (curve.shape[1] - 1) % stride:
            stride = 1  # not an energy_log polygon: as it is
        groups.append((positions, curve[positions][:, ::stride]))
    return groups


class _Curves:
    """The discrete geodesics a log solved, by pair: polygons ``(m, N + 1, d)`` for rows of
    the whole batch, each with its number of levels (the last one solved for a pair is the
    one its answer came from)."""

    def __init__(self, offset: Tensor | None = None, parts: list | None = None):
        self.offset = offset  # this chunk's (or subset's) rows in the whole batch
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = [] if parts is None else parts

    def within(self, rows: Tensor) -> _Curves:
        """The same store, for a subset ``rows`` of the current pairs."""
        return _Curves(rows if self.offset is None else self.offset[rows], self.parts)

    def add(self, rows: Tensor, curve: Tensor, levels: Tensor) -> None:
        self.parts.append((rows if self.offset is None else self.offset[rows], curve, levels))

    def of(self, rows: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(positions, polygons)`` groups covering the ``rows`` (of the whole batch) that have
        a discrete geodesic, each at its own resolution (:func:`own_polygons`): ``positions``
        index ``rows``."""
        ends = [int(part.max()) + 1 for part, _, _ in self.parts if len(part)]
        size = max([int(rows.max()) + 1 if len(rows) else 0, *ends])
        source = torch.full((size,), -1, dtype=torch.long, device=rows.device)
        local = torch.zeros_like(source)
        for k, (part_rows, _, _) in enumerate(self.parts):
            source[part_rows], local[part_rows] = k, torch.arange(len(part_rows), device=rows.device)
        groups = []
        for k, (_, curve, levels) in enumerate(self.parts):
            positions = (source[rows] == k).nonzero().squeeze(-1)
            if len(positions):
                index = local[rows[positions]]
                groups += [(positions[sub], polygons) for sub, polygons in own_polygons(curve[index], levels[index])]
        return groups


def _assembled(point: Tensor, parts: list[tuple[Tensor, LogResult]], method: str) -> LogResult:
    """One result for the pairs of ``point`` ``(n, d)`` from results for disjoint nonempty sets of
    ``rows`` that cover them: ``parts``, pairs ``(rows, result)``."""
    n = len(point)
    result = LogResult(
        torch.empty_like(point),
        torch.zeros(n, dtype=torch.bool, device=point.device),
        point.new_empty(n),
        torch.zeros(n, dtype=torch.long, device=point.device),
        parts[0][1].tol,
        method,
        energy_rtol=next((part.energy_rtol for _, part in parts if part.energy_rtol is not None), None),
    )
    for rows, part in parts:
        _merge(result, rows, part, torch.ones_like(part.converged))
    return result


# Adaptive Gauss-Lobatto quadrature of the speed along a 1-D segment: panels per pair at
# first, bisections of a panel at most (a kink of sqrt(G), where a unit switches or G
# vanishes, is bisected towards; smooth panels are accepted at once), and panels in work per
# pair at most (beyond, the rest is accepted with its error: a metric NaN or infinite on a
# stretch of the segment once bisected every panel there, 2^40 of them).
_LINE_PANELS = 16
_LINE_MAX_DEPTH = 40
_LINE_MAX_ACTIVE = 256
# 5-point Lobatto on [-1, 1] (exact to degree 7): its end nodes see a kink in a panel's end
# sliver, which Gauss-Legendre's interior nodes did not (a kink 0.07% of the chord from an
# end point: 3e-3 off, with an error estimate of 2e-16).
_LINE_NODES = (-1.0, -((3 / 7) ** 0.5), 0.0, (3 / 7) ** 0.5, 1.0)
_LINE_WEIGHTS = (1 / 10, 49 / 90, 32 / 45, 49 / 90, 1 / 10)


@torch.no_grad()
def _log_on_a_line(
    embed: Embedding, point: Tensor, base_point: Tensor, regularization: float, tol: float, method: str
) -> LogResult:
    r"""The logarithm in latent dimension 1, in closed form up to a quadrature.

    A curve joining two points of a line covers the segment between them, so the
    segment is the shortest curve and the distance is :math:`L = \int_{z_0}^{z_1}
    \sqrt{G(z)}\,dz`; the log is ``sign(z_1 - z_0) L / sqrt(G(z_0))``. No ODE and no
    discretized curve: every method answers this way. Adaptive 5-point Gauss-Lobatto
    panels, each compared with its halves and quarters and bisected until they agree; ``residual``
    is the length's error estimate over the mean speed ``L / |z_1 - z_0|`` (a latent
    distance, as shooting's end-point residual), judged against ``tol (1 + |z_1|)``.
    """
    n, dtype, device = len(point), point.dtype, point.device
    nodes = 0.5 * (torch.tensor(_LINE_NODES, dtype=dtype, device=device) + 1)  # on [0, 1]
    weights = 0.5 * torch.tensor(_LINE_WEIGHTS, dtype=dtype, device=device)
    chord = (point - base_point)[:, 0]

    def integrals(owner: Tensor, left: Tensor, width: Tensor) -> Tensor:
        """Gauss-Lobatto integrals of the speed over panels ``[left, left + width]`` of the
        unit interval of their pairs ``owner``: ``(m,)``."""
        t = left[:, None] + width[:, None] * nodes  # (m, 5)
        z = base_point[owner, None, 0] + t * chord[owner, None]
        G = metric_matrix(embed, z.reshape(-1, 1), regularization).reshape(len(owner), -1)
        return chord[owner].abs() * width * (G.clamp_min(0).sqrt() * weights).sum(-1)

    owner = torch.arange(n, device=device).repeat_interleave(_LINE_PANELS)
    width = torch.full((n * _LINE_PANELS,), 1 / _LINE_PANELS, dtype=dtype, device=device)
    left = torch.arange(_LINE_PANELS, dtype=dtype, device=device).repeat(n) * width
    whole = integrals(owner, left, width)
    # Per-panel budget: a share, by width, of a tenth of the tolerance in length units
    # (at the chord's mean speed, from a first estimate).
    first = torch.zeros(n, dtype=dtype, device=device).index_add_(0, owner, whole)
    budget = 0.1 * tol * (1 + point.abs().amax(-1)) * first / chord.abs().clamp_min(torch.finfo(dtype).tiny)
    total = torch.zeros(n, dtype=dtype, device=device)
    error = torch.zeros(n, dtype=dtype, device=device)
    depth = 0
    while len(owner):
        m = len(owner)
        # The panel against its halves and its quarters: a kink can make one pair of
        # estimates agree by chance (measured: sin(3 z) over [-1, 1] 1.3e-7 short with an
        # estimate of 2e-16), hardly both.
        quarters = integrals(
            owner.repeat(4), torch.cat([left + k * width / 4 for k in range(4)]), width.repeat(4) / 4
        ).reshape(4, m)
        halves = integrals(owner.repeat(2), torch.cat([left, left + width / 2]), width.repeat(2) / 2).reshape(2, m)
        finer, half_sum = quarters.sum(0), halves.sum(0)
        gap = torch.maximum((half_sum - whole).abs(), (finer - half_sum).abs())
        # Non-finite (G overflows or is NaN there): no bisection makes it finite.
        # The tolerance, or rounding: in float32, where the speed peaks far above its mean
        # (tanh(3 z) far out), the budget lay below it and every panel went 40 levels deep.
        floor = 64 * torch.finfo(dtype).eps * quarters.abs().sum(0)
        accepted = gap <= torch.maximum(budget[owner] * width, floor)
        done = accepted | ~torch.isfinite(gap) | (depth >= _LINE_MAX_DEPTH)
        active = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, owner, (~done).long())
        done |= (active > _LINE_MAX_ACTIVE // 2)[owner]
        total.index_add_(0, owner[done], finer[done])
        error.index_add_(0, owner[done], torch.where(accepted[done], (finer - half_sum)[done].abs(), gap[done]))
        keep = ~done
        owner = owner[keep].repeat(2)
        left = torch.cat([left[keep], left[keep] + width[keep] / 2])
        width = width[keep].repeat(2) / 2
        whole = torch.cat([halves[0][keep], halves[1][keep]])
        depth += 1
    speed = metric_matrix(embed, base_point, regularization)[:, 0, 0].clamp_min(0).sqrt()
    # G = 0 at the base point (f = z^3 at 0): no tangent vector there has the length L; 0
    # then, as the energy method answers, and not converged.
    represented = speed > 0
    tangent_vec = torch.where(represented, torch.sign(chord) * total / speed.clamp_min(1e-300), 0)[:, None]
    same = chord == 0
    mean_speed = total / chord.abs().clamp_min(torch.finfo(dtype).tiny)
    residual = torch.where(same, torch.zeros_like(error), error / mean_speed)
    converged = (represented | same) & torch.isfinite(tangent_vec).all(-1) & (residual <= tol * (1 + point.abs().amax(-1)))
    levels = torch.full((n,), depth, dtype=torch.long, device=device)
    return LogResult(tangent_vec, converged, residual, levels, tol, method)


def _line_tol(shooting: dict, point: Tensor) -> float:
    return _default_log_tol(point.dtype) if shooting["tol"] is None else shooting["tol"]


def _log_chunk(
    embed: Embedding,
    energy_embed: Embedding,
    point: Tensor,
    base_point: Tensor,
    initial_tangent_vec: Tensor | None,
    method: str,
    shooting: dict,
    energy_rtol: float | None,
    polish: bool = True,
    lengths_only: bool = False,
    kinked_decoder: bool = False,
    curves: _Curves | None = None,
) -> LogResult:
    kinked = piecewise_linear_pairs(embed, point, base_point)
    # Every pair of a decoder with kinked activations is nonsmooth: its geodesic may cross a
    # switch of a unit anywhere, and neither method's certificate sees that.
    nonsmooth = (kinked | kinked_decoder) & (point != base_point).any(-1)  # equal points: 0, exact
    if point.shape[-1] == 1:
        result = _log_on_a_line(embed, point, base_point, shooting["regularization"], _line_tol(shooting, point), method)
        # A jump of the speed can hide between quadrature nodes (measured: up to 2e-5 off), and
        # exp and geodesic paths (the ODE) cross kinks unrefracted.
        flag_nonsmooth(result, nonsmooth)
        return result
    if method == "energy":
        result = _energy_by_smoothness(energy_embed, point, base_point, kinked, energy_rtol, lengths_only, curves)
        flag_nonsmooth(result, nonsmooth)
        result.method = method
        return result
    if method == "auto" and kinked.any():
        result = _energy_by_smoothness(energy_embed, point, base_point, kinked, energy_rtol, lengths_only, curves)
        smooth = (~kinked).nonzero().squeeze(-1)
        if len(smooth):
            init = None if initial_tangent_vec is None else initial_tangent_vec[smooth]
            rest = _log_chunk(
                embed,
                energy_embed,
                point[smooth],
                base_point[smooth],
                init,
                "auto",
                shooting,
                energy_rtol,
                polish,
                lengths_only,
                kinked_decoder,
                None if curves is None else curves.within(smooth),
            )
            result.n_iterations[smooth] = 0
            _merge(result, smooth, rest, torch.ones_like(rest.converged))
        result.method = method
        return result

    # Pairs whose warm start is NaN have none (a caller warm-starting only some pairs).
    warm = None if initial_tangent_vec is None else torch.isfinite(initial_tangent_vec).all(-1)
    if method == "shooting" or (warm is not None and warm.any()):
        if warm is None or warm.all():
            starts = [(torch.arange(len(point), device=point.device), initial_tangent_vec)]
        elif method == "shooting":  # the pairs without a warm start from shooting's own start
            rows = warm.nonzero().squeeze(-1), (~warm).nonzero().squeeze(-1)
            starts = [(rows[0], initial_tangent_vec[rows[0]]), (rows[1], None)]
        else:  # auto: the discrete route below solves the others, with those the warm starts leave
            rows = warm.nonzero().squeeze(-1)
            starts = [(rows, initial_tangent_vec[rows])]
        options = shooting
        if method == "auto":
            # A warm start is a hint: a few Newton steps, then the discrete route below.
            options = dict(
                shooting, max_iter=min(shooting["max_iter"], _WARM_ITERATIONS), max_halvings=_POLISH_HALVINGS
            )
        result = LogResult(
            point - base_point,
            torch.zeros(len(point), dtype=torch.bool, device=point.device),
            torch.full((len(point),), float("nan"), dtype=point.dtype, device=point.device),
            torch.zeros(len(point), dtype=torch.long, device=point.device),
            _default_log_tol(point.dtype) if shooting["tol"] is None else shooting["tol"],
            method,
        )
        for rows, start in starts:
            if len(rows):
                shot = shooting_log(embed, point[rows], base_point[rows], start, **options)
                _merge(result, rows, shot, torch.ones_like(shot.converged))
        # A degenerate ODE "converges" to the straight line, which is not the geodesic, and
        # one blind to the metric's jumps to a curve that is not one either: never claimed,
        # and not retried (only method="energy" or "auto" solve those).
        flag_nonsmooth(result, nonsmooth)
        todo = (~result.converged & ~nonsmooth).nonzero().squeeze(-1)
        if len(todo) == 0:
            return result
    else:
        result = None
        todo = torch.arange(len(point), device=point.device)

    # A discrete geodesic sees the whole curve, so strongly bending geodesics do not
    # mislead it; Newton shooting converges from its initial velocity in a few steps.
    if method == "shooting":
        guess, _, _ = energy_log(energy_embed, point[todo], base_point[todo], n_segments=8, n_refinements=1)
        polish_rows = torch.arange(len(todo), device=point.device)
        polish_options = shooting
    else:
        # auto: the discrete geodesic refined until its length is certified (the
        # answer where shooting cannot follow: geodesics along a sigma wall are
        # exponentially sensitive to their initial velocity), and few Newton steps
        # for the pairs whose geodesic from that velocity already ends near the
        # point. Elsewhere Newton spends many long ODE solves to gain little: on the
        # digits VAE, shooting all 30 pairs of a batch took 200 s and polished 8; their
        # discrete geodesics took 7 s.
        guess, curve, _ = energy_log(
            energy_embed, point[todo], base_point[todo], rtol=energy_rtol, lengths_only=lengths_only
        )
        if curves is not None:
            curves.add(todo, curve, guess.n_iterations)
        # A pair the discrete geodesic could not certify gets its chance with shooting anyway;
        # a certified one, if polishing it pays (distances only: it never does).
        to_polish = ~guess.converged
        certified = guess.converged.nonzero().squeeze(-1)
        if polish and len(certified):
            rows = todo[certified]
            velocity = guess.tangent_vec[certified]
            gate = _gate_options(shooting["options"], point.dtype)
            end, ok = exp(embed, velocity, base_point[rows], gate, shooting["regularization"])
            miss = torch.linalg.vector_norm(end - point[rows], dim=-1) / (1 + point[rows].abs().amax(-1))
            to_polish[certified] = ok & (miss <= _POLISH_GATE)
        polish_rows = to_polish.nonzero().squeeze(-1)
        # Inside Newton's range (certified, through the gate): fewer step halvings. One batch
        # for both kinds of pairs: a solve costs about the same for one pair as for ten (the
        # decoder calls are overhead-bound), and two batches doubled the sequential solves.
        halvings = torch.where(guess.converged[polish_rows], _POLISH_HALVINGS, DEFAULT_HALVINGS)
        polish_options = dict(
            shooting,
            max_iter=min(shooting["max_iter"], _POLISH_ITERATIONS),
            reuse_jacobian=True,
            max_halvings=halvings,
        )
    if result is None:
        result = LogResult(
            guess.tangent_vec.clone(),
            torch.zeros_like(guess.converged),
            torch.full_like(guess.residual, float("nan")),
            torch.zeros_like(guess.n_iterations),
            _default_log_tol(point.dtype) if shooting["tol"] is None else shooting["tol"],
            method,
        )
    if len(polish_rows):
        rows = todo[polish_rows]
        polished = shooting_log(embed, point[rows], base_point[rows], guess.tangent_vec[polish_rows], **polish_options)
        better = polished.converged | ~(polished.residual >= result.residual[rows])  # NaN-safe: keep the smaller
        _merge(result, rows, polished, better)
    if method == "shooting" or result.all_converged:
        return result
    # The discrete geodesic answers wherever shooting did not converge: certified or not, it
    # is a curve joining the points, and its length an upper bound on their distance, where
    # an unconverged shooting iterate's geodesic misses the point (on a ReLU + tanh MLP, the
    # iterates' |v|_G were 0.31, 1.15 and 0.65 where the discrete geodesics were 0.36, 0.92
    # and 0.41 long).
    fallback = ~result.converged[todo] & torch.isfinite(guess.tangent_vec).all(-1)
    _merge(result, todo, guess, fallback)
    result.energy_rtol = guess.energy_rtol
    return result


# Newton steps of auto's shooting from a certified discrete geodesic: from there it
# converges in 1-4 steps, or not at all (then the discrete geodesic is the answer).
_POLISH_ITERATIONS = 4
# Newton steps of auto's shooting from a caller's warm start (a Fréchet-mean iteration's
# previous logarithms) before the pair goes the discrete route (energy, gate, polish), with
# the polish's halvings. A pair Newton does not solve in a few steps from there is stuck at
# the ODE's noise floor or far from its solution, and the discrete route is cheaper for it.
# Measured on the main example's Frechet means (80 pairs, 2 iterations): with the space's
# max_iter (15) and 4 halvings, 148 ODE solves and 92.9 s (single pairs grinding through
# rejected steps near the noise floor); with 4 steps, 63 solves and 48.6 s; with 6, 75 and
# 60.2 s; the same means.
_WARM_ITERATIONS = 4
# Step halvings per polishing iteration of a pair that passed the gate (shooting's default,
# 4, for the pairs polished because the discrete geodesic was not certified). Each is a full
# ODE solve, and from inside the gate a step that fails twice rarely succeeds halved
# further. Measured on digits-VAE pairs: 80 throughput pairs (29 polished), polish 30.7 s
# with 4 halvings, 19.7 s with 1, 16.7 s with none, the same tangent vectors bit for bit;
# 80 benchmark pairs (41 polished), 42.4 s with 4, 34.1 s with 2, 27.5 s with none, the same
# bit for bit; the main example's 69 pairs, their whole solve 30.1 s with 4 and 20.3 s with 2, the same
# answers, but with 1 halving one pair fewer was polished, with none three (they kept the
# certified discrete answer).
_POLISH_HALVINGS = 2
# auto polishes a pair only if the geodesic from the discrete geodesic's velocity ends
# within this relative distance of the point (Newton's quadratic range).
_POLISH_GATE = 1e-3
# ODE rtol of that test at most (atol in proportion). The test only decides which pairs
# shooting tries; their residuals are measured again at full accuracy. Measured on 99
# certified digits-VAE pairs: 3.5 s against 19.8 s at the default 1e-7, the misses
# 1e-4 apart (relative, median), one pair of 99 on the other side of the gate.
_GATE_RTOL = 1e-5


def _gate_options(options: ODEOptions, dtype: torch.dtype) -> ODEOptions:
    """``options`` with the tolerances of the polishing test (:data:`_GATE_RTOL`), where
    they are tighter."""
    rtol, atol = options.tolerances(dtype)
    if rtol >= _GATE_RTOL:
        return options
    return replace(options, rtol=_GATE_RTOL, atol=atol * _GATE_RTOL / rtol)


def log_map(
    embed: Embedding,
    point: Tensor,
    base_point: Tensor,
    initial_tangent_vec: Tensor | None = None,
    method: str = "auto",
    options: ODEOptions = ODEOptions(),
    regularization: float = 0.0,
    tol: float | None = None,
    max_iter: int = 50,
    energy_rtol: float | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    polish: bool = True,
    lengths_only: bool = False,
    curves: _Curves | None = None,
) -> LogResult:
    """Logarithm map of a batch of pairs, by the chosen method.

    Parameters
    ----------
    embed : callable ``(n, d) -> (n, D)``, or a MetricDecoder
    point, base_point : Tensor, shape=[n, d]
    initial_tangent_vec : Tensor, shape=[n, d], optional
        Warm start for shooting (``max_iter`` Newton iterations with
        ``method="shooting"``; at most 4 with ``"auto"``, which solves the pairs
        left by the discrete route). A row of NaN: no warm start for that pair
        (shooting starts from the straight line; ``auto`` solves it with the
        pairs the warm starts leave).
    method : {"auto", "shooting", "energy"}
    options : ODEOptions
    regularization : float
    tol : float, optional
        End-point tolerance of shooting (see :func:`shooting_log`).
    max_iter : int
        Newton iterations per pair.
    energy_rtol : float, optional
        Relative length-error tolerance of the energy method (see
        :func:`~pullback_manifold.discrete.energy_log`).
    chunk_size : int, optional
        Pairs per chunk; all at once if None.
    progress : bool
        Print a progress line on stderr after each chunk.
    polish : bool
        ``method="auto"`` only: shoot the pairs whose geodesic from the discrete
        initial velocity ends near the point (end-point-accurate tangent
        vectors). False when only lengths are needed (distances): the certified
        discrete lengths are the answer, and only the pairs they could not
        certify are shot.
    lengths_only : bool
        Only the lengths ``|v|_G`` of the tangent vectors are needed
        (distances): no polish (as ``polish=False``), and the energy method
        refines each discrete geodesic until its length is certified, at
        coarser levels; the directions of the tangent vectors are then less
        accurate (see :func:`~pullback_manifold.discrete.energy_log`).
    curves : _Curves, optional
        Collects the discrete geodesics solved (internal: the library's
        geodesics and transports of energy answers follow them).

    Returns
    -------
    result : LogResult
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    shooting = dict(options=options, regularization=regularization, tol=tol, max_iter=max_iter)
    polish = polish and not lengths_only
    n = len(point)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.bool, device=point.device)
        no_iterations = torch.zeros(0, dtype=torch.long, device=point.device)
        return LogResult(point.clone(), empty, point.new_zeros(0), no_iterations, 0.0, method)
    size = n if chunk_size is None else chunk_size
    energy_embed = energy_embedding(embed, regularization)  # the energy method sees J^T J + eps I too
    # auto on a decoder with rough or kinked activations: the energy method's answers (see
    # _ROUGH_FUNCTIONS and _KINKED_FUNCTIONS).
    kinked_decoder = bool(kinked_activations(embed))
    chunk_method = "energy" if method == "auto" and (kinked_decoder or rough_activations(embed)) else method
    parts = []
    start = time.perf_counter()
    for lo in range(0, max(n, 1), max(size, 1)):
        hi = min(lo + size, n)
        init = None if initial_tangent_vec is None else initial_tangent_vec[lo:hi]
        parts.append(
            _log_chunk(
                embed,
                energy_embed,
                point[lo:hi],
                base_point[lo:hi],
                init,
                chunk_method,
                shooting,
                energy_rtol,
                polish,
                lengths_only,
                kinked_decoder,
                None if curves is None else curves.within(torch.arange(lo, hi, device=point.device)),
            )
        )
        parts[-1].method = method
        if progress:
            done = sum(int(p.converged.numel()) for p in parts)
            failed = sum(p.n_failed for p in parts)
            print(
                f"\rlog: {done}/{n} pairs, {failed} not converged, {time.perf_counter() - start:.1f} s",
                end="" if hi < n else "\n",
                file=sys.stderr,
                flush=True,
            )
    if len(parts) == 1:
        return parts[0]
    return LogResult(
        tangent_vec=torch.cat([p.tangent_vec for p in parts]),
        converged=torch.cat([p.converged for p in parts]),
        residual=torch.cat([p.residual for p in parts]),
        n_iterations=torch.cat([p.n_iterations for p in parts]),
        tol=parts[0].tol,
        method=method,
        from_energy=torch.cat([p.from_energy for p in parts]),
        nonsmooth=torch.cat([p.nonsmooth for p in parts]),
        energy_rtol=next((p.energy_rtol for p in parts if p.energy_rtol is not None), None),
    )
