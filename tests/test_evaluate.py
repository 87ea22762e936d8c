"""Evaluation protocols, lifelong stream and rollback on the small world model."""

from __future__ import annotations

import pytest

from editbank import Editor, EditRequest
from editbank.evaluate import ngram_entropy, rollback_eval, run_stream
from editbank.evaluate.metrics import score_pairs, target_nll
from editbank.tokens import target_ids


@pytest.fixture
def grace(world_model):
    ed = Editor(*world_model, method="grace")
    yield ed
    ed.close()


def generated_match(ed: Editor, pairs) -> list[float]:
    """Greedy exact match computed the slow way: real generation with model.generate."""
    tok = ed.tokenizer
    out = []
    for prompt, answer in pairs:
        want = target_ids(tok, answer)
        got = ed.generate_ids(prompt, max_new_tokens=len(want))[0]
        out.append(float(got == want))
    return out


def test_greedy_exact_match_equals_real_generation(grace, small_world, world_requests):
    pairs = small_world.queries("train")[:20] + small_world.queries("reserved")[:10]
    pairs += [(r.prompt, r.target) for r in world_requests[:5]]
    assert score_pairs(grace, pairs, "greedy_exact_match") == generated_match(grace, pairs)
    for r in world_requests[:5]:
        grace.edit(r)
    # after editing, generation keeps the routing decision taken on the prompt
    edited = [(r.prompt, r.target) for r in world_requests[:5]] + [(p, r.target) for r in world_requests[:5]
                                                                   for p in r.rephrases]
    assert score_pairs(grace, edited, "greedy_exact_match") == generated_match(grace, edited)
    assert score_pairs(grace, edited[:5], "greedy_exact_match") == [1.0] * 5


@pytest.mark.parametrize("protocol", ["teacher_forced_token_acc", "greedy_exact_match"])
def test_unedited_scores(grace, world_requests, protocol):
    rep = grace.evaluate(world_requests, protocol=protocol)
    assert rep["protocol"] == protocol and rep["protocols"]["locality"] == protocol
    assert rep["locality"] == 1.0, "the unedited model is local by definition"
    # counterfactual targets are not known before editing (teacher forcing still gets later tokens of
    # multi-token names right from the first one)
    assert rep["reliability"] < (0.2 if protocol == "greedy_exact_match" else 0.6)
    assert rep["n"] == len(world_requests) and len(rep["records"]) == len(world_requests)


def test_unknown_protocol(grace, world_requests):
    with pytest.raises(ValueError, match="protocol"):
        grace.evaluate(world_requests, protocol="bleu")


def test_stream_and_rollback(grace, world_requests):
    res = run_stream(grace, world_requests[:12], protocol="greedy_exact_match", eval_every=4)
    assert [row["step"] for row in res["retention"]] == [4, 8, 12]
    assert all(len(row["reliability"]) == row["step"] for row in res["retention"])
    final = res["final"]
    assert final["reliability"] == 1.0 and final["locality"] >= 0.95
    rb = rollback_eval(grace, grace.edits("active"), fraction=0.25, seed=1)
    assert len(rb["undone"]) == 3
    assert rb["restored"] == 1.0 and rb["max_abs_logit_diff"] == 0.0
    assert rb["kept"]["reliability"] == 1.0 and rb["kept"]["n"] == 9


def test_stream_in_batches(grace, world_requests):
    res = run_stream(grace, world_requests[:7], protocol="greedy_exact_match", eval_every=4, batch_size=3)
    edits = grace.edits()
    assert [e.batch for e in edits] == [edits[0].id] * 3 + [edits[3].id] * 3 + [edits[6].id]
    assert [row["step"] for row in res["retention"]] == [6]  # after the call that crosses step 4
    assert res["final"]["n"] == 7
    with pytest.raises(ValueError, match="batch_size"):
        run_stream(grace, world_requests[:2], batch_size=0)
    assert len(grace.edits()) == 7, "a bad batch size is refused before any edit"


