"""`editbank bench`: run directory contents, scores equal to a direct stream, resume after a kill, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from editbank import Editor
from editbank.bench import BenchConfig, BenchError, run_bench
from editbank.bench.files import append_jsonl, read_jsonl
from editbank.cli import app

SCORES = ("reliability", "generalization", "locality", "OP")


def scores(out, keys=SCORES):
    return sorted((r["method"], r["seed"], r["T"], *(r[k] for k in keys)) for r in read_jsonl(out / "results.jsonl"))


def test_bench_writes_the_run_directory_and_its_scores_are_a_direct_streams(small_world, tmp_path):
    cfg = BenchConfig(methods=["grace", "ft"], data="world:small", edits=[2, 5], seeds=[0, 1], undo_fraction=0.4,
                      eval_every=2, undo_methods=["grace"])
    out = tmp_path / "run"
    summary = run_bench(cfg, out, progress=False)
    for name in ("params.json", "results.jsonl", "records.jsonl", "retention.jsonl", "undo.jsonl", "summary.json",
                 "results.md", "sessions.jsonl"):
        assert (out / name).is_file(), name
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 2 * 2 * 2 and all(r["protocol"] == "greedy_exact_match" for r in rows)
    assert len(read_jsonl(out / "records.jsonl")) == 2 * 2 * (2 + 5)
    steps = [r["step"] for r in read_jsonl(out / "retention.jsonl") if r["method"] == "ft" and r["seed"] == 0]
    assert steps == [2, 4, 5]
    # the T=5 row of (ft, seed 1) is what editing those 5 requests one by one and evaluating gives
    reqs = small_world.edit_requests(n=5, seed=1)
    ed = Editor.open(small_world.path, method="ft", seed=1)
    for r in reqs:
        ed.edit([r])
    direct = ed.evaluate(reqs, protocol="greedy_exact_match")
    ed.close()
    row = next(r for r in rows if (r["method"], r["seed"], r["T"]) == ("ft", 1, 5))
    assert {k: row[k] for k in SCORES[:3]} == {k: direct[k] for k in SCORES[:3]}
    product = direct["reliability"] * direct["generalization"] * direct["locality"]
    assert row["OP"] == pytest.approx(product ** (1 / 3))
    ft5 = next(r for r in summary["table"] if r["method"] == "ft" and r["T"] == 5)
    assert ft5["locality"]["n"] == 2 and ft5["seeds"] == [0, 1]
    # a weight-writing method's rows carry the largest ‖W − W0‖/‖W0‖ at each T (plotted beside the scores)
    assert row["weight_drift"] > 0 and all(r["weight_drift"] is None for r in rows if r["method"] == "grace")
    assert ft5["weight_drift"]["n"] == 2
    undo = read_jsonl(out / "undo.jsonl")
    assert [(u["method"], u["undone"]) for u in undo] == [("grace", 2), ("grace", 2)]  # only undo_methods
    assert all(u["restored"] == 1.0 for u in undo)  # GRACE's edits are independent
    md = (out / "results.md").read_text()
    assert "greedy_exact_match" in md and "| ft | 5 |" in md and "±" in md
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert pngs == ["metrics.png", "retention_ft.png", "retention_grace.png"]
    assert all((out / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    # a second run of the finished bench edits nothing and changes no row
    before = (out / "results.jsonl").read_bytes()
    run_bench(cfg, out, progress=False)
    assert (out / "results.jsonl").read_bytes() == before
    assert [s["resumed"] for s in read_jsonl(out / "sessions.jsonl")] == [False, True]


def test_an_interrupted_bench_resumes_where_it_stopped(small_world, tmp_path, monkeypatch):
    cfg = BenchConfig(methods=["ft"], data="world:small", edits=[3, 8], batch=2)
    ref = tmp_path / "ref"
    run_bench(cfg, ref, progress=False)
    calls, real = [], Editor.edit

    def edit(self, requests, **kw):
        calls.append(len(requests))
        if len(calls) == 4:  # after 2 + 1 + 2 edits: T=3 was scored, the 4th call dies
            raise KeyboardInterrupt
        return real(self, requests, **kw)

    monkeypatch.setattr(Editor, "edit", edit)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, out, progress=False)
    assert [r["T"] for r in read_jsonl(out / "results.jsonl")] == [3]
    calls.clear()
    monkeypatch.setattr(Editor, "edit", lambda self, requests, **kw: calls.append(len(requests)) or real(self, requests,
                                                                                                     **kw))
    run_bench(cfg, out, progress=False)
    assert calls == [2, 1], "the resumed stream writes only the edits after the 5 in the store"
    assert scores(out) == scores(ref)
    timing = read_jsonl(out / "cells" / "ft-seed0" / "timing.jsonl")
    assert [t["end"] for t in timing] == [2, 3, 5, 7, 8]


def test_a_bench_killed_midway_resumes_on_rerun(small_world, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "editbank.cli", "bench", "--methods", "grace", "--data", "world:small",
           "--edits", "2,40", "--batch", "1", "--out", str(out), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    timing = out / "cells" / "grace-seed0" / "timing.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(timing)) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_jsonl(timing))
    assert 5 <= killed_at < 40, "the kill must land midway"
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(timing)
    ends = [t["end"] for t in rows]
    assert ends == sorted(set(ends)) and ends[-1] == 40 and sum(t["n"] for t in rows) == 40, \
        "the rerun went on from the store: no edit written twice or skipped"
    assert len(ends) >= 39  # every call timed (at most one lost to the kill, between its commit and its row)
    assert sorted(r["T"] for r in read_jsonl(out / "results.jsonl")) == [2, 40]
    assert json.loads(done.stdout)["table"][-1]["T"] == 40


def test_a_run_directory_refuses_other_parameters_and_drops_a_torn_line(small_world, tmp_path):
    out = tmp_path / "run"
    run_bench(BenchConfig(methods=["grace"], data="world:small", edits=[2]), out, progress=False)
    with pytest.raises(BenchError, match="differ in edits"):
        run_bench(BenchConfig(methods=["grace"], data="world:small", edits=[3]), out, progress=False)
    rows = read_jsonl(out / "results.jsonl")
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"method": "grace", "se')
    assert read_jsonl(out / "results.jsonl") == rows
    assert (out / "results.jsonl").read_bytes().endswith(b"}\n")
    append_jsonl(out / "results.jsonl", [])
    assert read_jsonl(out / "results.jsonl") == rows


@pytest.mark.parametrize("kw, match", [
    ({"methods": []}, "at least one method"),
    ({"methods": ["nope"]}, "unknown method"),
    ({"edits": [0]}, "positive"),
    ({"protocol": "bleu"}, "unknown protocol"),
    ({"undo_fraction": 2.0}, "undo_fraction"),
    ({"data": "counterfact"}, "FORMAT:PATH"),
    ({"hparams": {"wise": {"n_iter": 3}}}, "not among the methods"),
    ({"undo_methods": ["ft"]}, "undo_methods"),
])
def test_bad_bench_parameters_are_refused(kw, match):
    with pytest.raises(BenchError, match=match):
        BenchConfig(**{"methods": ["grace"], **kw})


def test_bench_cli_hp_and_errors(small_world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(app, ["bench", "--methods", "grace,ft", "--data", "world:small", "--edits", "2", "--out",
                              str(out), "--hp", "n_iter=3"])
    assert res.exit_code == 2 and "name one (METHOD.key=value)" in res.output
    res = runner.invoke(app, ["bench", "--methods", "ft", "--data", "zsre:/nonexistent.json", "--edits", "2",
                              "--out", str(out)])
    assert res.exit_code == 2 and "nonexistent.json" in res.output
    assert not out.exists() or not (out / "params.json").exists(), "a refused run claims nothing"
    res = runner.invoke(app, ["bench", "--methods", "ft", "--data", "world:small", "--edits", "2", "--out", str(out),
                              "--hp", "ft.lr=0.05", "--json"])
    assert res.exit_code == 0, res.output
    params = json.loads((out / "params.json").read_text())["config"]
    assert params["resolved"]["ft"]["hparams"]["lr"] == 0.05
    assert json.loads(res.stdout.strip().splitlines()[-1])["table"][0]["T"] == 2


def test_one_time_calibration_is_not_counted_in_an_edits_seconds(small_world, tmp_path, monkeypatch):
    from editbank.methods.sola import Sola

    events, real_edit, real_cal = [], Editor.edit, Sola.calibrate

    def calibrate(self):
        events.append("calibrate")
        return real_cal(self)

    def edit(self, requests, **kw):
        events.append("edit")
        assert kw.get("check") is False, "the bench keeps an edit that did not take: it is part of the measurement"
        return real_edit(self, requests, **kw)

    monkeypatch.setattr(Sola, "calibrate", calibrate)
    monkeypatch.setattr(Editor, "edit", edit)
    run_bench(BenchConfig(methods=["sola"], data="world:small", edits=[1, 2]), tmp_path / "run", progress=False)
    assert events[:2] == ["calibrate", "edit"] and events.count("calibrate") == 1
