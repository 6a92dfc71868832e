"""Brute-force references for tests: the exact matrices, their float64 spectra, masked-loss grads.

Independent of streamspec's capture and sketches: plain module/tensor hooks keep every step's full
activation and adjoint rows (float64), so only use it on small models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


@dataclass
class StepMatrices:
    """One step of one layer: ``activation [B, T, h_in]``, ``adjoint [B, T, h_out]`` (float64)."""

    activation: list[torch.Tensor] = field(default_factory=list)
    adjoint: list[torch.Tensor] = field(default_factory=list)


class ExactRecorder:
    """Record every ``nn.Linear``'s exact activation and adjoint rows per backward pass.

    Args:
        model: the model (hooks are added; call :meth:`remove` when done).
        batch_dim: the sample dimension of the layers' inputs, or a mapping from module names to
            it, as ``watch(batch_dim=)`` takes.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_dim: int | Mapping[str, int] = 0,
        check_weight_grads: bool = False,
    ) -> None:
        self.batch_dim = batch_dim
        # An independent check of the recorded adjoints (it does not depend on which tensor the
        # gradient hook hangs on): each step's Σ_calls AᵀΔ must equal what autograd added to the
        # layer's weight.grad. Only for models whose weights get no other gradient (no weight
        # tying, no penalty on the weights, one backward per step).
        self._check = check_weight_grads
        self._weights: dict[str, torch.Tensor] = {}
        self._grad_before: dict[str, torch.Tensor] = {}
        self.names: list[str] = []
        self.steps: list[dict[str, StepMatrices]] = []
        self.labels: list[np.ndarray] = []
        self._current: dict[str, StepMatrices] = {}
        self._labels: np.ndarray | None = None
        self._handles = []
        self._queued = False
        for prefix, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.weight.requires_grad:
                name = f"{prefix}.weight" if prefix else "weight"
                self.names.append(name)
                self._weights[name] = module.weight
                dim = _sample_dim(prefix, batch_dim)
                self._handles.append(module.register_forward_hook(self._forward(name, dim)))

    def label(self, labels: object) -> None:
        self._labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)

    @staticmethod
    def _rows(x: torch.Tensor, batch_dim: int) -> torch.Tensor:
        x = x.detach().to(torch.float64).movedim(batch_dim, 0)
        return x.reshape(x.shape[0], -1, x.shape[-1]).clone()

    def _forward(self, name: str, batch_dim: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            activation = self._rows(inputs[0], batch_dim)
            if self._check and name not in self._grad_before:
                w = self._weights[name]
                self._grad_before[name] = (
                    torch.zeros_like(w, dtype=torch.float64)
                    if w.grad is None
                    else w.grad.detach().to(torch.float64).clone()
                )
            if torch._C._current_graph_task_id() != -1 and not self._queued:
                # A forward inside a backward (reentrant checkpointing's recomputation): its
                # gradients arrive in a nested backward, whose end is not the step's; the step
                # ends with the enclosing backward, queued now while it is the current one.
                self._queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end)

            shape = output.shape

            def on_grad(grad: torch.Tensor) -> None:
                mats = self._current.setdefault(name, StepMatrices())
                mats.activation.append(activation)
                mats.adjoint.append(self._rows(grad.reshape(shape), batch_dim))
                if not self._queued:
                    self._queued = True
                    torch.autograd.Variable._execution_engine.queue_callback(self._end)

            # Linear on 3-D input returns a view of its 2-D product: an in-place op on it (an
            # in-place ReLU) replaces the view's autograd node, whose hooks then never run; the
            # product's own node stays in the graph, and its gradient is the output's.
            base = output._base
            if base is not None and base.numel() == output.numel():
                base.register_hook(on_grad)
            else:
                output.register_hook(on_grad)

        return hook

    def _end(self) -> None:
        self._queued = False
        if self._check:
            for name, before in self._grad_before.items():
                w, mats = self._weights[name], self._current.get(name)
                grad = w.grad
                added = torch.zeros_like(before) if grad is None else grad.double() - before
                got = torch.zeros_like(before)
                calls = zip(mats.activation, mats.adjoint, strict=True) if mats else ()
                for a, d in calls:
                    got += torch.einsum("bti,bto->oi", a, d)
                scale = added.abs().max().clamp_min(1e-12)
                assert (got - added).abs().max() <= 1e-6 * scale, (
                    f"ExactRecorder: {name}'s recorded AᵀΔ differs from its weight gradient"
                )
            self._grad_before = {}
        self.steps.append(self._current)
        assert self._labels is not None
        self.labels.append(self._labels.copy())
        self._current = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def group_matrices(
        self, steps: list[int], name: str, group: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Stacked ``A_c [rows, h_in]``, ``Δ_c [rows, h_out]``, summed ``Σ A_cᵀΔ_c`` and ``n_c``
        (samples) of ``group`` over ``steps``."""
        a_rows, d_rows, grads, n = [], [], [], 0
        for s in steps:
            mats = self.steps[s].get(name)
            if mats is None:
                continue
            mask = torch.as_tensor(self.labels[s] == group)
            n += int(mask.sum())
            a_c = torch.cat([a[mask] for a in mats.activation], 1).reshape(
                -1, mats.activation[0].shape[-1]
            )
            d_c = torch.cat([d[mask] for d in mats.adjoint], 1).reshape(
                -1, mats.adjoint[0].shape[-1]
            )
            a_rows.append(a_c)
            d_rows.append(d_c)
            grads.append(a_c.T @ d_c)
        return torch.cat(a_rows), torch.cat(d_rows), sum(grads), n  # type: ignore[return-value]

    def spectra(
        self, steps: list[int], name: str, group: int, rank: int, normalize: str = "mean"
    ) -> np.ndarray:
        """``[3, rank]`` exact float64 σ (activation, adjoint, gradient) as streamspec records them:
        NaN beyond each matrix's rank bound and for an empty group."""
        out = np.full((3, rank), np.nan)
        a, d, g, n = self.group_matrices(steps, name, group)
        if n == 0:
            return out
        rows = a.shape[0]
        bounds = (min(rows, a.shape[1]), min(rows, d.shape[1]), min(rows, a.shape[1], d.shape[1]))
        for i, (m, b) in enumerate(zip((a, d, g), bounds, strict=True)):
            s = torch.linalg.svdvals(m).cpu().numpy()
            keep = min(b, rank)
            out[i, :keep] = s[:keep]
        if normalize == "mean":
            out[:2] /= np.sqrt(n)
            out[2] /= n
        return out


def masked_loss_gradients(
    model: nn.Module,
    loss_per_sample: torch.Tensor,
    labels: torch.Tensor,
    n_groups: int,
    names: list[str] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Autograd reference: ``∇_W Σ_{i∈c} ℓ_i`` for every group ``c`` and weight ``W``.

    Singular values of these gradients (``.reshape(W.shape[0], -1)`` for conv kernels) are the
    reference for the recorded ``gradient`` kind (σ is transpose-invariant: Linear's ``∇W`` is
    ``(AᵀΔ)ᵀ``).

    Args:
        model: the model whose forward produced ``loss_per_sample``.
        loss_per_sample: ``[B]`` losses (scale them as the real loss does, e.g. by ``1/B``).
        labels: ``[B]`` group indices.
        names: parameter names (``model.named_parameters()``); default: every trainable
            parameter with two or more dims.
    """
    params = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in params.items() if p.requires_grad and p.dim() >= 2]
    weights = {n: params[n] for n in names}
    out = []
    for c in range(n_groups):
        masked = (loss_per_sample * (labels == c)).sum()
        grads = torch.autograd.grad(
            masked, list(weights.values()), retain_graph=True, allow_unused=True
        )
        out.append(
            {
                n: (g if g is not None else torch.zeros_like(w))
                for (n, w), g in zip(weights.items(), grads, strict=True)
            }
        )
    return out


def unfold_patches(
    x: torch.Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> torch.Tensor:
    """Explicit patch matrix of an N-d convolution: ``[B, positions, C·∏kernel]`` (float64).

    Built with ``Tensor.unfold`` (independent of the convolution routines), columns ordered like
    ``weight.view(out, -1)``.
    """
    dims = len(kernel)
    pad: list[int] = []
    for p in reversed(padding):
        pad += [p, p]
    x = torch.nn.functional.pad(x.to(torch.float64), pad)
    for i in range(dims):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]]
    # x: [B, C, o1..od, k1..kd] → [B, o1..od, C, k1..kd]
    b, c = x.shape[:2]
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    x = x.permute(order)
    positions = 1
    for o in x.shape[1 : 1 + dims]:
        positions *= o
    return x.reshape(b, positions, -1)


def _sample_dim(name: str, batch_dim: int | Mapping[str, int]) -> int:
    """The sample dimension of module ``name``'s inputs: the entry of its longest matching name
    prefix (written here apart from streamspec's own resolution, which the tests check)."""
    if isinstance(batch_dim, int):
        return batch_dim
    matches = [p for p in batch_dim if p == "" or name == p or name.startswith(f"{p}.")]
    return batch_dim[max(matches, key=len)] if matches else 0
