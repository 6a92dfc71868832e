"""Per-layer spectral trackers: streaming sketches of each group's activation, adjoint, gradient.

A :class:`LayerTracker` holds, for all groups of one weight matrix at once (leading dim ``C``),
one orthonormal basis block per side of the weight, ``B_in = [Ω_in | W_in]`` ``[h_in, b_in]``
and ``B_out = [Ω_out | W_out]`` ``[h_out, b_out]``: a warm block ``W`` carried from step to step
(``W_in ← orth(AᵀAW_in)``, ``W_out ← orth(ΔᵀΔW_out)``: a block subspace iteration spread over
steps, Halko, Martinsson & Tropp 2011, Alg. 4.3) and an epoch test matrix ``Ω`` held fixed within
an epoch (so that the epoch sketches stay linear in the data).

Per step, four products with the rows give everything:

* ``P = A·B_in``, ``R = Δ·B_out``;
* ``Aᵀ[P | R] = [AᵀA·B_in | G·B_out]`` and ``Δᵀ[P | R] = [Gᵀ·B_in | ΔᵀΔ·B_out]`` (``G = AᵀΔ``);
* small Gram matrices of these, and the cores read off them at the step's end: ``B_inᵀAᵀAB_in``,
  ``B_outᵀΔᵀΔB_out`` and ``C = B_inᵀ·(G·B_out)``. (A side whose block is the identity skips
  its product; with both, the two are one Gram of ``[A | Δ]``.)

Only those products need the layer's rows; they run in its backward hook. Everything after them
runs once per :class:`SketchBank` (all layers of one weight shape) at the step's end.

The step's activation/adjoint spectra are Nyström eigenvalues of ``AᵀA``/``ΔᵀΔ`` on ``B``; the
gradient's are those of the generalized Nyström approximation ``Ĝ = (GB_out)C⁺(B_inᵀG)``
(Nakatsukasa 2020). All factorisations of these ``b × b`` matrices happen on the host in float64.
The same products, restricted to the ``Ω`` columns, feed the epoch sketches, which add over steps
(and all-reduce over data-parallel ranks): Nyström sketches ``Σ AᵀAΩ_in``, ``Σ ΔᵀΔΩ_out`` and, for
the summed gradient (which cancels, so the sketch must be of the sum itself), the range, co-range
and core sketches ``Σ GΩ_out``, ``Σ Ω_inᵀG``, ``Σ Ω_inᵀGΩ_out``. Each epoch's ``Ω`` holds the
previous epoch's top-k directions plus fresh Gaussian columns; the first epoch's are seeded from
the first step's data.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from streamspec.sketch.host import generalized_nystrom_values
from streamspec.sketch.linalg import bmm, nystrom, orthonormalize, tbmm
from streamspec.sketch.operators import DenseRows, RowOperator, gram_with, sq_norms_pair

_SETUP_LOCK = threading.Lock()
WARMUP_ITERATIONS = 4  # power iterations of the warm blocks on the run's first step
TIED_EXACT_ROWS = 4096  # per-group rows up to which the tying spectrum is computed exactly
# The epoch sketches each kind's spectrum is reconstructed from.
_KIND_SKETCHES = {"activation": ("y_a",), "adjoint": ("y_d",), "gradient": ("y_g", "x_g", "z_g")}


@dataclass(frozen=True)
class SketchWidths:
    """Block widths of one layer, capped by the dimension they sketch."""

    epoch_in: int  # Ω_in columns (≤ h_in; == h_in: the identity, the sketch is exact)
    epoch_out: int  # Ω_out columns (≤ h_out)
    warm_in: int  # W_in columns (0 when Ω_in is already the identity)
    warm_out: int  # W_out columns

    @property
    def block_in(self) -> int:
        return self.warm_in + self.epoch_in

    @property
    def block_out(self) -> int:
        return self.warm_out + self.epoch_out

    @property
    def identity(self) -> tuple[bool, bool]:
        """Whether ``B_in``, ``B_out`` are the identity (no warm block: ``Ω`` spans the side, and
        stays the identity, epoch after epoch)."""
        return (self.warm_in == 0, self.warm_out == 0)

    @classmethod
    def for_layer(cls, h_in: int, h_out: int, rank: int, oversample: int) -> SketchWidths:
        width = rank + oversample
        # The co-range (input) side is wider than the range side: a square generalized-Nyström
        # core is unstable (Nakatsukasa 2020 recommends 1.5×).
        e_in, e_out = min(width + width // 2, h_in), min(width, h_out)
        warm = max(rank // 2, 1)  # the step-to-step block: accuracy on flat spectra vs cost
        # A side that its Ω and warm block would cover anyway takes the identity: exact, no
        # wider, no warm block to advance, and the cheaper products of identity blocks.
        e_in = h_in if e_in + warm >= h_in else e_in
        e_out = h_out if e_out + warm >= h_out else e_out
        v_in, v_out = _aligned_warm(e_in, warm, h_in), _aligned_warm(e_out, warm, h_out)
        # The warm blocks are columns of the gradient's sketches too: alignment must not shrink
        # the co-range side's excess over the range side.
        while v_in < v_out and e_in + v_in + ALIGN <= h_in:
            v_in += ALIGN
        while v_in < v_out and v_out - ALIGN >= _warm_floor(warm):
            v_out -= ALIGN
        if v_in < v_out:  # no room on a narrow input side: the unaligned widths
            v_in, v_out = min(warm, h_in - e_in), min(warm, h_out - e_out)
        return cls(e_in, e_out, v_in, v_out)


ALIGN = 8  # block widths are multiples of this where the layer allows


def _aligned_warm(epoch: int, warm: int, dim: int) -> int:
    """The warm width that makes ``epoch + warm`` a multiple of :data:`ALIGN`: the nearest one
    keeping at least :func:`_warm_floor` columns, else the next one up (capped at ``dim``).

    Skinny fp32 products cost by tiles of columns: on this project's CPUs a 47-column product
    takes 1.7× the time of a 48-column one (bench/README.md), and on GPUs unaligned row strides
    rule out the vectorised kernels. The columns that alignment adds are not wasted: they widen
    the warm block.
    """
    if epoch >= dim:
        return 0  # Ω is the identity: the sketch is exact, no warm block
    total = epoch + warm
    down = total // ALIGN * ALIGN
    up = down if down == total else down + ALIGN  # up - epoch >= warm: always enough
    keep_down = total - down <= up - total and down - epoch >= _warm_floor(warm)
    return min(down if keep_down else up, dim) - epoch


def _warm_floor(warm: int) -> int:
    """The fewest warm columns alignment may leave of ``warm`` requested."""
    return max(warm // 2, 1)


@dataclass
class EpochSpectra:
    """Singular values reconstructed from one epoch's sketches, unnormalised.

    Attributes:
        activation, adjoint, gradient: ``[C, r]`` descending, float64.
        excluded: ``[C]`` samples of the epoch's steps left out of its sketches because their
            products were not finite (an overflowing fp16 step, a NaN in the model), as counted by
            the ``counts`` passed to :meth:`LayerTracker.products`.
    """

    activation: np.ndarray
    adjoint: np.ndarray
    gradient: np.ndarray
    excluded: np.ndarray


@dataclass
class StepSketch:
    """What one step of one layer sends to the host.

    ``route == "exact"``: ``tensors`` holds the padded group rows ``activation [C, m, h_in]`` and
    ``adjoint [C, m, h_out]``. ``route == "sketch"``: float64 ``[C, b, b]`` matrices —
    ``core_a = B_inᵀAᵀAB_in``, ``gram_a = (AᵀAB_in)ᵀ(AᵀAB_in)``, the same for Δ (``core_d``,
    ``gram_d``), ``gram_y = (GB_out)ᵀ(GB_out)``, ``gram_x = (B_inᵀG)(B_inᵀG)ᵀ``,
    ``core_g = B_inᵀGB_out`` (the blocks ``B`` are orthonormal) — and the ``[C]`` squared norms
    ``norm_a = ‖A_c‖²_F``, ``norm_d = ‖Δ_c‖²_F``.
    """

    route: str
    tensors: dict[str, torch.Tensor | np.ndarray] = field(default_factory=dict)


def _random(generator: torch.Generator, *shape: int) -> np.ndarray:
    return torch.randn(*shape, generator=generator, dtype=torch.float64).numpy()


def _orthonormal(generator: torch.Generator, n_groups: int, dim: int, width: int) -> np.ndarray:
    """``[C, dim, width]`` orthonormal Gaussian test matrices; the identity when ``width == dim``
    (the sketch is then exact)."""
    if width >= dim:
        return np.broadcast_to(np.eye(dim), (n_groups, dim, dim)).copy()
    return np.linalg.qr(_random(generator, n_groups, dim, width))[0]


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` (called on float64 copies: the Gram of a float32 sketch keeps its small
    eigenvalues only in float64)."""
    return tbmm(x, x)


