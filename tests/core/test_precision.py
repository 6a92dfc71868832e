"""streamspec's own products run in IEEE float32 whatever TF32 settings the process has."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# One subprocess: PyTorch's TF32 switches are process-wide, and once its legacy and per-backend
# APIs are mixed some reads raise for the rest of the process.
SCRIPT = textwrap.dedent(
    """
    import warnings
    import torch
    from torch import nn
    import streamspec
    from streamspec.sketch import tracker
    from streamspec.sketch.linalg import ieee_float32

    warnings.simplefilter("ignore")
    seen = []
    original = tracker.LayerTracker.products

    def spy(self, *args, **kwargs):
        seen.append(
            (torch.get_float32_matmul_precision() if mode == "legacy" else None,
             torch.backends.cuda.matmul.fp32_precision)
        )
        return original(self, *args, **kwargs)

    tracker.LayerTracker.products = spy

    def train():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
        x = torch.randn(32, 12)
        with streamspec.watch(model, ["a", "b"], rank=2, live=False, exact_rows=0) as mon:
            for _ in range(2):
                mon.label(torch.arange(32) % 2)
                model(x).pow(2).mean().backward()
            return mon.to_xarray()["sigma"].values

    # The legacy switch (Lightning, the HF Trainer: set_float32_matmul_precision / allow_tf32).
    mode = "legacy"
    reference = train()
    torch.set_float32_matmul_precision("high")
    seen.clear()
    high = train()
    assert seen and all(s == ("highest", "ieee") for s in seen), seen
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert (high == reference)[~torch.isnan(torch.as_tensor(high)).numpy()].all()
    torch.set_float32_matmul_precision("highest")

    # cuDNN's TF32 convolutions (on by default) off around the products.
    assert torch.backends.cudnn.allow_tf32 is True
    with ieee_float32():
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cudnn.conv.fp32_precision in ("ieee", "none")
    assert torch.backends.cudnn.allow_tf32 is True

    def state():
        out = []
        for read in (
            torch.get_float32_matmul_precision,
            lambda: torch.backends.cuda.matmul.allow_tf32,
            lambda: torch.backends.cudnn.allow_tf32,
            lambda: torch.backends.cuda.matmul.fp32_precision,
            lambda: torch.backends.cudnn.conv.fp32_precision,
            lambda: torch.backends.mkldnn.matmul.fp32_precision,
            lambda: torch.backends.mkldnn.conv.fp32_precision,
        ):
            try:
                out.append(read())
            except RuntimeError:
                out.append("refused")  # PyTorch refuses some reads once the APIs are mixed
        return out

    leaves = (
        torch.backends.cuda.matmul,
        torch.backends.cudnn.conv,
        torch.backends.mkldnn.matmul,
        torch.backends.mkldnn.conv,
    )

    def check_round_trip(label):
        before = state()
        with ieee_float32():
            assert all(leaf.fp32_precision == "ieee" for leaf in leaves), label
            torch.randn(4, 4) @ torch.randn(4, 4)
            torch.nn.functional.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3))
        assert state() == before, (label, before, state())

    # A legacy switch plus a separate oneDNN setting: both read back as set.
    torch.set_float32_matmul_precision("high")
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    check_round_trip("high + oneDNN ieee")
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = True  # the HF Trainer's tf32=True
    check_round_trip("allow_tf32")
    torch.backends.cuda.matmul.allow_tf32 = False

    # Only the op kinds a block runs are switched, and only where reduced: with the defaults a
    # matmul-only block (a Linear layer's products, the step's end) changes nothing (no setter
    # call on every layer and step), while a convolution layer's products still get cuDNN's
    # TF32 convolutions off.
    before = state()
    with ieee_float32(conv=False):
        assert state() == before
        assert torch.backends.cudnn.allow_tf32 is True
    assert state() == before
    cudnn_seen = []

    def conv_spy(self, *args, **kwargs):
        cudnn_seen.append((type(args[0]).__name__, torch.backends.cudnn.allow_tf32))
        return original(self, *args, **kwargs)

    tracker.LayerTracker.products = conv_spy
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    image = torch.randn(8, 2, 8, 8)
    with streamspec.watch(net, ["a", "b"], rank=2, live=False, exact_rows=0) as mon:
        mon.label(torch.arange(8) % 2)
        net(image).pow(2).mean().backward()
    tracker.LayerTracker.products = spy
    assert sorted(cudnn_seen) == [("ConvRows", False), ("DenseRows", True)], cudnn_seen
    assert torch.backends.cudnn.allow_tf32 is True

    # A convolution block entered while another thread's matmul-only block is open still
    # switches convolutions, and the last one out restores everything.
    import threading
    torch.set_float32_matmul_precision("high")
    before = state()
    inside, leave = threading.Event(), threading.Event()

    def matmul_only():
        with ieee_float32(conv=False):
            inside.set()
            leave.wait(10)

    worker = threading.Thread(target=matmul_only)
    worker.start()
    inside.wait(10)
    assert torch.backends.cudnn.allow_tf32 is True
    with ieee_float32():
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cudnn.allow_tf32 is False  # the worker's block is still open
    leave.set()
    worker.join()
    assert state() == before, (before, state())
    torch.set_float32_matmul_precision("highest")

    # Threads of a multi-device backward: the first in flips, the last out restores.
    torch.set_float32_matmul_precision("high")
    inside, leave = threading.Event(), threading.Event()

    def other():
        with ieee_float32():
            inside.set()
            leave.wait(10)

    with ieee_float32():
        worker = threading.Thread(target=other)
        worker.start()
        inside.wait(10)
    assert torch.get_float32_matmul_precision() == "highest"  # the other thread is still in
    leave.set()
    worker.join()
    assert torch.get_float32_matmul_precision() == "high"
    torch.set_float32_matmul_precision("highest")

    # The per-backend API (PyTorch >= 2.9), which makes some legacy reads raise.
    mode = "backend"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    check_round_trip("oneDNN bf16")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    seen.clear()
    train()
    assert seen and all(s[1] == "ieee" for s in seen), seen
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    check_round_trip("cuBLAS tf32")
    torch.backends.fp32_precision = "tf32"  # every backend, every op
    check_round_trip("global tf32")
    # A setting that only followed its parent follows it again after a watch: the user's later
    # change of the parent reaches the matmuls (and cuDNN's convolutions) as without the watch.
    for leaf in leaves:
        leaf.fp32_precision = "none"  # unset: they follow torch.backends.fp32_precision
    torch.backends.fp32_precision = "tf32"
    train()
    with ieee_float32():
        pass
    torch.backends.fp32_precision = "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    torch.backends.cudnn.fp32_precision = "tf32"  # cuBLAS's and cuDNN's parent
    with ieee_float32():
        pass
    torch.backends.cudnn.fp32_precision = "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    print("ok")
    """
)


def test_products_ignore_the_process_tf32_settings_and_restore_them() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
