"""LayerTracker invariants: orthonormal [Ω | W] blocks through steps, seeding and epochs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamspec.sketch.tracker import LayerTracker


def blocks(tracker: LayerTracker) -> list[torch.Tensor]:
    return [torch.cat([tracker.omega(side), tracker.warm(side)], dim=2) for side in ("in", "out")]


def test_blocks_stay_orthonormal_across_steps_absent_groups_and_epochs() -> None:
    g = torch.Generator().manual_seed(0)
    tracker = LayerTracker(100, 80, 2, 8, 10, g)
    data = torch.Generator().manual_seed(1)
    for epoch in range(3):
        for step in range(4):
            a = torch.randn(2, 60, 100, generator=data)
            d = torch.randn(2, 60, 80, generator=data)
            if step == 1:  # group 1 absent from this step (zero rows)
                a[1] = 0
                d[1] = 0
            tracker.step(a, d, exact=False)
            for b in blocks(tracker):
                eye = torch.eye(b.shape[-1]).expand(2, -1, -1)
                err = (b.mT @ b - eye).abs().max().item()
                assert err < 1e-5, (epoch, step, err)
        tracker.end_epoch()
        for b in blocks(tracker):
            assert (b.mT @ b - torch.eye(b.shape[-1])).abs().max().item() < 1e-5


def test_host_workers_split_the_factorisations_without_changing_them(monkeypatch) -> None:
    """With a worker pool the host factorises chunks of a step's sketches in parallel; every
    recorded number is the same as with one thread."""
    from torch import nn

    import streamspec
    import streamspec.pipeline as pipeline
    from streamspec.pipeline import host_workers

    assert host_workers(2) == 1 and host_workers(16) == 4 and host_workers(64) == 4
    calls: list[tuple[int, int]] = []  # (problems, narrowest eigenvalue problem) per call
    real = pipeline.sketched_spectra

    def counted(t: dict[str, np.ndarray]) -> object:
        calls.append((len(t["core_a"]), min(t["core_d"].shape[-1], *t["core_g"].shape[-2:])))
        return real(t)

    monkeypatch.setattr(pipeline, "sketched_spectra", counted)
    out = {}
    for workers in ("1", "3"):
        monkeypatch.setenv("STREAMSPEC_HOST_WORKERS", workers)
        torch.manual_seed(0)
        calls.clear()
        # 20 layers × 4 groups: two chunks past numpy's GIL threshold (three chunks of 26–27
        # problems of width 16 stayed below it).
        model = nn.Sequential(*[nn.Linear(24, 24) for _ in range(20)])
        x = torch.randn(32, 24, generator=torch.Generator().manual_seed(1))
        labels = torch.arange(32) % 4
        with streamspec.watch(model, list("abcd"), rank=4, live=False, exact_rows=0) as mon:
            for _ in range(3):
                mon.label(labels)
                model(x).pow(2).mean().backward()
            ds = mon.to_xarray()
        out[workers] = (ds["sigma"].values, ds["sigma_err"].values)
        # One call per step alone; with workers, chunks past numpy's GIL threshold.
        assert sum(n for n, _ in calls) == 3 * 80
        assert len(calls) == (3 if workers == "1" else 6), calls
        assert all(n * narrowest > 500 for n, narrowest in calls), calls
    for a, b in zip(out["1"], out["3"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(out["1"][0][:, :, :, :, 0]).all()


def test_same_shape_layers_share_a_bank_unless_on_another_device() -> None:
    from streamspec.sketch.tracker import SketchBank, SketchWidths

    g = torch.Generator().manual_seed(0)
    widths = SketchWidths.for_layer(40, 30, 4, 4)
    bank = SketchBank(40, 30, 2, widths, capacity=2)
    first = LayerTracker(40, 30, 2, 4, 4, g, bank=bank)
    second = LayerTracker(40, 30, 2, 4, 4, g, bank=bank)
    assert (first.slot, second.slot) == (0, 1)
    first.step(torch.randn(2, 20, 40), torch.randn(2, 20, 30), exact=False)
    assert bank.device == torch.device("cpu") and first.bank is bank
    second._claim_bank(torch.device("meta"))  # a layer of the same shape on another device
    assert second.bank is not bank and second.bank.device == torch.device("meta")
    assert second.slot == 0 and second.bank.capacity == 1
    # The first layer's slot kept its own orthonormal blocks; the untouched slot stayed zero.
    b = torch.cat([first.omega("in"), first.warm("in")], dim=2)
    eye = torch.eye(b.shape[-1]).expand(2, -1, -1)
    torch.testing.assert_close(b.mT @ b, eye, atol=1e-5, rtol=0)
    assert bank.block_in[1].abs().sum() == 0


def test_sketch_widths_aligned_and_corange_wider() -> None:
    """Blocks are multiples of 8 columns where the layer allows (48/32 at the defaults), never
    wider than the layer, and the co-range block keeps its excess over the range block (a square
    generalized-Nyström core is unstable)."""
    from streamspec.sketch.tracker import ALIGN, SketchWidths

    w = SketchWidths.for_layer(768, 3072, 16, 10)
    assert (w.block_in, w.block_out) == (48, 32)
    for rank in range(1, 25):
        for oversample in (0, 3, 10):
            for h_in in (3, 17, 20, 23, 31, 40, 64, 100, 256):
                for h_out in (2, 17, 40, 96, 512):
                    w = SketchWidths.for_layer(h_in, h_out, rank, oversample)
                    assert 0 < w.block_in <= h_in and 0 < w.block_out <= h_out
                    assert w.warm_in >= 0 and w.warm_out >= 0
                    assert w.block_in - w.block_out >= w.epoch_in - w.epoch_out or (
                        w.warm_in == min(max(rank // 2, 1), h_in - w.epoch_in)
                    )
                    if h_in >= 64 and h_out >= 64 and w.epoch_in < h_in:
                        assert w.block_in % ALIGN == 0 and w.block_out % ALIGN == 0
                    # a side its Ω and warm block would cover takes the identity (exact)
                    warm = max(rank // 2, 1)
                    assert w.epoch_in == h_in or w.epoch_in + warm < h_in
                    assert w.epoch_out == h_out or w.epoch_out + warm < h_out


def _banks_with_a_step(seed: int) -> list:
    """Banks of different heights (256/1024-row warm blocks, like the CPU bench model, and two
    small ones), each with one step's products; one slot absent from the step."""
    from streamspec.sketch.tracker import SketchBank, SketchWidths

    g, data = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    work = []
    for h_in, h_out, layers in ((256, 256, 3), (256, 1024, 2), (1024, 256, 2), (64, 96, 2)):
        widths = SketchWidths.for_layer(h_in, h_out, 16, 10)
        bank = SketchBank(h_in, h_out, 2, widths, capacity=layers)
        present = {}
        for i in range(layers):
            tracker = LayerTracker(h_in, h_out, 2, 16, 10, g, bank=bank)
            a = torch.randn(2, 300, h_in, generator=data)
            d = torch.randn(2, 300, h_out, generator=data)
            tracker.products(a, d, exact=False)  # the first call seeds the blocks
            products = tracker.products(a, d, exact=False)
            if (h_in, h_out, i) != (256, 1024, 1):  # this slot sits the step out
                present[tracker.slot] = products
        work.append((bank, present))
    return work


