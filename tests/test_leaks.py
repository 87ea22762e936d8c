"""No evaluation prompt in what a method learns from: the world split, the dataset split, and the checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from editbank import Editor, EditRequest, World
from editbank.bench import BenchConfig, BenchError, run_bench
from editbank.bench.run import load_data
from editbank.leaks import (
    LeakError,
    LeakWarning,
    calibration_corpus,
    calibration_paraphrase_subjects,
    calibration_paraphrases,
    calibration_split,
    check_disjoint,
    evaluation_prompts,
    find_leaks,
)
from editbank.world.generate import entities_of, generate_facts
from editbank.world.spec import parse_spec
from editbank.world.specs import SIZES, builtin_spec


def _unbuilt(name: str) -> World:
    """A built-in world's facts and split without training its model (the split depends on the spec only)."""
    spec = parse_spec(builtin_spec(name))
    entities = entities_of(spec)
    return World(Path("."), spec, entities, generate_facts(spec, entities))


@pytest.mark.parametrize("name", SIZES)
def test_every_builtin_worlds_corpus_shares_no_prompt_with_its_requests(name):
    w = _unbuilt(name)
    corpus = w.fact_prompts()
    assert len(corpus) >= 10 and len(set(corpus)) == len(corpus)
    texts = w.calibration_texts()
    assert set(corpus) <= set(texts)
    groups = w.calibration_paraphrases()
    assert [p for g in groups for p in g] == texts and all(len(g) >= 2 for g in groups)
    n_all = len(w.editable_facts)
    for n in (1, 10, n_all // 2, n_all):
        for seed in (0, 1, 2):
            reqs = w.edit_requests(n=n, seed=seed)
            assert not find_leaks(corpus, reqs) and not find_leaks(texts, reqs), (name, n, seed)
            assert not {r.prompt for r in reqs} & set(texts)
            # the edits, their rephrases and probes come from the evaluation part only
            calibration = set(w.calibration_subjects)
            assert not any(r.subject in calibration for r in reqs)
            assert not any(c in p for r in reqs for p, _ in r.locality for c in calibration)
    # the calibration part is real: 20% of the subjects, none a control subject, none ever edited
    assert len(w.calibration_subjects) >= 2
    assert not set(w.calibration_subjects) & set(w.control_subjects)


def test_the_method_corpus_and_the_statistics_corpus_of_a_world_are_its_calibration_part(small_world):
    from editbank.methods.locate import stats

    for method in ("sola", "wise", "rome"):
        ed = Editor.open(small_world.path, method=method)
        try:
            assert ed.method.corpus == small_world.fact_prompts()
            assert ed.method.stats_corpus == small_world.calibration_texts()
            assert ed.method.paraphrases == small_world.calibration_paraphrases()
            assert ed.method.paraphrase_subjects == small_world.calibration_paraphrase_subjects()
            for n, seed in ((5, 0), (20, 3), (len(small_world.editable_facts), 1)):
                reqs = small_world.edit_requests(n=n, seed=seed)
                assert not find_leaks(ed.method.corpus, reqs) and not find_leaks(ed.method.stats_corpus, reqs)
                if method == "rome":  # the key statistics are taken from these rows
                    rows = stats.corpus_rows(ed.tokenizer, ed.method.stats_corpus, ed.method.hparams.mom2_n_samples)
                    texts = {ed.tokenizer.decode(r).strip() for r in rows}
                    assert not texts & evaluation_prompts(reqs)
        finally:
            ed.close()


def test_the_check_names_the_overlap_of_a_leaky_corpus(small_world):
    reqs = small_world.edit_requests(n=10, seed=0)
    corpus = small_world.fact_prompts()
    check_disjoint(corpus, reqs)  # the world's own corpus passes
    leaky = corpus + [reqs[3].rephrases[0], reqs[5].locality[1][0] + " "]
    with pytest.raises(LeakError, match="2 of the .* texts of the corpus are evaluation prompts") as info:
        check_disjoint(leaky, reqs)
    assert repr(reqs[3].rephrases[0]) in str(info.value)


def test_bench_refuses_a_leaky_run_and_leaves_the_directory_unclaimed(small_world, tmp_path):
    reqs = small_world.edit_requests(n=5, seed=0)
    stats = tmp_path / "stats.txt"
    stats.write_text("Some text about nothing\n" + reqs[2].locality[0][0] + "\n", encoding="utf-8")
    cfg = BenchConfig(methods=["rome"], data="world:small", edits=[5], hparams={"rome": {"mom2_dataset": str(stats)}})
    with pytest.raises(BenchError, match="refusing a leaky run: 1 of the 2 texts of rome's statistics file"):
        run_bench(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "params.json").exists()


def test_evaluate_warns_when_a_scored_prompt_is_in_the_corpus(small_world):
    reqs = small_world.edit_requests(n=3, seed=0)
    ed = Editor.open(small_world.path, method="grace")
    try:
        with pytest.warns(LeakWarning, match="1 of the"):
            ed.method.corpus = small_world.fact_prompts() + [reqs[0].rephrases[0]]
            ed.evaluate(reqs, protocol="greedy_exact_match")
        ed.method.corpus = small_world.fact_prompts()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", LeakWarning)
            ed.evaluate(reqs, protocol="greedy_exact_match")
    finally:
        ed.close()


def _records(n: int) -> list[EditRequest]:
    """Requests that share neighbourhood prompts, as CounterFact's records about one subject do."""
    out = []
    for i in range(n):
        out.append(EditRequest(prompt=f"The capital of P{i} is", target="X", subject=f"P{i}",
                               rephrases=[f"P{i}'s capital is"],
                               locality=[(f"The capital of P{(i + 1) % n} is", "Y"), ("The capital of Q is", "Z")]))
    return out


def test_a_dataset_run_takes_its_corpus_from_held_out_records_only():
    records = _records(40)
    held, evaluated = calibration_split(records)
    assert len(held) == 4 and len(evaluated) == 36
    assert calibration_split(records) == (held, evaluated)  # the same file always splits the same way
    corpus = calibration_corpus(held, evaluated)
    assert corpus and not find_leaks(corpus, evaluated)
    assert not {p.strip() for p in corpus} & {r.prompt for r in evaluated}
    # paraphrase groups: a held record's prompt is a neighbour's probe here, so its group is dropped (too small)
    groups = calibration_paraphrases(held, evaluated)
    flat = [p for g in groups for p in g]
    assert all(len(g) >= 2 for g in groups)
    assert not find_leaks(flat, evaluated) and not {p.strip() for p in flat} & {r.prompt for r in evaluated}
    alone = [EditRequest(prompt=f"The capital of R{i} is", target="X", subject=f"R{i}",
                         rephrases=[f"R{i}'s capital is", f"R{i} has its capital in"]) for i in range(20)]
    held_alone, evaluated_alone = calibration_split(alone)
    assert calibration_paraphrases(held_alone, evaluated_alone) == [[r.prompt, *r.rephrases] for r in held_alone]
    assert calibration_paraphrase_subjects(held_alone, evaluated_alone) == [r.subject for r in held_alone]
    assert len(calibration_paraphrase_subjects(held, evaluated)) == len(groups)
    # the shared neighbourhood prompt and the neighbours' edit prompts were dropped, the held-out records' kept
    assert "The capital of Q is" not in corpus
    assert all(r.rephrases[0] in corpus for r in held)


def test_bench_dataset_data_holds_a_slice_out_and_draws_streams_from_the_rest(tmp_path, small_world):
    records = [{"prompt": f"The capital of {s} is", "target_new": " Dunmore", "subject": s,
                "rephrase_prompt": f"{s}'s capital is", "ground_truth": " Korvath",
                "locality_prompt": "The capital of Norland is", "locality_ground_truth": " Keldmoor"}
               for s in small_world.entities[:20]]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    cfg = BenchConfig(methods=["grace"], data=f"counterfact:{path}", model=str(small_world.path), edits=[18])
    data = load_data(cfg, progress=False)
    assert data.available == 18 and "2 more held out" in data.describe
    stream = data.draw(18, 0)
    assert not find_leaks(data.corpus, stream)
    assert data.paraphrases and not find_leaks([p for g in data.paraphrases for p in g], stream)
    assert not {r.prompt for r in stream} & set(data.corpus)


def test_bench_refuses_leaky_paraphrase_groups(small_world):
    from editbank.bench.run import check_leaks

    cfg = BenchConfig(methods=["sola"], data="world:small", edits=[5])
    data = load_data(cfg, progress=False)
    check_leaks(cfg, data, [5])  # the world's own groups pass
    reqs = data.draw(5, 0)
    data.paraphrases = data.paraphrases + [[reqs[1].rephrases[0], "Some other words"]]
    with pytest.raises(BenchError, match="refusing a leaky run: 1 of the .* texts of the paraphrase groups"):
        check_leaks(cfg, data, [5])
