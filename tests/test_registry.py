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


def test_chunks_of_two_snapshots_interleaved_never_make_a_partial_table(monkeypatch):
    """A node that came back gets a snapshot on a new connection while an older one may
    still arrive on the old connection: their chunks interleave. A chunk of an older
    snapshot must not restart the loading, and one arriving after a newer snapshot is in
    place must not replace it with its part of the table (the node would then answer
    NoSuchAgent for agents that exist)."""
    monkeypatch.setattr(registry, "SNAPSHOT_CHUNK", 10)
    table, replica = Table("e1"), Replica()
    for i in range(30):
        table.set(f"a{i}", "n1", i)
    older = list(table.snapshot())
    table.take_updates()
    table.set("b", "n2", 1)
    table.take_updates()
    newer = list(table.snapshot())
    assert older[0]["seq"] < newer[0]["seq"]
    for body in (older[0], newer[0], older[1], newer[1], older[2], newer[2], newer[3]):
        replica.apply(body)
    assert replica.synced and len(replica.entries) == 31 and replica.lookup("b") == Entry("n2", 1)
    for body in older:  # stragglers after the newer one is in place
        replica.apply(body)
    assert replica.synced and len(replica.entries) == 31
    replica.apply(newer[-1])  # a copy of the newest snapshot's last chunk alone
    assert replica.synced and len(replica.entries) == 31

    table.set("c", "n3", 1)
    gap = table.take_updates()
    table.set("d", "n3", 1)
    assert not replica.apply(table.take_updates())  # a gap: it needs a snapshot again
    assert not replica.synced and gap["seq"] == replica.seq + 1
    replica.apply(older[-1])  # an old snapshot's last chunk, while it waits for a new one
    assert not replica.synced and len(replica.entries) == 31
    for body in table.snapshot():
        replica.apply(body)
    assert replica.synced and len(replica.entries) == 33


def test_a_supervisor_elected_again_in_the_same_process_is_not_taken_for_a_straggler(tmp_path):
    """Its table starts over at sequence 0: with the epoch of the node process alone, the
    replicas would ignore its snapshots as older than what they hold."""
    import asyncio
    from harness import Cluster, make_config
    from mesh.supervisor import SupervisorRole

    async def go():
        c = Cluster(make_config(tmp_path), tmp_path)
        await c.start()
        try:
            node = c.nodes[c.cfg.supervisor_node]
            first = c.role.table.epoch
            again = SupervisorRole.__new__(SupervisorRole)
            SupervisorRole.__init__(again, node)
            assert again.table.epoch != first and again.table.seq == 0
            replica = Replica()
            table = Table(first)
            for i in range(3):
                table.set(f"a{i}", "n1", i)
                replica.apply(table.take_updates()) if replica.synced else [replica.apply(b) for b in table.snapshot()]
            assert replica.synced and replica.seq > 0
            again.table.set("b", "n2", 1)
            for body in again.table.snapshot():
                assert replica.apply(body)
            assert replica.synced and replica.lookup("b") == Entry("n2", 1)
        finally:
            node.supervisor = c.role
            await c.close()
    asyncio.run(go())


def test_a_gap_is_mended_by_the_changes_since_not_the_table():
    table, replica = Table("e1"), Replica()
    for i in range(100):
        table.set(f"a{i}", "n1", 1)
    table.take_updates()
    sync(replica, table)
    held = replica.seq
    table.set("a1", "n2", 2)
    table.take_updates()  # lost on the way
    table.remove("a2")
    table.set("a3", "n3", 3)
    table.take_updates()  # lost too
    table.set("b", "n1", 1)
    assert not replica.apply(table.take_updates())
    body = table.catch_up("e1", held)
    assert body["since"] == held and body["seq"] == table.seq
    assert sorted(u[0] for u in body["updates"]) == ["a1", "a2", "a3", "b"]  # the changes, not 100 names
    assert replica.apply(body) and replica.synced and replica.seq == table.seq
    assert replica.entries == table.entries


def test_a_catch_up_applies_on_any_table_it_covers_and_no_other():
    """The catch-up from an earlier hello may arrive after updates that came on time:
    applied again they change nothing. One older than the table is ignored; one that
    starts after the table needs what it does not carry, so the replica asks again."""
    table, replica = Table("e1"), Replica()
    sync(replica, table)
    start = replica.seq
    for i in range(5):
        table.set("a", "n1", i)
        table.set(f"b{i}", "n2", 1)
        assert replica.apply(table.take_updates())
    assert replica.apply(table.catch_up("e1", start)) and replica.entries == table.entries
    old = table.catch_up("e1", start)
    table.set("c", "n1", 1)
    assert replica.apply(table.take_updates())
    assert replica.apply(old) and replica.lookup("c") == Entry("n1", 1)  # older than the table: ignored
    later = Table("e1")  # a table whose changes start after what the replica holds
    later.seq = replica.seq + 1
    later.set("d", "n1", 1)
    later.take_updates()
    assert not replica.apply(later.catch_up("e1", replica.seq + 1))
    assert table.catch_up("e2", replica.seq) is None  # another epoch: the whole table


