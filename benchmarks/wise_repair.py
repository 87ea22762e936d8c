"""WISE vs REPAIR on built-in worlds: scores at several T, REPAIR's ablation with each mechanism's firing counts,
speed, latency and undo, in one run.

Every stream feeds the same requests in chunks of `--batch` (so REPAIR's batching has something to group) and
evaluates all edits on the final model with greedy exact match. OP is the geometric mean of reliability,
generalization and locality. The largest T of each method is then timed (inference latency against the base
model, interleaved) and 10% of its edits are undone, once per undo mode, each on its own copy of the final store.
With several worlds (`--worlds suite`: the held-out test worlds) each config's mean and spread over them follow.
A `--worlds` item "FORMAT:PATH" (zsre:..., counterfact:...) is a dataset's own world, used as `editbank bench` uses
it: the streams come from its records, the methods' calibration texts from the slice held out of them (checked
disjoint from the streams before anything runs).

    python benchmarks/wise_repair.py --worlds default --T 1,10,100,1000 --ablation-T 1000 [--undo-modes tombstone]
    python benchmarks/wise_repair.py --worlds suite --T 100 --ablation-T 100 --undo-fraction 0
    python benchmarks/wise_repair.py --worlds zsre:../shared/data/zsre_mend_train-1k.json --T 10,100 --configs repair
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import parse_hp
from rich.console import Console
from rich.table import Table

from editbank import Editor, EditRequest, World
from editbank.bench.config import BenchConfig
from editbank.bench.files import append_jsonl, read_jsonl
from editbank.bench.run import check_leaks, load_data
from editbank.evaluate import evaluate, rollback_eval, run_stream
from editbank.methods.base import get_method
from editbank.tokens import make_batch

# the built-in worlds' settings (`Wise.world_preset` and `Repair.world_preset`, where they are explained): Adam
# at lr 0.03, three corpus prefixes, key routing with a cosine gate of 0.9 on layer 0's key, one joint batch of 8
# per shard, two shards per merge, merge_fit; REPAIR with WISE's margins, distillation weight 0.1 and "spread"
# batching of calls of 32.
# "(paper routing)" rows keep the paper's top-1 by score; "(paper)" rows also the papers' optimiser (SGD at the
# class's learning rate, and no merge_fit; "+merge fit" with it); "repair (similar batching)" is the paper's
# grouping; "repair (consensus merge)" its merge.
PAPER_ROUTING = {"route_by": "score", "key_threshold": 0.0, "key_layer": None}
WISE_HP, REPAIR_HP = get_method("wise").world_preset, get_method("repair").world_preset
PAPER = {**PAPER_ROUTING, "optimizer": "sgd"}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "wise": ("wise", WISE_HP),
    "repair": ("repair", REPAIR_HP),
    "wise -merge fit": ("wise", {**WISE_HP, "merge_fit": False}),
    "wise (paper routing)": ("wise", {**WISE_HP, **PAPER_ROUTING}),
    "repair (paper routing)": ("repair", {**REPAIR_HP, **PAPER_ROUTING}),
    "wise (paper)": ("wise", {**WISE_HP, **PAPER, "edit_lr": get_method("wise").Hparams.edit_lr,
                              "merge_fit": False}),
    "repair (paper)": ("repair", {**REPAIR_HP, **PAPER, "edit_lr": get_method("repair").Hparams.edit_lr,
                                  "merge_fit": False}),
    "wise (paper) +merge fit": ("wise", {**WISE_HP, **PAPER, "edit_lr": get_method("wise").Hparams.edit_lr,
                                         "merge_fit": True}),
    "repair (paper) +merge fit": ("repair", {**REPAIR_HP, **PAPER, "edit_lr": get_method("repair").Hparams.edit_lr,
                                             "merge_fit": True}),
    "repair -feedback": ("repair", {**REPAIR_HP, "error_feedback": False}),
    "repair (similar batching)": ("repair", {**REPAIR_HP, "batching": "similar"}),
    "repair -batching": ("repair", {**REPAIR_HP, "similarity_batching": False}),
    "repair -distillation": ("repair", {**REPAIR_HP, "distillation": False}),
    "repair -loss-aware merge": ("repair", {**REPAIR_HP, "loss_aware_merge": False}),  # equal weights
    "repair (consensus merge)": ("repair", {**REPAIR_HP, "merge_alg": "consensus"}),
    "repair -progressive": ("repair", {**REPAIR_HP, "progressive": False}),
    "repair +monitor": ("repair", {**REPAIR_HP, "monitor": True}),
    "repair -merge fit": ("repair", {**REPAIR_HP, "merge_fit": False}),
}
ABLATION = [c for c in CONFIGS if c.startswith(("repair -", "repair +"))] + ["repair (similar batching)",
                                                                            "repair (consensus merge)"]
METRICS = ("reliability", "generalization", "locality")


def op(scores: dict[str, float]) -> float:
    vals = [scores[k] for k in METRICS]
    return float(torch.tensor(vals).prod() ** (1 / 3)) if min(vals) > 0 else 0.0


def latency_ratio(ed: Editor, prompts: list[str], rounds: int = 5) -> float:
    """Forward time of the edited model over the base model on the same batch, interleaved."""
    b = make_batch(ed.tokenizer, [(p, " x") for p in prompts], device=ed.device)
    edited, base = [], []
    for _ in range(rounds):
        for bucket, ctx in ((edited, contextlib.nullcontext), (base, ed.unedited)):
            t0 = time.perf_counter()
            with ctx():
                ed.logits(b.input_ids, b.attention_mask, b.query_index)
            bucket.append(time.perf_counter() - t0)
    return statistics.median(edited) / statistics.median(base)


@dataclass
class Source:
    """Where the streams come from: a built world (the editor takes its calibration part) or a dataset's world
    (`calibration`: the texts of the records held out of the streams, as `editbank bench` passes them)."""

    name: str
    path: Path
    available: int  # editable facts or requests
    draw: Callable[[int, int], list[EditRequest]]  # (n, seed) -> the stream
    calibration: dict[str, Any] = field(default_factory=dict)


def source(item: str, seed: int, ts: list[int], quiet: bool) -> Source:
    if ":" not in item:
        world = World.build(item, progress=not quiet)
        return Source(world.name, world.path, len(world.editable_facts),
                      lambda n, s: world.edit_requests(n=n, seed=s))
    cfg = BenchConfig(methods=["repair"], data=item, seeds=[seed])
    data = load_data(cfg, progress=not quiet)
    check_leaks(cfg, data, [min(max(ts), data.available)])
    return Source(item.partition(":")[0], Path(data.model), data.available, data.draw,
                  {"corpus": data.corpus, "stats_corpus": data.stats_corpus, "paraphrases": data.paraphrases,
                   "paraphrase_subjects": data.paraphrase_subjects})


def run(world: Source, name: str, t: int, args, extra: dict[str, Any], final: bool) -> dict[str, Any]:
    method, hp = CONFIGS[name]
    reqs = world.draw(t, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ed = Editor.open(world.path, method=method, store=Path(tmp) / "s.db", seed=args.seed,
                         device=args.device, **world.calibration, **{**hp, **extra})
        stream = run_stream(ed, reqs, protocol="greedy_exact_match", batch_size=args.batch)
        scores = {k: stream["final"][k] for k in METRICS}
        fig = {"world": world.name, "config": name, "T": t, **scores, "OP": op(scores),
               "seconds_per_edit": stream["edit_seconds"] / t, "fired": dict(getattr(ed.method, "counts", {}))}
        if final:
            fig["latency_ratio"] = latency_ratio(ed, [r.prompt for r in reqs[:32]])
        ed.close()
        print(f"{name} T={t}: " + " ".join(f"{k} {v:.3f}" for k, v in fig.items() if isinstance(v, float)),
              file=sys.stderr, flush=True)  # the scores before the (slow) undo figures
        if final and t >= 10 and args.undo_fraction > 0:
            fig["undo"] = {}
            for mode in args.undo_modes.split(","):  # each mode undoes the same edits on its own copy of the store
                copy = Path(tmp) / f"{mode}.db"
                shutil.copyfile(Path(tmp) / "s.db", copy)
                ed = Editor.open(world.path, method=method, store=copy, device=args.device, undo=mode,
                                 **world.calibration)
                fig["undo"][mode] = undo_figures(ed, args)
                ed.close()
    return fig


def undo_figures(ed: Editor, args) -> dict[str, Any]:
    """Undo a random share of the edits; the others' scores before and after."""
    active = ed.edits("active")
    chosen = random.Random(args.seed).sample(active, max(1, round(args.undo_fraction * len(active))))
    kept = [e.request for e in active if e.id not in {c.id for c in chosen}]
    before = evaluate(ed, kept, "greedy_exact_match")
    t0 = time.perf_counter()
    rb = rollback_eval(ed, chosen, fraction=1.0)
    seconds = (time.perf_counter() - t0) / len(chosen)
    after = evaluate(ed, kept, "greedy_exact_match")
    return {"undone": len(chosen), "restored": rb["restored"], "seconds_per_undo": seconds,
            "kept_before": {k: before[k] for k in METRICS}, "kept": {k: after[k] for k in METRICS},
            "kept_change": max(abs(after[k] - before[k]) for k in METRICS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", "--size", default="default",
                    help="comma-separated worlds: sizes (small/default/large), test worlds, 'suite', spec files or "
                         "FORMAT:PATH (a dataset's own world)")
    ap.add_argument("--T", default="1,10,100", help="comma-separated stream lengths")
    ap.add_argument("--ablation-T", type=int, default=100, help="T of REPAIR's ablation (0: none)")
    ap.add_argument("--ablation", default=",".join(ABLATION), help="configs of the ablation")
    ap.add_argument("--configs", default="wise,repair", help="configs of the main table")
    ap.add_argument("--batch", type=int, default=get_method("repair").bench_batch, help="requests per editor call")
    ap.add_argument("--undo-fraction", type=float, default=0.1, help="share of the edits undone at the end (0: none)")
    ap.add_argument("--undo-modes", default="retrain,retrain+tombstone,tombstone",
                    help="undo modes measured, each on a copy of the final store")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="torch device for the model (default: where it loads, the CPU)")
    ap.add_argument("--hp", action="append", default=[], help="hyperparameter key=value for every config")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON lines")
    ap.add_argument("--out", type=Path, default=None,
                    help="append each figure to this JSON-lines file as it is measured, and skip the streams already "
                         "in it (the same world, config, T and run settings: seed, batch, --hp, final figures): an "
                         "interrupted run started again goes on at its next stream; the file is read before each "
                         "stream, so two processes given the same file and disjoint --configs share one table")
    args = ap.parse_args()
    unknown = [c for c in args.configs.split(",") + args.ablation.split(",") if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    extra = parse_hp(args.hp)
    console = Console(quiet=args.json)
    from editbank.world.test_specs import SUITE

    names = [w for item in args.worlds.split(",") for w in (SUITE if item == "suite" else [item])]
    figs = []
    asked = [int(x) for x in args.T.split(",")] + [args.ablation_T]
    for world in [source(n, args.seed, asked, args.json) for n in names]:
        ts = sorted({min(int(x), world.available) for x in args.T.split(",")})
        jobs = [(c, t, t == ts[-1]) for c in args.configs.split(",") for t in ts]
        if args.ablation_T:
            jobs += [(c, min(args.ablation_T, world.available), False) for c in args.ablation.split(",")
                     if c not in args.configs.split(",")]
        for name, t, final in jobs:
            undo = final and t >= 10 and args.undo_fraction > 0
            settings = {"seed": args.seed, "batch": args.batch, "hp": extra, "final": final,
                        "undo": [args.undo_fraction, args.undo_modes] if undo else None}  # as JSON reads it back
            # read afresh before each stream: another process appending to the same file (say, the other half of
            # the configurations on a second core) may have finished this one meanwhile; a torn line is dropped
            done = read_jsonl(args.out) if args.out is not None else []
            old = [f for f in done if (f["world"], f["config"], f["T"], f.get("settings")) ==
                   (world.name, name, t, settings)]
            if old:
                fig = old[-1]
                console.print(f"{world.name}: {name} T={t}: in {args.out}, skipped")
            else:
                t0 = time.perf_counter()
                fig = run(world, name, t, args, extra, final)
                fig["wall_seconds"] = time.perf_counter() - t0
                fig["settings"] = settings
                if args.out is not None:
                    append_jsonl(args.out, [fig])
            figs.append(fig)
            if args.json:
                print(json.dumps(fig), flush=True)
            else:
                console.print(f"{world.name}: {name} T={t}: OP {fig['OP']:.3f} ({fig['wall_seconds']:.0f} s) "
                              f"fired {fig['fired']}")
    table = Table("world", "config", "T", *METRICS, "OP", "s/edit", title=f"greedy exact match, chunks of "
                  f"{args.batch}, all edits scored on the final model")
    for f in figs:
        table.add_row(f["world"], f["config"], str(f["T"]), *(f"{f[k]:.3f}" for k in METRICS), f"{f['OP']:.3f}",
                      f"{f['seconds_per_edit']:.3f}")
    console.print(table)
    if len(names) > 1:  # mean and spread over the worlds, per config and T
        spread = Table("config", "T", *METRICS, "OP", title=f"mean +- sd over {', '.join(names)}")
        for key in dict.fromkeys((f["config"], f["T"]) for f in figs):
            cell = [f for f in figs if (f["config"], f["T"]) == key]
            if len(cell) > 1:
                spread.add_row(key[0], str(key[1]), *(f"{statistics.mean(f[k] for f in cell):.3f} +- "
                                                      f"{statistics.stdev(f[k] for f in cell):.3f}"
                                                      for k in (*METRICS, "OP")))
        console.print(spread)
    for f in figs:
        if "latency_ratio" in f:
            console.print(f"{f['config']} T={f['T']}: inference latency {f['latency_ratio']:.2f}x the base model")
        for mode, u in f.get("undo", {}).items():
            console.print(f"  undo ({mode}) {u['undone']} ({u['seconds_per_undo']:.2f} s each): restored "
                          f"{u['restored']:.0%}; kept edits "
                          + ", ".join(f"{k} {u['kept'][k]:.3f} (was {u['kept_before'][k]:.3f})" for k in METRICS)
                          + f"; largest change {u['kept_change']:.3f}")


if __name__ == "__main__":
    main()
