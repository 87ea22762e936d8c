"""World specs: the JSON-able description a world is built from, validated and hashed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Bumped whenever generation, tokenization or training changes what a spec builds (invalidates caches).
FORMAT_VERSION = 1
# worlds train at this many torch threads (deterministic weights); part of the spec hash, so worlds built before
# it existed (trained at a speed-picked count) are rebuilt rather than reused
BUILD_THREADS = 1

SUBJECT = "{subject}"


@dataclass(frozen=True)
class Fact:
    """One fact of the world: `subject` `relation` `object` (object without the leading space)."""

    subject: str
    relation: str
    object: str

    def to_list(self) -> list[str]:
        return [self.subject, self.relation, self.object]


@dataclass
class Relation:
    """A relation: training templates, reserved (evaluation-only) templates and its object pool."""

    name: str
    templates: list[str]
    reserved_templates: list[str]
    objects: list[str]

    def fill(self, template: str, subject: str) -> str:
        """The prompt for `subject` asked with `template`."""
        return template.replace(SUBJECT, subject)


@dataclass
class ModelSpec:
    """Llama architecture of the world model."""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int | None = None
    max_position_embeddings: int = 128
    tie_embeddings: bool = False


@dataclass
class TrainSpec:
    """Optimisation settings of the world model."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    sequence_loss: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0
    stop_at: float = 1.0


@dataclass
class TokenizerSpec:
    """Byte-level BPE settings."""

    vocab_size: int = 1024


@dataclass
class WorldSpec:
    """Everything a world is built from; `facts` is generated from `seed` when not given."""

    name: str
    seed: int = 0
    relations: list[Relation] = field(default_factory=list)
    entities: list[str] | None = None
    n_entities: int | None = None
    facts: list[Fact] | None = None
    facts_per_subject: int | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # free (prompt, answer) training pairs (datasets)

    def relation(self, name: str) -> Relation:
        for r in self.relations:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.facts is not None:
            d["facts"] = [f.to_list() for f in self.facts]
        if self.pairs:
            d["pairs"] = [list(p) for p in self.pairs]
        else:
            del d["pairs"]  # absent, so specs without pairs keep their hash
        return d

    def spec_hash(self) -> str:
        """Short stable hash of the normalised spec (and the world format version and build thread count)."""
        blob = json.dumps({"v": FORMAT_VERSION, "threads": BUILD_THREADS, "spec": self.to_dict()}, sort_keys=True,
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


_TOP_KEYS = {f.name for f in dataclasses.fields(WorldSpec)}


def _err(where: str, msg: str) -> ValueError:
    return ValueError(f"world spec field {where!r}: {msg}")


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _err(where, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _text_list(where: str, value: Any, min_len: int = 1) -> list[str]:
    if not isinstance(value, (list, tuple)) or isinstance(value, str):
        raise _err(where, f"must be a list of strings, got {type(value).__name__}")
    out = [_text(f"{where}[{i}]", v) for i, v in enumerate(value)]
    if len(out) < min_len:
        raise _err(where, f"needs at least {min_len} item(s), got {len(out)}")
    if len(set(out)) != len(out):
        dup = sorted({v for v in out if out.count(v) > 1})
        raise _err(where, f"has duplicates: {dup[:5]}")
    return out


def _template(where: str, value: Any) -> str:
    t = _text(where, value).replace("{}", SUBJECT)
    if t.count(SUBJECT) != 1:
        raise _err(where, f"must contain {SUBJECT} exactly once, got {t!r}")
    return t


def _section(where: str, cls: type, value: Any) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise _err(where, f"must be an object, got {type(value).__name__}")
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise _err(f"{where}.{unknown[0]}", f"unknown key (known: {sorted(fields)})")
    out = {}
    for k, v in value.items():
        kind = fields[k]
        if v is None and "None" in kind:
            out[k] = None
        elif kind == "bool" and isinstance(v, bool):
            out[k] = v
        elif kind.startswith("int") and isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[k] = v
        elif kind == "float" and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
            out[k] = float(v)
        else:
            raise _err(f"{where}.{k}", f"must be a non-negative {kind.split(' ')[0]}, got {v!r}")
    return cls(**out)


def _relation(i: int, value: Any, need_objects: bool) -> Relation:
    where = f"relations[{i}]"
    if not isinstance(value, dict):
        raise _err(where, "must be an object with name/templates/reserved_templates/objects")
    unknown = sorted(set(value) - {"name", "templates", "reserved_templates", "objects"})
    if unknown:
        raise _err(f"{where}.{unknown[0]}", "unknown key")
    name = _text(f"{where}.name", value.get("name"))
    tpl = value.get("templates")
    if tpl is None:
        raise _err(f"{where}.templates", "is required")
    templates = [_template(f"{where}.templates[{j}]", t) for j, t in enumerate(_text_list("t", tpl))]
    reserved = [
        _template(f"{where}.reserved_templates[{j}]", t)
        for j, t in enumerate(value.get("reserved_templates") or [])
    ]
    if set(templates) & set(reserved):
        raise _err(f"{where}.reserved_templates", "must not repeat a training template")
    objects = value.get("objects")
    if objects is None and need_objects:
        raise _err(f"{where}.objects", "is required when facts are generated")
    objects = _text_list(f"{where}.objects", objects or [], min_len=2 if need_objects else 0)
    return Relation(name, templates, reserved, objects)


def parse_spec(spec: dict[str, Any] | str | Path | WorldSpec) -> WorldSpec:
    """Validate a spec dict (or JSON file path) into a WorldSpec; raises ValueError naming the bad field."""
    if isinstance(spec, WorldSpec):
        return parse_spec(spec.to_dict())
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"world spec file not found: {path}")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"world spec file {path} is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"a world spec must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _TOP_KEYS)
    if unknown:
        raise _err(unknown[0], f"unknown key (known: {sorted(_TOP_KEYS)})")
    name = _text("name", spec.get("name"))
    if any(c in name for c in "/\\:") or name.startswith("."):
        raise _err("name", f"must be usable as a directory name, got {name!r}")
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _err("seed", f"must be an integer, got {seed!r}")
    raw_facts = spec.get("facts")
    pairs = _pairs(spec.get("pairs"))
    rels_raw = spec.get("relations", [] if pairs else None)
    if not isinstance(rels_raw, list) or not (rels_raw or pairs):
        raise _err("relations", "must be a non-empty list (or give 'pairs')")
    relations = [_relation(i, r, need_objects=raw_facts is None) for i, r in enumerate(rels_raw)]
    names = [r.name for r in relations]
    if len(set(names)) != len(names):
        raise _err("relations", f"relation names must be unique, got {names}")
    entities = spec.get("entities")
    n_entities = spec.get("n_entities")
    if entities is not None:
        entities = _text_list("entities", entities)
        if n_entities is not None and n_entities != len(entities):
            raise _err("n_entities", "conflicts with the length of 'entities'")
        n_entities = None
    elif n_entities is not None:
        if not isinstance(n_entities, int) or isinstance(n_entities, bool) or n_entities < 1:
            raise _err("n_entities", f"must be a positive integer, got {n_entities!r}")
    elif raw_facts is None and relations:
        raise _err("entities", "give 'entities', 'n_entities' or explicit 'facts'")
    fps = spec.get("facts_per_subject")
    if fps is not None:
        if not isinstance(fps, int) or isinstance(fps, bool) or not 1 <= fps <= len(relations):
            raise _err("facts_per_subject", f"must be an integer in 1..{len(relations)}, got {fps!r}")
        if raw_facts is not None:
            raise _err("facts_per_subject", "only applies to generated facts")
    facts = None
    if raw_facts is not None:
        facts = _facts(raw_facts, relations, entities)
    out = WorldSpec(
        name=name,
        seed=seed,
        relations=relations,
        entities=entities,
        n_entities=n_entities,
        facts=facts,
        facts_per_subject=fps,
        model=_section("model", ModelSpec, spec.get("model")),
        train=_section("train", TrainSpec, spec.get("train")),
        tokenizer=_section("tokenizer", TokenizerSpec, spec.get("tokenizer")),
        pairs=pairs,
    )
    _check_sections(out)
    return out


