"""LMDB snapshots: records, fencing by incarnation, group commit, growth, corruption."""

import asyncio
import os

import lmdb
import msgpack
import pytest

from mesh.errors import SnapshotCorrupt, StoreError
from mesh.store import Batch, Committer, Record, Store


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "store"), map_size_mb=1)
    yield s
    s.close()


def rec(inc, seq=1, state=None):
    return Record(inc, seq, msgpack.packb(state))


def test_put_and_get(store):
    b = Batch()
    b.add_put("a", rec(3, 7, {"v": 1}))
    assert store.write(b).fenced == {}
    got = store.get("a")
    assert (got.incarnation, got.seq, msgpack.unpackb(got.state)) == (3, 7, {"v": 1})
    assert store.get("missing") is None
    assert store.names() == ["a"]


def test_older_incarnation_is_fenced(store):
    b = Batch()
    b.add_put("a", rec(5))
    store.write(b)
    b = Batch()
    b.add_put("a", rec(4, state="stale"))
    b.add_put("other", rec(1))
    out = store.write(b)
    assert out.fenced == {"a": 5}
    assert msgpack.unpackb(store.get("a").state) is None  # untouched
    assert store.get("other") is not None  # the rest of the batch commits


def test_claim_needs_a_newer_incarnation(store):
    b = Batch()
    b.add_claim("a", rec(2))
    assert store.write(b).fenced == {}
    b = Batch()
    b.add_claim("a", rec(2))
    assert store.write(b).fenced == {"a": 2}


def test_a_fenced_read_refuses_older_writers_from_then_on(store):
    """The incarnation about to start reads under a fence: an older one still running
    cannot commit anything after the read that the new one would not have."""
    b = Batch()
    b.add_put("a", rec(5, 3, "acked"))
    store.write(b)
    b = Batch()
    b.add_fence("a", 9)
    out = store.write(b)
    raw, replies = out.read["a"]
    assert msgpack.unpackb(raw)[1:3] == [5, 3] and replies == []
    b = Batch()
    b.add_put("a", rec(5, 4, "too late"))
    assert store.write(b).fenced == {"a": 9}
    assert store.get("a").seq == 3
    b = Batch()
    b.add_claim("a", rec(8))                    # an incarnation older than the fence
    assert store.write(b).fenced == {"a": 9}
    b = Batch()
    b.add_claim("a", rec(9, 3, "acked"))        # the one that read it
    assert store.write(b).fenced == {}
    assert store.get("a").incarnation == 9


def test_put_after_claim_in_one_batch_merges(store):
    b = Batch()
    b.add_claim("a", rec(2, 1, "first"))
    b.add_put("a", rec(2, 2, "second"))
    assert store.write(b).fenced == {}
    assert store.get("a").seq == 2


def test_delete_is_fenced_too(store):
    b = Batch()
    b.add_put("a", rec(5))
    store.write(b)
    b = Batch()
    b.deletes["a"] = 4
    assert store.write(b).fenced == {"a": 5}
    b = Batch()
    b.deletes["a"] = 5
    store.write(b)
    assert store.get("a") is None


def test_meta_records(store):
    b = Batch()
    b.meta_puts.update({"sup/child/x": b"1", "sup/child/y": b"2", "sup/epoch": b"3"})
    store.write(b)
    assert store.meta_items("sup/child/") == [("sup/child/x", b"1"), ("sup/child/y", b"2")]
    b = Batch()
    b.meta_deletes.add("sup/child/x")
    store.write(b)
    assert [k for k, _ in store.meta_items("sup/child/")] == ["sup/child/y"]
    assert store.get_meta("sup/epoch") == b"3"


def test_map_grows_when_full(store):
    big = os.urandom(200_000)
    for i in range(20):  # 4 MB into a 1 MB map
        b = Batch()
        b.add_put(f"a{i}", Record(1, 1, big))
        assert store.write(b).error is None
    assert store.env.info()["map_size"] > 1 << 20
    assert all(store.get(f"a{i}").state == big for i in range(20))


def test_corrupt_snapshot_names_the_agent(store):
    with store.env.begin(write=True) as txn:
        txn.put(b"bad", b"\xc1\xc1", db=store.agents)
        txn.put(b"odd", msgpack.packb([99, 1, 1, b""]), db=store.agents)
    with pytest.raises(SnapshotCorrupt, match="'bad'"):
        store.get("bad")
    with pytest.raises(SnapshotCorrupt, match="'odd'.*format 99"):
        store.get("odd")


def test_a_new_incarnation_may_replace_a_corrupt_record(store):
    with store.env.begin(write=True) as txn:
        txn.put(b"bad", b"\xc1", db=store.agents)
    b = Batch()
    b.add_claim("bad", rec(1))
    assert store.write(b).fenced == {}


def test_failed_commit_is_reported_not_raised(store, monkeypatch):
    def broken(batch):
        raise lmdb.DiskError("No space left on device")
    monkeypatch.setattr(store, "_write_once", broken)
    out = store.write(Batch(puts={"a": rec(1)}))
    assert isinstance(out.error, StoreError) and "No space" in str(out.error)


