"""GPU checks (skipped without CUDA): no host sync inside a monitored step; GPU == CPU numbers."""

from __future__ import annotations

import contextlib
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import streamspec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def encoder(device: str) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    return nn.Sequential(
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(64, 8)
    ).to(device)


# The GPU options: (STREAMSPEC_BATCH_LAYERS, STREAMSPEC_SIDE_STREAM); None: unset (the
# default on CUDA: 4 layers batched, on a side stream).
OPTIONS = {
    "default": (None, None),
    "layerwise": ("1", "0"),
    "batched": ("2", "0"),
    "stream": ("1", "1"),
    "both": ("2", "1"),
}


def set_options(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    names = ("STREAMSPEC_BATCH_LAYERS", "STREAMSPEC_SIDE_STREAM")
    for var, value in zip(names, OPTIONS[name], strict=True):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)


@pytest.mark.parametrize("options", list(OPTIONS))
def test_monitored_steps_do_not_synchronise(options, monkeypatch) -> None:
    """Every op of a monitored step (hooks, gathers, sketches, async copies) runs under
    ``torch.cuda.set_sync_debug_mode("error")``: any host-device sync raises. Also with the
    products of two same-shape layers batched (``STREAMSPEC_BATCH_LAYERS``) and on a side
    stream (``STREAMSPEC_SIDE_STREAM``)."""
    set_options(monkeypatch, options)
    model = encoder("cuda")
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(8, 16, 64, device="cuda")
    # Labels on the CPU, as documented; equal groups, then unequal ones (zero-padded rows)
    even, uneven = torch.arange(8) % 2, torch.tensor([0, 0, 0, 1, 0, 1, 0, 0])
    with streamspec.watch(model, ["a", "b"], rank=4, live=False) as mon:
        for step in range(6):  # the first step warms up (allocations, seeding)
            mon.label(even if step % 2 else uneven)
            if step >= 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        ds = mon.to_xarray()
    assert np.isfinite(ds["sigma"].values[:, :, :, :, 0]).all()


def test_convolutions_on_inputs_of_changing_size_do_not_synchronise() -> None:
    """A new input length (audio, variable-length sequences) costs no host sync either: the
    patches' squared norms weigh the input by window counts computed on the device, never
    copied to it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 10, stride=5), nn.ReLU(), nn.Conv1d(8, 8, 3, 2)).cuda()
    with streamspec.watch(model, ["a", "b"], rank=4, live=False) as mon:
        for step, length in enumerate([1600, 2300, 3100, 1600, 4000]):
            mon.label(torch.arange(4) % 2)
            x = torch.randn(4, 1, length, device="cuda")
            if step >= 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                model(x).pow(2).mean().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        ds = mon.to_xarray()
    assert np.isfinite(ds["sigma"].values[:, :, :, :, 0]).all()


@pytest.mark.parametrize("options", list(OPTIONS))
def test_gpu_spectra_equal_cpu_spectra(options, monkeypatch) -> None:
    """CUDA records what the CPU records (layer by layer there; on CUDA also with two layers'
    products batched, on a side stream, or both)."""
    x = torch.randn(8, 16, 64)
    labels = torch.arange(8) % 2
    out = {}
    for device in ("cpu", "cuda"):
        set_options(monkeypatch, options if device == "cuda" else "layerwise")
        model = encoder(device)
        with streamspec.watch(model, ["a", "b"], rank=4, live=False) as mon:
            for _ in range(3):
                mon.label(labels)
                model(x.to(device)).pow(2).mean().backward()
            out[device] = mon.to_xarray()["sigma"].values
    np.testing.assert_allclose(out["cuda"], out["cpu"], rtol=2e-3, atol=1e-6)


LAG_CYCLES = 50_000_000  # ≈ 25 ms of a ≈ 2 GHz GPU: the side stream runs well behind


def lagging_side_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every side-stream batch start ≈ 25 ms late (a sleep kernel queued on it first), and
    have the training stream fill fresh tensors of the queued rows' shapes (and of their batch
    buffer's) with NaN right after each batch is launched: the caching allocator hands such
    tensors the memory of rows freed meanwhile, so rows read late by the side stream without
    ``record_stream`` would be NaN, and products read by the step's end before the side stream
    is done would be unfinished."""
    from streamspec import monitor as monitor_module

    real_stream = monitor_module.Monitor._products_stream
    real_run = monitor_module.Monitor._run_queue

    @contextlib.contextmanager
    def lagging(self, device, queue):  # type: ignore[no-untyped-def]
        with real_stream(self, device, queue):
            if torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
                torch.cuda._sleep(LAG_CYCLES)
            yield

    def run_queue(self, key):  # type: ignore[no-untyped-def]
        shapes = [(q.rows.shape, q.adjoint.shape) for q in self._queued.get(key, [])]
        if key in self._open:  # the rows' own allocation when gathered into slots (its shapes
            # only: a reference here would keep it from being freed before the fills)
            shapes.append((self._open[key].rows.shape, self._open[key].adjoints.shape))
        real_run(self, key)
        for a, d in shapes:
            torch.full(a, float("nan"), device="cuda")
            torch.full(d, float("nan"), device="cuda")

    monkeypatch.setattr(monitor_module.Monitor, "_products_stream", lagging)
    monkeypatch.setattr(monitor_module.Monitor, "_run_queue", run_queue)


