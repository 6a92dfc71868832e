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

    # cuDNN's TF32 convolutions (on by default) off around the products on CUDA.
    assert torch.backends.cudnn.allow_tf32 is True
    with ieee_float32(torch.device("cuda")):
        assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is True
    with ieee_float32(torch.device("cpu")):
        assert torch.backends.cudnn.allow_tf32 is True  # nothing to do off CUDA

    # The per-backend API (PyTorch >= 2.9), which makes some legacy reads raise.
    mode = "backend"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    seen.clear()
    train()
    assert seen and all(s[1] == "ieee" for s in seen), seen
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    with ieee_float32(torch.device("cuda")):
        assert torch.backends.cudnn.conv.fp32_precision in ("ieee", "none")
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    print("ok")
    """
)


def test_products_ignore_the_process_tf32_settings_and_restore_them() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