def row_products(
    a: RowOperator,
    d: torch.Tensor,
    b_in: torch.Tensor,
    b_out: torch.Tensor,
    identity: tuple[bool, bool] = (False, False),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's products with the rows ``a`` ``[N, m, h_in]``, ``d`` ``[N, m, h_out]`` and the
    blocks ``B_in``, ``B_out`` (``N``: groups, or layers × groups): ``[AᵀA·B_in | G·B_out]``,
    ``[Gᵀ·B_in | ΔᵀΔ·B_out]`` and the squared norms (see :class:`StepProducts`).

    ``identity``: which blocks are the identity (a side no wider than its sketch: exact). Both:
    the two products are the rows and columns of one Gram of ``[A | Δ]``, one product instead
    of four (a first convolution over a large volume: few columns, very many rows). One: that
    side's rows are their own product.

    Nothing here grows with ``m`` beyond these products: the small cores ``BᵀHB`` are read off
    them at the step's end (:meth:`SketchBank._fold`), not from a Gram of ``[A·B_in | Δ·B_out]``,
    whose ``m·(b_in + b_out)²`` float64 work cost as much as the other products together for
    convolutions and recurrent layers (many rows, few columns)."""
    if all(identity):
        gram = gram_with(a, d)
        h_in = b_in.shape[-2]
        return gram[:, :h_in], gram[:, h_in:], sq_norms_pair(a, d)
    p = a.dense() if identity[0] and isinstance(a, DenseRows) else a.mm(b_in)
    pr = torch.cat([p, d if identity[1] else torch.bmm(d, b_out)], dim=2)  # [N, m, b_in + b_out]
    return a.tmm(pr), tbmm(d, pr), sq_norms_pair(a, d)


def products_of_layers(
    trackers: Sequence[LayerTracker],
    activations: Sequence[torch.Tensor],
    adjoints: Sequence[torch.Tensor],
    counts: torch.Tensor | None = None,
) -> list[StepProducts]:
    """The sketched-route products of several layers of one bank in one batched call per
    product, instead of one call per layer: on a GPU the skinny products of one layer fill few
    multiprocessors (bench.products: 4 BERT-base layers together take about half the device
    time). The same values as each tracker's :meth:`LayerTracker.products` (up to rounding).

    Args:
        trackers: layers of one bank, each :meth:`LayerTracker.warm_started` on the rows'
            device.
        activations: ``[C, m, h_in]`` float32 rows per layer (one ``m`` for all).
        adjoints: ``[C, m, h_out]`` rows per layer.
        counts: ``[C]`` samples per group in the step (see :meth:`LayerTracker.products`).
    """
    a = torch.stack(list(activations)).flatten(0, 1)  # [n·C, m, h_in]
    d = torch.stack([x.to(torch.float32) for x in adjoints]).flatten(0, 1)
    return stacked_products(trackers, a, d, counts)


def stacked_products(
    trackers: Sequence[LayerTracker],
    a: torch.Tensor,
    d: torch.Tensor,
    counts: torch.Tensor | None = None,
) -> list[StepProducts]:
    """:func:`products_of_layers` of rows already stacked layer-major: ``a`` ``[n·C, m, h_in]``,
    ``d`` ``[n·C, m, h_out]`` float32 (layer ``i``'s groups at ``i·C … i·C + C − 1``), e.g.
    gathered straight into one buffer (no stacking copy: ≈ 1.4 ms per BERT-base step on an
    H200, where the rows of 49 layers make 2.4 GB)."""
    c = trackers[0].n_groups
    b_in = torch.stack([t._block("in") for t in trackers]).flatten(0, 1)
    b_out = torch.stack([t._block("out") for t in trackers]).flatten(0, 1)
    s_in, s_out, norms = row_products(DenseRows(a), d, b_in, b_out, trackers[0].widths.identity)
    out = []
    for i, tracker in enumerate(trackers):
        part = slice(i * c, (i + 1) * c)
        tracker._steps += 1
        out.append(StepProducts(s_in[part], s_out[part], norms[part], "sketch", counts))
    return out


@dataclass
class StepProducts:
    """One layer's row products of one step (computed in its backward hook, while its rows are
    alive); the rest of the step runs batched over a whole :class:`SketchBank` at the step's end.

    Attributes:
        s_in: ``Aᵀ[P | R] = [AᵀA·B_in | G·B_out]`` ``[C, h_in, b_in + b_out]`` float32.
        s_out: ``Δᵀ[P | R] = [Gᵀ·B_in | ΔᵀΔ·B_out]`` ``[C, h_out, b_in + b_out]`` float32.
        norms: ``[C, 2]`` float64 ``‖A_c‖²_F``, ``‖Δ_c‖²_F``.
        counts: ``[C]`` float64 samples per group in the step (on the device), or None.
        rows: for the exact route, the padded group rows (``activation``, ``adjoint``; and
            ``position`` when tied); for a tied sketched layer, ``tied``.
        route: ``"exact"`` or ``"sketch"``.
    """

    s_in: torch.Tensor
    s_out: torch.Tensor
    norms: torch.Tensor
    route: str
    counts: torch.Tensor | None = None
    rows: dict[str, torch.Tensor] = field(default_factory=dict)


def merge_products(first: StepProducts, second: StepProducts) -> StepProducts | None:
    """The products of a layer's rows folded in two parts within one step (a module recomputed
    once per checkpointed segment by reentrant checkpointing: each recomputation's gradient
    arrives, and is folded, before the next is recomputed). The sketched products and norms are
    sums over rows, so they add; the exact route's rows stack (zero padding changes no singular
    value). None where they do not combine: the tying spectrum's Gram is over positions."""
    if {"tied", "position"} & (first.rows.keys() | second.rows.keys()):
        return None
    merged = StepProducts(
        first.s_in + second.s_in,
        first.s_out + second.s_out,
        first.norms + second.norms,
        route="exact" if first.route == second.route == "exact" else "sketch",
        counts=first.counts,
    )
    if merged.route == "exact":
        merged.rows = {
            key: torch.cat([first.rows[key], second.rows[key]], dim=1) for key in first.rows
        }
    return merged


