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
    assert not ed.store.lock_path.exists()  # the lock file lives only while a writer holds the store


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


def test_a_refused_writer_does_not_break_the_holders_database(world_model, world_requests, tmp_path):
    """The lock is not on the database file: closing a refused writer's descriptors must not drop SQLite's locks."""
    model, tok = world_model
    path = tmp_path / "e.db"
    ed = Editor(model, tok, method="grace", store=path)
    ed.edit(world_requests[0])
    for _ in range(2):
        with pytest.raises(StoreBusyError):
            Editor(model, tok, store=path)
    subprocess.run([sys.executable, "-c", f"from editbank import EditStore; EditStore({str(path)!r}).close()"],
                   check=True)  # a reader in another process opens and closes the database
    ed.edit(world_requests[1])
    ed.close()
    st = EditStore(path)
    assert st.count("active") == 2
    st.close()


def test_read_only_editors_read_a_held_store_and_cannot_write(world_model, small_world, world_requests, tmp_path):
    model, tok = world_model
    path = tmp_path / "e.db"
    ed = Editor(model, tok, method="sola", store=path, corpus=small_world.fact_prompts())
    r = world_requests[0]
    ed.edit(r)
    res = runner.invoke(app, ["ask", r.prompt, "--model", str(small_world.path), "--store", str(path), "--json",
                              "--max-new-tokens", "12"])
    assert res.exit_code == 0, res.output
    import json

    assert json.loads(res.stdout)["edited"].startswith(r.target)
    res = runner.invoke(app, ["eval", "--model", str(small_world.path), "--store", str(path), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["reliability"] == 1.0
    reader = Editor.open(small_world.path, store=path, read_only=True)
    with pytest.raises(ValueError, match="read-only"):
        reader.edit(world_requests[1])
    with pytest.raises(ValueError, match="read-only"):
        reader.undo(1)
    reader.close()
    ed.close()


def test_a_reader_opens_while_the_writer_is_inside_a_transaction(tmp_path):
    path = tmp_path / "e.db"
    writer = EditStore(path)
    writer.lock_for_writing()
    with writer.transaction():  # an edit in progress holds SQLite's write lock for its whole length
        writer.set_meta("busy", True)
        reader = EditStore(path)  # used to start a write transaction of its own and fail after 5 s
        assert reader.count() == 0 and reader.get_meta("busy") is None
        reader.close()
    writer.close()


def test_a_failed_import_leaves_no_file_and_an_import_is_a_writer(tmp_path):
    folder = tmp_path / "not-an-export"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"format": "editbank-store", "schema_version": 1, "meta": {}, '
                                          '"edits": "bad"}')
    (folder / "artifacts.safetensors").write_bytes(b"")
    with pytest.raises(ValueError):
        EditStore.import_folder(folder, tmp_path / "new.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-an-export"]
