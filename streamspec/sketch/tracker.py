"""Per-layer spectral trackers: streaming sketches of each group's activation, adjoint, gradient.

A :class:`LayerTracker` holds, for all groups of one weight matrix at once (leading dim ``C``),

* test matrices, fixed within an epoch and warm-started from the previous epoch's directions
  (each epoch then acts as a power iteration: ALGORITHMS.md, "Nyström sketch");
* epoch sketches, linear in the data (they add over steps and all-reduce over ranks):
  ``Y_A = Σ A_cᵀA_cΩ_A`` and ``Y_Δ = Σ Δ_cᵀΔ_cΩ_Δ`` (Nyström sketches of the Gram matrices) and, for
  the summed gradient ``G_c = Σ A_cᵀΔ_c``, the range/co-range/core sketches of Tropp et al. (2019)
  ``Y_G = G_cΩ_G``, ``X_G = ΥG_c``, ``Z_G = ΦG_cΨᵀ`` — a linear sketch of the sum itself, because
  summed gradients cancel and truncating a running sum would be wrong.

Per step the same products also give the step's own spectra: an orthonormal basis ``Q`` of the
step's range sketch, then a Rayleigh–Ritz projection ``σ(A_cQ)`` (resp. ``σ(QᵀA_cᵀΔ_c)``). When a
group's rows are few, the rows themselves go to the host and their spectra are computed exactly.
Everything inside a step is matrix products on the layer's device; factorisations happen on the
host (see :mod:`streamspec.sketch.linalg`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from streamspec.sketch.linalg import nystrom, orthonormalize, streaming_svd
from streamspec.sketch.operators import DenseRows, RowOperator


@dataclass(frozen=True)
class SketchWidths:
    """Sketch widths of one layer, each capped by the dimension it sketches."""

    activation: int  # range width for A (≤ h_in)
    adjoint: int  # range width for Δ (≤ h_out)
    gradient: int  # range and co-range width for G (≤ min(h_in, h_out))
    core_in: int  # core rows (≤ h_in)
    core_out: int  # core columns (≤ h_out)
    warm_activation: int  # per-step warm block for A (0 when the sketch is already exact)
    warm_adjoint: int
    warm_gradient: int

    @classmethod
    def for_layer(cls, h_in: int, h_out: int, rank: int, oversample: int) -> SketchWidths:
        width = rank + oversample
        core = 2 * width + 1  # Tropp et al. 2019: core ≥ 2·(range width) + 1
        wa, wd, wg = min(width, h_in), min(width, h_out), min(width, h_in, h_out)
        return cls(
            activation=wa,
            adjoint=wd,
            gradient=wg,
            core_in=min(core, h_in),
            core_out=min(core, h_out),
            warm_activation=min(width, h_in - wa),
            warm_adjoint=min(width, h_out - wd),
            warm_gradient=min(width, min(h_in, h_out) - wg),
        )


@dataclass
class EpochSpectra:
    """Singular values reconstructed from one epoch's sketches, unnormalised.

    Attributes:
        activation, adjoint, gradient: ``[C, r]`` descending, float64.
    """

    activation: np.ndarray
    adjoint: np.ndarray
    gradient: np.ndarray


def _random(generator: torch.Generator, *shape: int) -> np.ndarray:
    return torch.randn(*shape, generator=generator, dtype=torch.float64).numpy()


def _orthonormal(generator: torch.Generator, n_groups: int, dim: int, width: int) -> np.ndarray:
    """``[C, dim, width]`` orthonormal Gaussian test matrices; the identity when ``width == dim``
    (the sketch is then exact)."""
    if width >= dim:
        return np.broadcast_to(np.eye(dim), (n_groups, dim, dim)).copy()
    return np.linalg.qr(_random(generator, n_groups, dim, width))[0]


@dataclass
class StepSketch:
    """What one step of one layer sends to the host.

    ``route == "exact"``: ``tensors`` holds the padded group rows ``activation [C, m, h_in]`` and
    ``adjoint [C, m, h_out]``. ``route == "ritz"``: Gram matrices of the Rayleigh–Ritz projections
    ``activation [C, wa', wa']``, ``adjoint [C, wd', wd']``, ``gradient [C, wg', wg']`` (float64).
    """

    route: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


_EPOCH_SKETCHES = ("y_a", "y_d", "y_g", "x_g", "z_g")
WARMUP_ITERATIONS = 4  # power iterations of the warm blocks on the run's first step
TIED_EXACT_ROWS = 4096  # per-group rows up to which the tying spectrum is computed exactly


class LayerTracker:
    """Streaming truncated-SVD tracker of one weight matrix, all groups batched.

    Device state (leading dim ``C`` = groups), fixed-size, independent of steps and data size:
    test matrices ``Ω_A [h_in, wa]``, ``Ω_Δ [h_out, wd]``, ``Ω_G [h_out, wg]``, ``Υᵀ [h_in, wg]``,
    ``Φᵀ [h_in, s_in]``, ``Ψᵀ [h_out, s_out]``; warm blocks ``W_A, W_Δ, W_G``; the epoch sketches.

    Test matrices are held fixed within an epoch so the epoch sketches stay linear. The first
    epoch's are seeded from its first step's data; each later epoch's are the previous epoch's
    top-k directions plus fresh Gaussian columns (the core's ``Φ, Ψ`` are always fresh Gaussian),
    so every epoch is one more power iteration: the epoch's "rank-k correction".

    Args:
        h_in: input width of the weight matrix (columns of ``A``).
        h_out: output width (columns of ``Δ``).
        n_groups: number of groups ``C``.
        rank: ``k``, the number of singular values recorded.
        oversample: extra sketch columns beyond ``k``.
        generator: the monitor's own seeded generator (never the global RNG).
    """

    def __init__(
        self,
        h_in: int,
        h_out: int,
        n_groups: int,
        rank: int,
        oversample: int,
        generator: torch.Generator,
    ) -> None:
        self.h_in = h_in
        self.h_out = h_out
        self.n_groups = n_groups
        self.rank = rank
        self.widths = SketchWidths.for_layer(h_in, h_out, rank, oversample)
        self._generator = generator
        self._device: torch.device | None = None
        self._test: dict[str, torch.Tensor] = {}
        self._warm: dict[str, torch.Tensor] = {}
        self._sketch: dict[str, torch.Tensor] = {}
        self._reseed = True
        self._warmup = True

    def _setup(self, device: torch.device) -> None:
        w, g, c = self.widths, self._generator, self.n_groups

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=torch.float32).to(device)

        self._test = {
            "omega_a": put(_orthonormal(g, c, self.h_in, w.activation)),
            "omega_d": put(_orthonormal(g, c, self.h_out, w.adjoint)),
            "omega_g": put(_orthonormal(g, c, self.h_out, w.gradient)),
            "upsilon_t": put(_orthonormal(g, c, self.h_in, w.gradient)),
        }
        self._warm = {
            "activation": put(_orthonormal(g, c, self.h_in, w.warm_activation)),
            "adjoint": put(_orthonormal(g, c, self.h_out, w.warm_adjoint)),
            "gradient": put(_orthonormal(g, c, self.h_out, w.warm_gradient)),
        }
        self._new_core(device)
        self._reset_sketches(device)
        self._device = device

    def _new_core(self, device: torch.device) -> None:
        w, g, c = self.widths, self._generator, self.n_groups
        for name, dim, width in (
            ("phi_t", self.h_in, w.core_in),
            ("psi_t", self.h_out, w.core_out),
        ):
            self._test[name] = torch.as_tensor(
                _orthonormal(g, c, dim, width), dtype=torch.float32
            ).to(device)

    def _reset_sketches(self, device: torch.device) -> None:
        w, c = self.widths, self.n_groups
        shapes = {
            "y_a": (c, self.h_in, w.activation),
            "y_d": (c, self.h_out, w.adjoint),
            "y_g": (c, self.h_in, w.gradient),
            "x_g": (c, w.gradient, self.h_out),
            "z_g": (c, w.core_in, w.core_out),
        }
        self._sketch = {
            k: torch.zeros(s, dtype=torch.float32, device=device) for k, s in shapes.items()
        }

    # -- the step (hot path: products only, no host sync) -----------------------------------------

    def step(
        self,
        activation: RowOperator | torch.Tensor,
        adjoint: torch.Tensor,
        exact: bool,
        tie: tuple[torch.Tensor, int] | None = None,
    ) -> StepSketch:
        """Fold one step into the epoch sketches and sketch the step's own spectra.

        The step's range sketch is taken with ``[W | Ω]``: a warm block ``W`` carried from the
        previous step (``W ← orth(AᵀAW)`` for A and Δ; ``W ← orth(GᵀQ)`` for the gradient) and the
        epoch's test matrix ``Ω``, whose product also feeds the epoch sketch. Across steps this is
        a block subspace iteration (Halko, Martinsson, Tropp 2011, Alg. 4.3 with the iterations
        spread over steps), so a step is resolved far better than by a one-pass sketch of it alone;
        the final Rayleigh–Ritz projection ``σ(AQ)``, ``σ(QᵀG)`` is exact on the captured range.

        Args:
            activation: ``[C, m, h_in]`` the groups' rows, zero-padded to a common ``m``, as a
                tensor or as a :class:`RowOperator` (products only: conv patches, one-hot rows).
            adjoint: ``[C, m, h_out]`` the matching adjoint rows.
            exact: send the rows themselves for an exact host-side factorisation (cheap when a
                group's rows are no more than a sketch's width).
            tie: ``(position [m], P)``: the position (time step, output pixel) of every row, for
                the tying spectrum: σ of the ``P × (h_in·h_out)`` matrix whose rows are the
                per-position contributions ``Σ_r∈p a_rᵀδ_r`` to the group's gradient.
        """
        if self._device != adjoint.device:
            self._setup(adjoint.device)
        a = DenseRows(activation) if isinstance(activation, torch.Tensor) else activation
        d = adjoint.to(torch.float32)
        if self._warmup:
            self._warmup = False
            self._power_iterate(a, d, WARMUP_ITERATIONS)
        w, t, warm = self.widths, self._test, self._warm
        wa, wd, wg = w.activation, w.adjoint, w.gradient
        va, vd, vg = w.warm_activation, w.warm_adjoint, w.warm_gradient

        # One batched product with A and one with Δ for everything that multiplies them first.
        a_r = a.mm(torch.cat([warm["activation"], t["omega_a"], t["upsilon_t"], t["phi_t"]], dim=2))
        d_r = d @ torch.cat(
            [warm["gradient"], t["omega_g"], warm["adjoint"], t["omega_d"], t["psi_t"]], dim=2
        )
        ia = va + wa  # a_r = [AW_A | AΩ_A | AΥᵀ | AΦᵀ]
        ig = vg + wg  # d_r = [ΔW_G | ΔΩ_G | ΔW_Δ | ΔΩ_Δ | ΔΨᵀ]
        id_ = ig + vd + wd
        a_t = a.tmm(torch.cat([a_r[..., :ia], d_r[..., :ig]], dim=2))
        y_a, y_g = a_t[..., :ia], a_t[..., ia:]  # AᵀA[W_A | Ω_A],  G[W_G | Ω_G]
        y_d = d.mT @ d_r[..., ig:id_]  # ΔᵀΔ[W_Δ | Ω_Δ]
        x_g = a_r[..., ia : ia + wg].mT @ d  # ΥG
        z_g = a_r[..., ia + wg :].mT @ d_r[..., id_:]  # ΦGΨᵀ

        # Orthonormal bases of the step's ranges. CholeskyQR keeps column order (Gram–Schmidt), so
        # the first columns are orth(AᵀAW): the next step's warm block.
        q_a = orthonormalize(y_a).to(torch.float32)
        q_d = orthonormalize(y_d).to(torch.float32)
        q_g = orthonormalize(y_g).to(torch.float32)
        a_q = a.mm(torch.cat([q_a, q_g], dim=2))
        d_q = d @ q_d
        b_g = a_q[..., ia:].mT @ d  # QᵀG  [C, vg+wg, h_out]
        new_warm_g = orthonormalize(b_g[:, :vg].mT).to(torch.float32) if vg else warm["gradient"]

        sk = self._sketch
        if self._reseed:
            self._reseed = False
            self._reseed_from(q_a, q_d, q_g, b_g)
            # The epoch's first contributions, taken with the new test matrices.
            y_a_e = a.tmm(a.mm(t["omega_a"])) if va else y_a[..., va:]
            y_d_e = d.mT @ (d @ t["omega_d"]) if vd else y_d[..., vd:]
            if vg:
                y_g_e = a.tmm(d @ t["omega_g"])
                x_g = a.mm(t["upsilon_t"]).mT @ d
            else:
                y_g_e = y_g[..., vg:]
            sk["y_a"] += y_a_e
            sk["y_d"] += y_d_e
            sk["y_g"] += y_g_e
        else:
            sk["y_a"] += y_a[..., va:]
            sk["y_d"] += y_d[..., vd:]
            sk["y_g"] += y_g[..., vg:]
        sk["x_g"] += x_g
        sk["z_g"] += z_g
        if va:
            warm["activation"] = q_a[..., :va]
        if vd:
            warm["adjoint"] = q_d[..., :vd]
        warm["gradient"] = new_warm_g

        if exact:
            sketch = StepSketch("exact", {"activation": a.dense(), "adjoint": d})
            if tie is not None:
                sketch.tensors["position"] = tie[0]
            return sketch
        b_a = a_q[..., :ia].to(torch.float64)
        b_d = d_q.to(torch.float64)
        b_g64 = b_g.to(torch.float64)
        tensors = {
            "activation": b_a.mT @ b_a,
            "adjoint": b_d.mT @ b_d,
            "gradient": b_g64 @ b_g64.mT,
        }
        if tie is not None:
            if a.shape[1] <= TIED_EXACT_ROWS:
                tensors["tied"] = self._tying_gram_exact(a, d, *tie)
            else:
                tensors["tied"] = self._tying_gram(a_q[..., :ia], d_q, *tie)
        return StepSketch("ritz", tensors)

    @staticmethod
    def _tying_gram_exact(
        a: RowOperator, d: torch.Tensor, position: torch.Tensor, n_positions: int
    ) -> torch.Tensor:
        """Exact ``[C, P, P]`` Gram of the tying matrix: ``Sᵀ((AAᵀ) ⊙ (ΔΔᵀ))S``, ``S`` the
        row → position indicator (``O(m²(h_in + h_out))``, used while ``m ≤ TIED_EXACT_ROWS``)."""
        rows = a.dense().to(torch.float64)
        adj = d.to(torch.float64)
        products = (rows @ rows.mT) * (adj @ adj.mT)  # [C, m, m]
        c, m, _ = products.shape
        by_row = products.new_zeros((c, n_positions, m)).index_add_(1, position, products)
        return by_row.new_zeros((c, n_positions, n_positions)).index_add_(2, position, by_row)

    @staticmethod
    def _tying_gram(
        a_hat: torch.Tensor, d_hat: torch.Tensor, position: torch.Tensor, n_positions: int
    ) -> torch.Tensor:
        """Gram of the per-position gradient contributions projected on the step's bases (large m).

        Row ``p`` of the tying matrix is ``vec(Σ_{r at p} a_rᵀδ_r)``; projected on the
        activation and adjoint bases (``â = AQ_A``, ``d̂ = ΔQ_Δ``) it is ``Σ_r â_r ⊗ d̂_r``,
        exact when the bases span the rows and otherwise a lower bound (a projection only removes energy)
        missing what lies outside the leading subspaces of A and Δ. Returns the float64 Gram of
        the smaller side (``[C, P, P]`` or ``[C, F, F]``).
        """
        c, m, fa = a_hat.shape
        fd = d_hat.shape[-1]
        features = (a_hat.unsqueeze(-1) * d_hat.unsqueeze(-2)).reshape(c, m, fa * fd)
        per_position = features.new_zeros((c, n_positions, fa * fd))
        per_position.index_add_(1, position, features)
        t = per_position.to(torch.float64)
        return t @ t.mT if n_positions <= fa * fd else t.mT @ t

    def _power_iterate(self, a: RowOperator, d: torch.Tensor, iterations: int) -> None:
        """Block power iterations of the warm blocks on one step's data (the run's first step).

        A one-off cost that replaces the random initial blocks by data-adapted ones, so that the
        first epoch's test matrices (seeded from the first step) start near the dominant
        subspaces instead of cold.
        """
        warm = self._warm
        for _ in range(iterations):
            if self.widths.warm_activation:
                warm["activation"] = orthonormalize(a.tmm(a.mm(warm["activation"]))).float()
            if self.widths.warm_adjoint:
                warm["adjoint"] = orthonormalize(d.mT @ (d @ warm["adjoint"])).float()
            if self.widths.warm_gradient:
                left = orthonormalize(a.tmm(d @ warm["gradient"])).float()  # orth(G W)
                warm["gradient"] = orthonormalize(d.mT @ a.mm(left)).float()  # orth(GᵀQ)

    def _reseed_from(
        self, q_a: torch.Tensor, q_d: torch.Tensor, q_g: torch.Tensor, b_g: torch.Tensor
    ) -> None:
        """First-epoch test matrices from the first step's data (sketches not already exact).

        Same shape as later epochs' (top-k directions plus extra columns): the first ``k`` columns
        of the step's basis (``orth(AᵀAW)``, the dominant ones) and, for the rest, the
        data-adapted columns that follow them (``AᵀAΩ`` orthogonalised against those).
        """
        w, t, k = self.widths, self._test, self.rank

        def select(q: torch.Tensor, warm: int, width: int) -> torch.Tensor:
            top = min(k, warm, width)
            return torch.cat([q[..., :top], q[..., warm : warm + width - top]], dim=-1)

        if w.warm_activation:
            t["omega_a"] = select(q_a, w.warm_activation, w.activation)
        if w.warm_adjoint:
            t["omega_d"] = select(q_d, w.warm_adjoint, w.adjoint)
        if w.warm_gradient:
            left = select(q_g, w.warm_gradient, w.gradient)
            rows = select(b_g.mT, w.warm_gradient, w.gradient)  # GᵀQ for the same columns
            t["upsilon_t"] = left
            t["omega_g"] = orthonormalize(rows).to(torch.float32)

    # -- the epoch (between epochs: host sync allowed) ----------------------------------------

    def end_epoch(self) -> EpochSpectra:
        """Reconstruct the epoch's spectra from its sketches, then reset for the next epoch.

        Returns:
            Unnormalised singular values per group (``[C, r]``; NaN where the sketch holds
            non-finite values; empty when the layer saw no step this epoch).
        """
        c = self.n_groups
        if self._device is None:  # never saw a step
            empty = np.full((c, 0), np.nan)
            return EpochSpectra(empty, empty, empty)
        host = {
            name: v.detach().to("cpu", torch.float64).numpy()
            for name, v in (*self._test.items(), *self._sketch.items())
        }
        out: dict[str, list[np.ndarray]] = {"activation": [], "adjoint": [], "gradient": []}
        warm: dict[str, list[np.ndarray | None]] = {
            "omega_a": [],
            "omega_d": [],
            "omega_g": [],
            "upsilon_t": [],
        }
        for i in range(c):
            if not all(np.isfinite(host[n][i]).all() for n in _EPOCH_SKETCHES):
                for kind in out:
                    out[kind].append(np.full(1, np.nan))
                for found in warm.values():
                    found.append(None)
                continue
            lam_a, u_a = nystrom(host["omega_a"][i], host["y_a"][i])
            lam_d, u_d = nystrom(host["omega_d"][i], host["y_d"][i])
            s_g, u_g, v_g = streaming_svd(
                host["upsilon_t"][i].T,
                host["phi_t"][i].T,
                host["psi_t"][i].T,
                host["y_g"][i],
                host["x_g"][i],
                host["z_g"][i],
            )
            out["activation"].append(np.sqrt(lam_a))
            out["adjoint"].append(np.sqrt(lam_d))
            out["gradient"].append(s_g)
            warm["omega_a"].append(u_a[:, : _n_positive(lam_a, self.rank)])
            warm["omega_d"].append(u_d[:, : _n_positive(lam_d, self.rank)])
            warm["omega_g"].append(v_g[:, : _n_positive(s_g, self.rank)])
            warm["upsilon_t"].append(u_g[:, : _n_positive(s_g, self.rank)])
        # Next epoch: the top-k directions of this one plus fresh Gaussian columns (a power
        # iteration per epoch; ALGORITHMS.md measured ≤ 0.1% after a few epochs without drift).
        w, g = self.widths, self._generator
        for name, width in (
            ("omega_a", w.activation),
            ("omega_d", w.adjoint),
            ("omega_g", w.gradient),
            ("upsilon_t", w.gradient),
        ):
            current = host[name]
            if current.shape[1] <= width:  # identity: already exact
                continue
            fresh = _random(g, c, current.shape[1], width)
            for i, directions in enumerate(warm[name]):
                if directions is not None and directions.size:
                    fresh[i, :, : directions.shape[1]] = directions
            self._test[name] = torch.as_tensor(np.linalg.qr(fresh)[0], dtype=torch.float32).to(
                self._device
            )
        self._new_core(self._device)
        self._reset_sketches(self._device)
        return EpochSpectra(
            *(_pad_rows(out[kind]) for kind in ("activation", "adjoint", "gradient"))
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The epoch sketches (sum them across data-parallel ranks to merge)."""
        return dict(self._sketch)


def _n_positive(values: np.ndarray, rank: int) -> int:
    return min(rank, int(np.count_nonzero(values > 0)))


def _pad_rows(rows: list[np.ndarray]) -> np.ndarray:
    width = max((r.size for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : r.size] = r
    return out
