"""``python -m bench.products``: the per-layer row products alone, as the monitor runs them and in
variants, to decide how to run them on a GPU (bench/README.md, "Where the time goes").

On an H200 the products of a watched BERT-base step took ≈ 15 ms of device time (≈ 11 ms with
split-K) for ≈ 7% of the model's flops: skinny fp32 GEMMs of ``b_in + b_out`` (80) columns, run
for two groups at a time, fill few of the device's multiprocessors. This times, per layer shape
of a bench config:

* ``monitor``: :meth:`LayerTracker.products` itself (what a layer's backward hook runs; split-K
  on CUDA, see :func:`streamspec.sketch.linalg.tbmm`);
* ``split-k S``: the transposed products ``Aᵀ[P | R]``, ``Δᵀ[P | R]`` with the rows cut into
  ``S`` chunks (``S`` times the batch of the long-reduction GEMMs, then a sum);
* ``layers L``: the products of ``L`` same-shape layers in one batched call each, split-K on
  CUDA as the monitor runs them (what holding rows until a bank's layers are all there would
  allow; stacking their rows not counted), time per layer;
* ``only forward``, ``only transposed``, ``only norms``: the monitor's three parts alone,
  unsplit (``[A·B_in | Δ·B_out]``; ``Aᵀ[P | R]`` and ``Δᵀ[P | R]``; the rows' squared norms);
* ``forward split-k 4``: ``[A·B_in | Δ·B_out]`` with the features cut in four (the chunks
  copied);
* ``transposed out``: ``[P | R]ᵀA`` and ``[P | R]ᵀΔ`` (the same products, output transposed);
* ``one transposed``: ``[A | Δ]ᵀ[P | R]`` as one batched product (the concatenation timed too);
* ``monitor tf32``: :meth:`LayerTracker.products` outside streamspec's IEEE guard with TF32
  allowed (for reference: the monitor runs them in IEEE float32).

    python -m bench.products --config gpu-base --device cuda
    python -m bench.products --config smoke --device cpu      # seconds; checks the script

Times are device times on a GPU (see :func:`_timer`), wall times on a CPU. Writes
``products-<config>-<device>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.harness import CONFIGS, Config, save
from streamspec.sketch.linalg import ieee_float32, tbmm
from streamspec.sketch.operators import DenseRows, sq_norms_pair
from streamspec.sketch.tracker import LayerTracker, SketchWidths, row_products

SLEEP_CYCLES = 200_000_000  # ≈ 0.1 s of a ≈ 2 GHz GPU: time for the host to queue the calls


def layer_shapes(cfg: Config) -> dict[str, tuple[int, int, int]]:
    """``name → (h_in, h_out, count)`` of the config's watched weight matrices."""
    d, ffn, n = cfg.d_model, cfg.ffn, cfg.layers
    return {
        "in_proj": (d, 3 * d, n),
        "out_proj": (d, d, n + 1),  # with the head, same shape
        "linear1": (d, ffn, n),
        "linear2": (ffn, d, n),
    }


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Milliseconds of a callable: on a GPU its device time, on a CPU its wall time (medians).

    On a GPU the calls are queued behind a ``torch.cuda._sleep`` kernel, so the host has
    launched them all before the device reaches the first: the time between the events is the
    device's alone, as in training, where the host runs ahead of the device (timing one call
    at a time would time the host's Python and launches instead)."""

    def run(fn: Callable[[], object]) -> float:
        for _ in range(3):
            fn()
        times = []
        if device.type == "cuda":
            for _ in range(3):
                torch.cuda.synchronize(device)
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                torch.cuda._sleep(SLEEP_CYCLES)
                start.record()
                for _ in range(repeats):
                    fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) / repeats)
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(times))

    return run


