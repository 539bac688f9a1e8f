"""The etcd client against real etcd members (tests/etcds.py)."""

import asyncio
import os
import signal

import pytest

from mesh.etcd import Etcd, EtcdError, EtcdUnavailable, absent, created_at, delete_op, prefix_end, put_op, range_op
from mesh.etcd_member import wait_serving


async def _client(cluster, timeout_s=1.0) -> Etcd:
    etcd = Etcd(cluster.endpoints, timeout_s=timeout_s)
    await wait_serving(etcd, 10)
    return etcd


def test_prefix_end_covers_exactly_the_prefix():
    assert prefix_end("a/") == b"a0"
    assert prefix_end("a\xff") == "a\xff".encode()[:-1] + b"\xc0"
    assert prefix_end("") == b"\0"


async def test_keys_values_and_transactions(etcd_factory):
    etcd = await _client(etcd_factory())
    try:
        rev = await etcd.put("m/a", b"\x00\xff binary")
        await etcd.put("m/b", b"2")
        await etcd.put("n/c", b"3")
        a = await etcd.get("m/a")
        assert a.value == b"\x00\xff binary" and a.create_revision == rev
        kvs, at = await etcd.range("m/", prefix=True)
        assert [kv.key for kv in kvs] == ["m/a", "m/b"] and at >= rev
        # compare-and-swap on the create revision: only the first of two creators wins
        first = await etcd.txn([absent("m/x")], [put_op("m/x", b"one")], [range_op("m/x")])
        second = await etcd.txn([absent("m/x")], [put_op("m/x", b"two")], [range_op("m/x")])
        assert first.succeeded and not second.succeeded
        assert second.kvs(0)[0].value == b"one" and second.kvs(0)[0].create_revision == first.revision
        guarded = await etcd.txn([created_at("m/x", first.revision)], [delete_op("m/", prefix=True)])
        assert guarded.succeeded
        assert (await etcd.range("m/", prefix=True))[0] == []
        assert (await etcd.get("n/c")).value == b"3"
    finally:
        await etcd.close()


async def test_leases_keep_keys_and_take_them_with_them(etcd_factory):
    etcd = await _client(etcd_factory())
    try:
        lease = await etcd.grant(5)
        await etcd.put("held", b"x", lease=lease)
        assert 4 <= await etcd.keepalive(lease) <= 5
        assert (await etcd.get("held")).lease == lease
        await etcd.revoke(lease)
        assert await etcd.get("held") is None
        assert await etcd.keepalive(lease) == 0  # gone
        await etcd.revoke(lease)                 # twice is harmless
        with pytest.raises(EtcdError) as err:
            await etcd.put("held", b"x", lease=lease)
        assert err.value.code == 5 and "lease not found" in str(err.value)
    finally:
        await etcd.close()


async def test_a_lease_whose_grant_was_slow_is_renewed_before_it_runs_out(etcd_factory):
    """A grant (or a campaign's win) that took most of the TTL leaves little of the lease
    here: the keeper must renew at once, not sleep a full interval past its end (the first
    leader of a cluster whose etcd was slow right after forming lost its term that way)."""
    from mesh.clock import Clock
    from mesh.etcd_lease import KeptLease
    etcd = await _client(etcd_factory())
    try:
        lease = KeptLease(etcd, 1, Clock())
        await lease.grant()
        lease.until = lease.clock.now() + 0.2   # as if its answer came 0.8 s after it was sent
        keeping = asyncio.ensure_future(lease.keep())
        done, _ = await asyncio.wait([keeping], timeout=1.5)
        assert not done, "the keeper gave the lease up instead of renewing it"
        assert lease.valid() and await etcd.keepalive(lease.id) > 0
        keeping.cancel()
        await lease.revoke()
    finally:
        await etcd.close()