def _update(blocks: int, height: int, width: int, device: str = "cpu") -> object:
    from streamspec.sketch.tracker import _WarmUpdate

    shape = (blocks, height, width)
    return _WarmUpdate(
        torch.zeros(shape, device=device),
        torch.zeros(shape, device=device),
        torch.zeros(blocks, height, 4, device=device),
    )


def test_warm_blocks_batch_by_height_on_cpu_and_pad_freely_elsewhere() -> None:
    """On a CPU a shorter block height joins a taller batch only while the zero padding is cheaper
    than a call of its own; on another device every height of one width goes in one batch; a
    batch never mixes devices or widths."""
    from streamspec.sketch.tracker import CPU_PAD_BUDGET, _warm_batches

    def shapes(batches: list) -> list:
        return sorted(sorted((u.y.shape[-2], u.y.shape[-1]) for u in b) for b in batches)

    big = [_update(4, 1024, 9), _update(14, 256, 9)]  # the CPU bench model's warm blocks
    big += [_update(4, 1024, 6), _update(4, 768, 6), _update(10, 256, 6)]
    # 768 rows join 1024 (4·256·6 padded elements), 256 rows do not (14·768·9, 10·768·6).
    assert 4 * 256 * 6 <= CPU_PAD_BUDGET < 10 * 768 * 6
    assert shapes(_warm_batches(big)) == [
        [(256, 6)],
        [(256, 9)],
        [(768, 6), (1024, 6)],
        [(1024, 9)],
    ]
    small = [_update(12, 192, 6), _update(12, 128, 6), _update(2, 64, 6)]  # a d = 64 model
    assert len(_warm_batches(small)) == 1
    assert len(_warm_batches(small[:1] + [_update(40, 32, 6)])) == 2
    assert _warm_batches([]) == []
    # Another device (meta: shapes only) pads freely and never shares a batch with the CPU.
    meta = [_update(4, 1024, 9, "meta"), _update(14, 256, 9, "meta"), _update(3, 64, 6, "meta")]
    batches = _warm_batches(big + meta)
    assert all(len({u.y.device for u in b}) == 1 for b in batches)
    assert shapes([b for b in batches if b[0].y.is_meta]) == [[(64, 6)], [(256, 9), (1024, 9)]]
    # A partition: every update exactly once, one width per batch, tallest first.
    for updates in (big, small, big + meta):
        batches = _warm_batches(updates)
        assert sorted(id(u) for b in batches for u in b) == sorted(map(id, updates))
        for b in batches:
            assert len({u.y.shape[-1] for u in b}) == 1
            assert b[0].y.shape[-2] == max(u.y.shape[-2] for u in b)


