"""MetaKE (arXiv 2603.12677, reconstructed from DESIGN.md 5.5): AlphaEdit with the target planned through the solver.

`proxy="all"` chains every edited layer's transfer (each layer writes 1/(layers left) of what the layers below
left, keys frozen at the plan) instead of the last layer's alone; `proxy_ratio` in the stats is what the real write
realised at the last layer over what the proxy predicted (1: the proxy was exact).

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
        n_layers, last = len(self.layers), self.layers[-1]
        chosen = self.layers if self.hparams.proxy == "all" else [last]
        # per layer: its keys, projector, C_p and ridge (norm control shrinks the write like a larger ridge; its
        # pull towards W0 is left out of the plan), and its share 1 / (layers left) of the remaining residual
        parts = [(self.keys(layer, requests, prefixes), self.projector(layer), self.cp.get(layer),
                  self.hparams.L2 + self.norm_weight(layer, len(requests)), layer,
                  1.0 / (n_layers - self.layers.index(layer))) for layer in chosen]

        def chain(queries_of) -> torch.Tensor:
            """Σ_i C_i G_i(Q_i) s_i, C_0 = I, C_{i+1} = C_i (I − s_i G_i(K_i)): what the layers realise at the
            queries when each writes its share s_i of what the layers below left (keys frozen at the plan)."""
            n = parts[0][0].shape[1]
            carry, total = torch.eye(n, device=parts[0][0].device), 0.0
            for keys, proj, prev, l2, layer, share in parts:
                total = total + carry @ metake_transfer(keys, proj, prev, l2, queries_of(layer)) * share
                carry = carry @ (torch.eye(n, device=carry.device) - metake_transfer(keys, proj, prev, l2) * share)
            return total

        def transfer(ids: list[list[int]], index: list[int]) -> torch.Tensor:
            return chain(lambda layer: read_rows(self.model, self.tokenizer, self.paths[layer], ids, index,
                                                 inputs=True).float().T)

        target = optimize_targets(self.model, self.tokenizer, self.arch.layer_path(last, ""), requests, prefixes,
                                  self.hparams, transfer=transfer, max_norm_factor=self.hparams.max_plan_factor)
        keys_at = {layer: keys for keys, *_, layer, _ in parts}
        plan = chain(keys_at.__getitem__)  # [n, n]: what the write realises at each request's key, per planned D
        # the planned residual's realisation as the proxy predicts it, [n, hidden] (`proxy_ratio` in the stats)
        return target, {"gate": [float(g) for g in plan.diagonal()], "_predicted": plan.T @ target.delta}