class SketchBank:
    """Device state of ``L`` same-shape layers in one set of tensors, so that everything after
    the row products runs once per bank and step, not once per layer: the epoch-sketch updates,
    the warm blocks' orthonormalisation, the small Gram matrices and their transfer to the host.
    On a GPU this is the difference between a few dozen and a few thousand kernel launches per
    step.

    State (leading ``[L, C]``): the blocks ``B_in = [Ω_in | W_in]`` ``[h_in, b_in]`` and
    ``B_out = [Ω_out | W_out]``; the epoch sketches ``E_in = Σ[AᵀAΩ_in | GΩ_out]``
    ``[h_in, e_in + e_out]``, ``E_out = Σ[GᵀΩ_in | ΔᵀΔΩ_out]`` and the core ``Z = ΣΩ_inᵀGΩ_out``
    (float64), summed over the epoch's steps whose products are finite; the samples of the
    others (float64, ``[L, C]``).

    Args:
        h_in, h_out, n_groups, widths: the common shape.
        capacity: number of layers (slots).
    """

    def __init__(
        self, h_in: int, h_out: int, n_groups: int, widths: SketchWidths, capacity: int
    ) -> None:
        self.h_in, self.h_out, self.n_groups, self.widths = h_in, h_out, n_groups, widths
        self.capacity = capacity
        self.slots = 0
        self.device: torch.device | None = None
        w = widths
        self.step_width = w.block_in + w.block_out
        fields = []
        offset = 0
        bi, bo = w.block_in, w.block_out
        for name, shape in (
            ("core_a", (bi, bi)),
            ("gram_a", (bi, bi)),
            ("core_d", (bo, bo)),
            ("gram_d", (bo, bo)),
            ("gram_y", (bo, bo)),
            ("gram_x", (bi, bi)),
            ("core_g", (bi, bo)),
            ("norm_a", ()),
            ("norm_d", ()),
        ):
            fields.append((name, offset, shape))
            offset += int(np.prod(shape))
        self.packed_width = offset
        # ``(name, offset, shape)`` of each matrix in a slot's packed row (see unpack_fields):
        # banks with equal fields are factorised as one batch on the host.
        self.fields: Fields = tuple(fields)

    def add(self) -> int:
        """A slot for one more layer."""
        if self.slots >= self.capacity:
            raise RuntimeError("SketchBank is full")  # internal invariant, never a user error
        self.slots += 1
        return self.slots - 1

    def allocate(self, device: torch.device) -> None:
        w, c, n = self.widths, self.n_groups, self.capacity
        f32: dict[str, Any] = {"dtype": torch.float32, "device": device}
        self.block_in = torch.zeros(n, c, self.h_in, w.block_in, **f32)
        self.block_out = torch.zeros(n, c, self.h_out, w.block_out, **f32)
        self.epoch_in = torch.zeros(n, c, self.h_in, w.epoch_in + w.epoch_out, **f32)
        self.epoch_out = torch.zeros(n, c, self.h_out, w.epoch_in + w.epoch_out, **f32)
        self.epoch_core = torch.zeros(
            n, c, w.epoch_in, w.epoch_out, dtype=torch.float64, device=device
        )
        self.epoch_excluded = torch.zeros(n, c, dtype=torch.float64, device=device)
        width = self.step_width
        self._zeros = StepProducts(
            torch.zeros(c, self.h_in, width, **f32),
            torch.zeros(c, self.h_out, width, **f32),
            torch.zeros(c, 2, dtype=torch.float64, device=device),
            "sketch",
        )
        self.device = device

    def finish(self, present: dict[int, StepProducts]) -> torch.Tensor:
        """:func:`finish_banks` for this bank alone."""
        return finish_banks([(self, present)])[0]

    def _fold(self, present: dict[int, StepProducts]) -> tuple[torch.Tensor, list[_WarmUpdate]]:
        w = self.widths
        ei, eo, bi = w.epoch_in, w.epoch_out, w.block_in
        parts = [present.get(i, self._zeros) for i in range(self.capacity)]
        s_in = torch.stack([p.s_in for p in parts])  # [L, C, h_in, b_in + b_out]
        s_out = torch.stack([p.s_out for p in parts])  # [L, C, h_out, b_in + b_out]
        norms = torch.stack([p.norms for p in parts])  # [L, C, 2]
        # Warm blocks: one subspace-iteration step each, kept orthogonal to Ω.
        warm = []
        if w.warm_in:
            block = self.block_in
            warm.append(_WarmUpdate(block[..., ei:], s_in[..., ei:bi], block[..., :ei]))
        if w.warm_out:
            block = self.block_out
            warm.append(_WarmUpdate(block[..., eo:], s_out[..., bi + eo :], block[..., :eo]))
        # Grams of the diagonal blocks only, in float64: (AᵀAB_in), (GB_out) of s_in; (GᵀB_in),
        # (ΔᵀΔB_out) of s_out. The cores are the sketches seen through the blocks they were
        # taken with (the streaming Nyström's ``ΩᵀY``, Tropp et al. 2017): B_inᵀ[AᵀAB_in | GB_out]
        # and B_outᵀ(ΔᵀΔB_out), float64 products of the float32 sketches. (The warm blocks are
        # advanced only after this, below.)
        s_in64, s_out64 = s_in.to(torch.float64), s_out.to(torch.float64)
        cores = bmm(self.block_in.to(torch.float64).mT, s_in64)  # [L, C, b_in, b_in + b_out]
        core_d = bmm(self.block_out.to(torch.float64).mT, s_out64[..., bi:])
        packed = torch.cat(
            [
                cores[..., :bi].flatten(-2),  # core_a
                _gram(s_in64[..., :bi]).flatten(-2),  # gram_a
                core_d.flatten(-2),  # core_d
                _gram(s_out64[..., bi:]).flatten(-2),  # gram_d
                _gram(s_in64[..., bi:]).flatten(-2),  # gram_y
                _gram(s_out64[..., :bi]).flatten(-2),  # gram_x
                cores[..., bi:].flatten(-2),  # core_g
                norms,
            ],
            dim=-1,
        )
        # Epoch sketches: the Ω columns only (Ω is fixed within an epoch: linear sketches), of
        # the groups whose products are all finite: one overflowing step (fp16 AMP, which the
        # GradScaler then skips) would otherwise leave the whole epoch NaN. Every sketch entry
        # enters a float64 Gram's diagonal as a square and the rows' norms are packed too, so the
        # packed row is finite exactly when they are, and so is its sum: its entries come from
        # float32 values (≤ 1e83 with any realistic reduction length), far from float64's
        # overflow, while NaN and ±Inf carry through a sum (Inf − Inf is NaN). One reduction
        # instead of ``isfinite`` on every element, whose temporaries took ≈ 3 ms per step on a
        # CPU for 24 layers of width 128.
        finite = torch.isfinite(packed.sum(dim=-1))  # [L, C]
        keep = finite[..., None, None].to(s_in.dtype)
        for epoch, s in ((self.epoch_in, s_in), (self.epoch_out, s_out)):
            # In place on the whole stacked copy (the packed row already holds its Grams): ×0,
            # then the NaN that 0·Inf leaves → 0 (≈ 6× faster than masked_fill_ on a CPU). A
            # dropped group's warm-block columns become zero too, which keeps its block.
            s.mul_(keep).nan_to_num_(0.0, 0.0, 0.0)
            epoch[..., :ei] += s[..., :ei]
            epoch[..., ei:] += s[..., bi : bi + eo]
        core = cores[..., :ei, bi : bi + eo]  # Ω_inᵀGΩ_out
        self.epoch_core += core.mul(keep.to(core.dtype)).nan_to_num_(0.0, 0.0, 0.0)
        counts = next((p.counts for p in present.values() if p.counts is not None), None)
        if counts is not None:  # one step, one labelling: every layer's counts are the same
            self.epoch_excluded += torch.where(finite, 0.0, counts)
        return packed, warm

    def unpack(
        self, packed: torch.Tensor | np.ndarray, slot: int
    ) -> dict[str, torch.Tensor | np.ndarray]:
        """One layer's matrices from :func:`finish_banks`' packed output (views)."""
        return unpack_fields(packed[slot], self.fields)


