"""EditStore: the durable SQLite ledger of edits, their artifacts, method state and snapshots.

Tensors are stored as safetensors bytes and metadata as JSON: nothing is ever unpickled. Every
edit or undo is one transaction (`with store.transaction(): ...`). What is in the store is what
the model knows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .requests import EditRequest

SCHEMA_VERSION = 1
STATUSES = ("active", "reverted", "superseded")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch INTEGER NOT NULL,
    request TEXT NOT NULL,
    method TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    stats TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    edit_id INTEGER NOT NULL REFERENCES edits(id),
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (edit_id, name)
);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, data BLOB NOT NULL, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    after_edit INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    data BLOB NOT NULL,
    meta TEXT NOT NULL
);
"""


class StoreMismatchError(ValueError):
    """The store belongs to another model or method."""


class StoreBusyError(ValueError):
    """Another process (or another editor) holds the store for writing."""


@dataclass
class Edit:
    """An applied request: one row of the store."""

    id: int
    request: EditRequest
    method: str
    status: str = "active"
    batch: int = 0
    created: float = 0.0
    updated: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "request": self.request.to_dict(),
            "method": self.method,
            "status": self.status,
            "batch": self.batch,
            "created": self.created,
            "updated": self.updated,
            "stats": self.stats,
        }


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def bytes_to_tensors(data: bytes) -> dict[str, torch.Tensor]:
    return st_load(data)


