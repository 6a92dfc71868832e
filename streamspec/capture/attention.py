"""``nn.MultiheadAttention``: its in-projection(s) and out-projection, made visible by a twin.

MHA (Vaswani et al. 2017, "Attention is all you need") applies ``in_proj_weight`` ``[3E, E]`` (or
``q_proj_weight [E, E]``, ``k_proj_weight [E, kdim]``, ``v_proj_weight [E, vdim]``) and
``out_proj`` functionally inside ``F.multi_head_attention_forward``: no module hook ever sees those
products. While watched, the module is swapped in place for a twin (an instance of a subclass of
the module's class, sharing its ``__dict__`` state: the same Parameter objects, the same
``out_proj``) that runs the same computation product by product:

* self-attention (``query is key is value``): one product ``x·in_proj_weightᵀ`` → ``[B, T, 3E]``,
  recorded as ``<name>.in_proj_weight`` (adjoint = the concatenated q/k/v product gradients);
* otherwise three products with the weight's row blocks (views of the same Parameter), recorded
  as ``<name>.in_proj_weight:q``, ``:k``, ``:v`` (or ``q_proj_weight`` etc. for separate weights);
* ``self.out_proj(attn)`` as a module call, so the Linear family records ``<name>.out_proj.weight``.

The layer axis of an archive is fixed when ``watch()`` starts, so which in-projection entries exist
is decided at the swap: a Transformer layer's ``self_attn`` gets only the packed entry, a decoder
layer's ``multihead_attn`` only the three blocks, any other MHA both (a call fills those that
apply; the others stay NaN).

Under ``torch.no_grad()`` the twin delegates to the fused ``nn.MultiheadAttention.forward``
(fast evaluation, nothing recorded).
"""

from __future__ import annotations

import copy
import copyreg
import math
from typing import Any, SupportsIndex

import torch
import torch.nn.functional as F
from torch import nn

from streamspec.capture.registry import (
    Capture,
    DenseSource,
    Sink,
    Site,
    qualified,
    register,
    report,
)

PACKED = "packed"  # one entry for the whole in_proj_weight (self-attention)
BLOCKS = "blocks"  # three entries, one per q/k/v row block (cross-attention)
_SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
_BLOCK_KEYS = ("in_proj_weight:q", "in_proj_weight:k", "in_proj_weight:v")


def in_proj_entries(parent: nn.Module, name: str) -> tuple[str, ...]:
    """Which in-projection entries an MHA found as ``parent.<name>`` gets (:data:`PACKED`,
    :data:`BLOCKS`). Transformer layers always call ``self_attn`` as self-attention and a
    decoder's ``multihead_attn`` as cross-attention; anything else may do either."""
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    if name == "self_attn" and isinstance(parent, layers):
        return (PACKED,)
    if name == "multihead_attn" and isinstance(parent, nn.TransformerDecoderLayer):
        return (BLOCKS,)
    return (PACKED, BLOCKS)


