"""Jets through a custom module's traced forward, against torch.func's nested JVPs of the same module."""

import pytest
import torch
import torch.nn.functional as F
from test_jets import _check
from torch import nn

from pullback_manifold import GaussianDecoder, PullbackManifold, traced
from pullback_manifold import decoders as decoders_module
from pullback_manifold import jets as jets_module
from pullback_manifold.decoders import as_decoder
from pullback_manifold.geometry import embedding_jet

F64 = torch.float64


class Wrapper(nn.Module):
    """The usual way to write a decoder: a class whose forward calls a Sequential."""

    def __init__(self, d=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 12), nn.Softplus())

    def forward(self, z):
        return torch.sigmoid(self.net(z)).view(z.shape[0], 3, 4)


class Inner(nn.Module):
    """A custom submodule: traced through, its parameter read by get_attr."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3) / 2)

    def forward(self, z):
        return F.softplus(F.linear(z, self.weight), beta=2.0, threshold=1.0) + 0.5


class Everything(nn.Module):
    """One of each operation the tracer has a rule for."""

    def __init__(self, d=3):
        super().__init__()
        self.fc = nn.Linear(d, 12)
        self.inner = Inner()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 12))
        self.matrix = nn.Parameter(torch.randn(12, 5) / 3)
        self.dropout = 0.25

    def forward(self, z):
        h = torch.tanh(self.fc(z)) * self.scale - 0.1  # jet * buffer, jet - constant
        a, b = h.chunk(2, dim=-1)  # tuple of jets
        g = self.inner(z)  # (n, 6)
        prod = a * g / (1.5 + b.pow(2))  # jet * jet, jet / jet, pow
        mixed = torch.cat([prod.exp(), torch.sin(b) + torch.cos(a), F.elu(a - b, alpha=0.7)], dim=1)  # (n, 18)
        mixed = F.dropout(mixed, p=self.dropout, training=self.training)
        unary = torch.stack([F.silu(g), F.gelu(g), F.leaky_relu(g, 0.2), torch.sqrt(1 + g * g), torch.log(g)], dim=-1)
        pooled = unary.sum(-1) + unary.mean(dim=-1, keepdim=False)  # (n, 6)
        projected = h @ self.matrix + 2 / (1 + pooled.square().sum(-1, keepdim=True))  # const / jet
        residual = torch.add(projected, pooled[:, :5], alpha=0.5) - torch.rsqrt(1 + g[:, 1:].expand_as(projected) ** 2)
        out = torch.cat([mixed, residual, -torch.relu(residual) + 1], dim=1)
        return out.reshape(-1, 4, 7).transpose(1, 2).flatten(1)


class NoRule(nn.Module):
    """An operation without a rule of one jet (torch.func differentiates it alone) and
    tanh-approximate gelu (its rule declines)."""

    def __init__(self, d=3):
        super().__init__()
        self.fc = nn.Linear(d, 8)

    def forward(self, z):
        h = self.fc(z)
        return torch.atan(h) + F.gelu(h, approximate="tanh") + torch.special.erf(h).T.T


class Branching(nn.Module):
    """Control flow on tensor values: cannot be traced."""

    def __init__(self, d=3):
        super().__init__()
        self.fc = nn.Linear(d, 8)

    def forward(self, z):
        h = self.fc(z)
        return torch.tanh(h) if h.sum() > 0 else torch.sigmoid(h)


class InPlace(nn.Module):
    """``h += 1``: tracing records ``h = h + 1``, the same values here."""

    def __init__(self, d=3):
        super().__init__()
        self.fc = nn.Linear(d, 8)

    def forward(self, z):
        h = torch.tanh(self.fc(z))
        h += 1
        return h * h


class Aliased(InPlace):
    """``h += 1`` seen through another name: the trace computes other values, torch.func
    differentiates the module."""

    def forward(self, z):
        h = torch.tanh(self.fc(z))
        g = h
        h += 1
        return g * h


class InPlaceMethod(InPlace):
    """An in-place method: torch.func differentiates the module."""

    def forward(self, z):
        h = torch.tanh(self.fc(z))
        return h.mul_(2) + 1


class TwoJets(nn.Module):
    """An operation of two jets without a rule."""

    def __init__(self, d=3):
        super().__init__()
        self.fc, self.gc = nn.Linear(d, 8), nn.Linear(d, 8)

    def forward(self, z):
        return torch.atan2(self.fc(z), 2 + torch.tanh(self.gc(z)))


class Flagged(nn.Module):
    """forward branches on a plain attribute: the trace must follow it."""

    def __init__(self, d=3):
        super().__init__()
        self.fc = nn.Linear(d, 8)
        self.squash = True

    def forward(self, z):
        h = self.fc(z)
        return torch.sigmoid(h) if self.squash else torch.exp(h)


def _refuse(fn, jet):
    raise AssertionError(f"torch.func used for {fn}")


@pytest.mark.parametrize(
    "module", [Wrapper, Everything, NoRule, Branching, InPlace, Aliased, InPlaceMethod, TwoJets, Flagged]
)
def test_traced_jet_matches_nested_jvp(module):
    torch.manual_seed(0)
    net = module()
    _check(as_decoder(net))
    _check(as_decoder(net), pair=None)


def _traced(net) -> bool:
    """Whether the tracer interprets the module (in eval mode, as the geometry runs it)."""
    net = net.double().eval()
    z = torch.randn(4, 3, dtype=F64)
    state = dict(net.named_parameters()) | dict(net.named_buffers())
    jet = jets_module.Jet(z, torch.eye(3, dtype=F64)[:, None].expand(3, 4, 3), torch.zeros_like(z), (0, 1))
    return traced.traced_jet(net, state, jet) is not None


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (Wrapper, True),
        (Everything, True),
        (NoRule, True),
        (Branching, False),
        (InPlace, True),
        (Aliased, False),
        (InPlaceMethod, False),
        (TwoJets, False),
    ],
)
def test_which_modules_are_traced(module, expected):
    torch.manual_seed(0)
    assert _traced(module()) is expected


def test_whole_module_never_reaches_torch_func(monkeypatch):
    """Where every operation has a rule, nothing runs through torch.func (the comparisons
    above would also pass with the fallback)."""
    monkeypatch.setattr(jets_module, "generic", _refuse)
    torch.manual_seed(0)
    decoder = GaussianDecoder(Wrapper(), nn.Sequential(Everything(), nn.Linear(28, 12), nn.Softplus()))
    z = torch.randn(5, 3, dtype=F64)
    space = PullbackManifold(decoder, dim=3)
    G = space.metric.metric_matrix(z)
    assert G.shape == (5, 3, 3)
    assert space.metric.geodesic_acceleration(z, z).shape == (5, 3)


def test_trace_follows_a_changed_flag_and_a_swapped_layer():
    torch.manual_seed(0)
    net = Flagged()
    _check(as_decoder(net))
    net.squash = False  # a plain attribute forward branches on: traced again
    _check(as_decoder(net))
    net.fc = nn.Linear(3, 8)  # a new submodule: read when the jet runs
    _check(as_decoder(net))


def test_forward_assigned_on_the_instance_is_not_traced():
    torch.manual_seed(0)
    net = Wrapper()
    net.forward = lambda z: torch.exp(net.net(z))  # fx would trace the class's forward
    _check(as_decoder(net))


def test_energy_log_of_a_custom_module_equals_the_sequential_one(monkeypatch):
    """The same network as a Sequential and as a class: the same logs, to the solver's
    tolerance (the Sequential's chords are computed in a compact form, 50 -> 32 outputs)."""
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Softplus(), nn.Linear(32, 50))

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = sequential[0], sequential[2], sequential[4]

        def forward(self, z):
            return self.c(F.softplus(self.b(torch.tanh(self.a(z)))))

    z0, z1 = torch.randn(2, 6, 2, dtype=F64)
    monkeypatch.setattr(jets_module, "generic", _refuse)  # the custom module's jets are traced
    results = [PullbackManifold(net, dim=2).metric.solve_log(z1, z0, method="energy") for net in (sequential, Custom())]
    assert results[0].converged.all() and results[1].converged.all()
    torch.testing.assert_close(results[1].tangent_vec, results[0].tangent_vec, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ review regressions
class InPlaceFunction(InPlace):
    """In-place functions (``torch.sigmoid_``, ``F.elu_``): torch.func differentiates the module."""

    def forward(self, z):
        h = self.fc(z)
        return F.elu_(h) + torch.sigmoid_(self.fc(z))


class Configured(nn.Module):
    """forward reads a tuple, a function and a dict held as attributes."""

    def __init__(self, d=3):
        super().__init__()
        self.fc = nn.Linear(d, 6)
        self.shape, self.act, self.cfg = (2, 3), torch.tanh, {"scale": 1.0}

    def forward(self, z):
        return self.act(self.fc(z)).reshape(-1, *self.shape).transpose(1, 2).flatten(1) * self.cfg["scale"]


class Divided(nn.Module):
    """Division by an integer buffer and a float32 constant (divided as torch divides)."""

    def __init__(self, d=3):
        super().__init__()
        self.fc = nn.Linear(d, 5)
        self.register_buffer("count", torch.tensor([3, 5, 7, 9, 11]))

    def forward(self, z):
        return torch.tanh(self.fc(z)) / self.count + torch.sigmoid(self.fc(z)) / torch.tensor(3.0)


class AliasedOffset(nn.Module):
    """Aliasing that the value check cannot see while the buffer is zero."""

    def __init__(self, d=3):
        super().__init__()
        self.fc = nn.Linear(d, 5)
        self.register_buffer("offset", torch.zeros(5))

    def forward(self, z):
        h = torch.tanh(self.fc(z))
        g = h
        h += self.offset
        return g * h


class Powers(nn.Module):
    """Exponents 0 and 1 at exact zeros (ReLU): no 0 * inf."""

    def __init__(self, d=3):
        super().__init__()
        self.fc = nn.Linear(d, 6)

    def forward(self, z):
        h = F.relu(self.fc(z))
        return torch.cat((h**1, h**0, h**3), axis=1)  # keyword form of cat's dim


class Counting(Wrapper):
    """forward changes an attribute at every call."""

    calls = 0

    def forward(self, z):
        self.calls += 1
        return super().forward(z)


@pytest.mark.parametrize("module", [InPlaceFunction, Configured, Divided, AliasedOffset, Powers, Counting])
def test_review_cases_match_nested_jvp(module):
    torch.manual_seed(0)
    net = module()
    _check(as_decoder(net))


@pytest.mark.parametrize(("module", "expected"), [(InPlaceFunction, False), (Divided, True), (Powers, True)])
def test_review_cases_traced_or_not(module, expected):
    torch.manual_seed(0)
    assert _traced(module()) is expected


def test_trace_follows_changed_containers_functions_and_buffers():
    torch.manual_seed(0)
    net = Configured()
    _check(as_decoder(net))
    net.shape = (3, 2)
    _check(as_decoder(net))
    net.act = torch.sigmoid
    _check(as_decoder(net))
    net.cfg["scale"] = 5.0
    _check(as_decoder(net))
    aliased = AliasedOffset()
    _check(as_decoder(aliased))  # traced: the same values while the offset is zero
    aliased.offset.fill_(0.5)  # a new state: its values are checked again
    _check(as_decoder(aliased))


def test_float32_first_call_then_float64_is_exact():
    """Values checked at a float32 call do not make float64 jets inexact."""
    torch.manual_seed(0)
    net = Divided()
    decoder = as_decoder(net)
    z = torch.randn(6, 3)
    decoder.prepare(torch.float32, z.device)
    embedding_jet(decoder, z, torch.eye(3)[:, None].expand(3, 6, 3), (0, 1))
    _check(decoder)


def test_a_user_error_does_not_turn_tracing_off():
    torch.manual_seed(0)
    net = Wrapper()
    decoder = as_decoder(net)
    z = torch.randn(4, 2, dtype=F64)  # the wrong latent dimension
    decoder.prepare(F64, z.device)
    with pytest.raises(Exception):  # noqa: B017 -- whatever torch raises for the shape mismatch
        embedding_jet(decoder, z, torch.eye(2, dtype=F64)[:, None].expand(2, 4, 2), (0, 1))
    assert _traced(net)


# ------------------------------------------------------------------ widening output layer
class ImageDecoder(nn.Module):
    """A class ending in a widening nn.Linear and a reshape: compacted like a Sequential."""

    def __init__(self, d=3, width=8, pixels=40):
        super().__init__()
        self.hidden = nn.Linear(d, width)
        self.out = nn.Linear(width, pixels)

    def forward(self, z):
        return self.out(torch.tanh(self.hidden(z))).view(z.shape[0], 4, -1)


class Squashed(ImageDecoder):
    def forward(self, z):
        return torch.sigmoid(super().forward(z))


class Residual(ImageDecoder):
    def forward(self, z):
        return self.out(torch.tanh(self.hidden(z))) + z.sum(-1, keepdim=True)


class UsedTwice(ImageDecoder):
    def forward(self, z):
        y = self.out(torch.tanh(self.hidden(z)))
        return y * y


class AliasedHead(ImageDecoder):
    """Aliasing before the output layer, invisible while the offset is zero."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.zeros(8))

    def forward(self, z):
        h = torch.tanh(self.hidden(z))
        g = h
        h += self.offset
        return self.out(g * h)


def _compare_compact(decoder, d=3):
    """The compact embedding keeps chords and inner products of derivatives."""
    from pullback_manifold.jets import stacked_gram

    compact = decoder.compact()
    a, b = torch.randn(2, 6, d, dtype=F64)
    decoder.prepare(F64, a.device)
    full = (decoder(a) - decoder(b)).norm(dim=-1)
    torch.testing.assert_close((compact(a) - compact(b)).norm(dim=-1), full, rtol=1e-12, atol=0)
    directions = torch.cat([torch.eye(d, dtype=F64)[:, None].expand(d, 6, d), torch.randn(2, 6, d, dtype=F64)])
    for pair in [None, (3, 4), (torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))]:
        fast = stacked_gram(embedding_jet(compact, a, directions, pair))
        slow = stacked_gram(embedding_jet(decoder, a, directions, pair))
        torch.testing.assert_close(fast, slow, rtol=1e-11, atol=1e-12 * slow.abs().max().item())
    space = PullbackManifold(decoder, dim=d)
    G = space.metric.metric_matrix(a)
    J = torch.func.vmap(torch.func.jacfwd(lambda x: decoder(x[None])[0]))(a)  # forward mode: in-place ops too
    torch.testing.assert_close(G, J.transpose(-1, -2) @ J, rtol=1e-11, atol=1e-12)
    return compact


def test_class_with_a_widening_output_layer_is_compacted():
    torch.manual_seed(0)
    decoder = as_decoder(ImageDecoder())
    compact = _compare_compact(decoder)
    assert compact is not decoder
    assert compact(torch.randn(5, 3, dtype=F64)).shape == (5, 8)  # R h, not the 40 pixels
    gaussian = GaussianDecoder(ImageDecoder(), nn.Sequential(nn.Linear(3, 40), nn.Softplus()))
    assert gaussian.compact() is not gaussian
    _compare_compact(gaussian)


@pytest.mark.parametrize("module", [Squashed, Residual, UsedTwice])
def test_class_whose_output_is_not_the_layers_is_not_compacted(module):
    torch.manual_seed(0)
    decoder = as_decoder(module())
    assert decoder.compact() is decoder
    narrowing = as_decoder(ImageDecoder(width=50, pixels=40))
    assert narrowing.compact() is narrowing
    hooked = ImageDecoder()
    hooked.out.register_forward_hook(lambda module, inputs, output: 2 * output)
    decoder = as_decoder(hooked)
    assert decoder.compact() is decoder


def test_compact_class_falls_back_to_the_whole_module_when_its_values_change(monkeypatch):
    from pullback_manifold.decoders import _CompactFunction

    calls = []
    whole = _CompactFunction._from_output
    monkeypatch.setattr(_CompactFunction, "_from_output", lambda *args: calls.append(1) or whole(*args))
    torch.manual_seed(0)
    net = AliasedHead()
    decoder = as_decoder(net)
    _compare_compact(decoder)  # through the traced head: the same values while the offset is 0
    assert not calls
    net.offset.fill_(0.5)  # the trace now computes other values: R h from the whole output
    compact = _compare_compact(decoder)
    assert compact is not decoder and calls


def test_energy_log_of_a_compacted_class_equals_the_sequential_one():
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 60))

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = sequential[0], sequential[2]

        def forward(self, z):
            return self.c(torch.tanh(self.a(z))).reshape(-1, 6, 10)

    z0, z1 = torch.randn(2, 5, 2, dtype=F64)
    lengths = []
    for net in (sequential, Custom()):
        space = PullbackManifold(net, dim=2)
        result = space.metric.solve_log(z1, z0, method="energy")
        assert result.converged.all()
        lengths.append(space.metric.norm(result.tangent_vec, z0))
    torch.testing.assert_close(lengths[1], lengths[0], rtol=1e-10, atol=0)


# ------------------------------------------------------------------ methods of modules
class VAE(nn.Module):
    """A VAE as usually written: the decoder is a method, the model float32 and in training mode."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(20, 4)
        self.hidden, self.mean_head, self.std_head = nn.Linear(2, 16), nn.Linear(16, 20), nn.Linear(16, 20)
        self.dropout = nn.Dropout(0.3)

    def decode(self, z):
        return torch.sigmoid(self.mean_head(self.dropout(torch.tanh(self.hidden(z)))))

    def decode_std(self, z):
        return F.softplus(self.std_head(torch.tanh(self.hidden(z)))) + 1e-3

    def forward(self, x):
        return self.decode(self.encoder(x)[:, :2])


def test_a_method_of_a_module_is_cast_evaluated_and_traced(monkeypatch):
    import copy

    torch.manual_seed(0)
    vae = VAE()  # float32, training mode
    z = torch.randn(5, 2, dtype=F64)
    monkeypatch.setattr(jets_module, "generic", _refuse)  # the method's body is traced
    space = PullbackManifold(vae.decode, dim=2)
    G = space.metric.metric_matrix(z)
    assert space.metric.geodesic_acceleration(z, z).shape == (5, 2)
    reference = copy.deepcopy(vae).double().eval()
    J = torch.func.vmap(torch.func.jacfwd(lambda x: reference.decode(x[None])[0]))(z)
    torch.testing.assert_close(G, J.transpose(-1, -2) @ J, rtol=1e-12, atol=1e-14)
    assert vae.training and vae.dropout.training  # its mode is restored
    assert all(p.dtype == torch.float32 and p.grad is None for p in vae.parameters())
    gaussian = PullbackManifold(GaussianDecoder(vae.decode, vae.decode_std), dim=2)
    J_std = torch.func.vmap(torch.func.jacfwd(lambda x: reference.decode_std(x[None])[0]))(z)
    expected = J.transpose(-1, -2) @ J + J_std.transpose(-1, -2) @ J_std
    torch.testing.assert_close(gaussian.metric.metric_matrix(z), expected, rtol=1e-12, atol=1e-14)


def test_a_method_of_another_object_stays_a_plain_callable():
    class Chart:
        def embed(self, z):
            return torch.stack([z[:, 0].cos(), z[:, 0].sin() * z[:, 1]], dim=-1)

    z = torch.randn(4, 2, dtype=F64)
    G = PullbackManifold(Chart().embed, dim=2).metric.metric_matrix(z)
    J = torch.func.vmap(torch.func.jacfwd(lambda x: Chart().embed(x[None])[0]))(z)
    torch.testing.assert_close(G, J.transpose(-1, -2) @ J, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ second review's regressions
class FoldBatch(ImageDecoder):
    """The output layer's input has the batch folded into its first axis: not compacted
    through the trace (the whole output gives R h)."""

    def __init__(self):
        super().__init__(width=8, pixels=40)
        self.out = nn.Linear(4, 20)

    def forward(self, z):
        h = torch.tanh(self.hidden(z)).reshape(-1, 4)  # (2n, 4)
        return self.out(h).view(z.shape[0], -1)  # (n, 40)


class CountingImage(ImageDecoder):
    calls = 0

    def forward(self, z):
        self.calls += 1
        return super().forward(z)


class TiedOutput(nn.Module):
    """The output weight is a parameter registered first under another name."""

    def __init__(self, d=3):
        super().__init__()
        self.table = nn.Parameter(torch.randn(40, 8) / 3)
        self.hidden, self.out = nn.Linear(d, 8), nn.Linear(8, 40)
        self.out.weight = self.table

    def forward(self, z):
        return self.out(torch.tanh(self.hidden(z)))


class SequentialInside(nn.Module):
    """The usual shape: forward calls a Sequential that ends in the widening layer."""

    def __init__(self, d=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 40))

    def forward(self, z):
        return self.net(z).view(-1, 5, 8)


@pytest.mark.parametrize("module", [FoldBatch, CountingImage, TiedOutput, SequentialInside])
def test_compaction_edge_cases_keep_the_geometry(module):
    torch.manual_seed(0)
    _compare_compact(as_decoder(module()))


def test_sequential_inside_a_class_is_compacted_through_the_trace(monkeypatch):
    from pullback_manifold.decoders import _CompactFunction

    monkeypatch.setattr(_CompactFunction, "_from_output", _refuse)
    torch.manual_seed(0)
    decoder = as_decoder(SequentialInside())
    compact = _compare_compact(decoder)
    assert compact(torch.randn(2, 3, dtype=F64)).shape == (2, 8)


def test_hooks_added_after_a_trace_are_applied():
    torch.manual_seed(0)
    net = ImageDecoder().double()
    space = PullbackManifold(net, dim=3)
    a = torch.randn(5, 3, dtype=F64)
    space.metric.metric_matrix(a)
    net.out.register_forward_hook(lambda module, inputs, output: 2 * output)
    net.hidden.register_forward_hook(lambda module, inputs, output: output**2)
    J = torch.func.vmap(torch.func.jacfwd(lambda x: net(x[None]).reshape(-1)))(a)
    torch.testing.assert_close(space.metric.metric_matrix(a), J.transpose(-1, -2) @ J, rtol=1e-12, atol=1e-14)


def test_writes_through_data_are_seen_by_the_value_check():
    torch.manual_seed(0)
    net = AliasedOffset().double()  # float64 at float64 points: the state is the module's own tensors
    space = PullbackManifold(net, dim=3)
    a = torch.randn(5, 3, dtype=F64)
    space.metric.metric_matrix(a)  # traced: the same values while the offset is zero
    net.offset.data.copy_(torch.full((5,), 0.5, dtype=F64))  # no new version, no new tensor
    J = torch.func.vmap(torch.func.jacfwd(lambda x: net(x[None])[0]))(a)
    torch.testing.assert_close(space.metric.metric_matrix(a), J.transpose(-1, -2) @ J, rtol=1e-12, atol=1e-14)


def test_whole_output_fallback_with_a_rank_deficient_output_layer():
    torch.manual_seed(0)
    net = AliasedHead()
    with torch.no_grad():
        net.out.weight[:, 1] = net.out.weight[:, 0]  # rank 7 of 8: R is singular
    net.offset.fill_(0.5)
    compact = _compare_compact(as_decoder(net))
    assert torch.isfinite(compact(torch.randn(3, 3, dtype=F64))).all()


class PairVAE(VAE):
    """decode returns (mean, std), as a Gaussian VAE's often does."""

    def decode_pair(self, z):
        h = torch.tanh(self.hidden(z))
        return self.mean_head(h), F.softplus(self.std_head(h)) + 1e-3


def test_a_module_returning_mean_and_std_is_traced(monkeypatch):
    import copy

    torch.manual_seed(0)
    vae = PairVAE()
    z = torch.randn(5, 2, dtype=F64)
    monkeypatch.setattr(jets_module, "generic", _refuse)
    monkeypatch.setattr("pullback_manifold.decoders.generic", _refuse)  # GaussianDecoder's fallback
    space = PullbackManifold(GaussianDecoder(vae.decode_pair), dim=2)
    G = space.metric.metric_matrix(z)
    reference = copy.deepcopy(vae).double().eval()
    J_mu, J_sigma = (
        torch.func.vmap(torch.func.jacfwd(lambda x, i=i: reference.decode_pair(x[None])[i][0]))(z) for i in (0, 1)
    )
    expected = J_mu.transpose(-1, -2) @ J_mu + J_sigma.transpose(-1, -2) @ J_sigma
    torch.testing.assert_close(G, expected, rtol=1e-12, atol=1e-14)
    result = space.metric.solve_log(z[:3].flip(0), z[:3], method="energy")
    assert result.converged.all()


# ------------------------------------------------------------------ third review's regressions
class Scaled(ImageDecoder):
    scale = 1.0

    def forward(self, z):
        return torch.sigmoid(self.out(torch.tanh(self.hidden(z)))) * self.scale


class AliasedView(AliasedOffset):
    """The old value seen through a view taken before the in-place sum."""

    def forward(self, z):
        h = torch.tanh(self.fc(z))
        g = h[:, :3]
        h += self.offset
        return g * h[:, 2:]


class InPlaceActivation(nn.Module):
    """An in-place activation module whose input is used after it: not traced."""

    def __init__(self, d=3):
        super().__init__()
        self.inp, self.fc = nn.Linear(d, 6), nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)

    def forward(self, z):
        x = self.inp(z)
        return self.fc(self.act(x)) + x


