"""Multi-part runs (the held-out suite, lists of data) and sharded runs of one run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from editbank.bench import BenchConfig, BenchError, run_bench
from editbank.bench.run import parse_shard

SCORES = ("reliability", "generalization", "locality", "OP")


def _dataset(small_world, tmp_path, name: str, start: int) -> str:
    records = [{"prompt": f"The capital of {s} is", "target_new": " Dunmore", "subject": s,
                "rephrase_prompt": f"{s}'s capital is", "ground_truth": " Korvath",
                "locality_prompt": f"The capital of {small_world.control_subjects[0]} is",
                "locality_ground_truth": " Keldmoor"}
               for s in small_world.entities[start:start + 8]]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return f"counterfact:{path}"


def _table(summary):
    return [(r["method"], r["T"], r["T_range"], *(r[k] and round(r[k]["mean"], 12) for k in SCORES))
            for r in summary["table"]]


def test_the_suite_is_the_test_worlds_and_a_list_runs_each_part():
    from editbank.world.test_specs import SUITE

    cfg = BenchConfig(methods=["grace"], data="suite")
    assert cfg.parts == [f"world:{n}" for n in SUITE] and len(SUITE) >= 3
    assert "default" not in SUITE  # the dev world is never part of the held-out suite
    assert BenchConfig(methods=["grace"], data="world:small,suite").parts[0] == "world:small"
    with pytest.raises(BenchError, match="named twice"):
        BenchConfig(methods=["grace"], data="world:small,world:small")
    for bad in ("1", "2/2", "-1/2", "a/b", "1/0"):
        with pytest.raises(BenchError, match="--shard must be I/N"):
            parse_shard(bad)
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) == (0, 1)


def test_two_shards_in_two_processes_give_the_summary_of_one_plain_run(small_world, tmp_path):
    data = ",".join(_dataset(small_world, tmp_path, n, k) for n, k in (("a", 0), ("b", 10)))
    args = ["--methods", "grace,ft", "--data", data, "--model", str(small_world.path), "--edits", "2,7", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "editbank.cli", "bench", *args, "--out"]
    sharded = tmp_path / "sharded"
    procs = [subprocess.Popen([*base, str(sharded), "--shard", f"{i}/2"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert not (sharded / "summary.json").exists()  # shards write no report
    merged = subprocess.run([*base, str(sharded), "--report"], capture_output=True, text=True, env=env, timeout=300)
    assert merged.returncode == 0, merged.stderr
    cfg = BenchConfig(methods=["grace", "ft"], data=data, model=str(small_world.path), edits=[2, 7])
    plain = run_bench(cfg, tmp_path / "plain", progress=False)
    assert _table(json.loads(merged.stdout)) == _table(plain)
    assert [r["T_range"] for r in plain["table"]] == [[2, 2], [7, 7]] * 2  # 8 records, 1 held out: T caps at 7
    md = (sharded / "results.md").read_text(encoding="utf-8")
    assert "Mean ± spread" in md and "counterfact-a" in md and "counterfact-b" in md
    # each part is an ordinary run directory of its own
    assert (sharded / "counterfact-a" / "summary.json").is_file()


def test_a_writer_killed_mid_line_does_not_take_the_next_writers_rows(tmp_path):
    from editbank.bench.files import append_jsonl, read_jsonl

    path = tmp_path / "rows.jsonl"
    append_jsonl(path, [{"a": 1}])
    with open(path, "ab") as f:  # another shard killed halfway through its line
        f.write(b'{"a": 2, "b"')
    append_jsonl(path, [{"a": 3}])
    assert read_jsonl(path) == [{"a": 1}, {"a": 3}]


def test_parts_that_would_share_a_directory_are_refused(tmp_path):
    with pytest.raises(BenchError, match="named twice"):
        BenchConfig(methods=["grace"], data="world,world:default")
    with pytest.raises(BenchError, match="named twice"):
        BenchConfig(methods=["grace"], data=f"counterfact:{tmp_path}/a/x.json,counterfact:{tmp_path}/b/x.json")


def test_report_refuses_a_part_that_has_not_run(small_world, tmp_path):
    cfg = BenchConfig(methods=["grace"], data="world:small,world:test-dense", edits=[2])
    with pytest.raises(BenchError, match="has not run yet"):
        run_bench(cfg, tmp_path / "run", progress=False, report_only=True)