def side_stream_run(monkeypatch: pytest.MonkeyPatch, batch: str, side: str) -> np.ndarray:
    monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", batch)
    monkeypatch.setenv("STREAMSPEC_SIDE_STREAM", side)
    width, depth = 512, 8
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(64, 32, width, generator=gen).cuda() for _ in range(3)]
    labels = torch.arange(64) % 2
    torch.manual_seed(0)
    model = nn.Sequential(
        *[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)]
    )
    model = model.cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with streamspec.watch(model, ["a", "b"], rank=8, live=False) as mon:
        for step in range(6):
            mon.label(labels)
            loss = model(xs[step % 3]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 2:
                mon.end_epoch()
        return mon.to_xarray()["sigma"].values


@pytest.mark.parametrize("batch", ["1", "4"])
def test_side_stream_records_what_the_training_stream_records(batch, monkeypatch) -> None:
    """The products on a side stream give the same numbers as on the training stream, with the
    side stream running ≈ 25 ms behind and the freed rows' memory overwritten meanwhile (what
    ``record_stream`` and the step end's wait are there for): a missing mark or wait shows up as
    other spectra, not as an error (the next test shows that it does)."""
    from streamspec import monitor as monitor_module

    reference = side_stream_run(monkeypatch, batch, "0")
    lagging_side_stream(monkeypatch)
    # The mechanism itself: every batch read from a buffer (rows gathered straight into it) has
    # that buffer's memory marked in use by the side stream (the NaN fills above may not land on
    # it: the hook that ran the batch still holds it while they run).
    marked: set[tuple[int, int]] = set()  # (storage, stream)
    batches: list[int] = []  # storages the batched products read
    real_mark, real_stacked = torch.Tensor.record_stream, monitor_module.stacked_products

    def mark(self, stream):  # type: ignore[no-untyped-def]
        marked.add((self.untyped_storage().data_ptr(), stream.cuda_stream))
        return real_mark(self, stream)

    def stacked(trackers, a, d, counts):  # type: ignore[no-untyped-def]
        batches.append(a.untyped_storage().data_ptr())
        assert torch.cuda.current_stream() != torch.cuda.default_stream()  # (on the side)
        side = torch.cuda.current_stream().cuda_stream
        assert (a.untyped_storage().data_ptr(), side) in marked
        assert (d.untyped_storage().data_ptr(), side) in marked
        return real_stacked(trackers, a, d, counts)

    monkeypatch.setattr(torch.Tensor, "record_stream", mark)
    monkeypatch.setattr(monitor_module, "stacked_products", stacked)
    lagged = side_stream_run(monkeypatch, batch, "1")
    assert bool(batches) == (batch == "4"), batches
    assert np.isfinite(reference).all()
    np.testing.assert_allclose(lagged, reference, rtol=1e-5, atol=0)


class TwoStreams(nn.Module):
    """Four same-shape layers, the last two forwarded on a second CUDA stream: their backward,
    and the monitor's hooks for them, run on that stream too."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(4)])
        self.other = torch.cuda.Stream()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = torch.cuda.current_stream()
        h = self.layers[1](self.layers[0](x).tanh()).tanh()
        self.other.wait_stream(main)
        with torch.cuda.stream(self.other):
            h = self.layers[3](self.layers[2](h).tanh()).tanh()
        main.wait_stream(self.other)
        h.record_stream(main)
        return h


@pytest.mark.parametrize("side", ["0", "1"], ids=["training-stream", "side-stream"])
def test_a_bank_hooked_on_two_streams_records_what_one_stream_records(side, monkeypatch) -> None:
    """A batch buffer is written on the stream it was allocated on only: a bank whose layers'
    hooks run on two streams closes its buffer at the switch (a batch of two a step through the
    buffer; the other two layers gathered on their own, stacked by a copy), and records what
    layer-by-layer products on one stream record."""
    from streamspec import monitor as monitor_module

    batches: list[int] = []
    real = monitor_module.stacked_products

    def counted(trackers, a, d, counts):  # type: ignore[no-untyped-def]
        batches.append(len(trackers))
        return real(trackers, a, d, counts)

    monkeypatch.setattr(monitor_module, "stacked_products", counted)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(32, 16, 64, generator=gen).cuda() for _ in range(3)]
    out = {}
    for batch in ("1", "4"):
        monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", batch)
        monkeypatch.setenv("STREAMSPEC_SIDE_STREAM", side if batch == "4" else "0")
        batches.clear()
        torch.manual_seed(0)
        model = TwoStreams(64).cuda()
        with streamspec.watch(model, ["a", "b"], rank=4, live=False) as mon:
            for x in xs:
                mon.label(torch.arange(32) % 2)
                model(x).pow(2).mean().backward()
            out[batch] = mon.to_xarray()["sigma"].values
        if batch == "4":
            assert batches == [2] * 2, batches  # (the first step seeds, unbatched)
    assert np.isfinite(out["1"][..., 0]).all()
    top = np.nanmax(np.abs(out["1"]))
    np.testing.assert_allclose(out["4"], out["1"], rtol=2e-4, atol=1e-6 * top)


@pytest.mark.parametrize("broken", ["record_stream", "join"])
def test_the_side_stream_test_fails_without_its_safeguards(broken, monkeypatch) -> None:
    """The test above can fail: without ``record_stream`` (the lagging side stream reads rows
    whose memory the training stream refilled with NaN) or without the step end's wait (it
    reads products the side stream has not written yet), the records differ."""
    from streamspec import monitor as monitor_module

    reference = side_stream_run(monkeypatch, "4", "0")
    lagging_side_stream(monkeypatch)
    if broken == "record_stream":
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    else:
        monkeypatch.setattr(monitor_module.Monitor, "_join_side_streams", lambda self, d=None: None)
    with warnings.catch_warnings():  # (NaN rows: "NaN/Inf in the activations", as expected)
        warnings.simplefilter("ignore", streamspec.StreamspecWarning)
        broken_run = side_stream_run(monkeypatch, "4", "1")
    torch.cuda.synchronize()
    assert not np.allclose(broken_run, reference, rtol=1e-5, atol=0, equal_nan=True)


class Families(nn.Module):
    """One of each watched family: Conv1d/2d, Embedding, LSTM, GRU, MultiheadAttention, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv1 = nn.Conv1d(6, 8, 3, stride=2)
        self.embed = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.gru = nn.GRU(12, 8, batch_first=True, bidirectional=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.conv2(image)).mean(dim=2)  # [B, 6, W]
        z = self.conv1(z).transpose(1, 2)  # [B, T, 8]
        z = z + self.embed(ids)[:, : z.shape[1]]
        z, _ = self.lstm(z)
        z, _ = self.gru(z)
        z, _ = self.attn(z, z, z, need_weights=False)
        return self.head(z.mean(dim=1))


