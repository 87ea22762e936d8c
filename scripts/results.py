"""Regenerate RESULTS.md: `editbank bench` on the held-out suite, the ZsRE and CounterFact worlds and the dev world.

    python scripts/results.py                       # every run; resumes the run directories under results/
    python scripts/results.py --runs suite,zsre     # only these runs (the others' sections are kept)
    python scripts/results.py --shard 0/4           # one share of the chosen runs' cells (a job array)

Each benchmark is an ordinary resumable run directory (results/world, results/suite, results/zsre, ...); rerunning
the command after an interruption goes on where it stopped, and rerunning it when all are complete only rewrites
RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console

from editbank.bench import BenchConfig, run_bench
from editbank.bench.report import failed_lines, fmt, mean_table, score_table
from editbank.bench.run import parse_shard
from editbank.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
# SoLA's key configurations compared on one build: the defaults (last token + pooled embeddings, whitened by the
# paraphrase whitening, alpha_quantile 3e-4) and the previous defaults (last token, PCA whitening, 1e-4)
SOLA_KEYS = {"gate": {}, "pooled": {"gate": "none"}, "last": {"key": "last", "whitening": "pca", "gate": "none"}}
# norm control (issue 25): AlphaEdit and MetaKE without it and with the values chosen on the dev world
NORM = {"off": {}, "on": {"alphaedit": {"norm_control": 0.01}, "metake": {"norm_control": 0.03}}}
# MEMIT (0.03 chosen on the dev world: docs/methods/locate.md) beside ROME, which has no norm control
# GRACE with SoLA's subject gate (issue 21 item 4; gate_radius 4 chosen on the dev world) and without it
GRACE_GATE = {"on": {"gate": "subject"}, "off": {}}
NORM_MEMIT = {"off": ({}, ["memit", "rome"]), "on": ({"memit": {"norm_control": 0.03}}, ["memit"])}
# one edit per call: the same values, and the values per key (÷ 100, the batch size they were chosen at)
NORM1 = {**NORM, "scaled": {"alphaedit": {"norm_control": 0.0001}, "metake": {"norm_control": 0.0003}}}
ORDER = ("sola", "grace", "ft", "wise", "repair", "rome", "memit", "alphaedit", "metake")
PUBLISHED = ROOT / "scripts" / "published.md"


def _env_line(summary: dict, params: dict, run: Path) -> str:
    sessions = [json.loads(x) for x in (run / "sessions.jsonl").read_text(encoding="utf-8").splitlines()]
    env = sessions[-1]
    return (f"Data: {summary['data']}. Protocol: `{summary['protocol']}` on every number. Schedule: "
            f"{params['schedule']}. Seeds: {', '.join(map(str, summary['seeds']))}. Run on torch {env['torch']}, "
            f"{env['device']}, {env['threads']} threads ({env['cuda'] or 'CPU'}"
            f"{', ' + env['cpu_capability'] if env.get('cpu_capability') else ''})"
            f"{'; model weights sha256 ' + env['model_weights'] if env.get('model_weights') else ''}. Run directory: "
            f"`{run.relative_to(ROOT)}` (`params.json` holds every resolved hyperparameter).")


def section(title: str, run: Path, note: str, level: str = "##") -> list[str]:
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    params = json.loads((run / "params.json").read_text(encoding="utf-8"))
    lines = [f"{level} {title}", "", note, "", _env_line(summary, params, run), ""]
    lines += score_table(summary) + failed_lines(summary)
    if summary["rollback"]:
        lines += ["", "Undo of a random 10% at the largest T (restored: share of undone edits back to the unedited "
                  "model's predictions; kept change: largest move of the kept edits' scores). Restored below 1 means a "
                  "kept edit answers an undone prompt; the model still equals one that never received the undone "
                  "edit:", "",
                  "| method | undone | restored | largest kept change |", "|---|---:|---:|---:|"]
        for u in summary["rollback"]:
            lines.append(f"| {u['method']} | {fmt(u['undone'], 0)} | {fmt(u['restored'])} | "
                         f"{fmt(u['kept_change'])} |")
    plots = sorted((run / "plots").glob("*.png"))
    lines += [""] + [f"![{p.stem}]({p.relative_to(ROOT)})" for p in plots if p.name == "metrics.png"]
    return lines + [""]


def suite_section(run: Path, note: str) -> list[str]:
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    lines = ["## Held-out test worlds (the suite)", "", note, "",
             f"Protocol: `{summary['protocol']}` on every number. Seeds: {', '.join(map(str, summary['seeds']))}. "
             f"Run directory: `{run.relative_to(ROOT)}` (one ordinary run directory per world). Mean ± sample standard "
             f"deviation over the {len(summary['parts'])} worlds; \"all (a-b)\" is every editable fact of each world "
             "(a to b edits).", ""]
    lines += mean_table(summary["table"], len(summary["parts"]))
    for name in summary["parts"]:
        lines += [""] + section(f"{name}", run / name, WORLD_NOTES.get(name, ""), level="###")
    return lines + [""]


def not_run(title: str, name: str, note: str) -> list[str]:
    return [f"## {title}", "", note, "", "Not in this version of RESULTS.md: `python scripts/results.py "
            f"--runs {name}` produces this section.", ""]


WORLD_NOTES = {
    "test-questions": "Every prompt a question; 8 relations, 3 facts per subject; 4 layers x 96.",
    "test-context": "CounterFact-like prompts that open with an unrelated sentence (long prompts); 5 relations, 4 "
                    "facts per subject, multi-token objects; 4 layers x 160.",
    "test-dense": "Plain statements; every subject has all 6 relations (most interference); objects that share "
                  "their first tokens; 2 layers x 192. With 2 layers SoLA's master layer and the WISE/REPAIR presets' "
                  "key layer are layer 0, whose last-token input does not see the subject: SoLA cannot calibrate "
                  "(identical keys for two subjects); WISE's and REPAIR's key router breaks those ties by the prompt's "
                  "pooled key-layer input (`pooled_ties`, since 2026-12-06: before it they lost a quarter of the "
                  "edits at 336).",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(m for m in ORDER if m in METHODS), help="dev world and suite runs")
    ap.add_argument("--edits", default="1,10,100,1000", help="capped at each world's editable facts")
    ap.add_argument("--undo-methods", default="sola,grace,wise",
                    help="dev world run: methods whose rollback is measured (the others replay every later edit; "
                         "REPAIR's replay retrains every later call: hours at T = 350 on a CPU)")
    ap.add_argument("--dataset-methods", default="sola,grace,ft,rome,memit,alphaedit,metake",
                    help="CounterFact and ZsRE runs at --dataset-edits")
    ap.add_argument("--dataset-edits", default="1,10,100,1000")
    ap.add_argument("--slow-methods", default="wise,repair",
                    help="CounterFact and ZsRE runs at --slow-edits (1-4 s per edit on a CPU)")
    ap.add_argument("--slow-edits", default="1,10,100")
    ap.add_argument("--counterfact", default=str(ROOT.parent / "shared" / "data" / "easyedit_counterfact-val.json"))
    ap.add_argument("--zsre", default=str(ROOT.parent / "shared" / "data" / "zsre_mend_train-1k.json"))
    ap.add_argument("--runs", default="world,suite,counterfact,counterfact-wise,zsre,zsre-wise,sola-keys-gate-world,"
                    "grace-gate-on-world,grace-gate-on-suite,grace-gate-off-world,grace-gate-off-suite,"
                    "sola-keys-gate-suite,sola-keys-pooled-world,sola-keys-pooled-suite,sola-keys-last-world,"
                    "sola-keys-last-suite,sola-keys-gate-counterfact,sola-keys-gate-zsre,norm-off-world,norm-on-world,"
                    "norm-off-suite,norm-on-suite,norm-off-zsre,norm-on-zsre,norm-off-counterfact,norm-on-counterfact,"
                    "norm1-off-suite,norm1-on-suite,norm1-scaled-suite,norm-memit-off-world,norm-memit-on-world,norm-memit-off-suite,"
                    "norm-memit-on-suite,normp-off-world,normp-on-world,normp-off-suite,normp-on-suite,norm-pull-world,"
                    "norm-pull-suite,norm-pull-zsre,norm-pull-counterfact,norm1-off-zsre,norm1-scaled-zsre,"
                    "norm1-off-counterfact,norm1-scaled-counterfact,norm-memit-off-zsre,norm-memit-on-zsre,"
                    "norm-memit-off-counterfact,norm-memit-on-counterfact,normp-off-zsre,normp-on-zsre,"
                    "normp-off-counterfact,normp-on-counterfact,zsre-wise-preset,counterfact-wise-preset,"
                    "repair-batch-spread-zsre,repair-batch-similar-zsre",
                    help="which runs to (re)do; the others' sections are kept from their run directories")
    ap.add_argument("--shard", default=None, help="I/N: only this share of the chosen runs' cells (no RESULTS.md)")
    ap.add_argument("--report", action="store_true",
                    help="run nothing: rewrite the chosen runs' summaries (after shards or a stopped run), RESULTS.md")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    console = Console()
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    out = Path(args.out)
    names = lambda text: text.split(",")  # noqa: E731
    datasets = {"zsre": f"zsre:{args.zsre}", "counterfact": f"counterfact:{args.counterfact}"}
    slow_hp = {"wise": {"merge_fit": False}} if "wise" in names(args.slow_methods) else {}
    runs = {
        "world": BenchConfig(methods=names(args.methods), data="world", edits=ints(args.edits), undo_fraction=0.1,
                             undo_methods=names(args.undo_methods), eval_every=50),
        "suite": BenchConfig(methods=names(args.methods), data="suite", edits=ints(args.edits)),
        "counterfact": BenchConfig(methods=names(args.dataset_methods), data=f"counterfact:{args.counterfact}",
                                   edits=ints(args.dataset_edits)),
        # WISE here without merge_fit (run before the dev world chose it for WISE's preset): `slow_hp`
        "counterfact-wise": BenchConfig(methods=names(args.slow_methods), data=f"counterfact:{args.counterfact}",
                                        edits=ints(args.slow_edits), hparams=slow_hp),
        "zsre": BenchConfig(methods=names(args.dataset_methods), data=f"zsre:{args.zsre}",
                            edits=ints(args.dataset_edits)),
        "zsre-wise": BenchConfig(methods=names(args.slow_methods), data=f"zsre:{args.zsre}",
                                 edits=ints(args.slow_edits), hparams=slow_hp),
        # ... and WISE with its preset (merge_fit on)
        **{f"{name}-wise-preset": BenchConfig(methods=["wise"], data=data, edits=ints(args.slow_edits))
           for name, data in datasets.items()},
        # SoLA's keys (issue 21): the current defaults and the previous ones, dev world and suite, one build
        **{f"sola-keys-{keys}-{data}": BenchConfig(methods=["sola"], data=data, edits=ints(args.edits),
                                                   hparams={"sola": hp})
           for keys, hp in SOLA_KEYS.items() for data in ("world", "suite")},
        **{f"sola-keys-gate-{name}": BenchConfig(methods=["sola"], data=f"{name}:{path}", edits=[100, 1000])
           for name, path in (("counterfact", args.counterfact), ("zsre", args.zsre))},
        **{f"grace-gate-{k}-{data}": BenchConfig(methods=["grace"], data=data, edits=ints(args.edits),
                                                 hparams={"grace": hp})
           for k, hp in GRACE_GATE.items() for data in ("world", "suite")},
        # norm control for sequential locate writes (issue 25), batches of 100
        **{f"norm-{k}-{data}": BenchConfig(methods=["alphaedit", "metake"], data=data, edits=[100, 1000], hparams=hp)
           for k, hp in NORM.items() for data in ("world", "suite")},
        **{f"norm-{k}-zsre": BenchConfig(methods=["alphaedit", "metake"], data=f"zsre:{args.zsre}", edits=[100, 1000],
                                         hparams=hp) for k, hp in NORM.items()},
        **{f"norm-{k}-counterfact": BenchConfig(methods=["alphaedit", "metake"], data=f"counterfact:{args.counterfact}",
                                                edits=[100, 1000], hparams=hp) for k, hp in NORM.items()},
        **{f"normp-{k}-{data}": BenchConfig(methods=["alphaedit", "metake"], data=data, edits=[100, 1000], hparams=hp,
                                            protocol="prob_preference")
           for k, hp in NORM.items() for data in ("world", "suite")},
        **{f"norm-memit-{k}-{data}": BenchConfig(methods=methods, data=data, edits=[100, 1000], hparams=hp)
           for k, (hp, methods) in NORM_MEMIT.items() for data in ("world", "suite")},
        # MetaKE whose plan sees norm control's pull (plan_pull, default since it was added; the norm-on runs above
        # were made before it), the dev world's value
        **{f"norm-pull-{name}": BenchConfig(methods=["metake"], data=data, edits=[100, 1000],
                                            hparams={"metake": {"norm_control": 0.03}})
           for name, data in (("world", "world"), ("suite", "suite"), ("zsre", f"zsre:{args.zsre}"),
                              ("counterfact", f"counterfact:{args.counterfact}"))},
        # ... and one edit per call (the norm-aware papers' sequential protocol)
        **{f"norm1-{k}-suite": BenchConfig(methods=["alphaedit", "metake"], data="suite", edits=[100, 1000], batch=1,
                                           hparams=hp) for k, hp in NORM1.items()},
        # the same comparisons on the dataset worlds: one edit per call (off and the per-key values), MEMIT/ROME,
        # prob_preference
        **{f"norm1-{k}-{name}": BenchConfig(methods=["alphaedit", "metake"], data=data, edits=[100, 1000], batch=1,
                                            hparams=NORM1[k])
           for k in ("off", "scaled") for name, data in datasets.items()},
        **{f"norm-memit-{k}-{name}": BenchConfig(methods=methods, data=data, edits=[100, 1000], hparams=hp)
           for k, (hp, methods) in NORM_MEMIT.items() for name, data in datasets.items()},
        **{f"normp-{k}-{name}": BenchConfig(methods=["alphaedit", "metake"], data=data, edits=[100, 1000], hparams=hp,
                                            protocol="prob_preference")
           for k, hp in NORM.items() for name, data in datasets.items()},
        # REPAIR's batch ablation on its own benchmark (issue 23): heterogeneous ("spread", the preset) against the
        # paper's homogeneous batches, T up to 1000
        **{f"repair-batch-{k}-zsre": BenchConfig(methods=["repair"], data=f"zsre:{args.zsre}", edits=[10, 100, 1000],
                                                 hparams={"repair": {"batching": k}})
           for k in REPAIR_BATCHING},
    }
    chosen = [x for x in args.runs.split(",") if x]  # --runs "": only rewrite RESULTS.md
    unknown = sorted(set(chosen) - set(runs))
    if unknown:
        ap.error(f"unknown run(s) {unknown}; choose from {sorted(runs)}")
    shard = parse_shard(args.shard)
    for name, cfg in runs.items():
        if name in chosen:
            run_bench(cfg, out / name, device=args.device, console=console, shard=shard, report_only=args.report)
    if args.shard is not None:
        return
    write_results(out)
    console.print(f"wrote {ROOT / 'RESULTS.md'}")


TUNING = ("**What was tuned where.** The default world is the dev world: every default and every world preset "
          "(each method class's `world_preset`: WISE's and REPAIR's optimiser, prefixes, key router, shard "
          "sizes, mask ratio and merge refit; SoLA's alpha quantile and whitening; the locate methods' layers and "
          "steps) was chosen on it, and on nothing else. The held-out test worlds and the dataset worlds were built "
          "after those choices and run with "
          "the same code and presets, untouched. No method sees an evaluation prompt: a world's calibration subjects "
          "(20%) feed the corpus and the key statistics and are never edited or probed; a dataset run holds 10% of the "
          "records out for its corpus (`editbank.leaks`), and `editbank bench` refuses a run whose corpus holds a "
          "rephrase or probe. **WISE and REPAIR route by key** in every row here (`route_by: key` on layer 0's input "
          "with a cosine gate of 0.9, and a tie between keys equal to float precision decided by the prompt's pooled "
          "key-layer input, `pooled_ties`; the dev world has no such tie): that router is ours, not the papers' "
          "(they route by the activation score). "
          "**A world is a build, not only a spec.** The same spec, seed, torch version and one build thread train "
          "other weights on another CPU instruction set: SoLA with its defaults of 2026-12-03 (`key=\"last\"`, "
          "`whitening=\"pca\"`, no subject gate) scored rel/gen/loc 1.000/0.720/0.977 at T = 100 on the first build of "
          "the dev world, 1.000/0.607/1.000 on an AVX2 rebuild (2026-12-04) and 1.000/0.777/0.967 on this machine's "
          "AVX512 build (the SoLA routing section); GRACE 1.000/0.420/1.000, 1.000/0.353/1.000 and 0.990/0.357/1.000. "
          "Differences between builds are as large as many differences between methods; compare figures only within "
          "one build (the environment lines name the weights' digest where the run recorded it). **The suite and dev "
          "sections** were rerun on 2026-12-05 with the code and defaults of that day, on the AVX512 builds every "
          "other section of that week used (SoLA with its subject gate, WISE/REPAIR with `avoid_last_layer`; WISE's "
          "cells once more after the dev world chose merge_fit for its preset). **The ZsRE and CounterFact main "
          "sections** are older: another build of each world, SoLA's defaults of 2026-12-03 and WISE's preset "
          "before mask_ratio 0.5; their WISE/REPAIR sections and every section after the dev world's are this "
          "machine's builds (SoLA's current defaults on them: the SoLA routing section). The dev "
          "section's rollback column leaves REPAIR out: its undo replays every later call with retraining, hours at "
          "T = 350 on a CPU.")


def paired_section(out: Path, prefix: str, variants: dict[str, str], title: str, intro: str, dev_note: str
                   ) -> list[str]:
    """Runs `<prefix>-<variant>-{world,suite}` side by side: per variant, the suite's mean table and the dev world."""
    runs = {(k, d): out / f"{prefix}-{k}-{d}" for k in variants for d in ("world", "suite")}
    if not all((r / "summary.json").exists() for r in runs.values()):
        first = next(iter(variants))
        return not_run(title, f"{prefix}-{first}-world,...",
                       f"Four runs (`{prefix}-{{{','.join(variants)}}}-{{world,suite}}`).")
    lines = [f"## {title}", "", intro, ""]
    for k, label in variants.items():
        summary = json.loads((runs[(k, "suite")] / "summary.json").read_text(encoding="utf-8"))
        lines += [f"### Suite, {label}", "", f"Run directory: `{runs[(k, 'suite')].relative_to(ROOT)}`. Mean ± "
                  f"sample standard deviation over the {len(summary['parts'])} worlds.", ""]
        lines += mean_table(summary["table"], len(summary["parts"])) + [""]
        lines += section(f"Dev world, {label}", runs[(k, "world")], dev_note, level="###")
    return lines


