r"""Second-order Taylor-mode derivatives of a decoder, layer by layer.

The geometry needs, at a batch of points ``z`` ``(n, d)``, the decoder's value,
its derivatives along a few directions (the ``d`` coordinate directions for
``J``, plus a velocity) and one second derivative ``d^2 f[u, w]``. A
:class:`Jet` carries exactly that through the decoder:

* ``value``  ``(n, *S)``: :math:`x`;
* ``first``  ``(k, n, *S)``: :math:`dx[t_1], \dots, dx[t_k]`;
* ``second`` ``(n, *S)``: :math:`d^2 x[t_a, t_b]`, for the pair ``(a, b)`` of
  first-order directions given by ``pair`` (or None if not needed); or
  ``(P, n, *S)`` for ``P`` pairs at once when ``pair`` holds two index tensors
  ``(A, B)`` of shape ``(P,)`` (all of a Hessian: ``A, B = triu_indices(d, d)``),
  which share the value and first derivatives.

Layers whose derivatives are known in closed form -- ``nn.Sequential``,
``nn.Linear``, convolutions, eval-mode batch norm, ``Flatten``/``Unflatten``,
dropout and the common activations -- propagate the jet with a few batched
tensor operations: about ``k + 2`` times the cost of a forward pass. A module
can give its own rule as a method ``jet_rule(jet, state) -> Jet`` (``state``:
its parameters and buffers by name, cast to the points' dtype). Any other
module -- a decoder written as a class -- has its ``forward`` traced by
``torch.fx`` and the jet pushed through the recorded operations with these
rules (:mod:`~pullback_manifold.traced`). A plain callable, and a module whose
``forward`` cannot be traced, is differentiated by ``torch.func`` (a vmapped
nested JVP), which gives the same numbers several times more slowly: under nested
forward-mode AD, torch runs many operators through Python decompositions (measured:
2 ms for one forward-mode derivative of a five-operation function that runs in 0.04 ms,
9 ms nested). So is a module with forward hooks or pre-hooks, with all its submodules
(the rules would skip the hooks): a hook on the decoder itself, or a global one, makes
all of it slow. Layer and instance normalization, ``det``, ``slogdet``, ``logdet``,
``linalg.solve`` and ``glu`` are written out in elementary operations on that path
(torch 2.13's own nested derivatives of them are wrong, or missing for ``glu``); a
space checks second derivatives against finite differences on first use
(``DecoderPullbackMetric._check_second_derivatives``) to catch any other such operation.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap
from torch.nn.modules import module as module_globals

from .errors import DecoderError

__all__ = [
    "Jet",
    "OutputLayer",
    "coordinate_basis",
    "has_rule",
    "head_jet",
    "module_jet",
    "module_lock",
    "propagate",
    "sequential_gram",
    "stacked_gram",
    "wide_output_layer",
]


@dataclass(frozen=True)
class Jet:
    """Value, first derivatives along ``k`` directions and one second derivative.

    Attributes
    ----------
    value : Tensor, shape=[n, *S]
    first : Tensor, shape=[k, n, *S]
    second : Tensor, optional
        :math:`d^2 x[t_a, t_b]` for ``(a, b) = pair``: shape ``(n, *S)``, or
        ``(P, n, *S)`` for ``P`` pairs.
    pair : tuple of int, or tuple of two LongTensors of shape [P], optional
        Indices into ``first`` of the two directions of ``second``; index
        tensors ask for ``P`` second derivatives at once.
    """

    value: Tensor
    first: Tensor
    second: Tensor | None = None
    pair: tuple[int, int] | tuple[Tensor, Tensor] | None = None

    @property
    def many_pairs(self) -> bool:
        """``second`` holds one second derivative per pair of index tensors ``(P, n, *S)``."""
        return self.pair is not None and isinstance(self.pair[0], Tensor)

    def derivatives(self) -> Tensor:
        """``[first_1, ..., first_k, second(s)]`` stacked on the leading axis."""
        if self.second is None:
            return self.first
        return torch.cat([self.first, self.second if self.many_pairs else self.second[None]])

    def replace(self, value: Tensor, first: Tensor, second: Tensor | None) -> Jet:
        return Jet(value, first, second, self.pair)


def coordinate_basis(z: Tensor) -> Tensor:
    """The coordinate directions of points ``z`` ``(n, d)``, broadcast over the batch: ``(d, n, d)``."""
    n, d = z.shape
    return torch.eye(d, dtype=z.dtype, device=z.device)[:, None, :].expand(d, n, d)


def _rows(x: Tensor) -> Tensor:
    """``(k, n, *S) -> (k * n, *S)``, to push all directions through a batched layer."""
    return x.reshape(-1, *x.shape[2:])


def _unrows(x: Tensor, k: int) -> Tensor:
    return x.reshape(k, -1, *x.shape[1:])


# ------------------------------------------------------------------ generic
def _elementary_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm`` in elementary operations."""
    axes = tuple(range(-len(normalized_shape), 0))
    centred = input - input.mean(axes, keepdim=True)
    out = centred * torch.rsqrt(centred.pow(2).mean(axes, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def _elementary_instance_norm(
    input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, eps=1e-5
):
    """``F.instance_norm`` in elementary operations (its running statistics are not updated:
    the geometry evaluates, it does not train)."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if use_input_stats or running_mean is None:
        axes = tuple(range(2, input.dim()))
        centred = input - input.mean(axes, keepdim=True)
        out = centred * torch.rsqrt(centred.pow(2).mean(axes, keepdim=True) + eps)
    else:
        out = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


def _torch_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, *_):
    """``torch.instance_norm``'s argument order."""
    return _elementary_instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def _lu_parts(A: Tensor) -> tuple[Tensor, Tensor]:
    """Diagonal of ``U`` and the permutation's sign, of ``A = P L U`` (a zero on the
    diagonal for a singular ``A``, whose determinant is then 0, as torch's)."""
    LU, pivots, _ = torch.linalg.lu_factor_ex(A)
    steps = torch.arange(1, A.shape[-1] + 1, device=A.device, dtype=pivots.dtype)
    swaps = (pivots != steps).sum(-1)
    return LU.diagonal(dim1=-2, dim2=-1), 1 - 2 * (swaps % 2).to(A.dtype)


def _small_det(A: Tensor) -> Tensor | None:
    """The determinant of a 1 x 1, 2 x 2 or 3 x 3 ``A`` as its polynomial: smooth at singular
    matrices too, where the derivatives of LU factors are not."""
    n = A.shape[-1]
    if n == 1:
        return A[..., 0, 0]
    if n == 2:
        return A[..., 0, 0] * A[..., 1, 1] - A[..., 0, 1] * A[..., 1, 0]
    if n == 3:
        a, b, c = A[..., 0, :].unbind(-1)
        cofactors = torch.linalg.cross(A[..., 1, :], A[..., 2, :], dim=-1)
        return a * cofactors[..., 0] + b * cofactors[..., 1] + c * cofactors[..., 2]
    return None


def _elementary_det(A, *, out=None):
    if out is not None:  # not differentiated through anyway; torch's own, into the buffer
        return torch.linalg.det(A, out=out)
    small = _small_det(A)
    if small is not None:
        return small
    diagonal, sign = _lu_parts(A)
    return sign * diagonal.prod(-1)


def _elementary_slogdet(A, *, out=None, kind=torch.return_types.slogdet):
    if out is not None:
        return torch.slogdet(A, out=out)
    small = _small_det(A)
    if small is not None:
        return kind((small.sign(), small.abs().log()))
    diagonal, sign = _lu_parts(A)
    return kind((sign * diagonal.sign().prod(-1), diagonal.abs().log().sum(-1)))


def _elementary_linalg_slogdet(A, *, out=None):
    if out is not None:
        return torch.linalg.slogdet(A, out=out)
    return _elementary_slogdet(A, kind=torch.return_types.linalg_slogdet)


def _elementary_logdet(A):
    sign, logabsdet = _elementary_slogdet(A)
    nan = torch.full_like(logabsdet, float("nan"))
    return torch.where(sign > 0, logabsdet, torch.where(sign == 0, -torch.inf, nan))


def _elementary_solve(A, B, *, left=True, out=None):
    vector = B.dim() == 1 or (B.dim() == A.dim() - 1 and B.shape == A.shape[:-1])
    if out is not None or (not left and vector):
        # torch's own: into the buffer; and its error for a vector right-hand side of XA = B
        return torch.linalg.solve(A, B, left=left, out=out)
    if not left:  # X A = B  <=>  A^T X^T = B^T
        return _elementary_solve(A.mT, B.mT).mT
    LU, pivots = torch.linalg.lu_factor(A)
    if vector:
        return torch.linalg.lu_solve(LU, pivots, B.unsqueeze(-1)).squeeze(-1)
    return torch.linalg.lu_solve(LU, pivots, B)


def _elementary_solve_ex(A, B, *, left=True, check_errors=False, out=None):
    if out is not None:
        return torch.linalg.solve_ex(A, B, left=left, check_errors=check_errors, out=out)
    result = _elementary_solve(A, B, left=left)
    info = torch.zeros(A.shape[:-2], dtype=torch.int32, device=A.device)
    return torch.return_types.linalg_solve_ex((result, info))


def _elementary_glu(input, dim=-1):
    a, b = input.chunk(2, dim=dim)
    return a * torch.sigmoid(b)


# torch 2.13's nested forward-mode derivatives (second derivatives by jvp of jvp) are wrong
# for these, measured against finite differences of the first derivative: layer_norm 1.1,
# instance_norm 0.47, det 1.4, slogdet and logdet 1.0, linalg.solve 0.5 (relative); glu has
# none (NotImplementedError). Their elementary forms (LU factors and lu_solve for the
# linear algebra) are right to finite-difference accuracy (about 1e-8).
_ELEMENTARY = {
    F.layer_norm: _elementary_layer_norm,
    torch.layer_norm: _elementary_layer_norm,
    F.instance_norm: _elementary_instance_norm,
    torch.instance_norm: _torch_instance_norm,
    torch.linalg.det: _elementary_det,
    torch.det: _elementary_det,
    torch.linalg.slogdet: _elementary_linalg_slogdet,
    torch.slogdet: _elementary_slogdet,
    torch.logdet: _elementary_logdet,
    torch.linalg.solve: _elementary_solve,
    torch.linalg.solve_ex: _elementary_solve_ex,
    F.glu: _elementary_glu,
}


class _ElementaryOps(torch.overrides.TorchFunctionMode):
    """The operations of :data:`_ELEMENTARY` in elementary operations wherever a decoder
    calls them (as functions or tensor methods) on the ``torch.func`` path: torch's own
    forward-mode derivatives of them give wrong second derivatives when nested."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        elementary = _ELEMENTARY.get(func)
        if elementary is None and getattr(func, "__name__", None) in _ELEMENTARY_METHODS:
            elementary = _ELEMENTARY_METHODS[func.__name__]
        if elementary is not None:
            return elementary(*args, **kwargs)
        return func(*args, **kwargs)


# Tensor methods: ``A.det()``, ``A.logdet()``, ``A.slogdet()``.
_ELEMENTARY_METHODS = {"det": _elementary_det, "logdet": _elementary_logdet, "slogdet": _elementary_slogdet}


def generic(fn: Callable[[Tensor], Tensor], jet: Jet) -> Jet:
    """The jet of ``fn`` by ``torch.func``: any differentiable callable ``(n, *S) -> (n, *S')``."""
    with _ElementaryOps():
        return _generic(fn, jet)


def _generic(fn: Callable[[Tensor], Tensor], jet: Jet) -> Jet:
    x, first = jet.value, jet.first
    if jet.second is None:
        value, out_first = vmap(lambda t: jvp(fn, (x,), (t,)), out_dims=(None, 0))(first)
        return jet.replace(value, out_first, None)
    if jet.many_pairs:  # one pair at a time: this path is the slow fallback anyway
        singles = [
            generic(fn, Jet(x, first, second, (int(a), int(b))))
            for a, b, second in zip(*jet.pair, jet.second, strict=True)
        ]
        return jet.replace(singles[0].value, singles[0].first, torch.stack([out.second for out in singles]))
    a, b = jet.pair
    # Outer tangents: the k directions and the incoming second derivative; the inner
    # tangent t_b gives d^2 fn[t, t_b] alongside d fn[t].
    tangents = torch.cat([first, jet.second[None]], dim=0)
    inner = first[b]
    (value, _), (out_first, mixed) = vmap(
        lambda t: jvp(lambda y: jvp(fn, (y,), (inner,)), (x,), (t,)), out_dims=((None, None), (0, 0))
    )(tangents)
    k = first.shape[0]
    return jet.replace(value, out_first[:k], mixed[a] + out_first[k])


# ------------------------------------------------------------------ elementwise
def _elementwise(jet: Jet, s0: Tensor, s1: Tensor, s2: Tensor | None) -> Jet:
    """Chain rule for ``y = s(x)`` with ``s0, s1, s2 = s(x), s'(x), s''(x)``."""
    first = s1 * jet.first
    if jet.second is None:
        return jet.replace(s0, first, None)
    a, b = jet.pair
    second = s1 * jet.second
    if s2 is not None and jet.many_pairs:
        # s2 times the k first derivatives once, shared by the P pairs; one product per
        # pair on views (indexing with the pair tensors copies (P, n, *S) twice: 6x slower).
        weighted = s2 * jet.first
        for p, (i, j) in enumerate(zip(a.tolist(), b.tolist())):
            second[p].addcmul_(weighted[i], jet.first[j])
    elif s2 is not None:
        second.addcmul_(s2 * jet.first[a], jet.first[b])
    return jet.replace(s0, first, second)


def _tanh(module, jet):
    t = torch.tanh(jet.value)
    s1 = 1 - t * t
    return _elementwise(jet, t, s1, -2 * t * s1)


def _sigmoid(module, jet):
    s = torch.sigmoid(jet.value)
    s1 = s * (1 - s)
    return _elementwise(jet, s, s1, s1 * (1 - 2 * s))


def _softplus(module: nn.Softplus, jet):
    x, beta = jet.value, module.beta
    linear = beta * x > module.threshold  # where torch's softplus returns x itself
    s = torch.sigmoid(beta * x)
    s1 = torch.where(linear, torch.ones_like(s), s)
    s2 = torch.where(linear, torch.zeros_like(s), beta * s * (1 - s))
    return _elementwise(jet, F.softplus(x, beta, module.threshold), s1, s2)


def _relu(module, jet):
    x = jet.value
    return _elementwise(jet, F.relu(x), (x > 0).to(x.dtype), None)


def _leaky_relu(module: nn.LeakyReLU, jet):
    x = jet.value
    s1 = torch.where(x > 0, torch.ones_like(x), torch.full_like(x, module.negative_slope))
    return _elementwise(jet, F.leaky_relu(x, module.negative_slope), s1, None)


def _elu(module: nn.ELU, jet):
    x, alpha = jet.value, module.alpha
    e = alpha * torch.exp(torch.clamp(x, max=0))
    positive = x > 0
    s1 = torch.where(positive, torch.ones_like(x), e)
    s2 = torch.where(positive, torch.zeros_like(x), e)
    return _elementwise(jet, F.elu(x, alpha), s1, s2)


def _silu(module, jet):
    x = jet.value
    s = torch.sigmoid(x)
    ds = s * (1 - s)
    return _elementwise(jet, x * s, s + x * ds, ds * (2 + x * (1 - 2 * s)))


def _gelu(module: nn.GELU, jet):
    if module.approximate != "none":
        return generic(module, jet)
    x = jet.value
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return _elementwise(jet, x * cdf, cdf + x * pdf, pdf * (2 - x * x))


def _identity(module, jet):
    return jet


# ------------------------------------------------------------------ linear layers
def _linear_map(jet: Jet, value: Tensor, linear_part: Callable[[Tensor], Tensor]) -> Jet:
    """An affine layer: derivatives go through its linear part only."""
    k = jet.first.shape[0]
    first = _unrows(linear_part(_rows(jet.first)), k)
    second = jet.second
    if second is not None:
        second = _unrows(linear_part(_rows(second)), len(second)) if jet.many_pairs else linear_part(second)
    return jet.replace(value, first, second)


def _linear(module: nn.Linear, jet, params):
    weight, bias = params["weight"], params.get("bias")
    # F.linear acts on the last axis: the (k, n) leading axes need no reshaping.
    first = F.linear(jet.first, weight)
    second = None if jet.second is None else F.linear(jet.second, weight)
    return jet.replace(F.linear(jet.value, weight, bias), first, second)


def _conv(module, jet, params):
    weight, bias = params["weight"], params.get("bias")
    return _linear_map(
        jet, module._conv_forward(jet.value, weight, bias), lambda x: module._conv_forward(x, weight, None)
    )


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, jet, params):
    if module.running_mean is None:  # normalizes with batch statistics: not row-wise
        return None
    mean, var = params["running_mean"], params["running_var"]
    scale = torch.rsqrt(var + module.eps)
    if module.affine:
        scale = scale * params["weight"]
        shift = params["bias"] - mean * scale
    else:
        shift = -mean * scale
    shape = (1, -1) + (1,) * (jet.value.dim() - 2)
    scale, shift = scale.reshape(shape), shift.reshape(shape)
    return _linear_map(jet, jet.value * scale + shift, lambda x: x * scale)


def _layer_norm(module: nn.LayerNorm, jet, params):
    """In elementary operations (:class:`_ElementaryOps`), without ``functional_call``."""
    weight, bias = params.get("weight"), params.get("bias")
    return generic(lambda x: _elementary_layer_norm(x, module.normalized_shape, weight, bias, module.eps), jet)


def _reshaping(module, jet, params):
    return _linear_map(jet, module(jet.value), module)


_ELEMENTWISE = {
    nn.Tanh: _tanh,
    nn.Sigmoid: _sigmoid,
    nn.Softplus: _softplus,
    nn.ReLU: _relu,
    nn.LeakyReLU: _leaky_relu,
    nn.ELU: _elu,
    nn.SiLU: _silu,
    nn.GELU: _gelu,
    nn.Identity: _identity,
    nn.Dropout: _identity,  # geometry runs in eval mode
    nn.AlphaDropout: _identity,
}

_WITH_PARAMETERS = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
    nn.LayerNorm: _layer_norm,
    nn.Flatten: _reshaping,
    nn.Unflatten: _reshaping,
}


# torch.func.functional_call swaps the given tensors into the module for the length of a call,
# and the geometry sets eval mode on the module itself: two threads sharing a module (or a
# submodule), one in float32 and one in float64, would run on each other's parameters.
_MODULE_LOCK = threading.RLock()
# Outermost acquisitions of the lock so far, and this thread's nesting depth in it: nothing
# that the lock guards changes during one outermost hold (see lock_hold).
_HOLDS = [0]
_DEPTH = threading.local()


def _new_module_lock() -> None:
    # A process forked while another thread held the lock would wait for it forever.
    global _MODULE_LOCK, _DEPTH
    _MODULE_LOCK = threading.RLock()
    _DEPTH = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_module_lock)