async def test_a_short_lease_expires_and_a_watch_sees_it_go(etcd_factory):
    etcd = await _client(etcd_factory())
    try:
        _, rev = await etcd.range("w/", prefix=True)
        lease = await etcd.grant(1)
        await etcd.put("w/n1", b"alive", lease=lease)
        seen = []
        async for events in etcd.watch("w/", prefix=True, start_revision=rev + 1):
            seen += [(e.kind, e.kv.key) for e in events]
            if ("delete", "w/n1") in seen:
                assert events[-1].prev.value == b"alive"
                break
        assert seen == [("put", "w/n1"), ("delete", "w/n1")]
    finally:
        await etcd.close()


@pytest.mark.async_timeout(60)
async def test_a_watch_resumes_on_another_member_without_missing_an_event(etcd_factory):
    cluster = etcd_factory(3)
    etcd = await _client(cluster)
    writer = await _client(cluster)
    try:
        _, rev = await etcd.range("r/", prefix=True)
        got: list[str] = []
        killed = asyncio.Event()

        async def follow():
            async for events in etcd.watch("r/", prefix=True, start_revision=rev + 1):
                got.extend(e.kv.key for e in events)
                if len(got) == 1:
                    cluster.kill("e1")  # the member the watch's stream came from
                    killed.set()
                if len(got) == 20:
                    return
        task = asyncio.ensure_future(follow())
        writer.endpoints = writer.endpoints[1:]  # the writer never needs the dead one
        await writer.put("r/00", b"")
        await asyncio.wait_for(killed.wait(), 10)
        for i in range(1, 20):
            while True:
                try:
                    await writer.put(f"r/{i:02}", b"")
                    break
                except EtcdUnavailable as exc:  # the etcd leader may have been e1: a new one is elected
                    if exc.unknown and await writer.get(f"r/{i:02}") is not None:
                        break
                    await asyncio.sleep(0.05)
        await asyncio.wait_for(task, 20)
        assert got == [f"r/{i:02}" for i in range(20)]
    finally:
        await etcd.close()
        await writer.close()


@pytest.mark.async_timeout(60)
async def test_a_watch_leaves_a_member_that_went_silent(etcd_factory):
    """A member cut off (here: stopped) ends no stream; the watch finds out by asking it
    for a read, and resumes on another member without missing an event."""
    cluster = etcd_factory(3)
    etcd = await _client(cluster)
    writer = await _client(cluster)
    writer.endpoints = writer.endpoints[1:]  # the writer never needs the silent one
    stopped = cluster.procs["e1"].pid
    try:
        _, rev = await etcd.range("s/", prefix=True)
        etcd._at = 0  # the watch's stream comes from e1
        got: list[str] = []
        first = asyncio.Event()

        async def follow():
            async for events in etcd.watch("s/", prefix=True, start_revision=rev + 1):
                got.extend(e.kv.key for e in events)
                first.set()
                if len(got) == 5:
                    return
        task = asyncio.ensure_future(follow())
        await _put_surely(writer, "s/0")
        await asyncio.wait_for(first.wait(), 10)
        os.kill(stopped, signal.SIGSTOP)  # its streams stay open, and silent
        for i in range(1, 5):
            await _put_surely(writer, f"s/{i}")
        await asyncio.wait_for(task, 15)
        assert got == [f"s/{i}" for i in range(5)]
    finally:
        os.kill(stopped, signal.SIGCONT)
        await etcd.close()
        await writer.close()


async def _put_surely(etcd, key):
    """Put `key`, again until it is surely there (the etcd leader may be the stopped member)."""
    while True:
        try:
            await etcd.put(key, b"")
            return
        except EtcdUnavailable as exc:
            if exc.unknown and await etcd.get(key) is not None:
                return
            await asyncio.sleep(0.05)


async def test_no_member_answering_is_unavailable_within_the_timeout(etcd_factory):
    cluster = etcd_factory()
    etcd = await _client(cluster, timeout_s=0.5)
    try:
        cluster.kill("e1")
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(EtcdUnavailable) as err:
            await etcd.put("k", b"v")
        assert not err.value.unknown  # refused before anything was sent
        assert loop.time() - began < 2
    finally:
        await etcd.close()
