r"""Taylor-mode jets through a custom module's own ``forward``, traced once by ``torch.fx``.

A decoder written as a class -- ``forward`` calling ``self.net(z)``, a few layers
and activations, reshapes, concatenations, residual sums -- has no closed-form
rule of its own. Rather than differentiating all of it by ``torch.func``'s
nested forward mode (many times slower: see :mod:`~pullback_manifold.jets`),
its ``forward`` is traced symbolically once, and the jet is pushed through the
recorded operations: submodules by their own rules (:func:`~pullback_manifold.jets.module_jet`),
elementwise functions and arithmetic by the chain and product rules, and
operations linear in the jet (reshapes, indexing, sums, ``cat``) applied to the
value and each derivative stream alike. An operation of one jet without a rule
here is differentiated alone by ``torch.func``. A ``forward`` returning a tuple gives
a tuple of jets: ``GaussianDecoder(vae.decode)`` with ``decode`` returning
``(mean, std)`` is traced too.

The module falls back to ``torch.func`` as a whole (the same numbers, slower)
when its ``forward`` cannot be traced (control flow on tensor values), takes more
than one input, or runs an in-place operation (``h.add_(x)``, ``torch.sigmoid_(h)``)
or an operation of several jets without a rule here. The trace is kept per module
and made again when a hook is added or removed, a parameter or buffer is replaced (a
weight tied to another layer's), or an attribute of the module or of a submodule
other than a tensor or a submodule changes (numbers, flags, tuples, containers,
functions: ``forward`` may read them); this is compared at every decoder pass. What the
fingerprint cannot see is checked by values: the traced values are compared with the
module's own output, on the first four points, at the first pass of every public call
(about 0.4 ms: 1.7 against 1.3 ms for a 256-point metric of a small class decoder,
``benchmarks/custom_module_cost.py``) and with each set of
parameters and buffers (each cast, each in-place update; a write through ``.data``
changes no version). A trace whose values differ is made again where its constants are
out of date (tracing reads a global, or an attribute of an object that the fingerprint
compares by identity such as ``self.cfg.scale``, once); where it may alias, or after two
such traces in a row, the module is differentiated by ``torch.func``. Tracing turns
``h += x`` into ``h = h + x``, which computes something else where another name still
holds the old ``h`` (anything computed from it before the sum, used after it): such a
trace may alias.

A trace that ends in a widening ``nn.Linear`` (reshaped at most; or an
``nn.Sequential`` ending in one) gives the input ``h`` of that layer
(:func:`output_layer`, :func:`head`): the metric and the energy method then work in
the layer's input space, as for a Sequential (:meth:`~pullback_manifold.Decoder.compact`).
"""

from __future__ import annotations

import operator
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call, vmap
from torch.nn.modules import module as module_globals

from . import jets
from .jets import Jet

__all__ = ["head", "new_epoch", "output_layer", "traced_graph", "traced_jet"]


class _Unsupported(Exception):
    """An operation of the traced graph that this interpreter has no rule for."""


