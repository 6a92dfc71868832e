"""Host-side spectra of a step's sketches, batched over layers and groups (float64 numpy).

One batched ``eigh``/``svd`` call per sketch shape for a whole step, not one small LAPACK call per
layer and group: on a few cores the host thread competes with training, so its Python and LAPACK
call count matter more than its flops. Only numpy's gufuncs and ``matmul`` are used: they release
the GIL (scipy's per-matrix LAPACK wrappers hold it, stalling the training thread's Python).
"""

from __future__ import annotations

import numpy as np

_TINY = np.finfo(np.float64).tiny
_ROUNDING = 16 * float(np.finfo(np.float32).eps)  # relative rounding of float32 sketches
# A core whose ``CᵀC`` has ``λ_min > _WELL_POSED·λ_max`` (``σ_min > 1e-4·σ₁``: far from the
# pseudo-inverse's ``rtol`` cut-off) takes the Cholesky pseudo-inverse; the others the
# eigendecomposition, which truncates.
_WELL_POSED = 1e-8
# Shift of the per-step Nyström cores, relative to the sketch's Frobenius norm (≥ ‖Y‖₂): well
# above the rounding of a float32 sketch (Tropp et al. 2017 take √h·eps(‖Y‖₂)), well below the
# values recorded; removed from the values again (see :func:`nystrom_values`).
_NYSTROM_SHIFT = 1e-6
_DEFINITE = 1e-12  # relative shift that keeps a computed Gram's Cholesky factorisation defined
_TRI_BLOCK = 8  # diagonal block of :func:`_tril_inverse`


# numpy's gufuncs release the GIL only for problems larger than this: outer iterations times the
# output's core size (``b`` for ``eigvalsh`` of ``b × b`` matrices). Below it a batched
# ``eigvalsh`` holds the GIL for its whole LAPACK run, and every op of the training thread (which
# drops the GIL around each op) then waits for it: measured 700–2000× slower small torch ops
# while such calls ran beside them, against 1.1× once a batch passes the threshold.
GIL_THRESHOLD = 500


def eigvalsh(x: np.ndarray) -> np.ndarray:
    """``np.linalg.eigvalsh`` of a batch ``[N, b, b]`` (ascending) with the GIL released.

    A batch at or below numpy's threshold either goes through ``eigh`` (whose eigenvector output
    is large enough to release the GIL; ≈ 1.5–3× the cost per matrix) or is padded with identity
    matrices past the threshold (each costs LAPACK as much as a real one), whichever does less
    work: ``eigh`` for a few matrices, padding for many small ones.
    """
    if (
        x.ndim != 3
        or x.shape[0] * x.shape[-1] > GIL_THRESHOLD
        or not x.shape[-1]
        or np.iscomplexobj(x)
    ):
        return np.linalg.eigvalsh(x)
    n, b = x.shape[0], x.shape[-1]
    if 3 * n < GIL_THRESHOLD // b + 1:
        return np.linalg.eigh(x)[0]
    return np.linalg.eigvalsh(_padded(x, b, np.eye(b, dtype=x.dtype)))[:n]


def svdvals(x: np.ndarray) -> np.ndarray:
    """Singular values (descending) of a batch ``[N, m, n]`` with the GIL released: a batch at
    or below numpy's threshold (``N·min(m, n)`` values) goes through :func:`_thin_svd`, whose
    vectors count too (≈ 2× the cost of the values alone)."""
    if x.ndim != 3 or x.shape[0] * min(x.shape[-2:]) > GIL_THRESHOLD or not min(x.shape[-2:]):
        return np.linalg.svd(x, compute_uv=False)
    return _thin_svd(x)[1]


