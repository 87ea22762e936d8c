"""The README is run by scripts/check_readme.py (CI); here: its blocks parse, every marker is one the checker knows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_readme", ROOT / "scripts" / "check_readme.py")
check_readme = importlib.util.module_from_spec(spec)
sys.modules["check_readme"] = check_readme  # dataclasses look their module up
spec.loader.exec_module(check_readme)


def test_every_readme_block_is_run_or_says_why_not():
    blocks = check_readme.blocks(ROOT / "README.md")
    assert sum(b.lang == "bash" for b in blocks) >= 6 and any(b.lang == "pycon" for b in blocks)
    for b in blocks:
        kind = b.mark[0] if b.mark else None
        if b.lang == "python":
            assert kind == "readme-check" and b.mark[1].startswith("skip "), f"README.md:{b.line} is never run"
        if kind == "readme-check":
            assert b.mark[1] == "ci" or b.mark[1].startswith("skip "), b.mark
        if kind == "fixture":
            assert b.mark[1].split()[1] in ("counterfact", "zsre"), b.mark
        if b.lang == "bash" and "editbank" in b.text and "pip install" not in b.text:
            assert b.text.startswith("source .venv/bin/activate\n"), f"README.md:{b.line} needs the venv"


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    (block,) = [b for b in check_readme.blocks(ROOT / "README.md") if b.mark == ("readme-check", "ci")]
    assert block.text.strip() in ci and "scripts/check_readme.py" in ci


def test_a_fixture_is_a_file_the_reader_takes(tmp_path):
    from editbank import load_requests

    for name, fmt in (("cf.json", "counterfact"), ("zsre.json", "zsre")):
        check_readme.make_fixture(name, fmt, tmp_path)
        reqs = load_requests(tmp_path / name)
        assert len(reqs) >= 10 and all(r.subject and r.rephrases for r in reqs)