def test_environment_refuses_use_after_fork(store, monkeypatch):
    monkeypatch.setattr(store, "_pid", -1)
    with pytest.raises(StoreError, match="across a fork"):
        store.get("a")


def test_unopenable_store_is_a_store_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open the store"):
        Store(str(path / "store"))


async def test_committer_thread_commits_in_order_and_reports_on_the_loop(tmp_path):
    store = Store(str(tmp_path / "s"))
    committer = Committer(store)
    loop = asyncio.get_running_loop()
    outcomes = []
    done = loop.create_future()
    for i in range(50):
        b = Batch()
        b.add_put("a", Record(1, i, msgpack.packb(i)))
        committer.submit(b, lambda o, i=i: (outcomes.append(i), i == 49 and done.set_result(None)))
    await done
    assert outcomes == list(range(50))
    assert store.get("a").seq == 49
    committer.close()
    store.close()


def test_recorded_replies_live_beside_the_record_and_share_its_fate(store):
    b = Batch()
    b.add_put("a", rec(2))
    b.add_replies("a", [("r1", b"R\x01", 1.0, 61.0, b"d1"), ("r2", b"R\x02", 2.0, 62.0, None)], [])
    store.write(b)
    assert store.replies("a") == [("r1", b"R\x01", 1.0, 61.0, b"d1"), ("r2", b"R\x02", 2.0, 62.0, None)]
    b = Batch()
    b.add_put("a", rec(2, 2))
    b.add_replies("a", [("r3", b"R\x03", 3.0, 63.0, None)], ["r1"])
    store.write(b)
    assert [r[0] for r in store.replies("a")] == ["r2", "r3"]
    b = Batch()  # a stale incarnation's replies are fenced with its record
    b.add_put("a", rec(1, 9))
    b.add_replies("a", [("stale", b"R\x00", 4.0, 64.0, None)], [])
    assert store.write(b).fenced == {"a": 2}
    assert [r[0] for r in store.replies("a")] == ["r2", "r3"]
    b = Batch()
    b.add_put("ab", rec(1))  # a name that starts like "a" keeps its own replies
    b.add_replies("ab", [("x", b"R\x00", 5.0)], [])
    store.write(b)
    b = Batch()
    b.deletes["a"] = 2
    store.write(b)
    assert store.replies("a") == [] and [r[0] for r in store.replies("ab")] == ["x"]


def test_a_claim_brings_its_own_replies_and_drops_the_others(store):
    """Replies recorded by another line of incarnations (state that was never
    acknowledged, superseded by a newer incarnation) must not answer a retry."""
    b = Batch()
    b.add_put("a", rec(2))
    b.add_replies("a", [("unacked", b"R\x01", 1.0), ("kept", b"R\x02", 2.0)], [])
    store.write(b)
    b = Batch()
    b.add_claim("a", rec(3))
    b.add_replies("a", [("kept", b"R\x02", 2.0)], [])
    assert not store.write(b).fenced
    assert [r[0] for r in store.replies("a")] == ["kept"]
    b = Batch()  # a fenced claim changes nothing
    b.add_claim("a", rec(3, 5))
    b.add_replies("a", [("other", b"R\x03", 3.0)], [])
    assert store.write(b).fenced == {"a": 3}
    assert [r[0] for r in store.replies("a")] == ["kept"]


def test_a_delete_leaves_its_fence_so_an_older_start_cannot_write_the_name_back(store):
    b = Batch()
    b.add_claim("a", rec(3, state="old"))
    store.write(b)
    b = Batch()
    b.deletes["a"] = 7          # a stop, newer than every incarnation started
    assert store.write(b).fenced == {}
    b = Batch()
    b.add_claim("a", rec(5, state="orphan"))  # a START sent before the stop
    assert store.write(b).fenced == {"a": 7}
    assert store.get("a") is None
    b = Batch()
    b.add_claim("a", rec(8, state="new spawn"))
    assert store.write(b).fenced == {}


def test_replies_recorded_by_an_older_release_still_read(store):
    """[response, wall time] values, from before replies carried a keep-until and a digest."""
    with store.env.begin(write=True) as txn:
        txn.put(b"a\0old", msgpack.packb([b"R\x01", 1700000000.0]), db=store.replies_db)
    assert store.replies("a") == [("old", b"R\x01", 1700000000.0, 1700000000.0, None)]


def test_a_copy_beaten_in_its_batch_by_a_newer_incarnation_is_reported_and_leaves_no_replies(store):
    """Before: merge dropped the older incarnation's copy without a word and still wrote
    its recorded replies, which then answered retries for effects that were not kept."""
    b = Batch()
    assert b.merge({"a": rec(5, 3, "new")}, {}, {}) == {}
    stale = b.merge({"a": rec(4, 9, "old")}, {}, {}, {"a": [("r-old", b"R\x01", 1.0, 61.0, None)]})
    assert stale == {"a": 5}
    out = store.write(b)
    assert out.fenced == {} and msgpack.unpackb(store.get("a").state) == "new"
    assert store.replies("a") == []
