"""REPAIR (arXiv 2510.01879; its README in shared/papers): WISE plus the paper's mechanisms and one of ours, each
behind its own flag, as strategy objects on WISE's bank (methods/repair_mechanisms.py).

1. `error_feedback` (closed loop): after a call's edits are written, they, the other edits of the shards they
   went into and every edit of a memory the call merged are checked (greedy exact match of the target under
   teacher forcing with the prompt's routing). Failures join an error pool. Blame: each pooled edit counts
   against the memory that routed it (an unrouted one: the memory holding it); with r_j the share of memory j's
   edits blamed on it, when max r_j > `prune_threshold` (0.85, the paper's) or the pool holds more than
   `pool_threshold` edits, the pool is reintegrated: its edits leave their shards (retrained, their merges
   recomputed) and are written, in joint batches of at most `save_freq`, into fresh memories initialised at
   `reinit_sigma` noise that are never merged, so a merge cannot lose them again (the paper re-initialises the
   worst shard in place and re-merges it, which recreated the merge's loss). Then the touched edits are checked
   again; with `keep_if_better` (ours) a reintegration that leaves no more of them passing is rolled back, at no
   cost to the pool. At most `max_retries` reintegrations per call, and an edit leaves the pool (staying where
   it was written last) once it has been through `max_retries` of them.
2. `similarity_batching`: the call's edits are grouped by cosine similarity of their features (the edited
   layer's input at the last prompt token): seed = the edit with the highest mean similarity to the others,
   batch = it and its `batch_size` - 1 nearest; repeat on the rest. Off: batches of `batch_size` in order.
   `batching="spread"` (ours) keeps those batches' sizes but puts each edit where it is least similar. A call of
   at most `batch_size` edits (a stream of single edits) has nothing to group.
3. `distillation` (in-batch): the seed is the teacher; with o_i the edited layer's output at the last prompt
   token, L_KD = kd_weight * mean(1 - cos(o_i, o_0)) + kd_mse * mean ||o_i - mean(o)||^2
   (+ kd_logit_weight * KL of the next-token distributions at temperature kd_temperature). After training, members
   whose unweighted distance 1 - cos(o_i, o_0) exceeds `kd_threshold` leave the batch (which is retrained without
   them) and are re-clustered with the call's remaining edits, once each.
4. `loss_aware_merge`: shard weights w_i = n softmax(-merge_temperature * L_i) in the merge, with L_i the shard's
   mean training loss (off: equal weights). `merge_alg="consensus"` is the paper's merge rule (its Algorithm 4:
   per entry the weighted sum where the shards agree in sign, else the largest weighted entry; no trim); TIES
   (the README's `merge_strategy`) weighs only entries two trimmed shards share.
5. `progressive` (the README's progressive adaptive intervention) and `monitor` (its in-loop monitoring): per-edit
   strengths that decay once an edit's loss is below `threshold` (by `decay_factor`, floored at
   `min_intervention`), stagnation that lowers the learning rate, divergence that rolls the memory back to its
   best step (`repair_mechanisms.Steer` defines each precisely).
6. `merge_fit` (ours, WISE's option: `Wise._merge_group`).

Every mechanism counts how often it fired in `counts` (kept with the state; each edit's stats carry them).

Undo replays: the editor rebuilds the state from the last snapshot before the edit and re-applies the later calls
without it, so batching, distillation bounces and the feedback loop are recomputed as in a stream that never
received the edit (retraining only the edit's shards kept the decisions taken while it was there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .base import register
from .repair_mechanisms import Distillation, Feedback, LossAwareMerge, SimilarityBatching, Steer
from .wise import Mechanisms, Wise, WiseHparams

COUNTS = ("groupings", "reclustered", "merges_weighted", "weight_spread", "weight_reach", "triggers",
          "reintegrations", "fresh_memories", "recovered", "rejected", "given_up", "decays", "lr_adjusts",
          "rollbacks")


@dataclass
class RepairHparams(WiseHparams):
    edit_lr: float = 0.9
    n_iter: int = 30
    act_margin: list[float] = field(default_factory=lambda: [2.0, 20.0, 10.0])
    save_freq: int = 5
    merge_freq: int = 15
    # the mechanisms
    error_feedback: bool = True
    similarity_batching: bool = True
    distillation: bool = True
    loss_aware_merge: bool = True
    progressive: bool = True
    # off: on the dev world it changed nothing (T = 100: the same scores with it, off, or raising the lr instead),
    # and on random tiny models its learning-rate changes stopped 40-step SGD writes that take without it
    monitor: bool = False
    # closed-loop feedback
    prune_threshold: float = 0.85  # reintegrate when a memory's error rate exceeds this (the paper's tau_prune)
    pool_threshold: int = 8  # ... or when the error pool holds more edits than this
    max_retries: int = 2  # reintegrations per call at most
    keep_if_better: bool = True  # undo a reintegration that leaves fewer of the edits it touched passing
    reinit_sigma: float = 1e-3
    # batching and distillation
    batch_size: int = 4
    batching: str = "similar"  # "similar" (the paper: a batch is a seed and its nearest) or "spread" (ours, see doc)
    kd_weight: float = 1.0
    kd_mse: float = 0.0  # 0.01 let the squared feature distances (~1e2-1e3) swamp the edit loss
    kd_logit_weight: float = 0.0
    kd_temperature: float = 2.0
    kd_threshold: float = 1.0  # a member whose distance 1 - cos to the teacher stays above this leaves its batch
    # loss-aware merge
    merge_temperature: float = 1.0
    # progressive intervention and in-loop monitoring (the README's names and values where it gives them)
    threshold: float = 0.01  # an edit whose cross-entropy is below this has its strength decayed
    decay_factor: float = 0.95
    min_intervention: float = 0.1
    patience: int = 10  # steps without a `stagnation_tol` relative improvement before the lr is adjusted
    stagnation_tol: float = 0.01
    stagnation_lr_factor: float = 0.5  # x this when the loss oscillates, / this on a plateau
    max_lr_adjusts: int = 2  # per write at most
    divergence_factor: float = 10.0  # a loss above this x the best (or not finite) rolls back to the best step

    checks: ClassVar[dict[str, tuple | str]] = {
        "prune_threshold": "[0, 1]", "pool_threshold": ">= 0", "max_retries": ">= 0", "reinit_sigma": ">= 0",
        "batch_size": ">= 1", "batching": ("similar", "spread"), "kd_weight": ">= 0", "kd_mse": ">= 0",
        "kd_logit_weight": ">= 0", "kd_temperature": "> 0", "merge_temperature": ">= 0",
        "threshold": ">= 0", "decay_factor": "(0, 1]", "min_intervention": "(0, 1]", "patience": ">= 1",
        "stagnation_tol": ">= 0", "stagnation_lr_factor": "(0, 1]", "max_lr_adjusts": ">= 0",
        "divergence_factor": "> 1"}


@register("repair")
class Repair(Wise):
    Hparams = RepairHparams
    # WISE's world settings (with its refit of a merge that loses its own edits, merge_fit); REPAIR keeps WISE's
    # margins, distils at 0.1 and spreads each call's similar edits over different shards (docs/methods/wise_repair.md)
    # (mask_ratio stays 0.2 for REPAIR: WISE's choice of 0.5 was made for WISE alone; REPAIR's sweep is in the doc)
    world_preset = {**Wise.world_preset, "batch_size": 8, "act_margin": [5.0, 20.0, 10.0], "batching": "spread",
                    "kd_weight": 0.1, "mask_ratio": 0.2}
    bench_batch = 32  # REPAIR forms its batches from a call's edits
    easyedit_names = ("wise", "repair")  # REPAIR reads WISE's files (WISE's rules)
    # stores made before progressive intervention and monitoring existed trained without them (their feedback
    # and distillation filter follow the current rules when a replay recomputes them)
    stored_defaults = {**Wise.stored_defaults, "progressive": False, "monitor": False}

    @property
    def snapshots(self) -> bool:
        """Undo replays from the last snapshot (see `remove`), except with `undo="tombstone"`, which never replays:
        there every undo would drop the snapshots after its edit and the next edit take one again, a cost that grows
        with the store. A store switched to a replaying mode later replays from the base model."""
        return self.hparams.undo != "tombstone"

    def _mechanisms(self) -> Mechanisms:
        hp = self.hparams
        return Mechanisms(
            batches=SimilarityBatching(self) if hp.similarity_batching else lambda ids: [
                ids[i: i + hp.batch_size] for i in range(0, len(ids), hp.batch_size)],
            distill=Distillation(self) if hp.distillation else None,
            weigh=LossAwareMerge(self) if hp.loss_aware_merge else None,
            feedback=Feedback(self) if hp.error_feedback else None,
            steer=(lambda d, inp: Steer(self, d, inp)) if hp.progressive or hp.monitor else None)

    def reset(self) -> None:
        super().reset()
        self.counts: dict[str, float] = dict.fromkeys(COUNTS, 0)
        if self.mech.feedback is not None:
            self.mech.feedback.load({})

    def _edit_stats(self, edit_id: int, loss: float) -> dict[str, Any]:
        return {**super()._edit_stats(edit_id, loss), "mechanisms": dict(self.counts)}

    def remove(self, edit_id: int) -> bool:
        """Undo by replay (the editor re-applies the later calls from the last snapshot without the edit), so the
        batches, distillation bounces and feedback decisions are recomputed as if the edit had never been received;
        retraining only the edit's shards would keep decisions taken while it was there. Tombstone undo as WISE."""
        if self.hparams.undo == "tombstone" or edit_id not in self.requests or edit_id in self.ghosts:
            return super().remove(edit_id)
        return False  # "retrain" and "retrain+tombstone": replayed (the tombstone is laid in `replay_restore`)

    def replay_carry(self) -> Any:
        return {k: v.clone() for k, v in self.tombs.items()}, list(self.ghosts)

    def replay_restore(self, carry: Any, edit_id: int, request) -> None:
        tombs, ghosts = carry
        self.tombs.update(tombs)
        self.ghosts = sorted(set(self.ghosts) | set(ghosts))
        if self.hparams.undo != "retrain":  # the key the undone edit had (the base model's, so the same)
            self.tombs[edit_id] = self.activations([request.prompt], with_keys=True)[1][0]
        self._stack = None

    def _meta(self) -> dict[str, Any]:
        fb = self.mech.feedback
        return {**super()._meta(), "counts": dict(self.counts), **(fb.state() if fb is not None else {})}

    def _load_extra(self, meta: dict[str, Any]) -> None:
        self.counts.update(meta.get("counts", {}))
        if self.mech.feedback is not None:
            self.mech.feedback.load(meta)
