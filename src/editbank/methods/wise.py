"""WISE (Wang et al., arXiv 2405.14768): side memories of one FFN output matrix, chosen per sample by activation.

A side memory is W' = W + D for the MLP output projection W of one layer; only D is trained. For an input whose
FFN activation (the projection's input) at the last prompt token is a, memory j scores Delta_j(a) = ||a D_j^T||.
Each row uses the memory with the highest score if that score exceeds the memory's threshold
eps_j = act_ratio x the lowest score of the edits it holds; otherwise the base model answers. A routed memory adds
x D_j^T to the projection's output at every position (and, in generation, for every generated token).
Options of ours: `route_by="key"` picks the memory holding the edit whose activation is nearest to a (cosine), still
gated by that memory's eps; `key_threshold` also requires that cosine to reach a value (0: off); `key_layer`
takes the routing key (the nearest-edit cosine) at an earlier layer's MLP projection input instead of the memory's
own, where prompts about different subjects are further apart (the score gate stays at the memory's layer);
`pooled_ties` breaks a tie between equally near held keys (two prompts that differ only in their subject can have
the same last-token key on an early layer) by the key layer's input averaged over the prompt's tokens.

Writing a batch of edits into the open shard: SGD (`edit_lr`; `optimizer="adam"` for Adam) on D for up to
`n_iter` steps of
  CE(target | prompt, and the prompt behind `n_prefixes` random corpus prefixes)
  + max(0, Delta(a_irr) - alpha) + max(0, beta - Delta(a_e)) + max(0, gamma - (Delta(a_e) - Delta(a_irr)))
with act_margin = [alpha, beta, gamma] and a_irr the activation of an irrelevant corpus prompt (the two a_irr terms
averaged over `n_irrelevant` of them). Only the entries of the
shard's Bernoulli(`mask_ratio`) mask move, and D is clamped to +-`norm_constraint` elementwise after each step.

Sharding and merging: a shard closes after `save_freq` edits and a new one (its own mask) opens (a call that
would overflow the open shard fills it and goes on into the next, in order, one joint batch per shard); every
`merge_freq` edits the closed shards are merged (`merge_alg`, TIES by default, density `densities`). Retrieve mode
keeps each merge as its own memory; Merge mode folds each merge into one memory.

Every shard is a pure function of (its seed, its init noise, its training history: the ordered batches of edits
it was trained on), and the randomness of an edit (its prefixes and irrelevant prompt) comes from the request and
`seed`, not from the edit's id. So any shard can be retrained, which is how an edit is undone: the edit leaves every
history it is in, those shards are retrained from their seeds and their groups re-merged. For an edit of the open
shard the result is bit-identical to never having written it; for a merged one it equals a stream in which the
edit's slot was empty (shard boundaries stay where they were), at the cost of retraining one shard instead of
replaying every later edit.

`undo` picks how an edit is undone: "retrain" is the above. A tombstone is the undone edit's activation kept as a
key that belongs to no memory: a row whose nearest key it is gets the base model, so the undone prompt answers as
before the edit even where another memory would claim it. "retrain+tombstone" does both; "tombstone" alone
retrains nothing: the edit stays in its shard's weights and threshold (a ghost) but no longer routes, so undo is
instant and every other edit's prompt keeps its output bit for bit.

Hyperparameter names follow EasyEdit's WISE YAML so such files port over.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..models.hooks import trace
from ..requests import EditRequest
from ..tokens import make_batch
from . import easyedit as ee
from .base import Checked, EditItem, Route, pick_layer, register, stable_seed
from .fit import fit, make_optimizer
from .merging import MERGE_METHODS, merge_deltas
from .routed import Routed, prompt_mean

UNDO_MODES = ("retrain", "retrain+tombstone", "tombstone")


@dataclass
class WiseHparams(Checked):
    layer: int | None = None  # decoder layer whose MLP output projection gets the side memory (None: upper-middle)
    # layer=None picks the upper-middle layer but never the model's last (on the dev world the layer below the last
    # wrote more: WISE T = 100 OP 0.867 -> 0.905; on a 2-layer held-out world the last layer's memory wrote nothing)
    avoid_last_layer: bool = True
    edit_lr: float = 1.0
    optimizer: str = "sgd"  # "sgd" (the papers) or "adam" (scale-free steps; see docs/methods/wise_repair.md)
    n_iter: int = 70
    norm_constraint: float = 1.0
    act_margin: list[float] = field(default_factory=lambda: [5.0, 20.0, 10.0])  # alpha, beta, gamma
    act_ratio: float = 0.88
    mask_ratio: float = 0.2
    save_freq: int = 500  # edits per shard
    merge_freq: int = 1000  # merge the closed shards every this many edits
    merge_alg: str = "ties"
    densities: float = 0.53
    retrieve: bool = True  # Retrieve mode (one memory per merge) vs Merge mode (one memory for everything)
    merge_fit: bool = False  # ours: refit a merged memory that fails one of its own edits (see REPAIR's module doc)
    n_prefixes: int = 10  # random corpus prefixes the prompt is also trained behind
    n_irrelevant: int = 1  # corpus prompts each edit's margin keeps below alpha (the paper: 1, its locality probe)
    stop_loss: float = 1e-2  # stop a batch once its whole loss is below this
    route_by: str = "score"  # top-1 memory by raw score (paper), by score / threshold ("ratio") or nearest edit ("key")
    key_threshold: float = 0.0  # also require a cosine >= this between the row and its nearest held edit (0: off)
    key_layer: int | None = None  # route_by="key": the layer whose MLP projection input is the key (None: `layer`)
    # route_by="key": held edits whose keys are equally near the row's (cosine within TIE: the same key to float
    # precision, as prompts that differ only in the subject can be on a layer whose last token does not see it) are
    # told apart by their pooled keys (the key layer's input averaged over the prompt); off: the first held one wins
    pooled_ties: bool = True
    undo: str = "retrain"  # "retrain" (exact), "retrain+tombstone" or "tombstone" (instant; see the module doc)
    seed: int = 0  # masks, prefixes and merges derive from this and the requests (never from edit ids)

    checks: ClassVar[dict[str, tuple | str]] = {
        "edit_lr": "> 0", "optimizer": ("sgd", "adam"), "n_iter": ">= 1", "norm_constraint": "> 0", "act_ratio": "> 0",
        "mask_ratio": "(0, 1]", "save_freq": ">= 1", "merge_freq": ">= 1", "merge_alg": tuple(MERGE_METHODS),
        "densities": "(0, 1]", "n_prefixes": ">= 0", "n_irrelevant": ">= 1", "stop_loss": ">= 0",
        "route_by": ("score", "ratio", "key"), "key_threshold": "[0, 1]", "key_layer": ">= 0", "undo": UNDO_MODES}

    def validate(self) -> None:
        super().validate()
        if len(self.act_margin) != 3:
            raise ValueError(f"act_margin must be [alpha, beta, gamma], got {self.act_margin}")
        if self.merge_freq % self.save_freq:
            raise ValueError(f"merge_freq ({self.merge_freq}) must be a multiple of save_freq ({self.save_freq})")
        if self.key_layer is not None and self.route_by != "key":
            raise ValueError(f"key_layer needs route_by='key', got route_by={self.route_by!r}")


TIE = 1e-5  # cosines within this of the nearest key's are a tie (`pooled_ties`)


@dataclass
class Shard:
    """A side memory in training: D = init + the training of `history` (ordered batches of edit ids)."""

    seed: int  # its mask (and init noise) come from this
    sigma: float = 0.0  # init D = sigma * N(0, 1) (REPAIR's re-initialisation); 0: D starts at zero
    history: list[list[int]] = field(default_factory=list)
    members: list[int] = field(default_factory=list)  # the edits it holds (its threshold comes from them)
    losses: list[float] = field(default_factory=list)  # final loss of each batch of the history
    closed: bool = False
    group: int | None = None  # index of the merge it went into
    standalone: bool = False  # a memory of its own, never merged (REPAIR's reintegrations)
    delta: torch.Tensor | None = None

    def meta(self) -> dict[str, Any]:
        """Its fields but the delta, the lists copied (a checkpoint must not see later appends); copied by hand: a
        deepcopy of every shard's history on every edit and undo cost more than the rest of an undo at T = 1000."""
        return {"seed": self.seed, "sigma": self.sigma, "history": [list(b) for b in self.history],
                "members": list(self.members), "losses": list(self.losses), "closed": self.closed,
                "group": self.group, "standalone": self.standalone}

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else 0.0