def test_warm_blocks_batched_equal_each_block_advanced_alone(monkeypatch) -> None:
    """However the warm blocks are batched (zero-padded or per height), each comes out as
    ``_keep_valid`` of its own block alone: zero rows change neither Grams nor projections."""
    import streamspec.sketch.tracker as tracker_module
    from streamspec.sketch.tracker import _keep_valid, finish_banks

    batching = tracker_module._warm_batches
    seen: dict = {}

    def spy(updates: list) -> list:
        seen["batches"] = batching(updates)
        seen["expected"] = [
            (u.block, u.block.clone(), _keep_valid(u.block.clone(), u.y.clone(), u.omega))
            for u in updates
        ]
        return seen["batches"]

    monkeypatch.setattr(tracker_module, "_warm_batches", spy)
    for budget in (0, tracker_module.CPU_PAD_BUDGET, 10**12):
        monkeypatch.setattr(tracker_module, "CPU_PAD_BUDGET", budget)
        finish_banks(_banks_with_a_step(seed=3))
        counts = {0: 6, 10**12: 2}  # per height on each side / one batch per width
        assert len(seen["batches"]) == counts.get(budget, len(seen["batches"]))
        for block, before, expected in seen["expected"]:
            assert (block - before).abs().max() > 1e-3  # the step moved the block
            torch.testing.assert_close(block, expected, atol=1e-6, rtol=0)


def test_step_end_of_banks_on_different_devices() -> None:
    """A model split over devices: banks of one width on two devices finish in one call (their
    warm blocks were concatenated across devices before). The meta device stands in for a second
    accelerator: shapes only."""
    from streamspec.sketch.tracker import SketchBank, SketchWidths, finish_banks

    g = torch.Generator().manual_seed(0)
    work = []
    for h_in, h_out, device in ((256, 256, "cpu"), (256, 1024, "meta"), (1024, 256, "cpu")):
        bank = SketchBank(h_in, h_out, 2, SketchWidths.for_layer(h_in, h_out, 16, 10), 1)
        tracker = LayerTracker(h_in, h_out, 2, 16, 10, g, bank=bank)
        a = torch.randn(2, 300, h_in, device=device)
        d = torch.randn(2, 300, h_out, device=device)
        tracker.products(a, d, exact=False)
        work.append((bank, {tracker.slot: tracker.products(a, d, exact=False)}))
    packed = finish_banks(work)
    assert [p.device.type for p in packed] == ["cpu", "meta", "cpu"]
    for bank, _ in work:
        assert bank.block_in.device == bank.device


def test_keep_valid_keeps_the_old_block_of_a_zero_nan_or_inf_group() -> None:
    from streamspec.sketch.linalg import orthonormalize
    from streamspec.sketch.tracker import _keep_valid

    g = torch.Generator().manual_seed(0)
    old = orthonormalize(torch.randn(5, 40, 6, generator=g)).float()
    y = torch.randn(5, 40, 6, generator=g)
    y[1] = 0  # a group absent from the step
    y[2, 3, 4] = float("nan")
    y[3, 0, 0] = float("inf")
    y[4, :, 2] = 0  # one dead column: the block would lose a direction
    new = _keep_valid(old, y)
    torch.testing.assert_close(new[0].mT @ new[0], torch.eye(6), atol=1e-5, rtol=0)
    assert (new[0] - old[0]).abs().max() > 0.1
    for kept in (1, 2, 3, 4):
        assert torch.equal(new[kept], old[kept])
    assert torch.isfinite(new).all()


