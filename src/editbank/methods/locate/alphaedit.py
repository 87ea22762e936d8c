"""AlphaEdit (Fang et al., 2025): MEMIT's writes projected on the null space of the preserved keys.

P projects on the eigenvectors of the keys' second moment C with small eigenvalues, so ΔW P-projected rows
leave the corpus keys' outputs (nearly) unchanged; C_p, the sum of earlier edits' K Kᵀ, keeps later batches
from overwriting earlier ones: ΔW = R Kᵀ P ((K Kᵀ + C_p) P + L2·I)⁻¹. P and C_p live on the method and in its
state.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import easyedit as ee
from ..base import register
from .base import LocateMethod
from .hparams import AlphaEditHparams
from .solvers import alphaedit_update, nullspace_projector


@register("alphaedit")
class AlphaEdit(LocateMethod):
    easyedit_rules = {
        **LocateMethod.easyedit_rules,
        "nullspace_threshold": ee.nullspace_threshold,
        "L2": ee.to("L2"),
        "mom2_update_weight": ee.drop("EasyEdit's AlphaEdit ignores it too (no covariance term in its solve)"),
        "mom2_adjustment": ee.drop("EasyEdit's AlphaEdit ignores it too (the covariance gives the null space)"),
        "P_loc": ee.drop("editbank computes the null-space projector itself (cached with the key statistics)"),
    }
    easyedit_names = ("alphaedit",)
    Hparams = AlphaEditHparams
    default_n_layers = 3
    accumulates = True

    def __init__(self, model, tokenizer, arch, hparams: AlphaEditHparams) -> None:
        super().__init__(model, tokenizer, arch, hparams)
        self.proj: dict[int, torch.Tensor] = {}  # null-space projector per layer (from the base model: kept on reset)

    def projector(self, layer: int) -> torch.Tensor:
        """P of the layer: eigenvectors of C with eigenvalue below the (relative) threshold."""
        if layer not in self.proj:
            hp = self.hparams
            cov = self.second_moment(layer)
            thr = hp.nullspace_threshold
            if hp.nullspace_relative:
                thr = thr * float(torch.linalg.eigvalsh(cov.double()).max())
            self.proj[layer] = nullspace_projector(cov, thr)
        return self.proj[layer]

    def _solve(self, i: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.norm_weight(layer, keys.shape[1])
        return alphaedit_update(keys, resid, self.projector(layer), self.cp.get(layer), self.hparams.L2, mu,
                                self.drift(layer) if mu else None)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state_dict()
        tensors.update({f"P.{layer}": p for layer, p in self.proj.items()})
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        dev = self.weight(self.layers[0]).device
        self.proj.update({int(k.split(".")[1]): t.to(dev).float() for k, t in tensors.items() if k.startswith("P.")})