Fields = tuple[tuple[str, int, tuple[int, ...]], ...]


def unpack_fields(rows: torch.Tensor | np.ndarray, fields: Fields) -> dict[str, Any]:
    """The matrices of packed rows ``[..., F]`` → ``{name: [..., *shape]}``: views, never copies
    (on the host the data may still be arriving through an async copy)."""
    lead = tuple(rows.shape[:-1])
    out: dict[str, Any] = {}
    for name, offset, shape in fields:
        part = rows[..., offset : offset + int(np.prod(shape))]
        if isinstance(part, np.ndarray):
            out[name] = np.reshape(part, (*lead, *shape), copy=False)
        else:
            out[name] = part.view(*lead, *shape)
    return out


@dataclass
class _WarmUpdate:
    """A warm block to advance: ``block ← orth((I − ΩΩᵀ)·y)`` where usable (see ``_keep_valid``)."""

    block: torch.Tensor  # [..., h, v] view into a bank's state, updated in place
    y: torch.Tensor  # [..., h, v] the block times the step's Gram (AᵀA·W or ΔᵀΔ·W)
    omega: torch.Tensor  # [..., h, e] the epoch test matrix the block stays orthogonal to


def finish_banks(work: list[tuple[SketchBank, dict[int, StepProducts]]]) -> list[torch.Tensor]:
    """The step's end for several banks: each folds its layers' products (slot → products) into
    its epoch sketches and packs the small float64 matrices for the host (``[L, C, F]``, read
    with :meth:`SketchBank.unpack`); then the warm blocks of every bank advance in a few batched
    orthonormalisations (see :func:`_warm_batches`; blocks zero-padded to a common height: zero
    rows change neither Grams nor projections). Device work only, no host sync. Slots absent
    from the step contribute zeros: their sketches and blocks are kept."""
    packed, updates = [], []
    for bank, present in work:
        p, warm = bank._fold(present)
        packed.append(p)
        updates += warm
    for group in _warm_batches(updates):
        height = max(u.y.shape[-2] for u in group)
        width = max(u.omega.shape[-1] for u in group)

        def pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
            flat = t.reshape(-1, *t.shape[-2:])
            return F.pad(flat, (0, cols - t.shape[-1], 0, rows - t.shape[-2]))

        v = group[0].y.shape[-1]
        new = _keep_valid(
            torch.cat([pad(u.block, height, v) for u in group]),
            torch.cat([pad(u.y, height, v) for u in group]),
            torch.cat([pad(u.omega, height, width) for u in group]),
        )
        start = 0
        for u in group:
            n, h = int(np.prod(u.y.shape[:-2])), u.y.shape[-2]
            u.block.copy_(new[start : start + n, :h].reshape(u.block.shape))
            start += n
    return packed


