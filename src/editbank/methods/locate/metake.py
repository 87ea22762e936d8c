"""MetaKE (arXiv 2603.12677, reconstructed from DESIGN.md 5.5): AlphaEdit with the target planned through the solver.

`proxy="all"` chains every edited layer's transfer (each layer writes 1/(layers left) of what the layers below
left, keys frozen at the plan) instead of the last layer's alone; `proxy_ratio` in the stats is what the real write
realised at the last layer over what the proxy predicted (1: the proxy was exact).

AlphaEdit's write realises only part of a planned residual D (the solver's feasible subspace). MetaKE plans D
so that what is realised does the edit: with the structural transfer matrix of the final edited layer,
G = Kᵀ P ((K Kᵀ + C_p) P + L2·I)⁻¹ K, the realised residual is D·G, and D is optimised (NLL + KL + decay) with the
look-ahead patch h + D·G in the forward (autograd gives ∇_D L = (∂L/∂h)·Gᵀ). Then z* = h + D is written once
with AlphaEdit's multi-layer solver. Stats report the planned gate diag(G) and the realised/planned ratio.

With norm control (`norm_control` > 0) the write also pulls W towards W0: at a key q it adds −μ·(W − W0)·P·M⁻¹·q
whatever D is. `plan_pull` (default) puts that pull in the look-ahead patch (h + D·G + pull), chained like the
transfer with `proxy="all"`, so the plan asks for what the pulled-back write will keep.

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
    stored_defaults = {"plan_pull": False}  # stores made before the plan saw norm control's pull

    def _plan(self, requests, prefixes: list[str]):
        n_layers, last = len(self.layers), self.layers[-1]
        chosen = self.layers if self.hparams.proxy == "all" else [last]
        # per layer: its keys, projector, C_p, ridge (norm control shrinks the write like a larger ridge), share
        # 1 / (layers left) of the remaining residual, and (plan_pull) μ·(W − W0): the write's pull towards W0
        parts = []
        for layer in chosen:
            mu = self.norm_weight(layer, len(requests))
            parts.append((self.keys(layer, requests, prefixes), self.projector(layer), self.cp.get(layer),
                          self.hparams.L2 + mu, layer, 1.0 / (n_layers - self.layers.index(layer)),
                          mu * self.drift(layer) if mu and self.hparams.plan_pull else None))

        def chain(queries_of) -> tuple[torch.Tensor, torch.Tensor | None]:
            """What the layers realise at the queries, as D·A + B: A = Σ_i C_i G_i(Q_i) s_i, C_0 = I,
            C_{i+1} = C_i (I − s_i G_i(K_i)) when each layer writes its share s_i of what the layers below left (keys
            frozen at the plan); B (None without a pull) = Σ_i c_i(Q_i) − E_i G_i(Q_i) s_i, the pulls
            c_i(Q) = −μ_i (W_i − W0_i) P_i M_i⁻¹ Q and what they leave to the layers above, E_0 = 0,
            E_{i+1} = E_i (I − s_i G_i(K_i)) + c_i(K_i)."""
            n = parts[0][0].shape[1]
            eye = torch.eye(n, device=parts[0][0].device)
            carry, total, offset, behind = eye, 0.0, None, None
            for keys, proj, prev, l2, layer, share, pulled in parts:
                pull = pulled is not None
                g_q, r_q = _split(metake_transfer(keys, proj, prev, l2, queries_of(layer), with_response=pull))
                g_k, r_k = _split(metake_transfer(keys, proj, prev, l2, with_response=pull))
                total = total + carry @ g_q * share
                carry = carry @ (eye - g_k * share)
                if behind is not None:
                    offset = offset - behind @ g_q * share
                    behind = behind @ (eye - g_k * share)
                if pulled is not None:
                    offset = (0.0 if offset is None else offset) - pulled @ r_q
                    behind = (0.0 if behind is None else behind) - pulled @ r_k
            return total, offset

        def transfer(ids: list[list[int]], index: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
            mix, offset = chain(lambda layer: read_rows(self.model, self.tokenizer, self.paths[layer], ids, index,
                                                        inputs=True).float().T)
            return mix, None if offset is None else offset.T

        with self.frozen_below(last):
            target = optimize_targets(self.model, self.tokenizer, self.arch.layer_path(last, ""), requests, prefixes,
                                      self.hparams, transfer=transfer, max_norm_factor=self.hparams.max_plan_factor)
        keys_at = {layer: part[0] for layer, part in zip(chosen, parts)}
        plan, offset = chain(keys_at.__getitem__)  # [n, n] (+ [hidden, n]): what the write realises at the keys
        predicted = plan.T @ target.delta
        if offset is not None:
            predicted = predicted + offset.T
        # the planned residual's realisation as the proxy predicts it, [n, hidden] (`proxy_ratio` in the stats)
        return target, {"gate": [float(g) for g in plan.diagonal()], "_predicted": predicted}


def _split(transfer) -> tuple:
    """`metake_transfer`'s result as (G, response or None)."""
    return transfer if isinstance(transfer, tuple) else (transfer, None)
