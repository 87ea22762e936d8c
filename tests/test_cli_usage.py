"""The CLI as a new user meets it: files in every format, resume, ctrl-C, export, errors on stderr, help text."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from editbank import Editor, load_model
from editbank.cli import app
from editbank.methods.base import ExportError

runner = CliRunner()


def call(*args: str, **kw):
    return runner.invoke(app, list(args), **kw)


def _counterfact_file(path, requests):
    """EasyEdit's CounterFact layout (prompt/target_new/subject/rephrase_prompt/locality_*)."""
    recs = [{"case_id": i, "prompt": r.prompt, "target_new": r.target.strip(), "subject": r.subject,
             "ground_truth": r.meta["true_object"], "rephrase_prompt": r.rephrases[0],
             "locality_prompt": r.locality[0][0], "locality_ground_truth": r.locality[0][1].strip()}
            for i, r in enumerate(requests)]
    path.write_text(json.dumps(recs, indent=1))


def test_edit_file_reads_every_format_and_a_rerun_resumes(small_world, world_requests, tmp_path):
    f, db = tmp_path / "cf.json", str(tmp_path / "e.db")
    _counterfact_file(f, world_requests[:2])
    base = ("edit", "--model", str(small_world.path), "--store", db, "--file", str(f), "--no-check", "--json")
    res = call(*base)
    assert res.exit_code == 0, res.output
    assert [e["request"]["prompt"] for e in json.loads(res.stdout)] == [r.prompt for r in world_requests[:2]]
    res = call(*base)  # the same command again: nothing left to do, no duplicates
    assert res.exit_code == 0 and json.loads(res.stdout) == [] and "2 of 2 request(s) are already in" in res.stderr
    assert len(json.loads(call("ls", "--store", db, "--json").stdout)["edits"]) == 2
    res = call(*base, "--format", "zsre")
    assert res.exit_code == 2 and str(f) in res.stderr


def test_a_bad_jsonl_line_names_the_file_and_the_line(small_world, world_requests, tmp_path):
    f = tmp_path / "reqs.jsonl"
    f.write_text(json.dumps(world_requests[0].to_dict()) + "\n" + '{"prompt": "a" "target": "b"}\n')
    res = call("edit", "--model", str(small_world.path), "--store", str(tmp_path / "e.db"), "--file", str(f))
    assert res.exit_code == 2 and f"{f}: line 2" in res.stderr and res.stdout == ""
    assert not (tmp_path / "e.db").exists()


def test_ctrl_c_stops_after_the_current_edit_and_the_rerun_finishes(small_world, world_requests, tmp_path,
                                                                    monkeypatch):
    f, db = tmp_path / "reqs.jsonl", str(tmp_path / "e.db")
    f.write_text("\n".join(json.dumps(r.to_dict()) for r in world_requests[:5]))
    real, calls = Editor.edit, []

    def edit_then_interrupt(self, request, **kw):
        out = real(self, request, **kw)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the user presses ctrl-C during the second edit
        return out

    monkeypatch.setattr(Editor, "edit", edit_then_interrupt)
    base = ("edit", "--model", str(small_world.path), "--store", db, "--file", str(f), "--no-check")
    res = call(*base)
    assert res.exit_code == 130 and "interrupted: 2 of 5 edit(s) applied" in res.stderr, res.output
    assert "run the same command again" in res.stderr
    monkeypatch.setattr(Editor, "edit", real)
    res = call(*base, "--json")
    assert res.exit_code == 0 and len(json.loads(res.stdout)) == 3
    listing = json.loads(call("ls", "--store", db, "--json").stdout)["edits"]
    assert [e["request"]["prompt"] for e in listing] == [r.prompt for r in world_requests[:5]]


