"""The LoRA bank's key search: exact scan vs the optional FAISS index give the same routes."""

from __future__ import annotations

import pytest
import torch

from editbank import Editor
from editbank.methods.lora_bank import LoraBank
from editbank.tokens import make_batch

faiss = pytest.importorskip("faiss", reason="the FAISS index is the optional extra editbank[faiss]")


def bank(ann: int, distance: str = "cosine") -> LoraBank:
    b = LoraBank(32, [(6, 5)], 2, torch.float32, "cpu", distance, ann_candidates=ann)
    b.set_transform(torch.zeros(32), torch.eye(32)[:, :24])  # a projection, as whitening gives
    return b


def fill(banks, keys, first_id: int = 1):
    for i, k in enumerate(keys):
        for b in banks:
            b.add(first_id + i, k, [torch.zeros(2, 5)], [torch.zeros(6, 2)], active=True)


def queries(keys: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    near = keys[:300] + 0.05 * torch.randn(300, keys.shape[1], generator=g)  # paraphrase-like
    return torch.cat([near, torch.randn(200, keys.shape[1], generator=g)])  # and unrelated


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_faiss_routes_equal_exact_routes(distance):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3000, 32, generator=g)
    exact, ann = bank(0, distance), bank(16, distance)
    fill([exact, ann], keys)
    q = queries(keys, g)
    alpha = float(exact.nearest(q[:300])[0].max()) * 1.01  # every near query routes, unrelated ones mostly not
    d_exact, s_exact = exact.nearest(q)
    d_ann, s_ann = ann.nearest(q)
    assert (d_exact < alpha).sum() >= 300
    assert torch.equal(d_exact < alpha, d_ann < alpha)
    routed = d_exact < alpha
    assert torch.equal(s_exact[routed], s_ann[routed])
    torch.testing.assert_close(d_ann[routed], d_exact[routed], atol=1e-4, rtol=0)  # other summation order
    # removals (stale graph entries), deactivations and slot reuse keep the routes equal
    for eid in range(1, 1500, 3):
        exact.remove(eid)
        ann.remove(eid)
    for eid in range(2, 600, 3):
        exact.set_active(eid, False)
        ann.set_active(eid, False)
    fill([exact, ann], torch.randn(200, 32, generator=g), first_id=10_000)  # fresh ids, reused slots
    d_exact, s_exact = exact.nearest(q)
    d_ann, s_ann = ann.nearest(q)
    routed = d_exact < alpha
    assert torch.equal(routed, d_ann < alpha)
    assert torch.equal(s_exact[routed], s_ann[routed])


def test_faiss_finds_a_key_behind_many_superseded_copies():
    key = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    ann = bank(4)
    fill([ann], torch.randn(100, 32, generator=torch.Generator().manual_seed(3)), first_id=1000)
    for eid in range(1, 41):  # the same fact re-edited 40 times: each supersedes the one before
        if eid > 1:
            ann.set_active(eid - 1, False)
        fill([ann], key, first_id=eid)
    d, s = ann.nearest(key)
    assert int(s[0]) == ann.slot_of[40] and float(d[0]) < 1e-5


def test_faiss_survives_rebuilds_and_an_empty_graph():
    key = torch.randn(1, 32, generator=torch.Generator().manual_seed(4))
    ann = bank(4)
    for eid in range(1, 1100):  # edit and undo the same prompt: stale entries pile up, the graph is rebuilt
        fill([ann], key, first_id=eid)
        ann.remove(eid)
    assert len(ann) == 0 and ann.nearest(key)[0][0] == float("inf")
    fill([ann], key, first_id=5000)
    ckpt = ann.checkpoint()
    for eid in range(6000, 7100):
        fill([ann], torch.randn(1, 32), first_id=eid)
        ann.remove(eid)
    ann.remove(5000)  # an undo whose removal rebuilds the graph ...
    ann.restore(ckpt)  # ... rolled back
    d, s = ann.nearest(key)
    assert int(s[0]) == ann.slot_of[5000] and float(d[0]) < 1e-5


def test_faiss_rolled_back_removal_is_searchable_again():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(50, 32, generator=g)
    ann = bank(8)
    fill([ann], keys)
    ckpt, slot = ann.checkpoint(), ann.slot_of[7]
    ann.remove(7)
    d, s = ann.nearest(keys[6:7])
    assert int(s[0]) != slot and float(d[0]) > 1e-3, "a removed key must not route"
    ann.restore(ckpt)
    d, s = ann.nearest(keys[6:7])
    assert int(s[0]) == ann.slot_of[7] and float(d[0]) < 1e-5


@pytest.mark.parametrize("ungated", [0, 4], ids=["every-edit-gated", "half-without-subject"])
def test_sola_with_faiss_gives_the_exact_editors_outputs(small_world, world_requests, ungated):
    """With the subject gate too: gated edits are scored exactly whatever the index, ungated ones through it."""
    import dataclasses

    from editbank import load_model

    reqs = [dataclasses.replace(r, subject=None) if i < ungated else r for i, r in enumerate(world_requests[:8])]
    eds = []
    for index in ("exact", "faiss"):
        model, tok = load_model(small_world.path)
        ed = Editor(model, tok, method="sola", index=index, corpus=small_world.fact_prompts())
        for r in reqs:
            ed.edit(r)
        eds.append(ed)
    pairs = [(r.prompt, r.target) for r in reqs] + [(p, r.target) for r in reqs for p in r.rephrases]
    pairs += [p for r in reqs for p in r.locality]
    b = make_batch(eds[0].tokenizer, pairs)
    exact, ann = (ed.logits(b.input_ids, b.attention_mask, b.query_index) for ed in eds)
    assert torch.equal(exact, ann)


def test_sola_with_faiss_and_a_mixed_gate_routes_as_the_exact_search(small_world):
    """Gated keys nearer than an ungated edit must not hide it from the index's candidates (a wide alpha: every
    prompt has an ungated edit within it, and many a nearer gated key it may not route to)."""
    import dataclasses

    from editbank import load_model

    reqs = small_world.edit_requests(n=40, seed=0)
    edits = [r if i < 12 else dataclasses.replace(r, subject=None) for i, r in enumerate(reqs[:24])]
    prompts = [q for r in reqs[:24] for q in (r.prompt, *r.rephrases)] + [p for r in reqs for p, _ in r.locality]
    routes = []
    for index in ("exact", "faiss"):
        model, tok = load_model(small_world.path)
        ed = Editor(model, tok, method="sola", index=index, corpus=small_world.fact_prompts(),
                    paraphrases=small_world.calibration_paraphrases(),
                    paraphrase_subjects=small_world.calibration_paraphrase_subjects(), alpha=1.9)
        for r in edits:
            ed.edit(r, check=False)
        routes.append(ed.method.routes(prompts))
        if index == "exact":  # the rule, from the whole distance matrix: the nearest key the row may route to
            m = ed.method
            d = m.bank.distances(m._prompt_keys(prompts))
            owners, gate = m.bank.owners(), m._gate()
            named = gate.candidates([tok(p)["input_ids"] for p in prompts])
            want = []
            for row, found in zip(d.tolist(), named):
                ok = [(v, s) for s, v in enumerate(row)
                      if (s in found and v < m.gate_alpha) or (not gate.gated[s] and v < m.alpha)]
                want.append(owners[min(ok)[1]] if ok else None)
        ed.close()
    assert routes[0] == want and routes[1] == want
    assert {e for e in want if e is not None} & set(range(13, 25)), "some prompt routes to an ungated edit"
