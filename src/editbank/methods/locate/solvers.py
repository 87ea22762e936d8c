"""Closed-form weight updates of the locate-then-edit family, as pure functions on float tensors.

Conventions: W is (out, in); keys K are (in, n) columns, one per request; residuals R are (out, n). Every
solver returns factors (U, V) with the update ΔW = U @ V.T, so an edit is stored (and undone) as a low-rank
pair instead of a full matrix.
"""

from __future__ import annotations

import torch


def _sym_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a x = b in float64 (the systems mix covariances of very different scales)."""
    return torch.linalg.solve(a.double(), b.double()).to(b.dtype)


def rome_update(weight: torch.Tensor, cov: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's rank-one ΔW = (v* − W k*)(C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*): afterwards (W + ΔW) k* = v* exactly."""
    k, v = key.reshape(-1, 1), value.reshape(-1, 1)
    c_inv_k = _sym_solve(cov, k)
    right = c_inv_k / (k.T @ c_inv_k)
    return v - weight @ k, right


def _norm_controlled(resid: torch.Tensor, right: torch.Tensor, system_t: torch.Tensor, norm: float,
                     drift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ΔW = (R Kᵀ − norm·drift) S M⁻¹ given `right` = S [K | I] (S = I or P) and Mᵀ:
    U = [R | −norm·drift], V = M⁻ᵀ S [K | I] (dense: the drift term has full rank)."""
    return torch.cat([resid, -norm * drift], dim=1), _sym_solve(system_t, right)


def memit_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, mom2_weight: float,
                 prev: torch.Tensor | None = None, norm: float = 0.0,
                 drift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's ΔW = R Kᵀ (λC + C_p + K Kᵀ)⁻¹; `prev` = C_p, the sum of earlier edits' K Kᵀ (sequential).
    With `norm` > 0 (norm control, ENCORE's form) the write also minimises norm·‖W + ΔW − W0‖², `drift` = W − W0:
    ΔW = (R Kᵀ − norm·drift)(λC + C_p + K Kᵀ + norm·I)⁻¹."""
    a = mom2_weight * cov + keys @ keys.T
    if prev is not None:
        a = a + prev
    if norm > 0:
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return _norm_controlled(resid, torch.cat([keys, eye], dim=1), a + norm * eye, norm, drift)
    return resid, _sym_solve(a, keys)


def nullspace_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's P: projector on the span of C's eigenvectors whose eigenvalue is below `threshold`."""
    evals, evecs = torch.linalg.eigh(cov.double())
    basis = evecs[:, evals < threshold]
    return (basis @ basis.T).to(cov.dtype)


def _alpha_system(keys: torch.Tensor, proj: torch.Tensor, prev: torch.Tensor | None, l2: float) -> torch.Tensor:
    """The matrix (K Kᵀ + C_p) P + L2·I that AlphaEdit's update inverts."""
    kk = keys @ keys.T if prev is None else keys @ keys.T + prev
    return kk @ proj + l2 * torch.eye(proj.shape[0], dtype=proj.dtype, device=proj.device)


def alphaedit_update(keys: torch.Tensor, resid: torch.Tensor, proj: torch.Tensor, prev: torch.Tensor | None,
                     l2: float, norm: float = 0.0, drift: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's ΔW = R Kᵀ P ((K Kᵀ + C_p) P + L2·I)⁻¹: rows of ΔW lie in P's span, so ΔW K0 ≈ 0. With `norm`
    > 0 (norm control, `drift` = W − W0): ΔW = (R Kᵀ − norm·drift) P ((K Kᵀ + C_p) P + (L2 + norm)·I)⁻¹, the
    stationary point of AlphaEdit's objective plus norm·‖W + ΔW − W0‖² in AlphaEdit's own closed form."""
    m = _alpha_system(keys, proj, prev, l2 + norm)
    if norm > 0:
        eye = torch.eye(proj.shape[0], dtype=proj.dtype, device=proj.device)
        return _norm_controlled(resid, proj @ torch.cat([keys, eye], dim=1), m.T, norm, drift)
    # ΔW = R (M⁻ᵀ P K)ᵀ, so V solves Mᵀ V = P K
    return resid, _sym_solve(m.T, proj @ keys)


def metake_transfer(keys: torch.Tensor, proj: torch.Tensor, prev: torch.Tensor | None, l2: float,
                    queries: torch.Tensor | None = None, with_response: bool = False):
    """MetaKE's structural transfer G = Kᵀ P ((K Kᵀ + C_p) P + L2·I)⁻¹ Q (n × m, Q = K by default): writing D
    changes the outputs at the keys Q by D·G. `with_response`: also P ((K Kᵀ + C_p) P + L2·I)⁻¹ Q (in × m), which
    a norm-controlled write's pull acts through (its change at Q is −norm·drift times it, `alphaedit_update`)."""
    solved = _sym_solve(_alpha_system(keys, proj, prev, l2), keys if queries is None else queries)
    g = keys.T @ proj @ solved
    return (g, proj @ solved) if with_response else g