class EditStore:
    """SQLite ledger (WAL mode). `path=None` keeps it in memory."""

    def __init__(self, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        if self.path is not None and self.path.is_dir():
            raise ValueError(f"store path {self.path} is a directory; give a file name such as edits.db")
        self.created = False  # this object made the file (decided atomically: O_CREAT | O_EXCL)
        if self.path is not None:
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                self.created = True  # an empty file is a valid new SQLite database
            except FileExistsError:
                pass
            except OSError as exc:
                raise ValueError(f"cannot open store {self.path}: {exc.strerror or exc}") from None
        self._lock_fd: int | None = None
        target = ":memory:" if self.path is None else str(self.path)
        try:
            self._db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open store {self.path}: {exc}") from None
        self._depth = 0
        try:
            self._db.execute("PRAGMA foreign_keys=ON")
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            if self._schema_version() is None:  # a new store: a write; an existing one is only read (readers
                with self.transaction():         # must not wait for, or block, a writer's long transaction)
                    for statement in _split(_SCHEMA):
                        self._db.execute(statement)
                    if self.get_meta("schema_version") is None:
                        self.set_meta("schema_version", SCHEMA_VERSION)
            if self.path is not None:
                self._inode = os.stat(self.path).st_ino  # the file this object opened (see lock_for_writing)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise ValueError(f"{self.path} is not an editbank store: {exc}") from None
        version = self.get_meta("schema_version")
        if version != SCHEMA_VERSION:
            self._db.close()
            raise ValueError(f"store {self.path} has schema version {version}; this editbank reads {SCHEMA_VERSION}")

    def _schema_version(self) -> Any:
        try:
            return self.get_meta("schema_version")
        except sqlite3.OperationalError:  # no meta table yet
            return None

    def close(self) -> None:
        self._db.close()
        self._unlock()

    # -- one writer ---------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path | None:
        """The writer's lock file, beside the database (it exists only while a writer holds the store)."""
        return None if self.path is None else self.path.with_name(self.path.name + "-writer")

    def lock_for_writing(self) -> None:
        """Hold the store for writing until `close`: any other writer, in another process or this one, is refused.

        The lock is an exclusive `flock` on a file beside the database (`<store>-writer`, never the database itself,
        whose POSIX locks SQLite owns: closing any descriptor of that file would drop them); the OS releases it if
        the holder dies. The file says who holds it (pid and editbank subcommand, no option values: a token given
        on the command line must not land on disk), which is what the refusal names. Readers are never blocked."""
        if self.path is None:
            return
        if self._lock_fd is not None:
            raise StoreBusyError(f"store {self.path} is already held for writing by another editor of this store "
                                 "object; one store takes one writer")
        import fcntl
        import sys

        lock = self.lock_path
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if isinstance(exc, BlockingIOError):
                    raise StoreBusyError(
                        f"store {self.path} is open for writing by {self._holder()}; one store takes one writer: stop "
                        "that one, or send the edit to it (a running `editbank serve` takes POST /v1/edits)") from None
                raise ValueError(f"cannot lock store {self.path} for writing ({lock}): {exc}") from None
            try:  # the holder unlinks the file before it releases the lock: make sure ours is still the file
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            try:  # a writer that discarded a new store between our open and our lock: we hold an unlinked file
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != self._inode:
                raise StoreBusyError(f"store {self.path} was removed or replaced while it was being opened; open it "
                                     "again")
            argv = sys.argv or [""]
            command = " ".join(["editbank" if "editbank" in Path(argv[0]).name or argv[0].endswith("cli.py")
                                else Path(argv[0]).name, *[a for a in argv[1:2] if not a.startswith("-")]])
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "command": command, "since": time.time()}).encode())
        except BaseException:
            lock.unlink(missing_ok=True)
            os.close(fd)
            raise
        self._lock_fd = fd

    def _holder(self) -> str:
        try:
            holder = json.loads(self.lock_path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            holder = {}
        if not holder:
            return "another editor"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        return f"pid {holder.get('pid')} ({holder.get('command')}), since {since}"

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            self.lock_path.unlink(missing_ok=True)  # before the release: a waiter then finds a new file
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard_if_new(self) -> bool:
        """Close, and delete the database if this object created it, still holds it for writing and no edit was ever
        committed to it: a command that fails before its first edit leaves nothing behind."""
        empty = False
        if self.created and self._lock_fd is not None:
            try:
                empty = self._db.execute("SELECT COUNT(*) FROM edits").fetchone()[0] == 0
            except sqlite3.Error:
                empty = False
        self._db.close()
        if empty:  # unlinked while the lock is still held, so no other writer can have started on it
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self._unlock()
        return empty

    # -- transactions -------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all (nested blocks join the outer one)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        finally:
            self._depth = 0

    # -- metadata -----------------------------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def bind(self, fingerprint: str, method: str, hparams: dict[str, Any], version: str, write: bool = True) -> None:
        """Record (or check) which model and method this store belongs to (`write=False`: only check)."""
        known = self.get_meta("fingerprint")
        if known is not None and known != fingerprint:
            raise StoreMismatchError(
                f"store {self.path} was made for another model (fingerprint {known[:12]}…, "
                f"this model is {fingerprint[:12]}…); open it with the model it was made for"
            )
        known_method = self.get_meta("method")
        if known_method is not None and known_method != method:
            raise StoreMismatchError(
                f"store {self.path} holds edits of method {known_method!r}, not {method!r}"
            )
        if not write:
            return
        with self.transaction():
            if known is None:
                self.set_meta("fingerprint", fingerprint)
                self.set_meta("method", method)
                self.set_meta("created", time.time())
            self.set_meta("hparams", hparams)
            self.set_meta("editbank_version", version)

    # -- edits --------------------------------------------------------------------------------
    def add_edit(self, request: EditRequest, method: str, batch: int | None = None) -> Edit:
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO edits(batch, request, method, status, created, updated, stats) "
            "VALUES (?, ?, ?, 'active', ?, ?, '{}')",
            (batch or 0, json.dumps(request.to_dict()), method, now, now),
        )
        eid = int(cur.lastrowid)
        if batch is None:
            self._db.execute("UPDATE edits SET batch=? WHERE id=?", (eid, eid))
        return Edit(eid, request, method, "active", batch or eid, now, now, {})

    def update_edit(self, edit_id: int, *, status: str | None = None, stats: dict | None = None) -> None:
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"unknown edit status {status!r}")
            self._db.execute(
                "UPDATE edits SET status=?, updated=? WHERE id=?", (status, time.time(), edit_id)
            )
        if stats is not None:
            self._db.execute("UPDATE edits SET stats=? WHERE id=?", (json.dumps(stats), edit_id))

    def _row_to_edit(self, row) -> Edit:
        eid, batch, req, method, status, created, updated, stats = row
        return Edit(
            eid, EditRequest.from_dict(json.loads(req)), method, status, batch, created, updated,
            json.loads(stats),
        )

    def get_edit(self, edit_id: int) -> Edit:
        row = self._db.execute(
            "SELECT id, batch, request, method, status, created, updated, stats FROM edits WHERE id=?",
            (int(edit_id),),
        ).fetchone()
        if row is None:
            raise KeyError(f"no edit with id {edit_id} in the store")
        return self._row_to_edit(row)

    def edits(self, status: str | None = None) -> list[Edit]:
        q = "SELECT id, batch, request, method, status, created, updated, stats FROM edits"
        args: tuple = ()
        if status is not None:
            q += " WHERE status=?"
            args = (status,)
        return [self._row_to_edit(r) for r in self._db.execute(q + " ORDER BY id", args)]

    def count(self, status: str | None = None) -> int:
        if status is None:
            return self._db.execute("SELECT COUNT(*) FROM edits").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM edits WHERE status=?", (status,)).fetchone()[0]

    def count_after(self, edit_id: int, status: str = "active") -> int:
        """Edits with this status and an id above `edit_id`."""
        return self._db.execute("SELECT COUNT(*) FROM edits WHERE status=? AND id>?", (status, edit_id)).fetchone()[0]

    def last_id(self, status: str = "active") -> int | None:
        row = self._db.execute("SELECT MAX(id) FROM edits WHERE status=?", (status,)).fetchone()
        return row[0]

    # -- artifacts ----------------------------------------------------------------------------
    def put_artifacts(self, edit_id: int, tensors: dict[str, torch.Tensor], replace: bool = False) -> None:
        """Store an edit's artifacts by name (`replace`: they are all it has; any other name it had goes)."""
        if replace:
            self._db.execute("DELETE FROM artifacts WHERE edit_id=?", (edit_id,))
        for name, t in tensors.items():
            self._db.execute(
                "INSERT OR REPLACE INTO artifacts(edit_id, name, data) VALUES (?, ?, ?)",
                (edit_id, name, tensors_to_bytes({"t": t})),
            )

    def artifacts(self, edit_id: int) -> dict[str, torch.Tensor]:
        rows = self._db.execute("SELECT name, data FROM artifacts WHERE edit_id=?", (edit_id,))
        return {name: bytes_to_tensors(data)["t"] for name, data in rows}

    # -- method state and snapshots -----------------------------------------------------------
    def put_state(
        self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], unchanged: Collection[str] = ()
    ) -> None:
        """Write the current state: the meta and the list of tensors in row 'current', each tensor in its own
        row 'current/<name>'. Tensors named in `unchanged` keep their stored row (not rewritten), so state
        that rarely changes (e.g. SoLA's key whitening) costs nothing per edit."""
        names = sorted(tensors)
        head = {_STATE_FORMAT: 2, "meta": meta, "tensors": names}
        self._db.execute(
            "INSERT OR REPLACE INTO state(name, data, meta) VALUES ('current', ?, ?)",
            (tensors_to_bytes({}), json.dumps(head)),
        )
        stored = {r[0] for r in self._db.execute("SELECT name FROM state WHERE name LIKE 'current/%'")}
        for row in stored - {f"current/{n}" for n in names}:
            self._db.execute("DELETE FROM state WHERE name=?", (row,))
        for n in names:
            if n in unchanged and f"current/{n}" in stored:
                continue
            self._db.execute(
                "INSERT OR REPLACE INTO state(name, data, meta) VALUES (?, ?, '{}')",
                (f"current/{n}", tensors_to_bytes({"t": tensors[n]})),
            )

    def get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        row = self._db.execute("SELECT data, meta FROM state WHERE name='current'").fetchone()
        if row is None:
            return None
        head = json.loads(row[1])
        if not (isinstance(head, dict) and head.get(_STATE_FORMAT) == 2):  # one blob (stores written by editbank 0.1.0)
            return bytes_to_tensors(row[0]), head
        tensors = {}
        for n in head["tensors"]:
            data = self._db.execute("SELECT data FROM state WHERE name=?", (f"current/{n}",)).fetchone()
            if data is None:
                raise ValueError(f"store {self.path} is damaged: state tensor {n!r} is missing")
            tensors[n] = bytes_to_tensors(data[0])["t"]
        return tensors, head["meta"]

    def put_snapshot(self, after_edit: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """A copy of the state after `after_edit`. Each tensor is stored once by its content (a row 'blob/<digest>'
        of the state table) and a snapshot names its tensors' digests, so what many snapshots share (a closed
        side memory, a frozen weight) costs its bytes once, not once per snapshot."""
        refs = {}
        for name, t in tensors.items():
            data = tensors_to_bytes({"t": t})
            refs[name] = hashlib.blake2b(data, digest_size=16).hexdigest()
            self._db.execute("INSERT OR IGNORE INTO state(name, data, meta) VALUES (?, ?, '{}')",
                             (f"blob/{refs[name]}", data))
        head = {_SNAPSHOT_FORMAT: 2, "meta": meta, "tensors": refs}
        replaced = self._db.execute("DELETE FROM snapshots WHERE after_edit=?", (after_edit,)).rowcount
        self._db.execute("INSERT INTO snapshots(after_edit, created, data, meta) VALUES (?, ?, ?, ?)",
                         (after_edit, time.time(), tensors_to_bytes({}), json.dumps(head)))
        if replaced:
            self._drop_unused_blobs()

    def _snapshot(self, data: bytes, meta: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        head = json.loads(meta)
        if not (isinstance(head, dict) and head.get(_SNAPSHOT_FORMAT) == 2):  # one blob (written before digests)
            return bytes_to_tensors(data), head
        tensors = {}
        for name, digest in head["tensors"].items():
            row = self._db.execute("SELECT data FROM state WHERE name=?", (f"blob/{digest}",)).fetchone()
            if row is None:
                raise ValueError(f"store {self.path} is damaged: snapshot tensor {name!r} is missing")
            tensors[name] = bytes_to_tensors(row[0])["t"]
        return tensors, head["meta"]

    def latest_snapshot_before(self, edit_id: int) -> tuple[int, dict[str, torch.Tensor], dict] | None:
        row = self._db.execute(
            "SELECT after_edit, data, meta FROM snapshots WHERE after_edit < ? ORDER BY after_edit DESC",
            (edit_id,),
        ).fetchone()
        return None if row is None else (row[0], *self._snapshot(row[1], row[2]))

    def drop_snapshots_from(self, edit_id: int) -> None:
        """Snapshots taken after `edit_id` contain it; they are invalid once it is undone."""
        if self._db.execute("DELETE FROM snapshots WHERE after_edit >= ?", (edit_id,)).rowcount:
            self._drop_unused_blobs()

    def _drop_unused_blobs(self) -> None:
        used = set()
        for (meta,) in self._db.execute("SELECT meta FROM snapshots"):
            head = json.loads(meta)
            if isinstance(head, dict) and head.get(_SNAPSHOT_FORMAT) == 2:
                used.update(head["tensors"].values())
        for (name,) in self._db.execute("SELECT name FROM state WHERE name LIKE 'blob/%'").fetchall():
            if name[len("blob/"):] not in used:
                self._db.execute("DELETE FROM state WHERE name=?", (name,))

    def snapshot_ids(self) -> list[int]:
        return [r[0] for r in self._db.execute("SELECT after_edit FROM snapshots ORDER BY after_edit")]

    # -- sharing ------------------------------------------------------------------------------
    def export(self, folder: str | Path) -> Path:
        """Write the store as a folder: manifest.json (meta, edits) + safetensors files (no pickle)."""
        out = Path(folder)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"export folder {out} is not empty")
        out.mkdir(parents=True, exist_ok=True)
        edits = self.edits()
        arts: dict[str, torch.Tensor] = {}
        for e in edits:
            for name, t in self.artifacts(e.id).items():
                arts[f"{e.id}/{name}"] = t
        (out / "artifacts.safetensors").write_bytes(tensors_to_bytes(arts))
        state = self.get_state()
        if state is not None:
            (out / "state.safetensors").write_bytes(tensors_to_bytes(state[0]))
        snaps = []
        rows = self._db.execute("SELECT after_edit, data, meta FROM snapshots ORDER BY after_edit").fetchall()
        for after, data, meta in rows:
            tensors, meta = self._snapshot(data, meta)
            (out / f"snapshot-{after}.safetensors").write_bytes(tensors_to_bytes(tensors))
            snaps.append({"after_edit": after, "meta": meta})
        manifest = {
            "format": "editbank-store",
            "schema_version": SCHEMA_VERSION,
            "meta": self.meta(),
            "edits": [e.to_dict() for e in edits],
            "state_meta": None if state is None else state[1],
            "snapshots": snaps,
        }
        tmp = out / "manifest.json.tmp"  # written last and renamed: a folder without it is no export
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out / "manifest.json")
        return out

    @classmethod
    def import_folder(cls, folder: str | Path, path: str | Path | None,
                      fingerprint: str | None = None) -> EditStore:
        """Create a store at `path` from a folder written by `export`. Only files inside the folder are read;
        an export of another schema, or (given `fingerprint`) made for another model, is refused."""
        src = Path(folder)
        try:
            manifest = json.loads((src / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{src} is not an exported editbank store: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != "editbank-store":
            raise ValueError(f"{src} is not an exported editbank store (manifest.json has no format marker)")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{src} is an editbank store export of schema {manifest.get('schema_version')!r}; this "
                             f"editbank reads schema {SCHEMA_VERSION}")
        theirs = (manifest.get("meta") or {}).get("fingerprint")
        if fingerprint is not None and theirs is not None and theirs != fingerprint:
            raise ValueError(f"{src} was exported for another model (fingerprint {str(theirs)[:12]}…, this model is "
                             f"{fingerprint[:12]}…)")
        for snap in manifest.get("snapshots") or []:
            if not isinstance(snap, dict) or type(snap.get("after_edit")) is not int:
                raise ValueError(f"{src}: manifest snapshot entries need an integer after_edit, got {snap!r}")
        _inside(src, "artifacts.safetensors")
        store = cls(path)
        try:
            store.lock_for_writing()  # an import is a writer like any other
            if store.count() or store.get_meta("fingerprint") is not None:
                raise ValueError(f"store {path} already holds edits; import into a new file")
            store._import(src, manifest)
        except BaseException as exc:
            store.discard_if_new()  # a failed import leaves no file behind (a store it created, under its lock)
            if isinstance(exc, (ValueError, OSError)) or not isinstance(exc, Exception):
                raise
            raise ValueError(f"{src} is a malformed editbank store export: {type(exc).__name__}: {exc}") from None
        return store

    def _import(self, src: Path, manifest: dict[str, Any]) -> None:
        arts = bytes_to_tensors(_inside(src, "artifacts.safetensors").read_bytes())
        with self.transaction():
            for k, v in manifest["meta"].items():
                self.set_meta(k, v)
            for e in manifest["edits"]:
                self._db.execute(
                    "INSERT INTO edits(id, batch, request, method, status, created, updated, stats) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (e["id"], e["batch"], json.dumps(EditRequest.from_dict(e["request"]).to_dict()), e["method"],
                     e["status"], e["created"], e["updated"], json.dumps(e["stats"])),
                )
                prefix = f"{e['id']}/"
                self.put_artifacts(e["id"], {k[len(prefix):]: v for k, v in arts.items() if k.startswith(prefix)})
            if manifest["state_meta"] is not None:
                state = bytes_to_tensors(_inside(src, "state.safetensors").read_bytes())
                self.put_state(state, manifest["state_meta"])
            for snap in manifest["snapshots"]:
                data = bytes_to_tensors(_inside(src, f"snapshot-{snap['after_edit']}.safetensors").read_bytes())
                self.put_snapshot(snap["after_edit"], data, snap["meta"])


_STATE_FORMAT = "__editbank_state_format__"
_SNAPSHOT_FORMAT = "__editbank_snapshot_format__"


def _inside(folder: Path, name: str) -> Path:
    """folder/name, refused if it resolves outside the folder (a link or a crafted name)."""
    root = folder.resolve()
    target = (folder / name).resolve()
    if root != target.parent and root not in target.parents:
        raise ValueError(f"{folder}: {name} points outside the export folder")
    return target


def _split(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
