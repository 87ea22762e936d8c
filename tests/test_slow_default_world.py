"""Slow: the default world's quality targets and the GRACE and SoLA acceptance runs on it (pytest -m slow)."""

from __future__ import annotations

import pytest
import torch

from editbank import Editor, World
from editbank.world.accuracy import exact_match_flags

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_world():
    return World.build("default", progress=False)


def test_default_world_quality(default_world):
    model, tok = default_world.load_model(), default_world.load_tokenizer()
    for split, floor in (("train", 0.98), ("reserved", 0.85)):
        flags = exact_match_flags(model, tok, default_world.queries(split))
        assert sum(flags) / len(flags) >= floor, split


def test_grace_twenty_edits_undo_five_on_default_world(default_world):
    from editbank.tokens import make_batch

    reqs = default_world.edit_requests(n=20, seed=0)
    ed = Editor.open(default_world.path, method="grace")

    def raw_logits(r):
        b = make_batch(ed.tokenizer, [(r.prompt, r.target)])
        return ed.model(input_ids=b.input_ids).logits

    with ed.unedited():
        base = [raw_logits(r) for r in reqs[:5]]
    edits = [ed.edit(r) for r in reqs]
    for e in edits[:5]:
        ed.undo(e.id)
    assert all(torch.equal(raw_logits(r), b) for r, b in zip(reqs[:5], base))
    assert ed.evaluate(reqs[5:], protocol="greedy_exact_match")["reliability"] == 1.0


def test_sola_every_editable_fact_then_undo_ten_percent(default_world):
    """Issue 3's acceptance run: T = every editable fact (450), final-model greedy exact match, undo 10%."""
    import random

    from editbank.evaluate import rollback_eval

    reqs = default_world.edit_requests(n=len(default_world.editable_facts), seed=0)
    ed = Editor.open(default_world.path, method="sola")
    for r in reqs:
        ed.edit(r)
    rep = ed.evaluate(reqs, protocol="greedy_exact_match")
    assert rep["reliability"] >= 0.99 and rep["locality"] >= 0.99 and rep["generalization"] >= 0.5, rep
    rb = rollback_eval(ed, ed.edits("active"), fraction=0.1, seed=random.Random(0).randrange(1000))
    assert rb["restored"] == 1.0 and rb["kept"]["reliability"] >= 0.99
    probes = [p for r in reqs for p in r.locality]
    unrouted = [p for p, route in zip(probes, ed.method.routes([p for p, _ in probes])) if route is None]
    assert len(unrouted) >= 0.9 * len(probes)
    from editbank.tokens import make_batch

    b = make_batch(ed.tokenizer, unrouted)
    edited = ed.logits(b.input_ids, b.attention_mask, b.query_index)
    with ed.unedited():
        assert torch.equal(ed.logits(b.input_ids, b.attention_mask, b.query_index), edited)