def _pairs(raw: Any) -> list[tuple[str, str]]:
    """[[prompt, answer], ...]: trained as they are (answers normalised to one leading space); no duplicates."""
    from editbank.requests import normalize_target

    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise _err("pairs", "must be a non-empty list of [prompt, answer]")
    out, seen = [], set()
    for i, item in enumerate(raw):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise _err(f"pairs[{i}]", "must be [prompt, answer]")
        prompt, answer = _text(f"pairs[{i}][0]", item[0]).rstrip(), _text(f"pairs[{i}][1]", item[1])
        if prompt in seen:
            raise _err(f"pairs[{i}]", f"duplicate prompt {prompt!r}")
        seen.add(prompt)
        out.append((prompt, normalize_target(answer)))
    return out


def _facts(raw: Any, relations: list[Relation], entities: list[str] | None) -> list[Fact]:
    if not isinstance(raw, list) or not raw:
        raise _err("facts", "must be a non-empty list of [subject, relation, object]")
    rels = {r.name: r for r in relations}
    known = set(entities) if entities is not None else None
    out: list[Fact] = []
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(raw):
        if isinstance(item, dict):
            item = [item.get("subject"), item.get("relation"), item.get("object")]
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise _err(f"facts[{i}]", "must be [subject, relation, object]")
        s = _text(f"facts[{i}][0]", item[0])
        r = _text(f"facts[{i}][1]", item[1])
        o = _text(f"facts[{i}][2]", item[2])
        if r not in rels:
            raise _err(f"facts[{i}][1]", f"unknown relation {r!r} (known: {sorted(rels)})")
        if known is not None and s not in known:
            raise _err(f"facts[{i}][0]", f"subject {s!r} is not in 'entities'")
        if (s, r) in seen:
            raise _err(f"facts[{i}]", f"duplicate fact for ({s!r}, {r!r})")
        seen.add((s, r))
        if o not in rels[r].objects:
            rels[r].objects.append(o)
        out.append(Fact(s, r, o))
    for r in relations:
        if len(r.objects) < 2:
            where = f"relations[{relations.index(r)}].objects"
            raise _err(where, "needs >= 2 objects (an edit needs another object to switch to)")
    return out


def _check_sections(spec: WorldSpec) -> None:
    m, t = spec.model, spec.train
    if m.layers < 1:
        raise _err("model.layers", "must be >= 1")
    if m.heads < 1 or m.hidden % m.heads:
        raise _err("model.heads", f"must divide model.hidden ({m.hidden})")
    if m.kv_heads is not None and (m.kv_heads < 1 or m.heads % m.kv_heads):
        raise _err("model.kv_heads", f"must divide model.heads ({m.heads})")
    if m.max_position_embeddings < 16:
        raise _err("model.max_position_embeddings", "must be >= 16")
    if t.steps < 1 or t.batch_size < 1:
        raise _err("train.steps" if t.steps < 1 else "train.batch_size", "must be >= 1")
    if not 0 < t.lr < 1:
        raise _err("train.lr", "must be in (0, 1)")
    if not 0 < t.stop_at <= 1:
        raise _err("train.stop_at", "must be in (0, 1]")
    if spec.tokenizer.vocab_size < 300:
        raise _err("tokenizer.vocab_size", "must be >= 300 (256 bytes + specials + merges)")
