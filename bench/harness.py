"""Side-by-side timing of streamspec against plain training and the paper's approach.

Protocol (bench/README.md): whole training runs of the same model, one per mode, alternated
``repetitions`` times in one process; ``watch()`` and ``close()`` are inside the timed region, so
deferred and background work counts. Per mode: median per-step time over all repetitions
(warm-up steps dropped), ratio to plain, whole-run time, peak memory. A separate, untimed pass
compares the recorded spectra with float64 SVDs of the exact matrices and checks ``sigma_err``.
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import os
import pstats
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn

import streamspec
import streamspec.monitor
from streamspec.testing.reference import ExactRecorder


@dataclass(frozen=True)
class Config:
    """A benchmark model and its data."""

    name: str
    d_model: int
    layers: int
    heads: int
    ffn: int
    batch: int
    seq: int
    steps: int
    warmup: int
    repetitions: int
    rank: int = 16
    groups: int = 2
    paper_steps: int | None = None  # fewer steps for the paper's full SVDs (seconds per step)
    # "transformer" (d_model, layers, heads, ffn; inputs [batch, seq, d_model], MSE to the
    # input), "cnn3d" (three Conv3d layers of ffn // 4, ffn // 2, ffn channels on one-channel
    # volumes of seq³, two classes) or "lstm" (nn.LSTM(d_model, ffn), seq steps, two classes):
    # the paper's model families.
    family: str = "transformer"
    threads: int = 2  # torch CPU threads (CPU runs; --threads overrides)


CONFIGS = {
    "smoke": Config("smoke", 32, 1, 2, 64, 4, 8, steps=3, warmup=1, repetitions=1, rank=4),
    # The CPU target: 2 × TransformerEncoderLayer(256, 4, 1024) + Linear(256, 256).
    "cpu": Config("cpu", 256, 2, 4, 1024, 16, 64, steps=12, warmup=2, repetitions=3),
    # BERT-base size (anchors/): d = 768, 12 layers, B = 32, T = 128.
    # The paper's mode takes ≈ 5.5 s (mid) to ≈ 20 s (base) per step on an H200 (anchors/).
    "gpu-base": Config(
        "gpu-base", 768, 12, 12, 3072, 32, 128, steps=20, warmup=3, repetitions=3, paper_steps=3
    ),
    "gpu-mid": Config(
        "gpu-mid", 512, 6, 8, 2048, 32, 128, steps=20, warmup=3, repetitions=3, paper_steps=4
    ),
    # The paper's neuroimaging families at CPU size: a 3-D CNN on 8 volumes of 32³ (Conv3d 1 →
    # 16 → 32 → 64), an LSTM over 200 time steps of 32 features (hidden 128, batch 32).
    "cnn3d": Config("cnn3d", 1, 3, 0, 64, 8, 32, steps=8, warmup=2, repetitions=3, family="cnn3d"),
    # One thread: torch 2.13's CPU LSTM kernel takes 8.3 s per step with two threads on this
    # project's 2-core machines, against 63 ms with one (plain training, no monitor).
    "lstm": Config(
        "lstm", 32, 1, 0, 128, 32, 200, steps=8, warmup=2, repetitions=3, family="lstm", threads=1
    ),
}


class _Recurrent(nn.Module):
    """An LSTM over the sequence and a linear head on its last output."""

    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if cfg.family == "cnn3d":
        c = cfg.ffn
        return nn.Sequential(
            nn.Conv3d(cfg.d_model, c // 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d(2),
            nn.Conv3d(c // 4, c // 2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d(2),
            nn.Conv3d(c // 2, c, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(c, cfg.groups),
        ).to(device)
    if cfg.family == "lstm":
        return _Recurrent(cfg.d_model, cfg.ffn, cfg.groups).to(device)
    layer = nn.TransformerEncoderLayer(
        cfg.d_model, cfg.heads, cfg.ffn, dropout=0.0, batch_first=True
    )
    encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
    return nn.Sequential(encoder, nn.Linear(cfg.d_model, cfg.d_model)).to(device)


def make_input(cfg: Config, generator: torch.Generator) -> torch.Tensor:
    """One batch of the config's inputs (on the CPU)."""
    if cfg.family == "cnn3d":
        return torch.randn(cfg.batch, cfg.d_model, cfg.seq, cfg.seq, cfg.seq, generator=generator)
    return torch.randn(cfg.batch, cfg.seq, cfg.d_model, generator=generator)


