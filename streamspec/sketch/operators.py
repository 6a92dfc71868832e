"""Group-blocked activation matrices known through their products.

The trackers need only ``A @ X`` and ``Aᵀ @ Y`` of a group-blocked activation matrix
``A [C, m, h_in]`` (``C`` groups, ``m`` rows each, zero-padded). For a Linear layer ``A`` is
explicit; for a convolution it is the unfolded input patches, which can be far larger than the
input itself, so the products are a convolution and a convolution weight-gradient call instead;
for an embedding ``A`` is one-hot rows, so the products are a gather and a scatter-add.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn import grad as nn_grad

from streamspec.sketch.linalg import bmm, tbmm


class RowOperator(Protocol):
    """``A [C, m, h]``: all groups' activation rows, zero rows for padding."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ x``: ``[C, h, w]`` → ``[C, m, w]`` (float32)."""
        ...

    def tmm(self, y: torch.Tensor) -> torch.Tensor:
        """``Aᵀ @ y``: ``[C, m, w]`` → ``[C, h, w]`` (float32)."""
        ...

    def dense(self) -> torch.Tensor:
        """The explicit ``[C, m, h]`` float32 matrix (used when ``m`` is small)."""
        ...

    def sq_norm(self) -> torch.Tensor:
        """``[C]`` squared Frobenius norms ``‖A_c‖²_F`` (float64)."""
        ...


class DenseRows:
    """An explicit ``[C, m, h]`` matrix (Linear layers)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows.to(torch.float32)

    @property
    def shape(self) -> tuple[int, int, int]:
        c, m, h = self.rows.shape
        return (c, m, h)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return bmm(self.rows, x)

    def tmm(self, y: torch.Tensor) -> torch.Tensor:
        return tbmm(self.rows, y)

    def dense(self) -> torch.Tensor:
        return self.rows

    def sq_norm(self) -> torch.Tensor:
        return sq_norms(self.rows)


class StackedRows:
    """Rows of several operators stacked (a module called several times in one step)."""

    def __init__(self, parts: Sequence[RowOperator]) -> None:
        self.parts = list(parts)
        self._sizes = [p.shape[1] for p in self.parts]

    @property
    def shape(self) -> tuple[int, int, int]:
        c, _, h = self.parts[0].shape
        return (c, sum(self._sizes), h)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.mm(x) for p in self.parts], dim=1)

    def tmm(self, y: torch.Tensor) -> torch.Tensor:
        blocks = torch.split(y, self._sizes, dim=1)
        out = self.parts[0].tmm(blocks[0])
        for p, b in zip(self.parts[1:], blocks[1:], strict=True):
            out = out + p.tmm(b)
        return out

    def dense(self) -> torch.Tensor:
        return torch.cat([p.dense() for p in self.parts], dim=1)

    def sq_norm(self) -> torch.Tensor:
        return torch.stack([p.sq_norm() for p in self.parts]).sum(dim=0)


def gram_with(a: RowOperator, d: torch.Tensor) -> torch.Tensor:
    """``[A | Δ]ᵀ[A | Δ]`` ``[C, h + h_out, h + h_out]`` with the rows ``d`` ``[C, m, h_out]``:
    convolution patches in their own channel-major layout (:meth:`ConvRows.gram_with`), other
    rows made explicit."""
    if isinstance(a, ConvRows):
        return a.gram_with(d)
    x = torch.cat([a.dense(), d], dim=2)
    return tbmm(x, x)


def sq_norms_pair(a: RowOperator, d: torch.Tensor) -> torch.Tensor:
    """``[C, 2]`` float64 ``(‖A_c‖²_F, ‖Δ_c‖²_F)``: what :func:`sq_norms` gives for each, with
    one stacked conversion and sum when ``A`` is explicit rows (they have ``Δ``'s row count)."""
    if isinstance(a, DenseRows):
        norms = torch.stack(
            [torch.linalg.vector_norm(a.rows, dim=-1), torch.linalg.vector_norm(d, dim=-1)], dim=1
        )
        return norms.to(torch.float64).square().sum(dim=-1)
    return torch.stack([a.sq_norm(), sq_norms(d)], dim=1)


def sq_norms(rows: torch.Tensor) -> torch.Tensor:
    """``[C]`` float64 ``‖X_c‖²_F`` of ``[C, m, h]`` rows: float32 row norms summed in float64
    (no squared copy of the rows; relative error ≈ ε₃₂, where one float32 reduction over all
    ``m·h`` entries drifts to ≈ 5e-5 on this project's CPUs)."""
    return torch.linalg.vector_norm(rows, dim=-1).to(torch.float64).square().sum(dim=-1)


def stack_rows(parts: Sequence[RowOperator]) -> RowOperator:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, DenseRows) for p in parts):
        return DenseRows(torch.cat([p.dense() for p in parts], dim=1))
    return StackedRows(parts)