def sola_keys_section(out: Path) -> list[str]:
    """SoLA's routing, the defaults against the previous defaults, dev world and suite (and the dataset worlds with the
    defaults), measured on one build."""
    lines = paired_section(
        out, "sola-keys", {"gate": "defaults: last + pooled keys, paraphrase whitening, subject gate",
                           "pooled": "previous defaults: last + pooled keys, paraphrase whitening, no gate",
                           "last": "the defaults before those: last-token keys, PCA whitening, no gate"},
        "SoLA's routing: the defaults against the previous ones (issue 21)",
        "SoLA alone, with its defaults (`key=\"last+pooled\"`: the master input at the last prompt token and the "
        "prompt's token embeddings averaged; `whitening=\"paraphrase\"`: whitened by the spread of the calibration "
        "part's paraphrase groups; alpha_quantile 3e-4; `gate=\"subject\"`: an edit whose request names its subject "
        "routes only prompts containing the subject's tokens, within gate_alpha, the 1e-3 quantile of distances "
        "between calibration texts of one subject's different facts, or where the groups name no subject (the dataset "
        "worlds) the 3e-3 quantile of any two facts), without the "
        "gate (`gate=\"none\"`), and with the keys before those (`key=\"last\"`, `whitening=\"pca\"`, 1e-4, no "
        "gate), on the dev world and the suite, on this machine's builds of the worlds (the sections above are other "
        "builds: compare within this section). The defaults were chosen on the dev world (docs/methods/sola.md has "
        "the sweeps and the gate's own risk, prompts that name an edited subject but ask another fact).",
        "The dev world (defaults chosen here).")
    for data, name in (("counterfact", "CounterFact"), ("zsre", "ZsRE")):
        run = out / f"sola-keys-gate-{data}"
        if (run / "summary.json").exists():
            lines += section(f"{name} world, defaults", run, "SoLA's defaults (with the subject gate); the largest T "
                             "is 1000 or every record left after the calibration hold-out. The same build without the "
                             "gate: docs/methods/sola.md.", level="###")
    return lines


