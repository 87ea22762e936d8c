"""Closed forms of the locate-then-edit solvers on small random matrices."""

from __future__ import annotations

import pytest
import torch

from editbank.methods.locate.solvers import (
    alphaedit_update,
    memit_update,
    metake_transfer,
    nullspace_projector,
    rome_update,
)

D_IN, D_OUT = 12, 7


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cov(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    """A second moment of `n`-wide keys (low rank + a small ridge when `rank` is given)."""
    x = torch.randn(200, rank or n, generator=_gen(seed), dtype=torch.float64)
    if rank is not None:
        x = x @ torch.randn(rank, n, generator=_gen(seed + 1), dtype=torch.float64)
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rome_writes_value_with_rank_one(seed):
    g = _gen(seed)
    w = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    k, v = torch.randn(D_IN, generator=g, dtype=torch.float64), torch.randn(D_OUT, generator=g, dtype=torch.float64)
    u, r = rome_update(w, _cov(D_IN, seed), k, v)
    delta = u @ r.T
    torch.testing.assert_close((w + delta) @ k, v)
    assert torch.linalg.matrix_rank(delta).item() == 1
    # the change of another key's output is proportional to its C⁻¹-inner product with k*
    other = torch.randn(D_IN, generator=g, dtype=torch.float64)
    cinv = torch.linalg.inv(_cov(D_IN, seed))
    expected = (v - w @ k) * (k @ cinv @ other) / (k @ cinv @ k)
    torch.testing.assert_close(delta @ other, expected)


@pytest.mark.parametrize("with_prev", [False, True])
def test_memit_solves_normal_equation(with_prev):
    g = _gen(3)
    n, lam = 4, 0.7
    keys = torch.randn(D_IN, n, generator=g, dtype=torch.float64)
    resid = torch.randn(D_OUT, n, generator=g, dtype=torch.float64)
    cov = _cov(D_IN, 4)
    prev = _cov(D_IN, 5, rank=3) if with_prev else None
    u, v = memit_update(keys, resid, cov, lam, prev)
    delta = u @ v.T
    # normal equation of min ‖ΔK − R‖² + ‖Δ‖²_{λC + C_p}:  Δ (λC + C_p + K Kᵀ) = R Kᵀ
    a = lam * cov + keys @ keys.T + (prev if with_prev else 0)
    torch.testing.assert_close(delta @ a, resid @ keys.T)


def test_nullspace_projector_is_a_projector_on_small_eigenvalues():
    cov = _cov(D_IN, 6, rank=5)  # rank 5 of 12: a 7-dimensional null space
    p = nullspace_projector(cov, 1e-8)
    torch.testing.assert_close(p @ p, p)
    torch.testing.assert_close(p, p.T)
    assert round(torch.trace(p).item()) == D_IN - 5
    torch.testing.assert_close(cov @ p, torch.zeros_like(cov), atol=1e-9, rtol=0)


@pytest.mark.parametrize("with_prev", [False, True])
def test_alphaedit_leaves_preserved_keys_unchanged(with_prev):
    g = _gen(7)
    k0 = torch.randn(D_IN, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 50, generator=g, dtype=torch.float64)
    p = nullspace_projector(k0 @ k0.T / 50, 1e-8)
    keys = torch.randn(D_IN, 3, generator=g, dtype=torch.float64)
    resid = torch.randn(D_OUT, 3, generator=g, dtype=torch.float64)
    prev = _cov(D_IN, 8, rank=2) if with_prev else None
    u, v = alphaedit_update(keys, resid, p, prev, l2=0.5)
    delta = u @ v.T
    torch.testing.assert_close(delta @ k0, torch.zeros(D_OUT, 50, dtype=torch.float64), atol=1e-9, rtol=0)
    # and it is the closed form R Kᵀ P ((K Kᵀ + C_p) P + L2 I)⁻¹
    kk = keys @ keys.T + (prev if with_prev else 0)
    expected = resid @ keys.T @ p @ torch.linalg.inv(kk @ p + 0.5 * torch.eye(D_IN, dtype=torch.float64))
    torch.testing.assert_close(delta, expected)
    assert (delta @ keys - resid).norm() < resid.norm()  # it does write (part of) the residual


@pytest.mark.parametrize("l2", [0.1, 1.0, 10.0])
def test_metake_transfer_of_one_key_is_the_realised_gain(l2):
    g = _gen(9)
    k0 = torch.randn(D_IN, 6, generator=g, dtype=torch.float64)
    p = nullspace_projector(k0 @ k0.T, 1e-8)
    key = torch.randn(D_IN, 1, generator=g, dtype=torch.float64)
    planned = torch.randn(D_OUT, 1, generator=g, dtype=torch.float64)
    u, v = alphaedit_update(key, planned, p, None, l2)
    realised = u @ v.T @ key
    pk2 = float((p @ key.reshape(-1)).square().sum())
    gate = pk2 / (l2 + pk2)  # one key, no earlier edits: G = |Pk|^2 / (L2 + |Pk|^2)
    assert 0 < gate < 1
    torch.testing.assert_close(realised, gate * planned)
    torch.testing.assert_close(metake_transfer(key, p, None, l2), torch.tensor([[gate]], dtype=torch.float64))


def test_metake_transfer_predicts_batch_write():
    g = _gen(10)
    p = nullspace_projector(_cov(D_IN, 11, rank=4), 1e-8)
    keys = torch.randn(D_IN, 3, generator=g, dtype=torch.float64)
    plan = torch.randn(D_OUT, 3, generator=g, dtype=torch.float64)
    prev = _cov(D_IN, 12, rank=2)
    u, v = alphaedit_update(keys, plan, p, prev, 0.3)
    torch.testing.assert_close(u @ v.T @ keys, plan @ metake_transfer(keys, p, prev, 0.3))


def test_metake_transfer_predicts_write_at_other_keys():
    """With queries Q, G predicts the change the write makes at keys other than the edited ones (locality proxy)."""
    g = _gen(13)
    p = nullspace_projector(_cov(D_IN, 14, rank=6), 1e-8)
    keys = torch.randn(D_IN, 2, generator=g, dtype=torch.float64)
    queries = torch.randn(D_IN, 5, generator=g, dtype=torch.float64)
    plan = torch.randn(D_OUT, 2, generator=g, dtype=torch.float64)
    u, v = alphaedit_update(keys, plan, p, None, 0.2)
    torch.testing.assert_close(u @ v.T @ queries, plan @ metake_transfer(keys, p, None, 0.2, queries))


@pytest.mark.parametrize("seed", [0, 1])
def test_norm_controlled_writes_are_the_stationary_points_of_the_penalised_objectives(seed):
    """MEMIT: ΔW (K Kᵀ + λC + C_p + μI) = R Kᵀ − μD; AlphaEdit: ΔW ((K Kᵀ + C_p) P + (L2 + μ) I) = (R Kᵀ − μD) P."""
    g = _gen(seed)
    keys = torch.randn(D_IN, 3, generator=g, dtype=torch.float64)
    resid = torch.randn(D_OUT, 3, generator=g, dtype=torch.float64)
    drift = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    cov, prev, mu, eye = _cov(D_IN, seed), _cov(D_IN, seed + 5, rank=2), 0.7, torch.eye(D_IN, dtype=torch.float64)
    u, v = memit_update(keys, resid, cov, 2.0, prev, mu, drift)
    dw = u @ v.T
    torch.testing.assert_close(dw @ (keys @ keys.T + 2.0 * cov + prev + mu * eye), resid @ keys.T - mu * drift)
    plain = memit_update(keys, resid, cov, 2.0, prev)
    assert (drift + dw).norm() < (drift + plain[0] @ plain[1].T).norm(), "the pull towards W0 shrinks the drift"
    proj = nullspace_projector(_cov(D_IN, seed, rank=6), 1e-6)
    u, v = alphaedit_update(keys, resid, proj, prev, 0.5, mu, drift)
    m = (keys @ keys.T + prev) @ proj + (0.5 + mu) * eye
    torch.testing.assert_close((u @ v.T) @ m, (resid @ keys.T - mu * drift) @ proj)
    u0, v0 = alphaedit_update(keys, resid, proj, prev, 0.5, 0.0, drift)  # off: AlphaEdit's own write
    torch.testing.assert_close(u0 @ v0.T, alphaedit_update(keys, resid, proj, prev, 0.5)[0]
                               @ alphaedit_update(keys, resid, proj, prev, 0.5)[1].T)
