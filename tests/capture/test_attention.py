"""nn.MultiheadAttention: the stepwise twin equals the fused module; spectra equal autograd."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import streamspec
from streamspec.capture.attention import AttentionFamily, StepwiseMultiheadAttention
from streamspec.capture.registry import Capture
from streamspec.testing.reference import masked_loss_gradients
from tests.conftest import relative_errors

E, HEADS = 8, 2

# -- the twin against the fused module -------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One call of an MHA: how its inputs relate, layout, masks, options."""

    inputs: str = "self"  # self (q is k is v) | cross (all differ) | kv (key is value)
    batch_first: bool = True
    key_padding: str | None = None  # bool | float
    mask: str | None = None  # bool2d | float2d | float3d | causal
    is_causal: bool = False
    need_weights: bool = True
    average: bool = True
    unbatched: bool = False
    options: dict = field(default_factory=dict)  # nn.MultiheadAttention keyword arguments


CASES = {
    "self-batch_first-weights": Case(),
    "self-seq_first-no_weights": Case(batch_first=False, need_weights=False),
    "self-padding_bool-mask_bool": Case(key_padding="bool", mask="bool2d"),
    "self-padding_float-mask_float3d-per_head": Case(
        batch_first=False, key_padding="float", mask="float3d", average=False
    ),
    "self-causal_hint-sdpa": Case(mask="causal", is_causal=True, need_weights=False),
    "self-causal_hint-padding-weights": Case(mask="causal", is_causal=True, key_padding="bool"),
    "cross-batch_first-padding": Case(inputs="cross", key_padding="bool"),
    "cross-seq_first-mask_float-no_weights": Case(
        inputs="cross", batch_first=False, mask="float2d", need_weights=False
    ),
    "kv_shared-padding-mask_bool": Case(inputs="kv", key_padding="bool", mask="bool2d"),
    "separate_kdim_vdim": Case(
        inputs="cross", key_padding="bool", options={"kdim": 6, "vdim": 5}, average=False
    ),
    "no_bias": Case(options={"bias": False}, need_weights=False),
    "bias_kv-zero_attn": Case(
        inputs="kv",
        key_padding="float",
        mask="float2d",
        options={"add_bias_kv": True, "add_zero_attn": True},
    ),
    "unbatched-self": Case(unbatched=True, mask="bool2d"),
    "unbatched-cross-seq_first": Case(inputs="cross", batch_first=False, unbatched=True),
}


def make_inputs(case: Case, mha: nn.MultiheadAttention, gen: torch.Generator):
    n, length, src = 3, 5, 4 if case.inputs != "self" else 5

    def seq(t: int, width: int) -> torch.Tensor:
        shape = (
            (t, width) if case.unbatched else (n, t, width) if case.batch_first else (t, n, width)
        )
        return torch.randn(*shape, generator=gen).requires_grad_()

    query = seq(length, E)
    if case.inputs == "self":
        key = value = query
    else:
        key = seq(src, mha.kdim)
        value = key if case.inputs == "kv" else seq(src, mha.vdim)
    kwargs: dict = {"need_weights": case.need_weights, "average_attn_weights": case.average}
    if case.key_padding is not None:
        pad = torch.zeros(n, src, dtype=torch.bool)
        pad[0, -2:] = True  # never a whole row: a fully masked row is NaN in both
        pad[2, -1] = True
        kwargs["key_padding_mask"] = pad if case.key_padding == "bool" else pad.float() * -1e4
    if case.mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length).isinf()
        kwargs["is_causal"] = case.is_causal
    elif case.mask == "bool2d":
        kwargs["attn_mask"] = torch.rand(length, src, generator=gen) < 0.3
        kwargs["attn_mask"][:, 0] = False
    elif case.mask == "float2d":
        kwargs["attn_mask"] = torch.randn(length, src, generator=gen)
    elif case.mask == "float3d":
        kwargs["attn_mask"] = torch.randn(n * HEADS, length, src, generator=gen)
    return query, key, value, kwargs


def twin_of(mha: nn.MultiheadAttention, captures: list[Capture]) -> StepwiseMultiheadAttention:
    twin = AttentionFamily.make_stepwise(
        mha, lambda module, caps: captures.extend(caps), parent=nn.Module(), name="attn"
    )
    assert isinstance(twin, StepwiseMultiheadAttention)
    return twin