def norm_section(out: Path) -> list[str]:
    """AlphaEdit and MetaKE with and without norm control, dev world and suite, on one build; then the ZsRE world
    and the suite one edit per call, where run."""
    variants = {"off": "without norm control", "on": "with norm control",
                "pull": "with norm control, MetaKE's plan seeing the pull (plan_pull)"}
    lines = paired_section(
        out, "norm", variants,
        "Norm control for sequential locate writes (issue 25)",
        "AlphaEdit and MetaKE in sequential batches of 100, without norm control and with it (`norm_control` "
        "0.01 for AlphaEdit and 0.03 for MetaKE: each write also minimises mu ||W + dW - W0||^2, mu = "
        "norm_control x tr(C); the values were chosen on the dev world, docs/methods/locate.md has the sweep), on "
        "this machine's builds of the worlds in one session (compare within this section). The largest T is "
        "every editable fact of each world. The \"with norm control\" runs were made before MetaKE's plan saw the pull "
        "towards W0 that norm control adds to the write (`plan_pull`, now MetaKE's default): their MetaKE rows are "
        "`plan_pull=False`; the \"plan_pull\" runs are MetaKE alone with the same value and the pull in its plan.",
        "The dev world (the values chosen here).")
    for data, name in (("zsre", "ZsRE"), ("counterfact", "CounterFact")):
        for k, label in variants.items():
            if (out / f"norm-{k}-{data}" / "summary.json").exists():
                lines += section(f"{name} world, {label}", out / f"norm-{k}-{data}", "Batches of 100; the largest T "
                                 "is 1000 or every record left after the calibration hold-out.", level="###")
    one = {"off": "without norm control", "on": "with the values above (chosen for batches of 100)",
           "scaled": "with the values per key (÷ 100: 0.0001 AlphaEdit, 0.0003 MetaKE; what `norm_per=\"key\"` "
                     "with these values gives at one edit per call)"}
    runs = {k: out / f"norm1-{k}-suite" for k in one if (out / f"norm1-{k}-suite" / "summary.json").exists()}
    if runs:
        lines += ["### Suite, one edit per call", "", "The same methods with calls of one edit (the protocol of the "
                  "norm-aware sequential-editing papers). The penalty acts once per call, so a value chosen for calls "
                  "of 100 pulls the weights back 100 times as often per edit when edits come one at a time; the "
                  "per-key values divide it by the batch size it was chosen at (not tuned here). Mean ± sample "
                  "standard deviation over the worlds.", ""]
    for k, run in runs.items():
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        lines += [f"#### {one[k][0].upper()}{one[k][1:]}", "", f"Run directory: `{run.relative_to(ROOT)}`.", ""]
        lines += mean_table(summary["table"], len(summary["parts"])) + [""]
    return lines + dataset_sections(out, "norm1", {k: one[k] for k in ("off", "scaled")}, "one edit per call, ")