@contextlib.contextmanager
def module_lock():
    """Held while modules run with swapped-in tensors, read their parameters or set their
    mode: one thread at a time, process-wide (re-entrant)."""
    with _MODULE_LOCK:
        depth = getattr(_DEPTH, "value", 0)
        if depth == 0:
            _HOLDS[0] += 1
        _DEPTH.value = depth + 1
        try:
            yield
        finally:
            _DEPTH.value = depth


def lock_hold() -> int:
    """The number of the current outermost hold of :func:`module_lock` (call while holding
    it): a module's attributes checked in this hold need no second check in it (one decoder
    pass checks its traced ``forward`` once, see :mod:`~pullback_manifold.traced`)."""
    return _HOLDS[0]


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks or pre-hooks (its own or global ones),
    which a closed-form rule for its layer would not apply. Old-style ``weight_norm`` and
    ``spectral_norm`` are pre-hooks too."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module_globals._global_forward_hooks
        or module_globals._global_forward_pre_hooks
    )


def has_rule(module: nn.Module) -> bool:
    """Whether :func:`module_jet` propagates through ``module`` by a rule of its own (or its
    hooks), without tracing its ``forward``."""
    kind = type(module)
    return (
        kind is nn.Sequential
        or kind in _ELEMENTWISE
        or kind in _WITH_PARAMETERS
        or callable(getattr(module, "jet_rule", None))
        or has_hooks(module)
    )


