"""Regenerate RESULTS.md: `editbank bench` on the default world and on a CounterFact world, plus published rows.

    python scripts/results.py                       # every landed method; resumes the runs under results/
    python scripts/results.py --counterfact PATH    # default: ../shared/data/easyedit_counterfact-val.json

Each benchmark is an ordinary resumable run directory (results/world, results/counterfact); rerunning the command
after an interruption goes on where it stopped, and rerunning it when both are complete only rewrites RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from editbank.bench import BenchConfig, run_bench
from editbank.bench.report import fmt, score_table
from editbank.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("sola", "grace", "ft", "wise", "repair", "rome", "memit", "alphaedit", "metake")
PUBLISHED = ROOT / "scripts" / "published.md"


def section(title: str, run: Path, note: str) -> list[str]:
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    params = json.loads((run / "params.json").read_text(encoding="utf-8"))
    sessions = [json.loads(x) for x in (run / "sessions.jsonl").read_text(encoding="utf-8").splitlines()]
    env = sessions[-1]
    lines = [f"## {title}", "", note, "",
             f"Data: {summary['data']}. Protocol: `{summary['protocol']}` on every number. Schedule: "
             f"{params['schedule']}. Seeds: {', '.join(map(str, summary['seeds']))}. Run on torch {env['torch']}, "
             f"{env['device']}, {env['threads']} threads ({env['cuda'] or 'CPU'}). Run directory: "
             f"`{run.relative_to(ROOT)}` (`params.json` holds every resolved hyperparameter).", ""]
    lines += score_table(summary)
    if summary["rollback"]:
        lines += ["", "Undo of a random 10% at the largest T (restored: share of undone edits back to the unedited "
                  "model's predictions; kept change: largest move of the kept edits' scores). Restored below 1 means a "
                  "kept edit answers an undone prompt; the model still equals one that never received the undone "
                  "edit (on the default world at T = 450 SoLA's one miss is 'The currency of Broushos is the', "
                  "which the kept edit 'Fegopam\'s money is the -> pell' answers with the same target):", "",
                  "| method | undone | restored | largest kept change |", "|---|---:|---:|---:|"]
        for u in summary["rollback"]:
            lines.append(f"| {u['method']} | {fmt(u['undone'], 0)} | {fmt(u['restored'])} | "
                         f"{fmt(u['kept_change'])} |")
    plots = sorted((run / "plots").glob("*.png"))
    lines += [""] + [f"![{p.stem}]({p.relative_to(ROOT)})" for p in plots if p.name == "metrics.png"]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(m for m in ORDER if m in METHODS), help="world run")
    ap.add_argument("--edits", default="1,10,100,1000", help="world run (capped at the world's 450 facts)")
    ap.add_argument("--undo-methods", default="sola,grace,wise,repair",
                    help="world run: methods whose rollback is measured (the others replay every later edit)")
    ap.add_argument("--cf-methods", default="sola,grace,ft,rome,memit,alphaedit,metake",
                    help="CounterFact run (WISE/REPAIR take 2-4 s per edit on a CPU)")
    ap.add_argument("--cf-edits", default="1,10,100,1000")
    ap.add_argument("--counterfact", default=str(ROOT.parent / "shared" / "data" / "easyedit_counterfact-val.json"))
    ap.add_argument("--runs", default="world,counterfact", help="which runs to (re)do; the others' sections say so")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    console = Console()
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    out = Path(args.out)
    runs = {
        "world": BenchConfig(methods=args.methods.split(","), data="world", edits=ints(args.edits), undo_fraction=0.1,
                             undo_methods=args.undo_methods.split(","), eval_every=50),
        "counterfact": BenchConfig(methods=args.cf_methods.split(","), data=f"counterfact:{args.counterfact}",
                                   edits=ints(args.cf_edits)),
    }
    chosen = args.runs.split(",")
    for name, cfg in runs.items():
        if name in chosen:
            run_bench(cfg, out / name, device=args.device, console=console)
    world_note = ("The built-in default world: a 3-layer x 128 Llama trained on 500 invented facts (450 editable; "
                  "T is capped there), trained at one thread so every machine builds the same model. Every method runs "
                  "with the world settings recorded in params.json.")
    cf_note = ("A world trained on the original facts of CounterFact's EasyEdit validation split (1,919 records: "
               "each prompt and rephrase with its true answer, each neighbourhood prompt with its own answer; "
               "`editbank world build --dataset counterfact:PATH`), then edited with the records' `target_new`. "
               "WISE and REPAIR are not in this run: at 1-4 s per edit on a CPU they did not fit the session that "
               "produced it. Generalization is low for the routed methods (SoLA, GRACE) because most CounterFact "
               "rephrases open with an unrelated sentence, which moves the key away from the edit's.")
    lines = ["# Results", "",
             "Regenerate with `python scripts/results.py` (resumable; docs/bench.md explains the run directories). "
             "Every number comes from the run directories under `results/`; nothing here is typed by hand except "
             "the published reference rows at the end, which are the papers' own numbers on their models.", ""]
    for name, title, note in (("world", "Default world", world_note), ("counterfact", "CounterFact world", cf_note)):
        if (out / name / "summary.json").exists():  # a run done earlier keeps its section
            lines += section(title, out / name, note)
        else:
            lines += [f"## {title}", "", note, "", "Not in this version of RESULTS.md: `python scripts/results.py` "
                      f"(or `--runs {name}`) produces this section.", ""]
    lines += PUBLISHED.read_text(encoding="utf-8").splitlines()
    (ROOT / "RESULTS.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print(f"wrote {ROOT / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
