"""MetaKE (arXiv 2603.12677, reconstructed from DESIGN.md 5.5): AlphaEdit with the target planned through the solver.

AlphaEdit's write realises only part of a planned residual D (the solver's feasible subspace). MetaKE plans D
so that what is realised does the edit: with the structural transfer matrix of the final edited layer,
G = Kᵀ P ((K Kᵀ + C_p) P + L2·I)⁻¹ K, the realised residual is D·G, and D is optimised (NLL + KL + decay) with the
look-ahead patch h + D·G in the forward (autograd gives ∇_D L = (∂L/∂h)·Gᵀ). Then z* = h + D is written once
with AlphaEdit's multi-layer solver. Stats report the planned gate diag(G) and the realised/planned ratio.

The virtual post-edit model is patched at every optimisation row with the realised residual at that row's own key
(prefixed prompts and the KL prompt "{subject} is a" alike: G taken with Q = the rows' keys), so the locality
(KL) term sees what the write would do to the subject's other prompts, with fact_token="last" too.
"""

from __future__ import annotations

import torch

from ..base import register
from .alphaedit import AlphaEdit
from .hparams import MetaKEHparams
from .keys import read_rows
from .solvers import metake_transfer
from .target import optimize_targets


@register("metake")
class MetaKE(AlphaEdit):
    easyedit_names = ("alphaedit", "metake")  # MetaKE reads AlphaEdit's files (AlphaEdit's rules)
    Hparams = MetaKEHparams

    def _plan(self, requests, prefixes: list[str]):
        last = self.layers[-1]
        keys = self.keys(last, requests, prefixes)
        # norm control shrinks the write like a larger ridge (its pull towards W0 is left out of the plan)
        proj, prev, l2 = self.projector(last), self.cp.get(last), self.hparams.L2 + self.norm_weight(last)

        def transfer(ids: list[list[int]], index: list[int]) -> torch.Tensor:
            queries = read_rows(self.model, self.tokenizer, self.paths[last], ids, index, inputs=True).float().T
            return metake_transfer(keys, proj, prev, l2, queries)

        target = optimize_targets(self.model, self.tokenizer, self.arch.layer_path(last, ""), requests, prefixes,
                                  self.hparams, transfer=transfer, max_norm_factor=self.hparams.max_plan_factor)
        gate = metake_transfer(keys, proj, prev, l2).diagonal()
        return target, {"gate": [float(g) for g in gate]}
