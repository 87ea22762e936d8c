"""Dataset readers: invented fixtures in each published shape -> EditRequests; errors name file/record/field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from editbank import EditRequest, load_requests
from editbank.data import FORMATS, DatasetError, DatasetWarning, jsonl

ZSRE = [
    {"subject": "Velmora Works", "src": "What does Velmora Works make?", "pred": "kettles",
     "rephrase": "What is produced by Velmora Works?", "alt": "lanterns", "answers": ["kettles"],
     "loc": "nq question: who painted the blue orchard", "loc_ans": "Ista Fenn",
     "cond": "kettles >> lanterns || What does Velmora Works make?"},
    {"subject": "Oru Dast", "src": "Which river flows through Oru Dast?", "pred": "Tamel",
     "rephrase": "Oru Dast lies on which river?", "alt": "Serrow", "answers": ["Quillan", "Quill"],
     "loc": "nq question: how many moons does pellar have", "loc_ans": "three",
     "portability": {"New Question": "Which sea does the river through Oru Dast reach?", "New Answer": "Amber Sea"}},
]

ROME = [
    {"case_id": 7, "pararel_idx": 99,
     "requested_rewrite": {"prompt": "The native tongue of {} is", "relation_id": "P103",
                           "target_new": {"str": "Orlic", "id": "Q1"}, "target_true": {"str": "Vessan", "id": "Q2"},
                           "subject": "Mira Talvane"},
     "paraphrase_prompts": ["Rain fell all week. Mira Talvane speaks", "Mira Talvane grew up speaking"],
     "neighborhood_prompts": ["The native tongue of Ado Krell is", "Sela Voss speaks"],
     "attribute_prompts": ["The native tongue of Bern Ocho is"],
     "generation_prompts": ["Mira Talvane's first language is"]},
]

EASYEDIT = [
    {"case_id": 3, "prompt": "The capital of Dunavar is", "target_new": "Pellis", "subject": "Dunavar",
     "ground_truth": "Ostrow", "rephrase_prompt": "Dunavar's seat of government is in",
     "locality_prompt": "The capital of Merrin is", "locality_ground_truth": "Calde"},
    {"case_id": 4, "prompt": "Tovo Brand plays the", "target_new": "cello", "subject": "Tovo Brand",
     "ground_truth": ["harp"], "rephrase_prompt": ["Tovo Brand is known for the", "The instrument of Tovo Brand:"],
     "locality_prompt": ["Ena Sorl plays the", "Bo Quist plays the"], "locality_ground_truth": ["flute", "drums"]},
]

HALLU = [
    {"prompt": "This is a passage about lira venn. Lira Venn is a glassblower from Osk.",
     "target_new": "She opened her first studio in 1931.", "subject": "lira venn",
     "locality_prompt": "Fresh bread every morning at the corner", "locality_ground_truth": " bakery on Elm road."},
    {"prompt": "This is a passage about tam oro. Tam Oro is a sailor.", "target_new": "He crossed the Gray Sea twice.",
     "subject": "tam oro", "locality_prompt": "The meeting is moved to", "locality_ground_truth": ""},
]

TEMPORAL = [
    {"prompt": "Korrin Labs,", "target_new": "founded in 2031, builds tidal batteries.", "subject": "Korrin Labs,",
     "ood_rephrase": "Korrin Labs is a young company whose tidal batteries power harbour towns.",
     "locality_prompt": "Our garden club meets on", "locality_ground_truth": "the first Sunday of each month."},
]

MQUAKE = [
    {"case_id": 11,
     "requested_rewrite": [
         {"prompt": "{} is a citizen of", "relation_id": "P27", "target_new": {"str": "Varnia", "id": "Q5"},
          "target_true": {"str": "Lotheria", "id": "Q6"}, "subject": "Pim Arlo",
          "question": "What is the country of citizenship of Pim Arlo?"},
         {"prompt": "The head of state of {} is", "relation_id": "P35", "target_new": {"str": "Uma Stell", "id": "Q7"},
          "target_true": {"str": "Rolf Enn", "id": "Q8"}, "subject": "Varnia",
          "question": "Who is the head of state of Varnia?"},
     ],
     "questions": ["Who leads the country Pim Arlo is a citizen of?", "Who is head of state of Pim Arlo's country?"],
     "answer": "Rolf Enn", "answer_alias": ["R. Enn"], "new_answer": "Uma Stell", "new_answer_alias": ["U. Stell"],
     "single_hops": [{"question": "q", "cloze": "c", "answer": "a", "answer_alias": []}],
     "orig": {"triples": [["Q1", "P27", "Q6"]]}},
    {"case_id": 12,
     "requested_rewrite": [
         {"prompt": "{} was created by", "target_new": {"str": "Ada Voss"}, "target_true": {"str": "Kel Marr"},
          "subject": "Glimmerball"}],
     "questions": ["Who created Glimmerball?"], "answer": "Kel Marr", "new_answer": "Ada Voss"},
]

FIXTURES = {"zsre": ZSRE, "counterfact_rome": ROME, "counterfact_easyedit": EASYEDIT,
            "wise_hallucination": HALLU, "wise_temporal": TEMPORAL, "mquake": MQUAKE}


def write(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1), encoding="utf-8")
    return path


def test_zsre(tmp_path):
    a, b = load_requests(write(tmp_path, "zsre.json", ZSRE), "zsre")
    assert (a.prompt, a.target, a.subject) == ("What does Velmora Works make?", " lanterns", "Velmora Works")
    assert a.rephrases == ["What is produced by Velmora Works?"]
    assert a.locality == [("nq question: who painted the blue orchard", " Ista Fenn")]
    assert a.meta["true_object"] == "kettles" and a.meta["pred"] == "kettles" and a.meta["answers"] == ["kettles"]
    assert a.meta["cond"].startswith("kettles >>") and a.portability == []
    assert b.meta["true_object"] == "Quillan"
    assert b.portability == [("Which sea does the river through Oru Dast reach?", " Amber Sea")]


def test_zsre_blank_target_is_skipped_with_a_warning(tmp_path):
    data = [ZSRE[0], {**ZSRE[1], "alt": ""}]
    with pytest.warns(DatasetWarning, match=r"zsre\.json: skipped 1 record.*'alt'.*records 1"):
        reqs = load_requests(write(tmp_path, "zsre.json", data))
    assert len(reqs) == 1


def test_counterfact_rome(tmp_path):
    (r,) = load_requests(write(tmp_path, "cf.json", ROME), "counterfact_rome")
    assert (r.prompt, r.target, r.subject) == ("The native tongue of Mira Talvane is", " Orlic", "Mira Talvane")
    assert r.rephrases == ROME[0]["paraphrase_prompts"]
    assert r.locality == [("The native tongue of Ado Krell is", " Vessan"), ("Sela Voss speaks", " Vessan")]
    assert r.meta["true_object"] == "Vessan"
    assert r.meta["attribute_prompts"] == ROME[0]["attribute_prompts"]
    assert r.meta["generation_prompts"] == ROME[0]["generation_prompts"]
    assert (r.meta["case_id"], r.meta["relation_id"], r.meta["target_new_id"], r.meta["target_true_id"]) == (
        7, "P103", "Q1", "Q2")


def test_counterfact_easyedit(tmp_path):
    a, b = load_requests(write(tmp_path, "cf.json", EASYEDIT), "counterfact_easyedit")
    assert (a.prompt, a.target, a.subject) == ("The capital of Dunavar is", " Pellis", "Dunavar")
    assert a.rephrases == ["Dunavar's seat of government is in"]
    assert a.locality == [("The capital of Merrin is", " Calde")]
    assert a.meta["true_object"] == "Ostrow" and a.meta["case_id"] == 3
    assert b.meta["true_object"] == "harp" and len(b.rephrases) == 2
    assert b.locality == [("Ena Sorl plays the", " flute"), ("Bo Quist plays the", " drums")]


def test_wise_hallucination_keeps_unusable_locality_in_meta(tmp_path):
    a, b = load_requests(write(tmp_path, "hallucination-edit.json", HALLU), "wise_hallucination")
    assert a.target == " She opened her first studio in 1931." and a.subject == "lira venn"
    assert a.rephrases == [] and a.locality == [("Fresh bread every morning at the corner", " bakery on Elm road.")]
    assert b.locality == [] and b.meta["unusable_locality"] == [["The meeting is moved to", ""]]


def test_wise_temporal_ood_rephrase(tmp_path):
    (r,) = load_requests(write(tmp_path, "temporal-edit.json", TEMPORAL), "wise_temporal")
    assert (r.prompt, r.subject) == ("Korrin Labs,", "Korrin Labs,")
    assert r.rephrases == [TEMPORAL[0]["ood_rephrase"]] and r.meta["rephrases_ood"] is True
    assert r.locality == [("Our garden club meets on", " the first Sunday of each month.")]


def test_mquake_cases_become_requests_with_portability_on_the_last(tmp_path):
    a, b, c = load_requests(write(tmp_path, "mquake.json", MQUAKE), "mquake")
    assert (a.prompt, a.target, a.subject) == ("Pim Arlo is a citizen of", " Varnia", "Pim Arlo")
    assert (b.prompt, b.target, b.subject) == ("The head of state of Varnia is", " Uma Stell", "Varnia")
    assert a.rephrases == ["What is the country of citizenship of Pim Arlo?"]
    assert a.meta["true_object"] == "Lotheria" and b.meta["true_object"] == "Rolf Enn"
    assert [r.meta["case_id"] for r in (a, b, c)] == [11, 11, 12]
    assert [(r.meta["case_edit"], r.meta["case_edits"]) for r in (a, b, c)] == [(0, 2), (1, 2), (0, 1)]
    assert a.portability == [] and "case" not in a.meta
    assert b.portability == [(q, " Uma Stell") for q in MQUAKE[0]["questions"]]
    assert b.meta["case"]["answer"] == "Rolf Enn" and b.meta["case"]["orig"] == MQUAKE[0]["orig"]
    assert c.portability == [("Who created Glimmerball?", " Ada Voss")] and c.rephrases == []


def test_jsonl_round_trip_and_detection(tmp_path):
    reqs = [EditRequest(prompt="The flag of Arvel is", target="green", subject="Arvel", rephrases=["Arvel's flag:"],
                        locality=[("The sky is", "blue")], portability=[("Arvel's flag matches", "grass")],
                        meta={"n": 1}),
            EditRequest(prompt="Ono lives in", target="Tarn")]
    path = tmp_path / "reqs.jsonl"
    jsonl.write(reqs, path)
    assert load_requests(path) == reqs
    other = tmp_path / "reqs.txt"  # detected from the first line, not the name
    other.write_text("\n" + path.read_text() + "\n\n")
    assert load_requests(other) == reqs
    assert load_requests(other, "jsonl") == reqs


@pytest.mark.parametrize("fmt", list(FIXTURES))
def test_format_detection(tmp_path, fmt):
    path = write(tmp_path, "data.json", FIXTURES[fmt])
    found = load_requests(path)
    assert found == load_requests(path, fmt)
    assert {r.meta["format"] for r in found} == {fmt}


@pytest.mark.parametrize("data, fmt", [(ROME, "counterfact_rome"), (EASYEDIT, "counterfact_easyedit")])
def test_counterfact_alias_picks_the_shape(tmp_path, data, fmt):
    assert load_requests(write(tmp_path, "cf.json", data), "counterfact")[0].meta["format"] == fmt


def test_undetectable_and_unknown_formats_list_the_formats(tmp_path):
    path = write(tmp_path, "odd.json", [{"question": "q", "reply": "r"}])
    with pytest.raises(DatasetError, match=r"odd\.json: record 0: .*\['question', 'reply'\]") as info:
        load_requests(path)
    assert all(f in str(info.value) for f in FORMATS)
    with pytest.raises(DatasetError, match="CounterFact"):
        load_requests(write(tmp_path, "z.json", ZSRE), "counterfact")
    with pytest.raises(ValueError, match="zsre, counterfact, .*jsonl"):
        load_requests(path, "squad")


def _with(records: list, i: int, **change) -> list:
    out = json.loads(json.dumps(records))
    out[i].update(change)
    return out


_NO_SUBJECT = json.loads(json.dumps(ROME))
del _NO_SUBJECT[0]["requested_rewrite"]["subject"]
_BAD_TRUE = json.loads(json.dumps(MQUAKE))
_BAD_TRUE[0]["requested_rewrite"][1]["target_true"] = "Rolf Enn"


@pytest.mark.parametrize(
    "name, text, fmt, pattern",
    [
        ("zsre.json", '[{"src": "a",\n "alt": }]', None, r"zsre\.json: invalid JSON at line 2, column 9"),
        ("zsre.json", {"data": ZSRE}, "zsre", r"zsre\.json: expected a JSON list .* got object"),
        ("zsre.json", [ZSRE[0], ["not", "a", "dict"]], "zsre",
         r"zsre\.json: record 1: expected a JSON object, got list"),
        ("zsre.json", _with(ZSRE, 1, alt=["Serrow"]), "zsre",
         r"zsre\.json: record 1: field 'alt': expected a string, got list"),
        ("zsre.json", [ZSRE[0], {k: v for k, v in ZSRE[1].items() if k != "src"}], "zsre",
         r"zsre\.json: record 1: field 'src': missing"),
        ("zsre.json", _with(ZSRE, 0, src="   "), "zsre",
         r"zsre\.json: record 0: field 'src': EditRequest\.prompt must not be empty"),
        ("zsre.json", _with(ZSRE, 0, rephrase=["ok", 3]), "zsre",
         r"record 0: field 'rephrase\[1\]': expected a string, got integer"),
        ("zsre.json", _with(ZSRE, 0, loc_ans=None), "zsre", r"record 0: field 'loc_ans': expected a string, got null"),
        ("zsre.json", _with(ZSRE, 1, portability={"New Question": "q", "New Answer": 5}), "zsre",
         r"record 1: field 'portability.New Answer': expected an answer string"),
        ("cf.json", _NO_SUBJECT, "counterfact_rome",
         r"cf\.json: record 0: field 'requested_rewrite\.subject': missing"),
        ("cf.json", [{**ROME[0], "requested_rewrite": {**ROME[0]["requested_rewrite"], "prompt": "No slot in"}}],
         None, r"record 0: field 'requested_rewrite\.prompt': expected a '\{\}' template"),
        ("cf.json", _with(EASYEDIT, 1, locality_ground_truth=["flute"]), "counterfact_easyedit",
         r"record 1: field 'locality_ground_truth': has 1 answers for 2 prompts"),
        ("mq.json", _BAD_TRUE, "mquake", r"mq\.json: record 0: field 'requested_rewrite\[1\]\.target_true': "
                                         r"expected an object, got string"),
        ("mq.json", _with(MQUAKE, 1, requested_rewrite=[]), "mquake",
         r"record 1: field 'requested_rewrite': expected a non-empty list"),
        ("t.json", _with(TEMPORAL, 0, ood_rephrase=None), "wise_temporal",
         r"t\.json: record 0: field 'ood_rephrase': expected a string or a list of strings, got null"),
        ("r.jsonl", '{"prompt": "a", "target": "b"}\n{"prompt": "a", "target": }\n', None,
         r"r\.jsonl: line 2: invalid JSON at column 27"),
        ("r.jsonl", '{"prompt": "a", "target": "b"}\n\n{"prompt": "a", "target": "b", "colour": 1}\n', None,
         r"r\.jsonl: line 3: field 'colour': unknown field"),
        ("r.jsonl", '{"prompt": "a", "target": "b", "locality": [["q", ""]]}\n', "jsonl",
         r"r\.jsonl: line 1: field 'locality': EditRequest\.locality\[0\]\.answer must not be empty"),
        ("r.jsonl", '["prompt", "a"]\n', "jsonl", r"r\.jsonl: line 1: expected a JSON object, got list"),
    ],
)
def test_errors_name_file_record_and_field(tmp_path, name, text, fmt, pattern):
    with pytest.raises(DatasetError, match=pattern) as info:
        load_requests(write(tmp_path, name, text), fmt)
    assert isinstance(info.value, ValueError)


def test_subject_missing_from_prompt_is_kept_in_meta(tmp_path):
    (r, _) = load_requests(write(tmp_path, "z.json", _with(ZSRE, 0, subject="Someone Else")), "zsre")
    assert r.subject is None and r.meta["subject"] == "Someone Else"


def test_limit_reads_only_the_first_records(tmp_path):
    assert len(load_requests(write(tmp_path, "z.json", ZSRE), limit=1)) == 1
    assert load_requests(write(tmp_path, "z.json", ZSRE), limit=0) == []
    assert len(load_requests(write(tmp_path, "mq.json", MQUAKE), limit=1)) == 2  # one case, two edits
    lines = '{"prompt": "a", "target": "b"}\n{"prompt": "c", "target": "d"}\nnot json at all\n'
    assert [r.target for r in load_requests(write(tmp_path, "r.jsonl", lines), limit=2)] == [" b", " d"]
    with pytest.raises(ValueError, match="limit"):
        load_requests(write(tmp_path, "z.json", ZSRE), limit=-1)


REAL = {
    "zsre_mend_train-1k.json": "zsre", "samples/zsre_mend_eval_sample5.json": "zsre",
    "easyedit_counterfact-edit.json": "counterfact_easyedit", "easyedit_counterfact-val.json": "counterfact_easyedit",
    "samples/rome_counterfact_sample5.json": "counterfact_rome",
    "wise/hallucination-edit.json": "wise_hallucination", "wise/hallucination-train.json": "wise_hallucination",
    "wise/temporal-edit.json": "wise_temporal", "wise/temporal-train.json": "wise_temporal",
    "akew_MQuAKE-CF.json": "mquake",
}


@pytest.mark.slow
def test_real_files_load():
    root = Path(__file__).parents[1].parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    for name, fmt in REAL.items():
        path = root / name
        if not path.exists():
            continue
        reqs = load_requests(path, fmt)
        assert len(reqs) > 0, name
        assert {r.meta["format"] for r in reqs} == {fmt}
        assert load_requests(path, limit=3)[0] == reqs[0]  # detection agrees with the named format


def test_per_format_read_functions(tmp_path):
    from editbank.data import counterfact, mquake, wise, zsre

    readers = {"zsre": zsre.read, "counterfact_rome": counterfact.read_rome,
               "counterfact_easyedit": counterfact.read_easyedit, "wise_hallucination": wise.read_hallucination,
               "wise_temporal": wise.read_temporal, "mquake": mquake.read}
    for fmt, read in readers.items():
        path = write(tmp_path, f"{fmt}.json", FIXTURES[fmt])
        assert read(path) == load_requests(path, fmt)
        assert read(path, limit=1) == load_requests(path, fmt, limit=1)