def module_jet(module: nn.Module, state: dict[str, Tensor], jet: Jet, prefix: str = "") -> Jet:
    """Propagate ``jet`` through ``module`` evaluated with the tensors ``state``.

    ``state`` maps the names of ``module.named_parameters()`` and
    ``named_buffers()`` (after ``prefix``) to the tensors to use, as
    :func:`torch.func.functional_call` does. The module must be in eval mode.
    """
    kind = type(module)
    if has_hooks(module):  # the rules below would skip them; a call runs them
        local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        # A hook may store tensors on the module (old-style weight_norm sets .weight): made
        # inside torch.func's transform, they must not outlive it there.
        attributes = [(m, {k: v for k, v in vars(m).items() if isinstance(v, Tensor)}) for m in module.modules()]
        try:
            return generic(lambda x: functional_call(module, local, (x,)), jet)
        except (NotImplementedError, RuntimeError) as err:
            raise DecoderError(
                f"cannot differentiate {type(module).__name__} with its forward hooks ({err}). Old-style "
                "torch.nn.utils.weight_norm and spectral_norm are such hooks: use "
                "torch.nn.utils.parametrizations.weight_norm / spectral_norm instead."
            ) from err
        finally:
            for m, tensors in attributes:
                vars(m).update(tensors)
    if kind is nn.Sequential:
        # Not named_children(): it skips a module that appears twice, which forward() runs twice.
        for name, child in module._modules.items():
            jet = module_jet(child, state, jet, f"{prefix}{name}.")
        return jet
    if kind in _ELEMENTWISE:
        return _ELEMENTWISE[kind](module, jet)
    local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    rule = getattr(module, "jet_rule", None)
    if callable(rule):  # a module's own closed-form derivatives (e.g. RBFPrecision)
        return rule(jet, local)
    if kind in _WITH_PARAMETERS:
        out = _WITH_PARAMETERS[kind](module, jet, local)
        if out is not None:
            return out
    else:
        from .traced import traced_jet  # it builds on this module's rules

        out = traced_jet(module, local, jet)
        if out is not None:
            return out
    return generic(lambda x: functional_call(module, local, (x,)), jet)


