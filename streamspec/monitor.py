"""``streamspec.watch()`` and the Monitor: hooks, trackers, schedule, writer, view; nothing numeric.

A *step* is one backward pass through the watched layers. Per watched module call, a forward hook
keeps the (detached) activation rows and puts a tensor hook on the output; when the output's
gradient arrives, the adjoint rows are paired with the activation rows and, once every call of the
module in the step has delivered its gradient, the layer's tracker folds them in (device products
only). At the end of the backward pass (an autograd engine callback) the step's sketches are copied
to the host asynchronously and handed to the host pipeline.
"""

from __future__ import annotations

import concurrent.futures.thread
import contextlib
import functools
import os
import sys
import threading
import time
import warnings
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn
from torch.profiler import record_function

from streamspec import lifecycle
from streamspec.capture import Site, family_of
from streamspec.capture.groups import GroupPlan, as_labels, describe
from streamspec.capture.registry import (
    BatchDim,
    Capture,
    DenseSource,
    RowSource,
    as_batch_dim,
    batch_dim_of,
    check_batch_dim_names,
)
from streamspec.capture.swap import restore, swap_stepwise
from streamspec.capture.validate import unsupported_matrices
from streamspec.errors import StreamspecError, StreamspecWarning
from streamspec.layout import KINDS, NORMALIZE_CHOICES, RunLayout
from streamspec.live.snapshot import Snapshot
from streamspec.live.view import LiveView
from streamspec.pipeline import EpochRecord, HostPipeline, LayerStep, StepRecord
from streamspec.sketch.device import as_written
from streamspec.sketch.operators import DenseRows, RowOperator, convolves, stack_rows
from streamspec.sketch.tracker import (
    LayerTracker,
    SketchBank,
    SketchWidths,
    StepProducts,
    finish_banks,
    merge_products,
    products_of_layers,
    stacked_products,
)
from streamspec.store.writer import ArchiveWriter

QUEUED_STEPS = 64  # recorded steps waiting for the host thread (back-pressure beyond)
# Layers of one bank whose sketched-route products run together (see batch_layers()).
BATCH_BYTES = 256 << 20  # gathered rows one bank holds for its next batch, at most
QUEUED_BYTES = 4 * BATCH_BYTES  # gathered rows all banks of a device hold together, at most
FLUSH_EVERY = 256 - QUEUED_STEPS  # rows the writer buffers before writing a block


@dataclass(frozen=True)
class WatchConfig:
    """The options of :func:`watch`, validated."""

    groups: tuple[str, ...]
    rank: int
    every: int = 1
    normalize: str = "mean"
    batch_dim: BatchDim = 0
    seed: int = 0
    oversample: int = 10
    exact_rows: int | None = None
    on_unsupported: str = "warn"
    tied: bool = False

    @property
    def sketch_width(self) -> int:
        return self.rank + self.oversample

    @property
    def exact_threshold(self) -> int:
        """Largest per-group row count sent to the host as rows (exact route)."""
        return self.sketch_width if self.exact_rows is None else self.exact_rows


