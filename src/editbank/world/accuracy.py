"""Greedy exact match of a model on (prompt, answer) pairs, teacher-forced or by generation."""

from __future__ import annotations

import torch

from editbank.tokens import make_batch, pad_id, prompt_ids, target_ids


@torch.no_grad()
def exact_match_flags(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 256) -> list[bool]:
    """Per pair: would greedy decoding produce every answer token? (One teacher-forced pass, exact.)"""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    flags: list[bool] = []
    for i in range(0, len(pairs), batch_size):
        b = make_batch(tokenizer, pairs[i : i + batch_size], device=device)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        pred = logits[:, :-1].argmax(-1)
        gold = b.labels[:, 1:]
        ok = (pred == gold) | (gold == -100)
        flags.extend(ok.all(dim=1).tolist())
    model.train(was_training)
    return flags


@torch.no_grad()
def generate_flags(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 128) -> list[bool]:
    """Per pair: does `model.generate` (greedy, left-padded batch) start with the answer's tokens?"""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pid = pad_id(tokenizer)
    flags: list[bool] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        prompts = [prompt_ids(tokenizer, p) for p, _ in chunk]
        targets = [target_ids(tokenizer, a) for _, a in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), pid, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(len(t) for t in targets),
            do_sample=False,
            pad_token_id=pid,
        )[:, width:].tolist()
        flags.extend(o[: len(t)] == t for o, t in zip(out, targets))
    model.train(was_training)
    return flags


def accuracy(flags: list[bool]) -> float:
    """Fraction of True flags (0.0 for none)."""
    return sum(flags) / len(flags) if flags else 0.0