def run(module: nn.MultiheadAttention, case: Case, captures: list[Capture]):
    """Forward and backward of one call → output, weights, parameter and input gradients, and
    the gradients of the captured products (``captures`` fills during the call)."""
    query, key, value, kwargs = make_inputs(case, module, torch.Generator().manual_seed(1))
    out, weights = module(query, key, value, **kwargs)
    gen = torch.Generator().manual_seed(2)
    loss = (out * torch.randn(out.shape, generator=gen)).sum()
    if case.need_weights:
        loss = loss + (weights * torch.randn(weights.shape, generator=gen)).sum()
    names, params = zip(*module.named_parameters(), strict=True)
    products = [c.output for c in captures]
    grads = torch.autograd.grad(loss, [*params, query, key, value, *products])
    n = len(params)
    return out, weights, dict(zip(names, grads[:n], strict=True)), grads[n : n + 3], grads[n + 3 :]


def block_of(gradients: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The gradient of the weight, or weight row block, that a capture key names."""
    name, _, block = key.partition(":")
    return gradients[name] if not block else gradients[name].chunk(3)["qkv".index(block)]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_twin_equals_fused_module_and_captures_give_the_gradient(case: Case) -> None:
    torch.manual_seed(0)
    fused = nn.MultiheadAttention(E, HEADS, batch_first=case.batch_first, **case.options)
    if case.options.get("add_bias_kv"):
        nn.init.normal_(fused.bias_k)
        nn.init.normal_(fused.bias_v)
    captures: list[Capture] = []
    twin = twin_of(copy.deepcopy(fused), captures)
    assert twin.state_dict().keys() == fused.state_dict().keys()

    out_f, w_f, params_f, inputs_f, _ = run(fused, case, [])
    out_t, w_t, params_t, inputs_t, adjoints = run(twin, case, captures)
    torch.testing.assert_close(out_t, out_f, atol=1e-5, rtol=1e-5)
    assert (w_t is None) == (w_f is None)
    if w_f is not None:
        torch.testing.assert_close(w_t, w_f, atol=1e-5, rtol=1e-5)
    assert params_t.keys() == params_f.keys()
    for name in params_f:
        torch.testing.assert_close(params_t[name], params_f[name], atol=1e-5, rtol=1e-5)
    for g_t, g_f in zip(inputs_t, inputs_f, strict=True):
        torch.testing.assert_close(g_t, g_f, atol=1e-5, rtol=1e-5)

    # one capture per product, rows samples first, Σ_rows AᵀΔ = the weight's (block's) gradient
    if not twin._qkv_same_embed_dim:
        expected = ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    elif case.inputs == "self":
        expected = ["in_proj_weight"]
    else:
        expected = ["in_proj_weight:q", "in_proj_weight:k", "in_proj_weight:v"]
    assert [c.key for c in captures] == expected
    for cap, grad in zip(captures, adjoints, strict=True):
        rows = cap.activation.rows  # type: ignore[attr-defined]
        assert rows.shape[0] == (1 if case.unbatched else 3)
        gradient = torch.einsum("bti,bto->oi", rows, cap.adjoint(grad))
        torch.testing.assert_close(gradient, block_of(params_t, cap.key), atol=1e-5, rtol=1e-5)


def test_dropout_applies_in_training_only() -> None:
    torch.manual_seed(0)
    twin = twin_of(nn.MultiheadAttention(E, HEADS, dropout=0.5, batch_first=True), [])
    x = torch.randn(3, 5, E, requires_grad=True)
    _, weights = twin(x, x, x, average_attn_weights=False)
    assert (weights == 0).any()
    twin.eval()
    _, weights = twin(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, HEADS, 5))


def test_subclasses_keep_their_type_and_custom_forwards_are_refused() -> None:
    class Plain(nn.MultiheadAttention):
        pass

    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):  # type: ignore[override]
            return super().forward(*args, **kwargs)

    twin = twin_of(Plain(E, HEADS), [])
    assert isinstance(twin, Plain) and type(twin) is type(twin_of(Plain(E, HEADS), []))
    assert AttentionFamily.problems(Plain(E, HEADS)) == []
    assert AttentionFamily.problems(twin) == []
    assert (
        "overrides nn.MultiheadAttention.forward" in AttentionFamily.problems(Custom(E, HEADS))[0]
    )
    odd = nn.MultiheadAttention(E, HEADS)
    odd.out_proj = nn.Identity()  # type: ignore[assignment]
    assert "out_proj is a Identity" in AttentionFamily.problems(odd)[0]
    model = nn.Sequential(Custom(E, HEADS))
    assert any("overrides" in p for p in streamspec.validate(model))


# -- watched models against masked-loss autograd ---------------------------------------------------

GROUPS = ["a", "b"]
RANK = 4


def gradient_reference(
    model: nn.Module, loss_per_sample: torch.Tensor, labels: torch.Tensor, entries: list[str]
) -> dict[str, np.ndarray]:
    """Per entry ``[groups, RANK]``: σ of the group's masked-loss gradient (of the weight's row
    block for ``…:q|k|v`` entries) over ``n_c``, as ``normalize="mean"`` records them."""
    names = sorted({e.partition(":")[0] for e in entries})
    grads = masked_loss_gradients(model, loss_per_sample, labels, len(GROUPS), names=names)
    out = {}
    for entry in entries:
        sigma = np.full((len(GROUPS), RANK), np.nan)
        for c, per_name in enumerate(grads):
            n = int((labels == c).sum())
            if n:
                block = block_of(per_name, entry).double()
                sigma[c] = torch.linalg.svdvals(block)[:RANK].numpy() / n
        out[entry] = sigma
    return out


def activation_reference(rows: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """``[groups, RANK]``: σ of the group's stacked samples-first rows ``[B, T, h]`` / ``√n_c``."""
    sigma = np.full((len(GROUPS), RANK), np.nan)
    for c in range(len(GROUPS)):
        mask = labels == c
        if mask.any():
            a = rows[mask].reshape(-1, rows.shape[-1]).double()
            sigma[c] = torch.linalg.svdvals(a)[:RANK].numpy() / np.sqrt(int(mask.sum()))
    return sigma


