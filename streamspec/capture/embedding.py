"""``nn.Embedding``: ``y = onehot(idx) · W`` with ``W [num_embeddings, dim]``.

Activation rows are one-hot (``h_in = num_embeddings``): products with them are a gather and a
scatter-add (:class:`streamspec.sketch.operators.OneHotRows`); the gradient ``AᵀΔ`` is the
scatter-add of adjoint rows, which is the weight's gradient. Tokens equal to ``padding_idx`` get no
gradient, so they are left out of the rows.
"""

from __future__ import annotations

import torch
from torch import nn

from streamspec.capture.groups import GroupPlan
from streamspec.capture.registry import Capture, Site, register, samples_first, weight_site
from streamspec.errors import StreamspecError
from streamspec.sketch.operators import OneHotRows, RowOperator


class IndexSource:
    """One call's token indices ``[B, T]`` (-1: left out)."""

    def __init__(self, indices: torch.Tensor, vocabulary: int) -> None:
        self.indices = indices
        self.vocabulary = vocabulary

    @property
    def batch_size(self) -> int:
        return int(self.indices.shape[0])

    @property
    def positions(self) -> int:
        return int(self.indices.shape[1])

    def gather(self, plan: GroupPlan) -> RowOperator:
        blocks = plan.gather_samples(self.indices, fill=-1)  # [C, n_max, T]
        return OneHotRows(blocks.reshape(blocks.shape[0], -1), self.vocabulary)


@register
class EmbeddingFamily:
    module_types = (nn.Embedding,)
    stepwise = False
    # Ids without one entry per sample (shared by the batch, e.g. [1, T] positions) are not
    # recordable per group: the monitor leaves such a call's steps NaN (Monitor._shared_call).
    broadcasts = True

    @staticmethod
    def sites(module: nn.Module, prefix: str) -> list[Site]:
        assert isinstance(module, nn.Embedding)
        return weight_site(module, prefix, module.num_embeddings, module.embedding_dim)

    @staticmethod
    def problems(module: nn.Module) -> list[str]:
        assert isinstance(module, nn.Embedding)
        if module.scale_grad_by_freq:
            return [
                "scale_grad_by_freq=True is not supported yet: its gradient divides each token's "
                "rows by the token's count in the batch, which the one-hot rows do not carry"
            ]
        return []

    @staticmethod
    def capture(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, batch_dim: int
    ) -> list[Capture]:
        assert isinstance(module, nn.Embedding)
        idx = inputs[0]
        if idx.dim() < 1 or not (-idx.dim() <= batch_dim < idx.dim()):
            raise StreamspecError.build(
                f"batched token indices with samples on batch_dim={batch_dim}",
                f"indices of shape {tuple(idx.shape)}",
                "pass [B, T] (or [B]) indices, or set watch(..., batch_dim=)",
            )
        rows = idx.detach().movedim(batch_dim, 0)
        rows = rows.reshape(rows.shape[0], -1)
        if module.padding_idx is not None:
            rows = torch.where(rows == module.padding_idx, torch.full_like(rows, -1), rows)
        dim = module.embedding_dim
        if module.padding_idx is None:
            adjoint = lambda g: samples_first(g, batch_dim, dim)  # noqa: E731
        else:
            keep = (rows >= 0).unsqueeze(-1)
            adjoint = lambda g: samples_first(g, batch_dim, dim) * keep  # noqa: E731
        return [
            Capture(
                key="weight",
                activation=IndexSource(rows, module.num_embeddings),
                output=output,
                adjoint=adjoint,
            )
        ]