@pytest.mark.parametrize("exact_rows", [None, 0], ids=["default", "sketched"])
def test_every_family_runs_without_sync_and_matches_cpu(exact_rows: int | None) -> None:
    """Each layer family on CUDA: no host sync inside steps after the first, and the same
    spectra as on the CPU (same seeds: the test matrices come from the monitor's CPU generator)."""
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(6, 1, 8, 17, generator=gen)
    ids = torch.randint(0, 20, (6, 8), generator=gen)
    labels = torch.arange(6) % 2
    out = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = Families().to(device)
        x, i = image.to(device), ids.to(device)  # a pageable host → device copy synchronises
        with streamspec.watch(model, ["a", "b"], rank=4, live=False, exact_rows=exact_rows) as mon:
            for step in range(3):
                mon.label(labels)
                if device == "cuda" and step >= 1:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    model(x, i).pow(2).mean().backward()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            ds = mon.to_xarray()
        out[device] = ds["sigma"].values
        assert len(ds["layer"]) >= 10  # every family is watched
    both = np.isfinite(out["cpu"]) & np.isfinite(out["cuda"])
    assert (np.isfinite(out["cpu"]) == np.isfinite(out["cuda"])).all()
    # Self-attention fills the fused in_proj entry; its :q/:k/:v entries stay NaN (documented).
    assert both[:, :, :, :, 0].all(axis=(0, 2, 3)).sum() >= 11
    # Values far below σ₁ are ill-determined in float32 (attn.out_proj's σ₄ ≈ 5e-4·σ₁ differs by
    # 0.02% of σ₁ between the CPUs of two machines, and between CPU and CUDA): compare each
    # value to 0.5% of itself plus 0.1% of its spectrum's σ₁.
    top = np.broadcast_to(np.nan_to_num(out["cpu"][..., :1]), out["cpu"].shape)
    gap = np.abs(out["cuda"] - out["cpu"])[both]
    assert (gap <= 5e-3 * np.abs(out["cpu"][both]) + 1e-3 * top[both]).all(), gap.max()


