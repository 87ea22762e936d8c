"""A bank of per-edit LoRAs as stacked tensors, with their routing keys as one matrix.

Each edit owns one slot: a key (float32) and, for every edited module, a LoRA pair A [r, in], B [out, r].
A forward gathers the slots its rows route to (`delta`), never one module per edit. Slots grow by
doubling and are reused after a removal. Writing a slot never changes another slot's contents, so a
checkpoint of the bank is only its small slot table (`checkpoint`/`restore`).
"""

from __future__ import annotations

from typing import Any

import torch

DISTANCES = ("cosine", "l2")


class LoraBank:
    def __init__(self, key_dim: int, shapes: list[tuple[int, int]], rank: int, dtype, device, distance: str):
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.key_dim, self.shapes, self.rank = key_dim, shapes, rank
        self.dtype, self.device, self.distance = dtype, torch.device(device), distance
        self.clear()

    def clear(self) -> None:
        """Drop every slot (the key standardization, a property of the base model, is kept)."""
        f32 = dict(dtype=torch.float32, device=self.device)
        if not hasattr(self, "center"):
            self.center = torch.zeros(self.key_dim, **f32)
            self.scale = torch.ones(self.key_dim, **f32)
        self.keys = torch.zeros((0, self.key_dim), **f32)  # as given (artifacts)
        self.index_keys = torch.zeros((0, self.key_dim), **f32)  # standardized (and unit-norm for cosine)
        self.sq_norms = torch.zeros(0, **f32)
        self.A = [torch.zeros((0, self.rank, i), dtype=self.dtype, device=self.device) for _, i in self.shapes]
        self.B = [torch.zeros((0, o, self.rank), dtype=self.dtype, device=self.device) for o, _ in self.shapes]
        self.routable = torch.zeros(0, dtype=torch.bool, device=self.device)
        self.slot_of: dict[int, int] = {}  # edit id -> slot
        self.free: list[int] = []
        self.high = 0  # slots [0, high) have been used; the rest of the capacity is empty

    # -- slots ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.slot_of)

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    def _grow(self) -> None:
        new = max(16, 2 * self.capacity)

        def grown(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((new, *t.shape[1:]))
            out[: t.shape[0]] = t
            return out

        self.keys, self.index_keys, self.sq_norms = grown(self.keys), grown(self.index_keys), grown(self.sq_norms)
        self.A, self.B = [grown(a) for a in self.A], [grown(b) for b in self.B]
        self.routable = grown(self.routable)

    def add(self, edit_id: int, key: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor], active: bool) -> int:
        """Put one edit's key and LoRAs into a free slot; `active` decides whether it routes."""
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
        for bank, t in zip(self.A, A):
            bank[slot] = t.detach().to(self.device, self.dtype)
        for bank, t in zip(self.B, B):
            bank[slot] = t.detach().to(self.device, self.dtype)
        self.routable[slot] = active
        self.slot_of[edit_id] = slot
        return slot

    def remove(self, edit_id: int) -> None:
        """Delete the edit's key (it never routes again) and free its slot for reuse."""
        slot = self.slot_of.pop(edit_id)
        self.routable[slot] = False
        self.free.append(slot)

    def set_active(self, edit_id: int, active: bool) -> None:
        self.routable[self.slot_of[edit_id]] = active

    def is_active(self, edit_id: int) -> bool:
        return bool(self.routable[self.slot_of[edit_id]])

    def lora(self, edit_id: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        s = self.slot_of[edit_id]
        return self.keys[s], [a[s] for a in self.A], [b[s] for b in self.B]

    def owners(self) -> dict[int, int]:
        """slot -> edit id of every used slot."""
        return {s: e for e, s in self.slot_of.items()}

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {
            "slot_of": dict(self.slot_of),
            "free": list(self.free),
            "high": self.high,
            "routable": self.routable[: self.high].clone(),
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.slot_of, self.free, self.high = dict(ckpt["slot_of"]), list(ckpt["free"]), ckpt["high"]
        self.routable.zero_()
        self.routable[: self.high] = ckpt["routable"]

    # -- search -------------------------------------------------------------------------------------
    def standardize(self, center: torch.Tensor, scale: torch.Tensor) -> None:
        """Set the per-dimension standardization (key - center) / scale applied before measuring distance."""
        if len(self):
            raise RuntimeError("the key standardization can only change while the bank is empty")
        self.center = center.to(self.device, torch.float32).reshape(self.key_dim).clone()
        self.scale = scale.to(self.device, torch.float32).reshape(self.key_dim).clone()

    def index_form(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys [N, key_dim] as the index compares them: standardized, and unit-norm for cosine."""
        z = (keys.float() - self.center) / self.scale
        return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12) if self.distance == "cosine" else z

    def distances(self, queries: torch.Tensor) -> torch.Tensor:
        """[B, high] distances from queries [B, key_dim] to every used slot (inf where not routable)."""
        keys, live = self.index_keys[: self.high], self.routable[: self.high]
        q = self.index_form(queries)
        if self.distance == "cosine":
            d = 1.0 - q @ keys.T
        else:
            d = (q.pow(2).sum(1, keepdim=True) - 2.0 * q @ keys.T + self.sq_norms[: self.high]).clamp_min(0).sqrt()
        return d.masked_fill(~live, float("inf"))

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact nearest routable slot per query: (distance [B], slot [B]); distance inf when none is routable."""
        if self.high == 0:
            b = queries.shape[0]
            return (torch.full((b,), float("inf"), device=queries.device),
                    torch.zeros(b, dtype=torch.long, device=queries.device))
        return self.distances(queries).min(dim=1)

    # -- applying -----------------------------------------------------------------------------------
    def delta(self, module: int, x: torch.Tensor, slots: torch.Tensor, scale: float) -> torch.Tensor:
        """LoRA outputs [R, S, out] of module `module` for inputs x [R, S, in], row r using slot slots[r]."""
        a = self.A[module].index_select(0, slots)  # [R, r, in]
        b = self.B[module].index_select(0, slots)  # [R, out, r]
        return torch.bmm(torch.bmm(x.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2)) * scale