def test_fluency_and_ngram_entropy(grace, world_requests):
    assert ngram_entropy("a a a a a a a a") == 0.0
    assert ngram_entropy("a b c d") == pytest.approx((2 / 3 * 1.5849625 + 4 / 3 * 1.0) / 2)
    rep = grace.evaluate(world_requests[:3], fluency=True, fluency_tokens=12)
    texts = grace.generate([r.prompt for r in world_requests[:3]], max_new_tokens=12)
    assert rep["protocols"]["fluency"] == "ngram_entropy_2_3"
    assert rep["fluency"] == pytest.approx(sum(ngram_entropy(t) for t in texts) / 3)


def test_scores_match_real_generation_when_edits_are_not_local(world_model, world_requests):
    """Per-record locality and generalization agree with real generation, also when they are below 1."""
    ed = Editor(*world_model, method="grace", eps_init=1e6)  # every prompt routes to the first entry
    reqs = world_requests[:4]
    ed.edit(reqs[0])
    rep = ed.evaluate(reqs, protocol="greedy_exact_match")
    tok = ed.tokenizer
    for req, rec in zip(reqs, rep["records"]):
        gen = generated_match(ed, [(p, req.target) for p in req.rephrases])
        assert rec["generalization"] == pytest.approx(sum(gen) / len(gen))
        same = []
        for prompt, answer in req.locality:
            n = len(target_ids(tok, answer))
            edited = ed.generate_ids(prompt, max_new_tokens=n)[0]
            with ed.unedited():
                base = ed.generate_ids(prompt, max_new_tokens=n)[0]
            same.append(float(edited == base))
        assert rec["locality"] == pytest.approx(sum(same) / len(same))
    assert rep["locality"] < 0.5, "a radius covering everything must hurt locality"


def test_perplexity_drops_after_editing(grace, world_requests):
    reqs = world_requests[:3]
    before = grace.evaluate(reqs, perplexity=True)
    for r in reqs:
        grace.edit(r)
    after = grace.evaluate(reqs, perplexity=True)
    assert after["protocols"]["perplexity"] == "target_token_perplexity"
    assert after["perplexity"] < 1.5 < before["perplexity"]


def test_prob_preference_flips_with_the_edit(grace, world_requests):
    reqs = world_requests[:6]
    before = grace.evaluate(reqs, protocol="prob_preference")
    assert before["protocol"] == "prob_preference"
    assert set(before["protocols"].values()) == {"prob_preference"}
    assert before["reliability"] <= 0.2, "the unedited model prefers the true object"
    assert before["generalization"] <= 0.2 and before["locality"] >= 0.9
    assert before["portability"] is None
    for r in reqs:
        grace.edit(r)
    after = grace.evaluate(reqs, protocol="prob_preference")
    assert after["reliability"] == 1.0 and after["locality"] >= 0.9
    # per-record numbers are the comparison of mean target-token log-probabilities
    nll = target_nll(grace, [(r.prompt, r.target) for r in reqs] + [(r.prompt, " " + r.meta["true_object"])
                                                                    for r in reqs])
    assert [rec["reliability"] for rec in after["records"]] == [float(a < b) for a, b in zip(nll[:6], nll[6:])]


def test_prob_preference_needs_the_true_object(grace, world_requests):
    req = world_requests[1]
    bare = EditRequest(prompt=req.prompt, target=req.target, locality=req.locality)
    with pytest.raises(ValueError, match=r"request 1 .*true_object"):
        grace.evaluate([world_requests[0], bare], protocol="prob_preference")
    with pytest.raises(ValueError, match="prob_preference"):
        score_pairs(grace, [(req.prompt, req.target)], "prob_preference")


def test_run_stream_takes_prob_preference(grace, world_requests):
    from editbank.evaluate import run_stream

    reqs = world_requests[:4]
    stream = run_stream(grace, reqs, protocol="prob_preference")
    assert stream["protocol"] == "prob_preference" and stream["final"]["reliability"] == 1.0
    with pytest.raises(ValueError, match="eval_every"):
        run_stream(grace, reqs, protocol="prob_preference", eval_every=2)
