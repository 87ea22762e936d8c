"""Worlds built from a dataset's original facts: spec, training, and a bench on the dataset's own edits."""

from __future__ import annotations

import json

import pytest

from editbank import World
from editbank.bench import BenchConfig, run_bench
from editbank.bench.files import read_jsonl
from editbank.world.dataset import dataset_spec
from editbank.world.spec import parse_spec
from editbank.world.specs import builtin_spec

PLACES = ["Velmora", "Dunkarsk", "Oribeth", "Kesswick", "Talvane", "Morrigate", "Easthollow", "Brinmark"]
CITIES = ["Port Aster", "Kelden", "Sarovy", "Lumen Bay"]
TINY = {"model": {"layers": 1, "hidden": 64, "heads": 2, "intermediate": 128, "max_position_embeddings": 64},
        "train": {"steps": 600, "batch_size": 32, "lr": 3e-3, "warmup": 20, "eval_every": 50, "stop_at": 1.0},
        "tokenizer": {"vocab_size": 400}}


@pytest.fixture(scope="module")
def cf_file(tmp_path_factory):
    """An EasyEdit-format CounterFact file about invented places (the project's own fixture)."""
    records = []
    for i, place in enumerate(PLACES):
        true, new = CITIES[i % 4], CITIES[(i + 1) % 4]
        other = PLACES[(i + 1) % len(PLACES)]
        records.append({"case_id": i, "prompt": f"The capital of {place} is", "subject": place,
                        "target_new": new, "ground_truth": true,
                        "rephrase_prompt": f"{place} has its capital in",
                        "locality_prompt": f"The river of {other} is called",
                        "locality_ground_truth": f"the {other[:3]}wa"})
    path = tmp_path_factory.mktemp("data") / "cf.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cf_world(cf_file, tmp_path_factory):
    spec, info = dataset_spec(cf_file, format="counterfact", **TINY)
    assert info == {"requests": 8, "pairs": 24, "no_true_object": 0, "conflicting_prompt": 0}
    return World.build(spec, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def test_a_dataset_world_knows_the_original_facts(cf_world):
    assert cf_world.info["train_accuracy"] >= 0.9
    # a dataset world has no calibration part of its own: its runs hold records out (editbank.leaks)
    assert cf_world.fact_prompts() == [] and cf_world.calibration_texts() == []
    assert dict(cf_world.queries("train"))["The river of Dunkarsk is called"] == " the Dunwa"
    with pytest.raises(ValueError, match="built from a dataset"):
        cf_world.edit_requests(n=2)


def test_bench_on_a_dataset_edits_facts_the_world_knew(cf_world, cf_file, tmp_path):
    from editbank import Editor, load_requests

    reqs = load_requests(cf_file, format="counterfact")
    ed = Editor.open(cf_world.path, method="grace")
    before = ed.evaluate(reqs, protocol="prob_preference")
    ed.close()
    assert before["reliability"] <= 0.25, "before editing, the model prefers the true answers"
    cfg = BenchConfig(methods=["grace"], data=f"counterfact:{cf_file}", model=str(cf_world.path),
                      edits=[4, 8],  # 1 of 8 held out: T caps at 7
                      protocol="prob_preference")
    run_bench(cfg, tmp_path / "run", progress=False)
    rows = {r["T"]: r for r in read_jsonl(tmp_path / "run" / "results.jsonl")}
    assert sorted(rows) == [4, 7]
    assert rows[7]["reliability"] == 1.0 and rows[7]["protocol"] == "prob_preference"
    assert rows[7]["locality"] is not None


def test_specs_without_pairs_keep_their_hash_and_pairs_are_validated():
    small = parse_spec(builtin_spec("small"))
    assert "pairs" not in small.to_dict()
    assert parse_spec({"name": "p", "pairs": [["Q: one? A:", "two"]]}).pairs == [("Q: one? A:", " two")]
    for bad, match in [([["a", "b"], ["a", "c"]], "duplicate prompt"), ([["a"]], r"\[prompt, answer\]"),
                       ([], "non-empty")]:
        with pytest.raises(ValueError, match=match):
            parse_spec({"name": "p", "pairs": bad})
    with pytest.raises(ValueError, match="or give 'pairs'"):
        parse_spec({"name": "p"})