class Pair(nn.Module):
    def __init__(self, d=3):
        super().__init__()
        self.fc = nn.Linear(d, 4)

    def forward(self, z):
        h = self.fc(z)
        return h, h.exp()


def _metric_error(net, z, space=None):
    """Largest error of the metric (of ``space``, else a new one) against forward-mode J^T J."""
    space = space or PullbackManifold(net, dim=z.shape[-1])
    G = space.metric.metric_matrix(z)
    J = torch.func.vmap(torch.func.jacfwd(lambda x: net(x[None]).reshape(-1)))(z)
    return (G - J.transpose(-1, -2) @ J).abs().max().item()


def test_an_attribute_changed_between_direct_calls_is_followed():
    """Without prepare() (a decoder used directly): the trace still follows the attribute."""
    torch.manual_seed(0)
    net = Scaled()
    decoder = as_decoder(net)
    z = torch.randn(4, 3, dtype=F64)
    directions = torch.eye(3, dtype=F64)[:, None].expand(3, 4, 3)
    decoder.prepare(F64, z.device)
    before = embedding_jet(decoder, z, directions).first
    net.scale = 3.0
    torch.testing.assert_close(embedding_jet(decoder, z, directions).first, 3 * before, rtol=1e-12, atol=0)


def test_views_of_an_updated_value_and_in_place_modules_keep_the_geometry():
    torch.manual_seed(0)
    z = torch.randn(6, 3, dtype=F64)
    net = AliasedView().double()  # float64 at float64 points: the same state tensors at every call
    space = PullbackManifold(net, dim=3)
    assert _metric_error(net, z, space) < 1e-12
    net.offset.data.fill_(0.5)  # visible only through the view: a value check at this call
    assert _metric_error(net, z, space) < 1e-12
    relu = InPlaceActivation().double()
    space = PullbackManifold(relu, dim=3)
    with torch.no_grad():
        relu.inp.bias.fill_(10.0)  # every pre-activation positive: ReLU changes nothing here
    assert _metric_error(relu, z, space) < 1e-12
    with torch.no_grad():
        relu.inp.bias.fill_(0.0)
    assert _metric_error(relu, z, space) < 1e-12
    assert not _traced(InPlaceActivation())


