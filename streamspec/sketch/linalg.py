"""Small dense linear algebra for the sketches: device-side (torch, no host sync) and host-side.

Device side (inside a training step) does matrix products and a synchronisation-free
orthonormalisation only. Factorisations that would synchronise on a GPU (SVD, eigh, QR) run on the
host in float64 on small matrices, off the training thread.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
import torch

_EPS64 = float(np.finfo(np.float64).eps)


_PRECISION_LOCK = threading.Lock()
_precision_depth = 0  # threads inside ieee_float32 (a multi-device backward runs several)
_precision_undo: list[Callable[[], None]] = []
_precision_kinds: set[str] = set()  # the op kinds the open scope made IEEE ("matmul", "conv")


def _settings(owners: tuple[str, ...]) -> list[Any]:
    """The ``torch.backends`` objects named (``"cuda.matmul"``; ``""`` the process-wide one)
    that carry PyTorch ≥ 2.9's per-backend, per-op ``fp32_precision``; empty on older PyTorch."""
    found = []
    for owner in owners:
        obj: Any = torch.backends
        for part in owner.split(".") if owner else ():
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            found.append(obj)
    return found


# Per kind of op streamspec runs: the per-op settings it pins (module objects, looked up once,
# not on every hook call) with the backend whose "all" setting each inherits while unset
# (PyTorch's names: cuBLAS and cuDNN both under "cuda"), and the parents seen through the
# Python API. cuBLAS/oneDNN matmuls for every product; cuDNN/oneDNN convolutions only for
# convolution layers' products.
_LEAVES = {
    kind: [(obj, backend) for owner, backend in leaves for obj in _settings((owner,))]
    for kind, leaves in (
        ("matmul", (("cuda.matmul", "cuda"), ("mkldnn.matmul", "mkldnn"))),
        ("conv", (("cudnn.conv", "cuda"), ("mkldnn.conv", "mkldnn"))),
    )
}
_PARENTS = {"matmul": _settings(("", "mkldnn")), "conv": _settings(("", "cudnn", "mkldnn"))}


def _legacy_reduced(kind: str) -> bool:
    """Whether the legacy switch of ``kind`` allows reduced precision (True where PyTorch
    refuses the read, once its legacy and per-op APIs are mixed)."""
    try:
        if kind == "matmul":
            return torch.get_float32_matmul_precision() != "highest"
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return True


def _already_ieee(kind: str) -> bool:
    """Whether ``kind``'s float32 ops surely run in IEEE precision already: its legacy switch
    off, and every per-op setting and its parents "ieee" or unset. Conservative: a setting that
    might reduce precision answers False, and the switches are then flipped."""
    if _legacy_reduced(kind):
        return False
    settings = [obj for obj, _ in _LEAVES[kind]] + _PARENTS[kind]
    return all(obj.fp32_precision in ("ieee", "none") for obj in settings)


def _to_ieee(kind: str, undo: list[Callable[[], None]]) -> None:
    """Switch ``kind``'s float32 ops to IEEE, appending to ``undo`` the steps that restore them,
    in the order to run them (as each switch flips: a failure part-way leaves nothing flipped
    for good).

    The legacy switch first, through the legacy API (the per-op settings follow it, and PyTorch
    checks that the two agree); then any per-op setting still reduced (set by the user through
    the per-op or a parent setting) is pinned to ``"ieee"``. The undo restores the legacy value,
    then every per-op value as it was: the process reads back what the user set, and a setting
    that only followed its parent follows it again (see :func:`_restored`).
    """
    per_op = [(obj, _restored(obj, backend)) for obj, backend in _LEAVES[kind]]
    flipped = False
    if kind == "matmul":
        try:
            matmul = torch.get_float32_matmul_precision()
        except RuntimeError:  # PyTorch refuses the legacy read once the APIs are mixed
            matmul = None
        if matmul not in (None, "highest"):
            torch.set_float32_matmul_precision("highest")
            undo.append(functools.partial(torch.set_float32_matmul_precision, str(matmul)))
            flipped = True
    else:
        try:
            cudnn = bool(torch.backends.cudnn.allow_tf32)
        except RuntimeError:
            cudnn = False
        if cudnn:
            torch.backends.cudnn.allow_tf32 = False
            undo.append(functools.partial(setattr, torch.backends.cudnn, "allow_tf32", True))
            flipped = True
    # The legacy value first (it also sets per-op values), then every per-op value as it was;
    # without a legacy flip, only the reduced per-op settings change.
    for obj, value in per_op:
        if flipped or obj.fp32_precision != "ieee":
            undo.append(functools.partial(setattr, obj, "fp32_precision", value))
            obj.fp32_precision = "ieee"


