"""A bank of per-edit LoRAs as stacked tensors, with their routing keys as one matrix.

Each edit owns one slot: a key (float32) and, for every edited module, a LoRA pair A [r, in], B [out, r].
A forward gathers the slots its rows route to (`gather`, `slices`), never one module per edit. Slots grow
by doubling and are reused after a removal. Writing a slot never changes another slot's contents, so a
checkpoint of the bank is only its small slot table (`checkpoint`/`restore`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .key_index import FaissKeyIndex

DISTANCES = ("cosine", "l2")


class LoraBank:
    def __init__(
        self, key_dim: int, shapes: list[tuple[int, int]], rank: int, dtype, device, distance: str,
        ann_candidates: int = 0, module_devices: list | None = None,
    ):
        """Keys live on `device`; module i's LoRAs on `module_devices[i]` (default `device`), so a model split
        across devices works. `ann_candidates` > 0: propose that many candidates per query from a FAISS HNSW
        index (key_index.py) and re-score them exactly, instead of scanning every key."""
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.ann_candidates = ann_candidates
        self.key_dim, self.shapes, self.rank = key_dim, shapes, rank
        self.dtype, self.device, self.distance = dtype, torch.device(device), distance
        self.module_devices = [torch.device(d) for d in (module_devices or [device] * len(shapes))]
        self.center = torch.zeros(key_dim, dtype=torch.float32, device=self.device)
        self.projection: torch.Tensor | None = None  # [key_dim, index_dim]; None: compare keys as they are
        self._bias = self.center
        self.clear()

    def clear(self) -> None:
        """Drop every slot (the key transform, a property of the base model, is kept)."""
        f32 = dict(dtype=torch.float32, device=self.device)
        self.keys = torch.zeros((0, self.key_dim), **f32)  # as given (artifacts)
        self.index_keys = torch.zeros((0, self.index_dim), **f32)  # transformed (and unit-norm for cosine)
        self.sq_norms = torch.zeros(0, **f32)
        # LoRAs stored transposed for the forward: x [R, S, in] @ At [R, in, r] @ Bt [R, r, out]
        self.At = [torch.zeros((0, i, self.rank), dtype=self.dtype, device=d)
                   for (_, i), d in zip(self.shapes, self.module_devices)]
        self.Bt = [torch.zeros((0, self.rank, o), dtype=self.dtype, device=d)
                   for (o, _), d in zip(self.shapes, self.module_devices)]
        self.offset = torch.zeros(0, **f32)  # 0 where a slot routes, inf where it does not (added to distances)
        self.slot_of: dict[int, int] = {}  # edit id -> slot
        self.free: list[int] = []
        self.high = 0  # slots [0, high) have been used; the rest of the capacity is empty
        self.ann = FaissKeyIndex(self.index_dim, self.distance) if self.ann_candidates else None

    # -- slots ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.slot_of)

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    def _grow(self) -> None:
        new = max(16, 2 * self.capacity)

        def grown(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
            out = t.new_full((new, *t.shape[1:]), fill)
            out[: t.shape[0]] = t
            return out

        self.keys, self.index_keys, self.sq_norms = grown(self.keys), grown(self.index_keys), grown(self.sq_norms)
        self.At, self.Bt = [grown(a) for a in self.At], [grown(b) for b in self.Bt]
        self.offset = grown(self.offset, float("inf"))

    def add(self, edit_id: int, key: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor], active: bool) -> int:
        """Put one edit's key and LoRAs (A [r, in], B [out, r] per module) into a free slot."""
        if edit_id in self.slot_of:
            raise ValueError(f"edit {edit_id} already has a slot")
        if len(A) != len(self.shapes) or len(B) != len(self.shapes):
            raise ValueError(f"expected LoRAs for {len(self.shapes)} modules, got {len(A)} A and {len(B)} B")
        if self.free:
            slot = self.free.pop()
        else:
            if self.high == self.capacity:
                self._grow()
            slot, self.high = self.high, self.high + 1
        key = key.detach().to(self.device, torch.float32).reshape(-1)
        self.keys[slot] = key
        self.index_keys[slot] = self.index_form(key[None])[0]
        self.sq_norms[slot] = self.index_keys[slot].pow(2).sum()
        for bank, t in zip(self.At, A):
            bank[slot] = t.detach().to(bank.device, self.dtype).T
        for bank, t in zip(self.Bt, B):
            bank[slot] = t.detach().to(bank.device, self.dtype).T
        self.offset[slot] = 0.0 if active else float("inf")
        self.slot_of[edit_id] = slot
        if self.ann is not None:
            self.ann.add(slot, self.index_keys[slot])
        return slot

    def remove(self, edit_id: int) -> None:
        """Delete the edit's key (it never routes again) and free its slot for reuse."""
        slot = self.slot_of.pop(edit_id)
        self.offset[slot] = float("inf")
        self.free.append(slot)
        if self.ann is not None:
            self.ann.forget(slot)
            if self.ann.stale() > max(1024, len(self)):
                self.ann.rebuild({s: self.index_keys[s] for s in self.slot_of.values()})

    def set_active(self, edit_id: int, active: bool) -> None:
        self.offset[self.slot_of[edit_id]] = 0.0 if active else float("inf")

    def lora(self, edit_id: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The edit's key, A [r, in] and B [out, r] of each module."""
        s = self.slot_of[edit_id]
        return self.keys[s], [a[s].T.contiguous() for a in self.At], [b[s].T.contiguous() for b in self.Bt]

    def owners(self) -> dict[int, int]:
        """slot -> edit id of every used slot."""
        return {s: e for e, s in self.slot_of.items()}

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {
            "slot_of": dict(self.slot_of),
            "free": list(self.free),
            "high": self.high,
            "offset": self.offset[: self.high].clone(),
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.slot_of, self.free, self.high = dict(ckpt["slot_of"]), list(ckpt["free"]), ckpt["high"]
        self.offset.fill_(float("inf"))
        self.offset[: self.high] = ckpt["offset"]
        if self.ann is not None:  # slots whose removal is rolled back go back into the graph, and back out
            used = set(self.slot_of.values())
            for slot in range(len(self.ann.slot_vid)):
                if slot not in used:
                    self.ann.forget(slot)
            for slot in used:
                if slot >= len(self.ann.slot_vid) or self.ann.slot_vid[slot] < 0:
                    self.ann.add(slot, self.index_keys[slot])

    # -- search -------------------------------------------------------------------------------------
    @property
    def index_dim(self) -> int:
        return self.key_dim if self.projection is None else self.projection.shape[1]

    def set_transform(self, center: torch.Tensor, projection: torch.Tensor | None) -> None:
        """Compare keys as (key - center) @ projection (e.g. a whitening); only while the bank is empty."""
        if len(self):
            raise RuntimeError("the key transform can only change while the bank is empty")
        self.center = center.to(self.device, torch.float32).reshape(self.key_dim).clone()
        self.projection = None if projection is None else projection.to(self.device, torch.float32).clone()
        self._bias = self.center if self.projection is None else self.center @ self.projection
        self.clear()

    def index_form(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys [N, key_dim] as the index compares them: transformed, and unit-norm for cosine."""
        if self.projection is None:
            z = keys.float() - self.center
        else:
            z = torch.addmm(self._bias, keys.float(), self.projection, alpha=1, beta=-1)
        return F.normalize(z, dim=1) if self.distance == "cosine" else z

    def distances(self, queries: torch.Tensor) -> torch.Tensor:
        """[B, high] distances from queries [B, key_dim] to every used slot (inf where not routable)."""
        keys, offset = self.index_keys[: self.high], self.offset[: self.high]
        q = self.index_form(queries)
        if self.distance == "cosine":  # 1 - cos + offset, in one fused op
            return torch.addmm(offset + 1.0, q, keys.T, alpha=-1.0)
        sq = q.pow(2).sum(1, keepdim=True) - 2.0 * q @ keys.T + self.sq_norms[: self.high]
        return sq.clamp_min(0).sqrt() + offset

    def pair_distances(self, queries: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """[N] distance from each query [N, key_dim] to its own slot (inf where that slot does not route)."""
        q, k = self.index_form(queries), self.index_keys[slots]
        if self.distance == "cosine":
            return 1.0 - (q * k).sum(1) + self.offset[slots]
        return (q - k).pow(2).sum(1).sqrt() + self.offset[slots]

    def nearest(self, queries: torch.Tensor, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest routable slot per query, less the slots `exclude` [high] marks: (distance [B], slot [B]); distance
        inf when none is routable.

        Exact by default; with an ANN index, the exact nearest among its candidates (asked for as many more as there
        are excluded slots, so an excluded key never hides the nearest one behind it from the index)."""
        if self.high == 0:
            b = queries.shape[0]
            return (torch.full((b,), float("inf"), device=queries.device),
                    torch.zeros(b, dtype=torch.long, device=queries.device))
        if self.ann is None:
            d = self.distances(queries)
            return (d if exclude is None else d.masked_fill(exclude[None, :], float("inf"))).min(dim=1)
        q = self.index_form(queries)
        # superseded keys and stale graph entries come back as candidates too: ask for that many more
        inactive = len(self) - int((self.offset[: self.high] == 0).sum())
        skipped = 0 if exclude is None else int(exclude.sum())
        cand = self.ann.search(q, self.ann_candidates + inactive + self.ann.stale() + skipped)  # [B, k], -1: none
        c = cand.clamp_min(0)
        keys = self.index_keys[c]  # [B, k, dim]
        dot = (keys @ q[:, :, None]).squeeze(2)
        if self.distance == "cosine":
            d = 1.0 - dot + self.offset[c]
        else:
            d = (q.pow(2).sum(1, keepdim=True) - 2.0 * dot + self.sq_norms[c]).clamp_min(0).sqrt() + self.offset[c]
        drop = cand < 0 if exclude is None else (cand < 0) | exclude[c]
        dist, j = d.masked_fill(drop, float("inf")).min(dim=1)
        return dist, c.gather(1, j[:, None]).squeeze(1)

    # -- applying -----------------------------------------------------------------------------------
    def gather(self, slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per module, the LoRAs (At [R, in, r], Bt [R, r, out]) of the given slots, one row each."""
        return [(a.index_select(0, slots.to(a.device)), b.index_select(0, slots.to(b.device)))
                for a, b in zip(self.At, self.Bt)]

    def slices(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The LoRAs of one slot as 2-d views (At [in, r], Bt [r, out]): cheaper than `gather` for one row."""
        return [(a[slot], b[slot]) for a, b in zip(self.At, self.Bt)]
