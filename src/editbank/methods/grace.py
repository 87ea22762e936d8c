"""GRACE (Hartvigsen et al., 2023): a discrete key-value codebook adaptor at one layer.

Key = input of the layer's MLP output projection at the last prompt token. A query within radius
eps of its nearest key has the projection's output replaced by that entry's trained values. By
default (`value_mode="per_token"`, an editbank change) an entry holds one value per target token and
replaces the outputs at the last prompt token and the following target positions (the first generated
tokens), then lets the model continue; GRACE's original single value replacing every position from the
last prompt token on is `value_mode="shared"`. On our small models a single shared vector cannot spell
multi-token targets (reliability 0.45-0.8 vs 1.0 on the small world). New keys get radius `eps_init`; a key that
falls inside an entry with the same target expands that entry's radius (if that entry's values spell the
target after the new prompt too), otherwise the two radii split at half the distance. Undo deletes the
entry (restoring any radius it changed) exactly; if a later edit has touched the same entries, or decided by
one of them (it was that edit's nearest entry: without it the nearest, and the decision, may differ), the later
edits whose decisions the undo can change are recomputed in place (grace_undo.py), taking every key and value back
from the store, and each expand check's answer where the entry and its radius are the same (`replay_work`).

`gate="subject"` (not GRACE's; SoLA's subject gate, docs/methods/sola.md): an entry whose edit names its subject is
a candidate only for prompts that contain the subject's tokens, and starts with radius `gate_radius` x eps_init; the
codebook's rules (nearest entry, expand, split) then run among a prompt's candidates. Measured on the dev world before
it was built: GRACE's rephrases lie a median 1.25 radii from their entry, no locality probe names an edited subject.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..models.hooks import trace
from ..tokens import make_batch, prompt_ids
from . import easyedit as ee
from .base import Checked, EditItem, Route, pick_layer, register
from .fit import fit
from .grace_undo import undo_in_place
from .routed import Routed
from .subject_gate import SubjectGate


@dataclass
class GraceHparams(Checked):
    layer: int | None = None  # decoder layer whose MLP output projection is adapted (None: upper-middle)
    eps_init: float = 1.0  # initial radius of a new codebook entry (Euclidean distance on the key)
    edit_lr: float = 1.0  # Adam learning rate of a value
    n_iter: int = 100  # at most this many steps per value
    stop_loss: float = 1e-2  # stop training a value once the target's mean NLL is below this
    # "per_token": one value per target position, replacing only the target's positions (editbank default);
    # "shared": GRACE's single value, replacing every position from the last prompt token on
    value_mode: str = "per_token"
    # "subject": an entry whose edit names its subject routes only prompts containing the subject's tokens, and starts
    # with radius gate_radius x eps_init (4: the dev world's choice, docs/methods/sola.md); "none": GRACE's routing
    gate: str = "none"
    gate_radius: float = 4.0
    gate_marks: bool = True  # the gate's subject forms after a mark such as "(" too (SoLA's; False: stores before it)

    checks: ClassVar[dict[str, tuple | str]] = {
        "eps_init": "> 0", "edit_lr": "> 0", "n_iter": ">= 1", "stop_loss": ">= 0",
        "value_mode": ("per_token", "shared"), "gate": ("none", "subject"), "gate_radius": "> 0"}


@register("grace")
class Grace(Routed):
    Hparams = GraceHparams
    # undo is exact, in place (`remove`, or `undo_in_place` when later edits read the entries), so no snapshots: a
    # store whose logs predate the in-place undo replays from its own snapshots, or from the base model
    snapshots = False
    # the state is the small mutable part (radii, owners); the entries themselves are each edit's artifacts
    state_in_artifacts = True
    trains_beside_readers = True  # a value trains alone under the training override (see `pretrain`)
    stored_defaults = {"gate_marks": False}  # stores made before the gate's forms after a mark
    easyedit_rules = {
        "inner_params": ee.inner_params,
        "edit_lr": ee.to("edit_lr"),
        "n_iter": ee.to("n_iter"),
        "eps": ee.to("eps_init"),
        "dist_fn": ee.choice({"euc": {}}, "editbank's codebook uses Euclidean distance"),
        "eps_expand": ee.choice({"coverage": {}}, "editbank grows a radius to cover a same-label key"),
        "val_train": ee.choice({"sgd": {}}, "editbank trains values by gradient steps, without perturbation"),
        "dropout": ee.dropout,
        "val_init": ee.drop("value initialisation: editbank starts a value from the layer's output (warm)"),
        "replacement": ee.drop("replaced positions: editbank replaces per value_mode (per_token: the key and target "
                               "positions; shared: one value from the key on)"),
        "reg": ee.drop("regularisation: editbank stops a value's training early once its loss is below stop_loss"),
        "val_reg": ee.drop("regularisation: editbank stops a value's training early once its loss is below "
                           "stop_loss"),
        "num_pert": ee.drop("perturbation training is not used"),
    }
    easyedit_names = ("grace",)

    def __init__(self, model, tokenizer, arch, hparams: GraceHparams) -> None:
        super().__init__(model, tokenizer, arch, hparams)
        self.layer = pick_layer(arch, hparams.layer)
        self.path = arch.layer_path(self.layer, "mlp_out")
        self.module = arch.module(self.path)
        self.hook(self.module, self._hook)
        if hparams.gate == "subject":  # the gate reads each forward's token ids
            self.hook(model.get_input_embeddings(), self._ids_hook)
        self.reset()

    # -- codebook ---------------------------------------------------------------------------------
    def reset(self) -> None:
        w = self.arch.weight_out_in(self.module)
        # keys and radii stay float32 whatever the model's dtype: bf16 would round radii below distances
        self.keys = torch.zeros((0, w.shape[1]), dtype=torch.float32, device=w.device)
        self.values = w.new_zeros((0, 1, w.shape[0]))  # [entries, positions, out]: padded by repeating the last
        self.eps = torch.zeros(0, dtype=torch.float32, device=w.device)
        self.span = torch.zeros(0, dtype=torch.long, device=w.device)  # positions an entry replaces
        self.owner = torch.zeros(0, dtype=torch.long)  # edit id that created each entry
        self.last_touch = torch.zeros(0, dtype=torch.long)  # edit id that last created/changed it
        self.labels: list[str] = []
        self.subjects: list[str | None] = []  # the subject of each entry's edit (gate="subject"; None: ungated)
        self._gate_cache: SubjectGate | None = None  # for `subjects` as they are (rebuilt when they change)
        self.undo_log: dict[int, dict[str, Any]] = {}  # per held edit: what it created and changed (for undo)
        self._logs_in_state: set[int] = set()  # edits whose logs a store from before the log artifacts holds
        self.expand_keys: dict[int, torch.Tensor] = {}  # the keys of held edits that created no entry

    def _row(self, owner: int) -> int:
        hits = (self.owner == owner).nonzero()
        if len(hits) != 1:
            raise KeyError(f"no codebook entry owned by edit {owner}")
        return int(hits[0])

    # -- the adaptor hook -------------------------------------------------------------------------
    def _span_of(self, n_values: int) -> int:
        return n_values if self.hparams.value_mode == "per_token" else _ALL_POSITIONS

    def _decide(self, x: torch.Tensor, qidx: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Per row: whether an entry covers the query, its values [B, T, out], span [B] and the offset of every
        position from the query [B, S] (the value position it takes)."""
        b, s = x.shape[:2]
        offsets = torch.arange(s, device=x.device)[None, :] - qidx[:, None]
        if self.trainee is not None:  # training one entry's values: they replace every row's
            span = torch.full((b,), self._span_of(self.trainee.shape[0]), device=x.device)
            return torch.ones(b, dtype=torch.bool, device=x.device), self.trainee.expand(b, -1, -1), span, offsets
        allowed = None
        if self.gated:
            if ids is None or ids.shape[:2] != x.shape[:2]:
                raise RuntimeError("GRACE's subject gate needs this forward's token ids: call the model with input_ids")
            route = self.route
            first = [0] * b if route is None or route.query_start is None else route.query_start.tolist()
            allowed = self.allowed([r[a : q + 1] for r, a, q in zip(ids.tolist(), first, qidx.tolist())])
        dmin, j = self.nearest(x[torch.arange(b, device=x.device), qidx], allowed)  # superseded entries do not route
        return dmin <= self.eps[j], self.values[j], self.span[j], offsets

    def _ids_hook(self, module, inputs, output) -> None:
        self.thread.ids = inputs[0]

    @property
    def gated(self) -> bool:
        return self.hparams.gate == "subject" and any(s is not None for s in self.subjects)

    def allowed(self, rows: list[list[int]]) -> torch.Tensor:
        """[B, entries] True where the row may route to the entry: an ungated entry, or one whose subject's tokens
        the row holds (`subject_gate.subject_forms`)."""
        gate = self._gate_cache
        if gate is None or gate.gated.numel() != len(self.subjects):
            forms = {}
            for e, subject in enumerate(self.subjects):
                if subject is not None:
                    forms[e] = self.subject_forms(subject)
            gate = self._gate_cache = SubjectGate(forms, len(self.subjects), self.keys.device,
                                                  ungated=len(self.subjects) - len(forms))
        out = (~gate.gated)[None, :].repeat(len(rows), 1)
        for r, found in enumerate(gate.candidates(rows)):
            out[r, found] = True
        return out

    def _hook(self, module, inputs, output):
        ids, self.thread.ids = getattr(self.thread, "ids", None), None  # this forward's (the gate's), read once
        if not self.enabled or (len(self.keys) == 0 and self.trainee is None):
            return None
        x = inputs[0]
        b, s = x.shape[:2]
        qidx = self.query_index(b, s, x.device)
        # a generated token keeps the prompt's decision, one value position further on
        matched, values, span, offsets = self.decide(
            self.path, s, lambda: self._decide(x, qidx, ids), lambda d: (*d[:3], d[3][:, -1:] + 1))
        if not bool(matched.any()):
            return None
        idx = offsets.clamp(0, values.shape[1] - 1)
        v = torch.gather(values, 1, idx[..., None].expand(-1, -1, values.shape[2]))
        mask = (matched[:, None] & (offsets >= 0) & (offsets < span[:, None]))[..., None]
        return torch.where(mask, v.to(output.dtype), output)

    # -- routing -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prompt_keys(self, prompts: list[str]) -> torch.Tensor:
        """The routing keys [N, in] of prompts: the layer's input at each one's last token (the codebook off)."""
        keys = []
        for i in range(0, len(prompts), 64):
            batch = make_batch(self.tokenizer, [(p, " x") for p in prompts[i : i + 64]], device=self.keys.device)
            with self.disabled(), trace(self.model, self.path, outputs=False) as tr:
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            x = tr[self.path].input
            keys.append(x[torch.arange(len(x), device=x.device), batch.query_index.to(x.device)].float())
        return torch.cat(keys) if keys else self.keys.new_zeros((0, self.keys.shape[1]))

    def nearest(self, keys: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per key: the distance to the nearest entry that routes (and, given `allowed` [N, entries], that the row
        may route to), and that entry (-1: none)."""
        if not len(self.keys):
            return keys.new_full((len(keys),), float("inf")), torch.full((len(keys),), -1)
        d = torch.cdist(keys.float(), self.keys, compute_mode="donot_use_mm_for_euclid_dist")
        d = d.masked_fill(self.eps[None, :] < 0, float("inf"))
        if allowed is not None:
            d = d.masked_fill(~allowed.to(d.device), float("inf"))
        dmin, j = d.min(dim=1)
        return dmin, j.masked_fill(~torch.isfinite(dmin), -1)  # -1: the last entry, never within its radius

    def routes(self, prompts: list[str]) -> list[int | None]:
        """The edit whose entry answers each prompt (None: no entry's radius covers its key). The keys come from
        one right-padded batch; a served batch pads otherwise, which moves a key by float rounding (about 1e-8
        relative), so a prompt exactly on a radius may be decided the other way there."""
        allowed = self.allowed([prompt_ids(self.tokenizer, p) for p in prompts]) if self.gated else None
        dist, j = self.nearest(self.prompt_keys(prompts), allowed)
        return [int(self.owner[k]) if k >= 0 and d <= float(self.eps[k]) else None
                for d, k in zip(dist.tolist(), j.tolist())]

    # -- editing ----------------------------------------------------------------------------------
    def _key_and_output(self, prompt: str, target: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The key (from the prompt alone, as generation sees it) and the current outputs to start values from."""
        batch = make_batch(self.tokenizer, [(prompt, target)], device=self.keys.device)
        q, t = int(batch.query_index[0]), batch.target_len[0]
        with torch.no_grad(), self.disabled(), trace(self.model, self.path) as tr:
            self.model(input_ids=batch.input_ids[:, : q + 1])
            key = tr[self.path].input[0, q].detach().float()
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        n = t if self.hparams.value_mode == "per_token" else 1
        return key, tr[self.path].output[0, q : q + n].detach(), batch

    def _train(self, batch, init: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """Train the entry's values [T, out] so the target follows the prompt."""
        v = init.clone().float().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=self.hparams.edit_lr)

        def loss_fn() -> torch.Tensor:
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            return F.cross_entropy(logits[0, :-1].float(), batch.labels[0, 1:])

        with self.training(v), self.routing(Route(query_index=batch.query_index)), self.frozen_below(self.layer):
            done = fit(loss_fn, opt, self.hparams.n_iter, what="GRACE value training", stop_loss=self.hparams.stop_loss)
        return v.detach().to(self.values.dtype), done.loss, done.steps

    def apply(self, items: list[EditItem]) -> list[dict[str, Any]]:
        return [self._apply_one(it) for it in items]

    def pretrain(self, requests) -> dict[tuple[str, str], tuple]:
        """Train the requests' values now (each alone, under the training override in this thread; the codebook
        is not touched), for an `apply` inside `pretrained(...)` to install: an edit that only widens an entry
        leaves its value unused."""
        work = {}
        with torch.enable_grad():
            for r in requests:
                key, out, batch = self._key_and_output(r.prompt, r.target)
                work[(r.prompt, r.target)] = _Work(key, self._train(batch, out))
        return work

    def replay_work(self, edits, artifacts) -> dict[tuple[str, str], _Work]:
        """What a replay takes back instead of recomputing: a key is read with the codebook off and a value trains
        under the training override from the layer's outputs with it off, so both are functions of the request (and
        the call's seed) alone. The expand check (do entry j's values, its radius widened to the key, spell the
        target?) is a function of the request, entry j and that radius: its answer is reused for the same entry and
        the same radius, bitwise. Only the decisions (new, split, expand) are recomputed."""
        work = {}
        for e in edits:
            art = artifacts(e.id)
            if "key" not in art:  # an edit stored before every edit kept its key: recomputed
                continue
            trained = None
            if {"value", "span"} <= set(art) and {"loss", "steps"} <= set(e.stats):
                span = int(art["span"][0])  # the stored values are padded to the codebook's width: cut back
                value = art["value"][: 1 if span == _ALL_POSITIONS else span]
                trained = (value.to(self.values.device, self.values.dtype), e.stats["loss"], e.stats["steps"])
            spells = {} if "spelled_at" not in e.stats else \
                {(e.stats["spelled_by"], e.stats["spelled_at"]): e.stats["spelled"]}
            work[(e.request.prompt, e.request.target)] = _Work(art["key"].to(self.keys.device, torch.float32),
                                                               trained, spells)
        return work

    def _apply_one(self, item: EditItem) -> dict[str, Any]:
        req, eid = item.request, item.id
        work = self.take_pretrained((req.prompt, req.target))  # computed already (`pretrain`, `replay_work`)
        if work is None:
            key, out, batch = self._key_and_output(req.prompt, req.target)
            work = _Work(key, None)
        else:  # the layer's outputs (and the batch) are made below if a value must train or a check run after all
            key, out, batch = work.key, None, None
        log: dict[str, Any] = {"created": False, "modified": [], "near": None, "dist": None}
        stats: dict[str, Any] = {}
        # the subject this edit's entry is gated by (None: not gated)
        subject = self.spelled_subject(req, stats) if self.hparams.gate == "subject" else None
        if len(self.keys):
            # the entries this prompt can route to (the gate), and the distance the hook compares with the radius
            allowed = self.allowed([prompt_ids(self.tokenizer, req.prompt)]) if self.gated else None
            dmin, nearest = self.nearest(key[None], allowed)
            dist, j = float(dmin[0]), int(nearest[0])
            if dist < float("inf"):  # the entry this edit's decision read (exact undo checks it, see `remove`)
                stats["nearest_distance"] = dist
                log["near"], log["dist"] = int(self.owner[j]), dist
        else:
            dist, j = float("inf"), -1
        eps0 = self.hparams.eps_init * (self.hparams.gate_radius if subject is not None else 1.0)

        def set_radius(radius: float) -> None:  # entry j's radius changes: logged for undo
            log["modified"].append([int(self.owner[j]), float(self.eps[j]), int(self.last_touch[j])])
            self.eps[j], self.last_touch[j] = radius, eid

        same_key = j >= 0 and dist <= 1e-4 * max(float(key.norm()), 1e-6)  # the same prompt edited again
        if same_key and self.labels[j] != req.target:
            # newer supersedes older: the old entry stops routing (radius -1) until this edit is undone
            stats.update(action="supersede", supersedes=[int(self.owner[j])])
            set_radius(-1.0)
            return self._add_entry(item, key, out, batch, eps0, log, stats, work.trained, subject)
        near = j >= 0 and dist <= float(self.eps[j]) + eps0
        if near and self.labels[j] == req.target and self._spells(j, dist, req, batch, work, stats):
            set_radius(max(float(self.eps[j]), dist))
            stats.update(action="expand", loss=0.0, steps=0)
            self.expand_keys[eid] = key.clone()  # held with the edit: not a view of the layer's whole input
        else:
            if near:  # a conflicting label, or the same label that the entry's values cannot spell here
                set_radius(min(float(self.eps[j]), dist / 2))
            stats["action"] = "split" if near else "new"
            return self._add_entry(item, key, out, batch, dist / 2 if near else eps0, log, stats, work.trained,
                                   subject)
        self.undo_log[eid] = log
        return stats

    def _spells(self, j: int, dist: float, req, batch, work: _Work, stats: dict) -> bool:
        """`_realises`, or its answer from `work` (a replay: the same request, entry and radius, the same answer);
        recorded in the stats (`spelled_by`: the entry's edit, `spelled_at`: the radius the check used)."""
        owner = int(self.owner[j])
        radius = float(self.eps.new_tensor(max(float(self.eps[j]), dist)))  # what `_realises` sets, in float32
        if (owner, radius) in work.spells:
            spelled = work.spells[(owner, radius)]
        else:
            spelled = self._realises(j, dist, batch or make_batch(self.tokenizer, [(req.prompt, req.target)],
                                                                  device=self.keys.device))
        stats.update(spelled_by=owner, spelled_at=radius, spelled=spelled)
        return spelled

    @torch.no_grad()
    def _realises(self, j: int, dist: float, batch) -> bool:
        """Would entry j, widened to reach this key, already make the model produce the target?

        GRACE widens a same-label entry without retraining; with per-prompt values that only works when
        the entry's values spell the target after this prompt too, so that is checked first.
        """
        old = float(self.eps[j])
        self.eps[j] = max(old, dist)
        try:
            with self.routing(Route(query_index=batch.query_index)):
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        finally:
            self.eps[j] = old
        q, t = int(batch.query_index[0]), batch.target_len[0]
        return bool((logits[0, q : q + t].argmax(-1) == batch.input_ids[0, q + 1 : q + 1 + t]).all())

    def _add_entry(self, item: EditItem, key, out, batch, eps: float, log: dict, stats: dict,
                   trained: tuple | None, subject: str | None) -> dict[str, Any]:
        """Train the new entry's values (or take what `pretrain` trained) and append it to the codebook."""
        if trained is None and out is None:  # the key came from `pretrain`/`replay_work`, the values did not
            _, out, batch = self._key_and_output(item.request.prompt, item.request.target)
        value, loss, steps = trained if trained is not None else self._train(batch, out)
        self.keys = torch.cat([self.keys, key[None]])
        width = max(self.values.shape[1], value.shape[0])
        self.values = torch.cat([_pad_positions(self.values, width), _pad_positions(value[None], width)])
        self.eps = torch.cat([self.eps, self.eps.new_tensor([eps])])
        self.span = torch.cat([self.span, self.span.new_tensor([self._span_of(value.shape[0])])])
        self.owner = torch.cat([self.owner, torch.tensor([item.id])])
        self.last_touch = torch.cat([self.last_touch, torch.tensor([item.id])])
        self.labels.append(item.request.target)
        self.subjects.append(subject)
        self._gate_cache = None
        log["created"] = True
        self.undo_log[item.id] = log
        return {**stats, "loss": loss, "steps": steps}

    def artifacts(self, edit_id: int) -> dict[str, torch.Tensor]:
        """The edit's undo log ("log") and the entry it created: key, values, span, and its radius then; an edit
        that created none (it widened an entry): its key (a replay reads it instead of recomputing it). An undo in
        place rewrites them for the edits it recomputes."""
        log = self.undo_log.get(edit_id)
        if log is None:
            return {}
        out = {"log": _log_to_tensor(log)}  # with the edit, not in the state: saving the state stays flat
        if not log["created"]:
            return {**out, "key": self.expand_keys[edit_id]} if edit_id in self.expand_keys else out
        r = self._row(edit_id)
        return {**out, "key": self.keys[r], "value": self.values[r], "eps": self.eps[r : r + 1],
                "span": self.span[r : r + 1]}

    def remove(self, edit_id: int) -> bool:
        log = self.undo_log.get(edit_id)
        if log is None:
            return False
        touched = [edit_id] if log["created"] else []
        touched += [owner for owner, _, _ in log["modified"]]
        if any(int(self.last_touch[self._row(o)]) != edit_id for o in touched):
            return False  # a later edit changed the same entries: `undo_in_place`
        # a later edit whose nearest entry was one of them decided by it (without it, its nearest, and so whether it
        # splits, expands or adds, may differ), or one that an entry this edit superseded would have been a candidate
        # for (its radius comes back): `undo_in_place` (a log from before "near" was recorded: assume so)
        later = [x for e, x in self.undo_log.items() if e > edit_id]
        if any("near" not in x or x["near"] in touched for x in later):
            return False
        revived = [o for o, old_eps, _ in log["modified"] if old_eps >= 0 and float(self.eps[self._row(o)]) < 0]
        if later and revived:
            return False
        for owner, old_eps, old_touch in log["modified"]:
            r = self._row(owner)
            self.eps[r] = old_eps
            self.last_touch[r] = old_touch
        if log["created"]:
            keep = self.owner != edit_id
            r = self._row(edit_id)
            self.labels.pop(r)
            self.subjects.pop(r)
            self._gate_cache = None
            on_dev = keep.to(self.keys.device)
            self.keys, self.values, self.eps = self.keys[on_dev], self.values[on_dev], self.eps[on_dev]
            self.span = self.span[on_dev]
            self.owner, self.last_touch = self.owner[keep], self.last_touch[keep]
        del self.undo_log[edit_id]
        self.expand_keys.pop(edit_id, None)
        self._logs_in_state.discard(edit_id)
        return True

    def undo_in_place(self, edit_id, edit_of, artifacts):
        """Undo an edit that later edits read without a replay: only the later edits whose decision the undo can
        change are recomputed (methods/grace_undo.py)."""
        return undo_in_place(self, edit_id, edit_of, artifacts)

    # -- persistence ------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What later edits change: every entry's radius and last toucher, by owner (the entries' keys and values,
        and each edit's undo log, are the edits' artifacts, and an entry's label is its edit's target; a store
        written before the logs were kept there keeps its edits' logs here)."""
        tensors = {"eps": self.eps, "owner": self.owner, "last_touch": self.last_touch}
        meta: dict[str, Any] = {}
        if self._logs_in_state:
            meta["undo_log"] = {str(k): self.undo_log[k] for k in sorted(self._logs_in_state)}
        if any(s is not None for s in self.subjects):
            meta["subjects"] = list(self.subjects)
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.reset()
        if not tensors:
            return
        self.undo_log = {int(k): v for k, v in meta.get("undo_log", {}).items()}
        self._logs_in_state = set(self.undo_log)
        if "labels" in meta:  # a store from before the labels were read from the edits
            self.labels = list(meta["labels"])
        else:
            if self.request_of is None:
                raise ValueError("GRACE's state names its entries by edit id: it loads through an Editor (its store)")
            self.labels = [self.request_of(int(o)).target for o in tensors["owner"].tolist()]
        self.subjects = list(meta.get("subjects", [None] * len(self.labels)))
        self._gate_cache = None
        self.eps = tensors["eps"].to(self.eps.device, torch.float32)
        self.owner = tensors["owner"].long().cpu()
        self.last_touch = tensors["last_touch"].long().cpu()

    def load_artifacts(self, held) -> None:
        """The entries, in the order of `owner` (an older store's state also held them whole: not read), the edits'
        undo logs (a store from before the log artifacts keeps its older logs in the state) and the keys of the edits
        that created no entry."""
        order = self.owner.tolist()
        arts = {}
        for eid, a in held:
            if "log" in a:
                self.undo_log[eid] = _log_from_tensor(a["log"])
                self._logs_in_state.discard(eid)
            arts[eid] = a
        missing = [e for e in order if not {"key", "value", "span"} <= set(arts.get(e, {}))]
        if missing:
            raise ValueError(f"stored GRACE edits {missing[:5]} lack their codebook entries")
        dev = self.keys.device
        self.expand_keys = {e: a["key"].to(dev, torch.float32) for e, a in arts.items()
                            if "key" in a and e in self.undo_log and not self.undo_log[e]["created"]}
        if order:
            width = max(int(arts[e]["value"].shape[0]) for e in order)
            self.keys = torch.stack([arts[e]["key"] for e in order]).to(dev, torch.float32)
            values = [_pad_positions(arts[e]["value"][None], width)[0] for e in order]
            self.values = torch.stack(values).to(dev, self.values.dtype)
            self.span = torch.cat([arts[e]["span"] for e in order]).to(dev)

    def checkpoint(self) -> Any:
        """Cheap: keys, values, span and owner are replaced, never written in place; radii and touches copied."""
        return self.keys, self.values, self.eps.clone(), self.span, self.owner, self.last_touch.clone(), \
            list(self.labels), list(self.subjects), dict(self.undo_log), set(self._logs_in_state), \
            dict(self.expand_keys)

    def restore(self, checkpoint: Any) -> None:
        keys, values, eps, span, owner, touch, labels, subjects, log, in_state, expand_keys = checkpoint
        self.keys, self.values, self.span, self.owner, self.labels = keys, values, span, owner, list(labels)
        self.subjects = list(subjects)
        self._gate_cache = None
        self.eps, self.last_touch, self.undo_log = eps.clone(), touch.clone(), dict(log)
        self._logs_in_state, self.expand_keys = set(in_state), dict(expand_keys)


@dataclass
class _Work:
    """What an edit's `apply` takes instead of computing it: its key, its trained values (value, loss, steps) or
    None, and the expand checks known for it ({(entry's edit id, radius): whether its values spell the target})."""

    key: torch.Tensor
    trained: tuple | None
    spells: dict[tuple[int, float], bool] = field(default_factory=dict)


def _log_to_tensor(log: dict[str, Any]) -> torch.Tensor:
    """An edit's undo log as float64 (exact for ids and for float32 radii and distances): created, the nearest
    entry's edit and its distance (NaN: none), whether the log has each of those two (a log from before they were
    kept has not), then (entry, radius before, toucher before) per entry it changed."""
    head = [float(log["created"])] + [float("nan") if log.get(k) is None else float(log[k]) for k in ("near", "dist")]
    flags = [float("near" in log), float("dist" in log)]
    return torch.tensor(head + flags + [float(x) for m in log["modified"] for x in m], dtype=torch.float64)


def _log_from_tensor(t: torch.Tensor) -> dict[str, Any]:
    v = t.tolist()
    log: dict[str, Any] = {"created": bool(v[0]),
                           "modified": [[int(v[i]), v[i + 1], int(v[i + 2])] for i in range(5, len(v), 3)]}
    for name, x, present in (("near", v[1], v[3]), ("dist", v[2], v[4])):
        if present:
            log[name] = None if x != x else (int(x) if name == "near" else x)
    return log


_ALL_POSITIONS = 2**31 - 1  # GRACE's shared value replaces every position from the query on


def _pad_positions(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pad [N, T, D] values to T=width by repeating each entry's last position (same behaviour)."""
    if values.shape[1] >= width:
        return values
    return torch.cat([values, values[:, -1:].expand(-1, width - values.shape[1], -1)], dim=1)
