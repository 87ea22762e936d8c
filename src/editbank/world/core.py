"""The `World` object: build (cached), load, queries and counterfactual edit requests."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editbank.requests import EditRequest, normalize_target

from .cache import MARKER, is_complete, publish, sweep_stale_builds, world_dir
from .generate import entities_of, generate_facts
from .spec import BUILD_THREADS, FORMAT_VERSION, Fact, Relation, WorldSpec, parse_spec
from .specs import SIZES, builtin_spec

WORLD_FILE = "world.json"
# the share of a world's subjects whose facts are its calibration part (at 10% the default world's corpus was 50
# prompts and SoLA's alpha, calibrated on 1,225 pairs, misrouted an undone edit's prompt to a kept edit)
CALIBRATION_SHARE = 0.2
SPLITS = ("train", "reserved")

Pair = tuple[str, str]


@dataclass
class World:
    """A built fact world: its spec, entities, facts and the directory holding model + tokenizer."""

    path: Path
    spec: WorldSpec
    entities: list[str]
    facts: list[Fact]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The spec's name ("small", "default", ...)."""
        return self.spec.name

    @property
    def relations(self) -> list[Relation]:
        """The world's relations with their templates and object pools."""
        return self.spec.relations

    def relation(self, name: str) -> Relation:
        """The relation called `name`."""
        return self.spec.relation(name)

    @property
    def control_subjects(self) -> list[str]:
        """Subjects (about 10%, at least 2) never offered for editing: locality probes stay available
        even when every editable fact is edited."""
        subjects = sorted({f.subject for f in self.facts})
        k = min(len(subjects) - 1, max(2, len(subjects) // 10))
        return sorted(random.Random(f"control-{self.spec.seed}").sample(subjects, max(k, 0)))

    @property
    def calibration_subjects(self) -> list[str]:
        """Subjects (about 20%, at least 2, none a control subject) whose facts are the world's calibration part:
        they feed `fact_prompts()` (the corpus methods calibrate on and take statistics from) and are never edited
        nor asked as a rephrase or locality probe, so nothing a method learns from is evaluation data."""
        control = set(self.control_subjects)
        subjects = sorted({f.subject for f in self.facts} - control)
        k = min(len(subjects) - 1, max(2, round((len(subjects) + len(control)) * CALIBRATION_SHARE)))
        return sorted(random.Random(f"calibration-{self.spec.seed}").sample(subjects, max(k, 0)))

    @property
    def calibration_facts(self) -> list[Fact]:
        """The facts of the calibration subjects."""
        calibration = set(self.calibration_subjects)
        return [f for f in self.facts if f.subject in calibration]

    @property
    def evaluation_facts(self) -> list[Fact]:
        """The facts edits and probes are drawn from: every fact but the calibration part's."""
        calibration = set(self.calibration_subjects)
        return [f for f in self.facts if f.subject not in calibration]

    @property
    def editable_facts(self) -> list[Fact]:
        """The facts `edit_requests` draws from: the evaluation part's, less the control subjects'."""
        control = set(self.control_subjects)
        return [f for f in self.evaluation_facts if f.subject not in control]

    # ------------------------------------------------------------------ building and loading
    @classmethod
    def build(
        cls,
        size_or_spec: str | dict[str, Any] | os.PathLike = "small",
        *,
        cache_dir: str | os.PathLike | None = None,
        force: bool = False,
        progress: bool = True,
        seed: int | None = None,
    ) -> World:
        """Build (or reuse from the cache) the world for a size name, spec dict or spec JSON path."""
        spec = _resolve_spec(size_or_spec)
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise ValueError(f"seed must be an integer, got {seed!r}")
            spec.seed = seed
        final = world_dir(spec.name, spec.spec_hash(), cache_dir)
        if is_complete(final) and not force:
            return cls.load(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_builds(final.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache may be shared
        try:
            _build_into(tmp, spec, progress)
            publish(tmp, final, force)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.load(final)

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | str | os.PathLike, **kwargs: Any) -> World:
        """Build (or reuse) the world described by a spec dict or JSON file; kwargs as for `build`."""
        return cls.build(parse_spec(spec).to_dict(), **kwargs)

    @classmethod
    def at(cls, path: str | os.PathLike) -> World | None:
        """The world built in `path`, or None if `path` is not a world's directory (a plain model, say)."""
        return cls.load(path) if (Path(path) / WORLD_FILE).is_file() else None

    @classmethod
    def load(cls, path: str | os.PathLike) -> World:
        """Reopen a built world from its directory."""
        path = Path(path)
        meta_file = path / WORLD_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a built world (no {WORLD_FILE})")
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is an incomplete world build (no {MARKER})")
        data = json.loads(meta_file.read_text(encoding="utf-8"))
        spec = parse_spec(data["spec"])
        facts = [Fact(*f) for f in data["facts"]]
        return cls(path, spec, list(data["entities"]), facts, dict(data.get("build", {})))

    def load_tokenizer(self):
        """The world's tokenizer (`AutoTokenizer.from_pretrained(self.path)`)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    def load_model(self):
        """The world's model in eval mode (`AutoModelForCausalLM.from_pretrained(self.path)`)."""
        from transformers import AutoModelForCausalLM

        with _quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(self.path).eval()

    # ------------------------------------------------------------------ queries and edits
    def queries(self, split: str = "train") -> list[Pair]:
        """(prompt, answer) pairs: 'train' = every fact x training template, 'reserved' = x reserved ones."""
        return queries_for(self.spec, self.facts, split)

    def fact_prompts(self, seed: int = 0) -> list[str]:
        """The calibration corpus: one prompt per fact of the calibration part (a training template chosen by
        `seed`), prompts about distinct facts that share no prompt with any edit request's rephrases or probes.
        `Editor.open(world)` hands it to the method (SoLA's alpha and whitening, WISE's prefixes and negatives,
        the locate methods' key statistics). A dataset world (pairs, no facts) has none: its corpus comes from
        records held out of the run (`editbank.leaks.calibration_split`)."""
        rng = random.Random(seed)
        out = []
        for fact in self.calibration_facts:
            rel = self.relation(fact.relation)
            out.append(rel.fill(rng.choice(rel.templates), fact.subject))
        return out

    def calibration_texts(self) -> list[str]:
        """Every training-template prompt of the calibration part's facts: the texts the locate methods' key
        statistics are taken from (`Editor.open(world)` hands them over as `stats_corpus`); none is a prompt
        `edit_requests` edits, rephrases or probes."""
        return [p for group in self.calibration_paraphrases() for p in group]

    def calibration_paraphrases(self) -> list[list[str]]:
        """The calibration part's facts, each as its training-template prompts: groups of paraphrases of one fact
        (`Editor.open(world)` hands them over as `paraphrases`; SoLA learns from them which directions of a key
        are wording and which are the fact). Reserved templates are never used: they are the rephrases' wording."""
        out = []
        for fact in self.calibration_facts:
            rel = self.relation(fact.relation)
            out.append([rel.fill(t, fact.subject) for t in rel.templates])
        return out

    def calibration_paraphrase_subjects(self) -> list[str]:
        """The subject of each group of `calibration_paraphrases()` (SoLA's subject gate calibrates on the groups of
        one subject: prompts that name a subject and ask another of its facts)."""
        return [fact.subject for fact in self.calibration_facts]

    def edit_requests(self, n: int = 20, seed: int = 0) -> list[EditRequest]:
        """`n` counterfactual edits of distinct facts (distinct subjects first), chosen by `seed`."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        editable = self.editable_facts
        if not self.facts:
            raise ValueError(f"world {self.name!r} has no relational facts (it was built from a dataset's pairs): "
                             "take the edit requests from that dataset (editbank.load_requests)")
        if n > len(editable):
            raise ValueError(
                f"asked for {n} edit requests but world {self.name!r} has only {len(editable)} editable facts "
                f"(the facts of {len(self.control_subjects)} control subjects are kept for locality probes and those "
                f"of {len(self.calibration_subjects)} calibration subjects for the methods' calibration corpus)"
            )
        rng = random.Random(seed)
        chosen = _pick_facts(editable, n, rng)
        edited_subjects, edited = {f.subject for f in chosen}, set(chosen)
        evaluation = self.evaluation_facts
        others = [f for f in evaluation if f.subject not in edited_subjects] or [
            f for f in evaluation if f not in edited
        ]
        out = []
        for fact in chosen:
            rel = self.relation(fact.relation)
            template = rng.choice(rel.templates)
            alt = [t for t in rel.templates if t != template]
            rephrases = [rel.fill(t, fact.subject) for t in rel.reserved_templates]
            if alt:
                rephrases.append(rel.fill(rng.choice(alt), fact.subject))
            out.append(
                EditRequest(
                    prompt=rel.fill(template, fact.subject),
                    target=rng.choice([o for o in rel.objects if o != fact.object]),
                    subject=fact.subject,
                    rephrases=rephrases,
                    key=f"{fact.subject}/{fact.relation}",
                    locality=self._locality(fact, others, rng),
                    meta={"relation": fact.relation, "true_object": fact.object},
                )
            )
        return out

    def _locality(self, fact: Fact, others: list[Fact], rng: random.Random) -> list[Pair]:
        """Three probes of other subjects' facts: one of the same relation when possible, two random."""
        pool = [f for f in others if f.subject != fact.subject]
        same = [f for f in pool if f.relation == fact.relation]
        picks = [rng.choice(same)] if same else []
        rest = [f for f in pool if f not in picks]
        picks += rng.sample(rest, min(3 - len(picks), len(rest)))
        probes = []
        for f in picks:
            rel = self.relation(f.relation)
            probes.append((rel.fill(rng.choice(rel.templates), f.subject), normalize_target(f.object)))
        return probes

    def __repr__(self) -> str:
        return f"World(name={self.name!r}, facts={len(self.facts)}, path={str(self.path)!r})"


def queries_for(spec: WorldSpec, facts: list[Fact], split: str) -> list[Pair]:
    """The (prompt, answer) pairs of `facts` asked with the `split` templates of their relation."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    rels = {r.name: r for r in spec.relations}
    out = []
    for f in facts:
        rel = rels[f.relation]
        for t in rel.templates if split == "train" else rel.reserved_templates:
            out.append((rel.fill(t, f.subject), normalize_target(f.object)))
    return out + (list(spec.pairs) if split == "train" else [])


def _resolve_spec(size_or_spec: str | dict[str, Any] | os.PathLike) -> WorldSpec:
    """A size name, spec dict or spec JSON path as a validated WorldSpec."""
    if isinstance(size_or_spec, str):
        if size_or_spec in SIZES:
            return parse_spec(builtin_spec(size_or_spec))
        if not size_or_spec.endswith(".json") and not Path(size_or_spec).exists():
            raise ValueError(f"unknown world size {size_or_spec!r}; choose one of {list(SIZES)} or a spec file")
    return parse_spec(size_or_spec)


def _pick_facts(facts: list[Fact], n: int, rng: random.Random) -> list[Fact]:
    """`n` distinct facts, one per subject per round (subjects and facts in random order)."""
    by_subject: dict[str, list[Fact]] = {}
    for f in facts:
        by_subject.setdefault(f.subject, []).append(f)
    for fs in by_subject.values():
        rng.shuffle(fs)
    subjects = sorted(by_subject)
    rng.shuffle(subjects)
    chosen: list[Fact] = []
    while len(chosen) < n:
        for s in subjects:
            if by_subject[s] and len(chosen) < n:
                chosen.append(by_subject[s].pop())
    return chosen


def _build_into(out: Path, spec: WorldSpec, progress: bool) -> None:
    """Generate, tokenize, train, evaluate and save a world into the empty directory `out`."""
    import torch
    import transformers

    from .accuracy import accuracy, exact_match_flags
    from .model import new_model
    from .tokenizer import save_tokenizer, train_tokenizer
    from .train import train_model

    start = time.perf_counter()
    entities = entities_of(spec)
    facts = generate_facts(spec, entities)
    train_pairs = queries_for(spec, facts, "train")
    reserved_pairs = queries_for(spec, facts, "reserved")
    corpus = [p + a for p, a in train_pairs] + [" " + o for r in spec.relations for o in r.objects]
    corpus += [" " + a.strip() for _, a in spec.pairs]
    tok = train_tokenizer(corpus, spec.tokenizer.vocab_size, spec.model.max_position_embeddings)
    longest = max(len(tok(p + a)["input_ids"]) + 1 for p, a in train_pairs + reserved_pairs)
    if longest > spec.model.max_position_embeddings:
        raise ValueError(
            f"world spec field 'model.max_position_embeddings': {spec.model.max_position_embeddings} is "
            f"shorter than the longest query ({longest} tokens)"
        )
    threads = torch.get_num_threads()
    try:
        # one thread, always: CPU kernels reduce in a thread-count-dependent order, so a world trained at 2 threads
        # differs from one trained at 1 (measured: default world, three builds, three different weights when the
        # count was picked by speed). At 1 thread the built-in worlds are the same on every machine.
        torch.set_num_threads(BUILD_THREADS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = new_model(spec.model, tok)
            result = train_model(model, tok, train_pairs, spec.train, seed=spec.seed, progress=progress)
            train_acc = accuracy(exact_match_flags(model, tok, train_pairs))
            reserved_acc = accuracy(exact_match_flags(model, tok, reserved_pairs))
    finally:
        torch.set_num_threads(threads)
    with _quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
        save_tokenizer(tok, out)
    data = {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "spec_hash": spec.spec_hash(),
        "spec": spec.to_dict(),
        "entities": entities,
        "facts": [f.to_list() for f in facts],
        "templates": {
            "train": {r.name: r.templates for r in spec.relations},
            "reserved": {r.name: r.reserved_templates for r in spec.relations},
        },
        "split": {"train": [list(p) for p in train_pairs], "reserved": [list(p) for p in reserved_pairs]},
        "build": {
            "seconds": round(time.perf_counter() - start, 2),
            "train_seconds": round(result.seconds, 2),
            "steps": result.steps,
            "final_loss": round(result.loss, 5),
            "train_accuracy": train_acc,
            "reserved_accuracy": reserved_acc,
            "threads": BUILD_THREADS,
            # the same spec, torch and thread count still train other weights on another CPU instruction set
            # (measured: a build on an AVX2 machine moved SoLA's dev generalization at T = 100 from 0.720 to 0.607)
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "weights_sha256": weights_digest(out),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (out / WORLD_FILE).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / MARKER).write_text(spec.spec_hash() + "\n", encoding="utf-8")


def weights_digest(model_dir: str | os.PathLike) -> str | None:
    """The first 16 hex digits of the sha256 of a model folder's safetensors weights (None: no such file)."""
    import hashlib

    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info logs (e.g. 'Writing model shards') for a moment."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
