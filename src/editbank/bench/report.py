"""summary.json and results.md of a bench run directory, from its JSONL rows (mean and spread over seeds)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .config import BenchConfig
from .files import read_jsonl, write_json

COLUMNS = ("reliability", "generalization", "locality", "OP", "seconds_per_edit")
EXTRA = ("weight_drift", "realised_ratio", "proxy_ratio")  # summarised, not tabled: locate methods' write figures


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
                          **{k: _stats([r.get(k) for r in cell]) for k in (*COLUMNS, "portability",
                                                                            *EXTRA)}})
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
    failures = {(f["method"], f["seed"]): f["error"] for f in read_jsonl(out / "failures.jsonl")}
    done = {(r["method"], r["seed"]) for r in rows}
    failed = [{"method": m, "seed": s, "error": e} for (m, s), e in failures.items() if (m, s) not in done]
    return {"table": table, "rollback": rollback, "failed": failed}


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


def failed_lines(summary: dict[str, Any]) -> list[str]:
    """The cells that failed (a method that cannot run on this data), one line each."""
    return ["", *(f"- **{f['method']} seed {f['seed']} failed**: {f['error']}" for f in summary.get("failed", []))] \
        if summary.get("failed") else []


def markdown(cfg: BenchConfig, data: str, ts: list[int], summary: dict[str, Any], plots: list[str]) -> str:
    lines = [f"# editbank bench: {', '.join(cfg.methods)} on {data}", "",
             f"- protocol: `{cfg.protocol}` (every score below); OP is the geometric mean of reliability, "
             "generalization and locality",
             "- schedule: each T is the first T edits of one stream, all scored on the model right after the T-th "
             "edit (final-model evaluation); T = " + ", ".join(map(str, ts)),
             f"- seeds: {', '.join(map(str, cfg.seeds))} (mean ± sample standard deviation where more than one)", ""]
    lines += score_table(summary) + failed_lines(summary)
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


def suite_table(cfg: BenchConfig, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (method, requested T) with the mean and spread over parts of each part's mean over seeds; a T a part
    caps (its every editable fact) is that part's largest T, and the row's `T_range` says which Ts were pooled."""
    table = []
    for m in cfg.methods:
        for t in cfg.edits:
            rows, ts = [], []
            for s in summaries:
                t_part = min(t, s["available"])
                hit = [r for r in s["table"] if r["method"] == m and r["T"] == t_part]
                if hit:
                    rows.append(hit[0])
                    ts.append(t_part)
            if not rows:
                continue
            means = {k: _stats([r[k]["mean"] if r[k] else None for r in rows]) for k in (*COLUMNS, "portability")}
            table.append({"method": m, "T": t, "T_range": ts, "parts": len(rows), **means})
    # a requested T above every part's size repeats the row below it: keep the first
    out, seen = [], set()
    for row in table:
        key = (row["method"], tuple(row["T_range"]))
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _t_label(row: dict[str, Any]) -> str:
    lo, hi = min(row["T_range"]), max(row["T_range"])
    if lo == hi == row["T"]:
        return str(row["T"])
    if hi < row["T"]:  # every part capped: each part's every editable fact
        return f"all ({lo}-{hi})" if lo != hi else f"all ({lo})"
    return f"up to {row['T']} ({lo}-{hi}: the smaller parts' every fact)"


def write_suite(out: Path, cfg: BenchConfig, parts: list[str], summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json and results.md of a multi-part run: each part's table, then the mean ± spread over parts."""
    from .run import part_name

    names = [part_name(p) for p in parts]  # every part has a summary: run_bench refuses to report one that never ran
    table = suite_table(cfg, summaries)
    summary = {"parts": dict(zip(names, summaries)), "table": table, "protocol": cfg.protocol, "seeds": cfg.seeds,
               "data": [s["data"] for s in summaries]}
    write_json(out / "summary.json", summary)
    lines = [f"# editbank bench: {', '.join(cfg.methods)} on {len(parts)} parts", "",
             f"- protocol: `{cfg.protocol}`; OP is the geometric mean of reliability, generalization and locality",
             f"- seeds: {', '.join(map(str, cfg.seeds))}; each part's score is its mean over seeds",
             "- parts: " + "; ".join(f"`{n}` ({s['data']})" for n, s in zip(names, summaries)), "",
             f"## Mean ± spread (sample standard deviation) over the {len(parts)} parts", ""]
    lines += mean_table(table, len(parts))
    for name, s in zip(names, summaries):
        lines += ["", f"## {name}: {s['data']}", ""] + score_table(s) + failed_lines(s)
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary


def mean_table(table: list[dict[str, Any]], n_parts: int | None = None) -> list[str]:
    """The Markdown rows of a suite's mean-over-parts table (a method that failed on a part: over the others, said)."""
    lines = ["| method | T | reliability | generalization | locality | OP | s/edit |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        only = f" (on {row['parts']} of {n_parts} parts)" if n_parts and row["parts"] < n_parts else ""
        lines.append(f"| {row['method']}{only} | {_t_label(row)} | " + " | ".join(
            fmt(row[k], 2 if k == "seconds_per_edit" else 3) for k in COLUMNS) + " |")
    return lines