@dataclass
class Mechanisms:
    """What REPAIR changes in WISE's bank, as strategy objects (None: WISE's own behaviour; each documented in
    methods/repair_mechanisms.py)."""

    batches: Callable[[list[int]], list[list[int]]] | None = None  # a call's edits -> batches (None: in order)
    distill: Any = None  # .loss(logits, inp) in training; .write(shard, ids, bounced) -> edits sent back
    weigh: Callable[[list[Shard]], list[float]] | None = None  # shard weights in a merge (None: equal)
    feedback: Any = None  # .after(call's ids, first group merged in the call) -> stats; .forget(edit id)
    steer: Callable[[torch.Tensor, dict[str, Any]], Any] | None = None  # per fit: .loss(...), .monitor, .result


@register("wise")
class Wise(Routed):
    Hparams = WiseHparams
    snapshots = False  # `remove` always undoes by retraining the edit's shard
    # the paper's settings do not write into a 128-wide FFN: Adam at lr 0.03, three corpus prefixes, key routing
    # with a cosine gate of 0.9 on layer 0's key, one joint batch of 8 per shard, two shards per merge (chosen on the
    # default world; docs/methods/wise_repair.md has the measurements)
    # mask_ratio 0.5 and merge_fit: the dev world's choices of 2026-12-05 (docs/methods/wise_repair.md)
    world_preset = {"n_prefixes": 3, "n_iter": 70, "optimizer": "adam", "edit_lr": 0.03, "route_by": "key",
                    "key_threshold": 0.9, "key_layer": 0, "save_freq": 8, "merge_freq": 16, "mask_ratio": 0.5,
                    "merge_fit": True}
    bench_batch = 32  # WISE fills its shards with a call's edits in order: the same as calls of 8
    easyedit_rules = {
        "inner_params": ee.inner_params,
        **{k: ee.to(k) for k in ("edit_lr", "n_iter", "norm_constraint", "act_margin", "act_ratio", "mask_ratio",
                                 "save_freq", "merge_freq", "merge_alg", "densities", "retrieve")},
        "replay": ee.choice({False: {}}, "EasyEdit's replay of past edits while writing is not implemented"),
        "objective_optimization": ee.drop("EasyEdit's objective setting: editbank trains on the target tokens only"),
        "weights": ee.drop("EasyEdit's one merge weight for every shard: editbank weighs shards equally, as WISE "
                           "does"),
    }
    easyedit_names = ("wise",)
    reopen_hparams = frozenset({"undo"})  # the undo mode may be chosen anew whenever a store is opened
    # stores made before these options took the upper-middle layer as it was, and the first of tied keys
    stored_defaults = {"avoid_last_layer": False, "pooled_ties": False}
    retired_hparams = {"replay": False}  # EasyEdit's replay, never implemented

    def __init__(self, model, tokenizer, arch, hparams: WiseHparams) -> None:
        super().__init__(model, tokenizer, arch, hparams)
        layer = hparams.layer
        if layer is None and hparams.avoid_last_layer:
            layer = max(0, min(arch.default_layers(1)[0], arch.num_layers - 2))
        self.layer = pick_layer(arch, layer)
        self.path = arch.layer_path(self.layer, "mlp_out")
        self.module = arch.module(self.path)
        w = arch.weight_out_in(self.module)
        self.shape, self.device = tuple(w.shape), w.device
        self.key_layer = self.layer if hparams.key_layer is None else hparams.key_layer
        if not 0 <= self.key_layer <= self.layer:
            raise ValueError(f"key_layer {self.key_layer} must be in [0, layer={self.layer}]: the key is read "
                             "before the memory acts")
        self.key_path = arch.layer_path(self.key_layer, "mlp_out")
        self._key_x: torch.Tensor | None = None  # the key layer's input in the current forward
        self.hook(self.module, self._hook)
        if self.key_layer != self.layer:
            self.hook(arch.module(self.key_path), self._key_hook)
        self.mech = self._mechanisms()
        self.reset()

    def reset(self) -> None:
        self.requests: dict[int, EditRequest] = {}
        self.acts: dict[int, torch.Tensor] = {}  # edit id -> a_e, its activation at the last prompt token
        # edit id -> its routing key: key_layer's input at the last prompt token (a_e without one), with `pooled_ties`
        # followed by that input averaged over the prompt (`key_parts` splits them)
        self.keys: dict[int, torch.Tensor] = {}
        self.tombs: dict[int, torch.Tensor] = {}  # undone edit id -> its routing key (undo modes with a tombstone)
        self.ghosts: list[int] = []  # edits undone by tombstone alone: still in their shards, never a routing key
        self.shards: list[Shard] = []
        self.groups: list[dict[str, Any]] = []  # {"shards": [...], "seed": int}
        self.merged: list[torch.Tensor] = []  # one per group (Merge mode: the fold up to that group)
        self.count = 0  # edits written since the last merge point counter
        self._stack: tuple[torch.Tensor, ...] | None = None
        # id(memory delta) -> (the delta, its version, its edits, its threshold): `_threshold`'s cache
        self._thresholds: dict[int, tuple[torch.Tensor, int, list[int], torch.Tensor]] = {}

    def _mechanisms(self) -> Mechanisms:
        """WISE's bank as its paper has it; REPAIR plugs its mechanisms in here."""
        return Mechanisms()

    # -- memories -----------------------------------------------------------------------------------
    @property
    def open_shard(self) -> Shard:
        if not self.shards or self.shards[-1].closed:
            self.shards.append(Shard(seed=stable_seed(self.hparams.seed, "shard", len(self.shards))))
            self.shards[-1].delta = self._init_delta(self.shards[-1])
        return self.shards[-1]

    def _memories(self) -> list[tuple[torch.Tensor, list[int]]]:
        """(delta, held edit ids) of every memory that routes, merged ones first."""
        out: list[tuple[torch.Tensor, list[int]]] = []
        in_group = [[e for s in g["shards"] for e in self.shards[s].members] for g in self.groups]
        if self.groups and self.hparams.retrieve:
            out += [(d, m) for d, m in zip(self.merged, in_group) if m]
        elif any(in_group):
            out.append((self.merged[-1], [e for m in in_group for e in m]))
        out += [(s.delta, list(s.members)) for s in self.shards if s.group is None and s.members]
        return out

    def _scores(self, a: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Delta_j(a_b) = ||a_b D_j^T|| for rows a [B, in] and memories [M, out, in] -> [B, M]."""
        return torch.linalg.vector_norm(torch.einsum("bi,moi->bmo", a.float(), deltas), dim=2)

    def stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All routing memories as one tensor [M, out, in] and their thresholds eps [M]."""
        return self._routing_table()[:2]

    def _routing_table(self) -> tuple[torch.Tensor, ...]:
        """(deltas [M, out, in], eps [M], unit last-token keys of the held edits and tombstones [N, in], their memory
        [N] (-1: a tombstone), their unit pooled keys [N, in] or None without `pooled_ties`)."""
        if self._stack is None:
            mems, kept = self._memories(), {}
            z = torch.zeros(0, device=self.device)
            if not mems:
                self._stack = (torch.zeros((0, *self.shape), device=self.device), z, z.view(0, self.shape[1]),
                               z.long(), None)
            else:
                deltas = torch.stack([d for d, _ in mems])
                eps = torch.stack([self._threshold(d, m, kept) for d, m in mems])
                ghosts = set(self.ghosts)
                acts = [torch.stack([self.keys[e] for e in m])[[e not in ghosts for e in m]] for _, m in mems]
                acts.append(torch.stack(list(self.tombs.values())) if self.tombs else z.view(0, self.key_dim))
                # held edits first: without `pooled_ties` they win a tie with a tombstone
                last, pooled = self.key_parts(torch.cat(acts))
                owner = torch.cat([torch.full((len(a),), j, device=self.device) for j, a in enumerate(acts)])
                owner[len(owner) - len(self.tombs):] = -1
                pooled = None if pooled is None else F.normalize(pooled, dim=1)
                self._stack = (deltas, eps * self.hparams.act_ratio, F.normalize(last, dim=1), owner, pooled)
            self._thresholds = kept  # the memories of this table only (no old delta is kept alive)
        return self._stack

    def _threshold(self, delta: torch.Tensor, members: list[int], kept: dict[int, tuple]) -> torch.Tensor:
        """min over the memory's edits e of ||a_e D^T|| (its eps before act_ratio). Kept while the memory is the same
        tensor, unwritten, holding the same edits, so that the table rebuilt after a write scores the written
        memory's edits, not every held edit (tensors are replaced, never written in place; `_version` guards it). `kept`
        collects the entries of the table being built."""
        hit = self._thresholds.get(id(delta))
        if hit is None or hit[0] is not delta or hit[1] != delta._version or hit[2] != members:
            eps = self._scores(torch.stack([self.acts[e] for e in members]), delta[None])[:, 0].min()
            hit = (delta, delta._version, list(members), eps)
        kept[id(delta)] = hit
        return hit[3]

    @property
    def key_dim(self) -> int:
        """The width of a stored key (the last-token part, and with `pooled_ties` the pooled part)."""
        width = self.arch.weight_out_in(self.arch.module(self.key_path)).shape[1]
        return width * (2 if self.hparams.pooled_ties else 1)

    def key_parts(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys [B, key_dim] -> (their last-token part, their pooled part or None); a key without its pooled part
        (an activation standing in for it) gives None."""
        if not self.hparams.pooled_ties or k.shape[1] != self.key_dim:
            return k, None
        half = self.key_dim // 2
        return k[:, :half], k[:, half:]

    def route_rows(self, a: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        """The memory each row of activations a [B, in] (routing keys k [B, key_dim], default a) uses (-1: none, the
        base model answers)."""
        deltas, eps, keys, owner, pooled_keys = self._routing_table()
        if len(eps) == 0:
            return torch.full((len(a),), -1, dtype=torch.long, device=a.device)
        a = a.to(deltas.device).float()
        last, pooled = self.key_parts(a if k is None else k.to(deltas.device).float())
        scores = self._scores(a, deltas)
        sims = F.normalize(last, dim=1) @ keys.T
        cos, nearest = sims.max(dim=1)
        if pooled is not None and pooled_keys is not None:  # a tie: the nearest pooled key of the tied ones
            tied = sims >= (cos - TIE)[:, None]
            several = tied.sum(dim=1) > 1
            if bool(several.any()):
                near = (F.normalize(pooled, dim=1) @ pooled_keys.T).masked_fill(~tied, -2.0).argmax(dim=1)
                nearest = torch.where(several, near, nearest)
        if self.hparams.route_by == "ratio":  # the memory whose threshold the row clears by the largest factor
            j = (scores / eps).argmax(dim=1)
        elif self.hparams.route_by == "key":  # the memory holding the edit whose activation is nearest (cosine)
            j = owner[nearest].clamp_min(0)  # a tombstone (-1) is refused below
        else:  # the paper's top-1 by score
            j = scores.argmax(dim=1)
        best = scores.gather(1, j[:, None])[:, 0]
        live = (best > eps[j]) & (owner[nearest] >= 0)
        if self.hparams.key_threshold > 0:
            live &= cos >= self.hparams.key_threshold
        return torch.where(live, j, -1)

    def route_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The memory each prompt uses (-1: none), as a forward pass over it would decide."""
        return self.route_rows(*self.activations(prompts, with_keys=True))

    def check(self, ids: list[int]) -> list[bool]:
        """Greedy exact match of each edit's target on the current (routed) model."""
        return self._check(ids, None)

    def check_memory(self, delta: torch.Tensor, ids: list[int]) -> list[bool]:
        """Greedy exact match of each edit's target with the memory `delta` alone added to every row (no routing)."""
        return self._check(ids, delta)

    @torch.no_grad()
    def _check(self, ids: list[int], delta: torch.Tensor | None) -> list[bool]:
        if not ids:
            return []
        reqs = [self.requests[e] for e in ids]
        batch = make_batch(self.tokenizer, [(r.prompt, r.target) for r in reqs], device=self.device)
        ctx = self.routing(Route(query_index=batch.query_index)) if delta is None else self.training(delta)
        with ctx:
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        pred = logits[:, :-1].argmax(-1)
        labels = batch.labels[:, 1:]
        wrong = ((pred != labels) & (labels != -100)).any(dim=1)
        return (~wrong).tolist()

    # -- the side-memory hook -----------------------------------------------------------------------
    def _hook(self, module, inputs, output):
        x = inputs[0]
        if self.trainee is not None:  # training (or checking) one memory: it adds x @ D^T to every row
            out = output + (x.float() @ self.trainee.T).to(output.dtype)
            if self.mech.distill is not None:
                self.mech.distill.out = out
            return out
        if not self.enabled or not self.requests:
            return None
        b, s = x.shape[:2]

        def choose() -> torch.Tensor:
            qidx = self.query_index(b, s, x.device)
            kx = self._key_x if self.key_layer != self.layer else x
            route = self.route
            start = None if route is None or route.query_start is None else route.query_start.to(x.device)
            return self.route_rows(x[torch.arange(b, device=x.device), qidx], self._keys(kx, qidx, start))

        choice = self.decide(self.name, s, choose)
        if not bool((choice >= 0).any()):
            return None
        deltas, _ = self.stack()
        side = torch.einsum("bsi,boi->bso", x.float(), deltas[choice.clamp_min(0)]).to(output.dtype)
        return torch.where((choice >= 0).view(b, 1, 1), output + side, output)

    def _key_hook(self, module, inputs, output):
        self._key_x = inputs[0]

    def detach(self) -> None:
        super().detach()
        self._key_x = None

    # -- training a shard ---------------------------------------------------------------------------
    def _init_delta(self, shard: Shard) -> torch.Tensor:
        if shard.sigma == 0:
            return torch.zeros(self.shape, device=self.device)
        g = torch.Generator().manual_seed(stable_seed(shard.seed, "init"))
        return (shard.sigma * torch.randn(self.shape, generator=g)).to(self.device)

    def _mask(self, shard: Shard) -> torch.Tensor:
        g = torch.Generator().manual_seed(stable_seed(shard.seed, "mask"))
        return (torch.rand(self.shape, generator=g) < self.hparams.mask_ratio).to(self.device)

    def _keys(self, kx: torch.Tensor, qidx: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
        """Routing keys [B, key_dim] from the key layer's input kx [B, T, in]: at each row's last prompt token
        `qidx`, and with `pooled_ties` also averaged over its prompt (positions start..qidx)."""
        last = kx[torch.arange(len(kx), device=kx.device), qidx].float()
        if not self.hparams.pooled_ties:
            return last
        return torch.cat([last, prompt_mean(kx, qidx, start).float()], dim=1)

    @torch.no_grad()
    def activations(self, prompts: list[str], with_keys: bool = False):
        """a(x): the projection's input at each prompt's last token, with no side memory (and, with_keys, the
        routing keys: `_keys` of the key layer's input)."""
        batch = make_batch(self.tokenizer, [(p, " x") for p in prompts], device=self.device)
        paths = list(dict.fromkeys([self.path, self.key_path]))
        with self.disabled(), trace(self.model, *paths, outputs=False) as tr:
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        qidx = batch.query_index.to(self.device)
        a = tr[self.path].input[torch.arange(len(prompts), device=self.device), qidx].float()
        return (a, self._keys(tr[self.key_path].input, qidx, None)) if with_keys else a

    def _edit_data(self, edit_id: int, avoid: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
        """The prompts an edit is trained on (its own, then behind prefixes) and its irrelevant prompts: corpus
        prompts, never the request's locality probes (those are evaluation data), none about the edit's subject
        (a rephrasing of the edit must not be pushed out of its memory) and none in `avoid` (the prompts of the
        edits trained with it, which the margin would otherwise push out of the memory they are written into)."""
        req = self.requests[edit_id]
        rng = random.Random(stable_seed(self.hparams.seed, req.prompt, req.target))
        corpus = self.corpus or []
        prefixes = rng.sample(corpus, min(self.hparams.n_prefixes, len(corpus)))
        prompts = [req.prompt] + [f"{p.rstrip('.')}. {req.prompt}" for p in prefixes]
        pool = [c for c in corpus if c not in avoid and c != req.prompt and not (req.subject and req.subject in c)]
        return prompts, rng.sample(pool, min(self.hparams.n_irrelevant, len(pool)))

    def _batch_inputs(self, ids: list[int]) -> dict[str, Any]:
        rows, owner, irr, irr_owner = [], [], [], []
        avoid = frozenset(self.requests[e].prompt for e in ids)
        for k, e in enumerate(ids):
            prompts, irrelevant = self._edit_data(e, avoid)
            rows += [(p, self.requests[e].target) for p in prompts]
            owner += [k] * len(prompts)
            irr += irrelevant
            irr_owner += [k] * len(irrelevant)
        return {"batch": make_batch(self.tokenizer, rows, device=self.device),
                "owner": torch.tensor(owner, device=self.device), "a_e": torch.stack([self.acts[e] for e in ids]),
                "a_irr": self.activations(irr) if irr else None,
                "irr_owner": torch.tensor(irr_owner, dtype=torch.long, device=self.device)}

    def _margin(self, d: torch.Tensor, inp: dict[str, Any]) -> torch.Tensor:
        """Per edit [n]: max(0, beta - Delta(a_e)) plus, averaged over the edit's irrelevant prompts,
        max(0, Delta(a_irr) - alpha) + max(0, gamma - (Delta(a_e) - Delta(a_irr)))."""
        alpha, beta, gamma = self.hparams.act_margin
        s_e = torch.linalg.vector_norm(inp["a_e"] @ d.T, dim=1)
        loss = F.relu(beta - s_e)
        if inp["a_irr"] is not None:
            own = inp["irr_owner"]
            s_irr = torch.linalg.vector_norm(inp["a_irr"] @ d.T, dim=1)
            extra = F.relu(s_irr - alpha) + F.relu(gamma - (s_e[own] - s_irr))
            n = torch.zeros_like(s_e).index_add_(0, own, torch.ones_like(extra))
            loss = loss + torch.zeros_like(s_e).index_add_(0, own, extra) / n.clamp_min(1)
        return loss

    def _fit(self, delta: torch.Tensor, mask: torch.Tensor, inp: dict[str, Any],
             steered: bool = True) -> tuple[torch.Tensor, float]:
        """Train D on one batch of edits (`_batch_inputs`); return the new D and the final loss. `steered`: REPAIR's
        intervention and monitoring act (a shard's write; not merge_fit's refit)."""
        hp, mech = self.hparams, self.mech
        batch = inp["batch"]
        d = delta.clone().requires_grad_(True)
        opt = make_optimizer(hp.optimizer, [d], hp.edit_lr)
        steer = mech.steer(d, inp) if mech.steer is not None and steered else None

        def loss_fn() -> torch.Tensor:
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            if steer is None:
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten())
                loss = loss + self._margin(d, inp).mean()
            else:  # REPAIR's progressive intervention weighs each edit's terms
                loss = steer.loss(logits, self._margin(d, inp))
            extra = mech.distill.loss(logits, inp) if mech.distill is not None else None
            return loss if extra is None else loss + extra

        @torch.no_grad()
        def bound() -> None:
            d.clamp_(-hp.norm_constraint, hp.norm_constraint)

        with self.training(d), self.frozen_below(self.layer):
            done = fit(loss_fn, opt, hp.n_iter, what=f"{self.name} side-memory training", stop_loss=hp.stop_loss,
                       before_step=lambda: d.grad.mul_(mask), after_step=bound,
                       monitor=None if steer is None else steer.monitor)
        return (d.detach(), done.loss) if steer is None else steer.result(done.loss)

    def _write(self, shard: Shard, ids: list[int]) -> float:
        """Train `ids` as one batch into `shard` (appending to its history); return the loss."""
        shard.delta, loss = self._fit(shard.delta, self._mask(shard), self._batch_inputs(ids))
        shard.history.append(list(ids))
        shard.losses.append(loss)
        shard.members += [e for e in ids if e not in shard.members]
        self._stack = None
        return loss

    def _retrain(self, shard: Shard) -> None:
        """Recompute a shard from its seed, init and history (after the history changed)."""
        history = [b for b in shard.history if b]
        shard.history, shard.losses, shard.delta = [], [], self._init_delta(shard)
        members = shard.members
        for ids in history:
            self._write(shard, ids)
        shard.members = [e for e in members if e in self.requests]
        if shard.group is not None:
            self._remerge(shard.group)
        self._stack = None

    # -- merging --------------------------------------------------------------------------------------
    def _merge_group(self, gi: int) -> torch.Tensor:
        g = self.groups[gi]
        shards = [self.shards[s] for s in g["shards"]]
        deltas = [s.delta for s in shards]
        weights = [1.0] * len(shards) if self.mech.weigh is None else self.mech.weigh(shards)
        if not self.hparams.retrieve and gi > 0:  # Merge mode: the previous merged memory takes part
            deltas, weights = [self.merged[gi - 1]] + deltas, [1.0] + weights
        gen = torch.Generator(device=self.device).manual_seed(g["seed"])
        merged = merge_deltas(deltas, self.hparams.merge_alg, weights, self.hparams.densities, generator=gen)
        if not self.hparams.merge_fit:
            return merged
        # merge_fit: a joint refit of the merged memory on its edits when it fails one of them (part of the merge,
        # so a merge recomputed after an undo redoes it)
        groups = {gi} if self.hparams.retrieve else set(range(gi + 1))  # Merge mode: each fold holds the earlier
        ids = [e for s in self.shards if s.group in groups for e in s.members]
        if not ids or all(self.check_memory(merged, ids)):
            return merged
        return self._fit(merged, torch.ones_like(merged, dtype=torch.bool), self._batch_inputs(ids), steered=False)[0]

    def _merge(self) -> None:
        todo = [i for i, s in enumerate(self.shards) if s.closed and s.group is None and not s.standalone]
        if not todo:
            return
        gi = len(self.groups)
        self.groups.append({"shards": todo, "seed": stable_seed(self.hparams.seed, "merge", gi)})
        for i in todo:
            self.shards[i].group = gi
        self.merged.append(self._merge_group(gi))
        self._stack = None

    def _remerge(self, gi: int) -> None:
        """Recompute group gi's merge (and, in Merge mode, every later fold)."""
        last = gi if self.hparams.retrieve else len(self.groups) - 1
        for i in range(gi, last + 1):
            self.merged[i] = self._merge_group(i)
        self._stack = None

    def _after_write(self, n: int) -> None:
        """Close the open shard when full; merge at every multiple of merge_freq edits."""
        hp = self.hparams
        before, self.count = self.count, self.count + n
        crossed = self.count // hp.merge_freq > before // hp.merge_freq
        current = self.shards[-1]
        if len(current.members) >= hp.save_freq or crossed:
            current.closed = True
        if crossed:
            self._merge()

    # -- the Method protocol ----------------------------------------------------------------------------
    def _register(self, items: list[EditItem]) -> None:
        for it in items:
            self.requests[it.id] = it.request
        acts, keys = self.activations([it.request.prompt for it in items], with_keys=True)
        for it, a, k in zip(items, acts, keys):
            self.acts[it.id], self.keys[it.id] = a, k
        if self.tombs:  # re-editing an undone prompt lifts its tombstone
            unit = F.normalize(keys, dim=1)
            for e in [e for e, t in self.tombs.items() if float((unit @ F.normalize(t, dim=0)).max()) > 1 - 1e-6]:
                del self.tombs[e]

    def apply(self, items: list[EditItem]) -> list[dict[str, Any]]:
        self._register(items)
        hp, mech, losses = self.hparams, self.mech, {}
        pending, bounced, merged_from = [it.id for it in items], set(), len(self.groups)
        while pending:
            # one joint batch per shard (WISE: the call's edits in order); a batch never overfills the open shard
            # nor runs past the next merge: what is cut off goes on into the next shard
            shard = self.open_shard
            room = max(1, min(hp.save_freq - len(shard.members), hp.merge_freq - self.count % hp.merge_freq))
            batch, *rest = [pending] if mech.batches is None else mech.batches(pending)
            batch, pending = batch[:room], batch[room:] + [e for b in rest for e in b]
            if mech.distill is None:
                back = []
                self._write(shard, batch)
            else:  # members the distillation sends back are written later, with the call's other edits
                back = mech.distill.write(shard, batch, bounced)
                bounced.update(back)
                pending += back
            losses.update(dict.fromkeys([e for e in batch if e not in back], shard.losses[-1]))
            self._after_write(len(batch) - len(back))
        info = mech.feedback.after([it.id for it in items], merged_from) if mech.feedback is not None else {}
        return [{**self._edit_stats(it.id, losses[it.id]), **info} for it in items]

    def _edit_stats(self, edit_id: int, loss: float) -> dict[str, Any]:
        deltas, eps = self.stack()
        memory = self.route_rows(self.acts[edit_id][None], self.keys[edit_id][None])[0]
        return {"loss": loss, "memory": int(memory), "memories": len(eps)}

    def remove(self, edit_id: int) -> bool:
        if edit_id not in self.requests or edit_id in self.ghosts:
            return False
        if self.hparams.undo != "retrain":
            self.tombs[edit_id] = self.keys[edit_id]
        if self.hparams.undo == "tombstone":
            self.ghosts.append(edit_id)
            self._forget(edit_id)
            self._stack = None
            return True
        del self.requests[edit_id], self.acts[edit_id], self.keys[edit_id]
        touched = []
        for s in self.shards:
            if any(edit_id in b for b in s.history) or edit_id in s.members:
                s.history = [[e for e in b if e != edit_id] for b in s.history]
                s.members = [e for e in s.members if e != edit_id]
                touched.append(s)
        for s in touched:
            self._retrain(s)
        self._forget(edit_id)
        self._stack = None
        return True

    def _forget(self, edit_id: int) -> None:
        """Drop the mechanisms' references to an undone edit."""
        if self.mech.feedback is not None:
            self.mech.feedback.forget(edit_id)

    def artifacts(self, edit_id: int) -> dict[str, torch.Tensor]:
        return {"activation": self.acts[edit_id].detach().cpu()} if edit_id in self.acts else {}

    # -- persistence ------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"edits": list(self.requests),  # their requests are the store's (`request_of`)
                "shards": [s.meta() for s in self.shards],
                "groups": [{**g, "shards": list(g["shards"])} for g in self.groups],  # {"shards": [...], "seed": int}
                "count": self.count, "ghosts": list(self.ghosts)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"shard.{i}": s.delta for i, s in enumerate(self.shards)}
        tensors.update({f"merged.{i}": m for i, m in enumerate(self.merged)})
        for e, a in self.acts.items():
            tensors[f"act.{e}"] = a
            if self.key_layer != self.layer or self.hparams.pooled_ties:
                tensors[f"key.{e}"] = self.keys[e]
        for e, a in self.tombs.items():
            tensors[f"tomb.{e}"] = a
        return tensors, self._meta()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.reset()
        if not meta:
            return
        if "requests" in meta:  # a store from before states referred to edits by id
            self.requests = {int(k): EditRequest.from_dict(r) for k, r in meta["requests"].items()}
        else:
            if self.request_of is None:
                raise ValueError(f"{self.name}'s state names its edits by id: it loads through an Editor (its store)")
            self.requests = {e: self.request_of(e) for e in meta["edits"]}
        self.acts = {e: tensors[f"act.{e}"].to(self.device, torch.float32) for e in self.requests}
        self.keys = {e: tensors.get(f"key.{e}", tensors[f"act.{e}"]).to(self.device, torch.float32)
                     for e in self.requests}
        self.tombs = {int(k[5:]): v.to(self.device, torch.float32) for k, v in tensors.items() if k.startswith("tomb.")}
        self.shards = [Shard(**copy.deepcopy(m)) for m in meta["shards"]]
        for i, s in enumerate(self.shards):
            s.delta = tensors[f"shard.{i}"].to(self.device, torch.float32)
        self.groups = copy.deepcopy(meta["groups"])
        self.merged = [tensors[f"merged.{i}"].to(self.device, torch.float32) for i in range(len(self.groups))]
        self.count = int(meta["count"])
        self.ghosts = [int(e) for e in meta.get("ghosts", [])]
        self._load_extra(meta)

    def _load_extra(self, meta: dict[str, Any]) -> None:
        """Hook for subclasses: restore their own meta."""

    def checkpoint(self) -> Any:
        # tensors are replaced, never written in place, so references are a faithful copy
        return self.state_dict(), dict(self.requests)

    def restore(self, checkpoint: Any) -> None:
        (tensors, meta), requests = checkpoint
        lookup, self.request_of = self.request_of, requests.__getitem__  # the requests as they were, not the store's
        try:
            self.load_state_dict(tensors, copy.deepcopy(meta))
        finally:
            self.request_of = lookup
