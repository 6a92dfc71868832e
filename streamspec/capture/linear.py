"""``nn.Linear``: ``y = xWᵀ + b`` on inputs of any number of leading dims."""

from __future__ import annotations

import torch
from torch import nn

from streamspec.capture.registry import (
    Capture,
    DenseSource,
    Site,
    check_batched,
    register,
    samples_first,
    weight_site,
)


@register
class LinearFamily:
    """Activation rows are the inputs ``x``; adjoint rows are ``∂L/∂y`` (the bias adds nothing)."""

    module_types = (nn.Linear,)
    stepwise = False

    @staticmethod
    def sites(module: nn.Module, prefix: str) -> list[Site]:
        assert isinstance(module, nn.Linear)
        return weight_site(module, prefix, module.in_features, module.out_features)

    @staticmethod
    def capture(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, batch_dim: int
    ) -> list[Capture]:
        assert isinstance(module, nn.Linear)
        x = inputs[0]
        check_batched(x, batch_dim, "nn.Linear")
        h_in, h_out = module.in_features, module.out_features
        return [
            Capture(
                key="weight",
                activation=DenseSource(samples_first(x.detach(), batch_dim, h_in)),
                output=output,
                adjoint=lambda g: samples_first(g, batch_dim, h_out),
            )
        ]

    @staticmethod
    def problems(module: nn.Module) -> list[str]:
        return []
