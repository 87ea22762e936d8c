"""Helpers shared by the benchmark scripts (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import json
from typing import Any


def parse_hp(items: list[str]) -> dict[str, Any]:
    """`--hp key=value` options: a value is JSON if it parses (numbers, true, null, lists), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--hp expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


class SolaRouter:
    """SoLA's router (its defaults, calibrated on a world's calibration part), no edit made: which of some held
    prompts each query prompt would route to. The diagnostics of the other routed methods ask with it what SoLA's
    keys would do for them (issue 21 item 4)."""

    def __init__(self, world, store) -> None:
        from editbank import Editor

        self.editor = Editor.open(world.path, method="sola", store=store, progress=False)
        self.editor.method.prepare()

    def nearest(self, held: list[str], prompts: list[str]) -> list[int | None]:
        """Per prompt: the index of the held prompt whose key is nearest, if within alpha, else None."""
        import torch

        s = self.editor.method
        with torch.no_grad():
            keys = s.bank.index_form(s._prompt_keys(held))
            z = s.bank.index_form(s._prompt_keys(prompts))
            d = 1.0 - z @ keys.T if s.hparams.distance == "cosine" else torch.cdist(z, keys)
            dist, j = d.min(dim=1)
        return [k if x < s.alpha else None for x, k in zip(dist.tolist(), j.tolist())]

    def close(self) -> None:
        self.editor.close()


def parse_value(text: str):
    """A positional `key=value` override's value: an int, a float, true/false, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def answers_with(editor, method, trainee, prompt: str, target: str) -> bool:
    """Does the routed method's `trainee` (an entry's values, a memory's delta; None: the method off), applied to
    the row whatever the routing, make the model answer `target` after `prompt` (greedy exact match)?"""
    import torch

    from editbank.methods.base import Route
    from editbank.tokens import make_batch

    b = make_batch(editor.tokenizer, [(prompt, target)], device=editor.device)
    with torch.no_grad(), method.disabled() if trainee is None else method.training(trainee), \
            method.routing(Route(query_index=b.query_index)):
        logits = editor.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    q, t = int(b.query_index[0]), b.target_len[0]
    return bool((logits[0, q : q + t].argmax(-1) == b.input_ids[0, q + 1 : q + 1 + t]).all())