def test_weights_tied_after_a_trace_and_tied_sequential_weights():
    torch.manual_seed(0)
    z = torch.randn(5, 3, dtype=F64)
    net = TiedOutput().double()
    net.out.weight = nn.Parameter(torch.randn(40, 8, dtype=F64))  # untied first
    space = PullbackManifold(net, dim=3)
    assert _metric_error(net, z, space) < 1e-12
    net.out.weight = net.table  # tied after the trace
    assert _metric_error(net, z, space) < 1e-12
    sequential = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    sequential[4].weight = sequential[2].weight
    assert _metric_error(sequential, z) < 1e-12


def test_a_deterministic_decoder_returning_a_pair_says_to_use_a_gaussian_decoder():
    decoder = as_decoder(Pair())
    z = torch.randn(4, 3, dtype=F64)
    decoder.prepare(F64, z.device)
    with pytest.raises(TypeError, match="GaussianDecoder"):
        embedding_jet(decoder, z, torch.eye(3, dtype=F64)[:, None].expand(3, 4, 3))


# ------------------------------------------------------------------ fourth review's regressions
class AliasedSwap(AliasedOffset):
    """The old value seen through a view (swapaxes) that no list of views named."""

    def forward(self, z):
        h = torch.tanh(self.fc(z))
        g = h.swapaxes(0, 1).swapaxes(0, 1)
        h += self.offset
        return g * h


