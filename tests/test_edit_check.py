"""An edit says whether it took: refused by default (nothing changes), kept and marked with check=False."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from editbank import EditNotWritten, Editor, EditRequest
from editbank.cli import app
from editbank.evaluate.metrics import score_pairs

runner = CliRunner()


def _long_target(world) -> str:
    rng = random.Random(0)
    return " ".join(rng.choice(sorted({f.object for f in world.facts})) for _ in range(10))  # ~57 tokens


def bad_inputs(world, req):
    """(hyperparameters, request) pairs SoLA cannot write on the small world with its defaults."""
    return {
        "lr=1e9": ({"lr": 1e9}, req),
        "unseen script": ({}, EditRequest(prompt="法国的首都是", target="巴黎")),
        "emoji": ({}, EditRequest(prompt="My favourite emoji is", target="🦄🌈🎉")),
        "very long target": ({}, EditRequest(prompt=req.prompt, target=_long_target(world))),
    }


CASES = ["lr=1e9", "unseen script", "emoji", "very long target"]


def _logits(ed, prompt):
    ids = torch.tensor([ed.tokenizer(prompt)["input_ids"]])
    return ed.logits(ids)


@pytest.mark.parametrize("case", CASES)
def test_an_edit_that_did_not_take_is_refused_and_changes_nothing(small_world, world_requests, world_model,
                                                                   tmp_path, case):
    hp, req = bad_inputs(small_world, world_requests[0])[case]
    model, tok = world_model
    ed = Editor(model, tok, method="sola", store=tmp_path / "e.db", corpus=small_world.fact_prompts(), **hp)
    probes = [req.prompt, world_requests[1].prompt]
    before = [_logits(ed, p) for p in probes]
    with pytest.raises(EditNotWritten, match="did not take, so nothing was changed") as info:
        ed.edit(req)
    (failure,) = info.value.failures
    assert failure["prompt"] == req.prompt and failure["target"] == req.target
    assert isinstance(failure["loss"], float) and failure["answer"] != req.target
    assert repr(req.prompt) in str(info.value) and "final loss" in str(info.value)
    assert ed.edits() == [] and ed.store.get_state() is None
    assert all(torch.equal(_logits(ed, p), b) for p, b in zip(probes, before))
    ed.close()


@pytest.mark.parametrize("case", CASES)
def test_check_false_keeps_it_marked_not_written_and_scores_it_a_failure(small_world, world_requests, world_model,
                                                                         case):
    hp, req = bad_inputs(small_world, world_requests[0])[case]
    model, tok = world_model
    ed = Editor(model, tok, method="sola", corpus=small_world.fact_prompts(), **hp)
    e = ed.edit(req, check=False)
    stored = ed.store.get_edit(e.id)
    assert stored.status == "active" and stored.stats["written"] is False and stored.stats["loss"] > 0
    assert ed.evaluate([req], protocol="greedy_exact_match")["reliability"] == 0.0
    ed.close()


def test_a_written_edit_says_so_and_a_bad_one_sinks_its_batch(small_world, world_requests, world_model):
    model, tok = world_model
    ed = Editor(model, tok, method="sola", corpus=small_world.fact_prompts())
    good = ed.edit(world_requests[0])
    assert good.stats["written"] is True and ed.store.get_edit(good.id).stats["written"] is True
    assert score_pairs(ed, [(world_requests[0].prompt, world_requests[0].target)], "greedy_exact_match") == [1.0]
    state = ed.store.get_state()
    bad = EditRequest(prompt="My favourite emoji is", target="🦄🌈🎉")
    with pytest.raises(EditNotWritten, match="1 of 2 request"):
        ed.edit([world_requests[1], bad])
    assert [e.id for e in ed.edits()] == [good.id]
    assert all(torch.equal(a, b) for a, b in zip(ed.store.get_state()[0].values(), state[0].values()))
    with pytest.raises(TypeError, match="check must be a bool"):
        ed.edit(world_requests[1], check="no")
    ed.close()


def test_cli_refuses_with_the_message_and_no_check_keeps_it(small_world, world_requests, tmp_path):
    db, model, req = tmp_path / "e.db", str(small_world.path), world_requests[0]
    args = ["edit", "--model", model, "--store", str(db), "--prompt", req.prompt, "--target", req.target,
            "--hp", "lr=1e9", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "did not take" in res.stderr and "final loss" in res.stderr
    assert json.loads(res.stdout) == [] and not db.exists()  # the store this command created is not left behind
    res = runner.invoke(app, [*args, "--no-check"])
    assert res.exit_code == 0, res.output
    (edit,) = json.loads(runner.invoke(app, ["ls", "--store", str(db), "--json"]).stdout)["edits"]
    assert edit["status"] == "active" and edit["stats"]["written"] is False
    table = runner.invoke(app, ["ls", "--store", str(db)], env={"COLUMNS": "200"}).stdout
    assert "written" in table and " no " in table


def test_api_answers_422_with_the_details_and_check_false_keeps_it(small_world, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from editbank.serve import ServeConfig, create_app

    token = "t" * 24
    auth = {"Authorization": f"Bearer {token}"}
    ed = Editor.open(small_world.path, method="sola", store=tmp_path / "s.db")
    client = TestClient(create_app(ed, ServeConfig(token=token)))
    body = {"prompt": "My favourite emoji is", "target": "🦄🌈🎉"}
    res = client.post("/v1/edits", json=body, headers=auth)
    assert res.status_code == 422, res.text
    err = res.json()["error"]
    assert "did not take" in err["message"] and err["failures"][0]["target"] == " 🦄🌈🎉"
    assert client.get("/v1/edits").json()["data"] == [] and client.get("/healthz").json()["active_edits"] == 0
    res = client.post("/v1/edits", json={**body, "check": False}, headers=auth)
    assert res.status_code == 201 and res.json()["written"] is False and res.json()["loss"] > 0
    assert client.get("/v1/edits").json()["data"][0]["written"] is False
    ed.close()


FAST = {"wise": {"n_prefixes": 2, "n_iter": 20}, "repair": {"n_prefixes": 2, "n_iter": 20}}


@pytest.mark.parametrize("method", ["sola", "grace", "ft", "wise", "repair", "rome", "memit", "alphaedit",
                                    "metake"])
def test_the_check_agrees_with_the_reliability_the_evaluation_measures(small_world, world_requests, method):
    """Whatever the method routes on, `written` is the greedy exact match evaluate() reports for the prompt."""
    ed = Editor.open(small_world.path, method=method, **FAST.get(method, {}))
    reqs = world_requests[3:5]
    edits = ed.edit(reqs, check=False)
    for e, r in zip(edits, reqs):
        rel = ed.evaluate([r], protocol="greedy_exact_match")["reliability"]
        assert e.stats["written"] is (rel == 1.0), (method, r.prompt, rel)
    ed.close()


def test_a_request_superseded_in_the_same_call_is_not_a_failure(small_world, world_requests, world_model):
    model, tok = world_model
    ed = Editor(model, tok, method="sola", corpus=small_world.fact_prompts())
    r = world_requests[0]
    other = EditRequest(prompt=r.prompt, target=" " + small_world.facts[0].object, subject=r.subject)
    first, second = ed.edit([r, other])
    assert ed.store.get_edit(first.id).status == "superseded" and first.stats["written"] is None
    assert second.stats["written"] is True
    ed.close()


def test_a_routed_method_with_nothing_held_saves_the_base_model(small_world, world_model, tmp_path):
    from editbank import load_model

    model, tok = world_model
    ed = Editor(model, tok, method="grace")
    ed.save_pretrained(tmp_path / "ckpt")
    again, _ = load_model(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    ed.close()