def dataset_sections(out: Path, prefix: str, variants: dict[str, str], what: str = "") -> list[str]:
    """The ZsRE and CounterFact runs `<prefix>-<variant>-{zsre,counterfact}` that exist, one section each."""
    lines = []
    for data, name in (("zsre", "ZsRE"), ("counterfact", "CounterFact")):
        for k, label in variants.items():
            run = out / f"{prefix}-{k}-{data}"
            if (run / "summary.json").exists():
                lines += section(f"{name} world, {what}{label}", run, "The largest T is 1000 or every record left "
                                 "after the calibration hold-out.", level="###")
    return lines


REPAIR_BATCHING = {"spread": "REPAIR, heterogeneous batches (\"spread\", its preset)",
                   "similar": "REPAIR, homogeneous batches (\"similar\", the paper's)"}


def repair_batch_section(out: Path) -> list[str]:
    """REPAIR's batch ablation on the ZsRE world (the README's homogeneous against heterogeneous batches)."""
    body = dataset_sections(out, "repair-batch", REPAIR_BATCHING)
    missing = [f"repair-batch-{k}-zsre" for k in REPAIR_BATCHING
               if not (out / f"repair-batch-{k}-zsre" / "summary.json").exists()]
    if not body:
        return not_run("REPAIR's batch ablation on ZsRE (issue 23)", "repair-batch-spread-zsre,...",
                       "Two runs (`repair-batch-{spread,similar}-zsre`).")
    return ["## REPAIR's batch ablation on ZsRE (issue 23)", "",
            "REPAIR with its preset (our key router, Adam, merge_fit, calls of 32, batches of 8) where only the "
            "batching differs: the call's edits dealt so that each batch holds the least similar ones (`spread`, the "
            "preset, chosen on the dev world) or grouped with their nearest (`similar`, the paper's distribution-aware "
            "batching). REPAIR's README reports locality 42.5% (homogeneous) against 29.4% (heterogeneous) at N = "
            "100 on its models. One stream per run, scored at each T on the final model of that prefix, this "
            "machine's build of the ZsRE world." + (f" Not finished yet: {', '.join(missing)} (resume with `python "
            f"scripts/results.py --runs {','.join(missing)}`)." if missing else ""), ""] + body


