"""REPAIR (arXiv 2510.01879): WISE plus the paper's four mechanisms and one of ours, each behind its own flag.

1. `error_feedback` (closed loop): after a call's edits are written, they, the other edits of the shards they
   went into and every edit of a memory the call merged are checked (greedy exact match of the
   target, computed as "argmax right at every target position" under teacher forcing with the prompt's routing,
   which is the same test in one forward). Failures join an error pool. With r_i the share of shard i's edits in
   the pool, when max r_i > `prune_threshold` or the pool holds more than `pool_threshold` edits, the worst
   shard is re-initialised (D = `reinit_sigma` * noise, a new mask) and re-edited with its edits plus the pool
   (reintegration; the pool's edits move to it); then they are checked again. With `keep_if_better` (a guard of
   ours) a reintegration that leaves no more of the edits it touched passing is rolled back. At most `max_retries`
   reintegrations per call, and an edit leaves the pool (staying where it was written last) once it has been
   through `max_retries` reintegrations, so a stream of hopeless edits cannot make every later call retrain.
2. `similarity_batching`: the call's edits are grouped by cosine similarity of their features (the edited
   layer's input at the last prompt token): seed = the edit with the highest mean similarity to the others,
   batch = it and its `batch_size` - 1 nearest; repeat on the rest. Off: batches of `batch_size` in order.
   `batching="spread"` (ours) keeps those batches' sizes but puts each edit, group by group, into the batch with
   room whose members it is least similar to, so similar edits land in different shards: in one joint batch they
   interfere (docs/methods/wise_repair.md measures it).
3. `distillation` (in-batch): the seed is the teacher; with o_i the edited layer's output at the last prompt
   token, L_KD = kd_weight * mean(1 - cos(o_i, o_0)) + kd_mse * mean ||o_i - mean(o)||^2
   (+ kd_logit_weight * KL of the next-token distributions at temperature kd_temperature). After training, members
   whose own KD loss exceeds `kd_threshold` leave the batch (which is retrained without them) and are
   re-clustered with the call's remaining edits, once each.
4. `loss_aware_merge`: shard weights w_i = softmax(-merge_temperature * L_i) in the merge, with L_i the shard's
   mean training loss (off: equal weights). Frequent merging is the default cadence (`save_freq` 5,
   `merge_freq` 15 as in the paper's code).
5. `merge_fit` (ours, off by default; on in the world presets): merging is where edits are lost (edits that fail
   at the end were routed to their own memory, a merged one; docs/methods/wise_repair.md). After each merge the
   merged memory alone is checked on its edits; if any fails, it is refit on all of them jointly from the merged
   weights (n_iter steps, the full mask, REPAIR's losses). The refit is a function of the group's shards and
   edits, so a merge recomputed after an undo redoes it and undo stays exact.

Undo replays: the editor rebuilds the state from the last snapshot before the edit and re-applies the later calls
without it, so batching, distillation bounces and the feedback loop (pool, reintegrations, seeds) are recomputed as
in a stream that never received the edit (retraining only the edit's shards, as WISE does, kept the decisions
taken while it was there). An undo costs at most `snapshot_every` edits of replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .base import EditItem, register, stable_seed
from .wise import Shard, Wise, WiseHparams


@dataclass
class RepairHparams(WiseHparams):
    edit_lr: float = 0.9
    n_iter: int = 30
    act_margin: list[float] = field(default_factory=lambda: [2.0, 20.0, 10.0])
    save_freq: int = 5
    merge_freq: int = 15
    # the four mechanisms
    error_feedback: bool = True
    similarity_batching: bool = True
    distillation: bool = True
    loss_aware_merge: bool = True
    # closed-loop feedback
    prune_threshold: float = 0.5  # re-initialise the worst shard when its error rate exceeds this
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
    kd_threshold: float = 1.0  # a member whose KD loss stays above this leaves its batch (0.5 sent 3 of 4 back)
    # loss-aware merge
    merge_temperature: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1 or self.max_retries < 0 or self.pool_threshold < 0:
            raise ValueError("batch_size must be >= 1, max_retries and pool_threshold >= 0")
        if not 0 <= self.prune_threshold <= 1:
            raise ValueError("prune_threshold must be in [0, 1]")
        if self.batching not in ("similar", "spread"):
            raise ValueError(f"batching must be 'similar' or 'spread', got {self.batching!r}")
        if self.kd_temperature <= 0 or self.reinit_sigma < 0:
            raise ValueError("kd_temperature must be > 0 and reinit_sigma >= 0")


@register("repair")
class Repair(Wise):
    Hparams = RepairHparams
    snapshots = True  # undo replays from the last snapshot (see `remove`)
    # WISE's world settings; REPAIR keeps WISE's margins, distils at 0.1, spreads each call's similar edits over
    # different shards and refits a merge that loses its own edits (docs/methods/wise_repair.md: why, measured)
    world_preset = {**Wise.world_preset, "batch_size": 8, "act_margin": [5.0, 20.0, 10.0], "batching": "spread",
                    "kd_weight": 0.1, "merge_fit": True}
    bench_batch = 32  # REPAIR forms its batches from a call's edits
    easyedit_names = ("wise", "repair")  # REPAIR reads WISE's files (WISE's rules)

    def reset(self) -> None:
        super().reset()
        self.pool: list[int] = []  # edits that failed their check
        self.attempts: dict[int, int] = {}  # edit id -> reintegrations it went through
        self.given_up = 0  # edits dropped from the pool after max_retries reintegrations
        self.reinits = 0
        self.rejected = 0  # reintegrations undone because they left fewer edits passing
        self._train_out: torch.Tensor | None = None
        self._kd_rows: torch.Tensor | None = None

    # -- batching -----------------------------------------------------------------------------------
    def _batches(self, ids: list[int]) -> list[list[int]]:
        b = self.hparams.batch_size
        if not self.hparams.similarity_batching or len(ids) <= b:
            return [ids[i : i + b] for i in range(0, len(ids), b)]
        feats = F.normalize(torch.stack([self.acts[e] for e in ids]), dim=1)
        sim = feats @ feats.T
        similar = self._similar_batches(sim, b)
        if self.hparams.batching == "similar":
            return [[ids[k] for k in batch] for batch in similar]
        # "spread": batches of the same sizes; each edit, taken group by group, joins the batch with room whose
        # members it is least similar to
        out: list[list[int]] = [[] for _ in similar]
        for k in [k for batch in similar for k in batch]:
            room = [j for j, batch in enumerate(out) if len(batch) < len(similar[j])]
            j = min(room, key=lambda j: max((float(sim[k, m]) for m in out[j]), default=-2.0))
            out[j].append(k)
        return [[ids[k] for k in batch] for batch in out]

    @staticmethod
    def _similar_batches(sim: torch.Tensor, b: int) -> list[list[int]]:
        """Indices into sim's rows: a seed (highest mean similarity) and its b - 1 nearest, repeated on the rest."""
        left, out = list(range(sim.shape[0])), []
        while left:
            sub = sim[left][:, left]
            seed = int(sub.mean(dim=1).argmax())
            near = sub[seed].argsort(descending=True, stable=True)[:b].tolist()
            take = [left[seed]] + [left[k] for k in near if k != seed][: b - 1]
            out.append(take)
            left = [k for k in left if k not in take]
        return out

    # -- distillation -------------------------------------------------------------------------------
    def _hook(self, module, inputs, output):
        out = super()._hook(module, inputs, output)
        if self.trainee is not None:
            self._train_out = out
        return out

    def _kd_terms(self, logits: torch.Tensor, inp: dict[str, Any]) -> torch.Tensor:
        """Per-member KD loss of a batch ([n]; the teacher, member 0, has zero cosine term)."""
        hp, rows = self.hparams, inp["own_rows"]
        qi = inp["batch"].query_index[rows]
        o = self._train_out[rows, qi].float()
        teacher = o[0].detach()
        per = hp.kd_weight * (1 - F.cosine_similarity(o, teacher[None], dim=1))
        per = per + hp.kd_mse * (o - o.mean(dim=0, keepdim=True)).pow(2).sum(dim=1)
        if hp.kd_logit_weight:
            t = hp.kd_temperature
            logp = F.log_softmax(logits[rows, qi].float() / t, dim=-1)
            per = per + hp.kd_logit_weight * t * t * F.kl_div(
                logp, logp[0].detach()[None].expand_as(logp), log_target=True, reduction="none").sum(-1)
        return per

    def _extra_loss(self, logits: torch.Tensor, inp: dict[str, Any]) -> torch.Tensor | None:
        if not self.hparams.distillation or len(inp["own_rows"]) < 2:
            return None
        return self._kd_terms(logits, inp).mean()

    def _batch_inputs(self, ids: list[int]) -> dict[str, Any]:
        inp = super()._batch_inputs(ids)
        owner = inp["owner"]
        inp["own_rows"] = torch.tensor([int((owner == k).nonzero()[0]) for k in range(len(ids))], device=owner.device)
        return inp

    def _write_filtered(self, shard: Shard, ids: list[int], bounced: set[int]) -> list[int]:
        """Write a batch; members whose KD loss stays high (and were not bounced before) come back out."""
        if not self.hparams.distillation or len(ids) < 2:
            self._write(shard, ids)
            return []
        before = (shard.delta, list(shard.history), list(shard.losses), list(shard.members))
        self._write(shard, ids)
        kd = self._last_kd
        out = [e for e, k in zip(ids[1:], kd[1:].tolist()) if k > self.hparams.kd_threshold and e not in bounced]
        if out:
            shard.delta, shard.history, shard.losses, shard.members = before
            keep = [e for e in ids if e not in out]
            self._write(shard, keep)
        return out

    def _train_batch(self, delta, mask, ids):
        inp = self._batch_inputs(ids)
        d, loss = self._fit(delta, mask, inp)
        self._last_kd = torch.zeros(len(ids))
        if self.hparams.distillation and len(ids) > 1:
            self._last_kd = self._final_kd(d, inp)
        return d, loss

    @torch.no_grad()
    def _final_kd(self, d: torch.Tensor, inp: dict[str, Any]) -> torch.Tensor:
        """Each member's KD loss under the trained D (reusing the batch the training used)."""
        batch = inp["batch"]
        with self.training(d):
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return self._kd_terms(logits, inp).cpu()

    # -- closed-loop error feedback -------------------------------------------------------------------
    def _owner(self, edit_id: int) -> int | None:
        for i, s in enumerate(self.shards):
            if edit_id in s.members:
                return i
        return None

    def _feedback(self, ids: list[int]) -> dict[str, Any]:
        hp = self.hparams
        ok = self.check(ids)
        self.pool += [e for e, good in zip(ids, ok) if not good and e not in self.pool]
        retries = 0
        while self.pool and retries < hp.max_retries:
            rates: dict[int, float] = {}
            for e in self.pool:
                o = self._owner(e)
                if o is not None:
                    rates[o] = rates.get(o, 0.0) + 1.0 / max(len(self.shards[o].members), 1)
            if not rates:
                break
            worst = max(rates, key=lambda i: (rates[i], i))
            if rates[worst] <= hp.prune_threshold and len(self.pool) <= hp.pool_threshold:
                break
            retries += 1
            touched = self._touched(worst)  # holds the pool, so one check per state covers both uses
            before, was = self.checkpoint(), self.check(touched)
            self._reintegrate(worst)
            now = self.check(touched)
            if hp.keep_if_better and sum(now) <= sum(was):
                reinits = self.reinits
                self.restore(before)  # reintegration lost more than it fixed: keep the memories as they were
                self.reinits, self.rejected = reinits, self.rejected + 1
                break  # it costs the pool nothing (no attempt spent), and retrying the same state gives the same
            passed = {e for e, good in zip(touched, now) if good}
            self.pool = [e for e in self.pool if e not in passed]
            # an edit gets max_retries reintegrations in all, then stays where it is, out of the pool
            for e in self.pool:
                self.attempts[e] = self.attempts.get(e, 0) + 1
            done = [e for e in self.pool if self.attempts[e] >= hp.max_retries]
            self.given_up += len(done)
            self.pool = [e for e in self.pool if e not in done]
        return {"retries": retries, "pool": len(self.pool), "given_up": self.given_up, "rejected": self.rejected}

    def _touched(self, i: int) -> list[int]:
        """The edits a reintegration of shard i can move: the error pool and every edit of the memories that hold
        shard i or one of the pool's shards."""
        shards = {i} | {self._owner(e) for e in self.pool} - {None}
        groups = {self.shards[s].group for s in shards} - {None}
        ids = set(self.pool)
        for k, s in enumerate(self.shards):
            if k in shards or s.group in groups:
                ids.update(s.members)
        return sorted(ids)

    def _reintegrate(self, i: int) -> None:
        """Re-initialise shard i and re-edit its edits plus the error pool (the pool's edits move to it)."""
        shard = self.shards[i]
        moved = [e for e in self.pool if e not in shard.members]
        old = {self._owner(e) for e in moved} - {None, i}
        for o in old:  # the moved edits leave their old shards entirely (no traces that still route)
            s = self.shards[o]
            s.members = [e for e in s.members if e not in moved]
            s.history = [[e for e in b if e not in moved] for b in s.history]
            self._retrain(s)
        self.reinits += 1
        shard.seed = stable_seed(self.hparams.seed, "reinit", self.reinits)
        shard.sigma = self.hparams.reinit_sigma
        shard.members = shard.members + moved
        # one joint batch: edits written one after another into a shared memory overwrite each other, while a
        # joint write holds them all (docs/methods/wise_repair.md)
        shard.history = [list(shard.members)]
        self._retrain(shard)

    # -- the Method protocol ----------------------------------------------------------------------------
    def apply(self, items: list[EditItem]) -> list[dict[str, Any]]:
        self._register(items)
        pending, bounced, losses = [it.id for it in items], set(), {}
        merged_from = len(self.groups)
        hp = self.hparams
        while pending:
            shard = self.open_shard
            # a batch never overfills the open shard nor runs past the next merge (as WISE's chunks): save_freq 5,
            # merge_freq 15 and batches of 4 give shards of 5, 5, 5 merged at 15
            room = max(1, min(hp.save_freq - len(shard.members), hp.merge_freq - self.count % hp.merge_freq))
            batch, *rest = self._batches(pending)
            batch, cut = batch[:room], batch[room:]
            pending = cut + [e for b in rest for e in b]
            back = self._write_filtered(shard, batch, bounced)
            for e in batch:
                if e not in back:
                    losses[e] = shard.losses[-1]
            bounced.update(back)
            pending += back
            self._after_write(len(batch) - len(back))
        info: dict[str, Any] = {"bounced": len(bounced)}
        if self.hparams.error_feedback:
            # the call's edits, every edit of the shards it wrote into and of the memories it merged (writing and
            # merging are what break them)
            ids = [it.id for it in items]
            ids += [e for s in self.shards if (s.history and any(i in s.history[-1] for i in ids))
                    or (s.group is not None and s.group >= merged_from) for e in s.members if e not in ids]
            info.update(self._feedback(ids))
        return [{**self._edit_stats(it.id, losses[it.id]), **info} for it in items]

    def _merge_weights(self, shards: list[Shard]) -> list[float]:
        if not self.hparams.loss_aware_merge:
            return [1.0] * len(shards)
        losses = torch.tensor([s.loss for s in shards])
        return (torch.softmax(-self.hparams.merge_temperature * losses, dim=0) * len(shards)).tolist()

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

    def _forget(self, edit_id: int) -> None:
        self.pool = [e for e in self.pool if e != edit_id]
        self.attempts.pop(edit_id, None)

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "pool": list(self.pool), "reinits": self.reinits, "given_up": self.given_up,
                "rejected": self.rejected,
                "attempts": {str(k): v for k, v in self.attempts.items()}}

    def _load_extra(self, meta: dict[str, Any]) -> None:
        self.pool, self.reinits = list(meta.get("pool", [])), int(meta.get("reinits", 0))
        self.given_up, self.rejected = int(meta.get("given_up", 0)), int(meta.get("rejected", 0))
        self.attempts = {int(k): int(v) for k, v in meta.get("attempts", {}).items()}
