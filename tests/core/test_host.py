"""Host-side factorisations of the step sketches against their definitions (float64 numpy)."""

from __future__ import annotations

import numpy as np

from streamspec.sketch.host import nystrom_values


def test_nystrom_values_are_the_eigenvalues_of_the_nystrom_approximation() -> None:
    """``eig((HB)(BᵀHB)⁻¹(HB)ᵀ)`` computed directly, for a batch of PSD ``H`` with decaying
    spectra and orthonormal ``B``."""
    rng = np.random.default_rng(1)
    n, h, b = 5, 120, 48
    x = rng.standard_normal((n, 300, h)) * np.logspace(0, -3, h)
    hessian = np.swapaxes(x, -1, -2) @ x
    basis = np.linalg.qr(rng.standard_normal((n, h, b)))[0]
    y = hessian @ basis
    core, gram = np.swapaxes(basis, -1, -2) @ y, np.swapaxes(y, -1, -2) @ y
    values = nystrom_values(core, gram)
    for i in range(n):
        approx = y[i] @ np.linalg.inv(core[i]) @ y[i].T
        expected = np.sort(np.linalg.eigvalsh(0.5 * (approx + approx.T)))[::-1][:b]
        top = expected[0]
        np.testing.assert_allclose(values[i, :16], expected[:16], rtol=1e-6, atol=1e-9 * top)
        # A Nyström approximation is ⪯ H: every value is a lower bound.
        exact = np.sort(np.linalg.eigvalsh(hessian[i]))[::-1][:b]
        assert (values[i] <= exact * (1 + 1e-9) + 1e-9 * top).all()
