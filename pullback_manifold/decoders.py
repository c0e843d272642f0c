"""Decoders: the maps whose pull-back metric gives the latent space its geometry.

Every decoder here exposes one method the geometry needs, :meth:`Decoder.embed`,
mapping latent points ``(n, d)`` to flat outputs ``(n, D)``. The metric is the
pull-back ``G = J^T J`` of that map, ``J = d embed / d z``:

* :class:`DeterministicDecoder` wraps any torch callable or ``nn.Module``
  ``(..., d) -> (..., *out)``; images ``(..., C, H, W)`` are flattened.
* :class:`GaussianDecoder` (``mean``, ``std``) embeds ``z -> [mu(z); sigma(z)]``,
  whose pull-back is the expected metric ``J_mu^T J_mu + J_sigma^T J_sigma``
  of the stochastic decoder ``mu(z) + sigma(z) * eps``.
* :class:`EnsembleDecoder` embeds ``z -> [f_1(z); ...; f_M(z)] / sqrt(M)``, whose
  pull-back is the ensemble-averaged metric ``(1/M) sum_m J_m^T J_m``.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import jets, traced
from .errors import DecoderError
from .jets import (
    Jet,
    OutputLayer,
    coordinate_basis,
    generic,
    head_jet,
    module_jet,
    module_lock,
    sequential_gram,
    stacked_gram,
    wide_output_layer,
)

__all__ = [
    "Decoder",
    "DeterministicDecoder",
    "EnsembleDecoder",
    "GaussianDecoder",
    "MetricDecoder",
    "as_decoder",
]


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Put ``module`` in eval mode for the duration, then restore every flag; under
    :func:`~pullback_manifold.jets.module_lock` (every call with swapped-in parameters
    runs inside this)."""
    with module_lock():
        flags = [(m, m.training) for m in module.modules()]
        if not any(training for _, training in flags):
            # Already in eval mode (a trained model, usually): nothing to set or restore. This
            # runs at every decoder call of an ODE solve; eval() and the restore were most of it.
            yield
            return
        module.eval()
        try:
            yield
        finally:
            for m, training in flags:
                m.training = training


class _ModuleMethod(nn.Module):
    """A method of an ``nn.Module`` (``vae.decode``) as a module of its own: it is cast,
    put in eval mode and traced like one (:class:`_TorchFunction`). Its parameters are
    the owner's, named ``owner.<name>``."""

    def __init__(self, owner: nn.Module, method: str):
        super().__init__()
        self.owner = owner
        self.method = method

    def forward(self, z: Tensor):
        return getattr(self.owner, self.method)(z)


class _FunctionModule(nn.Module):
    """A plain callable as a module without parameters, whose ``forward`` calls it: its
    body is then traced (:mod:`~pullback_manifold.traced`) and read for kinks like a
    custom ``forward``, rather than differentiated by ``torch.func``'s nested forward mode
    (measured on the sphere's stereographic chart, 5 logs: 2.0 s against 0.33 s for the
    same chart as a module). Only for derivatives: the callable itself is called as it is
    (its tensors are not cast)."""

    def __init__(self, function: Callable):
        super().__init__()
        self.function = function

    def forward(self, z: Tensor):
        return self.function(z)


def _as_module(fn: Callable) -> Callable:
    """``fn`` itself, or a :class:`_ModuleMethod` for a method bound to an ``nn.Module``."""
    owner = getattr(fn, "__self__", None)
    if not inspect.ismethod(fn) or not isinstance(owner, nn.Module):
        return fn
    name = fn.__name__
    if getattr(owner, name, None) != fn:  # not reachable by its name (a renamed or wrapped method)
        return fn
    return _ModuleMethod(owner, name)


