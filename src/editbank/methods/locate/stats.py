"""Second moment C = E[k kᵀ] of an MLP output projection's inputs over a corpus, cached on disk.

Computed in one streaming pass (batches of texts, a running float64 sum) and saved as safetensors under
`<editbank cache>/stats/`, keyed by the base model's fingerprint, the layer, the sample count and a digest
of the texts, so it is computed once per (model, layer, corpus).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from safetensors.torch import load_file, save_file

from ...models.hooks import trace
from ...tokens import batch_from_ids, pad_id, prompt_ids


def random_texts(tokenizer, n: int = 64, length: int = 24, seed: int = 0) -> list[list[int]]:
    """Token rows of random ids (the fallback corpus when a method has no texts), deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def corpus_rows(tokenizer, texts: list[str] | None, n_samples: int, path: str | None = None) -> list[list[int]]:
    """Token rows of at most `n_samples` texts: a text file's lines, else `texts`, else random tokens."""
    if path is not None:
        texts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not texts:
        return random_texts(tokenizer)[:n_samples]
    return [prompt_ids(tokenizer, t) for t in sorted(set(texts))[:n_samples]]


def rows_digest(rows: list[list[int]]) -> str:
    """Short digest of the token rows (part of the cache key)."""
    h = hashlib.sha256()
    for r in rows:
        h.update((",".join(map(str, r)) + "\n").encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def key_second_moment(model, tokenizer, path: str, rows: list[list[int]], batch_size: int = 32,
                      progress: bool = True) -> torch.Tensor:
    """E[k kᵀ] of the inputs of the module at `path` over every non-pad, non-BOS token of `rows` (float32)."""
    device = next(model.parameters()).device
    bos = getattr(tokenizer, "bos_token_id", None)
    total, count = None, 0
    starts = range(0, len(rows), batch_size)
    for s in track(starts, description=f"key statistics {path}", disable=not progress or len(starts) < 20,
                   transient=True, console=Console(stderr=True)):
        max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        chunk = [(r[:max_len] if max_len else r, []) for r in rows[s : s + batch_size]]
        batch = batch_from_ids(chunk, pad_id(tokenizer), device)
        with trace(model, path, outputs=False) as tr:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        keep = batch.attention_mask.bool()
        if bos is not None:
            keep &= batch.input_ids != bos
        k = tr[path].input[keep].double()
        total = k.T @ k if total is None else total + k.T @ k
        count += k.shape[0]
    if total is None or count == 0:
        raise ValueError("no tokens to estimate key statistics from")
    return (total / count).float()


def cache_file(root: Path, fingerprint: str, layer: int, n: int, digest: str) -> Path:
    """Where the statistics of (model, layer, sample count, corpus) live."""
    return root / "stats" / fingerprint[:24] / f"layer{layer}_n{n}_{digest}.safetensors"


def cached_second_moment(model, tokenizer, path: str, layer: int, rows: list[list[int]], fingerprint: str,
                         batch_size: int = 32, cache_dir: Path | None = None) -> torch.Tensor:
    """`key_second_moment`, loaded from / saved to the editbank cache."""
    from ...cache import cache_root

    file = cache_file(cache_root(cache_dir), fingerprint, layer, len(rows), rows_digest(rows))
    if file.is_file():
        return load_file(str(file))["mom2"]
    mom2 = key_second_moment(model, tokenizer, path, rows, batch_size)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp{id(mom2)}")
    save_file({"mom2": mom2.contiguous().cpu(), "count": torch.tensor(len(rows))}, str(tmp))
    tmp.replace(file)
    return mom2.to(next(model.parameters()).device)


def precompute(model, tokenizer, layers: list[int], n_samples: int, texts: list[str] | None = None,
               text_file: str | None = None, batch_size: int = 32) -> list[Path]:
    """Compute (or find) the cached key statistics of `layers`, as the methods will ask for them; their files."""
    from ...cache import cache_root
    from ...models.loading import model_fingerprint
    from ...models.registry import arch_of

    arch = arch_of(model)
    fingerprint = model_fingerprint(model)
    rows = corpus_rows(tokenizer, texts, n_samples, text_file)
    files = []
    for layer in layers:
        cached_second_moment(model, tokenizer, arch.layer_path(layer, "mlp_out"), layer, rows, fingerprint,
                             batch_size)
        files.append(cache_file(cache_root(), fingerprint, layer, len(rows), rows_digest(rows)))
    return files