def _check_config(
    groups: object,
    rank: object,
    every: object,
    normalize: object,
    batch_dim: object,
    oversample: object,
    exact_rows: object,
) -> tuple[str, ...]:
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise StreamspecError.build(
            "groups as a sequence of unique names, e.g. ['HC', 'SZ']",
            repr(groups),
            "pass a list of group names; labels index into it",
        )
    names = tuple(str(g) for g in groups)
    if not names:
        raise StreamspecError.build(
            "at least one group name", "an empty sequence", "pass e.g. groups=['HC', 'SZ']"
        )
    dupes = sorted({g for g in names if names.count(g) > 1})
    if dupes:
        raise StreamspecError.build(
            "unique group names", f"duplicates {dupes}", "give every group its own name"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise StreamspecError.build(
            "rank as an integer k ≥ 1", repr(rank), "pass e.g. rank=16 (the number of σ kept)"
        )
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise StreamspecError.build(
            "every as an integer ≥ 1", repr(every), "pass every=1 to record every step"
        )
    if normalize not in NORMALIZE_CHOICES:
        raise StreamspecError.build(
            f"normalize in {NORMALIZE_CHOICES}", repr(normalize), "use 'mean' (default) or 'sum'"
        )
    as_batch_dim(batch_dim)
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise StreamspecError.build(
            "oversample as an integer ≥ 0", repr(oversample), "leave the default (10)"
        )
    if exact_rows is not None and (
        isinstance(exact_rows, bool) or not isinstance(exact_rows, int) or exact_rows < 0
    ):
        raise StreamspecError.build(
            "exact_rows as None or an integer ≥ 0", repr(exact_rows), "leave the default (None)"
        )
    return names


def _sample_dims(
    model: nn.Module, sites: list[Site], batch_dim: BatchDim
) -> tuple[dict[int, int], set[int]]:
    """The sample dimension of each watched module's inputs (``id(module) → dim``; stepwise
    modules, whose twins read their own layout, absent), and the modules that take it from
    ``watch(batch_dim=)`` (the others follow their own layout: :func:`_own_layout`).

    A module registered under several names (shared) takes the dim they all resolve to, and is
    refused if they differ.
    """
    names: dict[int, list[str]] = {}
    parents: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        for child in module.children():
            parents.setdefault(id(child), module)
    check_batch_dim_names(batch_dim, {n for group in names.values() for n in group})
    dims: dict[int, int] = {}
    mapped: set[int] = set()
    for site in sites:
        module = site.module
        own = _own_layout(module, parents.get(id(module)))
        if own is not None:
            if own >= 0:
                dims[id(module)] = own
            continue
        found = {n: batch_dim_of(n, batch_dim) for n in names.get(id(module), [""])}
        if len(set(found.values())) > 1:
            raise StreamspecError.build(
                "one sample dimension per module (batch_dim)",
                f"a module shared under several names that batch_dim maps to different dims: "
                f"{found}",
                "map all of its names to the same dim",
            )
        dims[id(module)] = next(iter(found.values()))
        mapped.add(id(module))
    return dims, mapped


def _own_layout(module: nn.Module, parent: nn.Module | None) -> int | None:
    """The sample dim of a module whose inputs follow its own layout, not ``batch_dim``: 0 for
    convolutions, and MultiheadAttention's ``out_proj``, which its stepwise twin calls in the
    module's layout (0 with ``batch_first``, else 1); -1 for stepwise modules (attention, RNNs:
    their twins read their own ``batch_first``); None for the others."""
    if isinstance(parent, nn.MultiheadAttention) and parent.out_proj is module:
        return 0 if parent.batch_first else 1
    if isinstance(module, nn.modules.conv._ConvNd):
        return 0
    family = family_of(module)
    return -1 if family is not None and family.stepwise else None


def find_sites(model: nn.Module) -> list[Site]:
    """Every watchable weight matrix of ``model``, in ``named_modules()`` order."""
    sites: list[Site] = []
    for prefix, module in model.named_modules():
        family = family_of(module)
        if family is not None and not family.problems(module):
            sites.extend(family.sites(module, prefix))
    return sites


@dataclass
class _LayerStepState:
    """Per layer, within the current step."""

    calls: int = 0  # forward calls captured (grad enabled)
    shared: bool = False  # a call on ids shared by the batch: the step is not recorded
    # The labellings (mon.label() calls) of the calls whose gradient arrived, by id: usually
    # one; several when labelled batches go through separate forwards before one backward.
    plans: dict[int, GroupPlan] = field(default_factory=dict)
    pending: list[tuple[RowOperator, torch.Tensor, int, GroupPlan]] = field(default_factory=list)
    positions: int = 0
    group_rows: np.ndarray | None = None  # [C] rows per group over the step's calls
    n_positions: int = 0
    products: StepProducts | None = None
    slot: tuple[_BatchBuffer, int] | None = None  # where its rows were gathered, if batched
    gathered: bool = False  # a call's rows were gathered (counted in Monitor._gathered)
    # Its calls recomputed inside the backward since a gradient last reached one of them: a
    # [count, claimed] token their hooks share (see Monitor._deliver).
    recomputing: list[Any] | None = None


@dataclass
class _BatchBuffer:
    """One allocation for the gathered rows of a bank's next batch (:meth:`Monitor._slot`):
    each layer is gathered into its own slot, so the batch's products read the slots as one
    stacked tensor, without a stacking copy."""

    rows: torch.Tensor  # [S, C, m, h_in] float32
    adjoints: torch.Tensor  # [S, C, m, h_out] float32
    # The CUDA stream it was allocated on, the only one that writes it (the caching allocator
    # orders reuse of its memory on that stream alone); None on a CPU (never compared with a
    # CUDA stream: ``stream != None`` is False).
    stream: torch.cuda.Stream | None
    used: int = 0  # slots handed out

    @property
    def slot_bytes(self) -> int:
        return (self.rows[0].nbytes + self.adjoints[0].nbytes) if len(self.rows) else 0

    @property
    def free_bytes(self) -> int:
        return (len(self.rows) - self.used) * self.slot_bytes


@dataclass
class _Queued:
    """A layer's gathered rows waiting in its bank's queue (:meth:`Monitor._queue`)."""

    index: int
    rows: torch.Tensor
    adjoint: torch.Tensor
    size: int  # bytes the products read (float32)
    stream: torch.cuda.Stream | None  # the CUDA stream the rows were made on
    slot: tuple[_BatchBuffer, int] | None = None  # the buffer slot the rows are in, if any


class Monitor:
    """A running spectral monitor. Create it with :func:`streamspec.watch`.

    Usage::

        with streamspec.watch(model, groups=["HC", "SZ"], rank=16, store="runs/a.zarr") as mon:
            for epoch in range(E):
                for x, y, g in loader:
                    mon.label(g)             # before the step's forward
                    loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
                mon.end_epoch()
        ds = streamspec.open("runs/a.zarr").to_xarray()
    """

    def __init__(
        self,
        model: nn.Module,
        config: WatchConfig,
        *,
        store: str | os.PathLike[str] | Any | None,
        live: bool | None,
        resume: bool,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise StreamspecError.build(
                "a torch.nn.Module", f"{type(model).__name__}", "pass the model itself"
            )
        self.config = config
        self._grad_scaler = grad_scaler
        problems = unsupported_matrices(model)
        if problems and config.on_unsupported == "error":
            raise StreamspecError.build(
                "a model whose weight matrices streamspec can all watch",
                "; ".join(problems),
                "change those modules, or pass on_unsupported='warn' or 'skip' to watch the rest",
            )
        if problems and config.on_unsupported == "warn":
            warnings.warn(
                f"streamspec does not watch: {'; '.join(problems)}", StreamspecWarning, stacklevel=3
            )
        # Until fully built, the monitor is "closed": twins calling _deliver do nothing; any error
        # below undoes everything done so far (swaps, hooks, threads), leaving the model as it was.
        self._closed = True
        # close() on two threads at once (a SIGTERM's finishing while the script's own close()
        # runs): the second waits for the first, then finds it done.
        self._close_lock = threading.RLock()
        self._handles: list[Any] = []
        self._view: LiveView | None = None
        self._swaps = swap_stepwise(model, _StepwiseSink(self))
        try:
            self._build(model, config, store=store, live=live, resume=resume)
        except BaseException:
            self._abort()
            raise
        self._closed = False
        self._closed_once = False  # close() has run its first part (hooks off, epoch finished)
        self._torn_down = False  # close() has joined the threads and closed the writer
        # A monitor garbage-collected without close() (with its model: the hooks keep it alive
        # otherwise) still writes its recorded steps, stops its host thread and restores
        # numpy's BLAS threads: the host thread does it on its own, since the collection may
        # happen on any thread (zarr's event loop's, where closing the writer would deadlock).
        # Not at the interpreter's exit, where that thread may not get to finish.
        self._finalizer = weakref.finalize(self, self._pipeline.abandon)
        self._finalizer.atexit = False
        # At the process's exit a monitor still open is finished as close() would (lifecycle);
        # unless the thread that drives it (last to label a batch) still runs.
        self._owner = threading.current_thread()
        lifecycle.track(self)
        if self._persistent:  # a SIGTERM no longer loses its unwritten rows
            lifecycle.guard_termination()

    def _build(
        self,
        model: nn.Module,
        config: WatchConfig,
        *,
        store: str | os.PathLike[str] | Any | None,
        live: bool | None,
        resume: bool,
    ) -> None:
        sites = find_sites(model)
        self._check_sites(model, sites)
        self.sites = sites
        # Each watched module's sample dimension (watch(batch_dim=) may map parts of the model);
        # checked before the archive exists, so a typo leaves nothing behind.
        self._sample_dim, self._from_batch_dim = _sample_dims(model, sites, config.batch_dim)
        self.layout = RunLayout(
            layers=tuple(s.name for s in sites),
            groups=config.groups,
            rank=config.rank,
            normalize=config.normalize,
            every=config.every,
            model=type(model).__name__,
            extras=("sigma_tied",) if config.tied else (),
        )
        # A crash loses at most the steps queued for the host thread plus those buffered in the
        # writer: QUEUED_STEPS + FLUSH_EVERY ≤ 256 (the archive's promise).
        self._writer = ArchiveWriter(store, self.layout, resume=resume, flush_every=FLUSH_EVERY)
        self._step = self._writer.start_step
        self._epoch = self._writer.start_epoch
        self._generator = torch.Generator().manual_seed(config.seed)
        self._trackers = _trackers(sites, len(config.groups), config, self._generator)
        self._index = {(id(s.module), s.key): i for i, s in enumerate(sites)}
        self._modules = {id(s.module) for s in sites}
        self._tied = [
            config.tied and bool(getattr(family_of(s.module), "tying", False)) for s in sites
        ]
        self._epoch_counts = np.zeros((len(sites), len(config.groups)), dtype=np.int64)
        self._epoch_steps = 0
        self._labels: torch.Tensor | None = None
        self._plan: GroupPlan | None = None
        self._state = [_LayerStepState() for _ in sites]
        # Per device type (see batch_layers(), side_stream()): how many layers of a bank run
        # their products together, and whether they run on a side stream.
        self._batch_layers = {kind: batch_layers(kind) for kind in ("cpu", "cuda")}
        self._batch_bytes = BATCH_BYTES
        self._queued_bytes = QUEUED_BYTES
        # Per CUDA device: the side stream the row products run on (``side_stream()``), and
        # the devices whose side stream holds products the step has not waited for yet. (On a
        # CPU, STREAMSPEC_SIDE_STREAM=1 routes each layer through the queue, without a stream.)
        self._side = {kind: side_stream(kind) for kind in ("cpu", "cuda")}
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._side_pending: set[torch.device] = set()
        # Per bank: layers of the step whose products wait for a batch, and the buffer its next
        # layers are gathered into (see _slot).
        self._queued: dict[int, list[_Queued]] = {}
        self._open: dict[int, _BatchBuffer] = {}
        self._switched: set[int] = set()  # banks hooked on several streams this step
        self._late: set[int] = set()  # banks with calls recomputed in the backward this step
        # Per bank, this step: its layers called (with a gradient to come) and gathered so far
        # (what a new buffer may expect still to come).
        self._called: dict[int, int] = {}
        self._gathered: dict[int, int] = {}
        self._step_plans: dict[int, GroupPlan] = {}  # every labelling with a gradient this step
        # label() calls since the last step ended, with grad enabled and outside paused() (a
        # labelling for an evaluation under no_grad, or for a paused block, whose labelling is
        # undone when it ends, is no batch of the step; one before a reentrant-checkpointed
        # forward is, though that forward runs without grad).
        self._labels_in_step = 0
        self._counted: dict[int, GroupPlan] = {}  # the labellings _labels_in_step counts
        # Per labelling: its captured calls in the step whose gradient may still come (a
        # paused() backward that keeps no graph spends them: see _spent()).
        self._live: dict[int, tuple[GroupPlan, int]] = {}
        # Recorded calls of the step whose graph may die before their gradient comes (a
        # labelled forward whose backward never runs, e.g. a loss skipped as NaN): a weak
        # reference to each call's hook, which the call's autograd node holds as long as the
        # graph lives, and the calls whose graph died, no longer awaited (_drain_dead).
        self._graph_refs: list[weakref.ref[Any]] = []
        self._dead: deque[tuple[list[_LayerStepState], int]] = deque()
        # Per thread, the labels it last set inside its open paused() block.
        self._block_labels: dict[int, torch.Tensor] = {}
        self._paused = 0  # open paused() blocks (forwards inside them are not watched)
        self._warned_paused_thread = False
        self._warned_partial: set[int] = set()  # layers warned about a partial labelling
        self._callback_queued = False
        self._lock = threading.Lock()  # hooks of a multi-device backward run on several threads
        self._failed: BaseException | None = None
        self._warned_nonfinite = False
        self._warned_shared: set[int] = set()  # modules warned about ids shared by the batch
        self._warned_replica = False  # nn.DataParallel's copies of the watched modules

        self._store_label = _store_label(store)
        self._persistent = _persistent(store)
        self._closed_at_exit = False  # closed by the process's exit (lifecycle), not by close()
        interactive = sys.stdout.isatty()
        use_live = interactive if live is None else bool(live)
        self._pipeline = HostPipeline(
            self.layout,
            [(s.h_in, s.h_out) for s in sites],
            self._writer,
            plain_epoch_lines=(live is None and not interactive),
            store_label=self._store_label,
            max_queue=QUEUED_STEPS,
        )
        self._pipeline.set_epoch(self._epoch)
        unfinished = self._writer.unfinished_epoch()
        if unfinished.n_steps:
            # A resumed run continues an epoch the archive left open (a crash, or close() never
            # reached): its Welch tests cover all of its steps; its epoch spectra only the steps
            # after the resume (the sketches died with the process).
            self._pipeline.restore_epoch(unfinished.sigma)
            self._epoch_steps = unfinished.n_steps
        for module in {id(s.module): s.module for s in sites}.values():
            family = family_of(module)
            if family is not None and not family.stepwise:
                self._handles.append(module.register_forward_hook(self._on_forward))
        if use_live:
            self._view = LiveView(self.snapshot).start()

    def _abort(self) -> None:
        """Undo a half-built monitor (an error inside ``watch()``)."""
        self._remove_hooks()
        if self._view is not None:
            self._view.stop()
        pipeline: HostPipeline | None = getattr(self, "_pipeline", None)
        if pipeline is not None:
            pipeline.close()
        writer: ArchiveWriter | None = getattr(self, "_writer", None)
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()

    # -- public API -----------------------------------------------------------------------------

    @property
    def layers(self) -> tuple[str, ...]:
        return self.layout.layers

    @property
    def groups(self) -> tuple[str, ...]:
        return self.layout.groups

    @property
    def step(self) -> int:
        """Index of the next step (steps completed so far, counting a resumed run's)."""
        return self._step

    @property
    def epoch(self) -> int:
        """Index of the current epoch."""
        return self._epoch

    @staticmethod
    def _check_sites(model: nn.Module, sites: list[Site]) -> None:
        if not sites:
            found = sorted(
                {
                    type(m).__name__
                    for m in model.modules()
                    if any(True for _ in m.parameters(False))
                }
            )
            raise StreamspecError.build(
                "a model with at least one supported layer with trainable weights (Linear, "
                "Conv1d/2d/3d, Embedding, RNN/LSTM/GRU, MultiheadAttention)",
                f"modules with parameters: {describe(found) or 'none'}",
                "watch a model that contains such layers (frozen weights are skipped)",
            )

    def label(self, labels: object) -> None:
        """Set the group of every sample of the coming batch (in force until the next call).

        Args:
            labels: 1-D integers, one per sample: an index into ``groups``, or -1 for no group.
                Pass them on the CPU: labels on a GPU cost one device-to-host copy per call.
        """
        if not self._check_open():
            return
        self._owner = threading.current_thread()
        self._drop_failed_backward()
        t = as_labels(labels, len(self.layout.groups))
        self._labels = t
        self._plan = GroupPlan(t, len(self.layout.groups))
        if self._paused:  # undone when this thread's block ends (unless relabelled since)
            self._block_labels[threading.get_ident()] = t
        elif torch.is_grad_enabled():  # (not a labelling for evaluation under no_grad)
            self._labels_in_step += 1
            self._counted[id(self._plan)] = self._plan

    @contextlib.contextmanager
    def paused(self) -> Iterator[Monitor]:
        """Forward passes inside the block are not watched, so their backward passes are no steps.

        For gradients that are not the training step's: a gradient penalty's
        ``torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)`` (WGAN-GP), an
        adversarial attack's input gradients (FGSM, PGD), saliency maps. Without it each such
        backward through the watched layers records a step of its own. The block needs no labels
        (a ``label()`` inside it holds for the block only); the step's own forwards stay outside::

            mon.label(torch.cat([g_real, g_fake]))
            scores = critic(torch.cat([real, fake]))
            loss = scores[len(real):].mean() - scores[: len(real)].mean()
            with mon.paused():
                loss = loss + 10 * gradient_penalty(critic, real, fake)
            loss.backward()                  # one step: the real and fake batches' rows

        A backward pass inside the block records nothing either, also through the step's own
        outputs (an R1 penalty's ``autograd.grad(critic(real).sum(), real, create_graph=True)``
        on the step's real batch). The part of a penalty's gradient that reaches the weights
        directly in its double backward is not in the recorded spectra; what flows back through
        the step's own watched outputs (R1, through the activations' derivatives) is in their
        Δ and gradient spectra. Blocks nest; the monitor stays open. It pauses the whole monitor,
        for every thread (one warning when entered on another thread than the training's).
        Under reentrant activation checkpointing the block's forwards are recomputed during the
        step's backward, outside the block: they are then recorded as part of the step if their
        batch fits the labels in force, else left unrecorded (NaN, one warning);
        ``use_reentrant=False`` has no such problem.
        """
        if not self._check_open():
            yield self
            return
        # A label() inside the block is for the block: the labels in force are restored after it
        # (a reentrant checkpoint's recomputation in the step's backward reads them); only this
        # thread's, never a training thread's labelling during another thread's block.
        labels, plan, me = self._labels, self._plan, threading.get_ident()
        if threading.current_thread() is not self._owner and not self._warned_paused_thread:
            self._warned_paused_thread = True
            warnings.warn(
                f"streamspec: mon.paused() on thread {threading.current_thread().name!r} pauses "
                f"the monitor for every thread, also the training on {self._owner.name!r}: its "
                "steps meanwhile are not recorded",
                StreamspecWarning,
                stacklevel=3,
            )
        with self._lock:  # (blocks may open on several threads at once)
            self._paused += 1
            outer = self._block_labels.pop(me, None)  # (blocks nest)
        try:
            yield self
        finally:
            with self._lock:
                self._paused -= 1
                mine = self._block_labels.pop(me, None)
                if mine is not None and self._labels is mine:  # nobody labelled since
                    self._labels, self._plan = labels, plan
                if outer is not None:
                    self._block_labels[me] = outer

    def end_epoch(self) -> None:
        """Close the epoch: epoch spectra from the sketches, Welch tests of its recorded steps."""
        if not self._check_open():
            return
        with self._close_lock:  # (not while another thread closes it: the epoch once)
            if self._closed:
                return
            # A dead step's rows go now, not at the next label(). Only the thread that runs the
            # steps can tell a dead backward from one in flight (the graph task id is per
            # thread): called on another thread, a step whose backward is running is left to it.
            if threading.current_thread() is self._owner or not self._owner.is_alive():
                self._drop_failed_backward()
            self._finish_epoch()
        self._raise_worker_error()

    def snapshot(self) -> Snapshot | None:
        """The latest recorded step and the epoch's Welch t so far (what live views render)."""
        return self._pipeline.snapshot()

    def flush(self) -> None:
        """Process every recorded step and write it to the archive (blocks until done)."""
        if self._closed_at_exit:
            return
        self._pipeline.drain()
        with self._close_lock:  # (not while another thread closes it; only the hand-over, so
            if self._closed_at_exit:  # a flush on a side thread never holds training up)
                return
            self._writer.flush(wait=False)
        self._writer.flush(wait=True)
        self._emit_warnings()
        self._raise_worker_error()

    def to_xarray(self) -> Any:
        """The run so far as an ``xarray.Dataset`` (committed rows; flushes first)."""
        if not self._closed:
            self.flush()
        return self._writer.archive().to_xarray()

    def close(self) -> None:
        """Finish a partial epoch, write everything, remove every hook. Safe to call twice; a
        close interrupted while it waits for the background threads (a second Ctrl-C) is
        finished by calling it again."""
        if self._torn_down:
            return
        self._closed = True  # first: hooks of a step in flight on another thread do nothing now
        try:
            with self._close_lock:
                if self._torn_down:
                    return
                self._tear_down()
        finally:
            lifecycle.release_termination()
        self._emit_warnings()
        self._raise_worker_error()

    def _exit_waits(self) -> bool:
        """Whether finishing it at the process's exit waits for the thread driving it."""
        owner = self._owner
        return (
            not self._torn_down
            and owner is not threading.current_thread()
            and owner.is_alive()
            and not owner.daemon
        )

    def _tear_down(self) -> None:
        was_open = not self._closed_once
        self._closed_once = True
        try:
            if was_open:
                self._remove_hooks()
                # Only the thread that runs the steps can tell a dead backward from a live one
                # (the graph task id is per thread): a step in flight there is left to it, and
                # its end does nothing once closed.
                if threading.current_thread() is self._owner or not self._owner.is_alive():
                    self._drop_failed_backward()  # a closed monitor holds no dead step's rows
                if self._epoch_steps:
                    self._finish_epoch()
                self._pipeline.drain()
        finally:
            # The host thread is joined before the writer closes (it hands the writer rows);
            # an interrupt during the join leaves both to the next close().
            self._pipeline.close()
            if self._view is not None:
                self._view.stop()
            self._writer.close(next_step=self._step)
            self._torn_down = True
            self._finalizer.detach()

    def _forget_in_child(self) -> None:
        """In a forked child (a DataLoader worker): the parent's monitor, inert here (its
        threads are the parent's, its locks may have been held at the fork)."""
        self._closed = True
        self._closed_at_exit = True

    def _guards_termination(self) -> bool:
        """Whether a SIGTERM would lose rows of this monitor (see lifecycle.guard_termination)."""
        return self._persistent and not self._torn_down

    def _close_at_exit(self, terminated: bool = False) -> None:
        """The process ends with this monitor open (no ``close()``): finish it as ``close()`` would.

        If the thread that last labelled a batch still runs, it is waited for first (the exit
        waits for it anyway, but zarr's writes would fail by then): an ordinary non-daemon thread
        until it ends, an executor's worker until it is idle (it only ends after this, when the
        executors shut down). A daemon thread (killed at exit) is not waited for, nor is a thread
        once a Ctrl-C interrupts the wait: the monitor is closed at once, and whatever that thread
        still does with it is not recorded (its calls do nothing, see :meth:`_check_open`).
        Raises nothing but a ``KeyboardInterrupt`` during the close itself.

        ``terminated``: the process received SIGTERM (lifecycle's handler, on a thread of its own):
        no thread is waited for, and a monitor without a persistent archive is left as it is
        (only its live view is stopped).
        """
        if self._torn_down:
            return
        owner = self._owner
        if terminated and not self._persistent:
            if self._view is not None:  # nothing to save; the terminal gets its cursor back
                self._view.stop()
            return
        if self._exit_waits() and not terminated:
            try:
                if _executor_worker(owner):
                    _wait_until_idle(owner)
                else:
                    while owner.is_alive() and not lifecycle.terminating():
                        owner.join(0.05)
            except KeyboardInterrupt:
                print(
                    f"streamspec: stopped waiting for thread {owner.name!r}; closing its monitor",
                    file=sys.stderr,
                )
            if self._torn_down:
                return
            terminated = lifecycle.terminating()  # a SIGTERM meanwhile: the process is ending
        still_running = (
            owner is not threading.current_thread()
            and owner.is_alive()
            and not (_executor_worker(owner) and _idle(owner))
        )
        epoch, partial = self._epoch, self._epoch_steps > 0
        self._closed_at_exit = True
        try:
            self.close()
        except Exception as error:  # the process is ending: report, never raise
            _exit_note(f"streamspec: closing a monitor left open at exit failed ({error})")
            return
        if not self._persistent:
            return
        lost = sum(self._writer.lost_rows.values())
        written = (
            f"the rows it could write ({lost} could not: see the warning above)"
            if lost
            else f"its recorded steps{f' and its partial epoch {epoch}' if partial else ''}"
        )
        if terminated:
            _exit_note(
                "streamspec: the process received SIGTERM with a monitor open; streamspec closed "
                f"it: {written} are in {self._store_label}"
            )
            return
        note = (
            f"streamspec: a monitor was left open at exit; streamspec closed it: {written} are in "
            f"{self._store_label}."
        )
        if still_running:
            note += f" Its thread {owner.name!r} still runs: what it does now is not recorded."
        _exit_note(
            note + " Call mon.close() (or use `with streamspec.watch(...) as mon:`) to end a run "
            "where you choose"
        )

    def __enter__(self) -> Monitor:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # torch.save(model) during a watch pickles the model's hooks, which reference the
        # monitor (threads, locks, device state): the saved model gets inert hooks instead.
        return (_Unwatched, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> Monitor:
        # copy.deepcopy(model) during a run copies the model's hooks, which reference the
        # monitor: the copy shares it, and the monitor ignores modules it does not watch.
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        # Keep the user's exception; still leave a readable archive holding every completed step.
        self._discard_step()
        try:
            self.close()
        except Exception as secondary:  # pragma: no cover - reported, never masks the original
            warnings.warn(
                f"streamspec: closing after an error failed: {secondary}", StreamspecWarning, 2
            )

    def __repr__(self) -> str:
        return (
            f"Monitor(layers={len(self.layers)}, groups={list(self.groups)}, "
            f"rank={self.layout.rank}, step={self._step}, epoch={self._epoch}"
            f"{', closed' if self._closed else ''})"
        )

    # -- hooks (training thread / autograd threads) ---------------------------------------------

    def _on_forward(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if (
            self._closed
            or self._paused
            or not torch.is_grad_enabled()
            or id(module) not in self._modules
        ):
            if (
                self._paused
                and not self._closed
                and id(module) in self._modules
                and torch._C._current_graph_task_id() != -1  # (rare: no cost on the hot path)
            ):
                self._recomputed_while_paused(module, inputs, output)
            elif id(module) not in self._modules:
                self._foreign_call(module)
            return None  # evaluation, paused(), or a copy of a watched module (deepcopy)
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        family = family_of(module)
        assert family is not None
        bd = self._sample_dim.get(id(module), 0)
        plan = self._plan
        ids = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if (
            getattr(family, "broadcasts", False)
            and plan is not None
            and ids is not None
            and (ids.dim() <= bd or ids.shape[bd] != plan.batch_size)
        ):
            self._shared_call(module, ids, output, plan.batch_size, bd)
            return None
        self._deliver(module, self._capture(family, module, inputs, output, bd))
        return None

    def _foreign_call(self, module: nn.Module) -> None:
        """A forward of a copy of a watched module, which shares its hooks (or its stepwise
        sink) but is not watched. ``nn.DataParallel`` runs such copies on every GPU instead of
        the watched modules, so nothing would be recorded, with no word: one warning says so
        (the first stepwise copy raised a bare ``StopIteration`` from the monitor's lookup of
        its name). Other copies (a ``deepcopy``: an EMA or teacher model) are left alone."""
        if (
            self._warned_replica
            or self._closed
            or not torch.is_grad_enabled()
            or not getattr(module, "_is_replica", False)
        ):
            return
        self._warned_replica = True
        warnings.warn(
            "streamspec: nn.DataParallel runs copies of the watched modules (one per GPU), which "
            "streamspec does not watch: nothing of those forwards is recorded. Train on one "
            "device (nn.DataParallel with one GPU runs the model itself), or use "
            "DistributedDataParallel: each process then watches its own model and batch",
            StreamspecWarning,
            stacklevel=2,
        )

    def _shared_call(
        self, module: nn.Module, ids: torch.Tensor, output: torch.Tensor, batch: int, bd: int
    ) -> None:
        """An embedding called on ids without one entry per sample on the sample dim: ids shared
        by the batch (BERT's and GPT's position ids ``[1, T]``, nanoGPT's ``wpe(arange(T))``, T5's
        relative-position buckets ``[T, T]``). Its output broadcasts over the samples, so what
        reaches it is the sum of every sample's gradient, which no group split can recover. The
        layer's step is left unrecorded (NaN) rather than changing the module's output (an
        expanded ``[B, …]`` view changed what the model computed wherever the output was not
        simply broadcast: a penalty on the table, a squeeze, an einsum); one warning says how to
        record it."""
        self._drop_failed_backward()
        output.register_hook(self._count_only_hook)  # the step still ends and counts
        name = self._leave_out(module)
        if name is None:
            return
        warnings.warn(
            f"streamspec: {name} was called on ids of shape {tuple(ids.shape)}, with no entry per "
            f"sample on dim {bd} (the batch has {batch}): ids shared by the batch (positions, "
            "relative-position buckets), whose gradient is summed over all samples. Its steps "
            "are left unrecorded (the model is left as it is). To record it per sample, call it "
            f"on ids expanded to the batch, ids.expand({batch}, -1) (Hugging Face models: "
            f"position_ids=torch.arange(T).expand({batch}, T)); or, if these ids are per "
            "sample, call mon.label() with this batch's labels",
            StreamspecWarning,
            stacklevel=2,
        )

    def _capture(
        self, family: Any, module: nn.Module, inputs: tuple[Any, ...], output: Any, bd: int
    ) -> list[Capture]:
        """The family's captures of one call; a usage error names the module."""
        try:
            return family.capture(module, inputs, output, bd)
        except StreamspecError as err:
            name = next(s.name for s in self.sites if s.module is module)
            raise StreamspecError(f"at {name}: {err}") from None

    def _deliver(self, module: nn.Module, captures: list[Capture]) -> None:
        """Take one module call's captures (from a forward hook or a stepwise module)."""
        if self._closed or self._paused or not torch.is_grad_enabled() or not captures:
            return
        if id(module) not in self._modules:  # a stepwise module's copy
            self._foreign_call(module)
            return
        self._drop_failed_backward()
        batch = captures[0].activation.batch_size
        recomputed = torch._C._current_graph_task_id() != -1
        if recomputed:
            # A forward inside a backward: a checkpointed segment being recomputed. With reentrant
            # checkpointing its gradients arrive in a nested backward, whose end is not the step's
            # end; queue the end-of-step callback now, on the enclosing (outer) backward.
            self._queue_end_of_backward()
            plan = self._plan
            if plan is not None and (
                self._labels_in_step > 1
                # the labelling in force was spent (a paused backward), another one was not
                or (self._counted and id(plan) not in self._counted)
                or plan.batch_size != batch
            ):
                # Which batch this recomputation belongs to is unknown: several labelled batches
                # in this step (the labels in force are the last one's), or a batch the labels
                # in force do not fit (a paused() block's forward recomputed outside it; batches
                # whose backwards run in another order than their forwards). If its outputs get
                # gradients (reentrant checkpointing; with non-reentrant checkpointing they never
                # do: the first forward's captures hold), the module's step is left unrecorded
                # rather than credited to the wrong samples. (Never labelled: the usage error.)
                for cap in captures:
                    if cap.output.requires_grad:
                        target = _hook_target(cap)[0]
                        _register_hook(cap.output, target, self._unattributable_hook(module))
                return
        plan = self._plan_for(batch, module)  # (a usage error: no labels, or another length)
        recording = self._records_step()
        count_only: Callable[[torch.Tensor], None] | None = None
        hooked = 0
        for cap in captures:
            index = self._index.get((id(module), cap.key))
            if index is None or not cap.output.requires_grad:  # frozen, or no graph
                continue
            hooked += 1
            target, adjoint_rows = _hook_target(cap)
            if recording:
                # Calls recomputed inside the backward (activation checkpointing) count once a
                # gradient reaches one of them: with non-reentrant checkpointing none does (the
                # first forward's calls get them), and counted now they would hold the layer's
                # gathered rows until the step's end, waiting. Under reentrant checkpointing the
                # layer's calls in one segment (a module applied twice, an LSTM's per-step
                # projection) count together, when the first of them gets its gradient, so the
                # layer folds once in the segment's backward, as without checkpointing.
                token = None
                if recomputed:
                    state = self._state[index]
                    if state.recomputing is None or state.recomputing[1]:
                        state.recomputing = [0, False]
                    state.recomputing[0] += 1
                    token = state.recomputing
                else:
                    self._count_call(index)
                # The hook keeps the rows and the adjoint mapping, never the output tensor it
                # hangs on: output → hook → output would be a reference cycle that keeps every
                # step's activations alive until Python's cycle collector happens to run.
                hook = self._adjoint_hook(index, cap.activation, adjoint_rows, plan, token)
                _register_hook(cap.output, target, hook)
                if not recomputed:
                    self._track_graph(hook, index)
            else:
                count_only = count_only or self._count_only_hook_of(plan)
                _register_hook(cap.output, target, count_only)
        if hooked:
            with self._lock:
                live = self._live.get(id(plan), (plan, 0))[1]
                self._live[id(plan)] = (plan, live + hooked)

    def _records_step(self) -> bool:
        """Whether the current step is recorded (``every``, and no failure so far)."""
        return self._step % self.config.every == 0 and self._failed is None

    def _plan_for(self, batch_size: int, module: nn.Module) -> GroupPlan:
        if self._plan is None:
            raise StreamspecError.build(
                "mon.label(groups_of_batch) before the step's forward",
                "a forward pass with no labels set",
                "call mon.label(g) with one group index per sample before model(x)",
            )
        if self._plan.batch_size != batch_size:
            name = next(s.name for s in self.sites if s.module is module)
            if id(module) in self._from_batch_dim:
                where = f"samples on dim {self._sample_dim[id(module)]} of its input (batch_dim)"
                fix = (
                    "call mon.label() with the labels of this batch before its forward (or set "
                    "batch_dim to the sample dimension: a mapping such as {'encoder': 1} for a "
                    "model whose parts differ)"
                )
            else:  # convolutions, attention (out_proj included) and RNNs: their own layout
                where = "samples where the module's own layout (batch_first, dim 0) puts them"
                fix = "call mon.label() with the labels of this batch before its forward"
            raise StreamspecError.build(
                f"{self._plan.batch_size} samples (the length of the last mon.label() call)",
                f"a batch of {batch_size} samples at {name} ({where})",
                fix,
            )
        return self._plan

    def _count_only_hook(self, grad: torch.Tensor) -> None:
        if not self._paused:
            self._queue_end_of_backward()

    def _count_only_hook_of(self, plan: GroupPlan) -> Callable[[torch.Tensor], None]:
        """:meth:`_count_only_hook` for a captured call of a step that is not recorded."""

        def hook(grad: torch.Tensor) -> None:
            if not self._paused:
                self._queue_end_of_backward()
            elif not self._closed and not torch.is_grad_enabled():
                self._spent(plan)

        return hook

    def _spent(self, plan: GroupPlan, calls: int = 1) -> None:
        """A captured call's gradient arrived in a paused() backward that keeps no graph
        (``create_graph=False``: autograd runs the hooks with grad mode off): a labelling all
        of whose calls are spent so is no batch of the step to come (it was: under reentrant
        checkpointing a warm-up step, its forward outside the block and its whole backward
        inside it, left the next step's recomputed layers unrecorded, as if it had two labelled
        batches). With ``create_graph=True`` (an R1 penalty through the step's own outputs) the
        step's own backward goes through the call again: it stays.

        The layer's count of calls whose gradient is awaited is left as it is: a call that a
        paused ``retain_graph=True`` backward reached may still get the step's gradient (an
        input-gradient probe, then the step's backward of the same graph), and a count too high
        only defers the layer's fold to the step's end, while one too low folds a module called
        several times in parts that do not always combine."""
        with self._lock:
            live = self._live.get(id(plan), (plan, 0))[1] - calls
            self._live[id(plan)] = (plan, live)
            if live <= 0 and self._counted.pop(id(plan), None) is not None:
                self._labels_in_step -= 1

    def _recomputed_while_paused(
        self, module: nn.Module, inputs: tuple[Any, ...], output: Any
    ) -> None:
        """A forward recomputed inside a paused backward (reentrant checkpointing, which keeps
        no graph through its segments: it refuses ``autograd.grad``, and ``create_graph=True``
        leaves the inputs' gradients without one): when its batch fits
        the labelling in force, that labelling's forward is being spent, as a warm-up step's on
        a model whose watched layers are all checkpointed (its first forward captured nothing:
        reentrant checkpointing runs it without grad)."""
        plan = self._plan
        if plan is None:
            return
        try:  # (never a usage error from a paused block)
            captures = self._capture(
                family_of(module), module, inputs, output, self._sample_dim.get(id(module), 0)
            )
        except StreamspecError:
            return
        if captures and plan.batch_size == captures[0].activation.batch_size:
            self._spent(plan, calls=0)

    def _count_call(self, index: int, late: bool = False) -> None:
        """One more call of layer ``index`` in the step whose gradient is awaited (its fold waits
        for all of them); the layer's first also counts for its bank (:meth:`_slot`). ``late``:
        counted when its gradient came (a call recomputed inside the backward): the bank's
        count from the forward is then no guide to the layers still to come."""
        state = self._state[index]
        state.calls += 1
        if state.calls == 1:
            key = id(self._trackers[index].bank)
            self._called[key] = self._called.get(key, 0) + 1
            if late:
                self._late.add(key)

    def _adjoint_hook(
        self,
        index: int,
        source: RowSource,
        adjoint_rows: Callable[[torch.Tensor], torch.Tensor],
        plan: GroupPlan,
        recomputed: list[Any] | None = None,
    ) -> Any:
        fired = [False]  # (read by _track_graph's callback)

        def hook(grad: torch.Tensor) -> None:
            fired[0] = True
            # Closed mid-step from another thread (at the process's exit); or a backward inside
            # paused() through this step's own outputs (an R1 penalty's autograd.grad).
            if self._closed or self._paused:
                if not self._closed and not torch.is_grad_enabled():
                    self._spent(plan)
                return
            self._queue_end_of_backward()
            self._drain_dead()
            if recomputed is not None and not recomputed[1]:  # (the first of them: _deliver)
                recomputed[1] = True
                for _ in range(recomputed[0]):
                    self._count_call(index, late=True)
            self._step_plans.setdefault(id(plan), plan)
            self._state[index].plans.setdefault(id(plan), plan)
            if self._failed is not None or plan.n_max == 0:
                return  # a step without grouped samples is still recorded: counts 0, σ NaN
            try:
                state = self._state[index]
                adjoint_in = adjoint_rows(grad.detach())
                slot = self._slot(index, source, adjoint_in, plan)
                if not state.gathered:  # (its first call's gather: the bank counts layers)
                    state.gathered = True
                    key = id(self._trackers[index].bank)
                    self._gathered[key] = self._gathered.get(key, 0) + 1
                if slot is None:
                    activation = source.gather(plan)
                    adjoint = plan.gather(adjoint_in)
                else:  # straight into the bank's next batch
                    buffer, at = slot
                    assert isinstance(source, DenseSource)
                    activation = DenseRows(plan.gather(source.rows, out=buffer.rows[at]))
                    adjoint = plan.gather(adjoint_in, out=buffer.adjoints[at])
                    state.slot = slot
                state.pending.append((activation, adjoint, source.positions, plan))
                if len(state.pending) == state.calls:
                    self._fold(index)
            except StreamspecError:
                raise
            except Exception as error:  # never break the user's training
                if self._closed:  # closed under it by another thread (SIGTERM, exit)
                    return
                self._fail(error)

        hook.fired = fired  # type: ignore[attr-defined]
        return hook

    def _track_graph(self, hook: Any, index: int) -> None:
        """Stop awaiting a counted call whose graph dies before its gradient comes (a labelled
        forward whose backward never runs): its layer's fold would otherwise wait for the
        step's end, with the rows of every call of the step held. The hook closure lives as long
        as the call's autograd node (through the output's hook dict), not as long as the output
        tensor, which may die long before its gradient comes. The callback runs wherever the
        graph is freed, a garbage collection inside a locked region included: it only queues the
        call, and the next hook takes it out (:meth:`_drain_dead`). The labelling still counts
        as a batch of the step (whether the rest of its graph, a reentrant-checkpointed segment
        that captured nothing, still lives is not known)."""
        fired, dead, state = hook.fired, self._dead, self._state

        def graph_died(_ref: Any) -> None:
            if not fired[0]:
                dead.append((state, index))

        refs = self._graph_refs
        refs.append(weakref.ref(hook, graph_died))
        if len(refs) >= 4096 and len(refs) & (len(refs) - 1) == 0:  # forwards without backward
            refs[:] = [r for r in refs if r() is not None]  # (amortised: at powers of two)

    def _drain_dead(self) -> None:
        """The counted calls whose graph died without their gradient (:meth:`_track_graph`)
        are no longer awaited by their layer's fold."""
        while self._dead:
            try:
                state, index = self._dead.popleft()
            except IndexError:  # (drained meanwhile by a hook on another device's thread)
                return
            if state is not self._state:  # a call of a step that has ended
                continue
            with self._lock:
                layer = state[index]
                if layer.calls > len(layer.pending):
                    layer.calls -= 1

    def _queue_end_of_backward(self) -> None:
        with self._lock:
            if self._callback_queued:
                return
            self._callback_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _drop_failed_backward(self) -> None:
        """A backward that raised (and was caught by the user) never reaches its end callback:
        outside any backward, a still-pending step is that dead step — discard it, so recording
        resumes with the next step instead of stalling and piling up rows."""
        if self._callback_queued and torch._C._current_graph_task_id() == -1:
            self._discard_step()

    def _fold(self, index: int) -> None:
        """Fold a layer's captured calls of this step into its tracker (device products only)."""
        state = self._state[index]
        if state.shared:  # a call's per-sample gradients were summed away: not recordable
            state.pending.clear()
            return
        activation = stack_rows([p[0] for p in state.pending])
        adjoints = [p[1] for p in state.pending]  # gathered copies: no aliasing of grad
        adjoint = adjoints[0] if len(adjoints) == 1 else torch.cat(adjoints, dim=1)
        positions = sum(p[2] for p in state.pending)
        # Rows per group: each call's samples of the group times its rows per sample (calls of
        # separately labelled batches have their own samples).
        group_rows: np.ndarray = np.asarray(
            np.sum([p[3].counts * p[2] for p in state.pending], axis=0), dtype=np.int64
        )
        state.group_rows = group_rows if state.group_rows is None else state.group_rows + group_rows
        tie = self._positions(state) if self._tied[index] else None
        state.pending.clear()
        slot, state.slot = state.slot, None
        rows_per_group = activation.shape[1]
        exact = rows_per_group <= self.config.exact_threshold
        adjoint = self._unscaled(adjoint)
        tracker = self._trackers[index]
        kind = adjoint.device.type
        batch = self._batch_layers.get(kind, 1)
        if (
            ((batch > 1 and tracker.bank.capacity > 1) or self._side.get(kind, False))
            and not exact
            and tie is None
            and isinstance(activation, DenseRows)
            and tracker.warm_started(adjoint.device)
            and len(state.plans) == 1
        ):
            self._queue(index, activation.rows, adjoint, slot)
        else:
            # Sketches accumulate in float32 even when the step runs under autocast (the
            # autocast state reaches tensor hooks).
            with as_written({adjoint.device}, convolves(activation)), _profiled("streamspec.fold"):
                products = tracker.products(
                    activation, adjoint, exact, tie, self._layer_counts(state, adjoint.device)
                )
            self._add_products(index, products)
        state.positions += positions
        if tie is not None:
            state.n_positions += tie[1]

    def _add_products(self, index: int, products: StepProducts) -> None:
        """A fold's products into the layer's step: a second fold in one step (reentrant
        checkpointing recomputes a module called in several segments one segment at a time,
        each folded before the next is recomputed) adds to the first, which it overwrote."""
        state = self._state[index]
        if state.products is None:
            state.products = products
            return
        # The merge below reads products that may come from a side stream.
        self._join_side_streams(products.s_in.device)
        merged = merge_products(state.products, products)
        if merged is None:  # (the tying spectrum): left unrecorded rather than half of it
            state.products = None
            name = self._leave_out(self.sites[index].module)
            if name is not None:
                warnings.warn(
                    f"streamspec: {name} is recomputed in several parts inside the backward "
                    "(reentrant activation checkpointing of several segments): its tying spectrum "
                    "cannot be combined, and its steps are left unrecorded (NaN). Use "
                    "checkpoint(..., use_reentrant=False), or tied=False",
                    StreamspecWarning,
                    stacklevel=2,
                )
            return
        state.products = merged

    def _slot(
        self, index: int, source: RowSource, adjoint: torch.Tensor, plan: GroupPlan
    ) -> tuple[_BatchBuffer, int] | None:
        """Where to gather a layer's rows (and adjoint rows) when :meth:`_fold` will queue them
        for a batch: a slot of the bank's next batch, whose layers' slots are then read as one
        stacked tensor (no stacking copy). The same conditions as the fold's queue, checked
        before the gather (one call of the layer in the step, explicit float32 rows of the
        sketched route, one labelling, no tying, no loss scale to divide out).

        A buffer takes as many slots as the bank's layers called in the step and not gathered
        yet (all of the bank's under reentrant checkpointing, whose calls count as their
        gradients come; a layer whose gradient never comes, behind a ``detach()`` or, there, not
        called in the step, leaves its slot free until the step's end), up to the batch, within
        :data:`BATCH_BYTES` and what the device's :data:`QUEUED_BYTES` leaves (its free slots
        count as held); None (gathered on their own) when that is fewer than two, or when rows
        gathered on their own already wait in the bank (their batch is stacked by a copy
        anyway). It is written on the stream it was allocated on only: a hook on another stream
        closes it, and the bank's later layers in the step are gathered on their own."""
        tracker = self._trackers[index]
        bank, device, state = tracker.bank, adjoint.device, self._state[index]
        batch = min(self._batch_layers.get(device.type, 1), bank.capacity)
        if batch < 2 or not isinstance(source, DenseSource) or adjoint.dim() != 3:
            return None
        rows = source.rows
        if rows.shape[:2] != adjoint.shape[:2]:  # (then the gather fails, and _fold reports it)
            return None
        m = plan.n_max * rows.shape[1]
        if (
            state.calls != 1
            or state.pending
            or state.shared
            or len(state.plans) != 1
            or self._tied[index]
            or self._grad_scaler is not None
            or rows.dtype != torch.float32
            or adjoint.dtype != torch.float32
            or rows.device != device
            or m <= self.config.exact_threshold
            or not tracker.warm_started(device)
        ):
            return None
        key = id(bank)
        c, h_in, h_out = plan.n_groups, rows.shape[2], adjoint.shape[2]
        size = c * m * (h_in + h_out) * 4
        if not self._fits(key, (c, m, h_in), (c, m, h_out), index, size):
            self._run_queue(key)  # (which also closes the open buffer)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        buffer = self._open.get(key)
        if buffer is not None and buffer.stream != stream:
            # Hooks of one bank on several streams: no more buffers for it this step (each new
            # one would be sized for the bank's layers to come and closed after one or two).
            self._switched.add(key)
        if buffer is not None and (
            key in self._switched
            or buffer.used == len(buffer.rows)
            or buffer.rows.shape[1:] != (c, m, h_in)
            or buffer.adjoints.shape[-1] != h_out
            or buffer.rows.device != device
        ):
            self._run_queue(key)
            buffer = None
        if buffer is None:
            if self._queued.get(key) or key in self._switched:
                return None
            room = self._queued_bytes - sum(self._held(device).values())
            # (layers recomputed in the backward, one checkpointed segment at a time, are
            # counted as their gradients come: then any layer of the bank may still come)
            called = bank.capacity if key in self._late else self._called.get(key, 0)
            expected = called - self._gathered.get(key, 0)
            slots = min(batch, expected, self._batch_bytes // size, max(room, 0) // size)
            if slots < 2:
                return None
            buffer = self._open[key] = _BatchBuffer(
                torch.empty((slots, c, m, h_in), dtype=torch.float32, device=device),
                torch.empty((slots, c, m, h_out), dtype=torch.float32, device=device),
                stream,
            )
        at = buffer.used
        buffer.used += 1
        return buffer, at

    def _fits(
        self,
        key: int,
        rows: tuple[int, ...],
        adjoint: tuple[int, ...],
        index: int,
        size: int,
    ) -> bool:
        """Whether a layer's rows (shapes ``rows``, ``adjoint``; ``size`` bytes) may join its
        bank's queued batch: the same row counts and labellings (the products of a batch share
        one), and the batch stays within :data:`BATCH_BYTES`."""
        queue = self._queued.get(key)
        return not queue or (
            tuple(queue[0].rows.shape) == rows
            and tuple(queue[0].adjoint.shape) == adjoint
            and self._state[queue[0].index].plans.keys() == self._state[index].plans.keys()
            and sum(q.size for q in queue) + size <= self._batch_bytes
        )

    def _held(self, device: torch.device) -> dict[int, int]:
        """Bytes of gathered rows each bank on ``device`` holds for its next batch: its queued
        layers' and the slots of its open buffer not handed out yet."""
        # (snapshots: hooks of a multi-device backward change these on other threads)
        held = {
            k: sum(q.size for q in queue)
            for k, queue in list(self._queued.items())
            if queue and queue[0].adjoint.device == device
        }
        for k, buffer in list(self._open.items()):
            if buffer.rows.device == device:
                held[k] = held.get(k, 0) + buffer.free_bytes
        return held

    def _queue(
        self,
        index: int,
        rows: torch.Tensor,
        adjoint: torch.Tensor,
        slot: tuple[_BatchBuffer, int] | None = None,
    ) -> None:
        """Hold a layer's gathered rows until :data:`batch_layers` layers of its bank are there
        (or all of them, in a bank of fewer), then run their products together; a bank never
        holds more than :data:`BATCH_BYTES` of rows (a batch runs early rather than take more; a
        layer whose rows alone reach it runs at once), and the banks of a device no more than
        :data:`QUEUED_BYTES` together (the fullest runs first: a model of many shapes, each
        bank a few layers short of a batch, would otherwise hold rows of all of them).
        ``slot``: the rows were gathered into the bank's batch buffer (:meth:`_slot`)."""
        tracker = self._trackers[index]
        key = id(tracker.bank)
        device = adjoint.device
        size = (rows.numel() + adjoint.numel()) * 4  # float32, as the products read them
        if not self._fits(key, tuple(rows.shape), tuple(adjoint.shape), index, size) or (
            slot is None and key in self._open
        ):
            # (or another row count, another call pattern: not batched; rows gathered on their
            # own never join a buffer's, whose batch then runs first)
            self._run_queue(key)
        queue = self._queued.setdefault(key, [])
        # The stream the rows were made on: hooks run on their forward op's stream, which may
        # differ from layer to layer (the products then wait for each).
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        queue.append(_Queued(index, rows, adjoint, size, stream, slot))
        batch = min(self._batch_layers.get(device.type, 1), tracker.bank.capacity)
        if len(queue) >= batch or size >= self._batch_bytes:
            self._run_queue(key)
        while True:
            held = self._held(device)
            if sum(held.values()) <= self._queued_bytes:
                break
            self._run_queue(max(held, key=held.__getitem__))

    def _run_queue(self, key: int) -> None:
        """The products of a bank's queued layers, in one batched call per product (closing the
        bank's open buffer: the next layers start another)."""
        self._open.pop(key, None)
        queue = self._queued.pop(key, [])
        if not queue:
            return
        device = queue[0].adjoint.device
        counts = self._layer_counts(self._state[queue[0].index], device)
        trackers = [self._trackers[q.index] for q in queue]
        with (
            as_written({device}, conv=False),
            _profiled("streamspec.fold"),
            self._products_stream(device, queue),
        ):
            if len(queue) == 1:  # alone after all: no stacking copy
                products = [
                    trackers[0].products(
                        DenseRows(queue[0].rows), queue[0].adjoint, False, None, counts
                    )
                ]
            elif (stacked := _stacked_slots(queue)) is not None:
                products = stacked_products(trackers, *stacked, counts)
            else:
                products = products_of_layers(
                    trackers, [q.rows for q in queue], [q.adjoint for q in queue], counts
                )
        for q, p in zip(queue, products, strict=True):
            self._add_products(q.index, p)

    @contextlib.contextmanager
    def _products_stream(self, device: torch.device, queue: list[_Queued]) -> Iterator[None]:
        """The CUDA stream that runs queued products: a side stream (``side_stream()``), so
        that their skinny GEMMs, which fill few multiprocessors, run beside the model's backward
        instead of between its kernels; else the hook's own stream.

        Order: that stream first waits for the work so far of every stream the queued rows were
        made on (the rows, the adjoints, the blocks); the step's end waits for the side stream
        (:meth:`_join_side_streams`) before it reads the products.

        Memory: rows read on another stream than the one they were made on are marked as in
        use by it (``record_stream``: their memory is not handed out again before its reads are
        done), before any product is launched, so that a failing product leaves them marked
        too. The products are made on the side stream and read on the training stream only
        after it waited for the side stream; they are freed after that read, and any later
        side-stream work is queued after a fresh wait for the training stream, so it cannot
        overwrite them while they are read."""
        if device.type != "cuda":
            yield
            return
        current = torch.cuda.current_stream(device)
        side = self._side_streams.get(device) if self._side.get("cuda", False) else current
        if side is None:
            side = self._side_streams[device] = torch.cuda.Stream(device)
        made_on = {current}
        for q in queue:
            if q.stream is not None:
                made_on.add(q.stream)
        for stream in made_on:
            if stream != side:
                side.wait_stream(stream)
        for q in queue:
            if q.stream != side:
                q.rows.record_stream(side)
                q.adjoint.record_stream(side)
        if side == current:
            yield
            return
        with self._lock:
            self._side_pending.add(device)
        with torch.cuda.stream(side):
            yield

    def _join_side_streams(self, device: torch.device | None = None) -> None:
        """The training stream waits for the products queued on side streams (no host sync):
        on ``device`` (a merge of a layer's two folds, on that device's hook thread, whose
        stream is the layer's), or on every device the step used (the step's end, on the
        thread that called ``backward()``)."""
        with self._lock:  # (a model spread over devices folds on one autograd thread per device)
            devices = [device] if device is not None else list(self._side_pending)
            pending = [d for d in devices if d in self._side_pending]
        for d in pending:
            torch.cuda.current_stream(d).wait_stream(self._side_streams[d])

    def _layer_counts(self, state: _LayerStepState, device: torch.device) -> torch.Tensor | None:
        """A layer's samples per group in the step on ``device`` (what its epoch counts are made
        of): its labellings' counts, summed."""
        counts = [plan.counts_on(device) for plan in state.plans.values()]
        return None if not counts else counts[0] if len(counts) == 1 else torch.stack(counts).sum(0)

    def _unscaled(self, adjoint: torch.Tensor) -> torch.Tensor:
        """The adjoint of the loss itself: ``scaler.scale(loss).backward()`` multiplies every
        adjoint by the GradScaler's current scale, which changes during training. Divided on the
        device by the scaler's scale tensor (no sync), in float32 (fp16 adjoints divided in fp16
        would underflow, which is what the scale is there to prevent)."""
        scaler = self._grad_scaler
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        if scale is None or not scaler.is_enabled():  # type: ignore[union-attr]
            return adjoint
        return adjoint.to(torch.float32) / scale.to(adjoint.device, torch.float32)

    @staticmethod
    def _positions(state: _LayerStepState) -> tuple[torch.Tensor, int]:
        """Position of every gathered row (rows are sample-major within each call; a module's
        calls in one step are successive positions, e.g. an RNN's time steps)."""
        # Per labelling: separately labelled batches through the same module hold other samples
        # at the same positions (as one forward of both batches would).
        ids: list[torch.Tensor] = []
        offsets: dict[int, int] = {}
        for _, adjoint, positions, plan in state.pending:
            offset = offsets.get(id(plan), 0)
            n_max = adjoint.shape[1] // positions
            ids.append(
                torch.arange(offset, offset + positions, device=adjoint.device).repeat(n_max)
            )
            offsets[id(plan)] = offset + positions
        return torch.cat(ids), max(offsets.values())

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        if self._closed:  # closed mid-step from another thread (at the process's exit)
            return
        with self._close_lock:  # a close() on another thread waits for the step's end
            if self._closed:
                return
            self._end_step()
        self._emit_warnings()

    def _end_step(self) -> None:
        try:
            plans = self._step_plans
            # Labelled batches through separate forwards before one backward (a labelled and
            # an unlabelled batch, summed micro-batches): the step's samples are all of theirs.
            counts = sum((p.counts for p in plans.values()), np.zeros(len(self.groups), np.int64))
            needed = {key for key, p in plans.items() if p.counts.any()}  # batches with samples
            present: list[int] = []
            for index, state in enumerate(self._state):
                if state.pending:
                    self._fold(index)
            for key in list(self._queued):  # batches not full at the end of the backward
                self._run_queue(key)
            self._join_side_streams()
            with self._lock:
                self._side_pending.clear()
            for index, state in enumerate(self._state):
                # (left out: a call on shared ids, an unmergeable second fold of a sibling site)
                if state.products is None or state.shared or not plans:
                    continue
                if not needed <= state.plans.keys():
                    self._warn_partial(index)
                    continue
                present.append(index)
                self._epoch_counts[index] += counts
            send = self._records_step() and bool(plans)
            with _profiled("streamspec.end_step"):
                layers, ready = self._finish_step(present, send) if present else ([], None)
            if send:
                record = StepRecord(self._step, self._epoch, counts.copy(), layers, ready)
                self._epoch_steps += 1
                self._pipeline.submit(record)
        except StreamspecError:
            raise
        except Exception as error:
            self._fail(error)
        finally:
            # The step index first: a KeyboardInterrupt landing in what follows (and caught by
            # the training loop) must not leave the next step with this step's index, which the
            # host pipeline would refuse as out of order.
            self._step += 1
            self._reset_step()

    def _leave_out(self, module: nn.Module) -> str | None:
        """Leave ``module``'s layers out of the step (NaN); the name of its first layer if the
        module has not been warned about yet (one warning per module and run), else None."""
        for index, site in enumerate(self.sites):
            if site.module is module:
                self._state[index].shared = True
        if id(module) in self._warned_shared:
            return None
        self._warned_shared.add(id(module))
        return next(s.name for s in self.sites if s.module is module)

    def _unattributable_hook(self, module: nn.Module) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self._closed or self._paused:
                return
            self._queue_end_of_backward()
            self._unattributable(module)

        return hook

    def _unattributable(self, module: nn.Module) -> None:
        """A forward recomputed inside the backward (reentrant checkpointing) that no labelling
        of the step fits for sure: its step is left unrecorded, with one warning."""
        name = self._leave_out(module)
        if name is None:
            return
        warnings.warn(
            f"streamspec: {name} is recomputed inside the backward (reentrant activation "
            "checkpointing) in a step with several labelled batches, or for a batch the labels "
            "in force do not fit (a forward of a paused() block, recomputed outside it; batches "
            "whose backwards run in another order than their forwards), so which batch it "
            "belongs to is unknown: its steps are left unrecorded (NaN) when that happens. Use "
            "checkpoint(..., use_reentrant=False), or one labelled forward per backward",
            StreamspecWarning,
            stacklevel=2,
        )

    def _warn_partial(self, index: int) -> None:
        """A layer that only some of the step's labelled batches went through: its rows cover
        fewer samples than the step's counts, by which its spectra would be normalised and its
        epoch counted, so its step is left out (NaN), with one warning per layer."""
        if index in self._warned_partial:
            return
        self._warned_partial.add(index)
        warnings.warn(
            f"streamspec: {self.sites[index].name} was called in only some of the step's "
            "labelled batches (mon.label() was called again before the backward); its steps "
            "are recorded as NaN when that happens. Steps whose batches all go through a layer "
            "are recorded, with all their samples",
            StreamspecWarning,
            stacklevel=2,
        )

    def _finish_step(
        self, present: list[int], send: bool
    ) -> tuple[list[LayerStep], Callable[[], None] | None]:
        """Batched end of a step: each bank of same-shape layers folds its layers' products at
        once; then one packed transfer of every bank's small matrices to the host (plus the
        rows of exact-route layers), without a host sync."""
        by_bank: dict[int, tuple[SketchBank, dict[int, StepProducts]]] = {}
        for index in present:
            tracker, products = self._trackers[index], self._state[index].products
            assert products is not None
            by_bank.setdefault(id(tracker.bank), (tracker.bank, {}))[1][tracker.slot] = products
        # A backward called inside the user's autocast region runs this callback under it.
        with as_written({bank.device for bank, _ in by_bank.values()}, conv=False):
            packed = dict(zip(by_bank, finish_banks(list(by_bank.values())), strict=True))
        if not send:
            return [], None
        device_tensors = list(packed.values())
        extra: list[tuple[int, str]] = []
        for index in present:
            products = self._state[index].products
            assert products is not None
            for name, t in products.rows.items():
                extra.append((index, name))
                device_tensors.append(t)
        host, ready = _to_host(device_tensors)
        host_packed = {key: t.numpy() for key, t in zip(packed, host[: len(packed)], strict=True)}
        rows: dict[int, dict[str, torch.Tensor]] = {}
        for (index, name), t in zip(extra, host[len(packed) :], strict=True):
            rows.setdefault(index, {})[name] = t
        layers = []
        for index in present:
            tracker, state = self._trackers[index], self._state[index]
            assert state.products is not None
            route = state.products.route
            step = LayerStep(
                index,
                route,
                dict(rows.get(index, {})),
                state.positions,
                state.n_positions,
                group_rows=state.group_rows,
            )
            if route == "sketch":  # its slot of the bank's packed copy, read on the host
                step.packed = host_packed[id(tracker.bank)][tracker.slot]
                step.fields = tracker.bank.fields
            layers.append(step)
        return layers, ready

    def _reset_step(self) -> None:
        self._state = [_LayerStepState() for _ in self.sites]
        self._queued = {}
        self._open = {}
        self._switched = set()
        self._late = set()
        self._called = {}
        self._gathered = {}
        self._step_plans = {}
        self._labels_in_step = 0
        self._counted = {}
        self._live = {}
        self._graph_refs = []
        self._dead.clear()
        self._side_pending = set()

    def _discard_step(self) -> None:
        # A failed backward's products may still run on a side stream, reading the blocks that
        # an end_epoch() right after rewrites: the training stream waits for them (no host
        # sync), as at a step's end. A broken device (the error that failed the backward) must
        # not turn this clean-up into a second error.
        with contextlib.suppress(Exception):
            self._join_side_streams()
        self._reset_step()
        self._callback_queued = False

    # -- epochs, errors, teardown ---------------------------------------------------------------

    def _finish_epoch(self) -> None:
        # The epoch's end rewrites the blocks (Ω) that products queued on a side stream may still
        # read (an end_epoch() on another thread while a backward runs): it waits for them.
        self._join_side_streams()
        layout = self.layout
        sigma = np.full((len(self.sites), len(KINDS), len(layout.groups), layout.rank), np.nan)
        k = layout.rank
        for index, tracker in enumerate(self._trackers):
            # The device-side Ω updates (end_epoch() may be called inside an autocast region).
            with as_written({tracker.bank.device}, conv=False):
                spectra = tracker.end_epoch()
            # Samples of steps whose products were not finite never reached the sketches.
            n = self._epoch_counts[index] - spectra.excluded
            for kind_index, values in enumerate(
                (spectra.activation, spectra.adjoint, spectra.gradient)
            ):
                width = min(k, values.shape[1])
                block = np.full((len(layout.groups), k), np.nan)
                block[:, :width] = values[:, :width]
                if layout.normalize == "mean":
                    with np.errstate(divide="ignore", invalid="ignore"):
                        scale = n if kind_index == 2 else np.sqrt(n)
                        block = block / scale[:, None]
                block[n == 0] = np.nan
                sigma[index, kind_index] = block
        record = EpochRecord(self._epoch, sigma)
        # Counters before the hand-over (as for steps: an interrupt after it must not leave the
        # next epoch with this one's index).
        self._epoch += 1
        self._epoch_counts[:] = 0
        self._epoch_steps = 0
        self._pipeline.submit(record)
        self._emit_warnings()

    def _fail(self, error: BaseException) -> None:
        if self._failed is None:
            self._failed = error
            warnings.warn(
                f"streamspec stopped recording after an internal error ({type(error).__name__}: "
                f"{error}); training continues and steps recorded so far are kept",
                StreamspecWarning,
                stacklevel=3,
            )

    def _emit_warnings(self) -> None:
        if self._warned_nonfinite:
            return
        names = self._pipeline.new_nonfinite_layers()
        if names:
            self._warned_nonfinite = True
            warnings.warn(
                f"streamspec: NaN/Inf in the activations or gradients of {describe(names)}; "
                "such steps are recorded as NaN and training is not affected (warned once per run)",
                StreamspecWarning,
                stacklevel=3,
            )

    def _raise_worker_error(self) -> None:
        error = self._pipeline.take_error()
        if error is not None:
            raise RuntimeError(f"streamspec's host pipeline failed: {error}") from error

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        restore(self._swaps)

    def _check_open(self) -> bool:
        """True while open. False once the process's exit closed it: a thread that still trains
        with it then (the main module had ended) goes on, unrecorded. A usage error after
        ``close()``."""
        if not self._closed:
            return True
        if self._closed_at_exit:
            return False
        raise StreamspecError.build(
            "an open monitor",
            "a closed one",
            "call streamspec.watch() again (resume=True appends)",
        )


class _StepwiseSink:
    """What the stepwise twins report to: the monitor's :meth:`Monitor._deliver`, and whether it
    records the current step (a recurrent twin runs the fused kernel on the steps it does not:
    ``every > 1``)."""

    __slots__ = ("_monitor",)

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    def __call__(self, module: nn.Module, captures: list[Capture]) -> None:
        self._monitor._deliver(module, captures)

    def recording(self) -> bool:
        monitor = self._monitor
        return not monitor._closed and not monitor._paused and monitor._records_step()


class _Unwatched:
    """What a monitor becomes in a pickled model: the hooks it left on the modules do nothing."""

    def _on_forward(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        return None

    def _deliver(self, module: nn.Module, captures: list[Capture]) -> None:
        return None


GPU_BATCH_LAYERS = 4
"""Layers of one bank whose sketched-route products run together on a CUDA device, by default."""


def batch_layers(kind: str) -> int:
    """How many layers of one bank (same shape, same device) run their sketched-route products
    together on devices of type ``kind``: ``STREAMSPEC_BATCH_LAYERS`` if set, else
    :data:`GPU_BATCH_LAYERS` on CUDA devices and 1 (each layer in its own hook) elsewhere.

    Batching holds each layer's gathered rows until the batch is complete (at most
    :data:`BATCH_BYTES` per bank), in exchange for products that fill a GPU better (an H200,
    BERT-base size: the products' device time 12.0 → 6.5 ms per step with 4, and with the side
    stream the watched step 1.27× → 1.17× the plain one; bench/README.md). Each layer's rows
    are gathered straight into its slot of the batch's buffer (:meth:`Monitor._slot`). On CPUs
    it does not pay: their GEMMs use every core already (batched and layer-by-layer steps took
    the same time on this project's 2-core machines)."""
    value = os.environ.get("STREAMSPEC_BATCH_LAYERS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            pass
    return GPU_BATCH_LAYERS if kind == "cuda" else 1


def side_stream(kind: str) -> bool:
    """Whether the sketched-route row products of layers on devices of type ``kind`` run on a
    side stream, beside the model's backward: ``STREAMSPEC_SIDE_STREAM`` if set (``1``, ``true``,
    ``yes``, ``on``; ``0``, ``false``, ``no``, ``off``), else on CUDA devices (the only ones with
    streams here). On an H200 alone it gains nothing (the skinny products of one layer at a time
    still sit between the model's kernels), but with the layers batched it takes another 2.5 ms
    off a BERT-base step (bench/README.md)."""
    value = os.environ.get("STREAMSPEC_SIDE_STREAM", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return kind == "cuda"


def _hook_target(cap: Capture) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The tensor whose gradient hook stands for ``cap.output``'s, and its adjoint-rows map.

    An output that is a view of a tensor of the same elements (``nn.Linear`` on 3-D input
    returns its ``[B·T, h]`` product viewed as ``[B, T, h]``) is hooked through its base: an
    in-place op on the output (``nn.ReLU(inplace=True)``, ``x += residual``) replaces a view's
    autograd node, and the hook on the old node never fired (the layer silently unrecorded),
    while the base's node stays in the graph and gets the gradient of the values before the op,
    as a hook on a tensor that is no view does. The base's gradient is the output's, reshaped.
    (:func:`_register_hook` also covers a backward that stops at the output.)"""
    output = cap.output
    base = output._base
    if (
        base is None
        or base.grad_fn is None
        or base.numel() != output.numel()
        or base.data_ptr() != output.data_ptr()
        or not base.is_contiguous()
        or not output.is_contiguous()
    ):
        return output, cap.adjoint
    return base, functools.partial(_reshaped_adjoint, cap.adjoint, output.shape)


def _register_hook(
    output: torch.Tensor, target: torch.Tensor, hook: Callable[[torch.Tensor], None]
) -> None:
    """Register ``hook`` for ``output``'s gradient on ``target`` (:func:`_hook_target`). On a
    view's base, it is registered on the output too, where it runs only in a backward that will
    not run the base's node: one that stops at the output (``autograd.grad(loss, inputs=[h])``),
    whose gradient never reaches the base. In any other backward the base's hook runs, with the
    whole gradient (the view's node also runs first with a part of it when the output was read
    before an in-place op, which is why that hook waits for the base's)."""
    target.register_hook(hook)
    if target is not output:
        output.register_hook(functools.partial(_unless_node_runs, target.grad_fn, hook))


def _unless_node_runs(node: Any, hook: Callable[[torch.Tensor], None], grad: torch.Tensor) -> None:
    """Run ``hook`` unless the backward under way will run ``node`` (see :func:`_register_hook`)."""
    try:
        runs = torch._C._will_engine_execute_node(node)
    except RuntimeError:  # (never expected inside a backward: the base's hook stands)
        return
    if not runs:
        hook(grad)


def _reshaped_adjoint(
    adjoint: Callable[[torch.Tensor], torch.Tensor], shape: torch.Size, grad: torch.Tensor
) -> torch.Tensor:
    """A view's adjoint rows from its base's gradient (see :func:`_hook_target`)."""
    return adjoint(grad.reshape(shape))


def _stacked_slots(queue: list[_Queued]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The queued layers' rows and adjoint rows as one stacked ``[n·C, m, h]`` view each, when
    they sit in consecutive slots of one batch buffer (as :meth:`Monitor._slot` hands them
    out), else None (then stacked by a copy)."""
    first = queue[0].slot
    if first is None:
        return None
    buffer, start = first
    for i, q in enumerate(queue):
        at = start + i
        if (
            q.slot is None
            or q.slot[0] is not buffer
            or q.slot[1] != at
            # the rows the fold queued are the slot's own (nothing replaced them on the way)
            or q.rows.data_ptr() != buffer.rows[at].data_ptr()
            or q.adjoint.data_ptr() != buffer.adjoints[at].data_ptr()
            or q.rows.shape != buffer.rows[at].shape
            or q.adjoint.shape != buffer.adjoints[at].shape
        ):
            return None
    end = start + len(queue)
    return buffer.rows[start:end].flatten(0, 1), buffer.adjoints[start:end].flatten(0, 1)


def _profiled(name: str) -> contextlib.AbstractContextManager[Any]:
    """A profiler range around streamspec's work, only while a profiler records (entering a
    ``record_function`` costs the hot path tens of microseconds otherwise)."""
    if torch._C._autograd._profiler_enabled():
        return record_function(name)
    return contextlib.nullcontext()


def _to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
    """Copy device tensors to the host without synchronising: pinned buffers, non-blocking
    copies, one CUDA event per device. Returns the host tensors and a ``ready()`` that waits for
    the copies (None when nothing was on a GPU). Other accelerators (MPS, XPU) get a blocking
    copy: without an event to wait on, the host thread could read a buffer before it lands."""
    out: list[torch.Tensor] = []
    for t in tensors:
        if t.device.type == "cpu":
            out.append(t.detach())
            continue
        if t.device.type != "cuda":
            out.append(t.detach().to("cpu"))
            continue
        buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buffer.copy_(t.detach(), non_blocking=True)
        out.append(buffer)
    # One event per device, recorded on the stream each copy was queued on.
    events = [
        torch.cuda.current_stream(device).record_event()
        for device in {t.device for t in tensors}
        if device.type == "cuda"
    ]

    def ready() -> None:
        for e in events:
            e.synchronize()

    return out, ready if events else None


def _trackers(
    sites: Sequence[Site], n_groups: int, config: WatchConfig, generator: torch.Generator
) -> list[LayerTracker]:
    """One tracker per weight matrix; matrices of one shape share a :class:`SketchBank`."""
    counts = Counter((s.h_in, s.h_out) for s in sites)
    banks = {
        shape: SketchBank(
            *shape,
            n_groups,
            SketchWidths.for_layer(*shape, config.rank, config.oversample),
            capacity=n,
        )
        for shape, n in counts.items()
    }
    # A generator per layer, seeded in layer order from the monitor's: the hooks of a model
    # spread over devices run on one thread per device, and draws from one shared generator
    # would depend on how those threads interleave.
    seeds = torch.randint(0, 2**62, (len(sites),), generator=generator).tolist()
    return [
        LayerTracker(
            s.h_in,
            s.h_out,
            n_groups,
            config.rank,
            config.oversample,
            torch.Generator().manual_seed(seed),
            bank=banks[(s.h_in, s.h_out)],
        )
        for s, seed in zip(sites, seeds, strict=True)
    ]


def _persistent(store: object) -> bool:
    """Whether ``store`` outlives the process (not None, ``memory://`` or a MemoryStore)."""
    if store is None:
        return False
    if isinstance(store, str | os.PathLike):
        return not str(store).startswith("memory://")
    return not isinstance(store, zarr.storage.MemoryStore)


def _executor_worker(thread: threading.Thread) -> bool:
    """A ``ThreadPoolExecutor``'s worker: non-daemon, alive while idle, ended only by the
    executors' own exit hook (which runs after streamspec's)."""
    return thread in getattr(concurrent.futures.thread, "_threads_queues", ())


def _idle(worker: threading.Thread) -> bool:
    """Whether an executor's worker waits for work (its innermost Python frame is the worker
    loop's, blocked in the work queue's C ``get``), rather than running a job."""
    frame = sys._current_frames().get(worker.ident or -1)
    return frame is None or frame.f_code is concurrent.futures.thread._worker.__code__


def _wait_until_idle(worker: threading.Thread) -> None:
    """Until an executor's worker has finished its jobs (the executors' own exit waits for them
    too, after streamspec's: no wait here that the exit would not make anyway)."""
    while worker.is_alive() and not _idle(worker) and not lifecycle.terminating():
        time.sleep(0.05)


def _exit_note(text: str) -> None:
    """A warning at the process's exit, where nothing may raise (``-W error`` would turn it into
    an exception inside ``threading._shutdown``): then it is printed instead."""
    try:
        warnings.warn_explicit(text, StreamspecWarning, "<exit>", 0)
    except Exception:
        print(f"StreamspecWarning: {text}", file=sys.stderr)


def _store_label(store: object) -> str | None:
    if store is None:
        return None
    if isinstance(store, str | os.PathLike):
        return str(Path(store))
    return type(store).__name__


def watch(
    model: nn.Module,
    groups: Sequence[str],
    rank: int,
    *,
    store: str | os.PathLike[str] | Any | None = None,
    every: int = 1,
    live: bool | None = None,
    resume: bool = False,
    normalize: str = "mean",
    batch_dim: int | Mapping[str, int] = 0,
    seed: int = 0,
    oversample: int = 10,
    exact_rows: int | None = None,
    on_unsupported: str = "warn",
    tied: bool = False,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> Monitor:
    """Watch the singular values of every supported layer of ``model``, split by groups.

    Per recorded step, layer and group it records the top-``rank`` singular values of the
    activations ``A_c`` (the layer's input rows of group ``c``), the adjoints ``Δ_c`` (gradient of
    the loss w.r.t. the layer's output ``W·a``, before any bias) and the group's share of the weight
    gradient ``A_cᵀΔ_c``; per epoch, the same for everything the epoch's recorded steps saw, and
    Welch t-tests between every pair of groups (Baker, Calhoun & Plis 2024, made streaming).

    Args:
        model: the module to watch; hooks go on its supported layers (nn.Linear).
        groups: unique group names; ``mon.label()`` values index them.
        rank: ``k ≥ 1`` singular values kept per matrix.
        store: path of a Zarr v3 archive to write (or a zarr store object); None keeps the run in
            memory (``mon.to_xarray()`` works either way).
        every: record every n-th step (only recorded steps enter epoch spectra and Welch tests).
        live: None: a rich live table when stdout is a terminal, else one summary line per
            epoch on stderr; True: always the live table; False: silent.
        resume: append to an existing archive (layers, groups and rank must match). Without it an
            existing path is refused, never overwritten.
        normalize: ``"mean"`` divides activation/adjoint σ by ``√n_c`` and gradient σ by ``n_c``
            (``n_c`` = group-c samples in the step), so groups of different sizes compare;
            ``"sum"`` records them unscaled. With a mean-reduced loss Δ also carries the loss's
            ``1/B``.
        batch_dim: the dimension of a watched layer's input that indexes samples (1 for
            sequence-first models); or a mapping from module names (``model.named_modules()``)
            to that dimension for the modules under them, for a model mixing layouts (e.g.
            ``{"encoder": 1}``: a sequence-first encoder under a batch-first head): each module
            takes its longest matching name prefix, 0 without one. Convolutions always take 0,
            and MultiheadAttention/RNN modules their own ``batch_first``.
        seed: seed of the monitor's own random generator (the global RNG is never touched).
        oversample: sketch columns beyond ``rank`` (accuracy vs cost).
        exact_rows: per-group row count up to which a step's spectra are computed exactly from
            the rows (default: ``rank + oversample``, where the rows cost no more than a sketch).
        on_unsupported: modules with weight matrices streamspec cannot watch: ``"warn"`` (one
            line naming them), ``"error"`` (raise) or ``"skip"`` (silently).
        tied: also record ``sigma_tied`` (step, layer, group, rank) for convolution and recurrent
            weights: σ of the matrix whose rows are the per-position (per-time-step)
            contributions to the group's gradient (the paper's "dimension of tying").
        grad_scaler: the ``torch.amp.GradScaler`` whose ``scale(loss)`` the training calls
            ``backward()`` on (fp16 mixed precision): adjoints and gradients are then recorded
            for the loss itself, not multiplied by the scale of the moment.

    Returns:
        A :class:`Monitor` (also a context manager).
    """
    names = _check_config(groups, rank, every, normalize, batch_dim, oversample, exact_rows)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise StreamspecError.build("seed as an integer", repr(seed), "pass e.g. seed=0")
    if live is not None and not isinstance(live, bool):
        raise StreamspecError.build(
            "live as None (auto), True or False", repr(live), "pass live=False to silence it"
        )
    if not isinstance(tied, bool):
        raise StreamspecError.build("tied as True or False", repr(tied), "pass tied=True")
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise StreamspecError.build(
            "grad_scaler as a torch.amp.GradScaler (or None)",
            type(grad_scaler).__name__,
            "pass the scaler whose scale(loss) you call backward() on",
        )
    if on_unsupported not in ("warn", "error", "skip"):
        raise StreamspecError.build(
            "on_unsupported in ('warn', 'error', 'skip')", repr(on_unsupported), "use 'warn'"
        )
    config = WatchConfig(
        groups=names,
        rank=rank,
        every=every,
        normalize=normalize,
        batch_dim=as_batch_dim(batch_dim),
        seed=seed,
        oversample=oversample,
        exact_rows=exact_rows,
        on_unsupported=on_unsupported,
        tied=tied,
    )
    return Monitor(model, config, store=store, live=live, resume=resume, grad_scaler=grad_scaler)


def validate(model: nn.Module) -> list[str]:
    """Every reason a part of ``model`` would not be watched, at once (empty: all watched).

    Lists modules owning trainable weight matrices that no layer family handles, modules a family
    handles only in part (e.g. grouped convolutions), and a model with nothing to watch.
    """
    if not isinstance(model, nn.Module):
        raise StreamspecError.build("a torch.nn.Module", type(model).__name__, "pass the model")
    problems = unsupported_matrices(model)
    if not find_sites(model):
        problems.append("no supported layer with trainable weights: nothing would be recorded")
    return problems