class _TorchFunction:
    """Call a torch callable with the dtype and device of its input.

    ``nn.Module`` s, and methods bound to one (``vae.decode``), are called through
    :func:`torch.func.functional_call` with detached copies of their parameters and
    buffers, cast to the input's dtype and device, in eval mode: geometry never
    writes gradients into a model, never changes its mode, and a float32 model can
    be evaluated at float64 points. Plain callables are called as they are.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str):
        if not callable(fn):
            raise TypeError(f"{name} must be a torch callable or nn.Module, got {type(fn).__name__}")
        self.fn = _as_module(fn)
        # A plain callable: traced for its derivatives (no parameters: nothing to cast).
        self.traceable = None if isinstance(self.fn, nn.Module) else _FunctionModule(self.fn)
        self.name = name
        self._cache: dict = {}
        self._derived: dict = {}  # matrices made from a widening output layer's cast weight

    def _state(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        cached = self._cache.get((dtype, device))
        top_level = torch._C._functorch.peek_interpreter_stack() is None
        if cached is not None and not top_level:
            return cached[1]  # validated by prepare() at the public entry point
        module = self.fn
        with module_lock():  # not while another thread has its cast copies swapped in
            # Every name of a tied tensor (a weight shared by two layers): each layer's rule
            # reads its own; one copy per tensor, as functional_call ties them.
            named = list(module.named_parameters(remove_duplicate=False))
            named += list(module.named_buffers(remove_duplicate=False))
            # _version changes on in-place updates (optimizer steps): recast then.
            key = tuple((id(t), t._version) for _, t in named)
            if cached is not None and cached[0] == key:
                return cached[1]
            meta = [name for name, t in named if t.is_meta]
            if meta:
                raise DecoderError(
                    f"{self.name}'s parameters or buffers are on the meta device, with no values ({', '.join(meta[:3])}"
                    f"{', ...' if len(meta) > 3 else ''}): materialize the module first (module.to_empty(device=...) "
                    "and load_state_dict, or build it on a real device)"
                )
            copies: dict[int, Tensor] = {}
            for _, t in named:
                if id(t) not in copies:
                    copies[id(t)] = (
                        t.detach().to(device=device, dtype=dtype) if t.is_floating_point() else t.detach().to(device)
                    )
            state = {k: copies[id(t)] for k, t in named}
            # The values each copy was made from (prepare() compares them with the tensors);
            # none for a tensor used as it is.
            sources = {}
            if top_level:
                sources = {k: t.detach().clone() for k, t in named if state[k].data_ptr() != t.data_ptr()}
        # Tensors made inside a torch.func transform belong to its level: caching them
        # would leak them into later transforms, so only cache at top level.
        if top_level:
            self._cache[(dtype, device)] = (key, state, sources)
        return state

    def prepare(self, dtype: torch.dtype, device: torch.device) -> None:
        """Cache the parameters cast to ``dtype``/``device``, and drop every cached copy made
        before they changed; call outside any transform (once per public call)."""
        if isinstance(self.fn, nn.Module):
            with module_lock():  # two threads may find the same entry stale
                # Every entry, not only this dtype's: a float64 solve also runs the decoder in
                # float32 (the Newton derivatives, see discrete.newton_derivative_dtype).
                for entry, cached in list(self._cache.items()):
                    if not self._copies_current(cached[1], cached[2]):
                        self._cache.pop(entry, None)
                for key, (weight, _, values) in list(self._derived.items()):
                    if not torch.equal(weight, values):
                        self._derived.pop(key, None)
                self._state(dtype, device)
                traced.new_epoch()  # a traced forward's values are checked again (writes through .data)
        else:
            traced.new_epoch()  # a traced function's too (its globals and closures may have changed)

    def _copies_current(self, state: dict[str, Tensor], sources: dict[str, Tensor]) -> bool:
        """Whether the copies ``state`` were made from the module's tensors as they are now
        (``sources``: the values they were made from). Writes through ``.data`` (manual
        updates, ``nn.utils.vector_to_parameters``) change neither a tensor's identity nor
        its version, which is all :meth:`_state` looks at. Called by :meth:`prepare`, under
        the module lock."""
        named = list(self.fn.named_parameters()) + list(self.fn.named_buffers())
        if len(named) != len(state):
            return False
        for name, t in named:
            copy = state.get(name)
            if copy is None or copy.shape != t.shape:
                return False
            if copy.data_ptr() == t.data_ptr():
                continue  # not a copy: the tensor itself
            source = sources.get(name)
            # Same dtype and device: a comparison without casting (one pass, no allocation).
            if source is None or not torch.equal(source, t.detach()):
                return False
        return True

    def _casts_to_input(self) -> bool:
        """Whether it runs in its input's dtype: an ``nn.Module``, whose parameters are cast to it."""
        return isinstance(self.fn, nn.Module)

    def jet(self, jet: Jet) -> Jet:
        """Taylor-mode derivatives (:mod:`~pullback_manifold.jets`), in eval mode with the cast parameters."""
        if isinstance(self.fn, nn.Module):
            state = self._state(jet.value.dtype, jet.value.device)
            with _eval_mode(self.fn):
                return module_jet(self.fn, state, jet)
        out = traced.traced_jet(self.traceable, {}, jet)
        return out if isinstance(out, Jet) else generic(self.fn, jet)

    def pair_jet(self, jet: Jet) -> tuple[Jet, Jet] | None:
        """The jets of a module returning a pair ``(mean, std)``, through its traced
        ``forward`` (or body, for a plain callable); None where it cannot be traced."""
        if not isinstance(self.fn, nn.Module):
            out = traced.traced_jet(self.traceable, {}, jet)
        elif jets.has_rule(self.fn):
            return None
        else:
            state = self._state(jet.value.dtype, jet.value.device)
            with _eval_mode(self.fn):
                out = traced.traced_jet(self.fn, state, jet)
        return out if isinstance(out, tuple) and len(out) == 2 else None

    def gram(self, jet: Jet) -> Tensor:
        """:func:`~pullback_manifold.jets.stacked_gram` of the output jet, ``(n, m, m)``."""
        if isinstance(self.fn, nn.Module):
            with _eval_mode(self.fn):  # one mode switch for the whole pass (a model in training mode)
                last = wide_output_layer(self.fn)
                if last is not None:
                    state, weight_gram = self._output_weight(jet.value, last, "gram", lambda w: w.T @ w)
                    gram = sequential_gram(self.fn, state, jet, last, weight_gram)
                    if gram is not None:  # None: a traced forward that no longer gives the layer's input
                        return gram
                return stacked_gram(self.jet(jet))
        return stacked_gram(self.jet(jet))

    def _output_layer(self) -> OutputLayer | None:
        """:func:`~pullback_manifold.jets.wide_output_layer`, looked for in eval mode (as the
        module runs here: a traced ``forward`` may read ``self.training``)."""
        if not isinstance(self.fn, nn.Module):
            return None
        with _eval_mode(self.fn):
            return wide_output_layer(self.fn)

    def _output_weight(
        self, like: Tensor, last: OutputLayer, kind: str, make: Callable[[Tensor], Tensor]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The parameters cast like ``like`` and ``make(W)`` of the output layer's cast weight
        ``W``, made again when the weight is recast (the model changed)."""
        state = self._state(like.dtype, like.device)
        weight = state[f"{last.name}.weight"]
        cached = self._derived.get((kind, like.dtype, like.device))
        if cached is None or cached[0] is not weight:
            # With the weight's values then: a write through .data leaves the tensor the same.
            cached = (weight, make(weight), weight.clone())
            if torch._C._functorch.peek_interpreter_stack() is None:  # see _state
                self._derived[(kind, like.dtype, like.device)] = cached
        return state, cached[1]

    def compacted(self) -> _CompactFunction | None:
        """The same chord lengths with fewer outputs (:class:`_CompactFunction`), or None when the
        module does not end in a widening ``nn.Linear``."""
        last = self._output_layer()
        return None if last is None else _CompactFunction(self, last)

    def __call__(self, z: Tensor) -> Tensor:
        if isinstance(self.fn, nn.Module):
            state = self._state(z.dtype, z.device)
            with _eval_mode(self.fn):
                return torch.func.functional_call(self.fn, state, (z,))
        return self.fn(z)


class _CompactFunction:
    """``z -> R h(z)`` in place of a module ``f(z) = W h(z) + b`` whose output layer widens
    (an ``nn.Sequential``, or a traced ``forward``).

    With ``W = Q R`` (``Q`` orthonormal columns, ``R`` square), ``|R (h(a) - h(b))|
    = |f(a) - f(b)|`` for all ``a, b``: chord lengths, the discrete energy, the
    pull-back metric and every inner product of derivatives are those of ``f``,
    for the cost of ``h`` and an ``H x H`` product instead of the ``D x H`` one
    (for a decoder to images, most of the cost). Not a decoder: its outputs are
    not images.
    """

    def __init__(self, fn: _TorchFunction, last: OutputLayer):
        self.fn, self.last = fn, last

    def prepare(self, dtype: torch.dtype, device: torch.device) -> None:
        self.fn.prepare(dtype, device)

    def _casts_to_input(self) -> bool:
        return True  # made from nn.Modules only

    def _state_and_factor(self, like: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return self.fn._output_weight(like, self.last, "factor", _triangular_factor)

    def jet(self, jet: Jet) -> Jet:
        state, factor = self._state_and_factor(jet.value)
        with _eval_mode(self.fn.fn):
            head = head_jet(self.fn.fn, state, jet, self.last)
        if head is None:
            return self._from_output(self.fn.jet(jet), state, factor)
        second = None if head.second is None else F.linear(head.second, factor)
        return head.replace(F.linear(head.value, factor), F.linear(head.first, factor), second)

    def __call__(self, z: Tensor) -> Tensor:
        state, factor = self._state_and_factor(z)
        with _eval_mode(self.fn.fn):
            head = head_jet(self.fn.fn, state, z, self.last)
        if head is None:
            return self._from_output(self.fn(z), state, factor)
        return F.linear(head, factor)

    def _from_output(self, out: Tensor | Jet, state: dict[str, Tensor], factor: Tensor) -> Tensor | Jet:
        """``R h = Q^T (f - b)`` from the whole module's output ``f`` (or its jet):
        where a traced ``forward`` no longer gives ``h`` (its values differ from the
        module's), the compact output at the cost of the full one."""
        weight, bias = state[f"{self.last.name}.weight"], state.get(f"{self.last.name}.bias")
        # Q^T of W = Q R (the QR that gave ``factor``): Q^T (f - b) = Q^T Q R h = R h, no
        # inverse of R (singular for a rank-deficient W).
        project = _orthonormal_factor(weight).T  # (H, D)

        row_axes = (out if isinstance(out, Tensor) else out.value).dim() - 1  # of one output row

        def apply(x: Tensor, shift: Tensor | None) -> Tensor:
            # (..., n, *row) -> (..., n, C, D): the layer acts on the last axis of its input.
            rows = x.reshape(*x.shape[: x.dim() - row_axes], -1, weight.shape[0])
            return F.linear(rows if shift is None else rows - shift, project)

        if isinstance(out, Tensor):
            return apply(out, bias)
        second = None if out.second is None else apply(out.second, None)
        return out.replace(apply(out.value, bias), apply(out.first, None), second)


def _orthonormal_factor(weight: Tensor) -> Tensor:
    """``Q`` of ``weight = Q R`` (:func:`_triangular_factor`'s ``R``), computed the same way."""
    return torch.linalg.qr(weight.detach().to("cpu", torch.float64), mode="reduced")[0].to(weight.device, weight.dtype)


def _triangular_factor(weight: Tensor) -> Tensor:
    """``R`` of ``weight = Q R``, in float64 on the CPU (QR has no half-precision kernels, nor
    one on every device), cast back."""
    return torch.linalg.qr(weight.detach().to("cpu", torch.float64), mode="r")[1].to(weight.device, weight.dtype)


class _CompactEmbedding:
    """``z -> [s_1 g_1(z); ...; s_M g_M(z)]``: a decoder's embedding with its widening output
    layers replaced by :class:`_CompactFunction` s (see :meth:`Decoder.compact`)."""

    def __init__(self, parts: list[tuple[_TorchFunction | _CompactFunction, float]]):
        self.parts = parts

    def _casts_to_input(self) -> bool:
        return all(fn._casts_to_input() for fn, _ in self.parts)

    def __call__(self, z: Tensor) -> Tensor:
        outs = [(_flatten_output(fn(z), z, "decoder"), scale) for fn, scale in self.parts]
        return torch.cat([out if scale == 1.0 else scale * out for out, scale in outs], dim=-1)

    def jet(self, jet: Jet) -> Jet:
        outs = [_scaled(_flatten_jet(fn.jet(jet), jet.value, "decoder"), scale) for fn, scale in self.parts]
        return _concatenate(outs, 1.0)


def _scaled(jet: Jet, scale: float) -> Jet:
    if scale == 1.0:
        return jet
    return jet.replace(scale * jet.value, scale * jet.first, None if jet.second is None else scale * jet.second)


class Decoder(abc.ABC):
    """Base class: a map from latent points to a flat embedding.

    Subclasses implement :meth:`_embed`. A :class:`Decoder` holds references to
    the user's callables and owns no trainable state.
    """

    @abc.abstractmethod
    def _embed(self, z: Tensor) -> Tensor:
        """Map ``(n, d)`` latent points to ``(n, D)``."""

    def prepare(self, dtype: torch.dtype, device: torch.device) -> None:
        """Get ready to be evaluated at ``dtype``/``device`` points (casts and caches parameters).

        Call it outside ``torch.func`` transforms, before a batch of geometry
        computations; :class:`~pullback_manifold.PullbackManifold` does.
        """
        for fn in self._functions():
            fn.prepare(dtype, device)

    def _functions(self) -> list[_TorchFunction]:
        return [v for v in vars(self).values() if isinstance(v, _TorchFunction)]

    def embed(self, z: Tensor) -> Tensor:
        """Flat embedding whose pull-back is the metric.

        Parameters
        ----------
        z : Tensor, shape=[n, d]
            Latent points.

        Returns
        -------
        y : Tensor, shape=[n, D]
        """
        return self._embed(z)

    def __call__(self, z: Tensor) -> Tensor:
        """Same as :meth:`embed`."""
        return self.embed(z)

    def _parts(self) -> list[tuple[_TorchFunction, float]] | None:
        """The functions whose outputs, scaled and concatenated, are :meth:`embed`; None if it is not built so."""
        return None

    def _casts_to_input(self) -> bool:
        """Whether :meth:`embed` runs in its input's dtype: it is made of ``nn.Module`` s,
        whose parameters are cast (plain callables may close over tensors of any dtype)."""
        parts = self._parts()
        return parts is not None and all(fn._casts_to_input() for fn, _ in parts)

    def _overrides(self, base: type, *names: str) -> bool:
        """Whether a subclass redefines any of ``base``'s methods ``names`` (then :meth:`_parts`
        of ``base`` no longer describes :meth:`embed`)."""
        return any(getattr(type(self), name) is not getattr(base, name) for name in names)

    def compact(self):
        """An embedding with the same chord lengths ``|embed(a) - embed(b)|`` and fewer outputs.

        Every part of the decoder that ends in a widening ``nn.Linear`` ``W h + b``
        (``D`` outputs from ``H < D`` features; an ``nn.Sequential``, or a module whose
        traced ``forward`` returns that layer's output, reshaped at most:
        :mod:`~pullback_manifold.traced`) is replaced by ``R h``, where
        ``W = Q R``: distances between embedded points, hence the discrete
        energy of a latent polygon and the pull-back metric, are unchanged, and
        the ``D x H`` output layer is never evaluated. The solvers use it; its
        outputs are not the decoder's and are no use for decoding.

        Returns
        -------
        embed : callable ``(n, d) -> (n, D')`` with a ``jet`` method, or this
            decoder itself when no part compacts.
        """
        parts = self._parts()
        if parts is None:
            return self
        compacted = [(fn.compacted(), scale) for fn, scale in parts]
        if all(fn is None for fn, _ in compacted):
            return self
        return _CompactEmbedding([(new or old, scale) for (new, scale), (old, _) in zip(compacted, parts)])

    def jet(self, jet: Jet) -> Jet:
        """Derivatives of :meth:`embed` at a :class:`~pullback_manifold.jets.Jet` of latent points.

        Parameters
        ----------
        jet : Jet
            Latent points ``(n, d)``, directions ``(k, n, d)``, second derivative ``(n, d)``.

        Returns
        -------
        jet : Jet
            ``embed`` and its derivatives, ``(n, D)``, ``(k, n, D)``, ``(n, D)``.
        """
        return generic(self._embed, jet)

    def gram(self, jet: Jet) -> Tensor:
        """Inner products of the embedding's derivatives in the jet, ``(n, m, m)``.

        Of ``[d embed[t_1], ..., d embed[t_k], d^2 embed[t_a, t_b]]`` (``m = k + 1``;
        ``m = k`` without a second derivative): the metric and the geodesic
        equation need nothing else, and a wide output layer need not be evaluated
        to get them (:func:`~pullback_manifold.jets.sequential_gram`).
        """
        return stacked_gram(self.jet(jet))


def _flatten_output(out, z: Tensor, name: str) -> Tensor:
    """Check a raw decoder output against its input and flatten it to ``(n, D)``."""
    if isinstance(out, (tuple, list)):
        raise TypeError(
            f"{name} returned a {type(out).__name__} for input of shape {tuple(z.shape)}: "
            "expected one tensor. For a decoder returning (mean, std) use GaussianDecoder."
        )
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{name} returned {type(out).__name__} for input of shape {tuple(z.shape)}: expected a torch.Tensor"
        )
    if not out.is_floating_point():
        raise TypeError(
            f"{name} returned dtype {out.dtype} for input of shape {tuple(z.shape)}: expected a floating "
            "dtype, since geometry needs derivatives of the decoder (remove integer casts or rounding)"
        )
    batch = z.shape[:-1]
    if out.shape[: len(batch)] != batch or out.dim() == len(batch):
        raise DecoderError(
            f"{name} returned shape {tuple(out.shape)} for input {tuple(z.shape)}: expected "
            f"{tuple(batch)} + (D,) or {tuple(batch)} + (C, H, W), the input's batch shape first"
        )
    size = math.prod(out.shape[len(batch) :])
    if size == 0:
        raise DecoderError(
            f"{name} returned shape {tuple(out.shape)} for input {tuple(z.shape)}: no outputs per point, so "
            "no metric. Expected (n, D) with D >= 1."
        )
    # explicit D, not -1: reshape cannot infer -1 for an empty batch
    return out.reshape(*batch, size)


def _flatten_jet(out: Jet, z: Tensor, name: str) -> Jet:
    """:func:`_flatten_output` for a jet: ``(n, *out) -> (n, D)`` on every component."""
    if isinstance(out, (tuple, list)):  # a traced module returning several tensors
        _flatten_output(tuple(o.value for o in out), z, name)  # raises its TypeError
    value = _flatten_output(out.value, z, name)
    k = out.first.shape[0]
    second = out.second
    if second is not None:
        second = second.reshape(len(second), *value.shape) if out.many_pairs else second.reshape(value.shape)
    return out.replace(value, out.first.reshape(k, *value.shape), second)


def _concatenate(jets: list[Jet], scale: float) -> Jet:
    """Jet of ``z -> scale * [f_1(z); ...; f_M(z)]``."""

    def cat(parts):
        out = torch.cat(parts, dim=-1)
        return out if scale == 1.0 else out * scale

    second = None if jets[0].second is None else cat([j.second for j in jets])
    return jets[0].replace(cat([j.value for j in jets]), cat([j.first for j in jets]), second)


class DeterministicDecoder(Decoder):
    """A deterministic decoder ``f``; the metric is ``J_f^T J_f``.

    Parameters
    ----------
    decoder : callable or nn.Module
        Maps latent points ``(n, d)`` to outputs ``(n, *out)``.
    """

    def __init__(self, decoder: Callable[[Tensor], Tensor]):
        self._f = _TorchFunction(decoder, "decoder")

    def _embed(self, z: Tensor) -> Tensor:
        return _flatten_output(self._f(z), z, "decoder")

    def _parts(self):
        return None if self._overrides(DeterministicDecoder, "_embed", "jet") else [(self._f, 1.0)]

    def jet(self, jet: Jet) -> Jet:
        return _flatten_jet(self._f.jet(jet), jet.value, "decoder")

    def gram(self, jet: Jet) -> Tensor:
        return self._f.gram(jet)


class GaussianDecoder(Decoder):
    r"""A Gaussian decoder ``x = mu(z) + sigma(z) * eps``, ``eps ~ N(0, I)``.

    The metric is the expected metric
    :math:`E[J^T J] = J_\mu^T J_\mu + J_\sigma^T J_\sigma`, the pull-back
    through the stacked map ``z -> [mu(z); sigma(z)]``.

    Parameters
    ----------
    mean : callable or nn.Module
        ``(n, d) -> (n, *out)``. If ``std`` is None, it must instead return a
        pair ``(mean, std)`` of tensors of the same shape.
    std : callable or nn.Module, optional
        ``(n, d) -> (n, *out)``, the standard deviation (not the variance).

    Neither may be a :class:`MetricDecoder` (e.g. a Gaussian process): its
    metric is not a pull-back through its outputs.
    """

    def __init__(self, mean: Callable, std: Callable | None = None):
        for name, part in (("mean", mean), ("std", std)):
            # Called for its outputs (the posterior mean), its covariance term would be lost, silently.
            if isinstance(part, MetricDecoder):
                raise TypeError(
                    f"GaussianDecoder's {name} is a {type(part).__name__}, which gives its (expected) metric "
                    "directly, not as a pull-back through its outputs. Give it to PullbackManifold on its own."
                )
        self._mean = _TorchFunction(mean, "mean")
        self._std = None if std is None else _TorchFunction(std, "std")

    def mean_and_std(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Flat mean and standard deviation, each ``(n, D)``."""
        if self._std is None:
            out = self._mean(z)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError(
                    "GaussianDecoder(mean) with no std expects mean(z) to return a pair (mean, std); "
                    f"got {type(out).__name__}. Pass std= as a second callable otherwise."
                )
            mu, sigma = out
        else:
            mu, sigma = self._mean(z), self._std(z)
        mu = _flatten_output(mu, z, "mean")
        sigma = _flatten_output(sigma, z, "std")
        if mu.shape != sigma.shape:
            raise ValueError(
                f"mean returned {tuple(mu.shape)} but std returned {tuple(sigma.shape)} (flattened) "
                f"for input {tuple(z.shape)}: they must have the same shape"
            )
        return mu, sigma

    def _embed(self, z: Tensor) -> Tensor:
        mu, sigma = self.mean_and_std(z)
        return torch.cat([mu, sigma], dim=-1)

    def _parts(self):
        if self._std is None or self._overrides(GaussianDecoder, "_embed", "jet", "mean_and_std"):
            return None
        return [(self._mean, 1.0), (self._std, 1.0)]

    def jet(self, jet: Jet) -> Jet:
        if self._std is None:  # one callable returning a pair
            pair = self._mean.pair_jet(jet)
            if pair is None:  # not a traceable module: differentiate the whole map
                return generic(self._embed, jet)
            mu, sigma = (_flatten_jet(out, jet.value, name) for out, name in zip(pair, ("mean", "std")))
        else:
            mu = _flatten_jet(self._mean.jet(jet), jet.value, "mean")
            sigma = _flatten_jet(self._std.jet(jet), jet.value, "std")
        if mu.value.shape != sigma.value.shape:
            self.mean_and_std(jet.value)  # raises the shape error
        return _concatenate([mu, sigma], 1.0)

    def gram(self, jet: Jet) -> Tensor:
        if self._std is None:
            return stacked_gram(self.jet(jet))
        return self._mean.gram(jet) + self._std.gram(jet)


class EnsembleDecoder(Decoder):
    r"""An ensemble of decoders; the metric is :math:`\frac1M \sum_m J_m^T J_m`.

    Parameters
    ----------
    members : sequence of callables or nn.Modules, or of :class:`Decoder`
        The ``M`` members. A member that is a :class:`Decoder` (e.g. a
        :class:`GaussianDecoder`) contributes its own expected metric. Not a
        :class:`MetricDecoder` (e.g. a Gaussian process), whose metric is not a
        pull-back through its outputs.
    """

    def __init__(self, members: Sequence[Callable]):
        members = list(members)
        if not members:
            raise ValueError("EnsembleDecoder needs at least one member")
        for index, member in enumerate(members):
            # Through its outputs (the posterior mean) its covariance term would be lost, silently.
            if isinstance(member, MetricDecoder):
                raise TypeError(
                    f"EnsembleDecoder member {index} is a {type(member).__name__}, which gives its metric "
                    "directly, not as a pull-back through its outputs: an ensemble cannot average it. "
                    "Use it on its own, or ensemble decoders that map z to outputs."
                )
        self.members = [as_decoder(m) for m in members]
        self._scale = 1.0 / math.sqrt(len(members))

    def _functions(self) -> list[_TorchFunction]:
        return [fn for m in self.members for fn in m._functions()]

    def _embed(self, z: Tensor) -> Tensor:
        return torch.cat([m.embed(z) for m in self.members], dim=-1) * self._scale

    def _parts(self):
        if self._overrides(EnsembleDecoder, "_embed", "jet"):
            return None
        parts = [m._parts() for m in self.members]
        if any(p is None for p in parts):
            return None
        return [(fn, scale * self._scale) for member in parts for fn, scale in member]

    def jet(self, jet: Jet) -> Jet:
        return _concatenate([m.jet(jet) for m in self.members], self._scale)

    def gram(self, jet: Jet) -> Tensor:
        return sum(m.gram(jet) for m in self.members) * self._scale**2


class MetricDecoder(Decoder):
    """A decoder whose (expected) metric is given directly rather than as a pull-back.

    For models such as the Gaussian-process decoder, whose expected metric
    ``E[J]^T E[J] + D Cov[J]`` is not ``J^T J`` of any single map. The geometry
    then differentiates :meth:`metric` itself: Christoffel symbols and the
    geodesic equation come from ``dG`` by the Koszul formula, and curve lengths
    use the metric at segment midpoints. :meth:`embed` (the predictive mean)
    is used for decoding and pictures only.

    Subclasses implement :meth:`metric` with plain torch operations, so that
    ``torch.func.jvp``/``vmap`` and reverse-mode autograd run through it.
    """

    @abc.abstractmethod
    def metric(self, z: Tensor) -> Tensor:
        """The metric at a batch of latent points.

        Parameters
        ----------
        z : Tensor, shape=[n, d]

        Returns
        -------
        G : Tensor, shape=[n, d, d]
            Symmetric positive (semi-)definite.
        """

    def metric_and_derivatives(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The metric and its partial derivatives, for the geodesic equation.

        By ``torch.func`` JVPs of :meth:`metric` along the coordinate directions;
        a subclass with closed-form derivatives overrides it (and must keep this
        layout: the derivation index first).

        Parameters
        ----------
        z : Tensor, shape=[n, d]

        Returns
        -------
        G : Tensor, shape=[n, d, d]
        dG : Tensor, shape=[d, n, d, d]
            ``dG[a] = dG / dz_a``.
        """
        basis = coordinate_basis(z)
        return torch.func.vmap(lambda t: torch.func.jvp(self.metric, (z,), (t,)), out_dims=(None, 0))(basis)

    def metric_second_derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The metric with its first and second partial derivatives, for Newton's method
        on the energy of a discrete geodesic.

        By ``torch.func`` JVPs of :meth:`metric_and_derivatives` along the
        coordinate directions; a subclass with closed-form derivatives overrides it
        (and must keep this layout).

        Parameters
        ----------
        z : Tensor, shape=[n, d]

        Returns
        -------
        G : Tensor, shape=[n, d, d]
        dG : Tensor, shape=[d, n, d, d]
            ``dG[a] = dG / dz_a``.
        ddG : Tensor, shape=[d, d, n, d, d]
            ``ddG[b, a] = d^2 G / dz_b dz_a``.
        """
        basis = coordinate_basis(z)
        (G, dG), (_, ddG) = torch.func.vmap(
            lambda t: torch.func.jvp(self.metric_and_derivatives, (z,), (t,)), out_dims=((None, None), 0)
        )(basis)
        return G, dG, ddG


def casts_to_input(embed) -> bool:
    """Whether ``embed`` (a decoder, or a map the geometry made from one) runs in the dtype of
    its input, so that it can be evaluated in float32 by passing float32 points."""
    method = getattr(embed, "_casts_to_input", None)
    return callable(method) and bool(method())


def as_decoder(decoder) -> Decoder:
    """Wrap a callable as a :class:`DeterministicDecoder`; pass a :class:`Decoder` through."""
    if isinstance(decoder, Decoder):
        return decoder
    return DeterministicDecoder(decoder)
