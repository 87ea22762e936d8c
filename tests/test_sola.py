"""SoLA on the small world: routing, exact undo, supersede chains, persistence, calibration, failures."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from editbank import Editor, EditRequest
from editbank.methods.base import EditFailed
from editbank.methods.sola import Sola, SolaHparams
from editbank.store import EditStore
from editbank.tokens import make_batch


def logits_of(ed: Editor, req: EditRequest | tuple[str, str]) -> torch.Tensor:
    prompt, target = (req.prompt, req.target) if isinstance(req, EditRequest) else req
    b = make_batch(ed.tokenizer, [(prompt, target)])
    return ed.logits(b.input_ids, b.attention_mask, b.query_index)[0]


def routed(ed: Editor, prompt: str) -> bool:
    return ed.method.routes([prompt])[0] is not None


@pytest.fixture
def sola(world_model, small_world, tmp_path):
    model, tok = world_model
    ed = Editor(model, tok, method="sola", store=tmp_path / "edits.db", corpus=small_world.fact_prompts(),
                paraphrases=small_world.calibration_paraphrases())
    yield ed
    ed.close()


def other_target(small_world, req: EditRequest, *avoid: str) -> EditRequest:
    objects = small_world.relation(req.meta["relation"]).objects
    taken = {req.target, " " + req.meta["true_object"], *avoid}
    return dataclasses.replace(req, target=next(f" {o}" for o in objects if f" {o}" not in taken))


def test_edits_hold_undo_is_exact_and_unrouted_probes_are_untouched(sola, world_requests):
    reqs = world_requests[:20]
    probes = [p for r in reqs for p in r.locality]
    with sola.unedited():
        base = [logits_of(sola, r) for r in reqs]
        base_probes = [logits_of(sola, p) for p in probes]
    edits = [sola.edit(r) for r in reqs]
    assert sola.evaluate(reqs, protocol="greedy_exact_match")["reliability"] == 1.0
    undone = random.Random(0).sample(range(len(reqs)), 4)
    for i in undone:
        sola.undo(edits[i].id)
    for i in undone:
        assert torch.equal(logits_of(sola, reqs[i]), base[i]), "undo must restore the exact pre-edit logits"
    kept = [r for i, r in enumerate(reqs) if i not in undone]
    assert sola.evaluate(kept, protocol="greedy_exact_match")["reliability"] == 1.0
    unrouted = [i for i, (p, _) in enumerate(probes) if not routed(sola, p)]
    assert len(unrouted) > len(probes) // 2
    for i in unrouted:
        assert torch.equal(logits_of(sola, probes[i]), base_probes[i])


def test_undo_equals_a_fresh_editor_fed_only_the_kept_edits(sola, small_world, world_requests):
    """Exact in the strong sense: not only the undone prompts, every prompt answers as the model that never got the
    undone edits does, although the fresh editor gives the kept edits other ids (seeds come from the requests)."""
    from editbank import load_model

    reqs = world_requests[:20]
    edits = [sola.edit(r, check=False) for r in reqs]
    undone = set(random.Random(1).sample(range(len(reqs)), 4))
    for i in sorted(undone):
        sola.undo(edits[i].id)
    model, tok = load_model(small_world.path)
    fresh = Editor(model, tok, method="sola", corpus=small_world.fact_prompts(),
                paraphrases=small_world.calibration_paraphrases())
    kept = [r for i, r in enumerate(reqs) if i not in undone]
    for r in kept:
        fresh.edit(r, check=False)
    assert [e.id for e in fresh.edits()] != [e.id for e in sola.edits("active")]
    prompts = [(r.prompt, r.target) for r in reqs] + [p for r in reqs for p in r.locality]
    prompts += [(q, r.target) for r in reqs for q in r.rephrases]
    for p in prompts:
        assert torch.equal(logits_of(sola, p), logits_of(fresh, p)), p
    fresh.close()


def test_generation_keeps_the_prompt_decision(sola, world_requests):
    multi = [r for r in world_requests if len(sola.tokenizer(r.target, add_special_tokens=False)["input_ids"]) > 1]
    req = multi[0]
    n = len(sola.tokenizer(req.target, add_special_tokens=False)["input_ids"])
    sola.edit(req)
    assert sola.generate(req.prompt, max_new_tokens=n).strip() == req.target.strip()


def test_mixed_batch_equals_rows_alone(sola, world_requests):
    reqs = world_requests[:3]
    for r in reqs[:2]:
        sola.edit(r)
    rows = [(reqs[0].prompt, reqs[0].target), (reqs[2].prompt, reqs[2].target), (reqs[1].prompt, reqs[1].target),
            reqs[0].locality[0]]
    assert [routed(sola, p) for p, _ in rows] == [True, False, True, False]
    b = make_batch(sola.tokenizer, rows)
    together = sola.logits(b.input_ids, b.attention_mask, b.query_index)
    for i, row in enumerate(rows):
        alone = logits_of(sola, row)
        n = alone.shape[0]
        torch.testing.assert_close(together[i, :n], alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(together[i, :n].argmax(-1), alone.argmax(-1))


def test_reopen_gives_identical_outputs(world_model, small_world, world_requests, tmp_path):
    model, tok = world_model
    path = tmp_path / "e.db"
    ed = Editor(model, tok, method="sola", store=path, corpus=small_world.fact_prompts(),
                paraphrases=small_world.calibration_paraphrases())
    for r in world_requests[:4]:
        ed.edit(r)
    ed.undo(2)
    want = [logits_of(ed, r) for r in world_requests[:5]]
    alpha = ed.method.alpha
    ed.close()
    ed = Editor(model, tok, store=path)  # no corpus needed: the calibration is in the store
    assert ed.method.name == "sola" and ed.method.alpha == alpha and len(ed.method.bank) == 3
    for r, w in zip(world_requests[:5], want):
        assert torch.equal(logits_of(ed, r), w)
    ed.close()


def test_store_state_does_not_grow_with_edits(sola, world_requests, monkeypatch):
    """The LoRAs are stored once, as artifacts; the state stays the same size and its constant tensors
    (the key whitening) are not rewritten after each edit."""
    written = []
    put_state = sola.store.put_state

    def spy(tensors, meta, unchanged=()):
        written.append(set(tensors) - set(unchanged))
        put_state(tensors, meta, unchanged)

    monkeypatch.setattr(sola.store, "put_state", spy)
    sizes = []
    for r in world_requests[:6]:
        sola.edit(r)
        sizes.append(sola.store._db.execute("SELECT SUM(LENGTH(data)) FROM state").fetchone()[0])
    assert len(set(sizes)) == 1
    assert written[0] == {"method.center", "method.projection"} and written[1:] == [set()] * 5
    arts = sola.store.artifacts(1)
    assert {"key", "fact", "A.0", "B.0"} <= set(arts) and arts["A.0"].shape[0] == sola.method.hparams.rank


def test_reediting_supersedes_and_chains_unwind(sola, small_world, world_requests):
    first = world_requests[0]
    second = other_target(small_world, first)
    third = other_target(small_world, first, second.target)
    e1, e2 = sola.edit(first), sola.edit(second)
    assert e2.stats["supersedes"] == [e1.id]
    assert [e.status for e in sola.edits()] == ["superseded", "active"]
    assert sola.evaluate([second], protocol="greedy_exact_match")["reliability"] == 1.0
    e3 = sola.edit(third)
    assert [e.status for e in sola.edits()] == ["superseded", "superseded", "active"]
    sola.undo(e2.id)  # the middle of the chain: the newest keeps covering the first
    assert [e.status for e in sola.edits()] == ["superseded", "reverted", "active"]
    assert sola.store.get_edit(e3.id).stats["supersedes"] == [e1.id]
    assert sola.evaluate([third], protocol="greedy_exact_match")["reliability"] == 1.0
    sola.undo(e3.id)  # the first comes back
    assert [e.status for e in sola.edits()] == ["active", "reverted", "reverted"]
    assert sola.evaluate([first], protocol="greedy_exact_match")["reliability"] == 1.0
    assert sola.method.superseded_by == {}


def test_the_same_request_twice_supersedes_and_reopens_identically(world_model, small_world, world_requests,
                                                                   tmp_path):
    """One prompt never has two live keys: equal keys would be routed by slot order, which a reopen changes."""
    model, tok = world_model
    path = tmp_path / "e.db"
    ed = Editor(model, tok, method="sola", store=path, corpus=small_world.fact_prompts(),
                paraphrases=small_world.calibration_paraphrases())
    for r in world_requests[:3]:
        ed.edit(r)
    ed.undo(1)
    ed.undo(2)  # free slots are reused last-in-first-out
    again = [ed.edit(world_requests[4]), ed.edit(world_requests[4])]
    assert again[1].stats["supersedes"] == [again[0].id]
    assert ed.method.routes([world_requests[4].prompt]) == [again[1].id]
    want = logits_of(ed, world_requests[4])
    ed.close()
    with Editor(model, tok, store=path) as ed:
        assert ed.method.routes([world_requests[4].prompt]) == [again[1].id]
        assert torch.equal(logits_of(ed, world_requests[4]), want)


def edit_with_a_routed_rephrase(sola: Editor, requests: list[EditRequest]):
    """Edit the first request one of whose rephrases routes to it (which one depends on the world's build);
    the others are undone again. Returns the request, its edit and the rephrase."""
    for req in requests:
        edit = sola.edit(req)
        paraphrase = next((p for p in req.rephrases if routed(sola, p)), None)
        if paraphrase is not None:
            return req, edit, paraphrase
        sola.undo(edit.id)
    raise AssertionError("no rephrase of any request routes")


def test_another_fact_key_does_not_supersede(sola, small_world, world_requests):
    first, _, paraphrase = edit_with_a_routed_rephrase(sola, world_requests)
    other_fact = other_target(small_world, dataclasses.replace(first, prompt=paraphrase, key="somewhere/else"))
    assert sola.edit(other_fact).stats["action"] == "new", "another fact key: no supersede, even if it routes"
    assert len(sola.edits("active")) == 2, "both edits stay active"


def test_a_corpus_of_duplicates_is_refused(world_model, world_requests):
    model, tok = world_model
    ed = Editor(model, tok, method="sola", corpus=["The capital of Arvelia is"] * 5 + ["Norland was born in"] * 5)
    with pytest.raises(EditFailed, match="fewer than 10 pairs|duplicate"):
        ed.edit(world_requests[0])
    assert ed.edits() == [] and len(ed.method.bank) == 0 and ed.method.alpha is None


def test_a_paraphrase_with_the_same_fact_key_supersedes(sola, small_world, world_requests):
    assert all(r.key is not None for r in world_requests)  # world requests carry a fact id
    first, old, paraphrase = edit_with_a_routed_rephrase(sola, world_requests)
    newer = other_target(small_world, dataclasses.replace(first, prompt=paraphrase))
    e = sola.edit(newer)
    assert e.stats["supersedes"] == [old.id]
    # the old wording no longer reaches the old edit: it routes to the newer one (routing is symmetric)
    assert sola.method.routes([first.prompt, paraphrase]) == [e.id, e.id]
    sola.undo(e.id)
    assert sola.method.routes([first.prompt]) == [old.id]
    assert sola.evaluate([first], protocol="greedy_exact_match")["reliability"] == 1.0


def test_failed_edit_changes_nothing(sola, world_requests, monkeypatch):
    sola.edit(world_requests[0])
    probe = logits_of(sola, world_requests[0])
    calls = {"n": 0}
    train = Sola._train

    def flaky(self, prompt, target):
        calls["n"] += 1
        if calls["n"] == 2:
            raise EditFailed("diverged")
        return train(self, prompt, target)

    monkeypatch.setattr(Sola, "_train", flaky)
    with pytest.raises(EditFailed):
        sola.edit(world_requests[1:3])
    assert len(sola.method.bank) == 1 and [e.id for e in sola.edits()] == [1]
    assert torch.equal(logits_of(sola, world_requests[0]), probe)
    with sola.unedited():
        base = logits_of(sola, world_requests[1])
    assert torch.equal(logits_of(sola, world_requests[1]), base)
    monkeypatch.setattr(Sola, "_train", train)
    sola.edit(world_requests[1])  # the freed slot state is consistent: the next edit works
    assert sola.evaluate(world_requests[:2], protocol="greedy_exact_match")["reliability"] == 1.0


def test_calibration_fixed_alpha_and_presets(world_model, small_world, world_requests):
    model, tok = world_model
    ed = Editor(model, tok, method="sola", alpha=0.05, corpus=small_world.fact_prompts(),
                paraphrases=small_world.calibration_paraphrases())
    ed.edit(world_requests[0])
    assert ed.method.alpha == 0.05 and ed.method.reference_distance is not None
    ed.close()
    hp = SolaHparams(preset="paper")
    hp.validate()
    assert (hp.optimizer, hp.lr, hp.n_iter, hp.alpha, hp.standardize) == ("sgd", 0.05, 40, 0.01, False)
    assert (hp.key, hp.whitening) == ("last", "pca"), "the paper keys by the master input at the last token"
    hp = SolaHparams(preset="paper", lr=0.2)
    hp.validate()
    assert hp.lr == 0.2, "a preset fills only the fields left at their defaults"
    bads = ({"preset": "nope"}, {"layers": [99]}, {"layers": [1, 0]}, {"distance": "manhattan"},
            {"alpha_quantile": 2.0}, {"index": "annoy"}, {"rank": 0}, {"key": "mean"}, {"whitening": "lda"},
            {"shrinkage": 1.5}, {"gate": "entity"}, {"gate_quantile": 0.0})
    for bad in bads:
        with pytest.raises(ValueError):
            Editor(model, tok, method="sola", **bad)


def test_calibration_without_corpus_samples_the_model(world_model, world_requests):
    model, tok = world_model
    ed = Editor(model, tok, method="sola")
    ed.edit(world_requests[0])
    assert 0 < ed.method.alpha < 1
    assert ed.evaluate(world_requests[:1], protocol="greedy_exact_match")["reliability"] == 1.0
    ed.close()


def test_bank_slots_are_reused_and_grow(sola, world_requests):
    for r in world_requests[:3]:
        sola.edit(r)
    slot = sola.method.bank.slot_of[2]
    sola.undo(2)
    e = sola.edit(world_requests[3])
    assert sola.method.bank.slot_of[e.id] == slot
    assert sola.evaluate([world_requests[i] for i in (0, 2, 3)], protocol="greedy_exact_match")["reliability"] == 1.0
    assert EditStore(sola.store.path).count("active") == 3


def test_export_import_round_trip(sola, small_world, world_requests, tmp_path):
    from editbank import load_model

    reqs = world_requests[:4]
    for r in reqs:
        sola.edit(r)
    sola.undo(3)
    want = [logits_of(sola, r) for r in reqs]
    sola.store.export(tmp_path / "shared")
    EditStore.import_folder(tmp_path / "shared", tmp_path / "copy.db").close()
    model, tok = load_model(small_world.path)  # a fresh copy: the fixture's model carries its own hooks
    with Editor(model, tok, store=tmp_path / "copy.db") as other:
        assert len(other.method.bank) == 3
        for r, w in zip(reqs, want):
            assert torch.equal(logits_of(other, r), w)


def test_the_paraphrase_whitening_removes_wording_where_pca_keeps_it():
    """Synthetic keys: loud 'wording' directions that vary inside each fact's group, a quiet 'fact' part that
    separates the groups. PCA keeps the loud directions (nearest neighbours share wording); whitening by the
    groups' own spread (no shrinkage here) divides the wording away (nearest neighbours are the same fact)."""
    from editbank.methods.sola import _paraphrase_whitening, _whitening

    g = torch.Generator().manual_seed(0)
    n_facts, n_words, dim = 40, 8, 32
    fact = torch.randn(n_facts, dim, generator=g) * 0.5
    wording = torch.randn(n_words, dim, generator=g) * 5.0
    keys = (fact[:, None] + wording[None] + 0.05 * torch.randn(n_facts, n_words, dim, generator=g)).reshape(-1, dim)
    group = torch.arange(n_facts).repeat_interleave(n_words)

    def same_fact_neighbours(center, proj):
        z = torch.nn.functional.normalize((keys - center) @ proj, dim=1)
        d = 1 - z @ z.T
        d.fill_diagonal_(float("inf"))
        return float((group[d.argmin(1)] == group).float().mean())

    assert same_fact_neighbours(*_whitening(keys, 16)) < 0.2
    assert same_fact_neighbours(*_paraphrase_whitening(keys, group, 16, 0.0)) > 0.95


def test_a_world_editor_learns_the_key_space_from_paraphrases(small_world, world_requests):
    ed = Editor.open(small_world.path, method="sola")
    try:
        assert ed.method.paraphrases == small_world.calibration_paraphrases()
        ed.edit(world_requests[0])
        m = ed.method
        width = m.modules[0].weight.shape[1] + m.embeddings.weight.shape[1]  # last token + pooled embeddings
        assert m.bank.keys.shape[1] == width and m.bank.projection.shape[0] == width
        # every calibration group is one fact: alpha separates the texts of different groups
        assert 0 < m.alpha < 1
    finally:
        ed.close()


def test_a_pooled_key_does_not_depend_on_the_rows_padding(sola, world_requests):
    reqs = world_requests[:3]
    for r in reqs[:2]:
        sola.edit(r)
    seen = []
    nearest = sola.method._nearest

    def spy(q, rows):
        seen.append(q.clone())
        return nearest(q, rows)

    sola.method._nearest = spy
    prompts = [reqs[0].prompt, reqs[2].locality[0][0] + " and then", reqs[1].prompt]
    together = sola.generate(prompts, max_new_tokens=3)
    batch_keys = seen[0]
    alone = [sola.generate(p, max_new_tokens=3) for p in prompts]
    assert together == alone
    e = sola.method.embeddings.weight.shape[1]  # the pooled part is the key's tail
    for i in range(len(prompts)):
        assert torch.equal(batch_keys[i, -e:], seen[1 + i][0, -e:]), "the pooled part ignores the row's padding"
        torch.testing.assert_close(batch_keys[i], seen[1 + i][0], rtol=1e-5, atol=1e-5)


def test_a_store_made_before_pooled_keys_reopens_keyed_as_it_was(world_model, small_world, world_requests, tmp_path):
    model, tok = world_model
    path = tmp_path / "old.db"
    ed = Editor(model, tok, method="sola", store=path, corpus=small_world.fact_prompts(), key="last", whitening="pca")
    for r in world_requests[:3]:
        ed.edit(r)
    want = [logits_of(ed, r) for r in world_requests[:4]]
    ed.close()
    store = EditStore(path)
    hp = store.get_meta("hparams")
    for k in ("key", "whitening", "shrinkage", "gate", "gate_quantile"):
        del hp[k]
    store.set_meta("hparams", hp)
    store.close()
    with Editor(model, tok, store=path) as ed:
        assert (ed.method.hparams.key, ed.method.hparams.whitening, ed.method.hparams.gate) == ("last", "pca", "none")
        for r, w in zip(world_requests[:4], want):
            assert torch.equal(logits_of(ed, r), w)


def test_the_subject_gate_routes_only_prompts_that_name_the_edits_subject(world_model, small_world, world_requests):
    """With a threshold wide enough to route anything, the gate keeps every prompt that does not name an edited
    subject on the base model (bitwise), routes paraphrases that name it, and leaves edits without a subject ungated."""
    model, tok = world_model
    kw = dict(corpus=small_world.fact_prompts(), paraphrases=small_world.calibration_paraphrases(), alpha=1.9)
    reqs = world_requests[:6]
    subjects = {r.subject for r in reqs}
    probes = [p for r in world_requests[6:] for p in r.locality if not any(s in p[0] for s in subjects)][:12]
    assert probes
    with Editor(model, tok, method="sola", gate="none", **kw) as plain:
        base = [logits_of(plain, p) for p in probes]
        for r in reqs:
            plain.edit(r, check=False)
        assert all(routed(plain, p) for p, _ in probes), "without the gate this alpha routes every probe"
    model, tok = world_model
    with Editor(model, tok, method="sola", **kw) as ed:
        assert ed.method.hparams.gate == "subject"
        for r in reqs:
            ed.edit(r, check=False)
        assert not any(routed(ed, p) for p, _ in probes)
        for p, want in zip(probes, base):
            assert torch.equal(logits_of(ed, p), want)
        got = ed.method.routes([q for r in reqs for q in r.rephrases])
        owners = [e for e, r in zip(range(1, 7), reqs) for _ in r.rephrases]
        for e, g, q in zip(owners, got, [q for r in reqs for q in r.rephrases]):
            assert g is not None and reqs[g - 1].subject in q, "a paraphrase routes to an edit of its subject"
        assert sum(g == e for e, g in zip(owners, got)) > len(got) // 2
        bare = dataclasses.replace(world_requests[10], subject=None)
        ed.edit(bare, check=False)
        assert all(ed.method.routes([p])[0] == 7 for p, _ in probes), "an edit without a subject is not gated"


def test_gated_routing_in_a_batch_equals_rows_alone_and_survives_reopen(world_model, small_world, world_requests,
                                                                         tmp_path):
    model, tok = world_model
    path = tmp_path / "g.db"
    ed = Editor(model, tok, method="sola", store=path, corpus=small_world.fact_prompts(),
                paraphrases=small_world.calibration_paraphrases())
    reqs = world_requests[:4]
    for r in reqs:
        ed.edit(r, check=False)
    assert ed.method.gate_alpha >= ed.method.alpha
    prompts = [reqs[0].rephrases[0], reqs[2].locality[0][0], reqs[1].rephrases[1] + " and", reqs[3].prompt]
    together = ed.generate(prompts, max_new_tokens=3)
    assert together == [ed.generate(p, max_new_tokens=3) for p in prompts]
    want = [logits_of(ed, (q, r.target)) for r in reqs for q in r.rephrases]
    routes = ed.method.routes(prompts)
    ed.close()
    with Editor(model, tok, store=path) as again:
        assert again.method.subjects == {i + 1: r.subject for i, r in enumerate(reqs)}
        assert again.method.routes(prompts) == routes
        got = [logits_of(again, (q, r.target)) for r in reqs for q in r.rephrases]
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_the_gate_calibrates_on_one_subjects_facts_when_the_groups_name_their_subjects(world_model, small_world):
    """gate_alpha comes from pairs of calibration texts about different facts of one subject (what the gate lets
    through); without the groups' subjects, from any two different facts."""
    from editbank.methods.sola import _one_subject_pairs, quantile

    model, tok = world_model
    groups, subjects = small_world.calibration_paraphrases(), small_world.calibration_paraphrase_subjects()
    assert len(subjects) == len(groups) and len(set(subjects)) < len(subjects), "a subject has several facts"
    kw = dict(corpus=small_world.fact_prompts(), paraphrases=groups)
    with Editor(model, tok, method="sola", paraphrase_subjects=subjects, **kw) as named:
        named.method.calibrate()
        m = named.method
        keys = m._prompt_keys([p for g in groups for p in g])
        group = torch.tensor([i for i, g in enumerate(groups) for _ in g])
        z = m.bank.index_form(keys)
        d = 1 - z @ z.T
        pairs = torch.triu(group[:, None] != group[None, :], diagonal=1)
        same = _one_subject_pairs(subjects, group, pairs)
        assert m.gate_from == "one subject" and 10 <= int(same.sum()) < int(pairs.sum())
        assert m.gate_alpha == pytest.approx(max(m.alpha, quantile(d[same], 1e-3)), rel=1e-5)
    model, tok = world_model
    with Editor(model, tok, method="sola", **kw) as anonymous:
        anonymous.method.calibrate()
        assert anonymous.method.gate_from == "any" and anonymous.method.alpha == pytest.approx(m.alpha, rel=1e-6)
        assert anonymous.method.gate_alpha != pytest.approx(m.gate_alpha, rel=1e-3)
    with Editor.open(small_world, method="sola") as opened:
        assert opened.method.paraphrase_subjects == subjects
    for bad in (subjects[:-1], [1] * len(subjects)):
        with pytest.raises(TypeError, match="paraphrase_subjects"):
            Editor(model, tok, method="sola", paraphrase_subjects=bad, **kw)


def test_train_prefixes_trains_the_lora_on_the_prompt_after_corpus_prefixes(world_model, small_world, world_requests):
    """Each step sees the prompt alone and after each prefix (the first words of corpus texts); the trained LoRA then
    writes the target after those prefixes too."""
    from editbank.methods.locate.keys import context_prefixes
    from editbank.tokens import prompt_ids

    model, tok = world_model
    corpus = small_world.fact_prompts()
    req = world_requests[0]
    seen: list[list[list[int]]] = []
    with Editor(model, tok, method="sola", corpus=corpus, paraphrases=small_world.calibration_paraphrases(),
                train_prefixes=2) as ed:
        m = ed.method
        m.prepare()
        hook = ed.model.register_forward_pre_hook(
            lambda mod, args, kw: seen.append(kw["input_ids"].tolist()) if m.trainee is not None else None,
            with_kwargs=True)
        A, B, loss, steps = m._train(req.prompt, req.target)
        hook.remove()
        prefixes = context_prefixes(corpus, 2, 5)
        assert len(prefixes) == 3 and prefixes[0] == "" and seen and all(len(rows) == 3 for rows in seen)
        want = [prompt_ids(tok, p + req.prompt) for p in prefixes]
        assert all(row[: len(w)] == w for row, w in zip(seen[0], want)), "row i is prefix i + the prompt"
        b = make_batch(tok, [(p + req.prompt, req.target) for p in prefixes])
        with torch.no_grad(), m.training((A, B)):
            logits = ed.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        labels = b.labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="none")
        per_row = nll.view(3, -1).sum(1) / (labels != -100).sum(1)
        assert steps >= 1 and float(per_row.max()) < 0.5, per_row


