"""GRACE's router: `routes` names the entry its hook applies, for every prompt."""

from __future__ import annotations

import pytest
import torch

from editbank import Editor
from editbank.models.hooks import trace


def test_routes_names_the_entry_the_hook_applies(small_world, world_requests, tmp_path):
    ed = Editor.open(small_world.path, method="grace", store=tmp_path / "g.db")
    edits = ed.edit(world_requests[:4], check=False)
    m = ed.method
    prompts = [r.prompt for r in world_requests[:4]] + [p for r in world_requests[:4] for p in r.rephrases]
    prompts += [p for r in world_requests[4:8] for p, _ in r.locality]
    owners = m.routes(prompts)
    assert owners[:4] == [e.id for e in edits]
    for p, owner in zip(prompts, owners):
        ids = ed.tokenizer(p, return_tensors="pt")["input_ids"]
        with torch.no_grad(), trace(ed.model, m.path, inputs=False) as tr:
            ed.model(input_ids=ids)
        edited = tr[m.path].output[0, -1]
        with torch.no_grad(), m.disabled(), trace(ed.model, m.path, inputs=False) as tr:
            ed.model(input_ids=ids)
        base = tr[m.path].output[0, -1]
        if owner is None:
            assert torch.equal(edited, base), p
        else:
            assert torch.equal(edited, m.values[m._row(owner), 0].to(edited.dtype)), p
    assert None in owners[4:], "some prompts route to no entry"
    ed.close()


def _logits(ed, prompt, target):
    from editbank.tokens import make_batch

    b = make_batch(ed.tokenizer, [(prompt, target)])
    return ed.logits(b.input_ids, b.attention_mask, b.query_index)[0]


def test_the_subject_gate_keeps_other_subjects_on_the_base_model_and_widens_its_own(small_world, world_requests,
                                                                                    tmp_path):
    import dataclasses

    reqs = world_requests[:6]
    subjects = {r.subject for r in reqs}
    probes = [p for r in world_requests[6:] for p in r.locality if not any(s in p[0] for s in subjects)][:12]
    reph = [(q, r.target) for r in reqs for q in r.rephrases]
    wide = dict(eps_init=1e4)  # one entry this wide covers every prompt
    with Editor.open(small_world.path, method="grace", **wide) as plain:
        base = [_logits(plain, *p) for p in probes]
        plain.edit(reqs[0], check=False)
        assert all(o is not None for o in plain.method.routes([p for p, _ in probes]))
    path = tmp_path / "g.db"
    with Editor.open(small_world.path, method="grace", store=path, gate="subject", gate_radius=1.0, **wide) as ed:
        first = ed.edit(reqs[0], check=False)
        assert ed.method.routes([p for p, _ in probes]) == [None] * len(probes)
        assert ed.method.routes(reqs[0].rephrases) == [first.id] * len(reqs[0].rephrases)
        edits = [first, *ed.edit(reqs[1:], check=False)]
        assert ed.method.routes([p for p, _ in probes]) == [None] * len(probes)
        for p, want in zip(probes, base):
            assert torch.equal(_logits(ed, *p), want), "a prompt naming no edited subject is the base model's"
        owners = ed.method.routes([q for q, _ in reph])
        assert all(o is None or reqs[[e.id for e in edits].index(o)].subject in q for o, (q, _) in zip(owners, reph))
        prompts = [reph[0][0], probes[0][0], reph[4][0] + " and"]
        assert ed.generate(prompts, max_new_tokens=3) == [ed.generate(p, max_new_tokens=3) for p in prompts]
        bare = dataclasses.replace(world_requests[10], subject=None)
        e = ed.edit(bare, check=False)
        assert ed.method.subjects[-1] is None and ed.method.routes([bare.prompt]) == [e.id]
        want = [_logits(ed, q, t) for q, t in reph]
        routes = ed.method.routes([q for q, _ in reph] + [p for p, _ in probes])
    with Editor.open(small_world.path, store=path) as again:
        assert again.method.hparams.gate == "subject" and again.method.subjects[:6] == [r.subject for r in reqs]
        assert again.method.routes([q for q, _ in reph] + [p for p, _ in probes]) == routes
        assert all(torch.equal(_logits(again, q, t), w) for (q, t), w in zip(reph, want))


