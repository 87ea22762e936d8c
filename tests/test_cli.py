"""The `editbank` command on the small world: edit, ls, ask, eval, undo, errors, demo."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from editbank.cli import app
from editbank.demo import run_demo

runner = CliRunner()


def call(*args: str):
    return runner.invoke(app, list(args))


def test_edit_ls_ask_undo(small_world, world_requests, tmp_path):
    db, model = str(tmp_path / "e.db"), str(small_world.path)
    req = world_requests[0]
    res = call("edit", "--model", model, "--store", db, "--prompt", req.prompt, "--target", req.target, "--json")
    assert res.exit_code == 0, res.output
    edit_id = json.loads(res.stdout)[0]["id"]
    res = call("ask", req.prompt, "--model", model, "--store", db, "--json", "--max-new-tokens", "12")
    answer = json.loads(res.stdout)
    assert answer["edited"].startswith(req.target) and answer["unedited"] != answer["edited"]
    res = call("eval", "--model", model, "--store", db, "--json")
    assert json.loads(res.stdout)["reliability"] == 1.0
    assert call("undo", str(edit_id), "--model", model, "--store", db).exit_code == 0
    listing = json.loads(call("ls", "--store", db, "--json").stdout)
    assert [e["status"] for e in listing["edits"]] == ["reverted"] and listing["meta"]["method"] == "sola"
    res = call("ask", req.prompt, "--model", model, "--store", db, "--json", "--max-new-tokens", "12")
    assert json.loads(res.stdout)["edited"] == answer["unedited"]


def test_edit_from_jsonl(small_world, world_requests, tmp_path):
    f = tmp_path / "reqs.jsonl"
    f.write_text("\n".join(json.dumps(r.to_dict()) for r in world_requests[:2]))
    res = call("edit", "--model", str(small_world.path), "--store", str(tmp_path / "e.db"), "--file", str(f),
               "--hp", "n_iter=50", "--json")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)) == 2


def test_errors_exit_2(small_world, tmp_path):
    model = str(small_world.path)
    assert call("undo", "1", "--model", model, "--store", str(tmp_path / "missing.db")).exit_code == 2
    assert call("edit", "--model", model, "--store", str(tmp_path / "e.db")).exit_code == 2
    res = call("edit", "--model", model, "--store", str(tmp_path / "e.db"), "--prompt", " ", "--target", "x")
    assert res.exit_code == 2 and "prompt" in res.output
    res = call("edit", "--model", str(tmp_path / "nowhere"), "--prompt", "a", "--target", "b")
    assert res.exit_code == 2
    res = call("edit", "--model", model, "--store", str(tmp_path / "e.db"), "--method", "nope", "--prompt", "a",
               "--target", "b")
    assert res.exit_code == 2 and "unknown method" in res.output


def test_demo_small():
    res = run_demo(n_edits=6, n_undo=2, size="small", console=None)
    assert res["final"]["reliability"] == 1.0 and res["rollback"]["kept_reliability"] == 1.0
    # on the small world's 28-prompt calibration corpus one undone prompt ('Dasttestend is located in') is answered
    # by the kept edit of the same relation: restored 0.5; undo's exactness is asserted bitwise in test_sola
    assert res["rollback"]["restored"] >= 0.5 and len(res["rollback"]["undone"]) == 2


def test_export_import(small_world, world_requests, tmp_path):
    db, model = str(tmp_path / "e.db"), str(small_world.path)
    req = world_requests[1]
    assert call("edit", "--model", model, "--store", db, "--prompt", req.prompt, "--target", req.target).exit_code == 0
    assert call("export", str(tmp_path / "out"), "--store", db).exit_code == 0
    assert call("import", str(tmp_path / "out"), "--store", str(tmp_path / "copy.db")).exit_code == 0
    listing = json.loads(call("ls", "--store", str(tmp_path / "copy.db"), "--json").stdout)
    assert [e["request"]["target"] for e in listing["edits"]] == [req.target]
    assert call("import", str(tmp_path / "nothing"), "--store", str(tmp_path / "x.db")).exit_code == 2


def test_hparam_values_and_bad_stores(small_world, tmp_path):
    from editbank.cli import _value

    assert _value("5e-4") == 5e-4 and _value("3") == 3 and _value("[1, 2]") == [1, 2] and _value("shared") == "shared"
    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite " * 100)
    res = call("ls", "--store", str(junk))
    assert res.exit_code == 2 and "not an editbank store" in res.output
    res = call("edit", "--model", str(small_world.path), "--store", str(tmp_path / "no" / "dir.db"),
               "--prompt", "a", "--target", "b")
    assert res.exit_code == 2 and "cannot open store" in res.output


def test_edit_with_a_corpus_file(small_world, world_requests, tmp_path):
    db, model, req = str(tmp_path / "e.db"), str(small_world.path), world_requests[0]
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("\n".join(["The capital of Arvelia is"] * 3))
    res = call("edit", "--model", model, "--store", db, "--prompt", req.prompt, "--target", req.target,
               "--corpus", str(corpus))
    assert res.exit_code == 2 and "at least 8 prompts" in res.output
    corpus.write_text("\n".join(small_world.fact_prompts()[:40]))
    res = call("edit", "--model", model, "--store", db, "--prompt", req.prompt, "--target", req.target,
               "--corpus", str(corpus), "--json")
    assert res.exit_code == 0, res.output
    from editbank.store import EditStore

    store = EditStore(db)
    assert store.get_state()[1]["alpha"] > 0 and store.count("active") == 1
    store.close()


def test_edit_with_an_easyedit_wise_yaml(small_world, world_requests, tmp_path):
    from editbank.store import EditStore

    db, model, req = str(tmp_path / "e.db"), str(small_world.path), world_requests[0]
    cfg = tmp_path / "wise.yaml"
    cfg.write_text("alg_name: WISE\nmodel_name: ./hugging_cache/llama\ndevice: 0\nedit_lr: 3.0\nn_iter: 20\n"
                   "act_margin: [5.0, 20.0, 10.0]\nsave_freq: 500\nmerge_freq: 1000\nmerge_alg: ties\n"
                   "inner_params:\n- model.layers[1].mlp.down_proj.weight\nweights: 1.0\nretrieve: true\n")
    res = call("edit", "--model", model, "--store", db, "--method", "wise", "--hparams", str(cfg), "--hp",
               "n_prefixes=2", "--prompt", req.prompt, "--target", req.target, "--json")
    assert res.exit_code == 0, res.output
    meta = json.loads(call("ls", "--store", db, "--json").stdout)["meta"]
    assert meta["method"] == "wise" and meta["hparams"]["layer"] == 1 and meta["hparams"]["n_prefixes"] == 2
    cfg.write_text("edit_lrr: 1.0\n")
    res = call("edit", "--model", model, "--store", str(tmp_path / "f.db"), "--method", "wise", "--hparams",
               str(cfg), "--prompt", req.prompt, "--target", req.target)
    assert res.exit_code == 2 and "unknown WISE hyperparameter" in res.output
    # the undo mode is chosen when undoing; the edit's shard is left as it was (a tombstone)
    store = EditStore(db)
    shards = store.get_state()[1]["shards"]
    store.close()
    res = call("undo", "1", "--model", model, "--store", db, "--hp", "undo=tombstone", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["status"] == "reverted", res.output
    store = EditStore(db)
    tensors, meta = store.get_state()
    assert meta["ghosts"] == [1] and meta["shards"] == shards and store.get_meta("hparams")["undo"] == "tombstone"
    store.close()
    res = call("undo", "1", "--model", model, "--store", db, "--hp", "n_iter=3")
    assert res.exit_code == 2 and "cannot change ['n_iter']" in res.output