# REPAIR's mechanisms ablated with benchmarks/wise_repair.py (its --json lines, one file per schedule, committed under
# results/repair-ablation/): what each file is, and the command that wrote it
REPAIR_ABLATIONS = {
    "every-fact-mask05": (
        "T = every editable fact, REPAIR with WISE's mask (0.5) and without merge_fit, so that the "
        "paper's mechanisms act (at REPAIR's preset, mask 0.2 with merge_fit, feedback has nothing to recover: "
        "docs/methods/wise_repair.md); each row turns one mechanism off. One stream per world, calls of 32, final "
        "model, seed 0",
        'python benchmarks/wise_repair.py --worlds W --T 1000 --configs "repair -merge fit,repair -feedback,repair '
        '-batching,repair -distillation,repair -loss-aware merge,repair -progressive" --hp mask_ratio=0.5 --hp '
        "merge_fit=false --ablation-T 0 --undo-fraction 0 --json"),
    **{f"zsre-T{t}-mask05": (
        "The ZsRE world (REPAIR's own benchmark; its calibration texts from the records `editbank bench` holds out), "
        f"T = {t}, the base and switches of the held-out table above (mask 0.5, no merge_fit), WISE likewise in the "
        "last row. One stream, calls of 32, final model, seed 0",
        f'python benchmarks/wise_repair.py --worlds zsre:../shared/data/zsre_mend_train-1k.json --T {t} --configs '
        '"repair -merge fit,repair -feedback,repair -batching,repair -distillation,repair -loss-aware merge,repair '
        '-progressive,wise -merge fit" --hp mask_ratio=0.5 --hp merge_fit=false --ablation-T 0 --undo-fraction 0 '
        "--json") for t in (10, 100)},
    "zsre-T1000-mask05": (
        "The ZsRE world as above at T = 1000 (every record left after the calibration slice: 898), one stream per "
        "configuration, calls of 32, final model, seed 0; a resumable run (`--out` skips the streams already in the "
        "file)",
        'python benchmarks/wise_repair.py --worlds zsre:../shared/data/zsre_mend_train-1k.json --T 1000 --configs '
        '"repair -merge fit,wise -merge fit,repair -feedback,repair -batching,repair -loss-aware merge,repair '
        '-progressive,repair -distillation" --hp mask_ratio=0.5 --hp merge_fit=false --ablation-T 0 --undo-fraction 0 '
        "--out results/repair-ablation/zsre-T1000-mask05.jsonl"),
}
REPAIR_ROW_NAMES = {"repair -merge fit": "REPAIR, all mechanisms (the base of this table)",
                    "repair -feedback": "- closed-loop feedback",
                    "repair -batching": "- distribution-aware batching (batches in call order; the base deals them "
                                        "\"spread\")",
                    "repair -distillation": "- in-batch distillation",
                    "repair -loss-aware merge": "- loss-aware merge weights (equal weights)",
                    "repair -progressive": "- progressive intervention",
                    "wise -merge fit": "WISE, the same mask, no merge_fit (for comparison)"}