def recorded(ds, layer: str, kind: str) -> np.ndarray:
    """``[step, group, rank]`` σ of one layer and kind."""
    return ds["sigma"].sel(layer=layer, kind=kind).values


def assert_matches(got: np.ndarray, exact: np.ndarray, what: str) -> None:
    errors = relative_errors(got, exact)
    assert errors.size and errors.max() <= 1e-2, (what, errors.max())


class EncoderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.layer(x, src_key_padding_mask=padding).mean(dim=1))


def test_encoder_layer_is_watched_like_autograd_and_restored() -> None:
    torch.manual_seed(0)
    model = EncoderNet()
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # created before watch()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.5)
    original = model.layer.self_attn
    keys = list(model.state_dict())
    user_calls: list[int] = []
    original.register_forward_hook(lambda *args: user_calls.append(1))
    packed, out_proj = "layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight"
    entries = [packed, out_proj, "layer.linear1.weight"]
    exact: dict[str, list[np.ndarray]] = {e: [] for e in [*entries, "activation"]}
    gen = torch.Generator().manual_seed(0)
    padding = torch.zeros(8, 5, dtype=torch.bool)
    padding[1, -2:] = True
    padding[6, -1] = True

    with streamspec.watch(model, GROUPS, rank=RANK, live=False) as mon:
        twin = model.layer.self_attn
        assert twin is not original and isinstance(twin, nn.MultiheadAttention)
        assert type(original) is nn.MultiheadAttention
        assert list(model.state_dict()) == keys
        assert packed in mon.layers and out_proj in mon.layers
        assert not any(":" in layer for layer in mon.layers)  # self-attention: packed entry only
        for _ in range(3):
            x = torch.randn(8, 5, 16, generator=gen)
            y = torch.randint(0, 3, (8,), generator=gen)
            labels = torch.tensor([0, 1, 0, 1, -1, 0, 1, 1])
            reference = EncoderNet()
            reference.load_state_dict(model.state_dict())
            losses = F.cross_entropy(reference(x, padding), y, reduction="none") / 8
            for entry, sigma in gradient_reference(reference, losses, labels, entries).items():
                exact[entry].append(sigma)
            exact["activation"].append(activation_reference(x, labels))
            for net, optimizer in ((model, opt), (plain, opt_plain)):
                if net is model:
                    mon.label(labels)
                loss = F.cross_entropy(net(x, padding), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        assert user_calls  # the user's own hook on the original still fires on the twin

        # evaluation under no_grad: the fused module runs, nothing is recorded, no labels needed
        reference = EncoderNet()
        reference.load_state_dict(model.state_dict())
        x = torch.randn(11, 5, 16, generator=gen)
        with torch.no_grad():
            for mode in (False, True):
                model.train(mode)
                reference.train(mode)
                torch.testing.assert_close(model(x), reference(x))
        model.eval()  # left in eval mode when the watch ends
        assert mon.step == 3
        ds = mon.to_xarray()

    assert model.layer.self_attn is original and type(original) is nn.MultiheadAttention
    assert not original.training  # eval() during the watch reached the original
    assert len(original._forward_hooks) == 1 and list(model.state_dict()) == keys
    assert ds.sizes["step"] == 3
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)  # the optimizer updated them
    for entry in entries:
        assert_matches(recorded(ds, entry, "gradient"), np.stack(exact[entry]), entry)
    assert_matches(recorded(ds, packed, "activation"), np.stack(exact["activation"]), "activation")