def test_a_catch_up_past_the_kept_changes_is_a_snapshot(monkeypatch):
    monkeypatch.setattr(registry, "LOG_ITEMS", 10)
    table = Table("e1")
    for i in range(30):
        table.set(f"a{i}", "n1", 1)
        table.take_updates()
    assert table.catch_up("e1", 0) is None  # those 30 changes are no longer all kept
    assert sorted(u[0] for u in table.catch_up("e1", 25)["updates"]) == ["a25", "a26", "a27", "a28", "a29"]
    assert table.catch_up("e1", table.seq)["updates"] == []


def test_a_node_with_a_gap_asks_once_and_gets_the_changes_since(tmp_path):
    """On the in-memory mesh: the node's hello says which table it holds, the supervisor
    answers with the changes since, not the table; while the answer is on its way, the
    updates it refuses do not make it ask again."""
    import asyncio
    from harness import Cluster, make_config

    async def go():
        c = Cluster(make_config(tmp_path), tmp_path)
        await c.start()
        try:
            m = c.client()
            for i in range(20):
                await c.run(m.spawn(f"a{i}", "counter"))
            await c.settle()
            role, n2 = c.role, c.nodes["n2"]
            assert n2.names.synced and n2.names.held() == [role.table.epoch, role.table.seq]
            snapshots, hellos = [], []
            sent_snapshot, say_hello = role._send_snapshot, n2.say_hello
            role._send_snapshot = lambda node: (snapshots.append(node), sent_snapshot(node))
            n2.say_hello = lambda: (hellos.append(c.clock.now()), say_hello())
            role.table.set("lost", "n3", 1)
            role.table.take_updates()  # never sent: a gap for every node
            for i in range(5):
                role.table.set(f"x{i}", "n3", 1)
                role._push_registry()  # each refused by n2
            await c.settle()
            await c.advance(0.5)
            assert len(hellos) == 1 and snapshots == []
            assert n2.names.synced and n2.names.replica.entries == role.table.entries
        finally:
            await c.close()
    asyncio.run(go())


def test_a_node_waiting_for_the_registry_asks_once_per_dead_after_not_each_tick(tmp_path):
    """A replica that is not synced asks for the registry with a hello. It asked on every
    heartbeat tick, and each hello cost the whole table: at a million names a node needs
    longer than a tick to load it, so the tables came faster than it loaded them."""
    import asyncio
    from harness import Cluster, make_config

    async def go():
        c = Cluster(make_config(tmp_path), tmp_path)
        await c.start()
        try:
            n2, timing = c.nodes["n2"], c.cfg.timing
            hellos, say_hello = [], n2.say_hello
            await c.settle()
            n2.names.replica.apply = lambda body: False  # no answer ever brings it up to date
            n2.names.replica.synced = False
            n2.say_hello = lambda: (hellos.append(c.clock.now()), say_hello())
            await c.advance(4 * timing.dead_after_s)
            assert timing.dead_after_s >= 3 * timing.heartbeat_s
            assert 1 <= len(hellos) <= 5, hellos
            assert n2.lease.valid()  # renewed meanwhile, as on any tick
        finally:
            await c.close()
    asyncio.run(go())


def test_a_snapshot_is_the_table_when_its_first_chunk_was_taken(monkeypatch):
    monkeypatch.setattr(registry, "SNAPSHOT_CHUNK", 10)
    table, replica = Table("e1"), Replica()
    for i in range(25):
        table.set(f"a{i}", "n1", 1)
    table.take_updates()
    chunks = table.snapshot()
    first = next(chunks)
    table.set("a24", "n2", 2)  # changes while the other chunks wait for their turn
    table.set("late", "n3", 1)
    table.remove("a0")
    later = table.take_updates()
    for body in (first, *chunks):
        assert body["seq"] == first["seq"] and replica.apply(body)
    assert replica.synced and replica.lookup("a24") == Entry("n1", 1) and replica.lookup("a0")
    assert replica.apply(later) and replica.entries == table.entries


def test_a_restarted_node_gets_one_snapshot_over_several_turns_and_the_changes_made_meanwhile(tmp_path, monkeypatch):
    """The supervisor sends a snapshot's chunks one a loop turn (a million names at once
    held its loop past the leases), one snapshot at a time per node, and then the
    changes made while they went out: the replica refused the updates between them."""
    import asyncio
    from harness import Cluster, make_config
    monkeypatch.setattr(registry, "SNAPSHOT_CHUNK", 4)

    async def go():
        c = Cluster(make_config(tmp_path), tmp_path)
        await c.start()
        try:
            m = c.client()
            await c.run(asyncio.gather(*(m.spawn(f"a{i}", "counter") for i in range(30))), limit_s=30)
            role, sent = c.role, []
            send_snapshot = role._send_snapshot
            role._send_snapshot = lambda node: (sent.append(node), send_snapshot(node))
            streams, send_chunks = [], role._send_chunks
            role._send_chunks = lambda node, *rest: (streams.append(node), send_chunks(node, *rest))[1]
            n2 = await c.restart("n2")
            role._send_snapshot("n2")  # asked twice while the first is on its way: one snapshot
            spawns = asyncio.gather(*(m.spawn(f"b{i}", "counter") for i in range(10)))
            await c.run(spawns, limit_s=30)
            await c.run(asyncio.gather(*(m.call(f"a{i}", {"op": "get"}) for i in range(30))), limit_s=30)
            await c.settle()
            assert sent.count("n2") >= 2 and streams.count("n2") < sent.count("n2") and not role._snapshots_under_way
            assert n2.names.synced and n2.names.replica.entries == role.table.entries
        finally:
            await c.close()
    asyncio.run(go())
