"""Run every command of README.md, as a new user would, so that the README cannot drift from the code.

Usage: `.venv/bin/python scripts/check_readme.py [--list] [--only N,M] [--keep DIR]` (CI runs it after the tests).

What runs, in README order:
- each ```bash block, as one `bash -euo pipefail` script, in a fresh working directory that holds a link to the
  project's `.venv` (so `source .venv/bin/activate` and `.venv/bin/editbank` work as they do in a checkout); a
  block that installs the project (`pip install ... -e`) runs in the project root instead;
- each ```pycon block, as a doctest (ELLIPSIS, NORMALIZE_WHITESPACE) in that working directory: the outputs the
  README shows are the outputs the code prints.
Markers, an HTML comment on the line before a block:
- `<!-- file: NAME -->`: the block is the content of a file the README tells the user to write; it is written
  to NAME in the working directory (nothing is run);
- `<!-- fixture: NAME FORMAT -->`: the block's command reads a file the user downloads (a public dataset); a
  small file NAME of that format is made from the built-in small world, since CI has no internet;
- `<!-- readme-check: ci -->`: the command is CI's own (`.ci/run` runs it): checked to be in `.ci/run`, not
  run twice;
- `<!-- readme-check: skip REASON -->`: not run (a block for hardware or a model CI does not have); the reason
  is printed, so that a skip is never silent.
A ```python block fails the check unless it is marked skip: code the README shows either runs or says why not.
"""

from __future__ import annotations

import argparse
import doctest
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*(file|fixture|readme-check):\s*(.*?)\s*-->\s*$")
TIMEOUT = 1800  # seconds per block (the demo builds the default world on a cold cache)


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    mark: tuple[str, str] | None


def blocks(readme: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each with the marker comment just above it (if any)."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        mark = MARK.match(lines[i - 1]) if i else None
        out.append(Block(i + 1, m.group(1), "\n".join(lines[i + 1 : j]) + "\n",
                         (mark.group(1), mark.group(2)) if mark else None))
        i = j + 1
    return out


def runnable(b: Block) -> bool:
    return b.lang in ("bash", "pycon", "python") or (b.mark is not None and b.mark[0] in ("file", "fixture"))


def make_fixture(name: str, fmt: str, where: Path) -> None:
    """A small dataset file of `fmt` from the small world (what the README's download would give)."""
    from editbank import World

    reqs = World.build("small", progress=False).edit_requests(n=24, seed=0)
    if fmt == "counterfact":  # ROME's layout
        recs = [{"case_id": i, "requested_rewrite": {
                    "prompt": r.prompt.replace(r.subject, "{}", 1), "subject": r.subject,
                    "target_new": {"str": r.target.strip()}, "target_true": {"str": r.meta["true_object"]}},
                 "paraphrase_prompts": r.rephrases[:2], "neighborhood_prompts": [p for p, _ in r.locality[:2]]}
                for i, r in enumerate(reqs) if r.subject in r.prompt]
    elif fmt == "zsre":
        recs = [{"subject": r.subject, "src": r.prompt, "alt": r.target.strip(), "answers": [r.meta["true_object"]],
                 "rephrase": r.rephrases[0], "loc": "nq question: " + r.locality[0][0],
                 "loc_ans": r.locality[0][1].strip()} for r in reqs]
    else:
        raise SystemExit(f"README fixture {name}: no generator for format {fmt!r}")
    (where / name).write_text(json.dumps(recs, indent=1), encoding="utf-8")


def run_bash(b: Block, cwd: Path) -> tuple[bool, str]:
    here = ROOT if re.search(r"pip install .*-e", b.text) else cwd
    script = cwd / f".readme-block-{b.line}.sh"
    script.write_text(b.text, encoding="utf-8")
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("VIRTUAL_ENV", None)
    try:
        res = subprocess.run(["bash", "-euo", "pipefail", str(script)], cwd=here, env=env, capture_output=True,
                             text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {TIMEOUT} s"
    return res.returncode == 0, (res.stdout + res.stderr)[-4000:]


def run_pycon(b: Block, cwd: Path) -> tuple[bool, str]:
    test = doctest.DocTestParser().get_doctest(b.text, {}, f"README.md:{b.line}", str(ROOT / "README.md"), b.line)
    lines: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        runner.run(test, out=lines.append)
    finally:
        os.chdir(old)
    return runner.failures == 0, "".join(lines)[-4000:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--list", action="store_true", help="List the blocks and what would be done with each.")
    ap.add_argument("--only", default="", help="Comma-separated block numbers (from --list) to run.")
    ap.add_argument("--keep", type=Path, help="Use (and keep) this working directory.")
    args = ap.parse_args()
    todo = [b for b in blocks(args.readme) if runnable(b)]
    if args.list:
        for n, b in enumerate(todo):
            print(f"{n:2d}  line {b.line:4d}  {b.lang or '-':6s} {b.mark or ''}  {b.text.splitlines()[0][:70]}")
        return 0
    only = {int(x) for x in args.only.split(",") if x.strip()}
    cwd = args.keep or Path(tempfile.mkdtemp(prefix="readme-"))
    cwd.mkdir(parents=True, exist_ok=True)
    if not (cwd / ".venv").exists():
        (cwd / ".venv").symlink_to(ROOT / ".venv")
    failed = 0
    for n, b in enumerate(todo):
        if only and n not in only:
            continue
        what, arg = b.mark or ("", "")
        where = f"README.md:{b.line}"
        if what == "file":
            (cwd / arg).write_text(b.text, encoding="utf-8")
            print(f"[file]  {where}: wrote {arg}", flush=True)
            continue
        if what == "fixture":
            name, fmt = arg.split()
            make_fixture(name, fmt, cwd)
            print(f"[fixture] {where}: made {name} ({fmt})", flush=True)
        if what == "readme-check" and arg == "ci":
            ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
            ok = all(line.strip() in ci for line in b.text.splitlines() if line.strip())
            print(f"[{'ok' if ok else 'FAIL'}]  {where}: CI's own command{'' if ok else ' is not in .ci/run'}")
            failed += not ok
            continue
        if what == "readme-check" and arg.startswith("skip"):
            print(f"[skip]  {where}: {arg[4:].strip() or 'no reason given'}")
            continue
        if b.lang == "python":
            print(f"[FAIL]  {where}: a python block is never run: make it a pycon block (a doctest) or mark it "
                  "<!-- readme-check: skip REASON -->")
            failed += 1
            continue
        if b.lang not in ("bash", "pycon"):
            continue
        t0 = time.perf_counter()
        ok, log = (run_bash if b.lang == "bash" else run_pycon)(b, cwd)
        print(f"[{'ok' if ok else 'FAIL'}]  {where} ({b.lang}, {time.perf_counter() - t0:.0f} s): "
              f"{b.text.splitlines()[0][:80]}", flush=True)
        if not ok:
            failed += 1
            print("    " + log.replace("\n", "\n    "), flush=True)
    print(f"{failed} README block(s) failed; working directory {cwd}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
