"""Tokenization conventions shared by training, editing and evaluation.

A prompt is tokenized with the tokenizer's own special tokens (BOS where the tokenizer adds one);
a target/answer is tokenized without special tokens and appended. Every part of editbank (world
training, methods, evaluation) builds sequences with these functions so they agree token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


def target_ids(tokenizer, target: str) -> list[int]:
    return list(tokenizer(target, add_special_tokens=False)["input_ids"])


def pair_ids(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Prompt ids and the target's ids as they occur after that prompt.

    Tokenizing the whole sentence and splitting at the prompt avoids artefacts of tokenizing the target
    alone (SentencePiece tokenizers turn " Dunmore" into ['▁', '▁Dunmore'] on its own but
    ['▁Dunmore'] inside the sentence). Falls back to separate tokenization when the prompt's tokens
    are not a prefix of the sentence's.
    """
    p = prompt_ids(tokenizer, prompt)
    full = list(tokenizer(prompt + target)["input_ids"])
    if len(full) > len(p) and full[: len(p)] == p:
        return p, full[len(p) :]
    return p, target_ids(tokenizer, target)


@dataclass
class Batch:
    """Right-padded prompt+target sequences.

    `input_ids`/`attention_mask` are [B, T]; `labels` is -100 except at target tokens;
    `query_index[b]` is the position of the last prompt token of row b (the routing position);
    `prompt_len` and `target_len` are per-row lengths.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    query_index: torch.Tensor
    prompt_len: list[int]
    target_len: list[int]

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.query_index.to(device),
            self.prompt_len,
            self.target_len,
        )


def pad_id(tokenizer) -> int:
    for tok in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tok is not None:
            return int(tok)
    return 0


def make_batch(tokenizer, pairs: list[tuple[str, str]], device=None) -> Batch:
    """Tokenize (prompt, target) pairs into one right-padded teacher-forcing batch."""
    rows = [pair_ids(tokenizer, p, t) for p, t in pairs]
    return batch_from_ids(rows, pad_id(tokenizer), device)


def batch_from_ids(rows: list[tuple[list[int], list[int]]], pad: int, device=None) -> Batch:
    """Right-padded teacher-forcing batch from (prompt ids, target ids) rows."""
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t, dtype=torch.long)
        mask[i, :n] = 1
        if t:
            lab[i, len(p) : n] = torch.tensor(t, dtype=torch.long)
    qidx = torch.tensor([len(p) - 1 for p, _ in rows])
    batch = Batch(ids, mask, lab, qidx, [len(p) for p, _ in rows], [len(t) for _, t in rows])
    return batch.to(device) if device is not None else batch
