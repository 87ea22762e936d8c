"""REPAIR's mechanisms as strategy objects on WISE's bank (`wise.Mechanisms`); each counts how often it fires
into `repair.counts`. The equations and their departures from the paper are in methods/repair.py's docstring.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .base import stable_seed
from .merging import trim
from .wise import Shard

if TYPE_CHECKING:
    from .repair import Repair


class SimilarityBatching:
    """A call's edits -> batches of `batch_size`: a seed (the highest mean cosine similarity of features) and its
    nearest ("similar", the paper), or those batches' sizes with each edit put where it is least similar ("spread")."""

    def __init__(self, repair: Repair) -> None:
        self.r = repair

    def __call__(self, ids: list[int]) -> list[list[int]]:
        b = self.r.hparams.batch_size
        if len(ids) <= b:  # nothing to group: a call of at most one batch
            return [ids]
        self.r.counts["groupings"] += 1
        feats = F.normalize(torch.stack([self.r.acts[e] for e in ids]), dim=1)
        sim = feats @ feats.T
        similar = similar_batches(sim, b)
        if self.r.hparams.batching == "similar":
            return [[ids[k] for k in batch] for batch in similar]
        out: list[list[int]] = [[] for _ in similar]
        for k in [k for batch in similar for k in batch]:
            room = [j for j, batch in enumerate(out) if len(batch) < len(similar[j])]
            j = min(room, key=lambda j: max((float(sim[k, m]) for m in out[j]), default=-2.0))
            out[j].append(k)
        return [[ids[k] for k in batch] for batch in out]


def similar_batches(sim: torch.Tensor, b: int) -> list[list[int]]:
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


