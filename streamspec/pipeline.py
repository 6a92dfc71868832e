"""The host side of a run: a background thread that turns step sketches into recorded spectra.

Training thread → (device products, async copies) → :class:`HostPipeline` queue → float64
factorisations → ``sigma`` rows → Welch accumulators, archive writer, live snapshot.
The training thread never waits on this thread except when the queue is full (back-pressure, so
no step is ever dropped) and at ``end_epoch()``/``close()`` boundaries that ask for a drain. A step
whose spectra fail here is recorded as NaN (its counts kept), with one warning: training goes on.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamspec import lifecycle
from streamspec.errors import StreamspecWarning
from streamspec.layout import RunLayout
from streamspec.live.snapshot import Snapshot
from streamspec.live.view import epoch_line
from streamspec.sketch.host import (
    GIL_THRESHOLD,
    exact_spectra,
    singular_values,
    sketched_spectra,
)
from streamspec.sketch.tracker import Fields, unpack_fields
from streamspec.stats.welch import GroupWelch
from streamspec.store.writer import ArchiveWriter

_STOP = object()
_ABANDONED = object()  # the last item of a monitor collected without close() (``abandon``)
FLUSH_SECONDS = 60.0  # hand buffered rows to the writer at least this often


@dataclass
class LayerStep:
    """One layer's share of one step.

    Attributes:
        index: the layer's position in ``layout.layers``.
        route: ``"exact"`` (rows) or ``"sketch"`` (small Gram matrices); see ``StepSketch``.
        tensors: host tensors (possibly still being filled by an async copy; see
            ``StepRecord.ready``): the rows on the exact route; the tying Gram, if any, on the
            sketched route (whose matrices are in ``packed``).
        positions: rows per sample summed over the module's calls in the step.
    """

    index: int
    route: str
    tensors: dict[str, torch.Tensor | np.ndarray]
    positions: int
    n_positions: int = 0  # distinct positions for the tying spectrum (0: not tied)
    # ``[C]`` rows per group over the step's calls (``counts × positions`` unless separately
    # labelled batches went through the layer); None: ``counts × positions``.
    group_rows: np.ndarray | None = None
    # Sketched route: the layer's packed row ``[C, F]`` of its bank's host copy and the bank's
    # ``(name, offset, shape)`` fields (read with views of a stack of such rows).
    packed: np.ndarray | None = None
    fields: Fields = ()


@dataclass
class StepRecord:
    """Everything the host needs for one recorded step."""

    step: int
    epoch: int
    counts: np.ndarray  # [C] samples per group
    layers: list[LayerStep]
    ready: Callable[[], None] | None = None  # blocks until async copies have landed


@dataclass
class EpochRecord:
    """An epoch's reconstructed spectra, ``[L, 3, C, k]``, already normalised."""

    epoch: int
    sigma_epoch: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)


