"""SIGKILL in the middle of an edit, an undo and an export: the store holds each operation whole or not at all,
and the reopened editor equals one that performed exactly the committed operations."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from editbank import Editor
from editbank.store import EditStore
from editbank.tokens import make_batch

N_REQUESTS = 40
CHILD = textwrap.dedent("""
    import random, shutil, sys, time
    from pathlib import Path
    from editbank import Editor, World
    world, method, store, log = sys.argv[1:5]
    reqs = World.load(world).edit_requests(n=%d, seed=0)
    ed = Editor.open(world, method=method, store=store)
    def mark(s):
        with open(log, "a") as f:
            f.write(s + "\\n")
    class Slow:  # a short random pause before each store statement widens every operation, so the parent's kill
        def __init__(self, db):  # lands inside it, at a random statement, even when the operation itself is fast
            self.db, self.rng = db, random.Random()
        def execute(self, *a):
            time.sleep(self.rng.uniform(0.002, 0.02))
            return self.db.execute(*a)
        def __getattr__(self, name):
            return getattr(self.db, name)
    ed.store._db = Slow(ed.store._db)
    mark("ready")
    rng = random.Random(len(ed.edits()))
    i = len(ed.edits())
    while i < len(reqs):
        mark(f"begin edit {i}"); ed.edit(reqs[i]); mark(f"end edit {i}")
        i += 1
        active = ed.edits("active")
        if i %% 2 == 0 and active:
            e = rng.choice(active)
            mark(f"begin undo {e.id}"); ed.undo(e.id); mark(f"end undo {e.id}")
        if i %% 3 == 0:
            out = Path(store).parent / "export"
            shutil.rmtree(out, ignore_errors=True)
            mark(f"begin export {i}"); ed.store.export(out); mark(f"end export {i}")
""") % N_REQUESTS


def kill_during(kind: str, world, method: str, store: Path, log: Path) -> bool:
    """Run the child until it begins a `kind` operation, SIGKILL it; True if the operation had not ended."""
    log.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(world.path), method, str(store), str(log)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            lines = log.read_text().splitlines()
            begun = [ln for ln in lines if ln.startswith(f"begin {kind}")]
            if begun:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                last = begun[-1].replace("begin", "end")
                return last not in log.read_text().splitlines()
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError(f"the child never began a {kind} ({proc.returncode}): {log.read_text()[-500:]}")


def logits(ed: Editor, reqs) -> torch.Tensor:
    b = make_batch(ed.tokenizer, [(r.prompt, r.target) for r in reqs] + [p for r in reqs for p in r.locality])
    return ed.logits(b.input_ids, b.attention_mask, b.query_index)


def check_committed(world, method: str, store: Path) -> int:
    """The reopened store equals replaying exactly its committed operations (edits, then undos, in time order)."""
    reqs = world.edit_requests(n=N_REQUESTS, seed=0)
    ed = Editor.open(world.path, method=method, store=store)
    edits = ed.edits()
    assert [(e.request.prompt, e.request.target) for e in edits] == [(r.prompt, r.target) for r in
                                                                       reqs[: len(edits)]]
    assert {e.status for e in edits} <= {"active", "reverted"}
    events = sorted([(e.created, 0, e.id) for e in edits] + [(e.updated, 1, e.id) for e in edits
                                                              if e.status == "reverted"])
    ref = Editor.open(world.path, method=method)
    for _, kind, eid in events:
        if kind == 0:
            assert ref.edit(reqs[eid - 1]).id == eid
        else:
            ref.undo(eid)
    assert torch.equal(logits(ed, reqs), logits(ref, reqs))
    ed.close()
    ref.close()
    return len(edits)


ROUND = ("edit", "undo", "export")


@pytest.mark.parametrize("method, kinds", [("sola", ROUND), pytest.param("sola", ROUND * 3, marks=pytest.mark.slow),
                                           pytest.param("ft", ROUND * 2, marks=pytest.mark.slow)])
def test_sigkill_mid_operation_leaves_whole_operations(small_world, tmp_path, method, kinds):
    store, log = tmp_path / "s.db", tmp_path / "log.txt"
    mid = 0
    done = 0
    for kind in kinds:
        mid += kill_during(kind, small_world, method, store, log)
        n = check_committed(small_world, method, store)
        assert n >= done, "a committed edit disappeared"
        done = n
        export = tmp_path / "export"
        if kind == "export" and export.exists():  # a half-written export is refused whole, never half-imported
            target = tmp_path / f"import-{mid}.db"
            try:
                EditStore.import_folder(export, target).close()
                assert (export / "manifest.json").exists()
            except ValueError:
                assert not target.exists()
    assert mid >= len(kinds) - 1, f"only {mid} of {len(kinds)} kills landed inside their operation"
