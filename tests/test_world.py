"""The built-in world: generator, spec validation, cache, saved model/tokenizer, edit requests."""

from __future__ import annotations

import json

import pytest
import torch

from editbank.requests import EditRequest
from editbank.world import World, builtin_spec, parse_spec
from editbank.world.cache import MARKER, world_dir
from editbank.world.core import queries_for
from editbank.world.generate import entities_of, generate_facts


@pytest.fixture(scope="module")
def world() -> World:
    return World.build("small", progress=False)


def _tiny_spec(**over):
    spec = {
        "name": "tiny",
        "seed": 3,
        "entities": ["Arvel", "Bosk", "Cirra", "Dovan", "Eskel", "Fenna"],
        "relations": [
            {
                "name": "capital",
                "templates": ["The capital of {subject} is", "{subject}'s capital is"],
                "reserved_templates": ["What is the capital of {subject}? It is"],
                "objects": ["Dunmore", "Port Alvera", "Velarna"],
            },
            {
                "name": "colour",
                "templates": ["The flag of {subject} is", "{subject} flies a flag coloured"],
                "reserved_templates": ["What colour is the flag of {subject}? It is"],
                "objects": ["red", "deep blue", "gold"],
            },
        ],
        "model": {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64},
        "train": {"steps": 20, "batch_size": 8, "warmup": 2},
        "tokenizer": {"vocab_size": 300},
    }
    spec.update(over)
    return spec


# ---------------------------------------------------------------------------------- generator


def test_generator_is_deterministic():
    spec = parse_spec(builtin_spec("default"))
    e1, e2 = entities_of(spec), entities_of(parse_spec(builtin_spec("default")))
    assert e1 == e2 and len(e1) == len(set(e1)) == 100
    assert generate_facts(spec, e1) == generate_facts(spec, e2)
    other = parse_spec({**builtin_spec("default"), "seed": 1})
    assert entities_of(other) != e1
    assert spec.spec_hash() == parse_spec(builtin_spec("default")).spec_hash() != other.spec_hash()


def test_builtin_worlds_have_the_promised_shape():
    for size in ("small", "default", "large"):
        spec = parse_spec(builtin_spec(size))
        assert len(spec.relations) >= 6
        for rel in spec.relations:
            assert len(rel.templates) >= 4 and len(rel.reserved_templates) >= 1
            assert not set(rel.templates) & set(rel.reserved_templates)
            assert any(" " in o for o in rel.objects)  # some multi-word objects
        facts = generate_facts(spec, entities_of(spec))
        assert len({(f.subject, f.relation) for f in facts}) == len(facts)
        assert max(sum(f.subject == s for f in facts) for s in entities_of(spec)) > 1
        for prompt, answer in queries_for(spec, facts, "train") + queries_for(spec, facts, "reserved"):
            assert prompt == prompt.rstrip() and answer.startswith(" ") and not answer.startswith("  ")


def test_explicit_facts_define_entities_and_extend_object_pools():
    spec = parse_spec(
        {
            "name": "x",
            "relations": [{"name": "capital", "templates": ["The capital of {} is"], "objects": ["Dunmore"]}],
            "facts": [["Arvel", "capital", "Dunmore"], ["Bosk", "capital", "Velarna"]],
        }
    )
    assert entities_of(spec) == ["Arvel", "Bosk"]
    assert spec.relations[0].templates == ["The capital of {subject} is"]
    assert spec.relations[0].objects == ["Dunmore", "Velarna"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"relations": []}, "relations"),
        ({"colour": 1}, "colour"),
        ({"name": "a/b"}, "name"),
        ({"seed": "x"}, "seed"),
        ({"n_entities": -1, "entities": None}, "n_entities"),
        ({"entities": None}, "entities"),
        ({"model": {"hidden": 30, "heads": 4}}, "model.heads"),
        ({"model": {"depth": 2}}, "model.depth"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"tokenizer": {"vocab_size": 10}}, "tokenizer.vocab_size"),
        ({"facts": [["Arvel", "anthem", "x"]]}, "facts[0][1]"),
        ({"facts": [["Zed", "capital", "Dunmore"]]}, "facts[0][0]"),
        ({"facts": [["Arvel", "capital"]]}, "facts[0]"),
        ({"facts_per_subject": 9}, "facts_per_subject"),
    ],
)
def test_spec_validation_names_the_bad_field(change, field):
    with pytest.raises(ValueError, match=f"'{field}'".replace("[", r"\[").replace("]", r"\]")):
        parse_spec(_tiny_spec(**change))