def propagate(fn, jet: Jet) -> Jet:
    """The jet of ``fn`` at ``jet``: an object with a ``jet`` method, an ``nn.Module``, or any callable."""
    method = getattr(fn, "jet", None)
    if callable(method):
        return method(jet)
    if isinstance(fn, nn.Module):
        from .traced import new_epoch

        new_epoch()  # a public call: traces that may alias have their values checked again
        with module_lock():
            state = dict(fn.named_parameters(remove_duplicate=False))  # every name of a tied weight
            state.update(fn.named_buffers(remove_duplicate=False))
            return module_jet(fn, state, jet)
    return generic(fn, jet)


# ------------------------------------------------------------------ inner products
def stacked_gram(jet: Jet) -> Tensor:
    """Inner products of ``[first_1, ..., first_k, second]`` per row: ``(n, m, m)``, ``m = k + 1``
    (``k`` without a second derivative). All the metric needs: ``G`` and ``J^T d^2 f``."""
    vectors = jet.derivatives()
    m, n = vectors.shape[:2]
    vectors = vectors.reshape(m, n, math.prod(vectors.shape[2:])).transpose(0, 1)  # (n, m, D); explicit D for n = 0
    return vectors @ vectors.transpose(-1, -2)


# Layers after the last Linear that leave inner products unchanged.
_ISOMETRIC_TAIL = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.AlphaDropout)


