"""ROME (Meng et al., 2022): a rank-one update of one MLP output projection per edit.

The key k* is the projection's input at the subject's last token (averaged over context prefixes); the value
v* = W k* + (z − h), where z is the learned residual of that layer at the same token; ΔW = (v* − W k*)(C⁻¹k*)ᵀ
/ (k*ᵀC⁻¹k*) with C the keys' second moment over the corpus (C = I with mom2_adjustment=False). A batch is
written one request after another.
"""

from __future__ import annotations

import torch

from .. import easyedit as ee
from ..base import register
from .base import LocateMethod
from .hparams import ROMEHparams
from .keys import lookup_rows, read_at
from .solvers import rome_update


@register("rome")
class ROME(LocateMethod):
    easyedit_rules = {
        **LocateMethod.easyedit_rules,
        "mom2_adjustment": ee.to("mom2_adjustment"),  # false: C = I (u = k), as in EasyEdit's llama ROME files
    }
    easyedit_names = ("rome",)
    Hparams = ROMEHparams

    def _solve(self, i: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight(layer).detach().float()
        k = keys[:, 0]
        cov = self.second_moment(layer) if self.hparams.mom2_adjustment else torch.eye(len(k), device=k.device)
        return rome_update(w, cov, k, w @ k + resid[:, 0])

    def norm_reference(self, requests) -> torch.Tensor | None:
        """ROME's reference scales the target's decay and clamp by the MLP output at the lookup position."""
        if self.hparams.target_norms != "reference":
            return None
        rows = lookup_rows(self.tokenizer, requests, [""], self.hparams.fact_token)
        return read_at(self.model, self.tokenizer, self.paths[self.layers[-1]], rows, len(requests), inputs=False)

    def groups(self, requests: list) -> list[list]:
        return [[r] for r in requests]