def test_blocks_stay_orthonormal_when_the_rows_have_low_rank() -> None:
    """Rows of rank 10 < the 39 columns of Ω: the warm block's new directions are mostly rounding
    noise, which orthonormalising blew up to an overlap of ≈ 0.5 with Ω before it was projected
    off a second time; the host's spectra assume ``[Ω | W]`` orthonormal."""
    g = torch.Generator().manual_seed(0)
    tracker = LayerTracker(256, 64, 2, 16, 10, g)
    basis = torch.randn(10, 256, generator=g)
    for _ in range(4):
        a = (torch.randn(2, 300, 10, generator=g) @ basis).contiguous()
        d = torch.randn(2, 300, 64, generator=g)
        tracker.step(a, d, exact=False)
        for b in blocks(tracker):
            eye = torch.eye(b.shape[-1]).expand(2, -1, -1)
            assert (b.mT @ b - eye).abs().max().item() < 1e-5


def test_warm_blocks_of_one_width_with_different_omega_widths(monkeypatch) -> None:
    """A 45-wide layer and a 256-wide one share warm width 6 but not Ω's width (39 vs 26): one
    batch pads Ω to the wider; each block still equals its block advanced alone, whichever bank
    comes first. (One monitor's default widths no longer mix Ω widths for one warm width; the
    45-wide layer's are set by hand.)"""
    import streamspec.sketch.tracker as tracker_module
    from streamspec.sketch.tracker import SketchBank, SketchWidths, _keep_valid, finish_banks

    batching = tracker_module._warm_batches
    seen: dict = {}

    def spy(updates: list) -> list:
        seen["batches"] = batching(updates)
        seen["expected"] = [
            (u.block, _keep_valid(u.block.clone(), u.y.clone(), u.omega)) for u in updates
        ]
        return seen["batches"]

    monkeypatch.setattr(tracker_module, "_warm_batches", spy)
    monkeypatch.setattr(tracker_module, "CPU_PAD_BUDGET", 10**12)
    for order in ((45, 256), (256, 45)):
        g, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        work = []
        for h in order:
            widths = SketchWidths(39, 39, 6, 6) if h == 45 else SketchWidths.for_layer(h, h, 16, 10)
            bank = SketchBank(h, h, 2, widths, capacity=1)
            tracker = LayerTracker(h, h, 2, 16, 10, g, bank=bank)
            a, d = torch.randn(2, 300, h, generator=data), torch.randn(2, 300, h, generator=data)
            tracker.products(a, d, exact=False)
            work.append((bank, {tracker.slot: tracker.products(a, d, exact=False)}))
        finish_banks(work)
        assert any(len({u.omega.shape[-1] for u in b}) > 1 for b in seen["batches"])
        for block, expected in seen["expected"]:
            torch.testing.assert_close(block, expected, atol=1e-6, rtol=0)