def test_gated_undo_equals_a_fresh_codebook_of_the_kept_edits(small_world, world_requests):
    reqs = world_requests[:8]
    kw = dict(method="grace", gate="subject")
    with Editor.open(small_world.path, **kw) as ed, Editor.open(small_world.path, **kw) as fresh:
        edits = [ed.edit(r, check=False) for r in reqs]
        undone = {1, 4, 6}
        for i in sorted(undone, reverse=True):
            ed.undo(edits[i].id)
        for i, r in enumerate(reqs):
            if i not in undone:
                fresh.edit(r, check=False)
        prompts = [(q, r.target) for r in reqs for q in (r.prompt, *r.rephrases)]
        prompts += [p for r in reqs for p in r.locality]
        for p in prompts:
            assert torch.equal(_logits(ed, *p), _logits(fresh, *p)), p


def test_a_subject_the_prompts_tokens_do_not_spell_leaves_the_entry_ungated_at_the_plain_radius(small_world,
                                                                                                 world_requests):
    import dataclasses

    from editbank.methods.subject_gate import names, subject_forms
    from editbank.tokens import prompt_ids

    with Editor.open(small_world.path, method="grace", gate="subject") as ed:
        tok = ed.tokenizer
        req, part = next((r, r.subject[i : i + 4]) for r in world_requests for i in range(1, len(r.subject) - 4)
                         if not names(prompt_ids(tok, r.prompt), subject_forms(tok, r.subject[i : i + 4])))
        e = ed.edit(dataclasses.replace(req, subject=part))
        assert e.stats["gate"].startswith("off") and ed.method.subjects == [None]
        assert float(ed.method.eps[0]) == ed.method.hparams.eps_init, "an ungated entry gets the plain radius"
        assert ed.method.routes([req.prompt]) == [e.id]


def test_a_stored_expand_check_is_reused_only_for_the_same_entry_and_radius(small_world, world_requests,
                                                                             monkeypatch):
    """Whether an entry's values, its radius widened to a key, spell a target depends on that radius too (the check's
    full forward reads the key a rounding away from the prompt-only one): a replay reuses a stored answer only for
    the same entry at the same radius, bitwise, and runs the check otherwise."""
    from editbank.methods.grace import _Work

    ed = Editor.open(small_world.path, method="grace")
    first = ed.edit(world_requests[0], check=False)
    g, req = ed.method, world_requests[1]
    key, _, batch = g._key_and_output(req.prompt, req.target)
    dist = float(g.nearest(key[None])[0][0])
    radius = float(g.eps.new_tensor(max(float(g.eps[0]), dist)))
    calls = []
    monkeypatch.setattr(g, "_realises", lambda *a: calls.append(a) or False)
    for memo, ran in (({(first.id, radius): True}, False), ({(first.id, radius * 2): True}, True),
                      ({(first.id + 1, radius): True}, True)):
        calls.clear()
        stats = {}
        got = g._spells(0, dist, req, batch, _Work(key, None, memo), stats)
        assert got is (not ran) and bool(calls) is ran
        assert stats == {"spelled_by": first.id, "spelled_at": radius, "spelled": got}
    ed.close()


def _record(ed):
    """Each kept edit's status, action, what it supersedes (as positions among the kept edits: two streams number
    their edits differently) and verdict."""
    kept = [e for e in ed.edits() if e.status != "reverted"]
    ids = [e.id for e in kept]
    return [(e.status, e.stats["action"], [ids.index(o) for o in e.stats.get("supersedes", [])], e.stats["written"])
            for e in kept]