class StepwiseMultiheadAttention(nn.MultiheadAttention):
    """The twin: same state as the original MHA, products run one by one and reported to a sink.

    Never constructed directly: see :meth:`AttentionFamily.make_stepwise`. Its ``training`` flag
    is the original's, so ``model.eval()`` during a watch still holds after the original is back.
    """

    _streamspec_sinks: list[tuple[Sink, nn.Module | None]]  # module None: this twin
    _streamspec_entries: tuple[str, ...]
    _streamspec_original: nn.MultiheadAttention

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        # deepcopy and pickle (torch.save(model)) yield the plain original module: it shares the
        # twin's parameters and submodules, and a class made at run time cannot be pickled.
        # The twin's own state (attributes set on it during a watch included), as the original's
        # class; what object.__reduce_ex__ gives for protocols 0-1 (the 2+ form insists on
        # type(self)).
        original = self.__dict__["_streamspec_original"]
        while isinstance(original, StepwiseMultiheadAttention):  # a twin of a twin (two monitors)
            original = original.__dict__["_streamspec_original"]
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_streamspec")}
        state["training"] = original.training
        rebuild = copyreg._reconstructor  # type: ignore[attr-defined]
        return rebuild, (type(original), object, None), state

    @property
    def training(self) -> bool:
        return self._streamspec_original.training

    @training.setter
    def training(self, mode: bool) -> None:
        self._streamspec_original.training = mode

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward``, step by step when gradients are being recorded.

        Shapes as in PyTorch: ``query [L, N, E]`` (``[N, L, E]`` with ``batch_first``, ``[L, E]``
        unbatched, i.e. one sample), ``key [S, N, kdim]``, ``value [S, N, vdim]``,
        ``key_padding_mask [N, S]``, ``attn_mask [L, S]`` or ``[N·heads, L, S]``.
        """
        if not torch.is_grad_enabled() or query.is_nested or key.is_nested or value.is_nested:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        batched = F._mha_shape_check(  # type: ignore[attr-defined]  # PyTorch's checks and messages
            query, key, value, key_padding_mask, attn_mask, self.num_heads
        )
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]}"
            )
        if not batched:
            to_rows = lambda x: x.unsqueeze(0)  # noqa: E731
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            to_rows = lambda x: x  # noqa: E731
        else:
            to_rows = lambda x: x.transpose(0, 1)  # noqa: E731
        # samples-first [N, L|S, ·] views; keep the identities that tell self-attention apart
        q_rows = to_rows(query)
        k_rows = q_rows if key is query else to_rows(key)
        v_rows = k_rows if value is key else q_rows if value is query else to_rows(value)
        q, k, v = self._project(q_rows, k_rows, v_rows)
        attn, weights = self._attend(
            q, k, v, key_padding_mask, attn_mask, need_weights, is_causal, query.dtype
        )
        n, _, length, _ = attn.shape
        # out_proj sees the module's own layout (so watch(batch_dim=) means the same for it as
        # for the model's other layers); an unbatched call gets a batch of one there.
        if self.batch_first:
            out = self.out_proj(attn.transpose(1, 2).reshape(n, length, self.embed_dim))
            # The fused module returns a transposed view of a [L, N, E] tensor: same strides
            # here (one copy), so that an nn.Dropout after it, which draws its mask in memory
            # order, draws the same mask as without the monitor.
            out = out.transpose(0, 1).contiguous().transpose(0, 1) if batched else out.squeeze(0)
        else:
            out = self.out_proj(attn.permute(2, 0, 1, 3).reshape(length, n, self.embed_dim))
            out = out if batched else out.squeeze(1)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        return out, weights

    def _project(
        self, q_rows: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """In-projections of ``[N, T, ·]`` rows → q, k, v ``[N, T, E]``; reports the products."""
        bias = self.in_proj_bias
        weights: tuple[torch.Tensor, ...]
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        if not self._qkv_same_embed_dim:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            keys = _SEPARATE
        else:
            w = self.in_proj_weight
            if q_rows is k_rows is v_rows and PACKED in self._streamspec_entries:
                proj = F.linear(q_rows, w, bias)  # [N, L, 3E]
                if w.requires_grad:
                    capture = Capture("in_proj_weight", DenseSource(q_rows.detach()), proj, _same)
                    self._report([capture])
                q, k, v = proj.chunk(3, dim=-1)
                return q, k, v
            weights = w.chunk(3)  # row blocks: views of the Parameter, gradients land in it
            keys = _BLOCK_KEYS
        captures = []
        outs = []
        for x, weight, b, key in zip((q_rows, k_rows, v_rows), weights, biases, keys, strict=True):
            y = F.linear(x, weight, b)
            if weight.requires_grad:  # a frozen weight is no site
                captures.append(Capture(key, DenseSource(x.detach()), y, _same))
            outs.append(y)
        self._report(captures)
        return outs[0], outs[1], outs[2]

    def _report(self, captures: list[Capture]) -> None:
        live = [c for c in captures if c.output.requires_grad]  # no graph (e.g. eval): skip
        if live:
            report(self, self._streamspec_sinks, live)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        need_weights: bool,
        is_causal: bool,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scaled dot-product attention of ``[N, T, E]`` projections, as in
        ``F.multi_head_attention_forward`` → ``[N, heads, L, head_dim]`` and per-head weights
        ``[N, heads, L, S]`` (None unless ``need_weights``)."""
        heads, head_dim = self.num_heads, self.head_dim
        n, length, _ = q.shape
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint alone goes to SDPA, as in PyTorch
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=dtype,
                check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False  # the merged mask is no longer causal
        src = k.shape[1]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (length, src):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, "
                        f"but should be {(length, src)}."
                    )
                attn_mask = attn_mask.view(1, 1, length, src)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (n * heads, length, src):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, "
                        f"but should be {(n * heads, length, src)}."
                    )
                attn_mask = attn_mask.view(n, heads, length, src)
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, -1).expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, -1).expand(n, 1, -1)], dim=1)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        q = q.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # [N, heads, L, head_dim]
        k = k.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        if self.add_zero_attn:
            zeros = k.new_zeros(n, heads, 1, head_dim)
            k = torch.cat([k, zeros], dim=2)
            v = torch.cat([v, zeros], dim=2)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        src = k.shape[2]
        if key_padding_mask is not None:
            if key_padding_mask.shape != (n, src):
                raise AssertionError(
                    f"expecting key_padding_mask shape of {(n, src)}, "
                    f"but got {tuple(key_padding_mask.shape)}"
                )
            padding = key_padding_mask.view(n, 1, 1, src)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0
        if not need_weights:
            return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal), None
        scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return weights @ v, weights


def _same(grad: torch.Tensor) -> torch.Tensor:
    """Adjoint rows of a samples-first ``[N, T, h]`` product: its gradient as it is."""
    return grad