def test_anything_computed_from_an_updated_value_counts_as_a_later_use():
    torch.manual_seed(0)
    z = torch.randn(6, 3, dtype=F64)
    net = AliasedSwap().double()
    space = PullbackManifold(net, dim=3)
    assert _metric_error(net, z, space) < 1e-12
    net.offset.data.fill_(0.5)
    assert _metric_error(net, z, space) < 1e-12


def test_a_trace_used_twice_per_setting_is_kept():
    """An attribute changed between every two metric passes: traced again each time, not
    abandoned (a check skipped within a lock hold still counts as a use)."""
    from pullback_manifold import traced

    torch.manual_seed(0)
    net = Scaled().double()
    space = PullbackManifold(net, dim=3)
    z = torch.randn(4, 3, dtype=F64)
    for value in range(12):
        net.scale = 1.0 + value
        for _ in range(2):
            space.metric.metric_matrix(z)
    assert traced._GRAPHS[net].graph is not None


class ReadsConfigAndGlobal(nn.Module):
    """Reads a number from a config object and another from a module global: tracing burns
    both in as constants, and the fingerprint sees the object by identity only."""

    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(3, 6)
        self.cfg = cfg

    def forward(self, z):
        return torch.tanh(self.fc(z)) * self.cfg.scale + GLOBAL_SHIFT[0] * z.sum(-1, keepdim=True)


