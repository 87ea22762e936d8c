"""PNG plots of a bench run: each metric against T (one line per method) and retention heatmaps."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .config import BenchConfig
from .files import read_jsonl

PANELS = (("reliability", "reliability"), ("generalization", "generalization"), ("locality", "locality"),
          ("OP", "OP (geometric mean)"), ("seconds_per_edit", "seconds per edit"))
DRIFT = ("weight_drift", "largest ‖W − W0‖ / ‖W0‖")  # a panel when a method writes weights


def write_plots(out: Path, cfg: BenchConfig, summary: dict[str, Any]) -> list[str]:
    """Write the plots; return their paths relative to `out` (none, with a warning, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots (pip install 'editbank[bench]')", stacklevel=2)
        return []
    (out / "plots").mkdir(exist_ok=True)
    written = []
    panels = PANELS + ((DRIFT,) if any(r.get("weight_drift") for r in summary["table"]) else ())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (key, label) in zip(axes, panels):
        for m in cfg.methods:
            rows = [r for r in summary["table"] if r["method"] == m and r.get(key) is not None]
            if not rows:
                continue
            ts = [r["T"] for r in rows]
            ax.errorbar(ts, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] for r in rows], marker="o",
                        capsize=3, label=m)
        ax.set_xscale("log")
        ax.set_xlabel("number of edits T")
        ax.set_ylabel(label)
        ax.set_title(label)
        if key not in ("seconds_per_edit", "weight_drift"):
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="method", loc="center right")
    fig.suptitle(f"{summary['data']}: scores on the final model ({cfg.protocol})")
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.savefig(out / "plots" / "metrics.png", dpi=110)
    plt.close(fig)
    written.append("plots/metrics.png")
    retention = read_jsonl(out / "retention.jsonl")
    for m in cfg.methods:
        rows = sorted((r for r in retention if r["method"] == m and r["seed"] == cfg.seeds[0]), key=lambda r: r["step"])
        if not rows:
            continue
        width = rows[-1]["step"]
        grid = [[float("nan")] * width for _ in rows]
        for i, r in enumerate(rows):
            grid[i][: len(r["reliability"])] = r["reliability"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        steps = [r["step"] for r in rows]
        im = ax.pcolormesh([x + 0.5 for x in range(width + 1)], [0, *steps], grid, vmin=0, vmax=1, cmap="viridis")
        ax.invert_yaxis()
        ax.set_xlabel("edit i (stream order)")
        ax.set_ylabel("edits written t")
        ax.set_title(f"{m}: reliability of edit i after t edits (seed {cfg.seeds[0]}, {cfg.protocol})")
        fig.colorbar(im, ax=ax, label="reliability")
        fig.tight_layout()
        name = f"plots/retention_{m}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written
