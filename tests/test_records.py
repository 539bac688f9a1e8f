"""The supervisor's records in etcd: joined writes, fenced by the term, safe when an answer is lost."""

import asyncio
from urllib.parse import urlparse

import msgpack

from mesh.clock import Clock
from mesh.etcd import Etcd
from mesh.etcd_member import wait_serving
from mesh.leadership import Leadership
from mesh.records import Deposed, EtcdRecords

PREFIX = "mesh/test/"
KEY = PREFIX + "leader"


async def _leader(endpoints, name: bytes) -> tuple[Leadership, EtcdRecords]:
    etcd = Etcd(endpoints, timeout_s=1.0)
    await wait_serving(etcd, 10)
    lead = Leadership(etcd, KEY, name, 5, Clock())
    await lead.campaign()
    records = EtcdRecords(etcd, lead, PREFIX)
    await records.load()
    return lead, records


async def test_writes_made_together_are_joined_and_a_new_leader_reads_them(etcd_factory):
    cluster = etcd_factory()
    a, rec_a = await _leader(cluster.endpoints, b"a")
    try:
        outcomes = await asyncio.gather(*(rec_a.write({f"sup/child/n{i}": msgpack.packb(i)}) for i in range(300)))
        assert all(o.error is None for o in outcomes)
        assert rec_a.writes <= 10, rec_a.writes  # 300 writes in a handful of transactions
        assert (await rec_a.write({}, ["sup/child/n7"])).error is None
        assert (await rec_a.write({"sup/child/n8": b"changed"})).error is None
        await a.resign()
        b, rec_b = await _leader(cluster.endpoints, b"b")
        try:
            children = dict(rec_b.items("sup/child/"))
            assert len(children) == 299 and "sup/child/n7" not in children
            assert children["sup/child/n8"] == b"changed" and children["sup/child/n9"] == msgpack.packb(9)
            assert await rec_b.begin_epoch() == b.term > 0
        finally:
            await b.etcd.close()
    finally:
        await a.etcd.close()


async def test_a_deposed_leaders_writes_fail_and_change_nothing(etcd_factory):
    cluster = etcd_factory()
    a, rec_a = await _leader(cluster.endpoints, b"a")
    try:
        await rec_a.write({"sup/child/x": b"from a"})
        term_a = a.term
        await a.resign()
        b, rec_b = await _leader(cluster.endpoints, b"b")
        try:
            a.term = term_a  # a still believes it leads, and its lease has not run out here
            a.lease.until = a.clock.now() + 5
            outcome = await rec_a.write({"sup/child/x": b"a again", "sup/child/y": b"from a"})
            assert isinstance(outcome.error, Deposed)
            assert (await rec_b.write({"sup/child/x": b"from b"})).error is None
            assert (await b.etcd.get(PREFIX + "sup/child/x")).value == b"from b"
            assert await b.etcd.get(PREFIX + "sup/child/y") is None
        finally:
            await b.etcd.close()
    finally:
        await a.etcd.close()


class DroppingProxy:
    """A TCP pipe to etcd that can lose one answer (the request lands, the reply does not)
    or one request (closed before it is passed on)."""

    def __init__(self, target: str):
        url = urlparse(target)
        self.host, self.port = url.hostname, url.port
        self.drop_answer = self.drop_request = False
        self.dropped = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _pipe(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)

        async def upstream():
            while data := await reader.read(65536):
                if self.drop_request:
                    self.drop_request, self.dropped = False, self.dropped + 1
                    writer.close()
                    return
                up_writer.write(data)
            up_writer.close()

        async def downstream():
            while data := await up_reader.read(65536):
                if self.drop_answer:
                    self.drop_answer, self.dropped = False, self.dropped + 1
                    writer.close()
                    return
                writer.write(data)
            writer.close()
        await asyncio.gather(upstream(), downstream(), return_exceptions=True)


async def test_a_write_whose_answer_or_request_was_lost_lands_once_and_in_order(etcd_factory):
    cluster = etcd_factory()
    proxy = DroppingProxy(cluster.endpoints[0])
    url = await proxy.start()
    a, rec = await _leader([url], b"a")
    try:
        rev_before = (await a.etcd.range(PREFIX, prefix=True))[1]
        proxy.drop_answer = True
        assert (await rec.write({"sup/child/one": b"1"})).error is None   # landed; its answer lost
        proxy.drop_request = True
        assert (await rec.write({"sup/child/two": b"2"})).error is None   # never arrived; sent again
        assert (await rec.write({"sup/child/one": b"1b"})).error is None
        assert proxy.dropped == 2
        assert (await a.etcd.get(PREFIX + "sup/child/one")).value == b"1b"
        assert (await a.etcd.get(PREFIX + "sup/child/two")).value == b"2"
        # each write moved the order key once: nothing landed twice
        seq = await a.etcd.get(PREFIX + "sup/seq")
        assert seq.version == 3 and seq.mod_revision > rev_before
    finally:
        await a.etcd.close()
        proxy.server.close()