# Padded elements (rows × columns) that cost about as much as one more batched
# orthonormalisation call on a CPU (≈ 0.3 ms per call plus ≈ 30 ns per element, measured on this
# project's 2-core machines): beyond this, blocks of another height get a call of their own.
CPU_PAD_BUDGET = 10_000


def _warm_batches(updates: list[_WarmUpdate]) -> list[list[_WarmUpdate]]:
    """The warm blocks that advance in one batched orthonormalisation (zero-padded to the
    batch's tallest block): one device and one width per batch; on an accelerator any height
    (launches cost more than padded flops); on a CPU a shorter height joins a taller batch only
    while its padding costs less than a call of its own (padding the CPU bench model's 256-row
    blocks to 1024 rows cost ≈ 5 of its 14.5 ms step end)."""
    by_shape: dict[tuple[torch.device, int, int], list[_WarmUpdate]] = {}
    for u in updates:
        by_shape.setdefault((u.y.device, u.y.shape[-1], u.y.shape[-2]), []).append(u)
    batches: list[list[_WarmUpdate]] = []
    open_batch: dict[tuple[torch.device, int], list[_WarmUpdate]] = {}  # tallest block first
    for (device, width, height), group in sorted(
        by_shape.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], -kv[0][2])
    ):
        batch = open_batch.get((device, width))
        if batch is not None:
            blocks = sum(int(np.prod(u.y.shape[:-2])) for u in group)
            padding = (batch[0].y.shape[-2] - height) * blocks * width
            if device.type != "cpu" or padding <= CPU_PAD_BUDGET:
                batch += group  # extends the list already in ``batches``
                continue
        open_batch[(device, width)] = list(group)
        batches.append(open_batch[(device, width)])
    return batches