def test_export_hf_writes_the_edited_weights(small_world, world_requests, tmp_path):
    db, out, r = str(tmp_path / "ft.db"), tmp_path / "ckpt", world_requests[0]
    model = str(small_world.path)
    assert call("edit", "--model", model, "--store", db, "--method", "FT", "--prompt", r.prompt, "--target",
                r.target, "--no-check").exit_code == 0
    res = call("export", str(out), "--store", db, "--format", "hf", "--model", model)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(out)
    exported, tok = load_model(out)
    ed = Editor.open(model, store=db)
    ids = torch.tensor([tok(r.prompt)["input_ids"]])
    edited = ed.logits(ids)
    with ed.unedited():
        base = ed.logits(ids)
    ed.close()
    with torch.no_grad():
        plain = exported(input_ids=ids).logits
    assert torch.allclose(plain, edited, atol=1e-5) and not torch.allclose(plain, base, atol=1e-3)


def test_routed_edits_cannot_be_saved_as_a_plain_checkpoint(small_world, world_requests, world_model, tmp_path):
    model, tok = world_model
    ed = Editor(model, tok, method="sola", corpus=small_world.fact_prompts())
    ed.model.save_pretrained(tmp_path / "no-edits")  # nothing edited yet: the base model is the edited model
    ed.edit(world_requests[0])
    with pytest.raises(ExportError, match="routed side state"):
        ed.model.save_pretrained(tmp_path / "lost")
    with pytest.raises(ExportError, match="routed side state"):
        ed.save_pretrained(tmp_path / "lost2")
    assert not (tmp_path / "lost").exists() and not (tmp_path / "lost2").exists()
    ed.close()
    assert "save_pretrained" not in vars(model)  # the model is given back as it came
    db = tmp_path / "s.db"
    assert call("edit", "--model", str(small_world.path), "--store", str(db), "--prompt", world_requests[0].prompt,
                "--target", world_requests[0].target).exit_code == 0
    res = call("export", str(tmp_path / "hf"), "--store", str(db), "--format", "hf", "--model",
               str(small_world.path))
    assert res.exit_code == 2 and "routed side state" in res.stderr and not (tmp_path / "hf").exists()


def test_version_method_case_did_you_mean_and_errors_on_stderr(small_world, tmp_path):
    from editbank import __version__

    assert call("--version").stdout.strip() == f"editbank {__version__}"
    res = call("edit", "--model", str(small_world.path), "--store", str(tmp_path / "e.db"), "--method", "sloa",
               "--prompt", "a b", "--target", "c", "--json")
    assert res.exit_code == 2 and "did you mean 'sola'?" in res.stderr and res.stdout == ""
    res = call("ls", "--store", str(tmp_path / "missing.db"), "--json")
    assert res.exit_code == 2 and "no store at" in res.stderr and res.stdout == ""
    ed = Editor.open(small_world.path, method="SoLA")
    assert ed.method.name == "sola"
    ed.close()


def test_help_texts_say_what_is_true():
    env = {"COLUMNS": "200"}
    assert "<bool>" not in call("ls", "--help", env=env).stdout.replace("--help", "")
    assert "E[k kᵀ]" in call("stats", "--help", env=env).stdout
    assert "must exist" in call("eval", "--help", env=env).stdout
    assert "created if missing" in call("edit", "--help", env=env).stdout
    # the module entry point knows every command, stats included (it used to be defined after main() ran)
    out = subprocess.run([sys.executable, "-m", "editbank.cli", "stats", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "key statistics" in out.stdout


def test_world_build_prints_the_path_alone(small_world):
    res = call("world", "build", "--size", "small")
    assert res.exit_code == 0 and res.stdout.strip() == str(small_world.path)


def test_a_rerun_does_not_reapply_a_request_a_later_one_superseded(small_world, world_requests, tmp_path):
    r = world_requests[0]
    objects = [f.object for f in small_world.facts if " " + f.object != r.target]
    f, db = tmp_path / "reqs.jsonl", str(tmp_path / "e.db")
    f.write_text("\n".join(json.dumps({"prompt": r.prompt, "target": t}) for t in (r.target.strip(), objects[0])))
    base = ("edit", "--model", str(small_world.path), "--store", db, "--file", str(f), "--no-check", "--json")
    assert call(*base).exit_code == 0
    res = call(*base)
    assert res.exit_code == 0 and json.loads(res.stdout) == [], res.output
    listing = json.loads(call("ls", "--store", db, "--json").stdout)["edits"]
    assert [e["status"] for e in listing] == ["superseded", "active"]