def test_absent_slots_absent_groups_and_non_finite_groups_leave_the_state_unchanged() -> None:
    """Bitwise: a slot absent from a step, a group without rows and a group whose products are
    not finite leave their blocks and epoch sketches as they were (the non-finite group's samples
    are counted as left out); the epoch sketches of the others are Σ_t H_tΩ (linear in the
    data, float64 reference)."""
    from streamspec.sketch.tracker import SketchBank, SketchWidths, finish_banks

    h_in, h_out, c = 96, 64, 3
    g, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    bank = SketchBank(h_in, h_out, c, SketchWidths.for_layer(h_in, h_out, 8, 6), capacity=2)
    first, second = (LayerTracker(h_in, h_out, c, 8, 6, g, bank=bank) for _ in range(2))
    counts = torch.tensor([80.0, 70.0, 60.0], dtype=torch.float64)

    def rows() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(c, 80, h_in, generator=data), torch.randn(c, 80, h_out, generator=data)

    def state(slot: int, group: slice | int = slice(None)) -> list[torch.Tensor]:
        return [
            t[slot][group].clone()
            for t in (bank.block_in, bank.block_out, bank.epoch_in, bank.epoch_out)
        ] + [bank.epoch_core[slot][group].clone(), bank.epoch_excluded[slot][group].clone()]

    def step(tracker: LayerTracker, a: torch.Tensor, d: torch.Tensor) -> None:
        finish_banks([(bank, {tracker.slot: tracker.products(a, d, False, counts=counts)})])

    step(first, *rows())  # seeds the blocks of each
    step(second, *rows())
    first.end_epoch()  # a fresh epoch: Ω fixed from here on, sketches zero
    omega_in = first.omega("in").double().clone()
    omega_out = first.omega("out").double().clone()
    reference = {
        "y_a": torch.zeros(c, h_in, omega_in.shape[-1], dtype=torch.float64),
        "y_d": torch.zeros(c, h_out, omega_out.shape[-1], dtype=torch.float64),
        "z_g": torch.zeros(c, omega_in.shape[-1], omega_out.shape[-1], dtype=torch.float64),
    }
    for t in range(4):
        before_second = state(second.slot)
        a, d = rows()
        before_group = state(first.slot, 2)
        if t == 1:
            a[1], d[1] = 0, 0  # group 1 without rows
        if t == 2:
            d[2, 5, 3] = float("inf")  # group 2 not finite
        if t == 3:
            d[2] *= 1e30  # group 2 finite, its float32 products overflow
        step(first, a, d)
        assert all(map(torch.equal, before_second, state(second.slot)))  # the absent slot
        a64, d64 = a.double(), d.double()
        if t >= 2:
            after = state(first.slot, 2)
            assert all(map(torch.equal, before_group[:-1], after[:-1]))
            assert after[-1] == before_group[-1] + counts[2]
            a64[2], d64[2] = 0, 0  # the reference leaves group 2's step out too
        reference["y_a"] += a64.mT @ (a64 @ omega_in)
        reference["y_d"] += d64.mT @ (d64 @ omega_out)
        reference["z_g"] += omega_in.mT @ a64.mT @ d64 @ omega_out
    assert torch.equal(first.omega("in").double(), omega_in)
    sketches = first.state_dict()
    for name, expected in reference.items():
        for group in range(c):
            got = sketches[name][group].double()
            err = ((got - expected[group]).norm() / expected[group].norm()).item()
            assert err < 1e-5, (name, group, err)
    assert sketches["excluded"].tolist() == [0.0, 0.0, 2 * counts[2].item()]
    # The epoch's reconstruction reports them, and Ω of the next epoch stays orthonormal.
    spectra = first.end_epoch()
    assert spectra.excluded.tolist() == [0.0, 0.0, 120.0]
    assert np.isfinite(spectra.activation[:, 0]).all()
    for b in blocks(first):
        assert (b.mT @ b - torch.eye(b.shape[-1])).abs().max().item() < 1e-5