def _conflicting_stream(world_requests):
    """Requests whose keys overlap at eps_init 5 (splits, expands, a supersede): later edits read earlier entries."""
    import dataclasses

    reqs = list(world_requests[:14])
    reqs.insert(5, dataclasses.replace(reqs[1], target=reqs[2].target))  # the same prompt again: a supersede
    reqs.insert(9, dataclasses.replace(reqs[3], prompt=reqs[3].rephrases[0]))  # the same target nearby: an expand
    reqs.insert(12, dataclasses.replace(reqs[0], prompt=reqs[0].rephrases[-1]))
    return reqs


def test_an_undo_that_later_edits_read_is_done_in_place_and_equals_a_fresh_stream(small_world, world_requests,
                                                                                   monkeypatch, tmp_path):
    """Undoing an edit whose entry later edits decided by recomputes only those edits (no replay), and the codebook
    and every logit equal those of a fresh editor fed the kept requests, bitwise."""
    reqs = _conflicting_stream(world_requests)
    kw = dict(method="grace", eps_init=5.0)
    probes = [(q, r.target) for r in reqs for q in (r.prompt, *r.rephrases)] + [p for r in reqs for p in r.locality]
    with Editor.open(small_world.path, store=tmp_path / "g.db", **kw) as ed:
        outcomes = []  # what each undo that GRACE's own rule could not do exactly returned (None: a replay)
        walk = ed.method.undo_in_place
        monkeypatch.setattr(ed.method, "undo_in_place", lambda *a: outcomes.append(walk(*a)) or outcomes[-1])
        edits = [ed.edit(r, check=False) for r in reqs]
        actions = {e.stats["action"] for e in edits}
        assert {"new", "split", "supersede"} <= actions, actions
        kept = list(range(len(reqs)))
        for i in (0, 1, 4, 8, 2):
            ed.undo(edits[i].id)
            kept.remove(i)
            with Editor.open(small_world.path, **kw) as fresh:
                for k in kept:
                    fresh.edit(reqs[k], check=False)
                assert ed.method.labels == fresh.method.labels
                assert ed.method.eps.tolist() == fresh.method.eps.tolist(), i
                assert ed.method.owner.tolist() == [edits[k].id for k in kept if edits[k].id in
                                                    ed.method.owner.tolist()]
                assert len(ed.method.owner) == len(fresh.method.owner)
                for p in probes:
                    assert torch.equal(_logits(ed, *p), _logits(fresh, *p)), (i, p)
                # every kept edit's stored stats are those of the stream without the undone ones (the recomputed
                # edits' too), written verdict included
                decision = ("action", "nearest_distance", "loss", "steps", "spelled", "spelled_at", "written")
                got = [{k: v for k, v in ed.store.get_edit(edits[k].id).stats.items() if k in decision} for k in kept]
                assert got == [{k: v for k, v in e.stats.items() if k in decision} for e in fresh.edits()], i
        assert len(outcomes) >= 3 and None not in outcomes, outcomes
        # the stored state reopens to the same codebook
        want = [_logits(ed, *p) for p in probes]
    with Editor.open(small_world.path, store=tmp_path / "g.db") as again:
        assert all(torch.equal(_logits(again, *p), w) for p, w in zip(probes, want))



