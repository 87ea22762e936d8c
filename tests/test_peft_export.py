"""SoLA's edits as standard PEFT adapters plus a router: routed prompts answer as editbank does, others as the base."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from editbank import Editor, load_model
from editbank.cli import app
from editbank.tokens import make_batch

peft = pytest.importorskip("peft")
runner = CliRunner()


def _logits(model, tok, prompt, target):
    b = make_batch(tok, [(prompt, target)])
    with torch.no_grad():
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[0]


def test_each_adapter_is_its_edit_and_the_router_picks_it(small_world, world_requests, tmp_path):
    db, out, model = tmp_path / "s.db", tmp_path / "peft", str(small_world.path)
    reqs = world_requests[:4]
    ed = Editor.open(model, method="sola", store=db)
    edits = ed.edit(reqs)
    probes = [p for r in reqs for p in r.locality]
    unrouted = [p for p, o in zip(probes, ed.method.routes([p for p, _ in probes])) if o is None]
    def edited(prompt, target):  # routed at the last prompt token, as in generation
        b = make_batch(ed.tokenizer, [(prompt, target)])
        return ed.logits(b.input_ids, b.attention_mask, b.query_index)[0]

    want = {e.id: edited(r.prompt, r.target) for e, r in zip(edits, reqs)}
    want_probes = [edited(*p) for p in unrouted]
    ed.close()
    res = runner.invoke(app, ["export", str(out), "--store", str(db), "--format", "peft", "--model", model])
    assert res.exit_code == 0, res.output
    info = json.loads((out / "router.json").read_text())
    assert info["edits"] == [e.id for e in edits] and info["alpha"] > 0
    res = runner.invoke(app, ["route", *[r.prompt for r in reqs], unrouted[0][0], "--model", model, "--store",
                              str(db), "--json"])
    assert [x["edit"] for x in json.loads(res.stdout)] == [*[e.id for e in edits], None]
    # the documented recipe, from the exported files alone, decides as editbank does
    from safetensors.torch import load_file

    router = load_file(str(out / "router.safetensors"))
    reader = Editor.open(model, store=db, read_only=True)
    prompts = [r.prompt for r in reqs] + [p for p, _ in probes]
    z = torch.nn.functional.normalize((torch.stack([reader.method.key_of(p) for p in prompts]) - router["center"])
                                      @ router["projection"], dim=1)
    dist = 1 - z @ router["index_keys"].T
    gate, ids = info["gate"], [str(int(e)) for e in router["edit_ids"]]
    assert gate is not None and set(gate["forms"]) == set(ids), "world edits name their subject: all gated"

    def allowed(prompt: str, k: int) -> bool:
        tokens = reader.tokenizer(prompt)["input_ids"]
        return any(tokens[i : i + len(f)] == f for f in gate["forms"][ids[k]] for i in range(len(tokens)))

    recipe = []
    for p, row in zip(prompts, dist.tolist()):
        ok = [(d, k) for k, d in enumerate(row) if allowed(p, k) and d < gate["alpha"]]
        recipe.append(int(router["edit_ids"][min(ok)[1]]) if ok else None)
    assert recipe == reader.method.routes(prompts)
    assert any(r is None for r in recipe) and any(r is not None for r in recipe)
    reader.close()
    for e, r in zip(edits, reqs):
        base, tok = load_model(model)
        tuned = peft.PeftModel.from_pretrained(base, str(out / str(e.id)))
        got = _logits(tuned, tok, r.prompt, r.target)
        torch.testing.assert_close(got, want[e.id], rtol=0, atol=1e-5)
    base, tok = load_model(model)
    assert len(unrouted) >= 2
    for (p, a), w in zip(unrouted, want_probes):
        torch.testing.assert_close(_logits(base, tok, p, a), w, rtol=0, atol=0)


def test_peft_export_is_for_sola_and_route_is_served(small_world, world_requests, tmp_path):
    db = tmp_path / "g.db"
    ed = Editor.open(small_world.path, method="grace", store=db)
    ed.edit(world_requests[0], check=False)
    ed.close()
    res = runner.invoke(app, ["export", str(tmp_path / "p"), "--store", str(db), "--format", "peft", "--model",
                              str(small_world.path)])
    assert res.exit_code == 2 and "SoLA" in res.stderr
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from editbank.serve import ServeConfig, create_app

    ed = Editor.open(small_world.path, method="sola", store=tmp_path / "s.db")
    e = ed.edit(world_requests[1])
    client = TestClient(create_app(ed, ServeConfig(token="t" * 24)))
    res = client.post("/v1/route", json={"prompt": [world_requests[1].prompt, "Unrelated words here"]})
    assert res.status_code == 200 and [x["edit"] for x in res.json()["data"]] == [e.id, None]
    ed.close()