class Distillation:
    """In-batch distillation: member 0 (the seed) teaches; after training, members whose own feature distance to
    the teacher (1 - cos, unweighted) stays above `kd_threshold` leave the batch, once each."""

    def __init__(self, repair: Repair) -> None:
        self.r = repair
        self.out: torch.Tensor | None = None  # the memory layer's output in the current training forward (the hook)

    def terms(self, logits: torch.Tensor, inp: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(each member's weighted KD loss [n], its unweighted feature distance 1 - cos to the teacher [n])."""
        hp = self.r.hparams
        if "own_rows" not in inp:  # each member's own prompt (its first row)
            owner = inp["owner"]
            inp["own_rows"] = torch.stack([(owner == k).nonzero()[0, 0] for k in range(int(owner.max()) + 1)])
        rows = inp["own_rows"]
        qi = inp["batch"].query_index[rows]
        o = self.out[rows, qi].float()
        dist = 1 - F.cosine_similarity(o, o[0].detach()[None], dim=1)
        per = hp.kd_weight * dist + hp.kd_mse * (o - o.mean(dim=0, keepdim=True)).pow(2).sum(dim=1)
        if hp.kd_logit_weight:
            t = hp.kd_temperature
            logp = F.log_softmax(logits[rows, qi].float() / t, dim=-1)
            per = per + hp.kd_logit_weight * t * t * F.kl_div(
                logp, logp[0].detach()[None].expand_as(logp), log_target=True, reduction="none").sum(-1)
        return per, dist

    def loss(self, logits: torch.Tensor, inp: dict[str, Any]) -> torch.Tensor | None:
        if int(inp["owner"].max()) < 1:
            return None
        self.inp = inp
        return self.terms(logits, inp)[0].mean()

    def write(self, shard: Shard, ids: list[int], bounced: set[int]) -> list[int]:
        """Write a batch; members whose feature distance stays high (and were not sent back before) come back out."""
        r = self.r
        if len(ids) < 2:
            r._write(shard, ids)
            return []
        before = (shard.delta, list(shard.history), list(shard.losses), list(shard.members))
        r._write(shard, ids)
        with torch.no_grad(), r.training(shard.delta):
            batch = self.inp["batch"]
            logits = r.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            dist = self.terms(logits, self.inp)[1].tolist()
        out = [e for e, k in zip(ids[1:], dist[1:]) if k > r.hparams.kd_threshold and e not in bounced]
        if out:
            r.counts["reclustered"] += len(out)
            shard.delta, shard.history, shard.losses, shard.members = before
            r._write(shard, [e for e in ids if e not in out])
        return out


class LossAwareMerge:
    """Shard weights w_i = n softmax(-merge_temperature L_i) (L_i: the shard's mean training loss). Logs the
    weights' spread and the share of entries where they can act (two or more shards non-zero after TIES's trim)."""

    def __init__(self, repair: Repair) -> None:
        self.r = repair

    def __call__(self, shards: list[Shard]) -> list[float]:
        hp = self.r.hparams
        losses = torch.tensor([s.loss for s in shards])
        w = (torch.softmax(-hp.merge_temperature * losses, dim=0) * len(shards)).tolist()
        c = self.r.counts
        c["merges_weighted"] += 1
        c["weight_spread"] += max(w) - min(w)
        density = hp.densities if hp.merge_alg == "ties" else 1.0
        nonzero = sum((trim(s.delta, density) != 0).float() for s in shards)
        c["weight_reach"] += float((nonzero >= 2).float().mean())
        return w


class Feedback:
    """Closed-loop error feedback (see repair.py): check, pool the failures, blame the memory that routed each,
    reintegrate the pool into a fresh memory of its own when a memory's error rate or the pool is too large."""

    def __init__(self, repair: Repair) -> None:
        self.r = repair
        self.pool: list[int] = []  # edits that failed their check
        self.attempts: dict[int, int] = {}  # edit id -> reintegrations it went through

    def forget(self, edit_id: int) -> None:
        self.pool = [e for e in self.pool if e != edit_id]
        self.attempts.pop(edit_id, None)

    def state(self) -> dict[str, Any]:
        return {"pool": list(self.pool), "attempts": {str(k): v for k, v in self.attempts.items()}}

    def load(self, meta: dict[str, Any]) -> None:
        self.pool = list(meta.get("pool", []))
        self.attempts = {int(k): int(v) for k, v in meta.get("attempts", {}).items()}

    def after(self, ids: list[int], merged_from: int) -> dict[str, Any]:
        """Check the call's edits, every edit of the shards it wrote into and of the memories it merged (writing and
        merging are what break them); then reintegrate while a trigger holds (at most `max_retries` times)."""
        r, hp = self.r, self.r.hparams
        ids = ids + [e for s in r.shards if (s.history and any(i in s.history[-1] for i in ids))
                     or (s.group is not None and s.group >= merged_from) for e in s.members if e not in ids]
        ok = r.check(ids)
        self.pool += [e for e, good in zip(ids, ok) if not good and e not in self.pool]
        retries = 0
        while self.pool and retries < hp.max_retries and self.triggered():
            retries += 1
            r.counts["reintegrations"] += 1
            moved = list(self.pool)
            touched = self.touched(moved)
            before, was = r.checkpoint(), r.check(touched)
            self.reintegrate(moved)
            now = r.check(touched)
            if hp.keep_if_better and sum(now) <= sum(was):
                counts = dict(r.counts)
                r.restore(before)  # it lost more than it fixed: the memories stay as they were
                r.counts.update(counts, rejected=counts["rejected"] + 1)
                break  # no attempt spent; the same state would give the same result
            passed = {e for e, good in zip(touched, now) if good}
            r.counts["recovered"] += len(set(moved) & passed)
            self.pool = [e for e in self.pool if e not in passed]
            for e in self.pool:  # max_retries reintegrations in all, then an edit stays where it is, out of the pool
                self.attempts[e] = self.attempts.get(e, 0) + 1
            done = [e for e in self.pool if self.attempts[e] >= hp.max_retries]
            r.counts["given_up"] += len(done)
            self.pool = [e for e in self.pool if e not in done]
        return {"retries": retries, "pool": len(self.pool)}

    def blame(self) -> dict[int, float]:
        """Each memory's error rate: the pool's edits it routed (an unrouted edit: the memory holding it) over the
        edits it holds."""
        r = self.r
        mems = r._memories()
        routed = r.route_rows(torch.stack([r.acts[e] for e in self.pool]), torch.stack([r.keys[e] for e in self.pool]))
        rates: dict[int, float] = {}
        for e, j in zip(self.pool, routed.tolist()):
            if j < 0:
                j = next((k for k, (_, held) in enumerate(mems) if e in held), -1)
            if j >= 0:
                rates[j] = rates.get(j, 0.0) + 1.0 / max(len(mems[j][1]), 1)
        return rates

    def triggered(self) -> bool:
        hp = self.r.hparams
        rates = self.blame()
        fire = max(rates.values(), default=0.0) > hp.prune_threshold or len(self.pool) > hp.pool_threshold
        self.r.counts["triggers"] += fire
        return fire

    def touched(self, moved: list[int]) -> list[int]:
        """The edits a reintegration can move: the pool and every edit of the memories that hold one of them."""
        r = self.r
        shards = {i for i, s in enumerate(r.shards) if set(s.members) & set(moved)}
        groups = {r.shards[i].group for i in shards} - {None}
        out = set(moved)
        for k, s in enumerate(r.shards):
            if k in shards or s.group in groups:
                out.update(s.members)
        return sorted(out)

    def reintegrate(self, moved: list[int]) -> None:
        """The moved edits leave their shards (retrained, their merges recomputed, so no trace of them still routes)
        and are written, in joint batches of at most `save_freq`, into fresh memories of their own (initialised at
        `reinit_sigma` noise, never merged, so no merge can lose them again)."""
        r, hp = self.r, self.r.hparams
        for s in [s for s in r.shards if set(s.members) & set(moved)]:
            s.members = [e for e in s.members if e not in moved]
            s.history = [[e for e in b if e not in moved] for b in s.history]
            r._retrain(s)
        at = len(r.shards) - (0 if not r.shards or r.shards[-1].closed else 1)  # the open shard stays last
        for k in range(0, len(moved), hp.save_freq):
            r.counts["fresh_memories"] += 1
            shard = Shard(seed=stable_seed(hp.seed, "reinit", r.counts["fresh_memories"]), sigma=hp.reinit_sigma,
                          closed=True, standalone=True)
            shard.delta = r._init_delta(shard)
            r._write(shard, moved[k: k + hp.save_freq])
            r.shards.insert(at, shard)
            at += 1
        r._stack = None


class Steer:
    """One fit's progressive adaptive intervention and in-loop monitoring (flags `progressive`, `monitor`).

    Progressive: each edit of the batch has a strength s_e (1 at the start of the fit); after each forward, every
    edit whose own cross-entropy is below `threshold` has s_e <- max(min_intervention, decay_factor s_e), and its
    terms (cross-entropy and margins) are weighed by s_e, so an edit the memory already writes pulls on it less.
    Monitoring: a loss that has not improved on the best by `stagnation_tol` (relative) for `patience` steps
    multiplies the learning rate by `stagnation_lr_factor` when the loss rose above its best meanwhile (it
    oscillates) and divides it by that factor otherwise (a plateau), at most `max_lr_adjusts` times; a loss that
    is not finite or exceeds `divergence_factor` x the best rolls D back to the best step's and ends the fit
    (instead of writing a broken memory)."""

    def __init__(self, repair: Repair, d: torch.Tensor, inp: dict[str, Any]) -> None:
        self.r, self.d, self.inp = repair, d, inp
        n = int(inp["owner"].max()) + 1
        self.strength = torch.ones(n, device=d.device)
        self.best, self.best_d, self.since, self.rolled_back, self.adjusts = math.inf, None, 0, False, 0
        self.rose = False  # the loss rose above its best since the last improvement
        self.plain = math.inf  # the unweighted loss of the last forward

    def loss(self, logits: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        hp, batch, owner = self.r.hparams, self.inp["batch"], self.inp["owner"]
        labels = batch.labels[:, 1:]
        tok = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="none")
        tok = tok.view_as(labels)
        valid = (labels != -100).float()
        n_tok = valid.sum().clamp_min(1)
        plain = tok.sum() / n_tok + margin.mean()
        self.plain = float(plain.detach())
        if not hp.progressive:
            return plain
        w = self.strength[owner]
        weighted = (tok.sum(dim=1) * w).sum() / n_tok + (margin * self.strength).mean()
        with torch.no_grad():  # each edit's own cross-entropy (over its rows' target tokens)
            per = torch.zeros_like(self.strength).index_add_(0, owner, tok.sum(dim=1))
            per = per / torch.zeros_like(self.strength).index_add_(0, owner, valid.sum(dim=1)).clamp_min(1)
            easy = (per < hp.threshold) & (self.strength > hp.min_intervention)
            self.r.counts["decays"] += int(easy.sum())
            self.strength = torch.where(easy, (self.strength * hp.decay_factor).clamp_min(hp.min_intervention),
                                        self.strength)
        return weighted

    def monitor(self, step: int, loss: float, opt: torch.optim.Optimizer) -> bool:
        hp = self.r.hparams
        if not hp.monitor:
            return False
        loss = self.plain
        if not math.isfinite(loss) or (self.best_d is not None and loss > hp.divergence_factor * self.best):
            if self.best_d is None:
                return False  # nothing to roll back to: the usual divergence error
            self.r.counts["rollbacks"] += 1
            self.rolled_back = True
            return True
        if loss < self.best * (1 - hp.stagnation_tol):
            self.since, self.rose = 0, False
        else:
            self.since += 1
            self.rose |= loss > self.best * (1 + hp.stagnation_tol)
            if self.since >= hp.patience and self.adjusts < hp.max_lr_adjusts:
                # oscillating (the loss rose above its best meanwhile): smaller steps; a plateau: larger ones
                factor = hp.stagnation_lr_factor if self.rose else 1 / hp.stagnation_lr_factor
                self.adjusts += 1
                self.r.counts["lr_adjusts"] += 1
                for group in opt.param_groups:
                    group["lr"] *= factor
                self.since, self.rose = 0, False
        if loss < self.best:
            self.best, self.best_d = loss, self.d.detach().clone()
        return False

    def result(self, last: float) -> tuple[torch.Tensor, float]:
        """(the trained D, its unweighted loss): the best step's after a rollback."""
        if self.rolled_back:
            return self.best_d, self.best
        return self.d.detach(), self.plain if self.r.hparams.progressive else last