def test_no_grad_evaluation_takes_the_encoder_layer_fast_path_through_the_twin(monkeypatch) -> None:
    """Without other hooks (under watch() the Linear hooks on linear1/linear2 block this path)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    reference = copy.deepcopy(layer)
    captures: list[Capture] = []
    layer.self_attn = AttentionFamily.make_stepwise(
        layer.self_attn, lambda m, c: captures.extend(c), parent=layer, name="self_attn"
    )
    fast = torch._transformer_encoder_layer_fwd
    calls: list[int] = []
    monkeypatch.setattr(
        torch, "_transformer_encoder_layer_fwd", lambda *a, **k: calls.append(1) or fast(*a, **k)
    )
    x = torch.randn(4, 6, 16)
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[0, -2:] = True
    with torch.no_grad():
        got = layer(x, src_key_padding_mask=padding)
        want = reference(x, src_key_padding_mask=padding)
    assert calls == [1, 1] and not captures
    torch.testing.assert_close(got, want)
    layer.train()
    with torch.no_grad():  # training mode: the twin hands the call to the fused MHA
        torch.testing.assert_close(layer(x), reference.train()(x))
    assert not captures


class BareNet(nn.Module):
    """A sequence-first MHA used for self-attention or, given memory, cross-attention."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS)
        self.head = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if memory is None else memory
        h, _ = self.attn(x, kv, kv, need_weights=False)  # [L, N, E]
        return self.head(h).mean(dim=0)


def test_bare_mha_registers_both_and_fills_what_each_call_uses() -> None:
    """Sequence-first with batch_dim=1; step 0 self-attention, step 1 cross-attention."""
    torch.manual_seed(0)
    model = BareNet()
    packed = "attn.in_proj_weight"
    blocks = [f"{packed}:{b}" for b in "qkv"]
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 1, 0, -1, 0])
    exact: list[dict[str, np.ndarray]] = []
    memories = []
    with streamspec.watch(model, GROUPS, rank=RANK, batch_dim=1, live=False) as mon:
        assert mon.layers == (packed, *blocks, "attn.out_proj.weight", "head.weight")
        for memory in (None, torch.randn(4, 6, E, generator=gen)):
            x = torch.randn(5, 6, E, generator=gen)
            y = torch.randint(0, 3, (6,), generator=gen)
            reference = BareNet()
            reference.load_state_dict(model.state_dict())
            losses = F.cross_entropy(reference(x, memory), y, reduction="none") / 6
            exact.append(
                gradient_reference(
                    reference, losses, labels, [packed, *blocks, "attn.out_proj.weight"]
                )
            )
            memories.append(memory)
            mon.label(labels)
            F.cross_entropy(model(x, memory), y).backward()
            model.zero_grad()
        ds = mon.to_xarray()
    assert type(model.attn) is nn.MultiheadAttention
    got = {layer: recorded(ds, layer, "gradient") for layer in ds["layer"].values}
    assert np.isfinite(got[packed][0, :, 0]).all() and np.isnan(got[packed][1]).all()
    assert_matches(got[packed][0], exact[0][packed], packed)
    for entry in blocks:
        assert np.isnan(got[entry][0]).all() and np.isfinite(got[entry][1, :, 0]).all()
        assert_matches(got[entry][1], exact[1][entry], entry)
    for step in (0, 1):
        out_proj = "attn.out_proj.weight"
        assert_matches(got[out_proj][step], exact[step][out_proj], f"{out_proj} step {step}")
    memory_rows = memories[1].transpose(0, 1)  # samples first
    assert_matches(
        recorded(ds, f"{packed}:k", "activation")[1],
        activation_reference(memory_rows, labels),
        "key activation",
    )


class DecoderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(
            d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(16, 3)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        h = self.layer(tgt, memory, tgt_mask=causal, memory_key_padding_mask=padding)
        return self.head(h.mean(dim=1))


def test_decoder_layer_cross_attention_blocks_match_autograd() -> None:
    torch.manual_seed(0)
    model = DecoderNet()
    self_attn, cross = "layer.self_attn.in_proj_weight", "layer.multihead_attn.in_proj_weight"
    entries = [self_attn, *(f"{cross}:{b}" for b in "qkv"), "layer.multihead_attn.out_proj.weight"]
    gen = torch.Generator().manual_seed(0)
    padding = torch.zeros(8, 6, dtype=torch.bool)
    padding[2, -3:] = True
    exact: dict[str, list[np.ndarray]] = {e: [] for e in [*entries, "memory"]}
    with streamspec.watch(model, GROUPS, rank=RANK, live=False) as mon:
        assert mon.layers == (
            self_attn,
            "layer.self_attn.out_proj.weight",
            *entries[1:],
            "layer.linear1.weight",
            "layer.linear2.weight",
            "head.weight",
        )
        for _ in range(2):
            tgt = torch.randn(8, 5, 16, generator=gen)
            memory = torch.randn(8, 6, 16, generator=gen)
            y = torch.randint(0, 3, (8,), generator=gen)
            labels = torch.tensor([0, 0, 1, 1, 0, -1, 1, 0])
            reference = DecoderNet()
            reference.load_state_dict(model.state_dict())
            losses = F.cross_entropy(reference(tgt, memory, padding), y, reduction="none") / 8
            for entry, sigma in gradient_reference(reference, losses, labels, entries).items():
                exact[entry].append(sigma)
            exact["memory"].append(activation_reference(memory, labels))
            mon.label(labels)
            F.cross_entropy(model(tgt, memory, padding), y).backward()
            model.zero_grad()
        ds = mon.to_xarray()
    assert type(model.layer.multihead_attn) is nn.MultiheadAttention
    for entry in entries:
        assert_matches(recorded(ds, entry, "gradient"), np.stack(exact[entry]), entry)
    for block in "kv":
        got = recorded(ds, f"{cross}:{block}", "activation")
        assert_matches(got, np.stack(exact["memory"]), f"{block} activation")


def test_frozen_in_projection_is_no_entry_and_out_proj_is_still_recorded() -> None:
    torch.manual_seed(0)
    model = BareNet()
    model.attn.in_proj_weight.requires_grad_(False)
    with streamspec.watch(model, GROUPS, rank=2, batch_dim=1, live=False) as mon:
        assert mon.layers == ("attn.out_proj.weight", "head.weight")
        mon.label(torch.tensor([0, 1, 0]))
        F.cross_entropy(model(torch.randn(4, 3, E)), torch.tensor([0, 1, 2])).backward()
        ds = mon.to_xarray()
    assert np.isfinite(recorded(ds, "attn.out_proj.weight", "gradient")[0, :, 0]).all()


def test_watched_encoder_layer_with_dropout_trains_as_unwatched() -> None:
    """The twin's output has the fused module's strides: a following nn.Dropout draws its mask in
    memory order, so other strides gave another mask (outputs 0.44 apart at the first step)."""
    import streamspec

    def outputs(watched: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        x = torch.randn(4, 6, 16)
        got = []
        mon = streamspec.watch(layer, ["a", "b"], rank=2, live=False) if watched else None
        for _ in range(3):
            if mon is not None:
                mon.label(torch.arange(4) % 2)
            out = layer(x)
            out.pow(2).mean().backward()
            got.append(out.detach())
        if mon is not None:
            mon.close()
        return got

    for plain, watched in zip(outputs(False), outputs(True), strict=True):
        torch.testing.assert_close(watched, plain, rtol=1e-5, atol=1e-6)


def test_two_monitors_on_one_attention_module_both_record_and_close_in_any_order() -> None:
    """A second watch() of a model whose MultiheadAttention is already watched (a notebook cell
    run twice) used to fail with "duplicate base class"; both monitors now record the same
    spectra, and closing them in either order leaves the original module."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.Sequential(attn)
    x, labels = torch.randn(4, 5, 8), torch.arange(4) % 2
    for order in ((0, 1), (1, 0)):
        first = streamspec.watch(model, ["a", "b"], rank=2, live=False)
        second = streamspec.watch(model, ["a", "b"], rank=2, live=False)
        monitors = (first, second)
        for _ in range(2):
            for mon in monitors:
                mon.label(labels)
            model[0](x, x, x)[0].pow(2).mean().backward()
        sigma = [mon.to_xarray()["sigma"].values for mon in monitors]
        np.testing.assert_allclose(sigma[0], sigma[1], rtol=1e-6)
        assert np.isfinite(sigma[0][:, 0, :, :, 0]).all()  # the fused in_proj entry
        for i in order:
            monitors[i].close()
        assert model[0] is attn
