"""Electing the supervisor in etcd: one leader at a time, terms that fence the old one."""

import asyncio

import httpx
import pytest

from mesh.clock import Clock
from mesh.etcd import Etcd, put_op
from mesh.etcd_member import wait_serving
from mesh.leadership import Leadership, current_leader

KEY = "mesh/test/leader"


async def _candidates(cluster, n: int, ttl_s: int = 1) -> list[Leadership]:
    out = []
    for i in range(n):
        etcd = Etcd(cluster.endpoints, timeout_s=1.0)
        await wait_serving(etcd, 10)
        out.append(Leadership(etcd, KEY, f"c{i}".encode(), ttl_s, Clock()))
    return out


async def _close(candidates) -> None:
    for c in candidates:
        await c.etcd.close()


async def test_one_candidate_leads_and_the_next_term_is_higher(etcd_factory):
    a, b = cands = await _candidates(etcd_factory(), 2, ttl_s=5)
    try:
        term_a = await a.campaign()
        waiting = asyncio.ensure_future(b.campaign())
        await asyncio.sleep(0.3)
        assert a.leading() and not waiting.done()
        assert await current_leader(a.etcd, KEY) == (b"c0", term_a)
        await a.resign()
        term_b = await asyncio.wait_for(waiting, 5)
        assert term_b > term_a and b.leading() and not a.leading()
        assert await current_leader(a.etcd, KEY) == (b"c1", term_b)
        # the old term's writes are refused by etcd itself
        a.term = term_a  # as if the deposed leader still believed it led
        old = await a.etcd.txn([a.guard()], [put_op("mesh/test/record", b"old")])
        new = await b.etcd.txn([b.guard()], [put_op("mesh/test/record", b"new")])
        assert not old.succeeded and new.succeeded
        assert (await b.etcd.get("mesh/test/record")).value == b"new"
    finally:
        await _close(cands)


async def test_a_campaign_whose_answer_was_lost_finds_it_won(etcd_factory):
    (a,) = cands = await _candidates(etcd_factory(), 1, ttl_s=5)
    try:
        term = await a.campaign()
        a.term = 0  # the answer never arrived; the same lease campaigns again
        assert await a.campaign() == term
    finally:
        await _close(cands)


@pytest.mark.async_timeout(40)
async def test_a_silent_leader_stops_leading_before_anyone_else_leads(etcd_factory):
    """A leader cut off from etcd (its keepalives never arrive) counts its term out
    before etcd expires its key, so there is no instant with two leaders."""
    a, b = cands = await _candidates(etcd_factory(), 2, ttl_s=1)
    try:
        await a.campaign()   # and never keeps its lease alive: as if cut off
        waiting = asyncio.ensure_future(b.campaign())
        ended_here = a.lease.until
        await asyncio.wait_for(waiting, 10)
        elected_at = b.clock.now()
        assert not a.leading()
        assert elected_at > ended_here, f"b elected {ended_here - elected_at:.3f}s before a's term ended"
        a_term = a.term
        assert b.term > a_term
        assert not (await a.etcd.txn([a.guard()], [put_op("mesh/test/x", b"a")])).succeeded
    finally:
        await _close(cands)


async def test_a_kept_leader_keeps_leading(etcd_factory):
    a, b = cands = await _candidates(etcd_factory(), 2, ttl_s=1)
    try:
        await a.campaign()
        holding = asyncio.ensure_future(a.hold())
        rival = asyncio.ensure_future(b.campaign())
        for _ in range(60):  # 3 s: three TTLs
            assert a.leading()
            await asyncio.sleep(0.05)
        assert not rival.done() and not holding.done()
        await a.resign()
        await asyncio.wait_for(rival, 5)
        await asyncio.wait_for(holding, 2)  # the keepalive finds the lease gone
        rival.result()
    finally:
        await _close(cands)


async def _etcd_leader(endpoints: list[str]) -> int:
    """The index of the endpoint whose member is etcd's own raft leader."""
    async with httpx.AsyncClient(timeout=1) as http:
        for i, url in enumerate(endpoints):
            status = (await http.post(url + "/v3/maintenance/status", content="{}")).json()
            if status["leader"] == status["header"]["member_id"]:
                return i
    raise AssertionError("no etcd member says it leads")


@pytest.mark.async_timeout(60)
async def test_killing_etcds_own_leader_does_not_end_the_term(etcd_factory):
    cluster = etcd_factory(3, election_ms=200)
    (a,) = cands = await _candidates(cluster, 1, ttl_s=1)
    try:
        term = await a.campaign()
        holding = asyncio.ensure_future(a.hold())
        await asyncio.sleep(0.5)
        victim = await _etcd_leader(cluster.endpoints)
        cluster.kill(cluster.members[victim].name)
        for _ in range(80):  # 4 s
            assert a.leading() and not holding.done()
            await asyncio.sleep(0.05)
        assert a.term == term
        holding.cancel()
    finally:
        await _close(cands)


class _SkewableClock(Clock):
    """The real clock, plus seconds a test adds (as if an answer took that long)."""

    def __init__(self):
        self.extra = 0.0

    def now(self) -> float:
        return super().now() + self.extra


async def test_a_win_that_came_after_the_lease_ran_out_here_renews_it_before_leading(etcd_factory):
    """Seen in a namespaced run: etcd had no leader yet, the campaign's transaction took
    longer than the lease, and the winner's term ended 100 ms after it began (its node
    exited). A win found late renews the lease first."""
    cluster = etcd_factory()
    etcd = Etcd(cluster.endpoints, timeout_s=1.0)
    await wait_serving(etcd, 10)
    clock = _SkewableClock()
    a = Leadership(etcd, KEY, b"slow", 2, clock)
    real_txn = etcd.txn

    async def slow_txn(*args, **kwargs):
        result = await real_txn(*args, **kwargs)
        clock.extra += 3.0      # the answer "took" longer than the lease
        return result
    etcd.txn = slow_txn
    try:
        term = await a.campaign()
        assert a.leading() and a.lease.remaining() > 1.0
        assert await current_leader(etcd, KEY) == (b"slow", term)
    finally:
        await etcd.close()
