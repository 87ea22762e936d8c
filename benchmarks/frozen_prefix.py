"""What the frozen prefix saves: each method's training loops with and without it, measured in one run.

A training loop that feeds one batch at every step and trains nothing below decoder layer L runs the layers below
L once (`Method.frozen_below`, `models.hooks.frozen_prefix`). Per method, one stream of `--edits` edits on a built
world (its world preset, calls of its bench batch, the edit check off) without the frozen prefix and one with it,
alternated `--rounds` times; printed: CPU seconds per edit of each (the best round), their ratio, how many layers
each method's loops skip (of the model's), and whether the two streams' final states are bitwise equal (they must
be: the skipped layers would compute exactly what they computed on the first step).

    python benchmarks/frozen_prefix.py                                  # every training method, world "default"
    python benchmarks/frozen_prefix.py --world test-dense --methods wise,repair --edits 64
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from rich.console import Console
from rich.table import Table

from editbank import Editor
from editbank.methods.base import Method, get_method
from editbank.world import World

REAL = Method.frozen_below


def stream(world: World, method: str, reqs, frozen: bool) -> tuple[float, dict[str, torch.Tensor], str]:
    """(CPU seconds per edit, the final state's tensors, "layers skipped of the model's") of one stream."""
    skipped = []

    def spy(self, layer: int):
        skipped.append(layer)
        return REAL(self, layer) if frozen else contextlib.nullcontext()

    Method.frozen_below = spy
    try:
        cls = get_method(method)
        ed = Editor.open(world.path, method=method, store=None, seed=0, **cls.world_preset)
        ed.method.prepare()
        t0 = time.process_time()
        for i in range(0, len(reqs), cls.bench_batch):
            ed.edit(reqs[i : i + cls.bench_batch], check=False)
        seconds = (time.process_time() - t0) / len(reqs)
        tensors = ed.model.state_dict() if cls.edits_in_weights else ed.method.state_dict()[0]
        state = {k: v.detach().clone() for k, v in tensors.items()}
        depth = f"{max(skipped, default=0)} of {ed.method.arch.num_layers}"
        ed.close()
    finally:
        Method.frozen_below = REAL
    return seconds, state, depth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="default", help="a built world (size or test world name)")
    ap.add_argument("--methods", default="wise,repair,grace,sola,ft,memit,alphaedit,metake")
    ap.add_argument("--edits", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="streams of each kind, alternated; the best is kept")
    args = ap.parse_args()
    world = World.build(args.world)
    reqs = world.edit_requests(n=min(args.edits, len(world.editable_facts)), seed=0)
    table = Table("method", "s/edit without", "s/edit with", "with / without", "layers skipped", "bitwise equal",
                  title=f"world {world.name}, {len(reqs)} edits, CPU seconds per edit (best of {args.rounds})")
    for method in args.methods.split(","):
        runs: dict[bool, list] = {False: [], True: []}
        for _ in range(args.rounds):
            for frozen in (False, True):
                runs[frozen].append(stream(world, method, reqs, frozen))
        off, on = (min(r[0] for r in runs[k]) for k in (False, True))
        a, b = runs[False][0][1], runs[True][0][1]
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        table.add_row(method, f"{off:.3f}", f"{on:.3f}", f"{on / off:.2f}", runs[True][0][2], "yes" if same else "NO")
    Console().print(table)


if __name__ == "__main__":
    main()
