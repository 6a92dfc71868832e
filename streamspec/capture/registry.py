"""Which modules streamspec can watch, and how each family exposes its weight matrices.

Adding a layer family is one file with one decorated class (see ``linear.py``), one registry
line here (the import at the bottom of ``capture/__init__.py``), one reference test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

import torch
from torch import nn

from streamspec.errors import StreamspecError
from streamspec.sketch.operators import DenseRows, RowOperator

if TYPE_CHECKING:
    from streamspec.capture.groups import GroupPlan


@dataclass(frozen=True)
class Site:
    """One watched weight matrix.

    Attributes:
        name: the weight's name in ``model.named_parameters()``, e.g. ``encoder.0.fc1.weight``.
        module: the module that owns it.
        key: the family's name for this matrix within the module (``"weight"`` for Linear).
        h_in: columns of the activation rows ``A``.
        h_out: columns of the adjoint rows ``Δ``.
    """

    name: str
    module: nn.Module
    key: str
    h_in: int
    h_out: int


class RowSource(Protocol):
    """A module call's activation rows, before they are split by group."""

    @property
    def batch_size(self) -> int:
        """Samples in the call (must match the labels)."""
        ...

    @property
    def positions(self) -> int:
        """Rows per sample (1 for ``[B, h]`` inputs, ``T`` for sequences, output positions…)."""
        ...

    def gather(self, plan: GroupPlan) -> RowOperator:
        """The groups' rows as a ``[C, n_max·positions, h_in]`` operator (zero-padded)."""
        ...


class DenseSource:
    """Explicit ``[B, T, h]`` samples-first rows."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    @property
    def batch_size(self) -> int:
        return int(self.rows.shape[0])

    @property
    def positions(self) -> int:
        return int(self.rows.shape[1])

    def gather(self, plan: GroupPlan) -> RowOperator:
        return DenseRows(plan.gather(self.rows))


@dataclass
class Capture:
    """What one forward call of a module yields for one of its sites.

    Attributes:
        key: the site's key within the module.
        activation: the call's activation rows (detached), samples first.
        output: the tensor whose gradient is the adjoint (a hook is registered on it).
        adjoint: maps that gradient to ``[B, positions, h_out]`` adjoint rows, samples first, in
            the row order of ``activation``.
    """

    key: str
    activation: RowSource
    output: torch.Tensor
    adjoint: Callable[[torch.Tensor], torch.Tensor]


Sink = Callable[[nn.Module, list[Capture]], None]
"""Where a stepwise twin sends its captures. A sink may also have a ``recording()`` method
saying whether the current step is recorded (without one, every step is); a twin may skip its
stepwise products on steps no sink records."""


def report(
    twin: nn.Module, sinks: list[tuple[Sink, nn.Module | None]], captures: list[Capture]
) -> None:
    """Hand a stepwise twin's captures to each of its sinks, as the module the sink was
    registered for (None: the twin itself; a twin of another monitor's twin reports as that
    one). An ``nn.DataParallel`` replica shares the twin's list: it reports itself, which no
    monitor watches (else a monitor took the replica's calls for its twin's)."""
    replica = twin.__dict__.get("_is_replica", False)
    for sink, module in sinks:
        sink(twin if module is None or replica else module, captures)


class Family(Protocol):
    """A layer family: one per file under ``capture/``.

    Plain families are hooked: a forward hook calls :meth:`capture` on every call. Families of
    fused modules whose products no hook can see (``stepwise = True``) instead replace the module,
    in place, by an equivalent that runs the products one by one on the very same Parameter
    objects and hands its captures to the monitor's sink; the original is put back on close.
    """

    module_types: ClassVar[tuple[type[nn.Module], ...]]
    stepwise: ClassVar[bool]

    @staticmethod
    def sites(module: nn.Module, prefix: str) -> list[Site]:
        """The module's watchable weight matrices (frozen ones left out)."""
        ...

    @staticmethod
    def capture(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, batch_dim: int
    ) -> list[Capture]:
        """Activation rows and adjoint mapping of one forward call (hooked families)."""
        ...

    @staticmethod
    def problems(module: nn.Module) -> list[str]:
        """Why this module cannot be watched (empty when it can)."""
        ...

    @staticmethod
    def make_stepwise(module: nn.Module, sink: Sink, *, parent: nn.Module, name: str) -> nn.Module:
        """An equivalent module sharing ``module``'s parameters that reports to ``sink``.

        ``parent``/``name``: where the module sits (first place found), e.g. to tell a
        Transformer layer's self-attention from its cross-attention.
        """
        ...