def test_undoing_a_supersede_gives_the_revived_entry_back_to_the_later_edits_it_would_have_decided(small_world,
                                                                                                   world_requests,
                                                                                                   tmp_path):
    """Edit A (ungated), U supersedes it (gated by its subject), then n, whose prompt lacks U's subject and so saw no
    candidate, adds an entry. Undoing U brings A back as a candidate: a stream of A and n has n split against A, so
    the undo must recompute n, in a store reopened before the undo too."""
    import dataclasses

    r0 = world_requests[0]
    r1 = next(r for r in world_requests[1:] if r0.subject not in r.prompt)
    a = dataclasses.replace(r0, subject=None)
    u = dataclasses.replace(r0, target=r1.target)
    kw = dict(method="grace", gate="subject", eps_init=1e6)
    with Editor.open(small_world.path, store=tmp_path / "g.db", **kw) as ed:
        ea, eu, en = (ed.edit(x, check=False) for x in (a, u, r1))
        assert (eu.stats["action"], en.stats["action"]) == ("supersede", "new")
    with Editor.open(small_world.path, store=tmp_path / "g.db") as ed, Editor.open(small_world.path, **kw) as fresh:
        ed.undo(eu.id)
        fa, fn = (fresh.edit(x, check=False) for x in (a, r1))
        assert fn.stats["action"] == "split"
        assert ed.method.eps.tolist() == fresh.method.eps.tolist()
        probes = [(q, x.target) for x in (r0, r1) for q in (x.prompt, *x.rephrases)] + list(r1.locality)
        for p in probes:
            assert torch.equal(_logits(ed, *p), _logits(fresh, *p)), p


@pytest.mark.slow
@pytest.mark.parametrize("case", range(12))
def test_random_streams_undone_in_place_equal_fresh_streams(small_world, case):
    """Random streams with overlapping keys (eps_init 3 / 5 / 8, gate on or off, shared or per-token values, calls of
    1 or 3, supersedes and same-target rephrases), four random undos each: the codebook and every logit equal a fresh
    editor's fed the kept requests, bitwise."""
    import dataclasses
    import random

    rng = random.Random(case)
    pool = small_world.edit_requests(n=40, seed=0)
    reqs = rng.sample(pool, 14)
    for _ in range(3):
        r = rng.choice(reqs)
        other = dataclasses.replace(r, target=rng.choice(pool).target) if rng.random() < 0.5 else \
            dataclasses.replace(r, prompt=rng.choice(r.rephrases))
        reqs.insert(rng.randrange(len(reqs) + 1), other)
    kw = dict(method="grace", eps_init=rng.choice([3.0, 5.0, 8.0]), gate=rng.choice(["none", "subject"]),
              value_mode=rng.choice(["per_token", "shared"]))
    size = rng.choice([1, 3])

    def feed(ed, rs):
        out = []
        for i in range(0, len(rs), size):
            out += ed.edit(rs[i : i + size], check=False) if size > 1 else [ed.edit(rs[i], check=False)]
        return out

    with Editor.open(small_world.path, **kw) as ed, Editor.open(small_world.path, **kw) as fresh:
        edits = feed(ed, reqs)
        kept = list(range(len(reqs)))
        for i in rng.sample(range(len(reqs)), 4):
            ed.undo(edits[i].id)
            kept.remove(i)
        feed(fresh, [reqs[k] for k in kept])
        assert ed.method.eps.tolist() == fresh.method.eps.tolist() and ed.method.labels == fresh.method.labels
        got, want = _record(ed), _record(fresh)  # statuses, actions, supersedes and verdicts too, but for the
        # verdict of an edit a request of its own call superseded, revived by an undo: never checked (None)
        assert [g[:3] for g in got] == [w[:3] for w in want]
        assert all(g[3] is None or g[3] == w[3] for g, w in zip(got, want)), (got, want)
        probes = [(q, r.target) for r in reqs for q in (r.prompt, *r.rephrases)] + [p for r in reqs for p in r.locality]
        for p in probes:
            assert torch.equal(_logits(ed, *p), _logits(fresh, *p)), p


