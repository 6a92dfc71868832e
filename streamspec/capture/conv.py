"""``nn.Conv1d/2d/3d`` (``groups=1``): the weight as the matrix ``[out, in·∏kernel]``.

Activation rows are the unfolded input patches, one per (sample, output position); adjoint rows the
output gradients at each position; their product is the weight gradient reshaped to 2-D. The
patches are never materialised: products with them are convolutions and convolution
weight-gradient calls (:class:`streamspec.sketch.operators.ConvRows`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from streamspec.capture.groups import GroupPlan
from streamspec.capture.registry import Capture, Site, register, weight_site
from streamspec.errors import StreamspecError
from streamspec.sketch.operators import ConvRows, RowOperator

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ConvSource:
    """One call's input ``[B, in, *spatial]`` (already padded for non-zero padding modes)."""

    def __init__(
        self,
        inputs: torch.Tensor,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
    ) -> None:
        self.inputs = inputs
        self.kernel, self.stride, self.padding, self.dilation = kernel, stride, padding, dilation
        spatial = inputs.shape[2:]
        self._positions = math.prod(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(spatial, kernel, stride, padding, dilation, strict=True)
        )

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def positions(self) -> int:
        return self._positions

    def gather(self, plan: GroupPlan) -> RowOperator:
        return ConvRows(
            plan.gather_samples(self.inputs), self.kernel, self.stride, self.padding, self.dilation
        )


@register
class ConvFamily:
    """Convolutions with one group; samples are always on dim 0 (whatever ``batch_dim`` says)."""

    module_types = _CONVS
    stepwise = False
    tying = True  # rows are (sample, output position): watch(..., tied=True) applies

    @staticmethod
    def sites(module: nn.Module, prefix: str) -> list[Site]:
        assert isinstance(module, _CONVS)
        w = module.weight
        return weight_site(module, prefix, math.prod(w.shape[1:]), w.shape[0])

    @staticmethod
    def problems(module: nn.Module) -> list[str]:
        assert isinstance(module, _CONVS)
        if module.groups != 1:
            return [
                f"grouped/depthwise convolution (groups={module.groups}) is not supported yet: "
                "its weight is a block-diagonal matrix"
            ]
        return []

    @staticmethod
    def capture(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, batch_dim: int
    ) -> list[Capture]:
        assert isinstance(module, _CONVS)
        x = inputs[0]
        dims = len(module.kernel_size)
        if x.dim() != dims + 2:
            raise StreamspecError.build(
                f"a batched input [B, C, {', '.join('S' * dims)}] to {type(module).__name__}",
                f"shape {tuple(x.shape)}",
                "add the batch dimension (x.unsqueeze(0))",
            )
        x = x.detach()
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            # Pad explicitly as the module does, then convolve without padding.
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * dims
        source = ConvSource(
            x,
            tuple(module.kernel_size),
            tuple(module.stride),
            tuple(padding),
            tuple(module.dilation),
        )
        out_channels = module.out_channels
        return [
            Capture(
                key="weight",
                activation=source,
                output=output,
                adjoint=lambda g: g.reshape(g.shape[0], out_channels, -1).transpose(1, 2),
            )
        ]
