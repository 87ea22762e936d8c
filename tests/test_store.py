import pytest
import torch

from editbank import EditRequest, EditStore
from editbank.store import StoreMismatchError


def test_edits_artifacts_and_state_round_trip(tmp_path):
    path = tmp_path / "s.db"
    st = EditStore(path)
    st.bind("fp1", "grace", {"eps_init": 1.0}, "0")
    e = st.add_edit(EditRequest(prompt="a b", target="c"), "grace")
    st.put_artifacts(e.id, {"key": torch.arange(4.0)})
    st.put_state({"w": torch.ones(2, 2)}, {"labels": ["x"]})
    st.update_edit(e.id, status="reverted", stats={"loss": 0.5})
    st.close()
    st = EditStore(path)
    got = st.get_edit(e.id)
    assert got.status == "reverted" and got.stats == {"loss": 0.5} and got.request.target == " c"
    assert torch.equal(st.artifacts(e.id)["key"], torch.arange(4.0))
    tensors, meta = st.get_state()
    assert torch.equal(tensors["w"], torch.ones(2, 2)) and meta == {"labels": ["x"]}
    with pytest.raises(StoreMismatchError, match="another model"):
        st.bind("fp2", "grace", {}, "0")
    with pytest.raises(StoreMismatchError, match="method"):
        st.bind("fp1", "ft", {}, "0")


def test_transaction_rolls_back_everything():
    st = EditStore(None)
    with pytest.raises(RuntimeError):
        with st.transaction():
            st.add_edit(EditRequest(prompt="p", target="t"), "grace")
            st.put_state({"w": torch.zeros(1)}, {})
            raise RuntimeError("boom")
    assert st.count() == 0 and st.get_state() is None


def test_snapshots_are_dropped_when_they_contain_an_undone_edit():
    st = EditStore(None)
    for after in (0, 5, 10):
        st.put_snapshot(after, {"w": torch.full((1,), float(after))}, {})
    assert st.latest_snapshot_before(7)[0] == 5
    st.drop_snapshots_from(5)
    assert st.snapshot_ids() == [0]


def test_not_a_store(tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_text("hello, I am not SQLite" * 100)
    with pytest.raises(ValueError, match="not an editbank store"):
        EditStore(bad)
    with pytest.raises(ValueError, match="directory"):
        EditStore(tmp_path)


def test_state_rows_skip_unchanged_tensors_and_read_old_single_blob_states(tmp_path):
    import json

    from editbank.store import tensors_to_bytes

    st = EditStore(tmp_path / "s.db")
    a, b = torch.ones(3), torch.zeros(2)
    st.put_state({"a": a, "b": b}, {"n": 1})
    st.put_state({"a": a * 5, "b": b + 1}, {"n": 2}, unchanged={"a"})  # "a" is claimed unchanged: kept
    tensors, meta = st.get_state()
    assert meta == {"n": 2} and torch.equal(tensors["a"], a) and torch.equal(tensors["b"], b + 1)
    st.put_state({"b": b}, {"n": 3})  # a tensor that is gone loses its row
    assert set(st.get_state()[0]) == {"b"}
    assert st._db.execute("SELECT COUNT(*) FROM state WHERE name LIKE 'current/%'").fetchone()[0] == 1
    # a store written by editbank 0.1.0 kept the whole state in one blob
    st._db.execute("DELETE FROM state")
    st._db.execute("INSERT INTO state(name, data, meta) VALUES ('current', ?, ?)",
                   (tensors_to_bytes({"a": a}), json.dumps({"n": 0})))
    tensors, meta = st.get_state()
    assert meta == {"n": 0} and torch.equal(tensors["a"], a)
    st.close()


def test_snapshots_store_each_tensor_once_and_read_old_single_blob_snapshots(tmp_path):
    import json

    from editbank.store import tensors_to_bytes

    st = EditStore(tmp_path / "s.db")
    shared, w = torch.arange(1000.0), [torch.full((4,), float(i)) for i in range(3)]
    for i, after in enumerate((2, 4, 6)):  # a tensor every snapshot holds (a closed memory) and one that changes
        st.put_snapshot(after, {"closed": shared, "open": w[i]}, {"i": i})

    def blobs():
        return st._db.execute("SELECT COUNT(*) FROM state WHERE name LIKE 'blob/%'").fetchone()[0]

    assert blobs() == 4  # the shared tensor once, plus three versions of the open one
    after, tensors, meta = st.latest_snapshot_before(5)
    assert (after, meta) == (4, {"i": 1}) and torch.equal(tensors["closed"], shared)
    assert torch.equal(tensors["open"], w[1])
    st.drop_snapshots_from(4)  # blobs no snapshot names any more go with them
    assert st.snapshot_ids() == [2] and blobs() == 2
    st.put_snapshot(2, {"closed": shared}, {"i": 9})  # a replaced snapshot releases what only it named
    assert blobs() == 1
    out = tmp_path / "shared"
    st.export(out)  # an export writes whole snapshots
    assert set(st.latest_snapshot_before(3)[1]) == {"closed"}
    assert json.loads((out / "manifest.json").read_text())["snapshots"] == [{"after_edit": 2, "meta": {"i": 9}}]
    # a store written before content-addressed snapshots kept each snapshot in one blob
    st._db.execute("INSERT INTO snapshots(after_edit, created, data, meta) VALUES (8, 0, ?, ?)",
                   (tensors_to_bytes({"x": shared}), json.dumps({"old": True})))
    after, tensors, meta = st.latest_snapshot_before(9)
    assert after == 8 and meta == {"old": True} and torch.equal(tensors["x"], shared)
    st.close()
