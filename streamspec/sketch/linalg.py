"""Small dense linear algebra for the sketches: device-side (torch, no host sync) and host-side.

Device side (inside a training step) does matrix products and a synchronisation-free
orthonormalisation only. Factorisations that would synchronise on a GPU (SVD, eigh, QR) run on the
host in float64 on small matrices, off the training thread.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

_EPS64 = float(np.finfo(np.float64).eps)


def _cholesky_qr(y: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """One CholeskyQR pass: ``Q = Y R⁻¹`` with ``RᵀR = YᵀY + shift·I``.

    Args:
        y: ``[..., n, l]`` float64.
        shift: ``[..., 1, 1]`` non-negative diagonal shift that keeps the Cholesky factorisation
            defined when ``Y`` is (numerically) rank deficient.
    """
    gram = y.mT @ y
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    lower, _ = torch.linalg.cholesky_ex(gram + shift * eye, check_errors=False)
    # Invert the small l × l factor, then one batched product: far faster than a triangular
    # solve against the n-row right-hand side.
    inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)
    return y @ inverse.mT


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``y`` without a host-device synchronisation.

    Shifted CholeskyQR3 (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa 2020): a first pass
    with the shift ``11(nl + l(l+1))·u·‖Y‖²`` makes the factorisation succeed for any input, two
    plain CholeskyQR passes restore orthogonality. ``torch.linalg.qr``/``svd`` would synchronise on
    CUDA and are slow for small batched problems; ``cholesky_ex`` and triangular solves are not.
    Computed in float64 (the sketches are tall and thin, so this is cheap). Column order is kept
    (Gram–Schmidt order): the first ``j`` output columns span the first ``j`` input columns.

    Args:
        y: ``[..., n, l]`` with ``l ≤ n``; any float dtype.

    Returns:
        ``[..., n, l]`` float64 with orthonormal columns spanning the numerical range of ``y``.
        An all-zero ``y`` gives an all-zero result (a group without rows).
    """
    y = y.to(torch.float64)
    n, width = y.shape[-2], y.shape[-1]
    norm2 = (y * y).sum(dim=(-2, -1), keepdim=True)  # ‖Y‖_F² ≥ ‖Y‖₂²
    tiny = torch.finfo(torch.float64).tiny
    q = _cholesky_qr(y, 11.0 * (n * width + width * (width + 1)) * _EPS64 * norm2 + tiny)
    for _ in range(2):
        norm2 = (q * q).sum(dim=(-2, -1), keepdim=True)
        q = _cholesky_qr(q, width * _EPS64 * norm2 + tiny)
    return q


# ---------------------------------------------------------------------------------------------
# Host side: float64 numpy, small matrices.


def _descending(values: np.ndarray) -> np.ndarray:
    return np.sort(values)[::-1]