def _single_threaded_host_blas() -> Any:
    """Limit numpy/scipy's own OpenBLAS pools to one thread while the monitor runs.

    The host thread factors b × b matrices: one thread is fastest, and a second spinning BLAS
    pool beside torch's OpenMP pool oversubscribes the cores (measured on 2 cores: a monitored
    step 1.9 s instead of 0.3 s). Only the ``libscipy_openblas`` libraries that numpy/scipy wheels
    ship are limited, never torch's; the limits are restored on close.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a dependency; keep working without it
        return None
    pools = ThreadpoolController().select(internal_api="openblas", prefix="libscipy_openblas")
    return pools.limit(limits=1) if pools.lib_controllers else None


# One limit for the whole process, held while any monitor runs: limits taken per monitor and
# restored in the order monitors close (first opened, first closed) left the pools at one
# thread for good, the second monitor having saved the first one's limit as the original.
# OpenBLAS (numpy's 0.3.31, measured) ignores a thread count set from a thread other than the
# main one once the main thread has set it, so a limit the main thread set is restored on the
# main thread: a release elsewhere (a monitor collected without close(), on its host thread)
# leaves it to the next monitor's start or close there.
_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_LIMIT: Any = None
_BLAS_THREAD: threading.Thread | None = None


def _restore_host_blas() -> None:
    """Restore the limit if it is not in use and this thread can (under ``_BLAS_LOCK``)."""
    global _BLAS_LIMIT
    main = threading.main_thread()
    can = threading.current_thread() is main or _BLAS_THREAD is not main
    if _BLAS_USERS == 0 and _BLAS_LIMIT is not None and can:
        _BLAS_LIMIT.restore_original_limits()
        _BLAS_LIMIT = None


def _hold_host_blas() -> None:
    global _BLAS_USERS, _BLAS_LIMIT, _BLAS_THREAD
    with _BLAS_LOCK:
        _restore_host_blas()  # one left by a release on another thread
        if _BLAS_USERS == 0 and _BLAS_LIMIT is None:
            _BLAS_LIMIT = _single_threaded_host_blas()
            _BLAS_THREAD = threading.current_thread()
        _BLAS_USERS += 1


def _release_host_blas() -> None:
    global _BLAS_USERS
    with _BLAS_LOCK:
        _BLAS_USERS -= 1
        _restore_host_blas()


_MIN_CHUNK = 8  # (layer, group) problems per worker chunk: smaller ones are not worth a hand-off


def host_workers(cores: int | None = None) -> int:
    """Threads for the host factorisations: one per four cores beyond the first four, at most
    four (a 2-core machine keeps one: training needs those cores); ``STREAMSPEC_HOST_WORKERS``
    overrides."""
    override = os.environ.get("STREAMSPEC_HOST_WORKERS")
    if override:
        try:
            return max(1, int(override))
        except ValueError:
            pass
    if cores is None:
        affinity = getattr(os, "sched_getaffinity", None)
        cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return int(min(4, max(1, cores // 4)))


def _bounded(values: np.ndarray, bound: int | np.ndarray, rank: int) -> np.ndarray:
    """Top-``rank`` of descending ``values`` ``[..., r]`` → ``[..., rank]``, NaN beyond the
    matrix's rank ``bound`` (an int, or one per leading index)."""
    top = np.full((*values.shape[:-1], rank), np.nan)
    width = min(rank, values.shape[-1])
    top[..., :width] = values[..., :width]
    return np.where(np.arange(rank) < np.asarray(bound)[..., None], top, np.nan)