def convolves(rows: RowOperator | torch.Tensor) -> bool:
    """Whether products with ``rows`` run convolutions (whose float32 precision PyTorch sets
    apart from matmuls'): unfolded patches, or a stack holding some."""
    if isinstance(rows, StackedRows):
        return any(convolves(p) for p in rows.parts)
    return isinstance(rows, ConvRows)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT = {1: nn_grad.conv1d_weight, 2: nn_grad.conv2d_weight, 3: nn_grad.conv3d_weight}


class ConvRows:
    """Unfolded input patches of an N-d convolution (``groups=1``), never materialised.

    Rows are ordered (sample, output position); columns (in_channel, kernel offsets…), the order
    of ``weight.view(out, -1)``. All groups run in one call: the ``C`` groups become the
    convolution's ``groups``.

    Args:
        inputs: ``[C, n, in, *spatial]`` the groups' samples (already padded if the layer pads
            with a mode other than zeros), zero samples for padding.
        kernel: kernel size per spatial dim.
        stride, padding, dilation: as the layer's (``padding`` numeric).
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        kernel: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
    ) -> None:
        self.inputs = inputs.to(torch.float32)
        self.kernel = tuple(kernel)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.dims = len(self.kernel)
        c, n, channels = inputs.shape[:3]
        self._c, self._n, self._channels = c, n, channels
        spatial = inputs.shape[3:]
        out = [
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(
                spatial, self.kernel, self.stride, self.padding, self.dilation, strict=True
            )
        ]
        self.out_spatial = tuple(out)
        self.positions = 1
        for o in out:
            self.positions *= o
        self.h = channels * int(torch.tensor(self.kernel).prod())
        # [n, C·in, *spatial]: groups side by side along channels, one grouped convolution.
        self._batched = self.inputs.transpose(0, 1).reshape(n, c * channels, *spatial)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self._c, self._n * self.positions, self.h)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        c, _, w = x.shape
        weight = x.mT.reshape(c * w, self._channels, *self.kernel)
        out = _CONV[self.dims](
            self._batched, weight, None, self.stride, self.padding, self.dilation, c
        )  # [n, C·w, *out]
        out = out.reshape(self._n, c, w, self.positions).permute(1, 0, 3, 2)
        return out.reshape(c, self._n * self.positions, w)

    def tmm(self, y: torch.Tensor) -> torch.Tensor:
        c, _, w = y.shape
        grad_out = y.reshape(c, self._n, self.positions, w).permute(1, 0, 3, 2)
        grad_out = grad_out.reshape(self._n, c * w, *self.out_spatial)
        weight = _CONV_WEIGHT[self.dims](
            self._batched,
            (c * w, self._channels, *self.kernel),
            grad_out,
            self.stride,
            self.padding,
            self.dilation,
            c,
        )  # [C·w, in, *kernel]
        return weight.reshape(c, w, self.h).mT

    def patches(self) -> torch.Tensor:
        """The patches themselves, channel-major: ``[C, n, h, P]`` (one copy out of strided views
        of the input, in the group-major order the Gram's batched products merge without another
        copy: 8× faster than a convolution with identity filters for a 3-D kernel on one
        channel, measured on this project's CPU)."""
        x = self._batched  # [n, C·in, *spatial]
        if any(self.padding):
            x = F.pad(x, [p for p in reversed(self.padding) for _ in (0, 1)])
        for i, (k, s, d) in enumerate(zip(self.kernel, self.stride, self.dilation, strict=True)):
            x = x.unfold(2 + i, (k - 1) * d + 1, s)  # appends the window as the last dim
            if d > 1:
                x = x[..., ::d]
        # [n, C·in, *out, *kernel] → [C, n, in, *kernel, *out]
        x = x.unflatten(1, (self._c, self._channels))
        dims = self.dims
        order = (1, 0, 2, *range(3 + dims, 3 + 2 * dims), *range(3, 3 + dims))
        return x.permute(order).reshape(self._c, self._n, self.h, self.positions)

    def dense(self) -> torch.Tensor:
        # [C, n, h, P] → [C, n·P, h]
        return self.patches().mT.reshape(self._c, -1, self.h)

    def gram_with(self, d: torch.Tensor) -> torch.Tensor:
        """``[A | Δ]ᵀ[A | Δ]`` ``[C, h + h_out, h + h_out]`` with the rows ``d`` ``[C, m, h_out]``,
        by blocks: ``AᵀA`` and ``AᵀΔ`` as a (group, sample) batch of ``[h, P]`` products summed
        over the samples, the patches in the convolution's channel-major layout, and ``ΔᵀΔ``.
        (A first convolution over a volume: few columns, very many positions.) Concatenating
        ``[A | Δ]`` first cost a transposing copy of the rows and another of the patches, more
        than the products themselves (27.3 → 11.4 ms for ``Conv3d(1, 16, 3)`` on 8 volumes of
        32³, this project's CPU)."""
        c, n, p, h, h_out = self._c, self._n, self.positions, self.h, d.shape[-1]
        # [C·n, P, h]: the patches as rows (a transposed view); split-K on CUDA (``tbmm``).
        patches = self.patches().mT.flatten(0, 1)
        rows = d.reshape(c * n, p, h_out)  # (a view of contiguous rows)
        a_a = tbmm(patches, patches).view(c, n, h, h).sum(dim=1)
        a_d = tbmm(patches, rows).view(c, n, h, h_out).sum(dim=1)
        d_d = tbmm(d, d)
        return torch.cat([torch.cat([a_a, a_d], dim=2), torch.cat([a_d.mT, d_d], dim=2)], dim=1)

    def sq_norm(self) -> torch.Tensor:
        # Σ over patches of squared entries = Σ over input entries of x² times the number of
        # patches covering the entry, a product over the spatial dims of 1-D counts (a patch
        # picks its window in each dim independently): one weighted sum over the input, where a
        # convolution of x² with a ones kernel took 4 ms on this project's CPU for a
        # Conv3d(16, 32, 3) on 8 volumes of 15³. The counts are integers (≤ ∏ kernel), exact in
        # float32, so the weighting rounds once.
        weight: torch.Tensor | None = None
        geometry = zip(
            self.inputs.shape[3:],
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            self.out_spatial,
            strict=True,
        )
        for i, (size, k, s, p, d, out) in enumerate(geometry):
            counts = _window_counts(size, k, s, p, d, out, self.inputs.device)
            counts = counts.view(size, *([1] * (self.dims - 1 - i)))
            weight = counts if weight is None else weight * counts
        assert weight is not None
        squares = self.inputs.square().mul_(weight)  # [C, n, in, *spatial]
        return squares.flatten(1).sum(dim=1, dtype=torch.float64)


def _window_counts(
    size: int, kernel: int, stride: int, pad: int, dilation: int, out: int, device: torch.device
) -> torch.Tensor:
    """How many of a convolution's windows cover each input index along one dim: ``[size]``
    float32, computed on ``device`` (no copy to it, no host sync, whatever the input's size
    from step to step): index ``i`` is tap ``t`` of window ``o`` when ``i + pad − t·dilation
    = o·stride`` with ``0 ≤ o < out``."""
    i = torch.arange(pad, size + pad, dtype=torch.int32, device=device).unsqueeze(1)
    t = torch.arange(0, kernel * dilation, dilation, dtype=torch.int32, device=device)
    q = i - t  # [size, kernel]: o·stride where a window's tap t lands on i
    valid = (q >= 0) & (q < out * stride)
    if stride > 1:
        valid &= q.remainder(stride) == 0
    return valid.sum(dim=1, dtype=torch.float32)


class OneHotRows:
    """One-hot rows of an embedding lookup: ``A[r, idx_r] = 1`` (``idx_r < 0``: a zero row).

    Args:
        indices: ``[C, m]`` int64 token indices per group row, -1 for padding / excluded rows.
        vocabulary: number of embeddings (columns of ``A``).
    """

    def __init__(self, indices: torch.Tensor, vocabulary: int) -> None:
        self.valid = indices >= 0
        self.indices = indices.clamp(min=0)
        self.vocabulary = vocabulary
        self._mask = self.valid.unsqueeze(-1).to(torch.float32)

    @property
    def shape(self) -> tuple[int, int, int]:
        c, m = self.indices.shape
        return (c, m, self.vocabulary)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        c, _, w = x.shape
        gathered = torch.gather(x, 1, self.indices.unsqueeze(-1).expand(c, -1, w))
        return gathered * self._mask

    def tmm(self, y: torch.Tensor) -> torch.Tensor:
        c, _, w = y.shape
        out = y.new_zeros((c, self.vocabulary, w))
        return out.scatter_add_(1, self.indices.unsqueeze(-1).expand(c, -1, w), y * self._mask)

    def dense(self) -> torch.Tensor:
        c, m = self.indices.shape
        out = torch.zeros((c, m, self.vocabulary), dtype=torch.float32, device=self.indices.device)
        return out.scatter_(2, self.indices.unsqueeze(-1), self._mask)

    def sq_norm(self) -> torch.Tensor:
        return self.valid.sum(dim=1, dtype=torch.float64)
