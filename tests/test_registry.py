"""The replicated name table: sequenced updates, gaps, epochs and chunked snapshots."""

from mesh import registry
from mesh.registry import Entry, Replica, Table


def sync(replica: Replica, table: Table) -> None:
    for body in table.snapshot():
        assert replica.apply(body)


def test_updates_apply_in_order():
    table, replica = Table("e1"), Replica()
    table.set("a", "n1", 1)
    sync(replica, table)
    table.set("b", "n2", 2)
    table.set("a", None, 1)
    assert replica.apply(table.take_updates())
    assert replica.lookup("a") == Entry(None, 1) and replica.lookup("b") == Entry("n2", 2)
    table.remove("b")
    assert replica.apply(table.take_updates())
    assert replica.lookup("b") is None


def test_unchanged_sets_produce_no_update():
    table = Table("e1")
    table.set("a", "n1", 1)
    table.take_updates()
    table.set("a", "n1", 1)
    assert table.take_updates() is None


def test_a_gap_asks_for_a_snapshot():
    table, replica = Table("e1"), Replica()
    sync(replica, table)
    table.set("a", "n1", 1)
    table.take_updates()  # lost on the way
    table.set("b", "n1", 2)
    assert not replica.apply(table.take_updates())
    assert not replica.synced
    sync(replica, table)
    assert replica.synced and replica.lookup("a") and replica.lookup("b")


def test_repeated_update_is_ignored():
    table, replica = Table("e1"), Replica()
    sync(replica, table)
    table.set("a", "n1", 1)
    body = table.take_updates()
    assert replica.apply(body) and replica.apply(body)


def test_a_new_epoch_needs_a_snapshot():
    old, replica = Table("e1"), Replica()
    sync(replica, old)
    new = Table("e2")
    new.set("a", "n3", 5)
    assert not replica.apply(new.take_updates())
    sync(replica, new)
    assert replica.lookup("a") == Entry("n3", 5)


def test_snapshot_in_chunks_only_counts_when_complete(monkeypatch):
    monkeypatch.setattr(registry, "SNAPSHOT_CHUNK", 10)
    table, replica = Table("e1"), Replica()
    for i in range(35):
        table.set(f"a{i}", "n1", i)
    chunks = list(table.snapshot())
    assert len(chunks) == 4 and [c["last"] for c in chunks] == [False, False, False, True]
    for body in chunks[:-1]:
        replica.apply(body)
        assert not replica.synced
    replica.apply(chunks[-1])
    assert replica.synced and len(replica.entries) == 35