@pytest.mark.parametrize(
    "relation_change, field",
    [
        ({"templates": ["The capital is"]}, "relations[0].templates[0]"),
        ({"templates": None}, "relations[0].templates"),
        ({"objects": ["Dunmore"]}, "relations[0].objects"),
        ({"reserved_templates": ["The capital of {subject} is"]}, "relations[0].reserved_templates"),
        ({"name": ""}, "relations[0].name"),
    ],
)
def test_relation_validation_names_the_bad_field(relation_change, field):
    spec = _tiny_spec()
    spec["relations"][0].update(relation_change)
    with pytest.raises(ValueError, match=f"'{field}'".replace("[", r"\[").replace("]", r"\]")):
        parse_spec(spec)


def test_unknown_size_and_missing_file_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown world size"):
        World.build("huge", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not found"):
        World.from_spec(tmp_path / "nope.json", cache_dir=tmp_path)


# ---------------------------------------------------------------------------------- building


def test_spec_file_build_is_quiet_atomic_and_cached(tmp_path, capfd):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(_tiny_spec()))
    spec = parse_spec(path)
    final = world_dir("tiny", spec.spec_hash(), tmp_path)
    final.mkdir(parents=True)
    (final / "junk").write_text("a crashed build left this")  # no marker: must be rebuilt
    w = World.from_spec(path, cache_dir=tmp_path, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert w.path == final and (final / MARKER).is_file() and not (final / "junk").exists()
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no temp dirs left
    assert len(w.facts) == 12 and {f.subject for f in w.facts} == set(_tiny_spec()["entities"])
    mtime = (final / "model.safetensors").stat().st_mtime_ns
    again = World.build(_tiny_spec(), cache_dir=tmp_path)
    assert again.path == final and (final / "model.safetensors").stat().st_mtime_ns == mtime
    reseeded = World.build(path, cache_dir=tmp_path, seed=4, progress=False)
    assert reseeded.path != final and reseeded.spec.seed == 4


def test_build_does_not_depend_on_the_callers_thread_count(tmp_path):
    """Kernels reduce in a thread-count-dependent order; worlds train at one thread so every machine gets one model."""
    spec = builtin_spec("small")
    spec["train"] = {**spec["train"], "steps": 30}  # enough to differ at 2 threads (checked: the pin removed, it does)
    before = torch.get_num_threads()
    weights = []
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            w = World.build(spec, cache_dir=tmp_path / str(n), progress=False)
            assert torch.get_num_threads() == n  # the caller's setting is given back
            assert w.info["threads"] == 1
            weights.append((w.path / "model.safetensors").read_bytes())
    finally:
        torch.set_num_threads(before)
    assert weights[0] == weights[1]


def test_cache_root_precedence(monkeypatch, tmp_path):
    from editbank.world.cache import cache_root

    monkeypatch.delenv("EDITBANK_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "editbank"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "editbank"
    monkeypatch.setenv("EDITBANK_CACHE", str(tmp_path / "eb"))
    assert cache_root() == tmp_path / "eb"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_incomplete_world_does_not_load(tmp_path):
    (tmp_path / "world.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        World.load(tmp_path)


def test_cached_build_returns_immediately(world, monkeypatch):
    import editbank.world.train as train

    def never(*args, **kwargs):
        raise AssertionError("a cached world was trained again")

    monkeypatch.setattr(train, "train_model", never)  # an event, not a timing: the build must not train
    again = World.build("small", progress=False)
    assert again.path == world.path


def test_load_round_trip(world):
    w = World.load(world.path)
    assert w.facts == world.facts and w.entities == world.entities
    assert w.queries("train") == world.queries("train") and w.queries("reserved") == world.queries("reserved")
    assert w.spec.spec_hash() == world.path.name.rsplit("-", 1)[1]
    data = json.loads((world.path / "world.json").read_text())
    assert {"spec", "facts", "templates", "split"} <= set(data)
    with pytest.raises(ValueError, match="split"):
        world.queries("test")


# ---------------------------------------------------------------------------------- saved model


def test_auto_classes_load_the_world(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editbank.tokens import prompt_ids, target_ids

    tok = AutoTokenizer.from_pretrained(world.path)
    model = AutoModelForCausalLM.from_pretrained(world.path)
    assert model.config.model_type == "llama" and model.dtype.is_floating_point
    assert model.config.max_position_embeddings >= 64
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(tok, f"{name}_token_id") is not None
    prompt, answer = world.queries("train")[0]
    assert prompt_ids(tok, prompt)[0] == tok.bos_token_id
    assert target_ids(tok, answer)[0] != tok.bos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    answers = {a for _, a in world.queries("train")}
    assert any(len(target_ids(tok, a)) > 1 for a in answers)  # multi-token answers exist


def test_small_model_knows_its_facts(world):
    from editbank.world.accuracy import accuracy, exact_match_flags, generate_flags

    model, tok = world.load_model(), world.load_tokenizer()
    pairs = world.queries("train")
    flags = generate_flags(model, tok, pairs)
    assert accuracy(flags) >= 0.95
    assert flags == exact_match_flags(model, tok, pairs)  # teacher forcing == greedy generation
    assert accuracy(generate_flags(model, tok, world.queries("reserved"))) > 0.5


# ---------------------------------------------------------------------------------- edit requests


def test_edit_requests_are_counterfactual_and_complete(world):
    reqs = world.edit_requests(n=20, seed=0)
    assert len(reqs) == 20 and all(isinstance(r, EditRequest) for r in reqs)
    assert len({r.subject for r in reqs}) == 20  # distinct subjects while there are enough
    train = dict(world.queries("train"))
    for r in reqs:
        rel = world.relation(r.meta["relation"])
        assert r.subject in r.prompt and r.prompt in train
        assert train[r.prompt] == " " + r.meta["true_object"] != r.target
        assert r.target.strip() in rel.objects
        reserved = {rel.fill(t, r.subject) for t in rel.reserved_templates}
        assert reserved <= set(r.rephrases) and r.prompt not in r.rephrases
        assert 2 <= len(r.locality) <= 3
        for prompt, answer in r.locality:
            assert train[prompt] == answer and r.subject not in prompt
            assert all(q.subject not in prompt for q in reqs)
    assert [r.to_dict() for r in world.edit_requests(n=20, seed=0)] == [r.to_dict() for r in reqs]
    assert [r.prompt for r in world.edit_requests(n=20, seed=1)] != [r.prompt for r in reqs]


def test_edit_requests_cover_all_editable_facts_keep_locality_and_refuse_more(world):
    n = len(world.editable_facts)
    assert 0 < n < len(world.facts) and len(world.control_subjects) >= 2
    reqs = world.edit_requests(n=n, seed=2)
    assert len({(r.subject, r.meta["relation"]) for r in reqs}) == n
    assert all(r.locality for r in reqs), "control subjects keep locality probes available"
    control = set(world.control_subjects)
    assert all(any(s in p for s in control) for r in reqs for p, _ in r.locality)
    with pytest.raises(ValueError, match="editable facts"):
        world.edit_requests(n=n + 1)