class HostPipeline:
    """Background thread: step sketches → normalised σ rows → Welch, archive, snapshot.

    Args:
        layout: the run's layout.
        widths: ``[(h_in, h_out)]`` per layer.
        writer: where rows go.
        plain_epoch_lines: print one summary line per epoch to stderr (non-terminal output).
        store_label: where the archive is, for display.
    """

    def __init__(
        self,
        layout: RunLayout,
        widths: list[tuple[int, int]],
        writer: ArchiveWriter,
        *,
        plain_epoch_lines: bool,
        store_label: str | None,
        max_queue: int = 1024,
    ) -> None:
        self.layout = layout
        self._widths = widths
        self._writer = writer
        self._plain = plain_epoch_lines
        self._store_label = store_label
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._welch = GroupWelch(layout.step_shape)
        self._latest: np.ndarray | None = None
        self._last_step = -1
        self._epoch = 0
        self._steps_in_epoch = 0
        self._started = time.monotonic()
        self._last_flush = self._started
        self._finished: tuple[int, int, np.ndarray] | None = None  # last epoch: (index, steps, t)
        self._nonfinite_layers: set[str] = set()
        self._reported_nonfinite: set[str] = set()
        self._error: BaseException | None = None
        self._warned_failure = False
        self._abandoned = False  # the monitor was collected without close(): see abandon()
        _hold_host_blas()
        self._blas = True  # holds the process's host BLAS limit until released
        # Spare cores (a GPU machine's host): factorise chunks of a step's sketches in parallel.
        self._workers = host_workers()
        self._pool = (
            ThreadPoolExecutor(self._workers, thread_name_prefix="streamspec-host-worker")
            if self._workers > 1
            else None
        )
        self._thread = threading.Thread(target=self._run, name="streamspec-host", daemon=True)
        self._thread.start()

    # -- training-thread API --------------------------------------------------------------------

    def submit(self, item: StepRecord | EpochRecord) -> None:
        self._queue.put(item)

    def drain(self) -> None:
        """Block until everything submitted so far has been processed."""
        self._queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._release()

    def _release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._blas:
            self._blas = False
            _release_host_blas()

    def abandon(self) -> None:
        """Shut down for a monitor garbage-collected without ``close()``, from whichever thread
        collected it (zarr's event loop, possibly), never waiting there: the worker finishes
        what is queued, closes the writer and releases its resources, on its own thread."""
        self._writer.closing()  # a new writer of its archive waits for it, not refused
        lifecycle.wait_at_exit(self)  # the process's exit waits for it to finish
        self._abandoned = True  # a worker busy with a full queue sees this once it is empty
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_ABANDONED)  # wakes an idle worker

    def join(self) -> None:
        """Wait for the worker thread to end (after ``close()`` or ``abandon()``)."""
        self._thread.join()

    def take_error(self) -> BaseException | None:
        error, self._error = self._error, None
        return error

    def new_nonfinite_layers(self) -> list[str]:
        """Layers that produced NaN/Inf since the last call (each reported once per run)."""
        with self._lock:
            fresh = sorted(self._nonfinite_layers - self._reported_nonfinite)
            self._reported_nonfinite |= self._nonfinite_layers
        return fresh

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def restore_epoch(self, sigma: np.ndarray) -> None:
        """Resume an unfinished epoch: fold its archived per-step σ ``[n, L, 3, C, k]`` back into
        the Welch accumulators, so the epoch's tests cover all of its steps."""
        with self._lock:
            self._welch.update_batch(sigma)
            self._steps_in_epoch += len(sigma)

    def snapshot(self) -> Snapshot | None:
        """The latest recorded step and the Welch t of the epoch so far (for live views)."""
        with self._lock:
            if self._latest is None:
                return None
            if self._steps_in_epoch == 0 and self._finished is not None:
                # Between epochs: keep showing the epoch that just finished.
                epoch, steps_in_epoch, welch_t = self._finished
            else:
                epoch, steps_in_epoch = self._epoch, self._steps_in_epoch
                welch_t = self._welch.compute()[0]
            return Snapshot(
                layout=self.layout,
                step=self._last_step,
                epoch=epoch,
                steps_in_epoch=steps_in_epoch,
                sigma=self._latest.copy(),
                welch_t=welch_t.astype(np.float32),
                store=self._store_label,
                elapsed_s=time.monotonic() - self._started,
            )

    # -- worker thread --------------------------------------------------------------------------

    def _shut_down_abandoned(self) -> None:
        """Close the writer and release, for nobody: no one is left to report an error to."""
        try:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._release()
        finally:
            lifecycle.finished(self)

    def _run(self) -> None:
        while True:
            if self._abandoned and self._queue.empty():  # abandoned while its queue was full
                self._shut_down_abandoned()
                return
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if item is _ABANDONED:
                    self._shut_down_abandoned()
                    return
                if isinstance(item, StepRecord):
                    self._on_step(item)
                elif isinstance(item, EpochRecord):
                    self._on_epoch(item)
            except BaseException as error:  # never let the worker die silently
                if self._error is None:
                    self._error = error
            finally:
                if isinstance(item, EpochRecord):
                    item.done.set()
                self._queue.task_done()

    def _on_step(self, rec: StepRecord) -> None:
        failure: Exception | None = None
        try:
            row = self._step_row(rec)
        except Exception as error:
            # A factorisation that fails (LAPACK), a copy that never landed, a bug: the step is
            # still recorded, as NaN with its counts, so the archive and the epoch's counts
            # keep every step, and the user's training never sees the error.
            failure = error
            row = self._nan_row(rec.counts)
        sigma = row["sigma"]
        self._writer.append_step(row, step=rec.step, epoch=rec.epoch)
        if time.monotonic() - self._last_flush > FLUSH_SECONDS:
            # Slow steps: do not sit on unwritten rows for hours (a hand-off without waiting
            # for the write; it waits only while the store is a whole block behind).
            self._writer.flush(wait=False)
            self._last_flush = time.monotonic()
        with self._lock:
            self._welch.update(sigma)  # NaN cells are skipped
            # The live view shows each cell's latest recorded value: a group absent from the last
            # step (e.g. a short final batch) keeps its previous σ instead of flickering to "–".
            self._latest = (
                sigma if self._latest is None else np.where(np.isnan(sigma), self._latest, sigma)
            )
            self._last_step = rec.step
            self._epoch = rec.epoch
            self._steps_in_epoch += 1
        if failure is not None and not self._warned_failure:
            self._warned_failure = True
            # Last, once the step is recorded: under ``-W error`` this raises, and the error then
            # reaches the training thread at the next end_epoch() as the user asked.
            warnings.warn(
                f"streamspec: computing the spectra of step {rec.step} failed on the host "
                f"thread ({type(failure).__name__}: {failure}); such steps are recorded as NaN "
                "with their counts and training is not affected (warned once per run)",
                StreamspecWarning,
                stacklevel=2,
            )

    def _nan_row(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """A step row of NaN spectra with the step's ``counts`` ``[C]``."""
        layout = self.layout
        row: dict[str, np.ndarray] = {
            "sigma": np.full(layout.step_shape, np.nan, dtype=np.float32),
            "sigma_err": np.full(layout.step_shape, np.nan, dtype=np.float32),
            "count": counts,
        }
        if "sigma_tied" in layout.extras:
            row["sigma_tied"] = np.full(
                (len(layout.layers), len(layout.groups), layout.rank), np.nan, dtype=np.float32
            )
        return row

    def _step_row(self, rec: StepRecord) -> dict[str, np.ndarray]:
        """The row of one step: ``sigma``/``sigma_err`` ``[L, 3, C, k]``, ``count`` ``[C]`` and,
        with ``tied``, ``sigma_tied`` ``[L, C, k]``."""
        if rec.ready is not None:
            rec.ready()
        row = self._nan_row(rec.counts)
        sigma = row["sigma"]
        tied = "sigma_tied" in self.layout.extras
        self._exact_sigma(
            [layer for layer in rec.layers if layer.route == "exact"],
            rec.counts,
            sigma,
            row["sigma_err"],
        )
        self._sketched_sigma(
            [layer for layer in rec.layers if layer.route == "sketch"],
            rec.counts,
            sigma,
            row["sigma_err"],
        )
        for layer in rec.layers:
            if tied and layer.n_positions:
                row["sigma_tied"][layer.index] = self._layer_tied(layer, rec.counts)
        return row

    def _exact_sigma(
        self, layers: list[LayerStep], counts: np.ndarray, sigma: np.ndarray, error: np.ndarray
    ) -> None:
        """Fill ``sigma``/``error`` ``[L, 3, C, k]`` for the exact-route layers: σ of each group's
        rows, error 0 (float64 spectra of the float32 rows). One batched :func:`exact_spectra`
        per shape of rows (all layers and groups at once, no Python loop over them)."""
        n_groups = counts.size
        by_shape: dict[tuple[tuple[int, ...], tuple[int, ...]], list[LayerStep]] = {}
        for layer in layers:
            a, d = layer.tensors["activation"], layer.tensors["adjoint"]
            by_shape.setdefault((tuple(a.shape), tuple(d.shape)), []).append(layer)
        for group in by_shape.values():
            n = len(group)
            a = np.stack([_host(lay.tensors["activation"]) for lay in group])
            d = np.stack([_host(lay.tensors["adjoint"]) for lay in group])
            a, d = a.reshape(n * n_groups, *a.shape[2:]), d.reshape(n * n_groups, *d.shape[2:])
            finite = np.isfinite(a).all(axis=(1, 2)) & np.isfinite(d).all(axis=(1, 2))
            if not finite.all():  # non-finite rows: that group's σ is NaN, the others recorded
                a[~finite], d[~finite] = 0.0, 0.0  # the stacks are copies
                self._mark_nonfinite(group, finite, n_groups)
            spectra = exact_spectra(a, d)
            errors = [np.zeros_like(values) for values in spectra]
            self._store(group, counts, finite, spectra, errors, sigma, error)

    def _store(
        self,
        layers: list[LayerStep],
        counts: np.ndarray,
        finite: np.ndarray,
        spectra: list[np.ndarray] | tuple[np.ndarray, ...],
        errors: list[np.ndarray],
        sigma: np.ndarray,
        error: np.ndarray,
    ) -> None:
        """Write the spectra ``[(layer, group), r]`` of ``layers`` into ``sigma``/``error``,
        vectorised over (layer, group): NaN beyond each matrix's rank and for absent or
        non-finite groups; normalised by the group's sample count."""
        k, n_groups, n = self.layout.rank, counts.size, len(layers)
        index = np.array([lay.index for lay in layers])
        widths = np.array([self._widths[lay.index] for lay in layers])  # [n, 2]
        n_rows = np.stack(
            [counts * lay.positions if lay.group_rows is None else lay.group_rows for lay in layers]
        )
        bounds = (
            np.minimum(n_rows, widths[:, :1]),
            np.minimum(n_rows, widths[:, 1:]),
            np.minimum(n_rows, widths.min(axis=1, keepdims=True)),
        )
        present = (counts > 0) & finite.reshape(n, n_groups)  # [n, C]
        scales = np.ones((3, n_groups))
        if self.layout.normalize == "mean":
            scales[:] = np.sqrt(counts), np.sqrt(counts), counts
        for kind in range(3):
            for out, values in ((sigma, spectra[kind]), (error, errors[kind])):
                bounded = _bounded(values.reshape(n, n_groups, -1), bounds[kind], k)
                with np.errstate(divide="ignore", invalid="ignore"):
                    scaled = bounded / scales[kind][:, None]
                out[index, kind] = np.where(present[..., None], scaled, np.nan)

    def _mark_nonfinite(self, layers: list[LayerStep], finite: np.ndarray, n_groups: int) -> None:
        """Remember the layers with a non-finite group (``finite`` ``[(layer, group)]``)."""
        with self._lock:
            for j, lay in enumerate(layers):
                if not finite[j * n_groups : (j + 1) * n_groups].all():
                    self._nonfinite_layers.add(self.layout.layers[lay.index])

    def _sketched_sigma(
        self, layers: list[LayerStep], counts: np.ndarray, sigma: np.ndarray, error: np.ndarray
    ) -> None:
        """Fill ``sigma``/``error`` ``[L, 3, C, k]`` for the sketched layers, one batched host
        factorisation per sketch shape (all layers and groups at once): the layers' packed rows
        are stacked once, and each matrix is a view of that stack."""
        n_groups = counts.size
        by_fields: dict[Fields, list[LayerStep]] = {}
        for layer in layers:
            by_fields.setdefault(layer.fields, []).append(layer)
        for fields, group in by_fields.items():
            n = len(group)
            rows = np.stack([_packed(layer) for layer in group]).reshape(n * n_groups, -1)
            finite = np.isfinite(rows).all(axis=1)  # [(layer, group)]
            if not finite.all():
                rows[~finite] = 0.0  # a copy: the stack
                self._mark_nonfinite(group, finite, n_groups)
            spectra, errors = self._spectra(unpack_fields(rows, fields))
            self._store(group, counts, finite, spectra, errors, sigma, error)

    def _spectra(self, stacked: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """:func:`sketched_spectra` of a batch, split over the worker pool when there is one
        (LAPACK releases the GIL: the chunks run in parallel on spare cores)."""
        n = next(iter(stacked.values())).shape[0]
        # A chunk's eigenvalue calls must stay past numpy's GIL threshold (else they are padded
        # to it: wasted work), the narrowest sketch side setting the size.
        narrowest = min(stacked["core_d"].shape[-1], *stacked["core_g"].shape[-2:])
        chunk = max(_MIN_CHUNK, GIL_THRESHOLD // max(narrowest, 1) + 1)
        if self._pool is None or n < 2 * chunk:
            return sketched_spectra(stacked)
        parts = min(self._workers, n // chunk)
        edges = np.linspace(0, n, parts + 1).astype(int)
        chunks = [
            {name: v[lo:hi] for name, v in stacked.items()}
            for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        ]
        results = list(self._pool.map(sketched_spectra, chunks))
        return (
            [np.concatenate([r[0][kind] for r in results]) for kind in range(3)],
            [np.concatenate([r[1][kind] for r in results]) for kind in range(3)],
        )

    def _layer_tied(self, layer: LayerStep, counts: np.ndarray) -> np.ndarray:
        """``[C, k]`` tying spectrum of one layer in one step (normalised like the gradient)."""
        k = self.layout.rank
        h_in, h_out = self._widths[layer.index]
        out = np.full((counts.size, k), np.nan)
        t = {name: _host(v) for name, v in layer.tensors.items()}
        grams, groups = [], []
        for c, n in enumerate(counts):
            if n == 0:
                continue
            if layer.route == "exact":
                position = t["position"]
                a = t["activation"][c].astype(np.float64)
                d = t["adjoint"][c].astype(np.float64)
                # K = Sᵀ((AAᵀ) ⊙ (ΔΔᵀ))S with S the row → position indicator: P × P, exact.
                indicator = np.zeros((position.size, layer.n_positions))
                indicator[np.arange(position.size), position] = 1.0
                gram = indicator.T @ ((a @ a.T) * (d @ d.T)) @ indicator
            else:
                gram = t["tied"][c]
            if np.isfinite(gram).all():
                grams.append(gram)
                groups.append(c)
        if not grams:
            return out
        values = singular_values(np.stack(grams))  # one eigenvalue call for the layer's groups
        for c, v in zip(groups, values, strict=True):
            out[c] = _bounded(v, min(layer.n_positions, h_in * h_out), k)
            if self.layout.normalize == "mean":
                out[c] /= counts[c]
        return out

    def _on_epoch(self, rec: EpochRecord) -> None:
        with self._lock:
            welch_t, welch_p = self._welch.compute()
            self._welch.reset()
            self._finished = (rec.epoch, self._steps_in_epoch, welch_t)
        self._writer.append_epoch(
            {
                "sigma_epoch": rec.sigma_epoch.astype(np.float32),
                "welch_t": welch_t,
                "welch_p": welch_p,
            },
            epoch=rec.epoch,
        )
        with self._lock:
            self._steps_in_epoch = 0
            self._epoch = rec.epoch + 1
        if self._plain:
            snap = self.snapshot()
            if snap is not None:
                print(epoch_line(snap), file=sys.stderr, flush=True)


def _packed(layer: LayerStep) -> np.ndarray:
    """A sketched layer's packed ``[C, F]`` row (the monitor always sends one)."""
    if layer.packed is None:
        raise RuntimeError(f"layer {layer.index}: sketched step without its packed row")
    return layer.packed


def _host(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """A host tensor's numpy view (rows may arrive as tensors or numpy arrays)."""
    return value if isinstance(value, np.ndarray) else value.numpy()