class LayerTracker:
    """Streaming truncated-SVD tracker of one weight matrix, all groups batched.

    Device state (in a :class:`SketchBank` slot, shared tensors with the other layers of its
    shape) is fixed-size, ``O((b_in + b_out)·(h_in + h_out))`` per group, independent of steps and
    data size.

    A step is :meth:`products` (in the layer's backward hook: the four products with the rows)
    followed by the bank's :meth:`SketchBank.finish` (once per bank at the step's end);
    :meth:`step` does both for this layer alone.

    Args:
        h_in: input width of the weight matrix (columns of ``A``).
        h_out: output width (columns of ``Δ``).
        n_groups: number of groups ``C``.
        rank: ``k``, the number of singular values recorded.
        oversample: extra sketch columns beyond ``k``.
        generator: the monitor's own seeded generator (never the global RNG).
        bank: the bank to take a slot in (a bank of one when omitted).
    """

    def __init__(
        self,
        h_in: int,
        h_out: int,
        n_groups: int,
        rank: int,
        oversample: int,
        generator: torch.Generator,
        bank: SketchBank | None = None,
    ) -> None:
        self.h_in = h_in
        self.h_out = h_out
        self.n_groups = n_groups
        self.rank = rank
        if bank is None:
            widths = SketchWidths.for_layer(h_in, h_out, rank, oversample)
            bank = SketchBank(h_in, h_out, n_groups, widths, capacity=1)
        self.widths = bank.widths
        self.bank = bank
        self.slot = bank.add()
        self._generator = generator
        self._device: torch.device | None = None
        self._seed_from_data = True  # first epoch: Ω from the first step's data
        self._steps = 0  # steps folded into the current epoch's sketches

    # -- views of this layer's slot -------------------------------------------------------------

    def _block(self, side: str) -> torch.Tensor:
        return (self.bank.block_in if side == "in" else self.bank.block_out)[self.slot]

    def omega(self, side: str) -> torch.Tensor:
        """The epoch test matrix ``Ω`` of one side, ``[C, h, e]`` (a view)."""
        e = self.widths.epoch_in if side == "in" else self.widths.epoch_out
        return self._block(side)[..., :e]

    def warm(self, side: str) -> torch.Tensor:
        """The warm block ``W`` of one side, ``[C, h, v]`` (a view)."""
        e = self.widths.epoch_in if side == "in" else self.widths.epoch_out
        return self._block(side)[..., e:]

    def _setup(self, device: torch.device) -> None:
        with _SETUP_LOCK:  # a multi-device backward runs hooks on several threads
            self._claim_bank(device)
        w, g, c = self.widths, self._generator, self.n_groups

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=torch.float32).to(device)

        for side, dim, e in (("in", self.h_in, w.epoch_in), ("out", self.h_out, w.epoch_out)):
            self.omega(side).copy_(put(_orthonormal(g, c, dim, e)))
        for side, dim, v in (("in", self.h_in, w.warm_in), ("out", self.h_out, w.warm_out)):
            self.warm(side).copy_(_against(self.omega(side), put(_orthonormal(g, c, dim, v))))
        self._device = device
        self._reset_sketches()

    def _claim_bank(self, device: torch.device) -> None:
        if self.bank.device is None:
            self.bank.allocate(device)
        elif self.bank.device != device:
            # A model spread over devices: layers of one shape on another device get a bank of
            # their own there.
            self.bank = SketchBank(self.h_in, self.h_out, self.n_groups, self.widths, capacity=1)
            self.slot = self.bank.add()
            self.bank.allocate(device)

    def _reset_sketches(self) -> None:
        bank = self.bank
        for t in (bank.epoch_in, bank.epoch_out, bank.epoch_core, bank.epoch_excluded):
            t[self.slot].zero_()

    # -- the step (hot path: products only, no host sync) -----------------------------------------

    def products(
        self,
        activation: RowOperator | torch.Tensor,
        adjoint: torch.Tensor,
        exact: bool,
        tie: tuple[torch.Tensor, int] | None = None,
        counts: torch.Tensor | None = None,
    ) -> StepProducts:
        """The step's products with this layer's rows (the only per-layer work of a step).

        Args:
            activation: ``[C, m, h_in]`` the groups' rows, zero-padded to a common ``m``, as a
                tensor or as a :class:`RowOperator` (products only: conv patches, one-hot rows).
            adjoint: ``[C, m, h_out]`` the matching adjoint rows.
            exact: keep the rows themselves for an exact host-side factorisation (cheap when a
                group's rows are no more than a sketch's width).
            tie: ``(position [m], P)``: the position (time step, output pixel) of every row, for
                the tying spectrum: σ of the ``P × (h_in·h_out)`` matrix whose rows are the
                per-position contributions ``Σ_r∈p a_rᵀδ_r`` to the group's gradient.
            counts: ``[C]`` float64 samples per group in the step, on the rows' device: what the
                epoch leaves out (:attr:`EpochSpectra.excluded`) if the products are not finite.
        """
        if self._device != adjoint.device:
            self._setup(adjoint.device)
        a = DenseRows(activation) if isinstance(activation, torch.Tensor) else activation
        d = adjoint.to(torch.float32)
        if self._seed_from_data:
            self._seed_from_data = False
            self._seed(a, d)
        # Orthonormal blocks B = [Ω | W]: the warm block is kept orthogonal to Ω (re-orthogonalised
        # whenever either changes), so the epoch part stays exactly Ω (linear epoch sketches) and
        # the host needs no basis Gram.
        b_in, b_out = self._block("in"), self._block("out")
        s_in, s_out, norms = row_products(a, d, b_in, b_out, self.widths.identity)
        products = StepProducts(
            s_in, s_out, norms, route="exact" if exact else "sketch", counts=counts
        )
        self._steps += 1
        if exact:
            products.rows = {"activation": a.dense(), "adjoint": d}
            if tie is not None:
                products.rows["position"] = tie[0]
        elif tie is not None:
            if a.shape[1] <= TIED_EXACT_ROWS:
                products.rows["tied"] = self._tying_gram_exact(a, d, *tie)
            else:
                q_in = orthonormalize(b_in).to(torch.float32)
                q_out = orthonormalize(b_out).to(torch.float32)
                products.rows["tied"] = self._tying_gram(a.mm(q_in), d @ q_out, *tie)
        return products

    def warm_started(self, device: torch.device) -> bool:
        """Set up on ``device`` and seeded (its blocks hold directions): its sketched-route
        products may run batched with other layers' (:func:`products_of_layers`)."""
        return self._device == device and not self._seed_from_data

    def step(
        self,
        activation: RowOperator | torch.Tensor,
        adjoint: torch.Tensor,
        exact: bool,
        tie: tuple[torch.Tensor, int] | None = None,
    ) -> StepSketch:
        """:meth:`products` and the bank's :meth:`SketchBank.finish` for this layer alone."""
        products = self.products(activation, adjoint, exact, tie)
        packed = self.bank.finish({self.slot: products})
        return self.sketch_of(products.route, products.rows, packed)

    def sketch_of(
        self,
        route: str,
        rows: dict[str, torch.Tensor],
        packed: torch.Tensor | np.ndarray,
    ) -> StepSketch:
        """What this layer sends to the host: its rows (exact route; the tied Gram on the
        sketched route) and its slot of the bank's packed output (sketched route), on the device
        or already on the host."""
        if route == "exact":
            return StepSketch("exact", dict(rows))
        return StepSketch("sketch", {**self.bank.unpack(packed, self.slot), **rows})

    def _seed(self, a: RowOperator, d: torch.Tensor) -> None:
        """The run's first step: power-iterate the warm blocks on its data, then take the first
        epoch's test matrices as their top-k directions plus fresh columns (a cold one-pass
        sketch of a flat spectrum would be off by tens of percent in its first epoch)."""
        w, k = self.widths, self.rank
        warm = {"in": self.warm("in").clone(), "out": self.warm("out").clone()}
        for _ in range(WARMUP_ITERATIONS):
            if w.warm_in:
                warm["in"] = _keep_valid(warm["in"], a.tmm(a.mm(warm["in"])))
            if w.warm_out:
                warm["out"] = _keep_valid(warm["out"], d.mT @ (d @ warm["out"]))
        g, c = self._generator, self.n_groups
        for side, dim, width in (("in", self.h_in, w.warm_in), ("out", self.h_out, w.warm_out)):
            if not width:
                continue  # Ω is the identity: exact already
            top = min(k, width)
            omega = self.omega(side)
            fresh = omega[..., : omega.shape[-1] - top]
            block = torch.cat([warm[side][..., :top], fresh], dim=2)
            omega.copy_(orthonormalize(block))
            # The warm block went into Ω: restart it from fresh directions orthogonal to Ω.
            fresh_warm = torch.as_tensor(_orthonormal(g, c, dim, width), dtype=torch.float32)
            self.warm(side).copy_(_against(omega, fresh_warm.to(self._device)))

    @staticmethod
    def _tying_gram_exact(
        a: RowOperator, d: torch.Tensor, position: torch.Tensor, n_positions: int
    ) -> torch.Tensor:
        """Exact ``[C, P, P]`` Gram of the tying matrix: ``Sᵀ((AAᵀ) ⊙ (ΔΔᵀ))S``, ``S`` the
        row → position indicator (``O(m²(h_in + h_out))``, used while ``m ≤ TIED_EXACT_ROWS``)."""
        rows = a.dense().to(torch.float64)
        adj = d.to(torch.float64)
        products = (rows @ rows.mT) * (adj @ adj.mT)  # [C, m, m]
        c, m, _ = products.shape
        by_row = products.new_zeros((c, n_positions, m)).index_add_(1, position, products)
        return by_row.new_zeros((c, n_positions, n_positions)).index_add_(2, position, by_row)

    @staticmethod
    def _tying_gram(
        a_hat: torch.Tensor, d_hat: torch.Tensor, position: torch.Tensor, n_positions: int
    ) -> torch.Tensor:
        """Gram of the per-position gradient contributions projected on orthonormal bases.

        Row ``p`` of the tying matrix is ``vec(Σ_{r at p} a_rᵀδ_r)``; projected on the bases
        (``â = AQ_in``, ``d̂ = ΔQ_out``) it is ``Σ_r â_r ⊗ d̂_r``: exact when the bases span the
        rows, otherwise a lower bound (a projection only removes energy) missing what lies outside
        the leading subspaces of A and Δ. Returns the float64 Gram of the smaller side.
        """
        c, m, fa = a_hat.shape
        fd = d_hat.shape[-1]
        features = (a_hat.unsqueeze(-1) * d_hat.unsqueeze(-2)).reshape(c, m, fa * fd)
        per_position = features.new_zeros((c, n_positions, fa * fd))
        per_position.index_add_(1, position, features)
        t = per_position.to(torch.float64)
        return t @ t.mT if n_positions <= fa * fd else t.mT @ t

    # -- the epoch (between epochs: host sync allowed) ----------------------------------------

    def end_epoch(self) -> EpochSpectra:
        """Reconstruct the epoch's spectra from its sketches, then reset for the next epoch.

        Returns:
            Unnormalised singular values per group (``[C, r]``; NaN for a kind whose sketches
            hold non-finite values, which steps with non-finite products never reach; empty when
            the layer saw no step this epoch), and the samples left out.
        """
        c = self.n_groups
        if self._device is None or self._steps == 0:  # no step this epoch: keep Ω as it is
            empty = np.full((c, 0), np.nan)
            return EpochSpectra(empty, empty, empty, np.zeros(c))
        self._steps = 0
        host = {  # copies: a float64 CPU tensor would otherwise come back as a view of the state
            name: v.detach().to("cpu", torch.float64, copy=True).numpy()
            for name, v in self.state_dict().items()
        }
        host["omega_in"] = self.omega("in").to("cpu", torch.float64).numpy()
        host["omega_out"] = self.omega("out").to("cpu", torch.float64).numpy()
        out: dict[str, list[np.ndarray]] = {kind: [] for kind in _KIND_SKETCHES}
        directions: dict[str, list[np.ndarray | None]] = {"in": [], "out": []}
        nan = np.full(1, np.nan)
        for i in range(c):
            finite = {
                kind: all(np.isfinite(host[name][i]).all() for name in names)
                for kind, names in _KIND_SKETCHES.items()
            }
            for kind, side, omega, sketch in (
                ("activation", "in", "omega_in", "y_a"),
                ("adjoint", "out", "omega_out", "y_d"),
            ):
                if not finite[kind]:
                    out[kind].append(nan)
                    directions[side].append(None)
                    continue
                lam, u = nystrom(host[omega][i], host[sketch][i])
                out[kind].append(np.sqrt(lam))
                directions[side].append(u[:, : _n_positive(lam, self.rank)])
            if not finite["gradient"]:
                out["gradient"].append(nan)
                continue
            y, x = host["y_g"][i], host["x_g"][i]
            out["gradient"].append(
                generalized_nystrom_values((y.T @ y)[None], (x @ x.T)[None], host["z_g"][i][None])[
                    0
                ]
            )
        self._warm_start(host, directions)
        self._reset_sketches()
        return EpochSpectra(
            _pad_rows(out["activation"]),
            _pad_rows(out["adjoint"]),
            _pad_rows(out["gradient"]),
            host["excluded"],
        )

    def _warm_start(
        self, host: dict[str, np.ndarray], directions: dict[str, list[np.ndarray | None]]
    ) -> None:
        """Next epoch's Ω: this epoch's top-k directions plus fresh Gaussian columns (one power
        iteration per epoch; ALGORITHMS.md measured ≤ 0.1% after a few epochs without drift)."""
        for side in ("in", "out"):
            current = host[f"omega_{side}"]
            dim, width = current.shape[1], current.shape[2]
            if width >= dim:  # the identity: already exact
                continue
            fresh = _random(self._generator, self.n_groups, dim, width)
            for i, found in enumerate(directions[side]):
                if found is not None and found.size:
                    fresh[i, :, : found.shape[1]] = found
            omega = self.omega(side)
            omega.copy_(torch.as_tensor(np.linalg.qr(fresh)[0], dtype=torch.float32))
            self.warm(side).copy_(_against(omega, self.warm(side)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The epoch sketches and the samples they left out (views). Sketches taken with the
        same test matrices add: data-parallel ranks would merge by summing, once they share
        ``Ω`` (each rank now seeds its own from its first step's data)."""
        w, bank, i = self.widths, self.bank, self.slot
        ei = w.epoch_in
        return {
            "y_a": bank.epoch_in[i][..., :ei],
            "y_d": bank.epoch_out[i][..., ei:],
            "y_g": bank.epoch_in[i][..., ei:],
            "x_g": bank.epoch_out[i][..., :ei].mT,
            "z_g": bank.epoch_core[i],
            "excluded": bank.epoch_excluded[i],
        }


def _against(omega: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``orth((I − ΩΩᵀ)W)``: an orthonormal block orthogonal to ``Ω`` (empty stays empty)."""
    if not w.shape[-1]:
        return w
    return orthonormalize(w, against=omega).to(torch.float32)


def _keep_valid(
    old: torch.Tensor, y: torch.Tensor, omega: torch.Tensor | None = None
) -> torch.Tensor:
    """``orth(y)`` (orthogonal to ``omega`` if given) per group where it is usable, else the
    group's previous block.

    A group absent from the step (zero rows) or a step with NaN/Inf would otherwise zero or
    poison its warm block for the rest of the run. Decided on the device (``torch.where``): no
    host sync.
    """
    new = orthonormalize(y, against=omega).to(torch.float32)
    # Usable: every column finite and nonzero, read off the column norms (NaN fails ``> 0``;
    # orthonormal entries are bounded, so only a non-finite entry makes a norm infinite).
    norms = new.square().sum(dim=-2, keepdim=True)
    usable = ((norms > 0) & torch.isfinite(norms)).all(dim=-1, keepdim=True)
    return torch.where(usable, new, old)


def _n_positive(values: np.ndarray, rank: int) -> int:
    return min(rank, int(np.count_nonzero(values > 0)))


def _pad_rows(rows: list[np.ndarray]) -> np.ndarray:
    width = max((r.size for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : r.size] = r
    return out
