"""GRACE's exact undo without a replay, for an edit that later edits read.

Undoing edit U is exact when the codebook ends as a stream that never received U would leave it. A later edit's
decision (new entry, split, expand, supersede) reads only its nearest candidate entry (an entry whose radius is not
negative) and that entry's radius, label and values, so it is the same in both streams unless (a) its nearest entry
differs in state between them, or (b) an entry that is a candidate in the stream without U, and was not one in the
original at that point, lies at least as near as its recorded nearest. `undo_in_place` walks the later edits in order
with D, the entries whose state differs between the two streams (at first U's entry and the entries U changed),
recomputes only the edits that (a) or (b) catches, each in a view of the codebook as the stream without U held it just
before that edit, and adds to D what their new decisions changed. The others keep their effects as recorded.

Cost: one vectorised pass over the remaining later edits per recomputed edit, and one more (their recorded nearest
entries, and the distances from their keys, held in memory, to D's new candidates while there are some), and one
decision per recomputed edit, which takes its key and values back from the store (a forward only for an expand check
not stored, and a training only for an edit that only widened an entry and now adds its own, as the stream without U
trains it: GRACE's training uses no randomness and never reads the codebook, so this is bitwise on the CPU, as a
replay is). An entry whose state comes back to the original's leaves D. Logs from before the walk's records (`dist`)
make it give up (None: the editor replays).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .base import EditItem

if TYPE_CHECKING:
    from .grace import Grace

# an entry's state in one stream: None (absent) or (radius, last toucher)
State = tuple[float, int] | None


def undo_in_place(g: Grace, uid: int, edit_of: Callable[[int], Any], artifacts: Callable[[int], dict]
                  ) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] | None:
    log_u = g.undo_log.get(uid)
    later = sorted(e for e in g.undo_log if e > uid)
    if log_u is None or any("dist" not in g.undo_log[e] for e in later):
        return None
    return _Walk(g, uid, log_u, later, edit_of, artifacts).run()


class _Walk:
    """One undo's walk over the later edits (the module's docstring): the original stream's final codebook stays on
    GRACE while it walks; each recomputed edit runs on a view that is swapped in and out."""

    def __init__(self, g: Grace, uid: int, log_u: dict, later: list[int], edit_of, artifacts) -> None:
        self.g, self.uid, self.later, self.edit_of, self.artifacts = g, uid, later, edit_of, artifacts
        self.rows = {int(o): r for r, o in enumerate(g.owner.tolist())}  # the original stream's final codebook
        self.mods: dict[int, list[tuple[int, float, int]]] = {}  # entry -> (edit, radius before, toucher before)
        for e in later:
            for owner, old_eps, old_touch in g.undo_log[e]["modified"]:
                self.mods.setdefault(owner, []).append((e, old_eps, old_touch))
        # the same as tensors sorted by (row, edit): `codebook` rolls every radius back at once
        flat = sorted((self.rows[o], e, old_eps, old_touch) for o, mods in self.mods.items() if o in self.rows
                      for e, old_eps, old_touch in mods)
        self.mod_row = torch.tensor([x[0] for x in flat], dtype=torch.long)
        self.mod_edit = torch.tensor([x[1] for x in flat], dtype=torch.long)
        self.mod_eps = g.eps.new_tensor([x[2] for x in flat])
        self.mod_touch = torch.tensor([x[3] for x in flat], dtype=torch.long)
        self.diff: dict[int, State] = {uid: None}  # D: each entry's state in the stream without U
        for owner, old_eps, old_touch in log_u["modified"]:
            self.diff[owner] = (old_eps, old_touch)
        self.made: dict[int, dict[str, Any]] = {}  # rows of entries the stream without U has and the original not
        # per later edit, in order: its id, its recorded nearest entry (-1: none) and distance (inf: none), its key
        self.ms = torch.tensor(later, dtype=torch.long)
        logs = [g.undo_log[m] for m in later]
        self.near = torch.tensor([-1 if x["near"] is None else x["near"] for x in logs], dtype=torch.long)
        self.dist = torch.tensor([float("inf") if x["dist"] is None else x["dist"] for x in logs], dtype=torch.float64)
        self._later_keys: torch.Tensor | None = None
        self.phantoms: set[int] = set()  # entries of the current view that the stream without U lacks (`codebook`)

    def original(self, owner: int, m: int) -> State:
        """The entry's state in the original stream just before edit m."""
        if owner not in self.rows or owner >= m:
            return None
        for e, old_eps, old_touch in self.mods.get(owner, ()):
            if e >= m:
                return old_eps, old_touch
        r = self.rows[owner]
        return float(self.g.eps[r]), int(self.g.last_touch[r])

    def first_affected(self, start: int) -> int | None:
        """The index in `later` of the first edit from `start` on that D catches, (a) or (b), or None. D does not
        change between recomputed edits (an edit that changes an entry has it as its nearest), so one pass answers for
        all of them."""
        ms = self.ms[start:]
        hit = (self.near[start:, None] == torch.tensor(list(self.diff), dtype=torch.long)[None]).any(1)
        new = [o for o, st in self.diff.items() if st is not None and st[0] >= 0]
        # (b): entry o is a candidate for m without U and was none in the original just before m
        masks = torch.stack([(o < ms) & ~self.candidate_in_original(o, ms) for o in new]) if new else None
        if masks is not None and bool(masks.any()):
            pos = masks.any(0).nonzero().squeeze(1)
            d = torch.cdist(self.later_keys()[start + pos], torch.stack([self.key(o) for o in new]),
                            compute_mode="donot_use_mm_for_euclid_dist").T.to(torch.float64).cpu()
            # at least as near as its recorded nearest (a margin for float rounding: a needless recompute is exact)
            hit[pos] |= (masks[:, pos] & (d <= self.dist[start + pos] * (1 + 1e-6) + 1e-9)).any(0)
        first = hit.nonzero()
        return start + int(first[0]) if len(first) else None

    def candidate_in_original(self, owner: int, ms: torch.Tensor) -> torch.Tensor:
        """Per edit m of `ms`: whether the entry routed (radius >= 0) in the original stream just before m."""
        if owner not in self.rows:
            return torch.zeros(len(ms), dtype=torch.bool)
        mods = self.mods.get(owner, [])
        r = self.rows[owner]
        # the radius just before m: that of the first change by an edit from m on, else the final one
        radii = torch.tensor([x[1] for x in mods] + [float(self.g.eps[r])])
        at = torch.searchsorted(torch.tensor([x[0] for x in mods], dtype=torch.long), ms)
        return (owner < ms) & (radii[at] >= 0)

    def later_keys(self) -> torch.Tensor:
        """The later edits' keys [len(later), in]: each one's entry's in the original codebook, or its expand key."""
        if self._later_keys is None:
            g = self.g
            self._later_keys = torch.stack([g.keys[self.rows[m]] if m in self.rows else g.expand_keys[m]
                                            for m in self.later])
        return self._later_keys

    def key(self, owner: int) -> torch.Tensor:
        return self.made[owner]["key"] if owner in self.made else self.g.keys[self.rows[owner]]

    def codebook(self, m: int | None) -> tuple:
        """The stream without U's codebook just before edit m (None: at the end), as GRACE's arrays. Before m, an
        entry the stream without U lacks stays with radius -1 (`phantoms`): it never routes, so decisions are the
        same, and the entries stay views of GRACE's own."""
        g = self.g
        eps, touch = g.eps.clone(), g.last_touch.clone()
        keep = torch.ones(len(g.owner), dtype=torch.bool) if m is None else g.owner < m
        if m is not None and len(self.mod_row):  # the original's radii just before m: each entry's first change
            # by an edit from m on holds them (D's entries are set below)
            later = self.mod_edit >= m
            prev_row = torch.cat([self.mod_row.new_tensor([-1]), self.mod_row[:-1]])
            prev_later = torch.cat([later.new_tensor([False]), later[:-1]])
            first = later & ((prev_row != self.mod_row) | ~prev_later)
            rows = self.mod_row[first]
            eps[rows.to(eps.device)] = self.mod_eps[first.to(eps.device)]
            touch[rows] = self.mod_touch[first]
        self.phantoms.clear()
        for o, st in self.diff.items():
            if o in self.rows:
                if st is None and m is None:
                    keep[self.rows[o]] = False
                elif st is None:  # absent without U: in a view before m it stays, as an entry that never routes
                    eps[self.rows[o]] = -1.0
                    self.phantoms.add(o)
                else:
                    eps[self.rows[o]], touch[self.rows[o]] = st
        if m is not None:  # the entries before m are a prefix (owner order): views, not copies
            k = int(keep.sum())
            keys, values, span, eps, owner, touch = g.keys[:k], g.values[:k], g.span[:k], eps[:k], g.owner[:k], \
                touch[:k]
            labels, subjects = g.labels[:k], g.subjects[:k]
        else:
            idx = keep.nonzero().squeeze(1)
            on = idx.to(g.keys.device)
            keys, values, span = g.keys[on], g.values[on], g.span[on]
            eps, owner, touch = eps[on], g.owner[idx], touch[idx]
            at = idx.tolist()
            labels, subjects = [g.labels[i] for i in at], [g.subjects[i] for i in at]
        made = sorted(o for o, st in self.diff.items() if o not in self.rows and st is not None
                      and (m is None or o < m))
        if made:  # entries the original stream does not have, in owner order (a stream appends them so)
            from .grace import _pad_positions

            rows = [self.made[o] for o in made]
            width = max([values.shape[1]] + [int(r["value"].shape[0]) for r in rows])
            values = torch.cat([_pad_positions(values, width)] + [_pad_positions(r["value"][None], width)
                                                                   for r in rows])
            keys = torch.cat([keys, torch.stack([r["key"] for r in rows])])
            span = torch.cat([span, torch.stack([r["span"] for r in rows])])
            eps = torch.cat([eps, eps.new_tensor([self.diff[o][0] for o in made])])
            owner = torch.cat([owner, torch.tensor(made, dtype=torch.long)])
            touch = torch.cat([touch, torch.tensor([self.diff[o][1] for o in made], dtype=torch.long)])
            labels += [r["label"] for r in rows]
            subjects += [r["subject"] for r in rows]
            order = owner.argsort(stable=True)
            on = order.to(keys.device)
            keys, values, span, eps, owner, touch = keys[on], values[on], span[on], eps[on], owner[order], \
                touch[order]
            labels, subjects = [labels[i] for i in order.tolist()], [subjects[i] for i in order.tolist()]
        return keys, values, eps, span, owner, touch, labels, subjects

    def set_codebook(self, book: tuple, log: dict) -> None:
        g = self.g
        g.keys, g.values, g.eps, g.span, g.owner, g.last_touch, labels, subjects = book
        g.labels, g.subjects, g.undo_log, g._gate_cache = list(labels), list(subjects), log, None

    def recompute(self, m: int) -> tuple[dict, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Edit m's decision in the stream without U: (its log, (its artifacts, the log among them, and its
        stats)); D takes what it changed."""
        g, orig_log = self.g, self.g.undo_log[m]
        saved = (g.keys, g.values, g.eps, g.span, g.owner, g.last_touch, g.labels, g.subjects)
        logs, expand_keys = g.undo_log, g.expand_keys
        try:
            g.expand_keys = {}
            edit = self.edit_of(m)
            self.set_codebook(self.codebook(m), {})
            work = g.replay_work([edit], self.artifacts) or {}
            with g.pretrained(work), torch.enable_grad():
                stats = g._apply_one(EditItem(m, edit.request))
            log = g.undo_log[m]
            arts = {k: t.clone() for k, t in g.artifacts(m).items()}  # not views of the view's tensors
            touched = {m} | {o for o, _, _ in log["modified"]} | {o for o, _, _ in orig_log["modified"]}
            after = {}  # their states just after m in the stream without U
            for o in touched:
                hit = (g.owner == o).nonzero()
                if len(hit) and o not in self.phantoms:
                    after[o] = (float(g.eps[int(hit[0])]), int(g.last_touch[int(hit[0])]))
            if log["created"] and m not in self.rows:  # an entry the original stream does not have
                r = len(g.owner) - 1
                self.made[m] = {"key": g.keys[r].clone(), "value": g.values[r].clone(), "span": g.span[r].clone(),
                                "label": g.labels[r], "subject": g.subjects[r]}
        finally:
            g.keys, g.values, g.eps, g.span, g.owner, g.last_touch, g.labels, g.subjects = saved
            g.undo_log, g._gate_cache, g.expand_keys = logs, None, expand_keys
        # entry m, and the entries the two decisions changed: compared with the original just after m
        # (an entry back in its original state leaves D: from here on both streams change it alike)
        for o in touched:
            if after.get(o) == self.original(o, m + 1):
                self.diff.pop(o, None)
            else:
                self.diff[o] = after.get(o)
        return log, (arts, stats)

    def run(self) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        g = self.g
        logs, rewritten = dict(g.undo_log), {}
        k = -1
        while (k := self.first_affected(k + 1)) is not None:
            m = self.later[k]  # its log (and maybe its entry) changes: the store's artifacts follow
            logs[m], rewritten[m] = self.recompute(m)
        del logs[self.uid]
        self.set_codebook(self.codebook(None), logs)
        g.expand_keys.pop(self.uid, None)
        for m, (arts, _) in rewritten.items():
            if logs[m]["created"]:
                g.expand_keys.pop(m, None)
            else:
                g.expand_keys[m] = arts["key"]
        g._logs_in_state -= {self.uid, *rewritten}  # their logs go with their artifacts now
        return rewritten
