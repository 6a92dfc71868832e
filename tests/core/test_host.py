"""Host-side factorisations of the step sketches against their definitions (float64 numpy)."""

from __future__ import annotations

import numpy as np

from streamspec.sketch import host
from streamspec.sketch.host import nystrom_values


def _psd_problems(n: int, h: int, b: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` PSD ``H`` ``[n, h, h]`` with spectra decaying over 6 decades, orthonormal ``B``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 300, h)) * np.logspace(0, -3, h)
    return np.swapaxes(x, -1, -2) @ x, np.linalg.qr(rng.standard_normal((n, h, b)))[0]


def test_nystrom_values_are_the_eigenvalues_of_the_shifted_nystrom_approximation() -> None:
    """``eig(Y_ν (BᵀY_ν)⁻¹ Y_νᵀ) − ν`` computed directly (``Y_ν = HB + νB``, Tropp et al. 2017),
    for a batch of PSD ``H`` with decaying spectra and orthonormal ``B``: lower bounds of the
    true values, within 1e-4 of the unshifted Nyström's."""
    hessian, basis = _psd_problems(5, 120, 48)
    y = hessian @ basis
    core, gram = np.swapaxes(basis, -1, -2) @ y, np.swapaxes(y, -1, -2) @ y
    values = nystrom_values(core, gram)
    for i in range(len(y)):
        nu = host._NYSTROM_SHIFT * np.linalg.norm(y[i])
        y_nu = y[i] + nu * basis[i]
        approx = y_nu @ np.linalg.inv(basis[i].T @ y_nu) @ y_nu.T
        expected = np.sort(np.linalg.eigvalsh(0.5 * (approx + approx.T)))[::-1][:48] - nu
        top = expected[0]
        np.testing.assert_allclose(values[i, :16], expected[:16], rtol=1e-6, atol=1e-9 * top)
        plain = y[i] @ np.linalg.inv(core[i]) @ y[i].T
        unshifted = np.sort(np.linalg.eigvalsh(0.5 * (plain + plain.T)))[::-1][:16]
        np.testing.assert_allclose(values[i, :16], unshifted, rtol=1e-4)
        # The approximation is ⪯ H: every value is a lower bound.
        exact = np.sort(np.linalg.eigvalsh(hessian[i]))[::-1][:48]
        assert (values[i] <= exact * (1 + 1e-9) + 1e-9 * top).all()


def test_nystrom_values_are_exact_from_a_spanning_float32_sketch() -> None:
    """With ``B`` spanning ``H`` (the identity: a layer no wider than its sketch) and the sketch
    rounded to float32, as the device sends it, the values are ``H``'s own within float32
    rounding, and the trace is ``tr(H)``'s; the core read off the rounded sketch is not
    symmetric (and may be indefinite), which the shift absorbs."""
    hessian, _ = _psd_problems(4, 40, 40, seed=3)
    basis = np.broadcast_to(np.eye(40), hessian.shape)
    y = (hessian @ basis).astype(np.float32).astype(np.float64)
    values, trace = host.nystrom_spectra(np.swapaxes(basis, -1, -2) @ y, np.swapaxes(y, -1, -2) @ y)
    for i in range(len(y)):
        exact = np.sort(np.linalg.eigvalsh(hessian[i]))[::-1]
        np.testing.assert_allclose(values[i], exact, rtol=0, atol=1e-5 * exact[0])
        np.testing.assert_allclose(trace[i], np.trace(hessian[i]), rtol=1e-5)


def test_nystrom_values_of_an_indefinite_core_are_finite_lower_bounds() -> None:
    """A core noisier than the shift (here: −1e-3·‖Y‖ on one direction) takes the
    eigendecomposition route: finite values, the others' batch unchanged."""
    hessian, basis = _psd_problems(3, 60, 24, seed=4)
    y = hessian @ basis
    core, gram = np.swapaxes(basis, -1, -2) @ y, np.swapaxes(y, -1, -2) @ y
    clean = nystrom_values(core, gram)
    noisy = core.copy()
    v = np.linalg.eigh(noisy[1])[1][:, 0]  # its weakest direction, pushed below zero
    noisy[1] -= 1e-3 * np.linalg.norm(y[1]) * np.outer(v, v)
    values = nystrom_values(noisy, gram)
    assert np.isfinite(values).all()
    np.testing.assert_allclose(values[[0, 2]], clean[[0, 2]], rtol=1e-9, atol=1e-12)
    exact = np.sort(np.linalg.eigvalsh(hessian[1]))[::-1][:24]
    assert (values[1] <= exact * (1 + 1e-9)).all()


def test_triangular_inverse_equals_the_inverse() -> None:
    """The blocked forward substitution, for sizes around and between its 8-wide blocks."""
    from streamspec.sketch.host import _tril_inverse

    rng = np.random.default_rng(2)
    for n in (1, 5, 8, 9, 16, 31, 32, 33, 47, 48, 50):
        x = rng.standard_normal((4, n + 20, n))
        lower = np.linalg.cholesky(np.swapaxes(x, -1, -2) @ x)
        expected = np.linalg.inv(lower)
        got = _tril_inverse(lower)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * scale, err_msg=str(n))
        assert not np.triu(got, 1).any()


def _gradient_problem(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    """One (layer, group) gradient sketch as the step packs it: orthonormal ``B``, ``G = AᵀΔ``."""
    h_in, h_out, b_in, b_out = 90, 70, 48, 32
    a = rng.standard_normal((rows, h_in)) * np.logspace(0, -2, h_in)
    d = rng.standard_normal((rows, h_out)) * np.logspace(0, -1, h_out)
    g = a.T @ d
    b_i = np.linalg.qr(rng.standard_normal((h_in, b_in)))[0]
    b_o = np.linalg.qr(rng.standard_normal((h_out, b_out)))[0]
    y, x = g @ b_o, b_i.T @ g
    return {"g": g, "gram_y": y.T @ y, "gram_x": x @ x.T, "core_g": b_i.T @ g @ b_o, "y": y, "x": x}


def test_gradient_spectra_equal_their_definition_on_both_routes(monkeypatch) -> None:
    """σ(Y C⁺ X) with ``C⁺`` truncated at ``rtol·σ₁`` (numpy's pinv), for a batch mixing
    full-rank cores (Cholesky pseudo-inverse, no eigenvectors), rank-deficient ones (a group with
    fewer rows than ``b_out``: the truncating eigendecomposition) and cores just above the cut-off
    (``σ_min`` between 1e-4 and 1e-2 of ``σ₁``), with no eigenvalue call of ``CᵀC`` to route
    them."""
    import streamspec.sketch.host as host

    rng = np.random.default_rng(3)
    problems = [_gradient_problem(rng, rows) for rows in (400, 12, 300, 400, 20)]
    for floor in (3e-4, 2e-3, 1e-2):  # G's 32nd singular direction scaled to floor·σ₁
        p = _gradient_problem(rng, 400)
        u, s, vt = np.linalg.svd(p["core_g"], full_matrices=False)
        s = np.geomspace(s[0], floor * s[0], s.size)
        p["core_g"] = (u * s) @ vt
        problems.append(p)
    stacked = {k: np.stack([p[k] for p in problems]) for k in ("gram_y", "gram_x", "core_g")}
    routed, cross_values = [], []
    general, values = host.core_factors, host.eigvalsh
    monkeypatch.setattr(
        host, "core_factors", lambda core: routed.append(len(core)) or general(core)
    )

    def spy(x: np.ndarray) -> np.ndarray:
        cross_values.append(x.shape)
        return values(x)

    monkeypatch.setattr(host, "eigvalsh", spy)
    gn = host._gradient_spectra(stacked["gram_y"], stacked["gram_x"], stacked["core_g"])
    # The two rank-deficient cores and at most the one nearest the cut-off are truncated; the
    # others take one eigenvalue call in all (of the small M Mᵀ, never of CᵀC).
    assert routed and routed[0] in (2, 3), routed
    assert len(cross_values) == 2, cross_values  # fast batch + the truncating route's one
    for i, p in enumerate(problems):
        estimate = p["y"] @ np.linalg.pinv(p["core_g"], rtol=1e-6) @ p["x"]
        expected = np.linalg.svd(estimate, compute_uv=False)[:32]
        np.testing.assert_allclose(gn[i, :16], expected[:16], rtol=1e-7, atol=1e-9 * expected[0])


def test_host_eigenvalue_calls_are_large_enough_to_release_the_gil(monkeypatch) -> None:
    """numpy releases the GIL in a gufunc only when outer iterations × output core size exceed
    500; below that a batched ``eigvalsh`` holds it for its whole LAPACK run and stalls every op
    of the training thread. The host's small batches go through ``eigh`` (a few matrices) or are
    padded past the threshold (many small ones), with the same values."""
    import streamspec.sketch.host as host

    rng = np.random.default_rng(5)
    calls: list[tuple[str, tuple[int, ...]]] = []
    real_values, real_pairs = np.linalg.eigvalsh, np.linalg.eigh

    def values(x: np.ndarray) -> np.ndarray:
        calls.append(("eigvalsh", x.shape))
        return real_values(x)

    def pairs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(("eigh", x.shape))
        return real_pairs(x)

    monkeypatch.setattr(np.linalg, "eigvalsh", values)
    monkeypatch.setattr(np.linalg, "eigh", pairs)

    def released(call: tuple[str, tuple[int, ...]]) -> bool:
        # eigh's eigenvector output releases it even for one 16 × 16 matrix (measured)
        name, shape = call
        return name == "eigh" or shape[0] * shape[-1] > 500

    cases = (
        (1, 80, "eigh"),
        (3, 12, "eigh"),
        (8, 48, "padded"),
        (20, 12, "padded"),
        (11, 48, None),
    )
    for n, b, route in cases:
        m = rng.standard_normal((n, b, 2 * b))
        x = m @ np.swapaxes(m, -1, -2)
        calls.clear()
        got = host.eigvalsh(x)
        np.testing.assert_allclose(got, real_values(x), rtol=1e-12, atol=1e-12 * b * b)
        assert len(calls) == 1 and released(calls[0]), calls
        if route is None:  # past the threshold already: unchanged
            assert calls == [("eigvalsh", x.shape)]
        elif route == "eigh":
            assert calls == [("eigh", x.shape)]
        else:  # padded
            assert calls[0][0] == "eigvalsh" and calls[0][1][0] > n
    assert host.eigvalsh(np.eye(4, dtype=np.float32)[None]).dtype == np.float32
    # The whole host path of a small batch: every eigenvalue call releases the GIL.
    problems = [_gradient_problem(rng, rows) for rows in (400, 12)]
    stacked = {k: np.stack([p[k] for p in problems]) for k in ("gram_y", "gram_x", "core_g")}
    calls.clear()
    host._gradient_spectra(stacked["gram_y"], stacked["gram_x"], stacked["core_g"])
    core = rng.standard_normal((2, 12, 24))
    host.nystrom_values(core @ np.swapaxes(core, -1, -2), core @ np.swapaxes(core, -1, -2))
    assert calls and all(released(c) for c in calls), calls


def test_gradient_estimate_and_error_use_the_better_of_two_lower_bounds() -> None:
    """σ(GB_out) and σ(B_inᵀG) are rigorous lower bounds of σ(G), each at least the projection
    bound σ(C); the recorded gradient estimate stays at or above the better of them, and its
    error is its distance to it, never wider than the distance to σ(C), and still covering the
    true error here."""
    from streamspec.sketch.host import _gradient_spectra, sketched_spectra

    rng = np.random.default_rng(7)
    problems = [_gradient_problem(rng, rows) for rows in (400, 300, 40, 25)]
    t = {k: np.stack([p[k] for p in problems]) for k in ("gram_y", "gram_x", "core_g")}
    for kind, b in (("a", 48), ("d", 32)):
        m = rng.standard_normal((len(problems), b, 2 * b))
        t[f"core_{kind}"] = m @ np.swapaxes(m, -1, -2)
        t[f"gram_{kind}"] = 2 * t[f"core_{kind}"]
        t[f"norm_{kind}"] = np.full(len(problems), 1e6)
    spectra, errors = sketched_spectra(t)
    gn = _gradient_spectra(t["gram_y"], t["gram_x"], t["core_g"])
    width = spectra[2].shape[-1]
    tighter = []
    for i, p in enumerate(problems):
        true = np.linalg.svd(p["g"], compute_uv=False)[:width]
        sy = np.linalg.svd(p["y"], compute_uv=False)[:width]
        sx = np.linalg.svd(p["x"], compute_uv=False)[:width]
        sc = np.linalg.svd(p["core_g"], compute_uv=False)[:width]
        bound = np.maximum(sy, sx)
        # Rigorous, down to the √ε·σ₁ floor of values taken from Grams (a rank-25 G's zeros).
        floor = 1e-7 * true[0]
        assert (bound <= true * (1 + 1e-9) + floor).all()
        assert (np.minimum(sy, sx) >= sc * (1 - 1e-9) - floor).all()  # both contain σ(C)
        np.testing.assert_allclose(
            spectra[2][i], np.maximum(gn[i, :width], bound), rtol=1e-9, atol=floor
        )
        rounding = host._ROUNDING * spectra[2][i][0]  # the float32 sketches' rounding
        np.testing.assert_allclose(
            errors[2][i], np.abs(gn[i, :width] - bound) + rounding, atol=floor
        )
        assert (errors[2][i] <= np.abs(gn[i, :width] - sc) + rounding + floor).all()
        tighter.append((errors[2][i] < np.abs(gn[i, :width] - sc) * 0.9).any())
        k = 16  # what a rank-16 monitor records of these 32-column sketches
        gap = np.abs(spectra[2][i, :k] - true[:k])
        assert (gap <= errors[2][i, :k] * (1 + 1e-6) + 1e-9 * true[0]).all()
    assert any(tighter)  # strictly tighter than the distance to σ(C)


def test_exact_spectra_equal_per_matrix_svds_for_a_padded_batch(monkeypatch) -> None:
    """The exact route's batched spectra: σ(A), σ(Δ), σ(AᵀΔ) of every (layer, group) block at
    once, equal to float64 SVDs of each block's own rows (zero padding rows, fewer rows than
    the widths, more rows than one width, a rank-deficient and an all-zero block), with every
    numpy call releasing the GIL."""
    import streamspec.sketch.host as host

    rng = np.random.default_rng(11)
    real = np.linalg.svd
    for m, h_in, h_out in ((6, 10, 7), (12, 5, 9), (4, 16, 16), (30, 12, 20), (18, 6, 1)):
        n_rows = [m, m - 2, 3, 0]  # real rows per block; the rest zero padding
        a = np.zeros((len(n_rows), m, h_in), dtype=np.float32)
        d = np.zeros((len(n_rows), m, h_out), dtype=np.float32)
        for i, n in enumerate(n_rows):
            a[i, :n] = rng.standard_normal((n, h_in)) * np.logspace(0, -3, h_in)
            d[i, :n] = rng.standard_normal((n, h_out))
        a[2, :, 1:] = a[2, :, :1]  # rank one
        calls: list[tuple[tuple[int, ...], bool]] = []
        monkeypatch.setattr(np.linalg, "svd", _svd_spy(calls, real))
        sa, sd, sg = host.exact_spectra(a, d)
        monkeypatch.setattr(np.linalg, "svd", real)
        assert len(calls) == 3  # three calls for the whole batch
        assert all(_released(shape, uv) for shape, uv in calls), calls
        for i in range(len(n_rows)):
            a64, d64 = a[i].astype(np.float64), d[i].astype(np.float64)
            for got, x in ((sa[i], a64), (sd[i], d64), (sg[i], a64.T @ d64)):
                want = np.linalg.svd(x, compute_uv=False)[: got.size]
                top = max(want[0], 1e-300)
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * top)


def _svd_spy(calls: list, real):  # type: ignore[no-untyped-def]
    """``np.linalg.svd`` recording each call's shape and whether it returns vectors."""

    def spy(x, full_matrices=True, compute_uv=True, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((x.shape, compute_uv))
        return real(x, full_matrices=full_matrices, compute_uv=compute_uv, **kwargs)

    return spy


def _released(shape: tuple[int, ...], vectors: bool) -> bool:
    """Whether numpy releases the GIL for an SVD call: outer iterations × the outputs' core
    sizes (values, and with them the thin vectors) above 500."""
    n, rows, cols = shape
    k = min(rows, cols)
    return n * (k + (rows * k + k * cols if vectors else 0)) > 500