FIRED = (("triggers", "feedback triggers"), ("recovered", "edits recovered"), ("given_up", "given up"),
         ("reclustered", "re-clustered"), ("merges_weighted", "weighted merges"), ("decays", "strength decays"))


def repair_ablation_section(out: Path) -> list[str]:
    """REPAIR's paper mechanisms, each off in turn, on the held-out suite and the ZsRE world (issue 23)."""
    lines = ["## REPAIR's mechanisms, each off in turn (issue 23)", ""]
    for name, (what, command) in REPAIR_ABLATIONS.items():
        path = out / "repair-ablation" / f"{name}.jsonl"
        if not path.exists():
            continue
        figs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        order = list(WORLD_NOTES)  # the suite's order
        worlds = sorted(dict.fromkeys(f["world"] for f in figs), key=lambda w: order.index(w) if w in order else 99)
        configs = list(dict.fromkeys(f["config"] for f in figs))
        cell = {(f["world"], f["config"]): f for f in figs}
        lines += [f"{what}. Protocol `greedy_exact_match`; rel / gen / loc (OP) per world, OP mean ± sample standard "
                  "deviation over the worlds measured; the configuration of each row is the base's with the mechanism "
                  f"named off. `{command}`" + (" (W per world)" if " W " in command else "")
                  + ", this machine's builds of the worlds; "
                  f"`{path.relative_to(ROOT)}` holds the figures, firing counts included.", "",
                  "| configuration | " + " | ".join(f"{w}, T = {next(f['T'] for f in figs if f['world'] == w)}"
                                                   for w in worlds) + " | OP mean ± sd | OP vs the base |",
                  "|---|" + "---|" * (len(worlds) + 2)]
        base = configs[0]
        for c in configs:
            ops = [cell[(w, c)]["OP"] for w in worlds if (w, c) in cell]
            row = [REPAIR_ROW_NAMES.get(c, c)]
            for w in worlds:
                f = cell.get((w, c))
                row.append("" if f is None else f"{f['reliability']:.3f} / {f['generalization']:.3f} / "
                           f"{f['locality']:.3f} ({f['OP']:.3f})")
            done = len(ops) == len(worlds)
            sd = f" ± {statistics.stdev(ops):.3f}" if done and len(ops) > 1 else ""
            row.append(f"{statistics.mean(ops):.3f}{sd}" if done else "(not every world)")
            deltas = [cell[(w, c)]["OP"] - cell[(w, base)]["OP"] for w in worlds
                      if (w, c) in cell and (w, base) in cell]
            row.append("" if c == base or not done else f"{statistics.mean(deltas):+.3f} (" +
                       ", ".join(f"{d:+.3f}" for d in deltas) + ")")
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "How often each mechanism fired over the stream (per world, in the order of the columns above):",
                  "", "| configuration | " + " | ".join(label for _, label in FIRED) + " |",
                  "|---|" + "---|" * len(FIRED)]
        for c in configs:
            got = [cell[(w, c)]["fired"] for w in worlds if (w, c) in cell]
            lines.append(f"| {REPAIR_ROW_NAMES.get(c, c)} | " + " | ".join(
                " / ".join(str(round(g.get(k, 0))) for g in got) for k, _ in FIRED) + " |")
        asked = command.split('--configs "')[1].split('"')[0].split(",")
        missing = [REPAIR_ROW_NAMES.get(c, c) for c in asked if c not in configs]
        if missing:
            lines += ["", "Not run yet (the command goes on where it stopped): " + "; ".join(missing) + "."]
        lines.append("")
    if len(lines) == 2:
        return []
    return lines + ["The ablation at T = 100 with REPAIR's preset (merge_fit on) is in docs/methods/wise_repair.md.",
                    ""]


