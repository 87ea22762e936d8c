"""summary.json and results.md of a bench run directory, from its JSONL rows (mean and spread over seeds)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .config import BenchConfig
from .files import read_jsonl, write_json

COLUMNS = ("reliability", "generalization", "locality", "OP", "seconds_per_edit")


def _stats(xs: list[float | None]) -> dict[str, float] | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(out: Path, methods: list[str]) -> dict[str, Any]:
    rows = read_jsonl(out / "results.jsonl")
    undo = read_jsonl(out / "undo.jsonl")
    table: list[dict[str, Any]] = []
    for m in methods:
        for t in sorted({r["T"] for r in rows if r["method"] == m}):
            cell = [r for r in rows if r["method"] == m and r["T"] == t]
            table.append({"method": m, "T": t, "protocol": cell[0]["protocol"],
                          "seeds": sorted(r["seed"] for r in cell),
                          **{k: _stats([r.get(k) for r in cell]) for k in (*COLUMNS, "portability")}})
    rollback = []
    for m in methods:
        cell = [u for u in undo if u["method"] == m]
        if cell:
            rollback.append({"method": m, "T": cell[0]["T"], "protocol": cell[0]["protocol"],
                             "undone": _stats([u["undone"] for u in cell]),
                             "restored": _stats([u["restored"] for u in cell]),
                             "kept_change": _stats([u["kept_change"] for u in cell]),
                             **{f"kept_{k}": _stats([u["kept"][k] for u in cell])
                                for k in ("reliability", "generalization", "locality")}})
    return {"table": table, "rollback": rollback}


def fmt(s: dict[str, float] | None, digits: int = 3) -> str:
    if s is None:
        return "-"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")


def score_table(summary: dict[str, Any]) -> list[str]:
    """The Markdown rows of the scores table: method, T, the metrics, OP and seconds per edit."""
    lines = ["| method | T | reliability | generalization | locality | OP | s/edit |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in summary["table"]:
        lines.append(f"| {row['method']} | {row['T']} | " + " | ".join(
            fmt(row[k], 2 if k == "seconds_per_edit" else 3) for k in COLUMNS) + " |")
    return lines


def markdown(cfg: BenchConfig, data: str, ts: list[int], summary: dict[str, Any], plots: list[str]) -> str:
    lines = [f"# editbank bench: {', '.join(cfg.methods)} on {data}", "",
             f"- protocol: `{cfg.protocol}` (every score below); OP is the geometric mean of reliability, "
             "generalization and locality",
             "- schedule: each T is the first T edits of one stream, all scored on the model right after the T-th "
             "edit (final-model evaluation); T = " + ", ".join(map(str, ts)),
             f"- seeds: {', '.join(map(str, cfg.seeds))} (mean ± sample standard deviation where more than one)", ""]
    lines += score_table(summary)
    if summary["rollback"]:
        lines += ["", f"Rollback at the largest T: a random {cfg.undo_fraction:.0%} of the edits undone; restored = "
                  "share whose teacher-forced predictions equal the unedited model's (for methods that write shared "
                  "weights the other edits stay, so this is informative only); kept = the other edits' scores after.",
                  "", "| method | T | undone | restored | kept reliability | kept generalization | kept locality "
                  "| largest kept change |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for u in summary["rollback"]:
            lines.append(f"| {u['method']} | {u['T']} | {fmt(u['undone'], 0)} | {fmt(u['restored'])} | "
                         f"{fmt(u['kept_reliability'])} | {fmt(u['kept_generalization'])} | "
                         f"{fmt(u['kept_locality'])} | {fmt(u['kept_change'])} |")
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write(out: Path, cfg: BenchConfig, data: str, ts: list[int]) -> dict[str, Any]:
    from .plots import write_plots

    summary = summarize(out, cfg.methods)
    summary.update({"data": data, "protocol": cfg.protocol, "T": ts, "seeds": cfg.seeds})
    write_json(out / "summary.json", summary)
    plots = write_plots(out, cfg, summary)
    (out / "results.md").write_text(markdown(cfg, data, ts, summary, plots), encoding="utf-8")
    return summary
