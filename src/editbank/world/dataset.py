"""Worlds from datasets: a world model trained on a dataset's original facts, so its edits change known facts.

The spec's `pairs` are, per request with a true answer (`meta["true_object"]`): the prompt and every rephrase
with that answer, and every locality probe with its own answer (CounterFact's neighbourhood prompts, ZsRE's NQ
questions). The model is trained until it answers them, so the dataset's requests (their `target`) are
counterfactual edits of facts the model knows, its rephrases test generalization of a known fact moved, and its
locality probes are known facts that must stay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..requests import EditRequest, normalize_target

# model, training and tokenizer of every dataset world (wider than the large world, with a vocabulary for real text);
# override them with dataset_spec(..., model=..., train=..., tokenizer=...)
MODEL = {"layers": 4, "hidden": 256, "heads": 4, "intermediate": 683, "max_position_embeddings": 128}
TRAIN = {"steps": 6000, "batch_size": 64, "lr": 1e-3, "warmup": 200, "eval_every": 250, "stop_at": 1.0}
TOKENIZER = {"vocab_size": 4096}


def dataset_pairs(requests: list[EditRequest]) -> tuple[list[list[str]], dict[str, int]]:
    """The training pairs of `requests` and what was left out (no true answer; a prompt asked twice with two
    answers keeps the first)."""
    pairs: dict[str, str] = {}
    skipped = {"no_true_object": 0, "conflicting_prompt": 0}

    def add(prompt: str, answer: str) -> None:
        prompt = prompt.rstrip()
        if pairs.setdefault(prompt, normalize_target(answer)) != normalize_target(answer):
            skipped["conflicting_prompt"] += 1

    for r in requests:
        true = r.meta.get("true_object")
        if not isinstance(true, str) or not true.strip():
            skipped["no_true_object"] += 1
            continue
        for p in (r.prompt, *r.rephrases):
            add(p, true)
        for p, a in r.locality:
            add(p, a)
    return [[p, a] for p, a in pairs.items()], skipped


def dataset_spec(path: str | Path, format: str | None = None, limit: int | None = None, name: str | None = None,
                 **overrides: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """The world spec of a dataset file (any format `load_requests` reads); `overrides` replace the model, train
    or tokenizer sections. Returns (spec, what was left out)."""
    from ..data import load_requests

    reqs = load_requests(path, format=format, limit=limit)
    pairs, skipped = dataset_pairs(reqs)
    if not pairs:
        raise ValueError(f"{path}: no request has a true answer (meta['true_object']) to train on")
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(path).stem)
    spec = {"name": name or f"{stem}-{len(reqs)}", "seed": 0, "relations": [], "pairs": pairs,
            "model": dict(MODEL), "train": dict(TRAIN), "tokenizer": dict(TOKENIZER)}
    for key, value in overrides.items():
        if key not in ("model", "train", "tokenizer"):
            raise ValueError(f"unknown override {key!r} (model, train, tokenizer)")
        spec[key] = {**spec[key], **value}
    return spec, {"requests": len(reqs), "pairs": len(pairs), **skipped}


def build_dataset_world(data: str, limit: int | None = None, progress: bool = True, **kwargs: Any):
    """Build (or reuse from the cache) the world of `data`, "FORMAT:PATH" (FORMAT may be "auto")."""
    from .core import World

    fmt, sep, path = data.partition(":")
    if not sep or not path:
        raise ValueError(f"dataset must be FORMAT:PATH (e.g. counterfact:data.json), got {data!r}")
    spec, _ = dataset_spec(path, format=None if fmt == "auto" else fmt, limit=limit)
    return World.build(spec, progress=progress, **kwargs)