def test_direct_bmm_and_paired_norms_equal_the_broadcasting_forms() -> None:
    """The hot path's ``bmm`` (no view/expand dispatches) and the paired norms give what ``@``
    and per-operand :func:`sq_norms` give, for 3-D and 4-D batches and operator rows."""
    from streamspec.sketch.linalg import bmm
    from streamspec.sketch.operators import DenseRows, StackedRows, sq_norms, sq_norms_pair

    gen = torch.Generator().manual_seed(0)
    x4 = torch.randn(3, 2, 7, 5, generator=gen, dtype=torch.float64)
    y4 = torch.randn(3, 2, 5, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(bmm(x4, y4), x4 @ y4, rtol=0, atol=1e-14)
    torch.testing.assert_close(bmm(x4[0], y4[0]), x4[0] @ y4[0], rtol=0, atol=1e-14)
    sliced = x4[..., 1:4]  # a non-contiguous slice, transposed: the Grams of the step's end
    torch.testing.assert_close(bmm(sliced.mT, sliced), sliced.mT @ sliced, rtol=0, atol=1e-14)
    torch.testing.assert_close(bmm(x4[0], y4[0, 0]), x4[0] @ y4[0, 0])  # broadcast: falls back
    a = torch.randn(2, 9, 6, generator=gen)
    d = torch.randn(2, 9, 3, generator=gen) * 1e3
    dense = sq_norms_pair(DenseRows(a), d)
    assert dense.dtype == torch.float64 and dense.shape == (2, 2)
    torch.testing.assert_close(dense, torch.stack([sq_norms(a), sq_norms(d)], dim=1))
    exact = torch.stack([a.double().square().sum((1, 2)), d.double().square().sum((1, 2))], 1)
    torch.testing.assert_close(dense, exact, rtol=1e-6, atol=0)
    stacked = StackedRows([DenseRows(a[:, :4]), DenseRows(a[:, 4:])])
    torch.testing.assert_close(sq_norms_pair(stacked, d), dense, rtol=1e-6, atol=0)


def test_bmm_falls_back_to_matmul_where_it_broadcasts() -> None:
    from streamspec.sketch.linalg import bmm

    x, y = torch.randn(1, 3, 4), torch.randn(5, 4, 2)
    torch.testing.assert_close(bmm(x, y), x @ y)  # a broadcast batch
    empty = torch.randn(2, 0, 3, 4)
    assert bmm(empty, torch.randn(2, 0, 4, 5)).shape == (2, 0, 3, 5)


def test_split_k_products_equal_unsplit_ones(monkeypatch) -> None:
    """Split-K (CUDA only by default: forced here on the CPU) cuts long reductions into chunks
    and sums their products: the same step outputs, blocks and epoch spectra as one product,
    up to float32 rounding, and no split where the rows do not divide."""
    from streamspec.sketch import linalg

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 3, 64, 4, generator=gen, dtype=torch.float64)
    for split in (1, 2, 8):
        torch.testing.assert_close(linalg.tbmm(x, y, split), x.mT @ y, rtol=1e-13, atol=1e-13)
    assert linalg.split_count(x, y) == 1  # not on a CPU
    assert linalg.chunks_for(2048, 2 * 3072 * 80) == 8  # BERT-base's transposed products
    assert linalg.chunks_for(768, 24 * 48 * 48) == 2
    assert linalg.chunks_for(2047, 1) == 1 and linalg.chunks_for(256, 1) == 1
    assert linalg.chunks_for(4096, linalg.SPLIT_OUTPUT + 1) == 1

    def run(split: bool) -> list[np.ndarray]:
        if split:
            monkeypatch.setattr(linalg, "SPLIT_ROWS", 4)
            monkeypatch.setattr(
                linalg, "split_count", lambda x, y: linalg.chunks_for(x.shape[-2], 0)
            )
        tracker = LayerTracker(100, 80, 2, 8, 10, torch.Generator().manual_seed(0))
        data = torch.Generator().manual_seed(1)
        out = []
        for _ in range(3):
            a = torch.randn(2, 60, 100, generator=data)
            d = torch.randn(2, 60, 80, generator=data)
            products = tracker.products(a, d, exact=False)
            out += [t.double().numpy() for t in (products.s_in, products.s_out)]
            out.append(tracker.bank.finish({tracker.slot: products}).numpy())
        spectra = tracker.end_epoch()
        return out + [spectra.activation, spectra.adjoint, spectra.gradient]

    whole = run(False)
    seen = []
    real = linalg.chunks_for
    monkeypatch.setattr(linalg, "chunks_for", lambda *a: seen.append(real(*a)) or seen[-1])
    split = run(True)
    assert {4, 8} <= set(seen)  # the step's 60 rows; the Grams' 100 and 80 (capped at 8)
    for u, v in zip(whole, split, strict=True):
        np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-5 * np.abs(u).max())


@pytest.mark.parametrize("identity", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("rows", ["dense", "conv"])
def test_identity_blocks_take_the_shorter_products(identity: tuple[bool, bool], rows: str) -> None:
    """A side whose block is the identity (a layer no wider than its sketch) skips its product,
    and with both sides the identity the two transposed products are one Gram of ``[A | Δ]``:
    the same values as the general products with literal identity blocks, for explicit rows and
    convolution patches."""
    from streamspec.sketch.operators import ConvRows, DenseRows
    from streamspec.sketch.tracker import row_products

    gen = torch.Generator().manual_seed(5)
    if rows == "dense":
        a = DenseRows(torch.randn(2, 70, 12, generator=gen))
    else:  # 3 channels, 2 × 2 kernel: 12 columns; 6 × 7 inputs: 5 × 6 = 30 positions
        a = ConvRows(torch.randn(2, 3, 3, 6, 7, generator=gen), (2, 2), (1, 1), (0, 0), (1, 1))
    c, m, h_in = a.shape
    h_out = 9
    d = torch.randn(c, m, h_out, generator=gen)
    blocks = []
    for side, h in zip(identity, (h_in, h_out), strict=True):
        blocks.append(
            torch.eye(h).expand(c, h, h).contiguous()
            if side
            else torch.linalg.qr(torch.randn(c, h, 5, generator=gen))[0]
        )
    got = row_products(a, d, *blocks, identity=identity)
    want = row_products(a, d, *blocks)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))
