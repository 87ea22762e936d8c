"""Safe artifacts (no pickle, eval or unsafe torch.load in the package; imports stay inside their folder and
refuse other schemas and models) and determinism (same requests and seed -> bitwise-identical artifacts)."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

import editbank
from editbank import Editor
from editbank.store import EditStore

PACKAGE = Path(editbank.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}


def unsafe_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
                found.append(f"{f.id}()")
            if isinstance(f, ast.Attribute) and f.attr == "load" and getattr(f.value, "id", None) == "torch":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                if not safe:
                    found.append("torch.load without weights_only=True")
            if isinstance(f, ast.Attribute) and f.attr in ("load", "unsafe_load") and getattr(f.value, "id", None) \
                    == "yaml":
                found.append(f"yaml.{f.attr}")
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = "import pickle\nfrom dill import x\neval('1')\ntorch.load(f)\ntorch.load(f, weights_only=False)\nyaml.load(s)"
    assert len(unsafe_uses(bad)) == 6
    assert unsafe_uses("model.eval()\ntorch.load(f, weights_only=True)\nyaml.safe_load(s)") == []


def test_no_pickle_eval_or_unsafe_load_in_the_package():
    offenders = {str(p.relative_to(PACKAGE)): u for p in PACKAGE.rglob("*.py") if (u := unsafe_uses(p.read_text()))}
    assert offenders == {}


@pytest.fixture
def export(small_world, world_requests, tmp_path):
    ed = Editor.open(small_world.path, method="grace", store=tmp_path / "a.db")
    ed.edit(world_requests[:3])
    folder = ed.store.export(tmp_path / "export")
    fingerprint = ed.fingerprint
    ed.close()
    return folder, fingerprint


def rewrite(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    for k, v in changes.items():
        if k == "fingerprint":
            manifest["meta"]["fingerprint"] = v
        else:
            manifest[k] = v
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("attack, match", [
    ("snapshot path", "integer after_edit"),
    ("artifacts link", "outside the export folder"),
    ("other schema", "schema 99"),
    ("other model", "another model"),
    ("truncated tensors", "malformed"),
    ("no manifest", "not an exported editbank store"),
])
def test_an_import_refuses_crafted_exports_and_writes_nothing(export, tmp_path, attack, match):
    folder, fingerprint = export
    if attack == "snapshot path":
        rewrite(folder, snapshots=[{"after_edit": "../../etc/passwd", "meta": {}}])
    elif attack == "artifacts link":
        outside = tmp_path / "outside.safetensors"
        shutil.move(folder / "artifacts.safetensors", outside)
        (folder / "artifacts.safetensors").symlink_to(outside)
    elif attack == "other schema":
        rewrite(folder, schema_version=99)
    elif attack == "other model":
        rewrite(folder, fingerprint="f" * 64)
    elif attack == "truncated tensors":
        data = (folder / "artifacts.safetensors").read_bytes()
        (folder / "artifacts.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (folder / "manifest.json").unlink()
    with pytest.raises(ValueError, match=match):
        EditStore.import_folder(folder, tmp_path / "b.db", fingerprint=fingerprint)
    assert not (tmp_path / "b.db").exists()


def test_an_untouched_export_imports(export, tmp_path):
    folder, fingerprint = export
    store = EditStore.import_folder(folder, tmp_path / "b.db", fingerprint=fingerprint)
    assert store.count() == 3
    store.close()


FAST = {"wise": {"n_prefixes": 2, "n_iter": 20}, "repair": {"n_prefixes": 2, "n_iter": 20}}


@pytest.mark.parametrize("method", ["sola", "grace", "ft", "wise", "repair", "rome", "memit", "alphaedit",
                                    "metake"])
def test_the_same_edits_and_seed_give_bitwise_identical_artifacts(small_world, world_requests, tmp_path, method):
    outputs = []
    for run in ("a", "b"):
        ed = Editor.open(small_world.path, method=method, store=tmp_path / f"{run}.db", seed=3,
                         **FAST.get(method, {}))
        ed.edit(world_requests[:2], check=False)
        ed.edit(world_requests[2], check=False)
        ed.undo(ed.edits()[0].id)
        folder = ed.store.export(tmp_path / f"export-{run}")
        ed.close()
        outputs.append({p.name: p.read_bytes() for p in folder.glob("*.safetensors")})
    assert outputs[0].keys() == outputs[1].keys() and "state.safetensors" in outputs[0]
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], f"{method}: {name} differs between two identical runs"


@pytest.mark.parametrize("method", ["sola", "grace", "ft", "wise", "repair", "rome",
                                    "memit", "alphaedit", "metake"])
def test_undo_is_never_receiving_the_edit(small_world, world_requests, method):
    """Edits A, B, C then undo B is, bitwise on the CPU, a fresh editor fed A and C: an edit's randomness comes from
    the request and the hyperparameter seed, never from its id (the fresh editor gives C another id)."""
    from editbank.tokens import make_batch

    a, b, c = world_requests[5:8]
    ed = Editor.open(small_world.path, method=method, **FAST.get(method, {}))
    ed.edit(a, check=False)
    middle = ed.edit(b, check=False)
    ed.edit(c, check=False)
    ed.undo(middle.id)
    fresh = Editor.open(small_world.path, method=method, **FAST.get(method, {}))
    fresh.edit(a, check=False)
    fresh.edit(c, check=False)
    pairs = [(r.prompt, r.target) for r in (a, b, c)] + [p for r in (a, b, c) for p in r.locality]
    for p in pairs:
        batch = make_batch(ed.tokenizer, [p])
        got = ed.logits(batch.input_ids, batch.attention_mask, batch.query_index)
        want = fresh.logits(batch.input_ids, batch.attention_mask, batch.query_index)
        assert torch.equal(got, want), (method, p, float((got - want).abs().max()))
    ed.close()
    fresh.close()