@dataclass(frozen=True)
class OutputLayer:
    """A module's widening output layer ``W h + b`` (an ``nn.Linear`` with more outputs than
    inputs, followed by reshapes only): the module is ``f = W h + b``.

    Attributes
    ----------
    name : str
        The layer's name in the module (its weight is ``name + ".weight"`` in a state).
    index : int, optional
        Its position in an ``nn.Sequential``; None in a traced ``forward``
        (:func:`~pullback_manifold.traced.output_layer`).
    """

    name: str
    index: int | None = None


def wide_output_layer(module: nn.Module) -> OutputLayer | None:
    """The final ``nn.Linear`` of a module when it widens (``out > in``) and only reshapes
    follow it (an ``nn.Sequential``, or a traced ``forward``); else None. Its inner products
    are cheaper in its input space."""
    if type(module) is not nn.Sequential:
        if has_rule(module):
            return None
        from .traced import output_layer  # it builds on this module's rules

        name = output_layer(module)
        return None if name is None else OutputLayer(name)
    if any(has_hooks(m) for m in module.modules()):
        return None
    children = list(module._modules.items())
    for index in range(len(children) - 1, -1, -1):
        name, child = children[index]
        if type(child) is nn.Linear:
            return OutputLayer(name, index) if child.out_features > child.in_features else None
        if type(child) not in _ISOMETRIC_TAIL:
            return None
    return None