def loss_of(cfg: Config, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss: MSE to the input (transformer), cross-entropy on the group labels."""
    if cfg.family == "transformer":
        return nn.functional.mse_loss(model(x), x)
    return nn.functional.cross_entropy(model(x), labels.to(x.device))


class PaperBaseline:
    """The paper's approach: full SVDs of ``A_c``, ``Δ_c`` and ``A_cᵀΔ_c`` of every hooked
    ``nn.Linear``, every group, every step (``"full"``), or ``torch.svd_lowrank`` of the group
    gradient only (``"lowrank"``). Attention projections inside ``nn.MultiheadAttention`` are
    applied functionally, so (as in shared/anchors) their hooks never fire."""

    def __init__(self, model: nn.Module, mode: str, rank: int) -> None:
        self.mode, self.rank = mode, rank
        self.labels: torch.Tensor | None = None
        self.handles = [
            m.register_forward_hook(self._forward)
            for m in model.modules()
            if isinstance(m, nn.Linear)
        ]

    def label(self, labels: torch.Tensor) -> None:
        self.labels = labels

    def _forward(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> None:
        if not torch.is_grad_enabled():
            return
        a = inputs[0].detach()
        labels = self.labels

        def hook(grad: torch.Tensor) -> None:
            assert labels is not None
            for c in range(int(labels.max()) + 1):
                mask = (labels == c).to(a.device)
                a_c = a[mask].reshape(-1, a.shape[-1])
                d_c = grad[mask].reshape(-1, grad.shape[-1])
                if self.mode == "full":
                    torch.linalg.svdvals(a_c)
                    torch.linalg.svdvals(d_c)
                    torch.linalg.svdvals(a_c.T @ d_c)
                else:
                    torch.svd_lowrank(a_c.T @ d_c, q=self.rank + 8, niter=2)

        out.register_hook(hook)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class ModeResult:
    mode: str
    step_ms: list[float] = field(default_factory=list)
    run_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "median_step_ms": float(np.median(self.step_ms)),
            "median_run_s": float(np.median(self.run_s)),
            "peak_mib": float(np.max(self.peak_bytes)) / 2**20,
        }


# ``watch`` under other settings of its GPU options (streamspec.monitor.batch_layers and
# side_stream; on CUDA ``watch`` batches 4 layers on a side stream by default).
_BATCH, _SIDE = "STREAMSPEC_BATCH_LAYERS", "STREAMSPEC_SIDE_STREAM"
VARIANTS: dict[str, dict[str, str]] = {
    "layerwise": {_BATCH: "1", _SIDE: "0"},
    "batched": {_BATCH: "4", _SIDE: "0"},
    "batched12": {_BATCH: "12", _SIDE: "0"},
    "stream": {_BATCH: "1", _SIDE: "1"},
    "batched12stream": {_BATCH: "12", _SIDE: "1"},
    "stacked": {},  # the defaults, with each batch's rows stacked by a copy (see run_mode)
}
MODES = ("plain", "watch", "watch10", "paper", "lowrank", "hostless", *VARIANTS)
"""``hostless`` is a diagnostic, not a usable mode: ``watch`` with the host thread's spectra,
statistics and writes skipped (it only waits for the copies), so that ``watch − hostless`` is
what the host thread costs the training thread (Python's GIL, CPU cores). The
:data:`VARIANTS` are ``watch`` with its GPU options set otherwise (on CPUs they change
nothing but the route through the monitor): ``layerwise`` (each layer's products in its own
hook, on the training stream: the default before 2026-11-27), ``batched`` (four same-shape
layers in one batched call, on the training stream), ``batched12`` (twelve, with the bank's
cap on held rows raised to 1 GiB, and all banks' to 4 GiB, so that a BERT-base bank batches all
its layers), ``stream`` (one layer at a time on a side CUDA stream), ``batched12stream``
(twelve on a side stream) and ``stacked`` (the defaults, but each layer's rows gathered on their
own and a batch's stacked by a copy: the route before 2026-11-27, when rows began to be
gathered straight into their batch's buffer)."""


def _wait_only(rec: Any) -> None:
    if rec.ready is not None:
        rec.ready()


def run_mode(cfg: Config, mode: str, device: torch.device, result: ModeResult) -> None:
    """One whole training run; appends its per-step times, run time and peak memory."""
    model = build_model(cfg, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    xs = [make_input(cfg, gen).to(device) for _ in range(4)]
    labels = torch.arange(cfg.batch) % cfg.groups
    groups = [f"g{i}" for i in range(cfg.groups)]
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_bytes()
    peak = 0
    sync()
    start = time.perf_counter()
    monitor: Any = None
    if mode in ("watch", "watch10", "hostless", *VARIANTS):
        cap = 1 << 30 if mode.startswith("batched12") else streamspec.monitor.BATCH_BYTES
        with (
            mock.patch.dict(os.environ, VARIANTS.get(mode, {})),
            mock.patch.object(streamspec.monitor, "BATCH_BYTES", cap),
            mock.patch.object(streamspec.monitor, "QUEUED_BYTES", max(4 * cap, 4 << 30)),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            monitor = streamspec.watch(
                model, groups, rank=cfg.rank, live=False, every=10 if mode == "watch10" else 1
            )
        if mode == "hostless":
            monitor._pipeline._on_step = _wait_only
        if mode == "stacked":
            monitor._slot = lambda *args: None
    elif mode in ("paper", "lowrank"):
        monitor = PaperBaseline(model, "full" if mode == "paper" else "lowrank", cfg.rank)
    steps, warmup = cfg.steps, cfg.warmup
    if mode == "paper" and cfg.paper_steps is not None:
        steps, warmup = cfg.paper_steps, 1
    for i in range(steps):
        t0 = time.perf_counter()
        if monitor is not None:
            monitor.label(labels)
        x = xs[i % len(xs)]
        loss = loss_of(cfg, model, x, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= warmup:
            result.step_ms.append((time.perf_counter() - t0) * 1e3)
        peak = max(peak, _rss_bytes() - base_rss)
    if monitor is not None:
        monitor.close()
    sync()
    result.run_s.append(time.perf_counter() - start)
    result.peak_bytes.append(torch.cuda.max_memory_allocated() if cuda else peak)


def profile(cfg: Config, device: torch.device, steps: int = 3, rows: int = 40) -> str:
    """Profiler tables of ``steps`` monitored steps after one warm-up step: where the monitor's
    time goes (device kernels, host-side hooks), for bench/README.md's breakdown."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = build_model(cfg, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = make_input(cfg, torch.Generator().manual_seed(0)).to(device)
    labels = torch.arange(cfg.batch) % cfg.groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = streamspec.watch(
            model, [f"g{i}" for i in range(cfg.groups)], rank=cfg.rank, live=False
        )

    def step() -> None:
        mon.label(labels)
        loss = loss_of(cfg, model, x, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    # The host thread's load: its busy time per step and how long training waited on its queue.
    from streamspec.pipeline import HostPipeline

    load = {"host_s": 0.0, "submit_wait_s": 0.0, "steps": 0}
    on_step, submit = HostPipeline._on_step, HostPipeline.submit

    def timed_on_step(self: Any, rec: Any) -> None:
        t0 = time.perf_counter()
        on_step(self, rec)
        load["host_s"] += time.perf_counter() - t0
        load["steps"] += 1

    def timed_submit(self: Any, item: Any) -> None:
        t0 = time.perf_counter()
        submit(self, item)
        load["submit_wait_s"] += time.perf_counter() - t0

    HostPipeline._on_step, HostPipeline.submit = timed_on_step, timed_submit  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        mon.flush()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 10
    finally:
        HostPipeline._on_step, HostPipeline.submit = on_step, submit  # type: ignore[method-assign]
    n = max(int(load["steps"]), 1)
    load_line = (
        f"10 steps: {wall * 1e3:.1f} ms/step; host thread busy {load['host_s'] / n * 1e3:.1f} "
        f"ms/step; training waited on the host queue {load['submit_wait_s'] / 10 * 1e3:.1f} ms/step"
    )
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    # The training thread's Python, by each function's own time (torch ops appear as builtins,
    # with their dispatch and launch time): where a host-bound step's time goes.
    python = cProfile.Profile()
    python.enable()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    python.disable()
    mon.close()
    table = prof.key_averages()
    parts = [f"{steps} monitored steps, config {cfg.name}, {device}", load_line]
    if device.type == "cuda":
        parts.append(table.table(sort_by="self_cuda_time_total", row_limit=rows))
    parts.append(table.table(sort_by="self_cpu_time_total", row_limit=rows))
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(rows)
    parts.append(
        f"The training thread's Python (cProfile, further steps: {steps}):\n{text.getvalue()}"
    )
    return "\n\n".join(parts)


def save(out: str | Path, stem: str, data: Any, table: str) -> Path:
    """Write ``<out>/<stem>.json`` (``data``) and ``<out>/<stem>.md`` (``table``); returns
    ``<out>/<stem>``."""
    path = Path(out) / stem
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(data, indent=2))
    path.with_suffix(".md").write_text(table + "\n")
    return path


def measure(cfg: Config, device: torch.device, modes: tuple[str, ...]) -> dict[str, ModeResult]:
    results = {m: ModeResult(m) for m in modes}
    for rep in range(cfg.repetitions):
        for mode in modes:  # alternated: drift hits every mode alike
            if mode == "paper" and cfg.paper_steps is not None and rep:
                continue  # seconds per step: one short run is enough to see the ratio
            run_mode(cfg, mode, device, results[mode])
    return results


def accuracy(cfg: Config, device: torch.device, steps: int = 3) -> dict[str, Any]:
    """Recorded σ vs float64 SVDs of the exact matrices, per layer class, and sigma_err coverage
    (untimed; nn.Linear layers, which the reference recorder sees; other families: see
    :func:`_exact_route_accuracy`)."""
    if cfg.family != "transformer":
        return _exact_route_accuracy(cfg, device, steps)
    model = build_model(cfg, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(cfg.batch) % cfg.groups
    rec = ExactRecorder(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = streamspec.watch(
            model, [f"g{i}" for i in range(cfg.groups)], rank=cfg.rank, live=False
        )
    for _ in range(steps):
        x = torch.randn(cfg.batch, cfg.seq, cfg.d_model, generator=gen).to(device)
        mon.label(labels)
        rec.label(labels)
        loss = nn.functional.mse_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ds = mon.to_xarray()
    mon.close()
    rec.remove()
    sigma, err = ds["sigma"].values, ds["sigma_err"].values
    layers = [str(n) for n in ds["layer"].values]
    cells = []
    for li, name in enumerate(layers):
        if name not in rec.names:
            continue
        for s in range(steps):
            for c in range(cfg.groups):
                exact = rec.spectra([s], name, c, cfg.rank)
                cells.append((_layer_class(name), exact, sigma[s, li, :, c], err[s, li, :, c]))
    return _summary(cells)


def _exact_route_accuracy(cfg: Config, device: torch.device, steps: int) -> dict[str, Any]:
    """For the families the reference recorder does not hook (convolutions, recurrent layers):
    the same seeded training twice, recorded on the sketched route and on the exact route (each
    group's rows factorised in float64 on the host); the monitor changes nothing in training,
    so the exact run's σ are the true values of the sketched run's matrices. Layer class: the
    layer's name."""
    recorded = []
    labels = torch.arange(cfg.batch) % cfg.groups
    for exact_rows in (0, 10**9):
        model = build_model(cfg, device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mon = streamspec.watch(
                model,
                [f"g{i}" for i in range(cfg.groups)],
                rank=cfg.rank,
                live=False,
                exact_rows=exact_rows,
            )
        for _ in range(steps):
            x = make_input(cfg, gen).to(device)
            mon.label(labels)
            opt.zero_grad()
            loss_of(cfg, model, x, labels).backward()
            opt.step()
        recorded.append(mon.to_xarray())
        mon.close()
    sketched, exact = recorded
    sigma, err, true = (
        sketched["sigma"].values,
        sketched["sigma_err"].values,
        exact["sigma"].values.astype(float),
    )
    cells = [
        (str(name), true[s, li, :, c], sigma[s, li, :, c], err[s, li, :, c])
        for li, name in enumerate(sketched["layer"].values)
        for s in range(sigma.shape[0])
        for c in range(cfg.groups)
    ]
    return _summary(cells)


def _summary(cells: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Per layer class and kind, the median and p99 relative error of the recorded σ (values
    above 1e-4·σ₁) and the share of cells whose error ``sigma_err`` covers; ``cells`` holds
    (class, exact ``[3, k]``, recorded ``[3, k]``, sigma_err ``[3, k]``) per layer, step, group."""
    per_class: dict[str, dict[str, list[np.ndarray]]] = {}
    covered: dict[str, list[np.ndarray]] = {}
    for cls, exact, sigma, err in cells:
        for ki, kind in enumerate(("activation", "adjoint", "gradient")):
            e, g, bound = exact[ki], sigma[ki].astype(float), err[ki]
            keep = np.isfinite(e) & (e > 1e-4 * np.nan_to_num(e[0]))
            rel = np.abs(g[keep] - e[keep]) / e[keep]
            per_class.setdefault(cls, {}).setdefault(kind, []).append(rel)
            ok = np.abs(g[keep] - e[keep]) <= bound[keep] * (1 + 1e-3) + 1e-6 * e[0]
            covered.setdefault(kind, []).append(ok)
    out: dict[str, Any] = {"per_class": {}, "sigma_err_coverage": {}}
    for cls, kinds in per_class.items():
        out["per_class"][cls] = {
            kind: {
                "median": float(np.median(np.concatenate(v))),
                "p99": float(np.percentile(np.concatenate(v), 99)),
            }
            for kind, v in kinds.items()
        }
    for kind, v in covered.items():
        out["sigma_err_coverage"][kind] = float(np.mean(np.concatenate(v)))
    return out


def _layer_class(name: str) -> str:
    for key in ("out_proj", "linear1", "linear2"):
        if key in name:
            return key
    return "head"


def report(
    cfg: Config, device: torch.device, results: dict[str, ModeResult], acc: dict[str, Any] | None
) -> tuple[dict[str, Any], str]:
    """JSON-able results and a markdown table."""
    plain = np.median(results["plain"].step_ms) if "plain" in results else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = [
        f"Config `{cfg.name}` on {name} (torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; {cfg.steps} steps × {cfg.repetitions} repetitions, medians):",
        "",
        "| mode | step (ms) | × plain | whole run (s) | peak memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    data: dict[str, Any] = {
        "config": asdict(cfg),
        "device": name,
        "torch": torch.__version__,
        "modes": {},
    }
    for mode, res in results.items():
        s = res.summary()
        s["ratio"] = s["median_step_ms"] / plain
        data["modes"][mode] = s
        rows.append(
            f"| {mode} | {s['median_step_ms']:.1f} | {s['ratio']:.2f} | "
            f"{s['median_run_s']:.2f} | {s['peak_mib']:.0f} |"
        )
    if "plain" in results and "watch" in results and "paper" in results:
        added_watch = np.median(results["watch"].step_ms) - plain
        added_paper = np.median(results["paper"].step_ms) - plain
        data["paper_added_over_watch_added"] = float(added_paper / max(added_watch, 1e-9))
        rows.append("")
        rows.append(
            f"Time the paper's full SVDs add per step ÷ time streamspec adds: "
            f"{data['paper_added_over_watch_added']:.1f}"
        )
    if acc is not None:
        data["accuracy"] = acc
        rows += ["", "| layer class | kind | median rel. error | p99 |", "|---|---|---|---|"]
        for cls, kinds in acc["per_class"].items():
            for kind, v in kinds.items():
                rows.append(f"| {cls} | {kind} | {v['median']:.1e} | {v['p99']:.1e} |")
        cov = ", ".join(f"{k} {v:.1%}" for k, v in acc["sigma_err_coverage"].items())
        rows += ["", f"sigma_err covers the true error in: {cov} of cells"]
    return data, "\n".join(rows)