def _restored(obj: Any, backend: str) -> str:
    """The value that restores a per-op setting: ``"none"`` (follow the parent) where it reads
    what its backend's setting says, else its own value. PyTorch's getter answers a setting's
    effective value, the parent's when it is unset: writing that value back explicitly would cut
    the setting off from later changes of its parent (``torch.backends.fp32_precision = "ieee"``
    after a watch would no longer reach the matmuls). A setting the user set explicitly to its
    parent's value follows the parent afterwards: the same value now."""
    value = str(obj.fp32_precision)
    if value == "none":
        return value
    try:
        parent = torch._C._get_fp32_precision_getter(backend, "all")
    except Exception:  # an unknown PyTorch: its own value, as before
        return value
    return "none" if parent == value else value


class ieee_float32:  # noqa: N801 - used like a function, as a context manager
    """streamspec's own float32 products in full IEEE precision, whatever the process allows the
    model (``torch.set_float32_matmul_precision("high")``, Lightning's and the HF Trainer's TF32
    switches, cuDNN's TF32 convolutions, on by default; oneDNN's bf16/TF32 on CPUs that have
    them): TF32 keeps 10 mantissa bits, which would cost the small recorded singular values
    ~1e-3·σ₁ and break ``sigma_err``.

    The switches are process-wide, so they are flipped only around streamspec's own products
    (inside its hooks, between the model's autograd nodes) and restored exactly as the user set
    them (:func:`_to_ieee`); only those of the op kinds the block runs (matmuls; convolutions
    with ``conv``), and only where they are not IEEE already: with PyTorch's defaults a matmul
    block flips nothing (flipping costs a hook ≈ 20 µs of Python on every layer and step).
    Threads of a multi-device backward share one switch: the first to enter a kind flips it, the
    last to leave restores it (in between, other threads' ops run in IEEE float32 too: slower,
    never less precise). Anything unexpected leaves the settings alone.
    """

    __slots__ = ("_kinds",)

    def __init__(self, conv: bool = True) -> None:
        self._kinds = ("matmul", "conv") if conv else ("matmul",)

    def __enter__(self) -> None:
        global _precision_depth
        with _PRECISION_LOCK:
            for kind in self._kinds:
                if kind in _precision_kinds:
                    continue  # an open scope on another thread already made it IEEE
                try:
                    if not _already_ieee(kind):
                        _to_ieee(kind, _precision_undo)
                except Exception:  # an unknown PyTorch: never break training over a setting
                    pass
                _precision_kinds.add(kind)
            _precision_depth += 1

    def __exit__(self, *exc: object) -> None:
        global _precision_depth
        with _PRECISION_LOCK:
            _precision_depth -= 1
            if _precision_depth == 0:
                undo, _precision_undo[:] = list(_precision_undo), []
                _precision_kinds.clear()
                for step in undo:
                    with contextlib.suppress(Exception):  # keep restoring the others
                        step()


def bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` for batches with the same leading dimensions, as one ``torch.bmm`` (``@`` of
    batched tensors adds view/expand dispatches around its ``bmm``: on a GPU the step's end is
    bound by such per-op host costs, not by its arithmetic)."""
    if x.dim() < 3 or x.dim() != y.dim() or x.shape[:-2] != y.shape[:-2]:
        return x @ y  # broadcasting
    if x.dim() == 3:
        return torch.bmm(x, y)
    batch = math.prod(x.shape[:-2])
    out = torch.bmm(x.reshape(batch, *x.shape[-2:]), y.reshape(batch, *y.shape[-2:]))
    return out.view(*x.shape[:-2], *out.shape[-2:])


# Split-K for long-reduction products with small outputs (the transposed row products, the
# Grams): cuBLAS runs ``XᵀY`` with a 2048-row reduction and a 768 × 80 output on a dozen of an
# H200's 132 multiprocessors; cut into chunks of ≥ 256 rows, the chunks' products run side by side
# (bench.products: 8.1 → 5.8 ms per BERT-base step for the transposed products). CPUs gain
# nothing from it (their GEMMs already use every core), so it applies on CUDA only.
SPLIT_ROWS = 256
SPLIT_MAX = 8
SPLIT_OUTPUT = 1 << 22  # outputs with more entries fill the device already


def split_count(x: torch.Tensor, y: torch.Tensor) -> int:
    """How many chunks :func:`tbmm` cuts the reduction of ``xᵀy`` into (1: no split)."""
    if x.device.type != "cuda":
        return 1
    return chunks_for(x.shape[-2], math.prod(x.shape[:-2]) * x.shape[-1] * y.shape[-1])


def chunks_for(rows: int, outputs: int) -> int:
    """Split-K chunk count for a reduction over ``rows`` with ``outputs`` entries out: the most
    (a power of two, ≤ ``SPLIT_MAX``) that divide ``rows`` into chunks of ≥ ``SPLIT_ROWS``."""
    if outputs > SPLIT_OUTPUT:
        return 1
    split = 1
    while split < SPLIT_MAX and rows % (2 * split) == 0 and rows // (2 * split) >= SPLIT_ROWS:
        split *= 2
    return split


def tbmm(x: torch.Tensor, y: torch.Tensor, split: int | None = None) -> torch.Tensor:
    """``xᵀy`` for batches ``[..., m, p]``, ``[..., m, q]`` (the same leading dimensions), with
    the ``m`` rows cut into ``split`` chunks whose products are summed (split-K; default
    :func:`split_count`). Same values up to rounding: float32 sums of 256-row chunks are, if
    anything, more accurate than one long sum."""
    split = split_count(x, y) if split is None else split
    if split <= 1:
        return bmm(x.mT, y)
    m = x.shape[-2]
    if m % split:
        raise ValueError(f"tbmm: {m} rows do not split into {split} chunks")
    xs, ys = x.unflatten(-2, (split, m // split)), y.unflatten(-2, (split, m // split))
    return bmm(xs.mT, ys).sum(dim=-3)


def _cholesky_qr(yt: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """One CholeskyQR pass on a transposed block: ``Qᵀ = L⁻¹Yᵀ`` with ``LLᵀ = YᵀY + shift·I``.

    Args:
        yt: ``[..., l, n]`` float64, the block ``Y`` transposed.
        shift: ``[..., 1, 1]`` non-negative diagonal shift that keeps the Cholesky factorisation
            defined when ``Y`` is (numerically) rank deficient.
    """
    gram = bmm(yt, yt.mT)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    lower, _ = torch.linalg.cholesky_ex(gram + shift * eye, check_errors=False)
    # Invert the small l × l factor, then one batched product: far faster than a triangular
    # solve against the n-column right-hand side.
    inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)
    return bmm(inverse, yt)


def orthonormalize(y: torch.Tensor, against: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal basis of the columns of ``y`` without a host-device synchronisation.

    Shifted CholeskyQR3 (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa 2020): a first pass
    with the shift ``11(nl + l(l+1))·u·‖Y‖²`` makes the factorisation succeed for any input, two
    plain CholeskyQR passes restore orthogonality. ``torch.linalg.qr``/``svd`` would synchronise on
    CUDA and are slow for small batched problems; ``cholesky_ex`` and triangular solves are not.
    Computed in float64 (the sketches are tall and thin, so this is cheap). Column order is kept
    (Gram–Schmidt order): the first ``j`` output columns span the first ``j`` input columns.

    With ``against`` (orthonormal columns ``Ω``), the basis is of ``(I − ΩΩᵀ)y`` and stays
    orthogonal to ``Ω``: ``y`` is projected before the first pass and the first pass's result
    again after it. Where the projected ``y`` is numerically rank deficient (a block whose
    directions ``Ω`` already holds: a layer whose rows have rank ≤ the width of ``Ω``), the
    shifted pass blows rounding noise up to unit columns, and that noise leans on ``Ω`` (an
    overlap of 0.26 measured) unless it is projected off once more: block Gram–Schmidt with
    reorthogonalisation, "twice is enough" (Giraud, Langou, Rozložník 2005).

    Everything runs on the transposed block ``Yᵀ`` (``l`` rows): products whose output has a few
    columns and many rows run 2–5× slower on CPUs than the same products transposed (measured on
    this project's machines, ``l`` = 6–9, ``n`` = 256–1024).

    Args:
        y: ``[..., n, l]`` with ``l ≤ n``; any float dtype.
        against: ``[..., n, e]`` orthonormal columns to stay orthogonal to (``y``'s dtype).

    Returns:
        ``[..., n, l]`` float64 with orthonormal columns spanning the numerical range of ``y``
        (the transpose of a contiguous ``[..., l, n]``). An all-zero ``y`` gives an all-zero
        result (a group without rows).
    """
    yt = y.mT
    if against is not None:
        yt = yt - bmm(bmm(yt, against), against.mT)
    yt = yt.to(torch.float64).contiguous()
    n, width = yt.shape[-1], yt.shape[-2]
    norm2 = (yt * yt).sum(dim=(-2, -1), keepdim=True)  # ‖Y‖_F² ≥ ‖Y‖₂²
    tiny = torch.finfo(torch.float64).tiny
    qt = _cholesky_qr(yt, 11.0 * (n * width + width * (width + 1)) * _EPS64 * norm2 + tiny)
    if against is not None:
        qt = qt.to(against.dtype)
        qt = (qt - bmm(bmm(qt, against), against.mT)).to(torch.float64)
    for _ in range(2):
        norm2 = (qt * qt).sum(dim=(-2, -1), keepdim=True)
        qt = _cholesky_qr(qt, width * _EPS64 * norm2 + tiny)
    return qt.mT


# ---------------------------------------------------------------------------------------------
# Host side: float64 numpy, small matrices.


def nystrom(omega: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a PSD matrix ``H`` from its sketch ``Y = HΩ`` (stable Nyström).

    Tropp, Yurtsever, Udell, Cevher (2017), "Fixed-rank approximation of a positive-semidefinite
    matrix from streaming data", Alg. 3: shift by ``ν``, Cholesky of ``ΩᵀY_ν``, SVD of
    ``Y_ν C⁻¹``. With ``Ω`` orthonormal and spanning ``H``'s range the result is exact.

    Args:
        omega: ``[h, l]`` the test matrix the sketch was taken with.
        y: ``[h, l]`` ``Σ HΩ`` accumulated over the epoch.

    Returns:
        ``(eigenvalues [l] descending ≥ 0, eigenvectors [h, l])`` of the approximation.
    """
    h = y.shape[0]
    nu = np.sqrt(h) * np.spacing(np.linalg.norm(y, 2)) if np.any(y) else 0.0
    y_nu = y + nu * omega
    core = omega.T @ y_nu
    core = 0.5 * (core + core.T)
    try:
        chol = scipy.linalg.cholesky(core, lower=False, check_finite=False)
    except np.linalg.LinAlgError:
        # Not positive definite beyond the shift (e.g. ν = 0 for a zero sketch): fall back to an
        # eigen-decomposition of the core restricted to its positive part.
        lam, vec = scipy.linalg.eigh(core, check_finite=False)
        keep = lam > lam.max(initial=0.0) * h * _EPS64
        if not np.any(keep):
            return np.zeros(y.shape[1]), np.zeros_like(y)
        b = y_nu @ (vec[:, keep] / np.sqrt(lam[keep]))
        u, s, _ = scipy.linalg.svd(b, full_matrices=False, check_finite=False)
        lam_out = np.zeros(y.shape[1])
        lam_out[: s.size] = np.clip(s**2 - nu, 0.0, None)
        u_out = np.zeros_like(y)
        u_out[:, : u.shape[1]] = u
        return lam_out, u_out
    b = scipy.linalg.solve_triangular(chol, y_nu.T, trans="T", lower=False, check_finite=False).T
    u, s, _ = scipy.linalg.svd(b, full_matrices=False, check_finite=False)
    return np.clip(s**2 - nu, 0.0, None), u