def test_products_are_ieee_float32_under_tf32_settings() -> None:
    """With TF32 allowed process-wide (Lightning/HF users), streamspec's own matmuls and
    convolutions still run in IEEE float32 (tests/core/test_precision.py checks the monitor
    applies the same context around every product)."""
    from streamspec.sketch.linalg import ieee_float32

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(512, 512, generator=gen, dtype=torch.float64)
    b = torch.randn(512, 512, generator=gen, dtype=torch.float64)
    image = torch.randn(4, 16, 32, 32, generator=gen, dtype=torch.float64)
    kernel = torch.randn(16, 16, 3, 3, generator=gen, dtype=torch.float64)
    mm_ref, conv_ref = a @ b, torch.nn.functional.conv2d(image, kernel)

    def errors() -> tuple[float, float]:
        mm = a.float().cuda() @ b.float().cuda()
        conv = torch.nn.functional.conv2d(image.float().cuda(), kernel.float().cuda())
        return (
            float((mm.double().cpu() - mm_ref).abs().max() / mm_ref.abs().max()),
            float((conv.double().cpu() - conv_ref).abs().max() / conv_ref.abs().max()),
        )

    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        tf32 = errors()
        with ieee_float32():
            ieee = errors()
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved)
    assert max(tf32) > 1e-4, tf32  # TF32 really is on for the model (Ampere and later)
    assert max(ieee) < 1e-5, ieee