def test_undo_logs_go_with_the_edits_and_a_store_with_logs_in_its_state_still_undoes(small_world, world_requests,
                                                                                     tmp_path):
    """The state written after each edit holds no undo log (it would grow with the store): each edit's log is one of
    its artifacts, the in-place undo rewrites the logs it recomputes, and a reopened store has the same logs and
    undoes as a fresh stream would. A store whose state held the logs (written before) reopens and undoes too."""
    reqs = _conflicting_stream(world_requests)
    kw = dict(method="grace", eps_init=5.0)
    with Editor.open(small_world.path, store=tmp_path / "g.db", **kw) as ed:
        edits = [ed.edit(r, check=False) for r in reqs]
        ed.undo(edits[1].id)
        ed.undo(edits[4].id)
        logs = {e: dict(x) for e, x in ed.method.undo_log.items()}
        assert "undo_log" not in ed.store.get_state()[1]
    with Editor.open(small_world.path, store=tmp_path / "g.db") as ed:
        assert ed.method.undo_log == logs
        # as a store written before the logs were artifacts: the logs in the state, none with the edits
        tensors, meta = ed.store.get_state()
        with ed.store.transaction():
            ed.store.put_state(tensors, {**meta, "undo_log": {str(k): v for k, v in logs.items()}})
            ed.store._db.execute("DELETE FROM artifacts WHERE name='log'")
    kept = [k for k in range(len(reqs)) if k not in (1, 4, 8)]
    with Editor.open(small_world.path, store=tmp_path / "g.db") as ed, Editor.open(small_world.path, **kw) as fresh:
        assert ed.method.undo_log == logs
        ed.undo(edits[8].id)
        assert "undo_log" in ed.store.get_state()[1]  # the logs not rewritten stay where they were
        for k in kept:
            fresh.edit(reqs[k], check=False)
        assert ed.method.eps.tolist() == fresh.method.eps.tolist() and ed.method.labels == fresh.method.labels
        probes = [(q, r.target) for r in reqs for q in (r.prompt, *r.rephrases)]
        for p in probes:
            assert torch.equal(_logits(ed, *p), _logits(fresh, *p)), p
    with Editor.open(small_world.path, store=tmp_path / "g.db") as again:
        assert again.method.undo_log == {e: x for e, x in ed.method.undo_log.items()}


def test_the_keys_of_edits_that_created_no_entry_stay_in_memory_through_undos_and_a_reopen(small_world,
                                                                                          world_requests, tmp_path):
    """An undo in place reads the keys of the later edits that only widened an entry from memory (not from the
    store, per edit): after in-place undos they are a fresh stream's of the kept edits, and a reopened store has
    them."""
    reqs = _conflicting_stream(world_requests)
    kw = dict(method="grace", eps_init=5.0)
    with Editor.open(small_world.path, store=tmp_path / "g.db", **kw) as ed, \
            Editor.open(small_world.path, **kw) as fresh:
        edits = [ed.edit(r, check=False) for r in reqs]
        ed.undo(edits[1].id)
        ed.undo(edits[4].id)
        by_id = {}
        for k in [k for k in range(len(reqs)) if k not in (1, 4)]:
            by_id[edits[k].id] = fresh.edit(reqs[k], check=False).id
        keys = ed.method.expand_keys
        assert keys, "the stream has no edit that only widened an entry"
        assert {e for e, x in ed.method.undo_log.items() if not x["created"]} == set(keys)
        assert {by_id[e] for e in keys} == set(fresh.method.expand_keys)
        for e, key in keys.items():
            assert torch.equal(key, fresh.method.expand_keys[by_id[e]])
        for key in fresh.method.expand_keys.values():  # a key alone, not a view that keeps a layer's input alive
            assert key.untyped_storage().nbytes() == key.numel() * key.element_size()
    with Editor.open(small_world.path, store=tmp_path / "g.db") as again:
        assert set(again.method.expand_keys) == set(keys)
        for e, key in keys.items():
            assert torch.equal(again.method.expand_keys[e], key)


