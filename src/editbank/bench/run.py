"""The bench runner: one edit stream per (method, seed), scored at every T, resumable from its edit store.

Each (method, seed) is a *cell*: one stream of max(T) requests written into the cell's own edit store, cut into
editor calls of the method's batch size and at every T, so that the first T edits are scored (`evaluate`, all of
them on the model right after the T-th edit) before the stream goes on. Rows are appended to JSONL files as they are
measured; a rerun of the same command reads them, reopens each cell's store, checks that its edits are the stream's
first ones, and goes on from there.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import platform
import random
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..requests import EditRequest
from .config import BenchConfig, BenchError
from .files import append_jsonl, read_jsonl, write_json

METRICS = ("reliability", "generalization", "locality")
SCHEDULE = ("final-model evaluation at each T: the first T edits of one stream of max(T) edits, all scored on the "
            "model right after the T-th edit; editor calls of the method's batch size, cut at every T")


def op_score(row: dict[str, Any]) -> float | None:
    """OP: the geometric mean of reliability, generalization and locality (those measured)."""
    vals = [row[k] for k in METRICS if row.get(k) is not None]
    if not vals:
        return None
    if min(vals) <= 0:
        return 0.0
    prod = 1.0
    for v in vals:
        prod *= v
    return prod ** (1 / len(vals))


@dataclass
class Data:
    model: str
    corpus: list[str] | None
    stats_corpus: list[str] | None  # the key statistics' texts (None: the corpus)
    available: int  # requests the data can supply per seed
    describe: str
    draw: Callable[[int, int], list[EditRequest]]  # (n, seed) -> the stream
    # groups of paraphrases of one fact each, from the same calibration part or slice as the corpus
    paraphrases: list[list[str]] | None = None
    paraphrase_subjects: list[str | None] | None = None  # each group's subject (SoLA's subject gate)


def load_data(cfg: BenchConfig, progress: bool) -> Data:
    from ..leaks import calibration_corpus, calibration_paraphrase_subjects, calibration_paraphrases, calibration_split
    from ..world import World

    size = cfg.world_size
    if size is not None:
        world = World.build(size, progress=progress)
        n = len(world.editable_facts)
        return Data(cfg.model or str(world.path), world.fact_prompts(), world.calibration_texts(), n,
                    f"world '{world.name}' ({n} editable facts)", lambda k, seed: world.edit_requests(n=k, seed=seed),
                    world.calibration_paraphrases(), world.calibration_paraphrase_subjects())
    from ..data import load_requests
    from ..world.dataset import build_dataset_world

    fmt, _, path = cfg.data.partition(":")
    try:
        records = load_requests(path, format=None if fmt == "auto" else fmt)
        # without --model: the dataset's own world, trained on its original facts (built once, cached)
        model = cfg.model or str(build_dataset_world(cfg.data, progress=progress).path)
    except (OSError, ValueError) as exc:
        raise BenchError(str(exc)) from None
    if len(records) < 2:
        raise BenchError(f"--data {cfg.data}: {len(records)} request(s); a run needs 2 or more (a share is held out "
                         "for calibration)")
    # a slice of the records is held out of every run: the corpus comes from it, the streams from the rest
    held, reqs = calibration_split(records)
    corpus = calibration_corpus(held, reqs)

    def draw(k: int, seed: int) -> list[EditRequest]:
        order = list(range(len(reqs)))
        random.Random(seed).shuffle(order)
        return [reqs[i] for i in order[:k]]

    return Data(model, corpus, None, len(reqs), f"{fmt} {Path(path).name} ({len(reqs)} requests; {len(held)} more held "
                f"out for calibration)", draw, calibration_paraphrases(held, reqs) or None,
                calibration_paraphrase_subjects(held, reqs) or None)


def check_leaks(cfg: BenchConfig, data: Data, ts: list[int]) -> None:
    """Refuse a run whose corpus (or a method's statistics file) holds an evaluation prompt of its streams."""
    from ..leaks import LeakError, check_disjoint

    streams = [r for seed in cfg.seeds for r in data.draw(ts[-1], seed)]
    try:
        check_disjoint(data.corpus, streams, "the calibration corpus")
        check_disjoint(data.stats_corpus, streams, "the statistics corpus")
        check_disjoint([p for g in data.paraphrases or [] for p in g], streams, "the paraphrase groups")
        for method in cfg.methods:
            stats = cfg.method_hparams(method).get("mom2_dataset")
            if stats:
                lines = [x.strip() for x in Path(stats).read_text(encoding="utf-8").splitlines() if x.strip()]
                check_disjoint(lines, streams, f"{method}'s statistics file {stats}")
    except LeakError as exc:
        raise BenchError(f"refusing a leaky run: {exc}") from None


@contextmanager
def _lock(out: Path, shared: bool = False):
    """The run directory's lock: exclusive for a plain run, shared among the shards of a sharded one."""
    f = open(out / ".lock", "a+")  # readable too: NFSv4 refuses a shared lock on a write-only file
    try:
        fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise BenchError(f"another bench is running in {out}" + ("" if shared else
                         " (a plain run or --report waits until every shard has stopped)")) from None
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' (0 <= i < n) as (i, n); None as the whole run (0, 1)."""
    if text is None:
        return 0, 1
    i, sep, n = text.partition("/")
    try:
        shard = int(i), int(n)
    except ValueError:
        shard = (-1, 0)
    if not sep or not 0 <= shard[0] < shard[1]:
        raise BenchError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return shard


def data_digest(data: Data) -> str:
    """A digest of what the run calibrates on (its corpora) and how many requests the data supplies: a run directory
    made before a change of the data (a new split, another file) is refused rather than resumed."""
    import hashlib
    import json

    blob = json.dumps([data.corpus, data.stats_corpus, data.available], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _claim(out: Path, cfg: BenchConfig, digest: str) -> bool:
    """Record the parameters, or check that the run directory holds this run; True when resuming."""
    params = out / "params.json"
    mine = {**cfg.to_dict(), "data_digest": digest}
    if params.exists():
        import json

        theirs = json.loads(params.read_text(encoding="utf-8"))["config"]
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise BenchError(f"{out} holds a run with other parameters (they differ in {', '.join(diff)}); "
                             "give another --out to start a new run")
        return True
    write_json(params, {"config": mine, "schedule": SCHEDULE, "protocol": cfg.protocol,
                        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return False


def _environment(device: str | None, resumed: bool, model: str | None = None) -> dict[str, Any]:
    import torch

    from .._version import __version__
    from ..world.core import weights_digest

    return {"model_weights": weights_digest(model) if model else None,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "resumed": resumed,
            "editbank": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "device": device or "model default",
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def run_bench(cfg: BenchConfig, out: str | Path, *, device: str | None = None, progress: bool = True,
              console=None, shard: tuple[int, int] = (0, 1), report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) the bench in `out`; write summary.json, results.md and plots; return the summary.

    Data of several parts (`--data suite` or a comma-separated list) runs each part into its own subdirectory
    and adds the mean and spread over parts. `shard=(i, n)` runs only the cells (part, method, seed) whose index
    in that order is i modulo n, and writes no report; `report_only` runs nothing and (re)writes the reports from
    what the cells wrote."""
    from . import report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None else (lambda *a, **k: None)
    sharded = shard != (0, 1)
    parts = cfg.parts
    with _lock(out, shared=sharded):
        cells = [(p, m, s) for p in range(len(parts)) for m in cfg.methods for s in cfg.seeds]
        mine = [c for k, c in enumerate(cells) if k % shard[1] == shard[0]]
        if sharded:
            say(f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(cells)} cells")
        results = []
        for p, part in enumerate(parts):
            pcfg = cfg if len(parts) == 1 else dataclasses.replace(cfg, data=part)
            pout = out if len(parts) == 1 else out / part_name(part)
            todo = [(m, s) for q, m, s in mine if q == p]
            if sharded and not todo:
                continue
            if report_only and not (pout / "params.json").exists():
                raise BenchError(f"--report: {pout} has not run yet (no params.json): run its cells first")
            results.append(_run_part(pcfg, pout, [] if report_only else todo, device, progress, say,
                                     write_report=not sharded))
        if sharded:
            say(f"shard {shard[0]}/{shard[1]} done; run without --shard (or with --report) to write the summary")
            return {}
        summary = results[0] if len(parts) == 1 else report.write_suite(out, cfg, parts, results)
    say(f"results: {out / 'results.md'}")
    return summary


def part_name(data: str) -> str:
    """The subdirectory of one part of a multi-part run: the world's name or the dataset file's stem."""
    kind, _, rest = data.partition(":")
    name = (rest or "default") if kind == "world" else f"{kind}-{Path(rest).stem}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def _run_part(cfg: BenchConfig, out: Path, todo: list[tuple[str, int]], device, progress, say,
              write_report: bool) -> dict[str, Any]:
    from . import report

    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg, progress)  # before claiming the directory: bad data leaves it unclaimed
    ts = sorted({min(t, data.available) for t in cfg.edits})
    check_leaks(cfg, data, ts)
    resumed = _claim(out, cfg, data_digest(data))
    if todo:
        append_jsonl(out / "sessions.jsonl", [_environment(device, resumed, data.model)])
        if ts[-1] < max(cfg.edits):
            say(f"[yellow]T capped at {ts[-1]}: {data.describe}[/yellow]")
        say(f"{'resuming' if resumed else 'starting'} bench in {out}: {', '.join(cfg.methods)} on {data.describe}; "
            f"T = {ts}; seeds {cfg.seeds}; protocol {cfg.protocol}")
    from ..methods.base import EditFailed

    for method, seed in todo:
        try:
            Cell(out, cfg, data, method, seed, ts, device, progress, say).run()
        except EditFailed as exc:  # the method cannot work here: record it, say it, go on with the other cells
            say(f"[red]{method} seed {seed} failed: {exc}[/red]")
            append_jsonl(out / "failures.jsonl", [{"method": method, "seed": seed, "error": str(exc)}])
    if not write_report:
        return {}
    summary = report.write(out, cfg, data.describe, ts)
    summary["available"] = data.available
    return summary


class Cell:
    """One (method, seed) stream."""

    def __init__(self, out, cfg, data, method, seed, ts, device, progress, say) -> None:
        self.out, self.cfg, self.data, self.method, self.seed, self.ts = out, cfg, data, method, seed, ts
        self.device, self.progress, self.say = device, progress, say
        self.dir = out / "cells" / f"{method}-seed{seed}"
        self.reqs = data.draw(ts[-1], seed)
        self.key = {"method": method, "seed": seed}

    def _mine(self, name: str) -> list[dict[str, Any]]:
        return [r for r in read_jsonl(self.out / name) if r.get("method") == self.method and r.get("seed") == self.seed]

    @property
    def points(self) -> list[int]:
        every = self.cfg.eval_every
        return sorted(set(self.ts) | (set(range(every, self.ts[-1] + 1, every)) if every else set()))

    def todo(self) -> tuple[set[int], set[int], bool]:
        done = {r["T"] for r in self._mine("results.jsonl")}
        steps = {r["step"] for r in self._mine("retention.jsonl")}
        every = self.cfg.eval_every
        evals = {t for t in self.ts if t not in done}
        retention = {p for p in self.points if every and (p % every == 0 or p == self.ts[-1]) and p not in steps}
        wanted = self.cfg.undo_methods is None or self.method in self.cfg.undo_methods
        undo = wanted and self.cfg.undo_fraction > 0 and not self._mine("undo.jsonl")
        return evals, retention, undo

    def _open(self, store: Path):
        from ..editor import Editor

        try:
            return Editor.open(self.data.model, method=self.method, store=store, seed=self.seed, device=self.device,
                               corpus=self.data.corpus, stats_corpus=self.data.stats_corpus,
                               paraphrases=self.data.paraphrases, paraphrase_subjects=self.data.paraphrase_subjects,
                               **self.cfg.method_hparams(self.method))
        except (TypeError, ValueError) as exc:
            raise BenchError(f"{self.method}: {exc}") from None

    def _reset(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def run(self) -> None:
        evals, retention, undo = self.todo()
        if not (evals or retention or undo):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        ed = self._open(self.dir / "store.db")
        written = ed.edits()
        n = len(written)
        stale = [w for w, r in zip(written, self.reqs) if (w.request.prompt, w.request.target) != (r.prompt, r.target)]
        if stale or n > len(self.reqs) or any(p < n for p in evals | retention):
            why = "its edits are not this stream's" if stale or n > len(self.reqs) else "a score is missing before it"
            self.say(f"{self.method} seed {self.seed}: restarting the stream ({why})")
            ed.close()
            self._reset()
            ed = self._open(self.dir / "store.db")
            n = 0
        elif n:
            self.say(f"{self.method} seed {self.seed}: resuming after {n} of {self.ts[-1]} edits")
            timed = max((r["end"] for r in read_jsonl(self.dir / "timing.jsonl")), default=0)
            if timed < n:  # killed between a call's commit and its timing row: its seconds are unknown
                append_jsonl(self.dir / "timing.jsonl", [{"end": n, "n": n - timed, "seconds": None}])
        try:
            t0 = time.perf_counter()
            ed.method.prepare()  # one-time calibration / key statistics: not part of any edit's seconds
            if n == 0 and time.perf_counter() - t0 > 0.5:
                self.say(f"{self.method} seed {self.seed}: one-time preparation took "
                         f"{time.perf_counter() - t0:.1f} s (not counted in seconds per edit)")
            self._stream(ed, n, evals, retention)
        finally:
            ed.close()
        if undo:
            self._undo()

    def _stream(self, ed, n: int, evals: set[int], retention: set[int]) -> None:
        from ..evaluate.lifelong import _progress

        batch = self.cfg.method_batch(self.method)
        total = self.ts[-1]
        prog, task = _progress(total, f"{self.method} seed {self.seed}", self.progress)
        with prog:
            prog.advance(task, n)
            self._checkpoint(ed, n, evals, retention)
            while n < total:
                end = min([n + batch] + [p for p in self.points if p > n])
                t0 = time.perf_counter()
                ed.edit(self.reqs[n:end], check=False)  # a failed edit is part of the measurement
                seconds = time.perf_counter() - t0
                append_jsonl(self.dir / "timing.jsonl", [{"end": end, "n": end - n, "seconds": seconds}])
                prog.advance(task, end - n)
                n = end
                self._checkpoint(ed, n, evals, retention)

    def _edit_seconds(self, t: int) -> float | None:
        """Seconds the first t edits took (None if a kill lost one call's timing)."""
        secs = [r["seconds"] for r in read_jsonl(self.dir / "timing.jsonl") if r["end"] <= t]
        return None if None in secs else sum(secs)

    def _checkpoint(self, ed, t: int, evals: set[int], retention: set[int]) -> None:
        from ..evaluate.metrics import evaluate, score_locality, score_pairs

        protocol = self.cfg.protocol
        if t in retention:
            reqs = self.reqs[:t]
            rel = score_pairs(ed, [(r.prompt, r.target) for r in reqs], protocol)
            probes = [p for r in reqs for p in r.locality]
            loc = score_locality(ed, probes, protocol) if probes else []
            append_jsonl(self.out / "retention.jsonl", [{**self.key, "step": t, "protocol": protocol,
                                                         "reliability": rel,
                                                         "locality": sum(loc) / len(loc) if loc else None}])
        if t in evals:
            rep = evaluate(ed, self.reqs[:t], protocol)
            edits = ed.edits()[:t]
            ids = [e.id for e in edits]
            records = [{**self.key, "T": t, "index": i, "edit_id": e, "protocol": protocol, **rec}
                       for i, (e, rec) in enumerate(zip(ids, rep["records"]))]
            append_jsonl(self.out / "records.jsonl", records)
            seconds = self._edit_seconds(t)
            row = {**self.key, "T": t, "protocol": protocol, "n": t,
                   **{k: rep[k] for k in (*METRICS, "portability")}, "edit_seconds": seconds,
                   "seconds_per_edit": None if seconds is None else seconds / t}
            row["OP"] = op_score(row)
            drift = ed._weight_drift().get("weight_drift")  # weight-writing methods: the largest ‖W − W0‖/‖W0‖
            row["weight_drift"] = max(drift.values()) if drift else None
            for key in ("realised_ratio", "proxy_ratio"):  # locate methods: median over the T edits
                vals = sorted(e.stats[key] for e in edits if e.stats and key in e.stats)
                row[key] = vals[len(vals) // 2] if vals else None
            append_jsonl(self.out / "results.jsonl", [row])
            self.say(f"{self.method} seed {self.seed} T={t}: " + ", ".join(
                f"{k} {row[k]:.3f}" for k in (*METRICS, "OP", "weight_drift", "realised_ratio", "proxy_ratio")
                if row[k] is not None) + f" ({protocol})")

    def _undo(self) -> None:
        from ..evaluate.lifelong import rollback_eval

        copy = self.dir / "undo.db"
        for p in self.dir.glob("undo.db*"):
            p.unlink()
        shutil.copyfile(self.dir / "store.db", copy)
        ed = self._open(copy)
        try:
            active = ed.edits("active")
            t0 = time.perf_counter()
            rb = rollback_eval(ed, active, fraction=self.cfg.undo_fraction, seed=self.seed,
                               protocol=self.cfg.protocol)
            seconds = time.perf_counter() - t0
            kept_ids = {e.id for e in active} - set(rb["undone"])
        finally:
            ed.close()
        # the kept edits' scores before the undo, from the stream's final evaluation
        final = [r for r in self._mine("records.jsonl") if r["T"] == self.ts[-1] and r["edit_id"] in kept_ids]
        kept_before = {k: _mean([r[k] for r in final if r[k] is not None]) for k in METRICS}
        kept = {k: (rb["kept"] or {}).get(k) for k in METRICS}
        change = [abs(kept[k] - kept_before[k]) for k in METRICS if kept[k] is not None and kept_before[k] is not None]
        append_jsonl(self.out / "undo.jsonl", [{
            **self.key, "T": self.ts[-1], "protocol": self.cfg.protocol, "fraction": self.cfg.undo_fraction,
            "undone": len(rb["undone"]), "restored": rb["restored"], "max_abs_logit_diff": rb["max_abs_logit_diff"],
            "rollback_seconds": seconds, "kept_before": kept_before, "kept": kept,
            "kept_change": max(change) if change else None}])
        for p in self.dir.glob("undo.db*"):
            p.unlink()
        self.say(f"{self.method} seed {self.seed}: undid {len(rb['undone'])}, restored {rb['restored']:.0%}")


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
