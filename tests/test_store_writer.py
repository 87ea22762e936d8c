"""One writer per store (another process is refused, naming it), and nothing left behind by a failed command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from editbank import Editor, EditStore
from editbank.cli import app
from editbank.store import StoreBusyError

runner = CliRunner()

HOLDER = textwrap.dedent("""
    import sys
    from editbank import EditStore
    st = EditStore(sys.argv[1])
    st.lock_for_writing()
    print("held", flush=True)
    sys.stdin.readline()  # hold it until the test says so
    st.close()
""")


@pytest.fixture
def held_store(tmp_path):
    """A store another process holds for writing (the lock is released when the fixture ends)."""
    path = tmp_path / "shared.db"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"  # an event, not a sleep
    yield path, proc
    if proc.poll() is None:
        proc.communicate("\n", timeout=30)


def test_a_second_process_writing_the_store_is_refused_naming_the_holder(held_store, world_model, world_requests):
    path, proc = held_store
    model, tok = world_model
    with pytest.raises(StoreBusyError, match=f"open for writing by pid {proc.pid}"):
        Editor(model, tok, method="grace", store=path)
    assert path.exists() and EditStore(path).count() == 0  # a reader is not blocked
    proc.communicate("\n", timeout=30)
    ed = Editor(model, tok, method="grace", store=path)  # the holder is gone: the store can be written
    ed.edit(world_requests[0])
    with pytest.raises(StoreBusyError, match=f"pid {os.getpid()}"):  # one writer in this process too
        Editor(model, tok, store=path)
    ed.close()
    assert EditStore(path).get_meta("writer") is None


def test_the_cli_is_refused_while_a_server_holds_the_store(held_store, small_world, world_requests):
    path, proc = held_store
    r = world_requests[0]
    res = runner.invoke(app, ["edit", "--model", str(small_world.path), "--store", str(path),
                              "--prompt", r.prompt, "--target", r.target])
    assert res.exit_code == 2 and f"pid {proc.pid}" in res.stderr and "POST /v1/edits" in res.stderr
    assert EditStore(path).count() == 0


@pytest.mark.parametrize("args", [
    ["--hp", "no_such_hparam=1"],
    ["--hp", "lr=-1"],
    ["--prompt", "x " * 200],  # too long for the model's context
], ids=["unknown hparam", "bad value", "too long"])
def test_a_failed_command_leaves_no_store_file(small_world, tmp_path, args):
    db = tmp_path / "new.db"
    base = ["edit", "--model", str(small_world.path), "--store", str(db)]
    extra = args if "--prompt" in args else [*args, "--prompt", "The capital of Arvelia is"]
    res = runner.invoke(app, [*base, *extra, "--target", "Dunmore"])
    assert res.exit_code == 2, res.output
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())


def test_ctrl_c_while_loading_leaves_no_store_file(world_model, tmp_path, monkeypatch):
    from editbank.methods.sola import Sola

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Sola, "attach", interrupted)
    model, tok = world_model
    with pytest.raises(KeyboardInterrupt):
        Editor(model, tok, method="sola", store=tmp_path / "new.db")
    assert not any(tmp_path.iterdir())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_serve_on_a_busy_port_fails_before_it_creates_or_prints_anything(small_world, tmp_path):
    pytest.importorskip("uvicorn")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        res = runner.invoke(app, ["serve", "--model", str(small_world.path), "--store", str(tmp_path / "s.db"),
                                  "--port", str(port)])
    finally:
        busy.close()
    assert res.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in res.stderr
    assert "serving" not in res.output and "token" not in res.output
    assert not any(tmp_path.iterdir())