def _transposed(
    a: torch.Tensor, d: torch.Tensor, pr: torch.Tensor, chunks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Aᵀ[P | R]`` and ``Δᵀ[P | R]`` with the ``m`` rows cut into ``chunks`` blocks (``m`` a
    multiple of ``chunks``: the monitor would pad its gathered rows with zero rows)."""
    return tbmm(a, pr, chunks), tbmm(d, pr, chunks)


def _products(
    a: torch.Tensor, d: torch.Tensor, b_in: torch.Tensor, b_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :meth:`LayerTracker.products` computes (four products, the squared norms), on
    stacked (batched) inputs, split-K as the monitor runs them."""
    return row_products(DenseRows(a), d, b_in, b_out)


def _transposed_out(
    a: torch.Tensor, d: torch.Tensor, pr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[P | R]ᵀA`` and ``[P | R]ᵀΔ``: the transposed products with their outputs transposed
    (another cuBLAS layout and tiling; the monitor would read them transposed)."""
    return torch.bmm(pr.mT, a).mT, torch.bmm(pr.mT, d).mT


def _forward_split(
    a: torch.Tensor, d: torch.Tensor, b_in: torch.Tensor, b_out: torch.Tensor, chunks: int
) -> torch.Tensor:
    """``[A·B_in | Δ·B_out]`` with the feature dimension (the reduction) cut into ``chunks``
    (a multiple of both widths; the chunked rows are copied)."""

    def one(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        c, m, h = x.shape
        xs = x.unflatten(-1, (chunks, h // chunks)).transpose(1, 2).reshape(c * chunks, m, -1)
        bs = b.reshape(c * chunks, h // chunks, -1)
        return torch.bmm(xs, bs).view(c, chunks, m, -1).sum(1)

    return torch.cat([one(a, b_in), one(d, b_out)], dim=2)


def _one_transposed(
    a: torch.Tensor, d: torch.Tensor, pr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Aᵀ[P | R]`` and ``Δᵀ[P | R]`` from one batched product of ``[A | Δ]``."""
    both = torch.bmm(torch.cat([a, d], dim=2).mT, pr)
    return both[:, : a.shape[2]], both[:, a.shape[2] :]


def _gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest difference relative to the largest entry."""
    return float((x.double() - y.double()).abs().max() / y.double().abs().max())


def measure(cfg: Config, device: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    """Milliseconds per layer and variant, per layer shape."""
    timer = _timer(device, repeats)
    gen = torch.Generator(device="cpu").manual_seed(0)
    return {
        name: _measure_shape(cfg, device, h_in, h_out, count, timer, gen)
        for name, (h_in, h_out, count) in layer_shapes(cfg).items()
    }


def _measure_shape(
    cfg: Config,
    device: torch.device,
    h_in: int,
    h_out: int,
    count: int,
    timer: Callable[[Callable[[], object]], float],
    gen: torch.Generator,
) -> dict[str, float]:
    c = cfg.groups
    m = cfg.batch * cfg.seq // c
    w = SketchWidths.for_layer(h_in, h_out, cfg.rank, 10)
    a = torch.randn(c, m, h_in, generator=gen).to(device)
    d = torch.randn(c, m, h_out, generator=gen).to(device)
    tracker = LayerTracker(h_in, h_out, c, cfg.rank, 10, torch.Generator().manual_seed(0))
    tracker.products(a, d, exact=False)  # set up (and seed) the blocks
    b_in, b_out = tracker.bank.block_in[0], tracker.bank.block_out[0]
    pr = torch.cat([torch.bmm(a, b_in), torch.bmm(d, b_out)], dim=2)
    row: dict[str, float] = {"count": float(count), "b_in": w.block_in, "b_out": w.block_out}
    with ieee_float32():
        # Every variant computes the monitor's products (checked once, untimed).
        ref = tracker.products(a, d, exact=False)
        split = _transposed(a, d, pr, 4)
        one = _one_transposed(a, d, pr) + _transposed_out(a, d, pr)
        gaps = [_gap(_forward_split(a, d, b_in, b_out, 4), pr)]
        gaps += [_gap(x, y) for x, y in zip(split + one, (ref.s_in, ref.s_out) * 3, strict=True)]
        stacked = _products(*(t.repeat(2, 1, 1) for t in (a, d, b_in, b_out)))
        expected = (ref.s_in, ref.s_out, ref.norms)
        gaps += [_gap(x[c:], y) for x, y in zip(stacked, expected, strict=True)]
        row["max_gap"] = max(gaps)
        row["monitor"] = timer(lambda: tracker.products(a, d, exact=False))
        row["only forward"] = timer(lambda: torch.cat([torch.bmm(a, b_in), torch.bmm(d, b_out)], 2))
        row["forward split-k 4"] = timer(lambda: _forward_split(a, d, b_in, b_out, 4))
        row["only transposed"] = timer(lambda: _transposed(a, d, pr, 1))
        row["only norms"] = timer(lambda: sq_norms_pair(DenseRows(a), d))
        row["one transposed"] = timer(lambda: _one_transposed(a, d, pr))
        row["transposed out"] = timer(lambda: _transposed_out(a, d, pr))
        for chunks in (2, 4, 8):
            row[f"transposed split-k {chunks}"] = timer(
                lambda chunks=chunks: _transposed(a, d, pr, chunks)
            )
        for layers in (2, 4, 12):
            stack = tuple(t.repeat(layers, 1, 1) for t in (a, d, b_in, b_out))
            row[f"layers {layers}"] = timer(lambda stack=stack: _products(*stack)) / layers
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        row["monitor tf32"] = timer(lambda: tracker.products(a, d, exact=False))
    finally:
        torch.set_float32_matmul_precision(saved)
    return row


def report(cfg: Config, device: torch.device, rows: dict[str, dict[str, float]]) -> str:
    variants = [
        k for k in next(iter(rows.values())) if k not in ("count", "b_in", "b_out", "max_gap")
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"Row products per layer, config `{cfg.name}` on {name} (torch {torch.__version__}; "
        f"{cfg.groups} groups, {cfg.batch * cfg.seq // cfg.groups} rows each, k = {cfg.rank}; "
        "medians, ms per layer" + (", device time" if device.type == "cuda" else "") + ")",
        "",
        "| layer (h_in → h_out, b_in/b_out) | × | " + " | ".join(variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    total = dict.fromkeys(variants, 0.0)
    for layer, row in rows.items():
        h_in, h_out, _ = layer_shapes(cfg)[layer]
        cells = " | ".join(f"{row[v]:.3f}" for v in variants)
        lines.append(
            f"| {layer} ({h_in} → {h_out}, {row['b_in']:.0f}/{row['b_out']:.0f}) "
            f"| {row['count']:.0f} | {cells} |"
        )
        for v in variants:
            total[v] += row[v] * row["count"]
    lines.append("| per step (all layers) | | " + " | ".join(f"{total[v]:.2f}" for v in variants))
    gap = max(row["max_gap"] for row in rows.values())
    lines += ["", f"The variants compute the monitor's products: largest relative gap {gap:.1e}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.products", description=__doc__)
    p.add_argument("--config", choices=sorted(CONFIGS), default="gpu-base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    cfg, device = CONFIGS[args.config], torch.device(args.device)
    rows = measure(cfg, device, args.repeats)
    table = report(cfg, device, rows)
    save(args.out, f"products-{cfg.name}-{device.type}", rows, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
