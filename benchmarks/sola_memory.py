"""Bounded memory: stream 10,000 SoLA edits on the small world; peak resident memory and bytes per edit.

Requests are invented: 10,000 distinct subjects asked with the world's templates, so every edit is a new LoRA and a
new key. Every `--every` edits it records resident memory (VmRSS after a garbage collection), the bytes the bank's
tensors hold, and the store file's size. It then fits resident memory against the number of edits. Memory should
grow linearly, at about the bank's own bytes per edit. A slope well above that, or a curve bending upward, would
mean something else accumulates: optimiser states, autograd graphs or caches.

    python benchmarks/sola_memory.py --edits 10000 [--every 1000] [--size small]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import tempfile
import time
from pathlib import Path

import torch

from editbank import Editor, EditRequest, World
from editbank.world.generate import invent_name


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def invented_requests(world: World, n: int, seed: int = 0) -> list[EditRequest]:
    rng = random.Random(seed)
    taken = set(world.entities)
    out = []
    while len(out) < n:
        name = invent_name(rng) + invent_name(rng).lower()
        if name in taken:
            continue
        taken.add(name)
        rel = rng.choice(world.relations)
        out.append(EditRequest(prompt=rel.fill(rng.choice(rel.templates), name), target=rng.choice(rel.objects),
                               subject=name, key=f"{name}/{rel.name}"))
    return out


def bank_bytes(ed: Editor) -> int:
    """Bytes of every tensor the SoLA bank holds (its capacity doubles, so this steps up)."""
    total = 0
    for v in vars(ed.method.bank).values():
        for t in v if isinstance(v, list) else [v]:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=10000)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--size", default="small")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = World.build(args.size, progress=False)
    reqs = invented_requests(world, args.edits)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "sola.db"
        ed = Editor.open(world.path, method="sola", store=store)
        gc.collect()
        base = rss_bytes()
        t0 = time.perf_counter()
        for i, r in enumerate(reqs, 1):
            ed.edit(r, check=False)
            if i % args.every == 0 or i == len(reqs):
                gc.collect()
                rows.append({"edits": i, "rss": rss_bytes(), "bank": bank_bytes(ed), "store": store.stat().st_size,
                             "seconds": round(time.perf_counter() - t0, 1)})
                if not args.json:
                    r_ = rows[-1]
                    print(f"{i:6d} edits: RSS {r_['rss'] / 2**20:8.1f} MiB (+{(r_['rss'] - base) / 2**20:7.1f}), "
                          f"bank {r_['bank'] / 2**20:7.1f} MiB, store {r_['store'] / 2**20:7.1f} MiB, "
                          f"{r_['seconds']:.0f} s", flush=True)
        ed.close()
    xs = [r["edits"] for r in rows]
    ys = [r["rss"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    fit = [my + slope * (x - mx) for x in xs]
    ss_res = sum((y - f) ** 2 for y, f in zip(ys, fit))
    ss_tot = sum((y - my) ** 2 for y in ys)
    half = len(rows) // 2
    early = (ys[half] - ys[0]) / max(xs[half] - xs[0], 1) if half else slope
    late = (ys[-1] - ys[half]) / max(xs[-1] - xs[half], 1) if half else slope
    fig = {"edits": args.edits, "world": args.size, "base_rss_mib": round(base / 2**20, 1),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "rss_bytes_per_edit": round(slope), "bank_bytes_per_edit": round(rows[-1]["bank"] / rows[-1]["edits"]),
           "store_bytes_per_edit": round(rows[-1]["store"] / rows[-1]["edits"]),
           "r2": round(1 - ss_res / ss_tot, 4) if ss_tot else 1.0,
           "slope_late_over_early": round(late / early, 2) if early else None,
           "seconds_per_edit": round(rows[-1]["seconds"] / args.edits, 4), "rows": rows}
    if args.json:
        print(json.dumps(fig))
    else:
        print(f"peak RSS {fig['peak_rss_mib']} MiB (start {fig['base_rss_mib']} MiB); RSS grows "
              f"{fig['rss_bytes_per_edit']} B/edit (linear fit R^2 {fig['r2']}, second-half slope / first-half "
              f"{fig['slope_late_over_early']}); the bank holds {fig['bank_bytes_per_edit']} B/edit; the store "
              f"{fig['store_bytes_per_edit']} B/edit on disk; {fig['seconds_per_edit']} s/edit")


if __name__ == "__main__":
    main()
