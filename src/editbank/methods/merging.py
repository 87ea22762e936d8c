"""Merging task vectors: linear, TIES (Yadav et al. 2023), DARE (Yu et al. 2023) with or without TIES's sign election.

Every merge takes deltas d_i = theta_i - theta_base of one shape and weights w_i (default 1) and returns the
merged delta, to be added to the base (WISE merges side memories this way, with the original FFN matrix as
the base). The steps, named as in the papers:

- trim (TIES): keep each delta's `density` share of entries with the largest magnitude, zero the rest;
- drop and rescale (DARE): keep each entry with probability `density` (a seeded generator, so merges
  replay exactly), divide the kept ones by `density`;
- elect sign (TIES): per entry, the sign of sum_i w_i d_i (a zero sum counts as +);
- disjoint mean (TIES): per entry, sum_i w_i d_i over the deltas whose sign agrees with the elected one,
  divided by sum_i w_i over those same deltas (0 where none agrees). With equal weights this is the
  paper's mean over agreeing entries; with weights it is their weighted mean (REPAIR's loss-aware merge);
- linear: sum_i w_i d_i / sum_i w_i (`normalize=False`: the plain weighted sum);
- consensus (REPAIR's merge rule, its Algorithm 4; no trim): per entry, with x_i = w_i d_i, the sum of the x_i
  where every non-zero x_i has one sign, else the x_i of largest magnitude.

The result is scaled by `scale` (TIES's lambda).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "consensus")


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density * numel) entries of largest magnitude (at least one), zero the rest."""
    _check_density(density)
    k = max(1, round(density * delta.numel()))
    if k >= delta.numel():
        return delta.clone()
    flat = delta.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(delta)


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and divide the kept ones by it."""
    _check_density(density)
    if density == 1.0:
        return delta.clone()
    device = generator.device if generator is not None else delta.device
    keep = torch.rand(delta.shape, generator=generator, device=device).to(delta.device) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def elect_sign(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per entry of stacked deltas [N, ...]: +1 or -1, the sign of their weighted sum (0 counts as +1)."""
    total = (deltas * _expand(weights, deltas)).sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0).to(deltas.dtype)


def disjoint_mean(deltas: torch.Tensor, weights: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Weighted mean, per entry, of the deltas whose sign equals `sign` (0 where none does)."""
    agree = (torch.sign(deltas) == sign).to(deltas.dtype)
    w = _expand(weights, deltas) * agree
    num = (deltas * w).sum(dim=0)
    den = w.sum(dim=0)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(deltas.dtype).tiny), torch.zeros_like(num))


def consensus(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per entry of stacked deltas [N, ...] weighted by w: their sum where the non-zero ones agree in sign, else
    the one of largest magnitude."""
    x = deltas * _expand(weights, deltas)
    agree = ((x >= 0).all(dim=0)) | ((x <= 0).all(dim=0))
    pick = x.gather(0, x.abs().argmax(dim=0, keepdim=True))[0]
    return torch.where(agree, x.sum(dim=0), pick)


def merge_deltas(
    deltas: Sequence[torch.Tensor],
    method: str = "ties",
    weights: Sequence[float] | torch.Tensor | None = None,
    density: float = 1.0,
    *,
    scale: float = 1.0,
    normalize: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge task vectors with `method` (one of MERGE_METHODS); see the module docstring for each step."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {list(MERGE_METHODS)}")
    if len(deltas) == 0:
        raise ValueError("merge_deltas needs at least one delta")
    shape = deltas[0].shape
    if any(d.shape != shape for d in deltas):
        raise ValueError(f"deltas must share one shape, got {[tuple(d.shape) for d in deltas]}")
    w = torch.ones(len(deltas)) if weights is None else torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() != len(deltas):
        raise ValueError(f"{w.numel()} weights for {len(deltas)} deltas")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("merge weights must be finite and >= 0")
    stacked = torch.stack([d.float() for d in deltas])
    w = w.to(stacked.device)
    if method.startswith("dare"):
        stacked = torch.stack([drop_and_rescale(d, density, generator) for d in stacked])
    elif method == "ties":
        stacked = torch.stack([trim(d, density) for d in stacked])
    if method == "consensus":
        merged = consensus(stacked, w)
    elif method in ("linear", "dare_linear"):
        merged = (stacked * _expand(w, stacked)).sum(dim=0)
        if normalize:
            if float(w.sum()) == 0:
                raise ValueError("merge weights sum to 0: nothing to normalize by")
            merged = merged / w.sum()
    else:
        merged = disjoint_mean(stacked, w, elect_sign(stacked, w))
    return (merged * scale).to(deltas[0].dtype)


def _expand(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weights.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