def _thin_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(U, S)`` of the thin SVD of a batch ``[N, m, n]``, padded with zero matrices past
    numpy's GIL threshold where the batch's outputs are too small to release it (thin matrices,
    e.g. a 1-wide head)."""
    n, (rows, cols) = x.shape[0], x.shape[-2:]
    k = min(rows, cols)
    per = rows * k + k + k * cols  # the outputs' core sizes per matrix
    if not k or n * per > GIL_THRESHOLD:
        u, values, _ = np.linalg.svd(x, full_matrices=False)
        return u, values
    u, values, _ = np.linalg.svd(_padded(x, per, 0.0), full_matrices=False)
    return u[:n], values[:n]


def _padded(x: np.ndarray, per: int, fill: np.ndarray | float) -> np.ndarray:
    """The batch ``x`` followed by ``fill`` matrices, past numpy's GIL threshold for a call whose
    outputs' core size is ``per`` per matrix (numpy releases the GIL only for larger calls)."""
    padded = np.empty((GIL_THRESHOLD // per + 1, *x.shape[1:]), dtype=x.dtype)
    padded[: x.shape[0]] = x
    padded[x.shape[0] :] = fill
    return padded


def exact_spectra(
    activation: np.ndarray, adjoint: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact singular values of ``A``, ``Δ`` and ``AᵀΔ`` of a batch of row blocks, from the rows.

    Three batched, GIL-releasing SVDs for the whole batch (every exact-route layer of one shape
    and all its groups), never a call per layer and group. With fewer rows ``m`` than the
    widths: ``A = U S Vᵀ`` (thin), then ``σ(AᵀΔ) = σ(S Uᵀ Δ)``, an ``m × h_out`` problem (``V``
    has orthonormal columns), never forming ``AᵀΔ``; otherwise ``σ(AᵀΔ)`` of ``AᵀΔ`` itself.
    Zero rows (a group's padding) change no singular value but add zeros at the end.

    Args:
        activation: ``[N, m, h_in]`` rows (float32 or float64; computed in float64).
        adjoint: ``[N, m, h_out]`` the matching adjoint rows.

    Returns:
        Descending float64 ``σ(A)`` ``[N, min(m, h_in)]``, ``σ(Δ)`` ``[N, min(m, h_out)]`` and
        ``σ(AᵀΔ)`` ``[N, min(m, h_in, h_out)]``.
    """
    a = np.asarray(activation, dtype=np.float64)
    d = np.asarray(adjoint, dtype=np.float64)
    m, h_in, h_out = a.shape[-2], a.shape[-1], d.shape[-1]
    sd = svdvals(d)
    if m >= min(h_in, h_out):  # (exact_rows raised) more rows than a width: AᵀΔ is no larger
        sa = svdvals(a)
        sg = svdvals(np.swapaxes(a, -1, -2) @ d)
    else:
        u, sa = _thin_svd(a)
        sg = svdvals((sa[..., :, None] * np.swapaxes(u, -1, -2)) @ d)  # S Uᵀ Δ [N, m, h_out]
    return sa, sd, sg[..., : min(m, h_in, h_out)]


def _shifted(gram: np.ndarray, rtol: float) -> np.ndarray:
    """``sym(gram) + ν·I``, ``ν = rtol·tr(gram)/b + tiny`` (a new array)."""
    b = gram.shape[-1]
    out = gram + np.swapaxes(gram, -1, -2)
    out *= 0.5
    diagonal = np.einsum("...ii->...i", out)  # a writeable view
    diagonal += (rtol * np.trace(out, axis1=-2, axis2=-1) / b + _TINY)[..., None]
    return out


def _cholesky(gram: np.ndarray, rtol: float) -> np.ndarray:
    """Batched lower Cholesky factor of ``gram + ν·I``, ``ν = rtol·tr(gram)/b``: defined for
    singular (e.g. zero-padded group) Grams, and several times cheaper than ``eigh``."""
    return np.linalg.cholesky(_shifted(gram, rtol))


def _root(gram: np.ndarray, rtol: float) -> np.ndarray:
    """``R`` with ``RᵀR ≈ gram`` (the transposed Cholesky factor of the shifted Gram)."""
    return np.swapaxes(_cholesky(gram, rtol), -1, -2)


def _descending(values: np.ndarray) -> np.ndarray:
    return -np.sort(-values, axis=-1)


def _tril_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a batch of nonsingular lower-triangular matrices.

    Blocked forward substitution: one batched ``inv`` of the ``8 × 8`` diagonal blocks (and one
    of a smaller last block), then one block row at a time by ``matmul`` (numpy offers no batched
    triangular inverse; ``np.linalg.inv`` is an LU solve blind to the triangle, ≈ 4× slower at
    ``n = 48``).

    Args:
        lower: ``[..., n, n]`` lower-triangular factors (e.g. Cholesky's).

    Returns:
        ``[..., n, n]`` their inverses (lower-triangular).
    """
    n = lower.shape[-1]
    bs = _TRI_BLOCK
    if n <= bs:
        return np.linalg.inv(lower)
    nb, rest = divmod(n, bs)
    whole = nb * bs
    idx = np.arange(nb)
    square = lower[..., :whole, :whole].reshape(*lower.shape[:-2], nb, bs, nb, bs)
    diag = list(np.linalg.inv(square[..., idx, :, idx, :]))  # nb × [..., bs, bs]
    if rest:
        diag.append(np.linalg.inv(lower[..., whole:, whole:]))
    out = np.zeros_like(lower)
    out[..., :bs, :bs] = diag[0]
    for i in range(1, len(diag)):
        start, stop = i * bs, min((i + 1) * bs, n)
        block = out[..., start:stop, :start]
        np.matmul(diag[i], lower[..., start:stop, :start] @ out[..., :start, :start], out=block)
        np.negative(block, out=block)
        out[..., start:stop, start:stop] = diag[i]
    return out


def nystrom_values(core: np.ndarray, gram: np.ndarray, shift: float = _NYSTROM_SHIFT) -> np.ndarray:
    """The values of :func:`nystrom_spectra` (see there)."""
    return nystrom_spectra(core, gram, shift)[0]


def nystrom_spectra(
    core: np.ndarray, gram: np.ndarray, shift: float = _NYSTROM_SHIFT
) -> tuple[np.ndarray, np.ndarray]:
    """Batched Nyström eigenvalues of PSD ``H`` from a float32 sketch ``Y = HB`` (``B``
    orthonormal): ``core = BᵀY``, ``gram = YᵀY``, ``[N, b, b]`` each → ``[N, b]`` descending.

    The stable Nyström of Tropp, Yurtsever, Udell & Cevher (2017, Alg. 3), in Gram form: with
    ``Y_ν = Y + νB``, ``M_ν = BᵀY_ν = sym(core) + νI`` and ``Y_νᵀY_ν = gram + 2ν·sym(core) + ν²I``,
    the values are the eigenvalues of ``L⁻¹ Y_νᵀY_ν L⁻ᵀ`` (``LLᵀ = M_ν``) minus ``ν``, clipped at 0:
    those of ``Y_ν M_ν⁻¹ Y_νᵀ − νI ⪯ H``, so each is a lower bound of the true one (up to the
    float32 rounding of the sketch, ≈ 1e-7·λ₁ absolute, which ``sigma_err`` includes: values far
    below it, σ ≲ 1e-3·σ₁, can come out above the true ones), exact when ``B`` spans ``H``'s
    range. ``ν = shift·‖Y‖_F`` lifts the core past the rounding of the float32
    sketch it is read from (which can leave it indefinite); a core still not definite (a
    sketch far noisier than float32 rounding) takes the eigendecomposition, dropping its
    non-positive directions.

    Returns:
        The values ``[N, b]``, and ``[N]`` the trace of the approximation (``Σ`` of the values
        before clipping: ``tr(H)`` minus it bounds every value's error, see
        :func:`sketched_spectra`).
    """
    sym = 0.5 * (core + np.swapaxes(core, -1, -2))
    b = core.shape[-1]
    nu = shift * np.sqrt(np.clip(np.trace(gram, axis1=-2, axis2=-1), 0.0, None)) + _TINY  # [N]
    eye = np.eye(b)
    lifted = sym + nu[..., None, None] * eye
    gram_nu = gram + (2 * nu)[..., None, None] * sym + (nu * nu)[..., None, None] * eye
    try:
        inv = _tril_inverse(np.linalg.cholesky(lifted))
    except np.linalg.LinAlgError:
        lam, vec = np.linalg.eigh(lifted)
        keep = lam > np.finfo(np.float64).eps * b * np.abs(lam).max(axis=-1, keepdims=True)
        scale = np.where(keep, 1.0 / np.sqrt(np.where(keep, lam, 1.0)), 0.0)
        inv = np.swapaxes(vec * scale[..., None, :], -1, -2)  # the batch: rare, not the fast path
    inner = (inv @ gram_nu) @ np.ascontiguousarray(np.swapaxes(inv, -1, -2))
    inner += np.swapaxes(inner, -1, -2)
    inner *= 0.5
    values = eigvalsh(inner)[..., ::-1] - nu[..., None]
    return np.clip(values, 0.0, None), values.sum(axis=-1)


def core_factors(core: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values (descending) and right singular vectors of a batch of cores ``C``
    ``[N, b_in, b_out]`` (``b_out ≤ b_in``), from ``eigh(CᵀC)``: several times cheaper than an SVD
    on these small batched matrices, and exact enough for values above ``√ε·σ₁``, the only ones
    the pseudo-inverse keeps."""
    values, vectors = np.linalg.eigh(np.swapaxes(core, -1, -2) @ core)
    return np.sqrt(np.clip(values[..., ::-1], 0.0, None)), vectors[..., ::-1]


def generalized_nystrom_values(
    gram_range: np.ndarray,
    gram_corange: np.ndarray,
    core: np.ndarray,
    rtol: float = 1e-6,
    factors: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Batched ``σ(Y C⁺ X)`` from ``YᵀY``, ``XXᵀ`` and ``C`` (Nakatsukasa 2020).

    ``C⁺ = V S⁻² Vᵀ Cᵀ`` (truncated at ``rtol·σ₁``) from :func:`core_factors`; the values are
    the square roots of the eigenvalues of ``M Mᵀ``, ``M = R_Y C⁺ R_Xᵀ`` (the smaller side)."""
    r_y = _root(gram_range, rtol**2)  # [N, b_out, b_out]: R_YᵀR_Y = YᵀY
    r_x = _root(gram_corange, rtol**2)  # [N, b_in, b_in]:  R_XᵀR_X = XXᵀ
    s, v = core_factors(core) if factors is None else factors
    top = np.maximum(s[..., :1], _TINY)
    inv2 = np.where(s > rtol * top, 1.0 / np.where(s > 0, s, 1.0) ** 2, 0.0)
    pinv = (v * inv2[..., None, :]) @ np.swapaxes(v, -1, -2) @ np.swapaxes(core, -1, -2)
    m = r_y @ pinv @ np.swapaxes(r_x, -1, -2)  # [N, b_out, b_in]
    small = m @ np.swapaxes(m, -1, -2) if m.shape[-2] <= m.shape[-1] else np.swapaxes(m, -1, -2) @ m
    values = eigvalsh(0.5 * (small + np.swapaxes(small, -1, -2)))
    return _descending(np.sqrt(np.clip(values, 0.0, None)))


def _gradient_spectra(
    gram_range: np.ndarray, gram_corange: np.ndarray, core: np.ndarray, rtol: float = 1e-6
) -> np.ndarray:
    """Generalized Nyström estimate ``σ(Y C⁺ X)``: what :func:`generalized_nystrom_values`
    gives, without eigenvectors where the pseudo-inverse truncates nothing.

    A core far from the cut-off (``σ_min² > 1e-8·σ₁²``, ``σ_min > 1e-4·σ₁`` against the cut-off's
    ``rtol·σ₁``) gets ``C⁺ = K⁻ᵀK⁻¹Cᵀ`` from the Cholesky factor ``KKᵀ = CᵀC`` (the same matrix,
    within ``ε·cond(C)²``: ≲ 1e-10 relative); the others (rank-deficient, zero, ill-conditioned)
    take the truncating eigendecomposition, and so does a call with non-finite input (its LAPACK
    errors unchanged). Which cores are far from it is decided without an eigenvalue call: a
    shifted Cholesky factor's smallest squared pivot (≥ ``λ_min(CᵀC)``) sends the cores surely
    near the cut-off to the truncating route, and ``1/‖K⁻¹‖_F² ≤ λ_min`` against
    ``tr(CᵀC) ≥ λ_max`` keeps on the fast one only the cores surely far from it (a core between
    the two tests, ``σ_min/σ₁`` within a factor ``b`` of ``1e-4``, takes the truncating route:
    the same values at a higher cost).

    Args:
        gram_range: ``[N, b_out, b_out]`` ``YᵀY``.
        gram_corange: ``[N, b_in, b_in]`` ``XXᵀ``.
        core: ``[N, b_in, b_out]`` ``C`` (``b_out ≤ b_in``).
        rtol: the pseudo-inverse's relative cut-off.

    Returns:
        ``σ(Y C⁺ X)``, ``[N, b_out]`` descending.
    """
    core_t = np.ascontiguousarray(np.swapaxes(core, -1, -2))  # [N, b_out, b_in]
    cross = core_t @ core  # [N, b_out, b_out]
    with np.errstate(over="ignore", invalid="ignore"):
        total = cross.sum() + gram_range.sum() + gram_corange.sum()
    if not np.isfinite(total):  # non-finite input (or overflow): the general route, its errors
        return _truncating(gram_range, gram_corange, core, rtol)
    b = cross.shape[-1]
    diagonal = np.einsum("...ii->...i", cross)
    shift = _DEFINITE * diagonal.sum(axis=-1) + _TINY
    pivots = np.einsum("...ii->...i", np.linalg.cholesky(_shifted(cross, _DEFINITE * b))) ** 2
    # λ_min(CᵀC) ≤ min pivot − shift, λ_max ≥ max diagonal: the cores that may be far from it
    fast = pivots.min(axis=-1) - shift > _WELL_POSED * diagonal.max(axis=-1)
    if not fast.any():
        return _truncating(gram_range, gram_corange, core, rtol)
    candidates = np.flatnonzero(fast)
    try:
        inv = _tril_inverse(np.linalg.cholesky(cross[candidates]))
    except np.linalg.LinAlgError:  # a candidate not definite after all (rounding): all general
        return _truncating(gram_range, gram_corange, core, rtol)
    # λ_min ≥ 1/‖K⁻¹‖_F², λ_max ≤ tr(CᵀC): the cores surely far from the cut-off
    sure = 1.0 / np.square(inv).sum(axis=(-2, -1)) > _WELL_POSED * diagonal[candidates].sum(-1)
    if not sure.any():
        return _truncating(gram_range, gram_corange, core, rtol)
    fast[candidates[~sure]] = False
    inv = inv[sure]
    part = fast if not fast.all() else slice(None)
    gn = np.empty(core.shape[:-2] + (b,))
    # M = R_Y C⁺ R_Xᵀ with C⁺ = K⁻ᵀK⁻¹Cᵀ: M Mᵀ = T X̃ Tᵀ with T = R_Y C⁺ and X̃ = R_XᵀR_X the
    # shifted XXᵀ itself (its asymmetric rounding drops out of the symmetrised product)
    r_y = _root(gram_range[part], rtol**2)  # [n, b_out, b_out]: R_YᵀR_Y = YᵀY
    t = (r_y @ np.swapaxes(inv, -1, -2)) @ (inv @ core_t[part])  # [n, b_out, b_in]
    x = _shifted(gram_corange[part], rtol**2)
    small = (t @ x) @ np.ascontiguousarray(np.swapaxes(t, -1, -2))
    small += np.swapaxes(small, -1, -2)
    small *= 0.5
    values = eigvalsh(small)  # ascending
    gn[part] = np.sqrt(np.clip(values[..., ::-1], 0.0, None))
    if not fast.all():
        slow = ~fast
        gn[slow] = _truncating(gram_range[slow], gram_corange[slow], core[slow], rtol)
    return gn


def _truncating(
    gram_range: np.ndarray, gram_corange: np.ndarray, core: np.ndarray, rtol: float
) -> np.ndarray:
    """:func:`_gradient_spectra` through the truncating eigendecomposition of the cores."""
    return generalized_nystrom_values(gram_range, gram_corange, core, rtol)


def sketched_spectra(t: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Spectra and error estimates of ``N`` (layer, group) sketches of one shape.

    Args:
        t: the ``StepSketch`` tensors stacked over a leading ``N``.

    Returns:
        ``([σ_A, σ_Δ, σ_G], [err_A, err_Δ, err_G])``, each ``[N, r]`` descending. Activation and
        adjoint errors are rigorous up to float32 rounding, which they include (Nyström values
        are lower bounds and ``λ_j − λ̂_j ≤ tr(H) − Σλ̂``); the gradient's is the gap between the
        generalized Nyström estimate and the better of two lower bounds, σ(GB_out) and
        σ(B_inᵀG), plus the same rounding (an estimate).
    """
    spectra, errors = [], []
    for kind in ("a", "d"):
        lam, trace = nystrom_spectra(t[f"core_{kind}"], t[f"gram_{kind}"])
        residual = np.clip(t[f"norm_{kind}"] - trace, 0.0, None)[:, None]
        # The sketches are float32: eigenvalues carry an absolute rounding error ≈ ε₃₂·λ₁,
        # which dominates for the smallest recorded values (both directions).
        rounding = _ROUNDING * lam[:, :1]
        sigma = np.sqrt(lam)
        spectra.append(sigma)
        errors.append(
            np.maximum(
                np.sqrt(lam + residual + rounding) - sigma,
                sigma - np.sqrt(np.clip(lam - rounding, 0.0, None)),
            )
        )
    # The generalized Nyström estimate of the blocks' core C = B_inᵀGB_out.
    core = t["core_g"]
    if core.shape[-1] > core.shape[-2]:  # factor the smaller side: σ(Y C⁺ X) = σ(Xᵀ (Cᵀ)⁺ Yᵀ)
        gn = _gradient_spectra(t["gram_x"], t["gram_y"], np.swapaxes(core, -1, -2))
    else:
        gn = _gradient_spectra(t["gram_y"], t["gram_x"], core)
    # The blocks are orthonormal, so the range and co-range sketches bound σ(G) from below:
    # σ(GB_out), σ(B_inᵀG) ≤ σ(G) (and both ≥ σ(C), the projection bound they contain). The
    # estimate is kept at or above the better bound, and its error is its distance to it.
    range_bound, corange_bound = singular_values(t["gram_y"]), singular_values(t["gram_x"])
    width = min(gn.shape[-1], range_bound.shape[-1], corange_bound.shape[-1])
    bound = np.maximum(range_bound[..., :width], corange_bound[..., :width])
    estimate = np.maximum(gn[..., :width], bound)
    spectra.append(estimate)
    # … plus the float32 sketches' rounding, as for the other kinds: where the estimate and the
    # bound agree, their gap (0) understated the error of σ(G) itself (≈ 1e-7·σ₁; cells of a
    # conv layer's gradient went uncovered for that alone).
    errors.append(np.abs(gn[..., :width] - bound) + _ROUNDING * estimate[..., :1])
    return spectra, errors


def singular_values(gram: np.ndarray) -> np.ndarray:
    """Descending ``σ(M)`` of a batch from its Grams ``MᵀM`` (or ``MMᵀ``) ``[N, b, b]``, one
    GIL-releasing eigenvalue call for the batch."""
    return np.sqrt(np.clip(eigvalsh(0.5 * (gram + np.swapaxes(gram, -1, -2))), 0.0, None))[
        ..., ::-1
    ]