def head_jet(module: nn.Module, state: dict[str, Tensor], jet: Jet | Tensor, last: OutputLayer) -> Jet | Tensor | None:
    """The jet (or, given points, the value) of the input ``h`` of a module's output layer
    ``last``; None where a traced ``forward`` no longer gives it (then the whole module runs)."""
    if last.index is None:
        from .traced import head

        return head(module, state, jet, last.name)
    for name, child in list(module._modules.items())[: last.index]:
        prefix = f"{name}."
        if isinstance(jet, Jet):
            jet = module_jet(child, state, jet, prefix)
        else:
            local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            jet = functional_call(child, local, (jet,))
    return jet


def sequential_gram(
    module: nn.Module, state: dict[str, Tensor], jet: Jet, last: OutputLayer, weight_gram: Tensor
) -> Tensor | None:
    """:func:`stacked_gram` of a module whose output layer ``W x + b`` widens:
    ``<W p, W q> = p^T (W^T W) q``, so the jet stops before ``W`` (for a decoder to
    images, the output layer is most of the cost). None where :func:`head_jet` is None."""
    jet = head_jet(module, state, jet, last)
    if jet is None:
        return None
    vectors = jet.derivatives().transpose(0, 1)  # (n, m, ..., H)
    if vectors.dim() == 3:
        return vectors @ weight_gram @ vectors.transpose(-1, -2)
    vectors = vectors.reshape(*vectors.shape[:2], -1, vectors.shape[-1])  # Linear on the last axis of (C, H)
    return torch.einsum("nach,hg,nbcg->nab", vectors, weight_gram, vectors)
