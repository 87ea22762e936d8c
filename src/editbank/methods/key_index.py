"""An optional approximate nearest-key index (FAISS HNSW) for banks of 100,000+ keys.

It only proposes candidates: the bank re-scores them exactly with its own distance, so a route is always
one the exact search could take, and it is the same route whenever the true nearest key is among the
candidates (the test checks this on random banks). HNSW cannot delete, so a removed or superseded key stays
in the graph and is filtered out by the bank (its distance is inf); the graph is rebuilt once stale entries
outnumber live ones. Install with `pip install editbank[faiss]`.
"""

from __future__ import annotations

import numpy as np
import torch


def require_faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("index='faiss' needs FAISS: pip install 'editbank[faiss]' (faiss-cpu)") from e
    return faiss


class FaissKeyIndex:
    def __init__(self, dim: int, distance: str, m: int = 32, ef_search: int = 128):
        self.faiss = require_faiss()
        self.dim, self.distance = dim, distance
        self.m, self.ef_search = m, ef_search
        self._reset()

    def _reset(self) -> None:
        metric = self.faiss.METRIC_INNER_PRODUCT if self.distance == "cosine" else self.faiss.METRIC_L2
        self.index = self.faiss.IndexHNSWFlat(self.dim, self.m, metric)
        self.index.hnsw.efSearch = self.ef_search  # raised per search when more candidates are asked for
        self.index.hnsw.efConstruction = max(40, self.ef_search)
        self.vid_slot = np.zeros(0, dtype=np.int64)  # graph id -> slot it was added for
        self.slot_vid = np.zeros(0, dtype=np.int64)  # slot -> its current graph id (-1: none)
        self.live = 0

    def add(self, slot: int, vector: torch.Tensor) -> None:
        if slot >= len(self.slot_vid):
            grown = np.full(max(16, 2 * len(self.slot_vid), slot + 1), -1, dtype=np.int64)
            grown[: len(self.slot_vid)] = self.slot_vid
            self.slot_vid = grown
        self.live += int(self.slot_vid[slot] < 0)
        self.slot_vid[slot] = len(self.vid_slot)
        self.vid_slot = np.append(self.vid_slot, slot)
        self.index.add(vector.detach().float().cpu().numpy().reshape(1, -1))

    def rebuild(self, vectors: dict[int, torch.Tensor]) -> None:
        """Start a fresh graph holding exactly `vectors` (slot -> vector)."""
        self._reset()
        for slot, v in vectors.items():
            self.add(slot, v)

    def stale(self) -> int:
        return len(self.vid_slot) - self.live

    def forget(self, slot: int) -> None:
        if slot < len(self.slot_vid) and self.slot_vid[slot] >= 0:
            self.slot_vid[slot] = -1
            self.live -= 1

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """`k` candidate slots per index-form query [B, k]; -1 where there is none (or the entry is stale)."""
        if len(self.vid_slot) == 0:
            return torch.full((queries.shape[0], 1), -1, dtype=torch.long, device=queries.device)
        k = max(1, min(k, len(self.vid_slot)))
        self.index.hnsw.efSearch = max(self.ef_search, k)
        _, ids = self.index.search(queries.detach().float().cpu().numpy(), k)
        slots = np.where(ids >= 0, self.vid_slot[np.maximum(ids, 0)], -1)
        current = (slots >= 0) & (self.slot_vid[np.maximum(slots, 0)] == ids)
        return torch.from_numpy(np.where(current, slots, -1)).to(queries.device)