def norm_prob_section(out: Path) -> list[str]:
    """The norm-control runs again, scored by prob_preference (CounterFact's measure)."""
    variants = {"off": "without norm control, prob_preference", "on": "with norm control, prob_preference"}
    return paired_section(
        out, "normp", variants,
        "Norm control under prob_preference (issue 25)",
        "The runs of the norm-control section again (AlphaEdit and MetaKE, batches of 100, the same values), scored "
        "by `prob_preference` instead of greedy exact match: an edit counts when the new target's mean token "
        "log-probability beats the true object's on the prompt (reliability) and each rephrase (generalization); a "
        "probe keeps its own answer more likely than the edit's target (locality).",
        "The dev world.") + dataset_sections(out, "normp", variants)


def norm_memit_section(out: Path) -> list[str]:
    """MEMIT with and without norm control, ROME beside it, dev world and suite, on one build."""
    variants = {"off": "without norm control (MEMIT and ROME)", "on": "MEMIT with norm control"}
    return paired_section(
        out, "norm-memit", variants,
        "Norm control for MEMIT, and ROME (issue 25)",
        "MEMIT in sequential batches of 100 without norm control and with it (`norm_control` 0.03, chosen on the dev "
        "world: docs/methods/locate.md has the sweep), and ROME (calls of 100, each request written alone; no norm "
        "control: its rank-one closed form has none here), on this machine's builds of the worlds in one session.",
        "The dev world (the value chosen here).") + dataset_sections(out, "norm-memit", variants)


