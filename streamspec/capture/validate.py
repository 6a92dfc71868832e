"""What streamspec can and cannot watch in a model, said all at once."""

from __future__ import annotations

from torch import nn

from streamspec.capture.registry import family_of


def unsupported_matrices(model: nn.Module) -> list[str]:
    """Modules owning trainable weight matrices that no family watches, with the reason.

    Normalisation and bias parameters are not matrices (1-D) and are never reported.
    """
    problems: list[str] = []
    for prefix, module in model.named_modules():
        matrices = [
            n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2 and p.requires_grad
        ]
        family = family_of(module)
        where = prefix or "<root>"
        if family is None:
            if matrices:
                problems.append(
                    f"{where} ({type(module).__name__}): no streamspec layer family for its "
                    f"weight matrices {matrices}"
                )
            continue
        for reason in family.problems(module):
            problems.append(f"{where} ({type(module).__name__}): {reason}")
        if family.stepwise and module is model and matrices:
            problems.append(
                f"{where} ({type(module).__name__}): a fused module is replaced in its parent, "
                "so it cannot be the watched model itself; wrap it, e.g. nn.Sequential(module)"
            )
    return problems