class _Tracer(fx.Tracer):
    """Traces into custom submodules; stops at those :func:`~pullback_manifold.jets.module_jet`
    has a rule for, and at torch's own modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return jets.has_rule(m) or super().is_leaf_module(m, module_qualified_name)


_SIMPLE = (bool, int, float, complex, str, bytes, type(None))
# nn.Module's own bookkeeping (parameters, buffers, submodules, hooks), not read by forward.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}


def _frozen(value, depth: int = 0):
    """A comparable snapshot of an attribute: containers by content, other objects by identity."""
    if isinstance(value, _SIMPLE):
        return value
    if depth < 4 and isinstance(value, (tuple, list)):
        return (type(value), tuple(_frozen(v, depth + 1) for v in value))
    if depth < 4 and isinstance(value, dict):
        return (dict, tuple((repr(k), _frozen(v, depth + 1)) for k, v in value.items()))
    return (type(value), id(value))


def _fingerprint(module: nn.Module) -> tuple:
    """What a trace depends on besides the code: every submodule's type, whether it has
    hooks (then it is not traced through), which tensors are its parameters and buffers
    (a weight tied to another layer's), and its other attributes than tensors and
    submodules. Taken at every decoder pass (about 4 us per submodule)."""
    out = [bool(module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)]
    stack = [module]
    while stack:
        m = stack.pop()
        attributes = m.__dict__
        own = sorted(attributes.keys() - _MODULE_INTERNALS)  # a few names: the set difference is C
        out.append(
            (
                type(m),
                bool(m._forward_hooks or m._forward_pre_hooks),
                tuple(map(id, attributes["_parameters"].values())),
                tuple(map(id, attributes["_buffers"].values())),
                tuple((k, _frozen(attributes[k])) for k in own if not isinstance(attributes[k], (Tensor, nn.Module))),
            )
        )
        stack.extend(child for child in attributes["_modules"].values() if child is not None)
    return tuple(out)


# Advanced at every public call (:meth:`~pullback_manifold.decoders._TorchFunction.prepare`,
# :func:`~pullback_manifold.jets.propagate` of a module): a write through ``.data`` changes
# neither a tensor's identity nor its version.
_EPOCH = [0]


def new_epoch() -> None:
    """A new public call: the values of every trace are checked again at its first pass (a
    write through ``.data``, a global or an object attribute that ``forward`` reads may have
    changed; see :func:`_same_values`)."""
    _EPOCH[0] += 1


def _state_key(state: dict[str, Tensor], entry: _Entry) -> tuple:
    """The epoch (public call), the tensors of ``state`` and their versions (in-place updates):
    a trace's values are checked once per key."""
    return (_EPOCH[0], *((name, id(t), t._version) for name, t in state.items()))


# What ``h += x`` (and ``-=``, ``*=`` ...) becomes in a trace.
_AUGMENTED = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.floordiv,
    operator.pow,
    operator.matmul,
    operator.mod,
    operator.and_,
    operator.or_,
    operator.xor,
    operator.lshift,
    operator.rshift,
}


def _later_use(graph: fx.Graph, order: dict, old: fx.Node, after: fx.Node) -> bool:
    """Whether ``old``, or anything computed from it before ``after``, is used after ``after``.
    Any such result counts, not only views (whose list would never be complete: ``swapaxes``,
    ``unfold``, ...): a result that copies only costs a needless value check."""
    pending, seen = [old], set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user is after:
                continue
            if order[user] > order[after]:
                return True
            pending.append(user)
    return False