def test_a_gated_reedit_beyond_alpha_within_gate_alpha_supersedes(sola, small_world, world_requests):
    """"Covers" follows routing: a rephrase that reaches the old edit only through the gate (distance between alpha
    and gate_alpha) re-edits the same fact, so it supersedes: one fact never has two live keys."""
    m = sola.method
    m.prepare()
    picked = None
    for r in world_requests:
        k = m.bank.index_form(m.key_of(r.prompt)[None])
        for q in r.rephrases:
            d = float(1 - (k * m.bank.index_form(m.key_of(q)[None])).sum())
            if picked is None and m.alpha <= d < m.gate_alpha:
                picked = (r, q)
    assert picked is not None, "the small world has a rephrase between alpha and gate_alpha"
    r, q = picked
    old = sola.edit(r, check=False)
    assert m.routes([q]) == [old.id], "it routes through the gate only"
    new = sola.edit(other_target(small_world, dataclasses.replace(r, prompt=q, rephrases=[])), check=False)
    assert new.stats["supersedes"] == [old.id] and m.superseded_by == {old.id: new.id}
    assert m.routes([r.prompt, q]) == [new.id, new.id]


def test_a_subject_the_prompts_tokens_do_not_spell_leaves_the_edit_ungated(sola, world_requests):
    """A tokenizer may spell the subject otherwise inside the prompt (mid-word here): the gate would keep the edit
    from its own prompt, so the edit is not gated, and says so."""
    from editbank.methods.subject_gate import names, subject_forms
    from editbank.tokens import prompt_ids

    tok = sola.tokenizer
    req, part = next((r, r.subject[i : i + 4]) for r in world_requests for i in range(1, len(r.subject) - 4)
                     if not names(prompt_ids(tok, r.prompt), subject_forms(tok, r.subject[i : i + 4])))
    e = sola.edit(dataclasses.replace(req, subject=part))  # check=True: it must take
    assert e.stats["gate"].startswith("off") and e.id not in sola.method.subjects
    assert sola.method.routes([req.prompt]) == [e.id]


