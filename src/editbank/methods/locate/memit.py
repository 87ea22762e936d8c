"""MEMIT (Meng et al., 2023): a batch of edits spread over several MLP output projections.

For each edited layer l (ascending) the keys K are recomputed with the layers below already updated, the
remaining residual at the last edited layer is split evenly over the layers left, R = (z − h_now) / (layers
left), and ΔW_l = R Kᵀ (λC + C_p + K Kᵀ)⁻¹, where C_p sums earlier edits' K Kᵀ (`sequential=True`), so later
batches keep what earlier ones wrote.
"""

from __future__ import annotations

import torch

from .. import easyedit as ee
from ..base import register
from .base import LocateMethod
from .hparams import MEMITHparams
from .solvers import memit_update


@register("memit")
class MEMIT(LocateMethod):
    easyedit_rules = {
        **LocateMethod.easyedit_rules,
        "mom2_update_weight": ee.to("mom2_update_weight"),
        "mom2_adjustment": ee.drop("EasyEdit's MEMIT ignores it too (the covariance is always used)"),
    }
    easyedit_names = ("memit",)
    Hparams = MEMITHparams
    default_n_layers = 3

    def __init__(self, model, tokenizer, arch, hparams: MEMITHparams) -> None:
        super().__init__(model, tokenizer, arch, hparams)
        self.accumulates = hparams.sequential

    def _solve(self, i: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.norm_weight(layer, keys.shape[1])
        return memit_update(keys, resid, self.second_moment(layer), self.hparams.mom2_update_weight,
                            self.cp.get(layer), mu, self.drift(layer) if mu else None)