GLOBAL_SHIFT = [0.0]


def test_a_config_object_or_global_read_by_forward_is_not_frozen_in_the_trace():
    """Changed between public calls, they give a fresh space's metric; the module is traced
    again (not left to torch.func)."""
    import types

    torch.manual_seed(0)
    cfg = types.SimpleNamespace(scale=1.0)
    net = ReadsConfigAndGlobal(cfg).double()
    space = PullbackManifold(net, dim=3)
    z = torch.randn(4, 3, dtype=F64)
    space.metric.metric_matrix(z)
    for scale, shift in ((3.0, 0.0), (3.0, 0.7), (0.5, -0.2)):
        cfg.scale, GLOBAL_SHIFT[0] = scale, shift
        J = torch.func.vmap(torch.func.jacfwd(lambda x: net(x[None])[0]))(z)
        torch.testing.assert_close(space.metric.metric_matrix(z), J.transpose(-1, -2) @ J, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(space.metric.dist(z[:2], z[2:]), PullbackManifold(net, dim=3).metric.dist(z[:2], z[2:]))
        assert traced._GRAPHS[net].graph is not None
    GLOBAL_SHIFT[0] = 0.0


# ------------------------------------------------------------------ plain functions
def test_a_plain_function_is_traced_and_follows_its_globals_and_closures(monkeypatch):
    """Its body is traced like a forward (nothing reaches torch.func); a closed-over tensor
    rebound, or updated in place, between public calls is followed (by a new trace, or, where
    the trace may alias as here -- z used after z @ W -- by torch.func from then on)."""
    torch.manual_seed(0)
    weights = {"inner": torch.randn(8, 3, dtype=F64), "outer": torch.randn(5, 8, dtype=F64)}

    def decoder(z):
        return torch.tanh(z @ weights["inner"].T) @ weights["outer"].T + 0.1 * z[:, :1] ** 3

    z = torch.randn(4, 3, dtype=F64)
    space = PullbackManifold(decoder, dim=3)
    for change in (None, "rebind", "in place"):
        if change == "rebind":
            weights["inner"] = 2 * weights["inner"]
        elif change == "in place":
            weights["outer"].mul_(-0.5)
        if change is None:
            monkeypatch.setattr(decoders_module, "generic", _refuse)
        else:
            monkeypatch.undo()
        J = torch.func.vmap(torch.func.jacfwd(lambda x: decoder(x[None])[0]))(z)
        torch.testing.assert_close(space.metric.metric_matrix(z), J.transpose(-1, -2) @ J, rtol=1e-12, atol=1e-14)
        v = z.flip(0)
        # -G^{-1} J^T d^2f[v, v], by torch.func on the function itself
        second = torch.func.vmap(
            lambda x, u: torch.func.jvp(lambda y: torch.func.jvp(lambda w: decoder(w[None])[0], (y,), (u,))[1], (x,), (u,))[1]
        )(z, v)
        expected = -torch.linalg.solve(J.transpose(-1, -2) @ J, (J.transpose(-1, -2) @ second[..., None]))[..., 0]
        torch.testing.assert_close(space.metric.geodesic_acceleration(z, v), expected, rtol=1e-10, atol=1e-12)