def test_the_gate_finds_a_subject_after_a_mark_with_a_sentencepiece_tokenizer():
    """SentencePiece spells a subject right after "(" or a quote without its word-start marker, so neither the form
    alone nor the form after a space occurs there; the gate's forms include the one after a mark (with the mark, so
    the same pieces inside another word do not match). A byte-level BPE spells it the same everywhere: no form is
    added for it. `marks=False` (stores made before) keeps the two plain forms."""
    from tiny_models import tiny_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from editbank.methods.subject_gate import names, subject_forms
    from editbank.tokens import prompt_ids

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    lines = ["Arvelia is a country.", "The capital of Arvelia is Vorn.", "People of Arvelia speak Velish.",
             '( ) " X'] * 20
    raw.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False))
    sp = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    forms = subject_forms(sp, "Arvelia")
    for prompt in ['The capital of "Arvelia" is', "The capital of (Arvelia) is", "The capital of Arvelia is"]:
        assert names(prompt_ids(sp, prompt), forms), prompt
    assert not names(prompt_ids(sp, "The capital of Velish is"), forms)
    assert not names(prompt_ids(sp, "The capital of XArvelia is"), forms)
    assert not names(prompt_ids(sp, 'The capital of "Arvelia" is'), subject_forms(sp, "Arvelia", marks=False))
    bpe = tiny_tokenizer()
    plain = {tuple(bpe(t, add_special_tokens=False)["input_ids"]) for t in ("Arvelia", " Arvelia")}
    assert subject_forms(bpe, "Arvelia") == plain