def exact_spectra(
    activation: np.ndarray, adjoint: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact singular values of ``A``, ``Δ`` and ``AᵀΔ`` from the rows themselves.

    When the group has fewer rows ``n`` than the layer's widths, ``σ(AᵀΔ) = σ(R_A R_Δᵀ)`` with
    ``Aᵀ = Q_A R_A`` and ``Δᵀ = Q_Δ R_Δ`` thin QRs, an ``n × n`` problem (never forms ``AᵀΔ``).

    Args:
        activation: ``[n, h_in]`` rows of the group.
        adjoint: ``[n, h_out]`` the matching adjoint rows.

    Returns:
        Descending float64 singular values of ``A`` (``min(n, h_in)``), ``Δ`` (``min(n, h_out)``)
        and ``AᵀΔ`` (``min(n, h_in, h_out)``).
    """
    a = np.asarray(activation, dtype=np.float64)
    d = np.asarray(adjoint, dtype=np.float64)
    n = a.shape[0]
    sa = scipy.linalg.svdvals(a, check_finite=False)
    sd = scipy.linalg.svdvals(d, check_finite=False)
    if n < min(a.shape[1], d.shape[1]):
        ra = scipy.linalg.qr(a.T, mode="r", check_finite=False)[0][:n]
        rd = scipy.linalg.qr(d.T, mode="r", check_finite=False)[0][:n]
        sg = scipy.linalg.svdvals(ra @ rd.T, check_finite=False)
    else:
        sg = scipy.linalg.svdvals(a.T @ d, check_finite=False)
    return sa, sd, sg[: min(n, a.shape[1], d.shape[1])]


def ritz_values(gram: np.ndarray) -> np.ndarray:
    """Singular values ``σ(B)`` from ``BᵀB`` (or ``BBᵀ``) given in float64.

    Args:
        gram: ``[l, l]`` symmetric positive semi-definite.

    Returns:
        ``[l]`` descending, non-negative.
    """
    gram = 0.5 * (gram + gram.T)
    lam = scipy.linalg.eigvalsh(gram, check_finite=False)
    return _descending(np.sqrt(np.clip(lam, 0.0, None)))


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


def streaming_svd(
    upsilon: np.ndarray,
    phi: np.ndarray,
    psi: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    z: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncated SVD of a matrix ``G`` known only through three linear sketches.

    Tropp, Yurtsever, Udell, Cevher (2019), "Streaming low-rank matrix approximation with an
    application to scientific simulation", §4: range ``Y = GΩ``, co-range ``X = ΥG``, core
    ``Z = ΦGΨᵀ``. With ``Q = orth(Y)``, ``P = orth(Xᵀ)``: ``G ≈ Q C Pᵀ``,
    ``C = (ΦQ)⁺ Z ((ΨP)⁺)ᵀ``. The sketches are linear in ``G``, so they add over steps and
    all-reduce over data-parallel ranks.

    Args:
        upsilon: ``[lx, h_in]``; phi: ``[s, h_in]``; psi: ``[s, h_out]`` test matrices.
        y: ``[h_in, l]``; x: ``[lx, h_out]``; z: ``[s, s]`` the accumulated sketches.

    Returns:
        ``(σ [r] descending, U [h_in, r], V [h_out, r])``, ``r = min(l, lx)``.
    """
    del upsilon  # the reconstruction needs only the data's sketches and the core's test matrices
    q, _ = scipy.linalg.qr(y, mode="economic", check_finite=False)
    p, _ = scipy.linalg.qr(x.T, mode="economic", check_finite=False)
    left = scipy.linalg.lstsq(phi @ q, z, check_finite=False)[0]  # (ΦQ)⁺ Z        [l, s]
    core = scipy.linalg.lstsq(psi @ p, left.T, check_finite=False)[0].T  # … ((ΨP)⁺)ᵀ  [l, lx]
    uc, s, vct = scipy.linalg.svd(core, full_matrices=False, check_finite=False)
    return s, q @ uc, p @ vct.T


def _psd_root(gram: np.ndarray, rtol: float) -> np.ndarray:
    """``R`` with ``RᵀR = gram`` restricted to eigenvalues above ``rtol·λ_max`` (rows dropped)."""
    lam, vec = scipy.linalg.eigh(0.5 * (gram + gram.T), check_finite=False)
    keep = lam > rtol * max(float(lam.max(initial=0.0)), np.finfo(np.float64).tiny)
    return np.sqrt(lam[keep])[:, None] * vec[:, keep].T


def nystrom_values(core: np.ndarray, gram: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """Eigenvalues of the Nyström approximation ``HB(BᵀHB)⁺BᵀH`` of a PSD ``H``.

    From ``core = BᵀHB`` and ``gram = (HB)ᵀ(HB)`` (both ``[b, b]``): the eigenvalues are those of
    ``M^{-1/2} N M^{-1/2}``, with ``M``'s eigenvalues below ``rtol·λ_max`` dropped (an ε-pseudo-
    inverse: the sketches were formed in float32). The approximation is ⪯ ``H``, so every value is
    a lower bound of the true one.

    Returns:
        Descending eigenvalues (``≤ b`` of them).
    """
    lam, vec = scipy.linalg.eigh(0.5 * (core + core.T), check_finite=False)
    keep = lam > rtol * max(float(lam.max(initial=0.0)), np.finfo(np.float64).tiny)
    if not np.any(keep):
        return np.zeros(0)
    w = vec[:, keep] / np.sqrt(lam[keep])
    inner = w.T @ gram @ w
    values = scipy.linalg.eigvalsh(0.5 * (inner + inner.T), check_finite=False)
    return _descending(np.clip(values, 0.0, None))


def generalized_nystrom_values(
    gram_range: np.ndarray, gram_corange: np.ndarray, core: np.ndarray, rtol: float = 1e-6
) -> np.ndarray:
    """Singular values of the generalized Nyström approximation ``Ĝ = Y C⁺ X``.

    Nakatsukasa (2020), "Fast and stable randomized low-rank matrix approximation": with a range
    sketch ``Y = GΩ`` ``[h_in, b_out]``, a co-range sketch ``X = ΥG`` ``[b_in, h_out]`` and the core
    ``C = ΥGΩ``, ``Ĝ = Y C⁺ X`` (``C⁺`` an ε-pseudo-inverse). Only small matrices are needed:
    ``YᵀY``, ``XXᵀ`` and ``C``; ``σ(Ĝ) = σ(R_Y C⁺ R_Xᵀ)`` with ``R_YᵀR_Y = YᵀY``,
    ``R_XᵀR_X = XXᵀ``.

    Returns:
        Descending singular values.
    """
    r_y = _psd_root(gram_range, rtol**2)  # [r1, b_out]
    r_x = _psd_root(gram_corange, rtol**2)  # [r2, b_in]
    u, s, vt = scipy.linalg.svd(core, full_matrices=False, check_finite=False)
    keep = s > rtol * max(float(s.max(initial=0.0)), np.finfo(np.float64).tiny)
    if not np.any(keep) or r_y.size == 0 or r_x.size == 0:
        return np.zeros(0)
    pinv = (vt[keep].T / s[keep]) @ u[:, keep].T  # [b_out, b_in]
    return scipy.linalg.svdvals(r_y @ pinv @ r_x.T, check_finite=False)


def projected_values(
    gram_in: np.ndarray, gram_out: np.ndarray, core: np.ndarray, rtol: float = 1e-6
) -> np.ndarray:
    """``σ(Q_inᵀ G Q_out)`` for orthonormal bases of ``B_in``, ``B_out`` from ``B_inᵀGB_out``.

    A projection of ``G``, so every value is a lower bound of ``σ(G)`` (Cauchy interlacing).
    """
    r_in = _psd_root(gram_in, rtol**2)
    r_out = _psd_root(gram_out, rtol**2)
    if r_in.size == 0 or r_out.size == 0:
        return np.zeros(0)
    # Q = B R⁺ with RᵀR = BᵀB:  Q_inᵀ G Q_out = (R_in⁺)ᵀ (B_inᵀ G B_out) R_out⁺
    return scipy.linalg.svdvals(
        np.linalg.pinv(r_in).T @ core @ np.linalg.pinv(r_out), check_finite=False
    )


def generalized_nystrom_epoch(
    y: np.ndarray, x: np.ndarray, core: np.ndarray, rtol: float = 1e-6
) -> np.ndarray:
    """Generalized Nyström singular values from the accumulated epoch sketches themselves."""
    return generalized_nystrom_values(y.T @ y, x @ x.T, core, rtol)