def _pad_masks(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One more (unmasked) source position, for ``bias_k``/``bias_v`` and ``add_zero_attn``."""
    return (
        None if attn_mask is None else F.pad(attn_mask, (0, 1)),
        None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1)),
    )


_TWIN_TYPES: dict[type[nn.Module], type[StepwiseMultiheadAttention]] = {
    nn.MultiheadAttention: StepwiseMultiheadAttention
}


def _twin_type(cls: type[nn.Module]) -> type[StepwiseMultiheadAttention]:
    """The twin class of ``cls`` (a subclass of it, so ``isinstance`` checks still hold)."""
    if issubclass(cls, StepwiseMultiheadAttention):
        return cls
    if cls not in _TWIN_TYPES:
        _TWIN_TYPES[cls] = type(
            f"Stepwise{cls.__name__}",
            (StepwiseMultiheadAttention, cls),
            {"__module__": __name__, "__qualname__": f"Stepwise{cls.__name__}"},
        )
    return _TWIN_TYPES[cls]


@register
class AttentionFamily:
    """Activation rows are the projected inputs; adjoint rows the projections' output gradients.

    Entries (``prefix`` = the module's name): ``in_proj_weight`` (``[B, L, E]`` → ``[B, L, 3E]``,
    self-attention), ``in_proj_weight:q|k|v`` (``[B, L|S, E]`` → ``[B, L|S, E]``, each row block)
    or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when ``kdim``/``vdim`` differ from
    ``E``. ``out_proj.weight`` belongs to the Linear family.
    """

    module_types = (nn.MultiheadAttention,)
    stepwise = True

    @staticmethod
    def sites(module: nn.Module, prefix: str) -> list[Site]:
        assert isinstance(module, nn.MultiheadAttention)
        e = module.embed_dim
        if not module._qkv_same_embed_dim:
            separate = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
            return [
                Site(qualified(prefix, key), module, key, int(w.shape[1]), int(w.shape[0]))
                for key, w in zip(_SEPARATE, separate, strict=True)
                if w is not None and w.requires_grad
            ]
        if module.in_proj_weight is None or not module.in_proj_weight.requires_grad:
            return []
        entries = (
            module._streamspec_entries
            if isinstance(module, StepwiseMultiheadAttention)
            else (PACKED, BLOCKS)
        )
        sites = []
        if PACKED in entries:
            sites.append(
                Site(qualified(prefix, "in_proj_weight"), module, "in_proj_weight", e, 3 * e)
            )
        if BLOCKS in entries:
            sites.extend(Site(qualified(prefix, key), module, key, e, e) for key in _BLOCK_KEYS)
        return sites

    @staticmethod
    def capture(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, batch_dim: int
    ) -> list[Capture]:
        return []  # stepwise: the twin reports its products itself

    @staticmethod
    def problems(module: nn.Module) -> list[str]:
        assert isinstance(module, nn.MultiheadAttention)
        if isinstance(module, StepwiseMultiheadAttention):
            return []
        reasons = []
        if type(module).forward is not nn.MultiheadAttention.forward:
            reasons.append(
                f"{type(module).__name__} overrides nn.MultiheadAttention.forward, which "
                "streamspec's stepwise twin would replace; watch an nn.MultiheadAttention instead"
            )
        out_proj = getattr(module, "out_proj", None)
        if not isinstance(out_proj, nn.Linear) or type(out_proj).forward is not nn.Linear.forward:
            reasons.append(
                f"out_proj is a {type(out_proj).__name__}, not a plain nn.Linear (MHA only uses "
                "its weight and bias, the twin would call it); keep MHA's own out_proj"
            )
        return reasons

    @staticmethod
    def make_stepwise(module: nn.Module, sink: Sink, *, parent: nn.Module, name: str) -> nn.Module:
        """A :class:`StepwiseMultiheadAttention` sharing ``module``'s parameters and submodules.

        Built without ``__init__`` (nothing re-initialised): ``_parameters``/``_buffers``/
        ``_modules`` are the original's dicts; hook dicts are copies, so the user's hooks still
        fire on the twin while nothing added to the twin reaches the original.
        """
        assert isinstance(module, nn.MultiheadAttention)
        cls = _twin_type(type(module))
        twin = cls.__new__(cls)
        state = {k: v for k, v in module.__dict__.items() if not k.startswith("_streamspec")}
        state.pop("training", None)  # a property of the twin: the original's flag
        for attr, value in state.items():
            if "hook" in attr and isinstance(value, dict):
                state[attr] = copy.copy(value)
        twin.__dict__.update(state)
        object.__setattr__(twin, "_streamspec_original", module)  # not a submodule
        # A second monitor on a watched module twins the twin: both monitors' sinks are called,
        # each with the module it knows.
        inherited = module.__dict__.get("_streamspec_sinks", [])
        sinks = [(s, module if m is None else m) for s, m in inherited] + [(sink, None)]
        object.__setattr__(twin, "_streamspec_sinks", sinks)
        object.__setattr__(twin, "_streamspec_entries", in_proj_entries(parent, name))
        return twin
