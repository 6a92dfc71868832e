"""In-place replacement of fused modules (RNN, LSTM, GRU, MultiheadAttention) by stepwise twins.

The twin shares the original's parameters (the very same ``Parameter`` objects, so optimizers and
``state_dict`` keys are untouched) and is put back in the original's place on close.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from streamspec.capture.registry import Sink, family_of


@dataclass
class Swap:
    parent: nn.Module
    name: str
    original: nn.Module
    twin: nn.Module


def swap_stepwise(model: nn.Module, sink: Sink) -> list[Swap]:
    """Replace every watchable fused module below ``model`` by its stepwise twin."""
    twins: dict[int, nn.Module] = {}
    swaps: list[Swap] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            family = family_of(child)
            if family is None or not family.stepwise or family.problems(child):
                continue
            if not any(p.requires_grad for p in child.parameters()):
                continue
            if id(child) not in twins:  # a module shared by several parents gets one twin
                twins[id(child)] = family.make_stepwise(child, sink, parent=parent, name=name)
            setattr(parent, name, twins[id(child)])
            swaps.append(Swap(parent, name, child, twins[id(child)]))
    return swaps


def restore(swaps: list[Swap]) -> None:
    """Put the originals back (in reverse order) where our twin is still in place. Where another
    monitor twinned our twin (two monitors on one model), splice ours out of that chain: the
    later twin then stands for our original, and puts it back when its monitor closes."""
    for swap in reversed(swaps):
        current = getattr(swap.parent, swap.name)
        if current is swap.twin:
            setattr(swap.parent, swap.name, _original(swap.twin, swap.original))
            continue
        node = current
        while node is not None and node is not swap.twin:
            below = node.__dict__.get(_ORIGINAL)
            if below is swap.twin:
                object.__setattr__(node, _ORIGINAL, _original(swap.twin, swap.original))
                break
            node = below
    swaps.clear()


_ORIGINAL = "_streamspec_original"  # a twin's module underneath (a twin's own attribute)


def _original(twin: nn.Module, recorded: nn.Module) -> nn.Module:
    """What a twin stands for now (spliced by :func:`restore` if another monitor closed)."""
    return twin.__dict__.get(_ORIGINAL, recorded)