def test_subject_sentence_cuts_what_comes_before_the_sentence_naming_the_subject():
    from editbank.methods.subject_gate import subject_sentence
    assert subject_sentence("Fog lay on the hills. The patron of Arvelia is", "Arvelia") == "The patron of Arvelia is"
    assert subject_sentence("Is it late? No!\nArvelia's mayor is", "Arvelia") == "Arvelia's mayor is"
    assert subject_sentence("Q: Name the capital of Arvelia. A:", "Arvelia") is None, "the subject's own sentence"
    assert subject_sentence("What is the capital of Arvelia? It is", "Arvelia") is None
    assert subject_sentence("Arvelia. Arvelia is", "Arvelia") == "Arvelia is", "the last mention"
    assert subject_sentence("The patron of Arvelia is", "Ostrand") is None


def test_a_sentence_before_the_subjects_does_not_move_a_gated_key(world_model, small_world, world_requests):
    """key_span="sentence": a prompt whose subject comes after an unrelated sentence is queried by the key of its
    subject's sentence, read alone, so the edited prompt behind any opening sentence routes to its edit at distance
    zero and answers as edited, in a batch as alone; with key_span="prompt" the opening sentence moves the key."""
    model, tok = world_model
    kw = dict(corpus=small_world.fact_prompts(), paraphrases=small_world.calibration_paraphrases())
    reqs = world_requests[:4]
    opening = ["A cold wind came down from the hills.", "Nobody remembered the name of the ship.",
               "The market closed early that day.", "It rained.\n"]
    prefixed = [f"{o} {r.prompt}" for o, r in zip(opening, reqs)]
    with Editor(model, tok, method="sola", **kw) as whole:
        assert whole.method.hparams.key_span == "prompt", "the default"
        for r in reqs:
            whole.edit(r, check=False)
        moved = [float(whole.method.bank.distances(whole.method.key_of(p)[None])[0].min()) for p in prefixed]
        assert min(moved) > 1e-3, "the opening sentence moves a whole-prompt key"
    pairs = [(f"{o} {r.prompt}", r) for o, r in zip(opening, world_requests[6:10])
             if not any(q.subject in r.prompt for q in reqs)]
    others = [p for p, _ in pairs]
    asked = list(zip(prefixed, [r.target for r in reqs])) + [(p, r.target) for p, r in pairs]
    with Editor(model, tok, method="sola", key_span="sentence", **kw) as ed:
        base = [logits_of(ed, a) for a in asked]
        for r in reqs:
            assert "key_from" not in ed.edit(r, check=False).stats, "nothing before the subject's sentence"
        assert ed.method.routes(prefixed) == [1, 2, 3, 4]
        assert others and ed.method.routes(others) == [None] * len(others), "other subjects stay on the base model"
        together = ed.generate(prefixed + others, max_new_tokens=3)
        assert together == [ed.generate(p, max_new_tokens=3) for p in prefixed + others]
        now = [logits_of(ed, a) for a in asked]
        assert not any(torch.equal(a, b) for a, b in zip(now[:4], base[:4])), "each edit's LoRA acts there"
        assert all(torch.equal(a, b) for a, b in zip(now[4:], base[4:]))
        # an edit whose own prompt opens with a sentence is keyed on its subject's sentence
        third = world_requests[12]
        e = ed.edit(dataclasses.replace(third, prompt="The market closed early that day. " + third.prompt),
                    check=False)
        assert e.stats["key_from"] == third.prompt
        assert ed.method.routes([third.prompt, "Nobody came. " + third.prompt]) == [e.id, e.id]


