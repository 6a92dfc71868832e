"""Per-sample group labels → where each group's rows sit, so all groups go through one product."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from streamspec.errors import StreamspecError


def as_labels(labels: object, n_groups: int) -> torch.Tensor:
    """Validate ``mon.label()``'s argument; return a CPU int64 tensor ``[B]``.

    Accepts a 1-D integer tensor (any device; a GPU tensor costs one copy to the host), numpy array
    or sequence. Values index the groups; -1 marks a sample that belongs to no group.
    """
    if isinstance(labels, torch.Tensor):
        t = labels.detach()
        if t.device.type == "meta":
            raise StreamspecError.build(
                "labels with values", "a tensor on the meta device (no data)", "pass real labels"
            )
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise StreamspecError.build(
                "integer group indices", f"a tensor of dtype {t.dtype}", "pass labels.long()"
            )
        t = t.to("cpu", torch.int64)
    else:
        arr = np.asarray(labels)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.integer) or (arr.size == 0 and arr.dtype == np.float64)
        ):
            raise StreamspecError.build(
                "integer group indices (tensor, array or list of int)",
                f"values of dtype {arr.dtype}",
                "pass one integer per sample: an index into `groups`, or -1 for no group",
            )
        if arr.size and np.issubdtype(arr.dtype, np.unsignedinteger) and arr.max() >= n_groups:
            bad_values = arr[arr >= n_groups]  # (before int64 would wrap them negative)
            raise StreamspecError.build(
                f"group indices in [0, {n_groups - 1}] or -1 (no group)",
                f"{bad_values[:5].tolist()}{' …' if bad_values.size > 5 else ''}",
                "map each sample to the position of its group in `groups`",
            )
        t = torch.as_tensor(arr.astype(np.int64))
    if t.dim() != 1:
        raise StreamspecError.build(
            "a 1-D sequence of group indices, one per sample",
            f"shape {tuple(t.shape)}",
            "flatten the labels, e.g. labels.view(-1)",
        )
    if t.numel() and (int(t.min()) < -1 or int(t.max()) >= n_groups):
        bad = t[(t < -1) | (t >= n_groups)]
        raise StreamspecError.build(
            f"group indices in [0, {n_groups - 1}] or -1 (no group)",
            f"{bad[:5].tolist()}{' …' if bad.numel() > 5 else ''}",
            "map each sample to the position of its group in `groups`",
        )
    return t


class GroupPlan:
    """Where each group's samples sit in a batch labelled by one ``label()`` call.

    The rows of all groups are gathered into one zero-padded ``[C, n_max, …]`` tensor so that
    every product runs once for all groups (a batched matmul), never in a Python loop over groups.

    Attributes:
        counts: ``[C]`` int64 numpy, samples per group (``n_c``).
        n_max: the largest count (0 when no sample has a group).
        batch_size: number of labels.
    """

    def __init__(self, labels: torch.Tensor, n_groups: int) -> None:
        self.batch_size = int(labels.numel())
        self.n_groups = n_groups
        valid = labels >= 0
        grouped = labels[valid]
        self.counts = np.bincount(grouped.numpy(), minlength=n_groups).astype(np.int64)
        self.n_max = int(self.counts.max(initial=0))
        order = torch.argsort(grouped, stable=True)
        self._src = torch.nonzero(valid).view(-1)[order]  # sample indices, group by group
        starts = torch.as_tensor(np.concatenate([[0], np.cumsum(self.counts)[:-1]]))
        sorted_groups = grouped[order]
        within = torch.arange(sorted_groups.numel()) - starts[sorted_groups]
        self._dst = sorted_groups * self.n_max + within  # slot in the padded [C * n_max] layout
        self._dense = bool(self.n_max) and int(self.counts.sum()) == self.n_groups * self.n_max
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._on:
            # Labels live on the host; small non-blocking copies per label() call and device.
            self._on[device] = (
                self._src.to(device, non_blocking=True),
                self._dst.to(device, non_blocking=True),
                torch.as_tensor(self.counts, dtype=torch.float64).to(device, non_blocking=True),
            )
        return self._on[device]

    def counts_on(self, device: torch.device) -> torch.Tensor:
        """``[C]`` float64 :attr:`counts` on ``device`` (copied once per device)."""
        return self._indices(device)[2]

    def gather_samples(
        self, x: torch.Tensor, fill: float = 0, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, …]`` → ``[C, n_max, …]``: each group's samples in a block, ``fill`` for padding;
        into ``out`` (``C·n_max`` samples' worth of ``x``'s dtype, contiguous) if given."""
        src, dst, _ = self._indices(x.device)
        shape = (self.n_groups * self.n_max, *x.shape[1:])
        if self._dense:  # every group has n_max samples: no padding, one copy
            flat = torch.index_select(x, 0, src, out=None if out is None else out.view(shape))
        else:
            flat = x.new_full(shape, fill) if out is None else out.view(shape).fill_(fill)
            flat.index_copy_(0, dst, x.index_select(0, src))
        return flat.view(self.n_groups, self.n_max, *x.shape[1:])

    def gather(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, h]`` samples-first rows → ``[C, n_max·T, h]`` group blocks, zero-padded (into
        ``out``, of that shape and ``rows``' dtype, if given)."""
        _, t, h = rows.shape
        return self.gather_samples(rows, out=out).view(self.n_groups, self.n_max * t, h)


def describe(values: Sequence[object], limit: int = 8) -> str:
    """Short, readable listing for error messages."""
    shown = ", ".join(map(str, list(values)[:limit]))
    return shown + (" …" if len(values) > limit else "")