def _may_alias(module: nn.Module, graph: fx.Graph) -> bool | None:
    """Whether the trace may compute something else than its module: ``h += x`` is traced as
    ``h = h + x``, and a later use of the old ``h`` (under another name, or through a view
    taken before) would see the increment in the module, not in the trace. A trace without
    such a later use computes what the module does; one with it (also plain ``y = h + x``
    followed by a use of ``h`` or of something computed from it before) has its values
    checked at every public call. None: a
    submodule that may update its input in place (``nn.ReLU(inplace=True)``, or a
    Sequential holding one) has its input used after it: the trace is not used."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    risk = False
    for node in graph.nodes:
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if node.op == "call_module" and any(
            getattr(m, "inplace", False) is True for m in module.get_submodule(node.target).modules()
        ):
            if _later_use(graph, order, node.args[0], node):
                return None
        elif node.op == "call_function" and node.target in _AUGMENTED:
            risk = risk or _later_use(graph, order, node.args[0], node)
    return risk


class _Entry:
    """A module's trace: ``graph`` (None where it cannot be traced or interpreted), the
    ``fingerprint`` it was made for, the states its values were checked with (the last few:
    a solve alternates float32 and float64 copies of the parameters)."""

    def __init__(self, module: nn.Module, fingerprint: tuple, graph: fx.GraphModule | None, traces: int):
        self.fingerprint, self.graph, self.traces = fingerprint, graph, traces
        self.uses = 0
        self.hold = -1  # the module-lock hold it was last checked in
        self.checked: list[tuple] = []
        self.errors = 0
        self.output_layer: _Split | None | bool = False  # False: not looked for yet
        self.may_alias = False if graph is None else _may_alias(module, graph.graph)
        if self.may_alias is None:
            self.graph = None
        # Values found to differ from the module's where the trace cannot alias: constants that
        # tracing read (a global, an attribute of an object the fingerprint compares by identity)
        # have changed since. Traced again at the next pass, up to _MAX_STALE_TRACES in a row.
        self.stale = False
        self.stale_traces = 0


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()
# A module whose attributes change at every call (a call counter) would be traced at every
# call: after this many traces in a row, each used at most once, it is left to torch.func.
_MAX_TRACES = 8
# States (dtype and device copies, versions) whose values are remembered as checked.
_CHECKED_STATES = 4
# Unexpected errors in interpreting a trace before the module is left to torch.func.
_MAX_ERRORS = 3
# Points on which a trace's values are compared with its module's (once per public call).
_CHECK_ROWS = 4
# Traces in a row whose values differed from the module's at their first check (each made
# after the previous one's check failed) before the module is left to torch.func.
_MAX_STALE_TRACES = 2


def _entry(module: nn.Module) -> _Entry:
    """The module's trace, checked against its attributes once per hold of the module lock
    (a metric pass finds the output layer, then runs the trace: one check)."""
    cached = _GRAPHS.get(module)
    hold = jets.lock_hold()
    if cached is not None and cached.hold == hold:
        cached.uses += 1
        return cached
    fingerprint = _fingerprint(module)
    if cached is not None and cached.fingerprint == fingerprint and not cached.stale:
        cached.uses += 1
        cached.hold = hold
        return cached
    if cached is not None and (cached.traces >= _MAX_TRACES or cached.stale_traces >= _MAX_STALE_TRACES):
        cached.fingerprint, cached.graph, cached.stale = fingerprint, None, False  # left to torch.func for good
        return cached
    # Attributes changed: a new trace (a churning one if the last was hardly used).
    traces = 1 if cached is None or cached.uses > 1 else cached.traces + 1
    graph = None
    # A forward assigned on the instance is not what fx traces (it traces the class's).
    if "forward" not in vars(module):
        try:
            traced = _Tracer().trace(module)
            inputs = [node for node in traced.nodes if node.op == "placeholder"]
            if len(inputs) == 1:
                # The graph module holds the tensors that tracing made (constants in forward).
                graph = fx.GraphModule(module, traced)
        except Exception:  # noqa: BLE001 -- any failure to trace means the torch.func path
            graph = None
    stale_traces = cached.stale_traces + 1 if cached is not None and cached.stale else 0
    entry = _GRAPHS[module] = _Entry(module, fingerprint, graph, traces)
    entry.hold, entry.stale_traces = hold, stale_traces
    return entry


def traced_graph(module: nn.Module, make: bool = False) -> fx.Graph | None:
    """The graph of the module's current trace, if it has been traced and is interpreted;
    with ``make``, else a trace of its ``forward`` made now (not kept), for a module of a
    class outside ``torch.nn`` whose ``forward`` can be traced."""
    entry = _GRAPHS.get(module)
    if entry is not None and entry.graph is not None:
        return entry.graph.graph
    if not make or type(module).__module__.startswith("torch.nn") or "forward" in vars(module):
        return None
    try:
        return _Tracer().trace(module)
    except Exception:  # noqa: BLE001 -- a forward fx cannot trace: nothing to read
        return None


def _same_values(module: nn.Module, state: dict[str, Tensor], z: Tensor, values: tuple[Tensor, ...] | Tensor) -> bool:
    """The traced value (or values, for a module returning a tuple) equals the module's own
    output. Tracing turns ``h += 1`` into ``h = h + 1``: where another name still refers to
    the old ``h``, the graph computes something else than the module (fx does not follow
    in-place aliasing). Compared on the first :data:`_CHECK_ROWS` points only: the decoder
    maps rows independently (checked when a space first sees it), and a stale constant or an
    aliased sum changes every row."""
    expected = functional_call(module, state, (z[:_CHECK_ROWS],))
    if isinstance(values, Tensor):
        values, expected = (values,), (expected,)
    values = tuple(v[:_CHECK_ROWS] if isinstance(v, Tensor) and v.dim() else v for v in values)
    if not isinstance(expected, (tuple, list)) or len(expected) != len(values):
        return False
    for want, got in zip(expected, values):
        if not isinstance(want, Tensor) or want.shape != got.shape:
            return False
        scale = want.abs().max() if want.numel() else 0
        if not bool(((want - got).abs() <= 1e3 * torch.finfo(want.dtype).eps * (1 + scale)).all()):
            return False
    return True


def traced_jet(module: nn.Module, state: dict[str, Tensor], jet: Jet) -> Jet | tuple[Jet, ...] | None:
    """The jet of ``module`` evaluated with ``state`` (its parameters and buffers by
    name) at ``jet``, through its traced ``forward`` (a tuple of jets for a module that
    returns a tuple); None where it cannot be traced or interpreted (then ``torch.func``
    differentiates it)."""
    with jets.module_lock():  # the cache, and fx patches torch.nn.Module.__call__ while it traces
        return _interpret(module, _entry(module), state, jet)


@dataclass(frozen=True)
class _Split:
    """Where a traced ``forward`` ends in a widening ``nn.Linear`` (reshaped at most)."""

    name: str  # the layer's name in the module
    stop: fx.Node  # the node calling it, or calling the Sequential that ends in it
    inner: jets.OutputLayer | None  # that Sequential's own output layer


def output_layer(module: nn.Module) -> str | None:
    """The name of the ``nn.Linear`` whose output, reshaped at most, is the output of the
    module's traced ``forward`` (directly, or as the last layer of an ``nn.Sequential`` that
    ``forward`` calls last), when it widens (more outputs than inputs), has no hooks, and
    its weight and bias are its own (not tied to another layer's); else None."""
    with jets.module_lock():
        split = _split(module, _entry(module))
        return None if split is None else split.name


def _split(module: nn.Module, entry: _Entry) -> _Split | None:
    if entry.graph is None:
        return None
    if entry.output_layer is False:
        entry.output_layer = _find_output_layer(module, entry.graph)
    return entry.output_layer


_RESHAPES = {"view", "reshape", "flatten", "unflatten", "contiguous"}


def _find_output_layer(module: nn.Module, graph: fx.GraphModule) -> _Split | None:
    output = next(node for node in graph.graph.nodes if node.op == "output")
    node = output.args[0]
    split = None
    while isinstance(node, fx.Node) and len(node.users) == 1 and node.args and not node.kwargs:
        if node.op == "call_module":
            child = module.get_submodule(node.target)
            if jets.has_hooks(child):
                return None
            if type(child) is nn.Linear:
                widens = child.out_features > child.in_features
                split = _Split(node.target, node, None) if widens and len(node.args) == 1 else None
                break
            if type(child) is nn.Sequential:
                inner = jets.wide_output_layer(child)
                split = (
                    None if inner is None or len(node.args) != 1 else _Split(f"{node.target}.{inner.name}", node, inner)
                )
                break
            if type(child) not in jets._ISOMETRIC_TAIL:
                return None
        elif not (
            (node.op == "call_method" and node.target in _RESHAPES)
            or (node.op == "call_function" and node.target in (torch.flatten, torch.reshape))
        ):
            return None
        node = node.args[0]
    if split is None:
        return None
    # Its weight (and bias) by these names: a tied weight is listed under another layer's.
    names = dict(module.named_parameters())
    names.update(module.named_buffers())
    layer = module.get_submodule(split.name)
    if f"{split.name}.weight" not in names or (layer.bias is not None and f"{split.name}.bias" not in names):
        return None
    return split


def head(module: nn.Module, state: dict[str, Tensor], x: Jet | Tensor, name: str) -> Jet | Tensor | None:
    """The jet (or, given points, the value) of the input of the module's output layer
    ``name`` (:func:`output_layer`), by its traced ``forward``; None where the trace no
    longer has that output layer, its values differ from the module's, or the input does
    not have the points' batch axis first (``h.reshape(-1, 8)``)."""
    with jets.module_lock():
        entry = _entry(module)  # one entry for the call: forward may change the module's attributes
        split = _split(module, entry)
        if split is None or split.name != name:
            return None
        if _state_key(state, entry) not in entry.checked:
            # The whole trace's values on a few points, once per state and public call: the check.
            probe = (x.value if isinstance(x, Jet) else x)[:_CHECK_ROWS]
            if _interpret(module, entry, state, probe) is None:
                return None
        h = _interpret(module, entry, state, x, stop=split.stop)
        if h is not None and split.inner is not None:
            prefix = f"{split.stop.target}."
            local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            sequential = module.get_submodule(split.stop.target)
            h = jets.head_jet(sequential, local, h, split.inner)
        if h is None:
            return None
        n = (x.value if isinstance(x, Jet) else x).shape[0]
        value = h.value if isinstance(h, Jet) else h
        return h if value.dim() >= 2 and value.shape[0] == n else None


def _interpret(module: nn.Module, entry: _Entry, state: dict[str, Tensor], jet: Jet | Tensor, stop=None):
    """The jet (or value, given a tensor) of the module's traced ``forward`` (``entry``), or of
    the input of the node ``stop``; None where it cannot be interpreted."""
    graph = entry.graph
    if graph is None:
        return None
    env: dict[fx.Node, object] = {}

    def load(arg):
        return fx.node.map_arg(arg, lambda node: env[node])

    try:
        for node in graph.graph.nodes:
            if node is stop:
                return env[node.args[0]]
            if node.op == "placeholder":
                env[node] = jet
            elif node.op == "get_attr":
                env[node] = state[node.target] if node.target in state else _attribute(module, graph, node.target)
            elif node.op == "call_module":
                env[node] = _call_module(module, state, node.target, load(node.args), load(node.kwargs))
            elif node.op in ("call_function", "call_method"):
                env[node] = _call(node.op, node.target, load(node.args), load(node.kwargs))
            elif node.op == "output":
                out = load(node.args[0])
                # One tensor, or a tuple of them (a decoder returning (mean, std)).
                outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
                if not outs or not all(isinstance(o, type(jet)) for o in outs):
                    raise _Unsupported("output is not a tensor or a tuple of tensors")
                key = _state_key(state, entry)
                if key not in entry.checked:
                    z = jet.value if isinstance(jet, Jet) else jet
                    values = tuple(o.value if isinstance(o, Jet) else o for o in outs)
                    if not _same_values(module, state, z, values if isinstance(out, (tuple, list)) else values[0]):
                        # Where it cannot alias, the trace is out of date: traced again next pass.
                        entry.stale = not entry.may_alias
                        raise _Unsupported("the traced graph computes other values than the module")
                    entry.checked = [*entry.checked[-(_CHECKED_STATES - 1) :], key]
                    entry.stale_traces = 0
                return outs if isinstance(out, (tuple, list)) else out
    except _Unsupported:
        entry.graph = None
    except Exception:  # noqa: BLE001 -- the user's own error, or one of this interpreter: the
        # torch.func path gives the right numbers (or raises the user's error) for this call.
        entry.errors += 1
        if entry.errors >= _MAX_ERRORS:
            entry.graph = None
    return None


def _attribute(module: nn.Module, graph: fx.GraphModule, target: str):
    for owner in (module, graph):  # the module's current attribute, else a tracing constant
        try:
            return operator.attrgetter(target)(owner)
        except AttributeError:
            continue
    raise _Unsupported(f"attribute {target}")


def _call_module(module: nn.Module, state: dict[str, Tensor], target: str, args, kwargs):
    child = module.get_submodule(target)
    if len(args) == 1 and not kwargs and isinstance(args[0], Jet):
        return jets.module_jet(child, state, args[0], f"{target}.")
    if _has_jet((args, kwargs)):
        raise _Unsupported(f"module {target} called with several inputs")
    prefix = f"{target}."
    local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return functional_call(child, local, tuple(args), dict(kwargs))


def _has_jet(tree) -> bool:
    if isinstance(tree, Jet):
        return True
    if isinstance(tree, (list, tuple)):
        return any(_has_jet(x) for x in tree)
    if isinstance(tree, dict):
        return any(_has_jet(x) for x in tree.values())
    return False


def _invoke(op: str, target, args, kwargs):
    """The operation of a call_function or call_method node, on these arguments."""
    return target(*args, **kwargs) if op == "call_function" else getattr(args[0], target)(*args[1:], **kwargs)


def _call(op: str, target, args, kwargs):
    if not _has_jet((args, kwargs)):  # constants: computed as they are
        return _invoke(op, target, args, kwargs)
    if kwargs.get("inplace") or _in_place(op, target):
        raise _Unsupported(f"in-place {target}")  # aliasing that the jets would not follow
    if target is operator.getitem and isinstance(args[0], (tuple, list)):
        return args[0][args[1]]  # one output of chunk / split
    out = _by_rule(op, target, args, kwargs)
    if out is not None:
        return out
    # One jet among the arguments, no rule: torch.func differentiates this operation alone.
    positions = [i for i, a in enumerate(args) if isinstance(a, Jet)]
    if len(positions) == 1 and not _has_jet((args[: positions[0]], args[positions[0] + 1 :], kwargs)):
        index = positions[0]

        def fn(x):
            call = list(args)
            call[index] = x
            return _invoke(op, target, call, kwargs)

        return jets.generic(fn, args[index])
    raise _Unsupported(f"{target} of several jets")


def _in_place(op: str, target) -> bool:
    """``h.add_(x)``, ``torch.sigmoid_(h)``, ``F.elu_(h)``: torch's trailing underscore."""
    name = target if op == "call_method" else getattr(target, "__name__", "")
    # (``h += x`` is not one: fx records it as ``h + x``, see :func:`_may_alias`.)
    return isinstance(name, str) and name.endswith("_") and not name.startswith("__")


def _by_rule(op: str, target, args, kwargs):
    """The result of a rule of this module, or None if none applies."""
    rule = _METHODS.get(target) if op == "call_method" else _FUNCTIONS.get(target)
    if rule is not None:
        try:
            return rule(*args, **kwargs)
        except (_Unsupported, TypeError):  # declined, or arguments in a form it does not read
            return None
    first, rest = args[0] if args else None, (args[1:], kwargs)
    if not isinstance(first, Jet):
        return None
    if op == "call_function" and target is getattr:
        return getattr(first.value, args[1]) if args[1] in ("shape", "dtype", "device", "ndim") else None
    if op == "call_method" and target in ("size", "dim", "ndimension", "numel", "nelement"):
        return getattr(first.value, target)(*args[1:], **kwargs)
    if op == "call_method" and target in ("expand_as", "view_as", "reshape_as") and len(args) == 2 and not kwargs:
        other = args[1].value if isinstance(args[1], Jet) else args[1]  # only its shape is read
        return _linear_op(lambda x: getattr(x, target)(other), first)
    if _has_jet(rest):
        return None
    if target in (_LINEAR_METHODS if op == "call_method" else _LINEAR_FUNCTIONS):
        return _linear_op(lambda x: _invoke(op, target, (x, *args[1:]), kwargs), first)
    return None


# ------------------------------------------------------------------ linear operations
def _linear_op(fn: Callable[[Tensor], Tensor], jet: Jet) -> Jet:
    """``fn`` linear (a reshape, an index, a sum): applied to the value and to each stream,
    streams being batches of values (``torch.func.vmap`` over their leading axis)."""
    value, first = fn(jet.value), vmap(fn)(jet.first)
    second = jet.second
    if second is not None:
        second = vmap(fn)(second) if jet.many_pairs else fn(second)
    if isinstance(value, Tensor):
        return jet.replace(value, first, second)
    # Several outputs (split, chunk, unbind): one jet each.
    seconds = [None] * len(value) if second is None else second
    return tuple(jet.replace(v, f, s) for v, f, s in zip(value, first, seconds, strict=True))


def _joined(join: Callable, tensors, *args, **kwargs) -> Jet:
    """``torch.cat`` / ``torch.stack`` of jets (and constants, which have no derivatives)."""
    parts = list(tensors)
    model = next(p for p in parts if isinstance(p, Jet))
    if any(
        isinstance(p, Jet) and (p.first.shape[0] != model.first.shape[0] or p.pair is not model.pair) for p in parts
    ):
        raise _Unsupported("jets of different directions")
    jets_ = [p if isinstance(p, Jet) else _constant_jet(p, model) for p in parts]
    value = join([j.value for j in jets_], *args, **kwargs)
    first = vmap(lambda xs: join(xs, *args, **kwargs))([j.first for j in jets_])
    second = None
    if model.second is not None:
        seconds = [j.second for j in jets_]
        if model.many_pairs:
            second = vmap(lambda xs: join(xs, *args, **kwargs))(seconds)
        else:
            second = join(seconds, *args, **kwargs)
    return model.replace(value, first, second)


def _constant_jet(value: Tensor, like: Jet) -> Jet:
    value = torch.as_tensor(value, dtype=like.value.dtype, device=like.value.device)
    first = value.new_zeros(like.first.shape[0], *value.shape)
    second = None
    if like.second is not None:
        second = value.new_zeros(*like.second.shape[:1], *value.shape) if like.many_pairs else torch.zeros_like(value)
    return like.replace(value, first, second)


# ------------------------------------------------------------------ arithmetic
def _broadcast_streams(jet: Jet, value: Tensor) -> Jet:
    """The jet's streams broadcast to a new value's shape (a constant widened it)."""
    first = jet.first.broadcast_to(jet.first.shape[0], *value.shape)
    second = jet.second
    if second is not None:
        lead = second.shape[:1] if jet.many_pairs else ()
        second = second.broadcast_to(*lead, *value.shape)
    return jet.replace(value, first, second)


def _check_rank(jet: Jet, other) -> None:
    # A constant with more axes than the value would align with the streams' leading axis.
    if isinstance(other, Tensor) and other.dim() > jet.value.dim():
        raise _Unsupported("a constant of higher rank")
    if isinstance(other, Jet) and other.value.dim() != jet.value.dim():
        raise _Unsupported("jets of different ranks")


def _add(x, y, *, alpha=1):
    if not isinstance(x, Jet):
        x, y = y, x
        if alpha != 1:
            return _add(_scale(x, alpha), y)
    elif alpha != 1:
        y = _scale(y, alpha) if isinstance(y, Jet) else alpha * y
    _check_rank(x, y)
    if not isinstance(y, Jet):
        return _broadcast_streams(x, x.value + y)
    value = x.value + y.value
    second = None if x.second is None else x.second + y.second
    return _broadcast_streams(x.replace(value, x.first + y.first, second), value)


def _scale(x: Jet, c) -> Jet:
    _check_rank(x, c)
    second = None if x.second is None else x.second * c
    return _broadcast_streams(x.replace(x.value * c, x.first * c, second), x.value * c)


def _neg(x: Jet) -> Jet:
    return _scale(x, -1)


def _sub(x, y, *, alpha=1):
    if isinstance(y, Jet):
        return _add(x, _neg(y), alpha=alpha)
    return _add(x, -alpha * y)


def _mul(x, y):
    if not isinstance(x, Jet):
        x, y = y, x
    if not isinstance(y, Jet):
        return _scale(x, y)
    _check_rank(x, y)
    value = x.value * y.value
    first = x.first * y.value + x.value * y.first
    second = None
    if x.second is not None:
        a, b = x.pair
        second = x.second * y.value + x.value * y.second + x.first[a] * y.first[b] + x.first[b] * y.first[a]
    return _broadcast_streams(x.replace(value, first, second), value)


def _reciprocal(x: Jet) -> Jet:
    r = torch.reciprocal(x.value)
    return jets._elementwise(x, r, -r * r, 2 * r * r * r)


def _div(x, y, *, rounding_mode=None):
    if rounding_mode is not None:
        raise _Unsupported("rounded division")
    if isinstance(y, Jet):
        return _mul(x, _reciprocal(y))
    # Divided as torch divides (dtype promotion included): not times a reciprocal taken in
    # the constant's own dtype (float32 or integer).
    _check_rank(x, y)
    value = x.value / y
    second = None if x.second is None else x.second / y
    return _broadcast_streams(x.replace(value, x.first / y, second), value)


def _pow(x, exponent):
    if not isinstance(x, Jet) or not isinstance(exponent, (int, float)):
        raise _Unsupported("pow of a jet exponent")
    if exponent == 0:
        return _constant_jet(torch.ones_like(x.value), x)
    if exponent == 1:
        return x
    if exponent == 2:
        return _mul(x, x)
    p, v = exponent, x.value
    return jets._elementwise(x, v.pow(p), p * v.pow(p - 1), p * (p - 1) * v.pow(p - 2))


def _matmul(x, y):
    if not isinstance(x, Jet) or isinstance(y, Jet) or y.dim() < 2:
        raise _Unsupported("matmul other than jet @ matrix")
    return _linear_op(lambda t: t @ y, x)


def _linear(x, weight, bias=None):
    if not isinstance(x, Jet) or isinstance(weight, Jet) or isinstance(bias, Jet):
        raise _Unsupported("linear with a jet weight")
    first = F.linear(x.first, weight)
    second = None if x.second is None else F.linear(x.second, weight)
    return x.replace(F.linear(x.value, weight, bias), first, second)


def _dropout(x, p=0.5, training=True, inplace=False):
    if training:
        raise _Unsupported("dropout in training mode")
    return x


# ------------------------------------------------------------------ elementwise functions
def _unary(rule: Callable, **defaults):
    """An elementwise rule of :mod:`~pullback_manifold.jets` (which reads its parameters from a
    module) for the functional form ``f(x, *params)``."""
    names = list(defaults)

    def apply(x, *args, **kwargs):
        kwargs.pop("inplace", None)
        params = dict(defaults)
        params.update(zip(names, args))
        params.update(kwargs)
        if set(params) != set(defaults):
            raise _Unsupported(f"arguments {sorted(set(params) - set(defaults))}")
        return rule(types.SimpleNamespace(**params), x)

    return apply


def _derivatives(s0: Callable, s1: Callable, s2: Callable) -> Callable:
    def rule(_, jet: Jet) -> Jet:
        v = jet.value
        return jets._elementwise(jet, s0(v), s1(v), s2(v))

    return rule


_exp = _derivatives(torch.exp, torch.exp, torch.exp)
_log = _derivatives(torch.log, torch.reciprocal, lambda v: -torch.reciprocal(v * v))
_sin = _derivatives(torch.sin, torch.cos, lambda v: -torch.sin(v))
_cos = _derivatives(torch.cos, lambda v: -torch.sin(v), lambda v: -torch.cos(v))
_sqrt = _derivatives(torch.sqrt, lambda v: 0.5 * torch.rsqrt(v), lambda v: -0.25 * torch.rsqrt(v) / v)
_rsqrt = _derivatives(torch.rsqrt, lambda v: -0.5 * torch.rsqrt(v) / v, lambda v: 0.75 * torch.rsqrt(v) / (v * v))
_square = _derivatives(torch.square, lambda v: 2 * v, lambda v: torch.full_like(v, 2.0))

_TANH = _unary(jets._tanh)
_SIGMOID = _unary(jets._sigmoid)
_RELU = _unary(jets._relu)
_SILU = _unary(jets._silu)
_SOFTPLUS = _unary(jets._softplus, beta=1.0, threshold=20.0)
_LEAKY_RELU = _unary(jets._leaky_relu, negative_slope=0.01)
_ELU = _unary(jets._elu, alpha=1.0)
_GELU = _unary(jets._gelu, approximate="none")
_ELEMENTARY = {
    name: _unary(rule)
    for name, rule in [
        ("exp", _exp),
        ("log", _log),
        ("sin", _sin),
        ("cos", _cos),
        ("sqrt", _sqrt),
        ("rsqrt", _rsqrt),
        ("square", _square),
    ]
}


def _gelu(x, approximate="none"):
    if approximate != "none":
        raise _Unsupported("tanh-approximate gelu")
    return _GELU(x)


_FUNCTIONS: dict[Callable, Callable] = {
    torch.tanh: _TANH,
    F.tanh: _TANH,
    torch.sigmoid: _SIGMOID,
    F.sigmoid: _SIGMOID,
    torch.relu: _RELU,
    F.relu: _RELU,
    F.silu: _SILU,
    F.softplus: _SOFTPLUS,
    F.leaky_relu: _LEAKY_RELU,
    F.elu: _ELU,
    F.gelu: _gelu,
    F.dropout: _dropout,
    F.linear: _linear,
    torch.reciprocal: _reciprocal,
    operator.add: _add,
    torch.add: _add,
    operator.sub: _sub,
    torch.sub: _sub,
    operator.neg: _neg,
    torch.neg: _neg,
    operator.mul: _mul,
    torch.mul: _mul,
    operator.truediv: _div,
    torch.div: _div,
    operator.pow: _pow,
    torch.pow: _pow,
    operator.matmul: _matmul,
    torch.matmul: _matmul,
    torch.cat: lambda tensors, *args, **kwargs: _joined(torch.cat, tensors, *args, **kwargs),
    torch.concat: lambda tensors, *args, **kwargs: _joined(torch.cat, tensors, *args, **kwargs),
    torch.stack: lambda tensors, *args, **kwargs: _joined(torch.stack, tensors, *args, **kwargs),
    **{getattr(torch, name): rule for name, rule in _ELEMENTARY.items()},
}

_METHODS: dict[str, Callable] = {
    "tanh": _TANH,
    "sigmoid": _SIGMOID,
    "relu": _RELU,
    "reciprocal": _reciprocal,
    "add": _add,
    "sub": _sub,
    "neg": _neg,
    "mul": _mul,
    "div": _div,
    "pow": _pow,
    "matmul": _matmul,
    **_ELEMENTARY,
}
# Linear in their first argument, the others constants: applied to every stream.
_LINEAR_METHODS = frozenset(
    {
        "view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "permute", "transpose", "t",
        "expand", "narrow", "movedim", "split", "chunk", "unbind", "contiguous", "sum", "mean", "flip",
        "roll", "repeat", "clone",
    }
)  # fmt: skip
_LINEAR_FUNCTIONS = frozenset(
    {
        operator.getitem, torch.reshape, torch.flatten, torch.unflatten, torch.unsqueeze, torch.squeeze,
        torch.permute, torch.transpose, torch.t, torch.narrow, torch.movedim, torch.split, torch.chunk,
        torch.unbind, torch.sum, torch.mean, torch.flip, torch.roll,
    }
)  # fmt: skip