def test_fp16_amp_with_grad_scaler_records_the_loss_itself_without_sync() -> None:
    """The standard fp16 recipe (autocast + GradScaler): backward passes run without a host
    sync, adjoints are recorded for the loss itself with ``grad_scaler=`` (≈ an unscaled fp16
    run's; without it they carry the 2¹⁶ scale)."""
    x = torch.randn(8, 16, 64, device="cuda")
    labels = torch.arange(8) % 2
    out = {}
    for name in ("unscaled", "told", "untold"):
        model = encoder("cuda")
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16, enabled=name != "unscaled")
        kwargs = {"grad_scaler": scaler} if name == "told" else {}
        with streamspec.watch(model, ["a", "b"], rank=4, live=False, **kwargs) as mon:
            for step in range(3):
                mon.label(labels)
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = model(x).float().pow(2).mean()
                if step >= 1:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    scaler.scale(loss).backward()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                model.zero_grad()  # no optimizer step: the three runs see the same weights
            out[name] = mon.to_xarray()["sigma"].values[:, :, 1, :, 0]  # adjoint σ₁
    np.testing.assert_allclose(out["told"], out["unscaled"], rtol=2e-2)
    np.testing.assert_allclose(out["untold"] / out["unscaled"], 2.0**16, rtol=2e-2)


def test_split_k_products_on_cuda_equal_the_cpu_ones() -> None:
    """A layer with enough rows takes split-K on CUDA (long reductions cut into chunks): its
    step products and the step's end equal the CPU's unsplit ones, without a host sync."""
    from streamspec.sketch import linalg
    from streamspec.sketch.tracker import LayerTracker

    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, 1024, 96, generator=gen)
    d = torch.randn(2, 1024, 128, generator=gen)
    assert linalg.split_count(a.cuda(), d.cuda()) == 4
    out = {}
    for device in ("cpu", "cuda"):
        tracker = LayerTracker(96, 128, 2, 8, 10, torch.Generator().manual_seed(0))
        rows = a.to(device), d.to(device)  # (a copy from pageable host memory synchronises)
        tracker.products(*rows, exact=False)  # set up and seed
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            products = tracker.products(*rows, exact=False)
            packed = tracker.bank.finish({tracker.slot: products})
        finally:
            torch.cuda.set_sync_debug_mode(0)
        out[device] = [t.double().cpu() for t in (products.s_in, products.s_out)]
        out[device].append(packed.cpu())
    for cpu, cuda in zip(out["cpu"], out["cuda"], strict=True):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-5 * float(cpu.abs().max()))


def test_a_failed_backward_leaves_the_training_stream_waiting_for_its_side_stream(
    monkeypatch,
) -> None:
    """A backward that raises after some layers' products were queued on the side stream is
    discarded at the next forward (or end_epoch()): the training stream then waits for those
    products, which read the blocks that an end_epoch() rewrites. It used to forget them: the
    training stream ran on while the side stream still had them to do."""
    monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", "1")  # each layer's products in its hook
    monkeypatch.setenv("STREAMSPEC_SIDE_STREAM", "1")
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Linear(64, 4))
    model = model.cuda()
    x = torch.randn(32, 64, device="cuda")
    labels = torch.arange(32) % 2
    device = torch.device("cuda", torch.cuda.current_device())
    with streamspec.watch(model, ["a", "b"], rank=4, live=False) as mon:
        mon.label(labels)
        model(x).pow(2).mean().backward()  # a step: the side stream exists

        def fail(grad: torch.Tensor) -> None:
            raise RuntimeError("injected")

        mon.label(labels)
        hidden = model[1](model[0](x))
        hidden.register_hook(fail)  # after the two last layers' products were queued
        with pytest.raises(RuntimeError, match="injected"):
            model[3](model[2](hidden)).pow(2).mean().backward()
        side = mon._side_streams[device]
        with torch.cuda.stream(side):  # the failed products, still running
            torch.cuda._sleep(20 * LAG_CYCLES)  # ≈ 0.5 s
        mon.label(labels)  # the failed step is discarded here (or at the next forward)
        out = model(x)
        start = time.perf_counter()
        torch.cuda.current_stream(device).synchronize()
        waited = time.perf_counter() - start
        assert waited > 0.1, f"the training stream did not wait for the side stream ({waited} s)"
        out.pow(2).mean().backward()  # recording goes on
        ds = mon.to_xarray()
    assert ds.sizes["step"] == 2 and np.isfinite(ds["sigma"].values[:, :, :, :, 0]).all()
