"""Host-side spectra of a step's sketches, batched over layers and groups (float64 numpy).

One batched ``eigh``/``svd`` call per sketch shape for a whole step, not one small LAPACK call per
layer and group: on a few cores the host thread competes with training, so its Python and LAPACK
call count matter more than its flops.
"""

from __future__ import annotations

import numpy as np

_TINY = np.finfo(np.float64).tiny
_ROUNDING = 16 * float(np.finfo(np.float32).eps)  # relative rounding of float32 sketches


def _cholesky(gram: np.ndarray, rtol: float) -> np.ndarray:
    """Batched lower Cholesky factor of ``gram + ν·I``, ``ν = rtol·tr(gram)/b``: defined for
    singular (e.g. zero-padded group) Grams, and several times cheaper than ``eigh``."""
    b = gram.shape[-1]
    sym = 0.5 * (gram + np.swapaxes(gram, -1, -2))
    shift = rtol * np.trace(sym, axis1=-2, axis2=-1) / b + _TINY
    return np.linalg.cholesky(sym + shift[..., None, None] * np.eye(b))


def _root(gram: np.ndarray, rtol: float) -> np.ndarray:
    """``R`` with ``RᵀR ≈ gram`` (the transposed Cholesky factor of the shifted Gram)."""
    return np.swapaxes(_cholesky(gram, rtol), -1, -2)


def _descending(values: np.ndarray) -> np.ndarray:
    return -np.sort(-values, axis=-1)


def nystrom_values(core: np.ndarray, gram: np.ndarray, rtol: float = 1e-7) -> np.ndarray:
    """Batched Nyström eigenvalues of PSD ``H`` from ``core = BᵀHB``, ``gram = (HB)ᵀ(HB)``.

    ``[N, b, b]`` each → ``[N, b]`` descending: the eigenvalues of ``L⁻¹ N L⁻ᵀ`` with
    ``LLᵀ = M + νI`` (``M = core``, ``N = gram``; the small shift ``ν`` keeps the factorisation
    defined when ``M`` is singular and only lowers the values). The approximation is ⪯ ``H``, so
    every value is a lower bound of the true one.
    """
    # numpy's gufuncs release the GIL; scipy's per-matrix ``trtri`` is ≈ 2× faster here but
    # holds it (≈ 5 ms per BERT-base step, stalling the training thread's Python).
    inv = np.linalg.inv(_cholesky(core, rtol))
    inner = inv @ gram @ np.swapaxes(inv, -1, -2)
    values = np.linalg.eigvalsh(0.5 * (inner + np.swapaxes(inner, -1, -2)))
    return _descending(np.clip(values, 0.0, None))


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
    values = np.linalg.eigvalsh(0.5 * (small + np.swapaxes(small, -1, -2)))
    return _descending(np.sqrt(np.clip(values, 0.0, None)))


def sketched_spectra(t: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Spectra and error estimates of ``N`` (layer, group) sketches of one shape.

    Args:
        t: the ``StepSketch`` tensors stacked over a leading ``N``.

    Returns:
        ``([σ_A, σ_Δ, σ_G], [err_A, err_Δ, err_G])``, each ``[N, r]`` descending. Activation and
        adjoint errors are rigorous up to float32 rounding, which they include (Nyström values
        are lower bounds and ``λ_j − λ̂_j ≤ tr(H) − Σλ̂``); the gradient's is the gap between the
        generalized Nyström estimate and the projection lower bound (an estimate).
    """
    spectra, errors = [], []
    for kind in ("a", "d"):
        lam = nystrom_values(t[f"core_{kind}"], t[f"gram_{kind}"])
        residual = np.clip(t[f"norm_{kind}"] - lam.sum(axis=-1), 0.0, None)[:, None]
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
    # The blocks are orthonormal, so the core's singular values are the projection lower bound
    # σ(B_inᵀGB_out) ≤ σ(G); its SVD also gives the generalized Nyström pseudo-inverse.
    core = t["core_g"]
    transposed = core.shape[-1] > core.shape[-2]  # factor the smaller side
    factors = core_factors(np.swapaxes(core, -1, -2) if transposed else core)
    lower = factors[0]
    if transposed:  # σ(Y C⁺ X) = σ(Xᵀ (Cᵀ)⁺ Yᵀ)
        gn = generalized_nystrom_values(
            t["gram_x"], t["gram_y"], np.swapaxes(core, -1, -2), factors=factors
        )
    else:
        gn = generalized_nystrom_values(t["gram_y"], t["gram_x"], core, factors=factors)
    width = min(gn.shape[-1], lower.shape[-1])
    gap = np.abs(gn[..., :width] - lower[..., :width])
    spectra.append(gn[..., :width])
    errors.append(gap)
    return spectra, errors