_FAMILIES: dict[type[nn.Module], type[Family]] = {}


F = TypeVar("F", bound=type)


def register(family: F) -> F:
    """Class decorator: make ``family`` (a :class:`Family`) the handler of its ``module_types``."""
    for module_type in family.module_types:  # type: ignore[attr-defined]
        _FAMILIES[module_type] = family
    return family


def family_of(module: nn.Module) -> type[Family] | None:
    """The family handling ``type(module)``, looked up along its MRO; None if unsupported."""
    for cls in type(module).__mro__:
        family = _FAMILIES.get(cls)
        if family is not None:
            return family
    return None


def qualified(prefix: str, key: str) -> str:
    """A parameter's name in ``model.named_parameters()``: ``prefix.key`` (root: ``key``)."""
    return f"{prefix}.{key}" if prefix else key


def weight_site(module: nn.Module, prefix: str, h_in: int, h_out: int) -> list[Site]:
    """The single ``weight`` matrix of a module as a site, or none when it is frozen."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if not weight.requires_grad:
        return []
    return [Site(qualified(prefix, "weight"), module, "weight", h_in, h_out)]


BatchDim = int | tuple[tuple[str, int], ...]  # one dim, or (module-name prefix, dim) pairs
"""``watch(batch_dim=)`` validated: an int, or a mapping's items (see :func:`as_batch_dim`)."""


def as_batch_dim(batch_dim: object) -> BatchDim:
    """Validate ``watch(batch_dim=)``: an int (every layer), or a mapping from module names
    (``model.named_modules()``; ``""`` the whole model) to the sample dimension of the inputs of
    the modules under them, for a model mixing layouts (a sequence-first encoder under a
    batch-first head). A module takes the entry of its longest matching name prefix, 0 without
    one."""
    if isinstance(batch_dim, Mapping):
        items = tuple(batch_dim.items())
        for name, dim in items:
            if not isinstance(name, str) or isinstance(dim, bool) or not isinstance(dim, int):
                raise StreamspecError.build(
                    "batch_dim as a mapping of module names to integers",
                    f"the entry {name!r}: {dim!r}",
                    "pass e.g. batch_dim={'encoder': 1} (the modules under model.encoder take "
                    "dim 1, the others 0)",
                )
        return tuple(sorted(items))
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
        raise StreamspecError.build(
            "batch_dim as an integer, or a mapping of module names to integers",
            repr(batch_dim),
            "pass 0 (batch first), 1 (sequence first), or e.g. {'encoder': 1} for a model "
            "mixing the two",
        )
    return batch_dim


def batch_dim_of(name: str, batch_dim: BatchDim) -> int:
    """The sample dimension of the inputs of the module named ``name`` (see
    :func:`as_batch_dim`): the entry of its longest matching dotted name prefix, else 0."""
    if isinstance(batch_dim, int):
        return batch_dim
    best, dim = -1, 0
    for prefix, value in batch_dim:
        if (not prefix or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, dim = len(prefix), value
    return dim


def check_batch_dim_names(batch_dim: BatchDim, names: set[str]) -> None:
    """Refuse a ``batch_dim`` mapping entry naming no module of the model (a typo would
    otherwise silently leave its modules at dim 0)."""
    if isinstance(batch_dim, int):
        return
    unknown = [prefix for prefix, _ in batch_dim if prefix and prefix not in names]
    if unknown:
        raise StreamspecError.build(
            "batch_dim keys that name modules of the model (as in model.named_modules())",
            f"{unknown} (no such module)",
            "use a module's name, e.g. 'encoder' for model.encoder, or '' for the whole model",
        )


def check_batched(x: torch.Tensor, batch_dim: int, what: str) -> None:
    """Raise unless ``x`` has a sample dimension ``batch_dim`` other than its last (feature) dim."""
    if x.dim() < 2 or not (-x.dim() <= batch_dim < x.dim()) or batch_dim % x.dim() == x.dim() - 1:
        raise StreamspecError.build(
            f"a batched input to {what} with samples on batch_dim={batch_dim}",
            f"an input of shape {tuple(x.shape)}",
            "pass batched inputs, or set watch(..., batch_dim=) to the sample dimension",
        )


def samples_first(x: torch.Tensor, batch_dim: int, width: int) -> torch.Tensor:
    """``[..., width]`` with samples on ``batch_dim`` → ``[B, T, width]`` (a view when possible)."""
    return x.movedim(batch_dim, 0).reshape(x.shape[batch_dim], -1, width)
