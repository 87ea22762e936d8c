"""Context prefixes, subject token positions, and the keys/residuals read at them (one batched forward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models.hooks import trace
from ...requests import EditRequest
from ...tokens import batch_from_ids, pad_id, prompt_ids

# used when the method has no corpus: short neutral openings (ROME samples them from the model instead)
DEFAULT_PREFIXES = ("Note that", "In short,", "As expected,", "Then", "Here is a fact.", "Today")


def context_prefixes(corpus: list[str] | None, n: int, words: int) -> list[str]:
    """"" plus `n` short prefixes: the first `words` words of evenly spaced corpus texts (else fixed strings)."""
    if n == 0:
        return [""]
    if corpus:
        texts = sorted(set(corpus))
        step = max(1, len(texts) // n)
        chosen = [" ".join(t.split()[:words]).rstrip(".,:;?!") + "." for t in texts[::step][:n]]
    else:
        chosen = list(DEFAULT_PREFIXES[:n])
    return [""] + [f"{p} " for p in chosen]


def subject_last_index(tokenizer, prefix: str, prompt: str, subject: str | None) -> tuple[list[int], int]:
    """Token ids of prefix+prompt and the position of the subject's last token in it (last token if None)."""
    text = prefix + prompt
    ids = prompt_ids(tokenizer, text)
    if subject is None or subject not in prompt:
        return ids, len(ids) - 1
    end = len(prefix) + prompt.index(subject) + len(subject)
    return ids, min(len(prompt_ids(tokenizer, text[:end])), len(ids)) - 1


@dataclass
class Lookup:
    """Rows of prompts (no targets) with the position to read in each and the request each belongs to."""

    ids: list[list[int]]
    index: list[int]
    owner: list[int]


def lookup_rows(tokenizer, requests: list[EditRequest], prefixes: list[str], fact_token: str = "subject_last"
                ) -> Lookup:
    """One row per (request, prefix), reading at the subject's last token (or the last token: `fact_token`)."""
    ids, index, owner = [], [], []
    for r, req in enumerate(requests):
        for prefix in prefixes:
            subject = req.subject if fact_token == "subject_last" else None
            row, i = subject_last_index(tokenizer, prefix, req.prompt, subject)
            ids.append(row)
            index.append(i)
            owner.append(r)
    return Lookup(ids, index, owner)


@torch.no_grad()
def read_rows(model, tokenizer, path: str, ids: list[list[int]], index: list[int], *, inputs: bool) -> torch.Tensor:
    """The module's input (or output) at position index[j] of row j, rows run as one batch: [rows, width]."""
    batch = batch_from_ids([(r, []) for r in ids], pad_id(tokenizer), next(model.parameters()).device)
    with trace(model, path, inputs=inputs, outputs=not inputs) as tr:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    acts = tr[path].input if inputs else tr[path].output
    return acts[torch.arange(len(ids), device=acts.device), torch.tensor(index, device=acts.device)]


@torch.no_grad()
def read_at(model, tokenizer, path: str, rows: Lookup, n: int, *, inputs: bool) -> torch.Tensor:
    """Mean over each request's rows of the module's input (or output) at the lookup position: [n, width]."""
    picked = read_rows(model, tokenizer, path, rows.ids, rows.index, inputs=inputs)
    owner = torch.tensor(rows.owner, device=picked.device)
    total = torch.zeros(n, picked.shape[-1], dtype=torch.float32, device=picked.device)
    total.index_add_(0, owner, picked.float())
    return total / torch.bincount(owner, minlength=n).clamp(min=1).unsqueeze(1).float()