def test_sentence_keys_supersede_as_they_route_and_survive_reopen(world_model, small_world, world_requests, tmp_path):
    """With key_span="sentence" a re-edit of one fact supersedes the older edit whether that one was gated (keyed on
    its subject's sentence) or not (keyed on the whole prompt): the covers check asks each slot what routing asks
    it. The cut keys and the option persist; the option needs the gate."""
    model, tok = world_model
    kw = dict(corpus=small_world.fact_prompts(), paraphrases=small_world.calibration_paraphrases())
    with pytest.raises(ValueError, match="gate"):
        SolaHparams(key_span="sentence", gate="none").validate()
    req = world_requests[3]
    prompt = "The market closed early that day. Fog lay on the hills for a week. " + req.prompt  # beyond alpha
    path = tmp_path / "s.db"
    ed = Editor(model, tok, method="sola", key_span="sentence", store=path, **kw)
    bare = ed.edit(dataclasses.replace(req, prompt=prompt, subject=None), check=False)
    assert "key_from" not in bare.stats and ed.method.routes([prompt]) == [bare.id]
    m = ed.method
    assert float(m.bank.distances(m.key_of(req.prompt)[None])[0].min()) > m.alpha, "the cut key is beyond alpha"
    gated = ed.edit(dataclasses.replace(other_target(small_world, req), prompt=prompt), check=False)
    assert gated.stats["key_from"] == req.prompt and gated.stats.get("supersedes") == [bare.id]
    assert ed.method.routes([prompt, "Nobody came. " + req.prompt]) == [gated.id, gated.id]
    want = logits_of(ed, ("Nobody came. " + req.prompt, req.target))
    ed.close()
    with Editor(model, tok, store=path) as again:
        assert again.method.hparams.key_span == "sentence"
        assert again.method.routes([prompt, "Nobody came. " + req.prompt]) == [gated.id, gated.id]
        assert torch.equal(logits_of(again, ("Nobody came. " + req.prompt, req.target)), want)