def write_results(out: Path) -> None:
    world_note = ("**Dev world.** The built-in default world: a 3-layer x 128 Llama trained on 500 invented facts "
                  "(350 editable: 20% of the subjects are its calibration part and 10% its locality controls; T is "
                  "capped there), trained at one thread so every machine builds the same model. Every preset was "
                  "chosen here, so these figures are optimistic; the held-out sections below are the ones to quote.")
    suite_note = ("Three built-in worlds no preset was chosen on (`editbank.world.test_specs`, `World.build(name)`), "
                  "each different from the dev world in what matters for editing: template style, prompt length and "
                  "an unrelated opening sentence, multi-token objects with shared first tokens, facts per subject, "
                  "relation count, width and depth. `editbank bench --data suite` runs them.")
    cf_note = ("A world trained on the original facts of CounterFact's EasyEdit validation split (1,919 records: "
               "each prompt and rephrase with its true answer, each neighbourhood prompt with its own answer; "
               "`editbank world build --dataset counterfact:PATH`), then edited with the records' `target_new`. "
               "192 records are held out of the run as its calibration slice. Generalization is low for the routed "
               "methods (SoLA, GRACE) because most CounterFact rephrases open with an unrelated sentence, which moves "
               "the key away from the edit's.")
    zsre_note = ("A world trained on ZsRE's questions with their original answers (`zsre_mend_train-1k.json`, the "
                 "standard benchmark of WISE, GRACE and REPAIR: each question and its rephrase with the record's "
                 "answer, each NQ locality question with its own; `editbank world build --dataset zsre:PATH`), then "
                 "edited with the records' `alt`. 100 records are held out of the run as its calibration slice. Its "
                 "world (2,990 training pairs) trained all 6,000 steps to a train exact match of 100% in 75 min at "
                 "one thread. T = 898 is every record left after the slice; the table was run as two shards "
                 "(`--shard 0/2`, `1/2`) and merged (`--report`). WISE and REPAIR: the next sections.")
    slow = ("WISE and REPAIR at T up to 100, in their own run directory, on this machine's build of the world (the "
            "section above is another build: compare WISE and REPAIR with each other here), 2026-12-05. **WISE without "
            "merge_fit** here (`wise.merge_fit=false`: its preset before the dev world chose merge_fit for it the same "
            "day; the next table is WISE with its preset); REPAIR with its preset (merge_fit on). T = 1000 was not run "
            "(REPAIR's merges refit the memory: hours on a CPU).")
    slow_preset = ("WISE with its world preset (merge_fit on, the dev world's choice), on the same build as the "
                   "previous table.")
    lines = ["# Results", "",
             "Regenerate with `python scripts/results.py` (resumable; docs/bench.md explains the run directories; "
             "`--shard I/N` spreads the cells over machines). Every number comes from the run directories under "
             "`results/`; nothing here is typed by hand except the published reference rows at the end, which are "
             "the papers' own numbers on their models.", "", TUNING, ""]
    if (out / "suite" / "summary.json").exists():
        lines += suite_section(out / "suite", suite_note)
    else:
        lines += not_run("Held-out test worlds (the suite)", "suite", suite_note)
    for name, title, note in (("zsre", "ZsRE world (held out)", zsre_note),
                              ("zsre-wise", "ZsRE world: WISE and REPAIR (held out)", slow),
                              ("zsre-wise-preset", "ZsRE world: WISE with its preset (held out)", slow_preset),
                              ("counterfact", "CounterFact world (held out)", cf_note),
                              ("counterfact-wise", "CounterFact world: WISE and REPAIR (held out)", slow),
                              ("counterfact-wise-preset", "CounterFact world: WISE with its preset (held out)",
                               slow_preset),
                              ("world", "Default world (dev: the presets were chosen here)", world_note)):
        if (out / name / "summary.json").exists():  # a run done earlier keeps its section
            lines += section(title, out / name, note)
        else:
            lines += not_run(title, name, note)
    lines += sola_keys_section(out)
    lines += paired_section(
        out, "grace-gate", {"on": "with the subject gate", "off": "without it (the paper's router)"},
        "GRACE with SoLA's subject gate (issue 21 item 4)",
        "GRACE alone with `gate=\"subject\"` (an entry whose edit names its subject is a candidate only for prompts "
        "containing the subject's tokens, starts at `gate_radius` 4 x eps_init, and the codebook's rules run among a "
        "prompt's candidates; 4 chosen on the dev world, docs/methods/sola.md) and without it, on this machine's "
        "builds of the worlds. The gate is an option; GRACE's default is the paper's router.",
        "The dev world (gate_radius chosen here).")
    lines += norm_section(out)
    lines += norm_memit_section(out)
    lines += norm_prob_section(out)
    lines += repair_batch_section(out)
    lines += repair_ablation_section(out)
    lines += PUBLISHED.read_text(encoding="utf-8").splitlines()
    (ROOT / "RESULTS.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