def test_the_state_holds_no_labels_and_a_store_whose_state_holds_them_still_opens(small_world, world_requests,
                                                                                   tmp_path):
    """An entry's label is its edit's target, which the store holds: the state written after each edit does not
    repeat every label (it would grow with the store); a reopened store has the same labels, and one written
    before (labels in the state) opens to them too."""
    reqs = _conflicting_stream(world_requests)
    with Editor.open(small_world.path, store=tmp_path / "g.db", method="grace", eps_init=5.0) as ed:
        edits = [ed.edit(r, check=False) for r in reqs]
        ed.undo(edits[2].id)
        labels = list(ed.method.labels)
        assert "labels" not in ed.store.get_state()[1]
        assert labels == [ed.store.get_edit(int(o)).request.target for o in ed.method.owner.tolist()]
    with Editor.open(small_world.path, store=tmp_path / "g.db") as ed:
        assert ed.method.labels == labels
        tensors, meta = ed.store.get_state()
        with ed.store.transaction():  # as an older store: the labels in the state (here, ones no edit has)
            ed.store.put_state(tensors, {**meta, "labels": [f"old {x}" for x in labels]})
    with Editor.open(small_world.path, store=tmp_path / "g.db") as ed:
        assert ed.method.labels == [f"old {x}" for x in labels]


@pytest.mark.parametrize("targets, undo", [("AUA", 1), ("AUU", 1), ("AUUA", 1)])
def test_an_undo_that_changes_what_later_edits_supersede_leaves_the_statuses_of_a_fresh_stream(
        small_world, world_requests, targets, undo):
    """Edits of one prompt with targets A or U in the order given; undoing one of them recomputes the later ones
    (with "AUA" the last widens A's entry instead of superseding U's, with "AUU" the last supersedes A, with "AUUA" the
    last supersedes A again). Statuses, actions, what each edit supersedes and the verdicts equal a fresh stream of
    the kept edits, and so does the codebook."""
    import dataclasses

    a = world_requests[0]
    pick = {"A": a, "U": dataclasses.replace(a, target=world_requests[2].target)}
    reqs = [pick[t] for t in targets]
    kw = dict(method="grace", eps_init=5.0)

    with Editor.open(small_world.path, **kw) as ed, Editor.open(small_world.path, **kw) as fresh:
        edits = [ed.edit(r, check=False) for r in reqs]
        ed.undo(edits[undo].id)
        for r in reqs[:undo] + reqs[undo + 1 :]:
            fresh.edit(r, check=False)
        assert _record(ed) == _record(fresh)
        assert ed.method.eps.tolist() == fresh.method.eps.tolist()


def test_an_edit_recomputed_twice_keeps_the_stats_and_artifacts_of_its_latest_decision(small_world):
    """A, U (A's prompt, another target), M (a rephrase of A with A's target: a new entry or a split). Undoing U makes
    M widen A's entry instead (its stored entry goes); undoing A then makes M add its own entry again: its stats and
    values are a fresh stream's of M alone."""
    import dataclasses

    reqs = small_world.edit_requests(n=20, seed=0)
    kw = dict(method="grace", eps_init=5.0)
    for a, phrase in ((r, p) for r in reqs[:6] for p in r.rephrases[:3]):
        u, m = dataclasses.replace(a, target=reqs[10].target), dataclasses.replace(a, prompt=phrase)
        with Editor.open(small_world.path, **kw) as ed:
            ea, eu, em = (ed.edit(r, check=False) for r in (a, u, m))
            if em.stats["action"] not in ("new", "split"):
                continue
            ed.undo(eu.id)
            if ed.store.get_edit(em.id).stats["action"] != "expand":
                continue
            assert sorted(ed.store.artifacts(em.id)) == ["key", "log"]  # its entry's values are gone from the store
            ed.undo(ea.id)
            got = ed.store.get_edit(em.id).stats
            with Editor.open(small_world.path, **kw) as fresh:
                want = fresh.edit(m, check=False).stats
                assert torch.equal(ed.method.values, fresh.method.values)
            keys = ("action", "loss", "steps", "written")
            assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
            return
    pytest.fail("no rephrase split from its edit's entry and then widened it")
