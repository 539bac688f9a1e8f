#!/usr/bin/env python3
"""Throw malformed frames at a live node, then check it is none the worse.

    python3 scripts/fuzz_node.py -c configs/local.toml --node n1 --seconds 10
    python3 scripts/fuzz_node.py -c cluster.toml --node n1 --key keys/ops.key_secret --stranger keys/mallory.key_secret

Peers, in turn: one with no CURVE at all, one with a key the cluster does not know
(--stranger), and one the cluster admits (--key, an admin key, or none on an insecure
loopback mesh). Each sends, for its share of --seconds: random bytes, truncated and
bit-flipped valid messages, type-confused envelopes, deep nesting, frames past the size
limit, multi-frame messages and batches of bad elements. Every frame is checked locally
to be invalid before it is sent, so nothing it sends may reach an agent.

Then the attacks of issue 11, each bounded in count and time (--attacks chooses; the
default is every one):

    frames     the malformed frames above
    ids        calls whose request id is 128 emoji (512 bytes of UTF-8: 128 characters)
    maps       calls whose body is a map of 1,000,000 entries (3 MB, within the size limit)
    multipart  a raw ZMTP peer (a plain TCP socket speaking ZMTP 3.0, NULL mechanism)
               sending 1 MiB frames with "more" set and never a last one, up to
               --multipart-mib (128); on a secure mesh the node refuses the handshake
    slow       a reader that asks --slow-reads (300) times for a large ledger (1 MB) and
               never reads the answers back
    keys       many connections with one key, each sending a burst at once, against the
               per-key limits (needs a secure config; skipped with a message otherwise)

Then it checks that the node still answers a call correctly, that a witness agent
received nothing, and that the node's memory stayed bounded; it prints what it sent and
what the node counted, and exits 1 if any check failed. With --hostile it is a peer
in a chaos run: it repeats the attacks until --seconds have passed, tolerates the
node being killed and restarted meanwhile (faults), and checks only that the witness
received nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import struct
import sys
import time

import msgpack
import zmq

import mesh
from mesh import wire
from mesh.config import load
from mesh.errors import AlreadyExists, CallError, ConfigError, ProtocolError
from mesh.security import load_keypair
from mesh.wire import Kind

WITNESS = "fuzz-witness"
BIG = "fuzz-big"        # the ledger a slow reader asks for
ATTACKS = ("frames", "ids", "maps", "multipart", "slow", "keys")
EMOJI_ID = "\U0001F600" * 128   # 128 characters, 512 bytes of UTF-8


INCARNATIONS: dict[str, int] = {}  # the agents' incarnations, learned before the attacks


def call_frame(rid, target: str, ttl, body) -> bytes:
    """A CALL naming the incarnation of `target` (a call that names none is only told
    where the agent runs: see docs/protocol.md)."""
    inc = INCARNATIONS.get(target)
    return wire.encode(Kind.CALL, rid, target, "fuzz", ttl, body, {"inc": inc} if inc is not None else None)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


class Generator:
    """Frames that wire.decode refuses, of many shapes."""

    def __init__(self, rng: random.Random, max_bytes: int):
        self.rng, self.max_bytes = rng, max_bytes
        self.valid = [
            call_frame("r1", WITNESS, 1000, {"op": "add", "n": 1}),
            wire.encode(Kind.CAST, None, WITNESS, "fuzz", None, {"op": "add", "n": 1}),
            wire.encode(Kind.SPAWN, "r2", None, "fuzz", 1000, {"name": "x", "kind": "counter"}),
        ]

    def frame(self) -> list[bytes]:
        rng = self.rng
        for _ in range(100):
            shape = rng.randrange(9)
            if shape == 0:
                parts = [rng.randbytes(rng.randrange(1, 200))]
            elif shape == 1:
                v = rng.choice(self.valid)
                parts = [v[:rng.randrange(len(v))]]
            elif shape == 2:
                v = bytearray(rng.choice(self.valid))
                for _ in range(rng.randrange(1, 4)):
                    v[rng.randrange(len(v))] = rng.randrange(256)
                parts = [bytes(v)]
            elif shape == 3:
                fields = [rng.choice([None, 1, 2, -1, "x", b"y", [1], {"a": 1}, True, 2**70 % 2**63])
                          for _ in range(rng.choice([7, 8, 9]))]
                parts = [msgpack.packb(fields)]
            elif shape == 4:
                depth = rng.randrange(100, 5000)
                parts = [b"\x98\x01\x01\xa1r\xa1a\xc0\x0a" + b"\x91" * depth + b"\xc0\xc0"]
            elif shape == 5:
                parts = [b"\xda\xff\xff" + rng.randbytes(rng.randrange(10))]  # a str that claims 64 KiB
            elif shape == 6:
                parts = [rng.choice(self.valid), rng.randbytes(10)]  # two frames
                return parts
            elif shape == 7:
                size = self.max_bytes + rng.randrange(1, 1000)
                parts = [wire.encode(Kind.CAST, None, WITNESS, None, None, b"x" * size)]
            else:
                bad = [msgpack.packb([1, 1, None, WITNESS, None, 5, 1, None]), msgpack.packb("x"),
                       msgpack.packb([1, 99, "r", WITNESS, None, 5, 1, None])]
                parts = [wire.batch_frame([rng.choice(bad) for _ in range(rng.randrange(1, 20))])]
            if self._invalid(parts[0]):
                return parts
        raise RuntimeError("could not make an invalid frame")

    def _invalid(self, frame: bytes) -> bool:
        try:
            msg = wire.decode(frame, self.max_bytes)
        except ProtocolError:
            return True
        return msg.kind == Kind.BATCH and all(isinstance(m, ProtocolError) for m in msg.body)


def attack_frames(ctx: zmq.Context, endpoint: str, curve, server_key: bytes | None, seconds: float, gen: Generator) -> dict:
    """One peer sending bad frames for `seconds`; returns what it sent and got back."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = 100  # frames up to 16 MiB: a deeper queue only grows this process
    if curve is not None:
        sock.curve_secretkey, sock.curve_publickey = curve.secret, curve.public
        sock.curve_serverkey = server_key
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    sock.connect(endpoint)
    sent = answers = errors = refused = handshakes = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        parts = gen.frame()
        try:
            sock.send_multipart(parts, zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            time.sleep(0.001)
        while sock.poll(0):
            frame = sock.recv()
            answers += 1
            try:
                errors += wire.decode(frame).kind in (Kind.ERROR, Kind.BATCH)
            except ProtocolError:
                pass
        while monitor.poll(0):
            event = zmq.utils.monitor.parse_monitor_message(monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                handshakes += 1
            else:
                refused += 1
    sock.disable_monitor()
    monitor.close(0)
    sock.close(0)
    return {"sent": sent, "answers": answers, "error answers": errors, "handshakes": handshakes,
            "refused handshakes": refused}


def _dealer(ctx: zmq.Context, endpoint: str, curve, server_key: bytes | None, **opts) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    for k, v in opts.items():
        setattr(sock, k, v)
    if curve is not None:
        sock.curve_secretkey, sock.curve_publickey = curve.secret, curve.public
        sock.curve_serverkey = server_key
    sock.connect(endpoint)
    return sock


def _answers(frame: bytes) -> list:
    """The answers in one frame: a node sends several to one peer as a BATCH."""
    try:
        m = wire.decode(frame)
    except ProtocolError:
        return [None]
    if m.kind == Kind.BATCH:
        return [x if isinstance(x, wire.Msg) else None for x in m.body]
    return [m]


def _drain_answers(sock: zmq.Socket, wait_ms: int, until: int) -> dict:
    """Read answers until `until` came back or nothing came for `wait_ms`; count kinds."""
    out = {"answers": 0, "errors": 0}
    while out["answers"] < until and sock.poll(wait_ms):
        for m in _answers(sock.recv()):
            out["answers"] += 1
            if m is None or m.kind != Kind.ERROR:
                continue
            out["errors"] += 1
            name = str(m.body[0]) if isinstance(m.body, list) and m.body else "?"
            out[f"errors {name}"] = out.get(f"errors {name}", 0) + 1
            out.setdefault("first error", str(m.body[1])[:80] if isinstance(m.body, list) and len(m.body) > 1 else "")
    return out


def attack_ids(ctx, endpoint, curve, server_key, seconds: float, count: int = 200) -> dict:
    """Calls whose request id is 128 characters but 512 bytes: each must be refused."""
    sock = _dealer(ctx, endpoint, curve, server_key, sndhwm=count + 10)
    end, sent = time.monotonic() + seconds, 0
    for i in range(count):
        if time.monotonic() > end:
            break
        rid = EMOJI_ID[:-1] + chr(0x1F600 + i % 64)
        sock.send(call_frame(rid, WITNESS, 2000, {"op": "add", "n": 1}))
        sent += 1
    got = _drain_answers(sock, 2000, sent)
    sock.close(0)
    return {"sent": sent, **got}


def huge_map_call(entries: int) -> bytes:
    """A CALL whose body is a map of `entries` entries (all of key "a": 3 bytes each)."""
    sentinel = b"\x00SENTINEL-BODY\x00"
    frame = call_frame(os.urandom(6).hex(), WITNESS, 2000, sentinel)
    raw = b"\xdf" + struct.pack(">I", entries) + b"\xa1a\xc0" * entries
    packed = msgpack.packb(sentinel)
    assert frame.count(packed) == 1
    return frame.replace(packed, raw)


def attack_maps(ctx, endpoint, curve, server_key, seconds: float, max_bytes: int, count: int = 20,
                entries: int = 1_000_000) -> dict:
    frame = huge_map_call(entries)
    if len(frame) > max_bytes:
        return {"skipped": f"a {entries:,}-entry map is {len(frame):,} bytes, over the limit of {max_bytes:,}"}
    sock = _dealer(ctx, endpoint, curve, server_key, sndhwm=count + 10)
    end, sent = time.monotonic() + seconds, 0
    for _ in range(count):
        if time.monotonic() > end:
            break
        sock.send(frame)
        sent += 1
    got = _drain_answers(sock, 3000, sent)
    sock.close(0)
    return {"sent": sent, "bytes each": len(frame), **got}


def _zmtp_greeting() -> bytes:
    return (b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31)


def _zmtp_command(name: bytes, props: dict[bytes, bytes]) -> bytes:
    body = bytes([len(name)]) + name + b"".join(bytes([len(k)]) + k + struct.pack(">I", len(v)) + v
                                                for k, v in props.items())
    return (b"\x04" + bytes([len(body)]) if len(body) < 256 else b"\x06" + struct.pack(">Q", len(body))) + body


def attack_multipart(endpoint: str, secure: bool, seconds: float, mib: int = 64) -> dict:
    """A raw ZMTP 3.0 peer (NULL mechanism) sending 1 MiB frames with "more" set, never a
    last frame, until `mib` MiB or `seconds`. A secure node refuses the NULL handshake."""
    host, port = endpoint.rsplit("//", 1)[1].rsplit(":", 1)
    out = {"sent MiB": 0}
    end = time.monotonic() + seconds
    try:
        conn = socket.create_connection((host, int(port)), timeout=5)
    except OSError as exc:
        return {"error": f"connect: {exc}"}
    try:
        conn.settimeout(max(0.5, min(5.0, end - time.monotonic())))
        conn.sendall(_zmtp_greeting())
        greeting = b""
        while len(greeting) < 64:
            more = conn.recv(64 - len(greeting))
            if not more:
                break
            greeting += more
        mechanism = greeting[12:32].rstrip(b"\x00").decode(errors="replace") if len(greeting) >= 32 else ""
        if mechanism != "NULL":
            out["refused"] = (f"the node's greeting ({len(greeting)} bytes{', ' + mechanism if mechanism else ''}) "
                              "ended the NULL handshake: a peer without a key sends no frame")
            return out
        out["server mechanism"] = mechanism
        conn.sendall(_zmtp_command(b"READY", {b"Socket-Type": b"DEALER"}))
        frame = b"\x03" + struct.pack(">Q", 1 << 20) + os.urandom(1 << 20)  # MORE | LONG
        for _ in range(mib):
            if time.monotonic() > end:
                out["stopped"] = "time"
                break
            conn.sendall(frame)
            out["sent MiB"] += 1
    except (OSError, socket.timeout) as exc:
        out["ended"] = f"{type(exc).__name__}: {exc}"[:100]
    finally:
        conn.close()
    return out


def attack_slow(ctx, endpoint, curve, server_key, seconds: float, reads: int = 300) -> dict:
    """Ask for the big ledger `reads` times and never read the answers (a receive queue
    of one message and a small kernel buffer)."""
    sock = _dealer(ctx, endpoint, curve, server_key, rcvhwm=1, rcvbuf=4096, sndhwm=reads + 10)
    end, sent = time.monotonic() + seconds, 0
    for _ in range(reads):
        if time.monotonic() > end:
            break
        sock.send(call_frame(os.urandom(6).hex(), BIG, 10_000, {"op": "read"}))
        sent += 1
    return {"sent": sent, "_sock": sock}


def attack_keys(ctx, endpoint, keys: list, server_key: bytes, seconds: float, connections: int = 10,
                each: int = 50) -> dict:
    """`connections` connections per key, each sending `each` cheap calls at once: the
    per-key limits (peer_burst, peer_open_requests) hold whatever the connections."""
    out = {"keys": len(keys), "connections": connections * len(keys), "sent": 0, "answered": 0, "busy": 0,
           "other errors": 0}
    socks = [_dealer(ctx, endpoint, k, server_key, sndhwm=each + 10) for k in keys for _ in range(connections)]
    for sock in socks:
        for _ in range(each):
            sock.send(call_frame(os.urandom(8).hex(), WITNESS, 5000, {"op": "get"}))
            out["sent"] += 1
    end, waiting = time.monotonic() + min(seconds, 10), dict.fromkeys(socks, each)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    while waiting and time.monotonic() < end:
        for sock, _ in poller.poll(max(1, int((end - time.monotonic()) * 1000))):
            while sock in waiting and sock.poll(0):
                for m in _answers(sock.recv()):
                    waiting[sock] -= 1
                    if not waiting[sock]:
                        del waiting[sock]
                    if m is None:
                        continue
                    if m.kind == Kind.REPLY:
                        out["answered"] += 1
                    elif m.kind == Kind.ERROR and isinstance(m.body, list) and m.body and m.body[0] == "Busy":
                        out["busy"] += 1
                    else:
                        out["other errors"] += 1
                        name = f"errors {m.body[0]}" if m.kind == Kind.ERROR and isinstance(m.body, list) else "other"
                        out[name] = out.get(name, 0) + 1
    for sock in socks:
        sock.close(0)
    return out


async def main(args) -> int:
    cfg = load(args.config)
    if args.node not in cfg.nodes:
        print(f"fuzz_node: no node {args.node!r} in {cfg.path}", file=sys.stderr)
        return 2
    spec = cfg.nodes[args.node]
    rng = random.Random(args.seed)
    admin = load_keypair(args.key) if cfg.secure else None
    async with mesh.connect(cfg, key=args.key) as m:
        try:
            await m.spawn(WITNESS, "counter")
        except CallError:
            pass  # exists from an earlier run
        before_value = await _retry(lambda: m.call(WITNESS, {"op": "get"}), args.hostile)
        INCARNATIONS[WITNESS] = (await _retry(lambda: m.whereis(WITNESS), args.hostile)).get("incarnation", -1)
        gen = Generator(rng, cfg.limits.max_message_bytes)
        st = await _retry(m.status, args.hostile)
        node_info = next(n for n in st["nodes"] if n["name"] == args.node)
        pid, stats_before = node_info["pid"], node_info["stats"]
        pids = {n["name"]: n["pid"] for n in st["nodes"]}
        rss_before = rss_kb(pid) if pid and os.path.exists(f"/proc/{pid}") else None

        ctx = zmq.Context()
        server_key = spec.public_key.encode() if cfg.secure else None
        attacks = [a for a in args.attacks.split(",") if a]
        reports: dict[str, dict] = {}
        slow_socks = []
        grew: dict[str, int] = {}  # attack -> MiB the node grew while it ran (the most of any round)
        no_big = await _fill_big(m, args.big_kib) if "slow" in attacks else None
        args.big_node = args.node
        if "slow" in attacks and not no_big:  # a slow reader asks the node that holds the ledger
            big = await _retry(lambda: m.whereis(BIG), args.hostile)
            args.big_node, INCARNATIONS[BIG] = big.get("node") or args.node, big.get("incarnation", -1)
        rounds = 0
        started = time.monotonic()
        while True:
            rounds += 1
            share = args.seconds / max(1, len(attacks)) if not args.hostile else min(5.0, args.seconds / len(attacks))
            for attack in attacks:
                if args.hostile and time.monotonic() - started > args.seconds:
                    break
                apid = pids.get(args.big_node, pid) if attack == "slow" else pid  # the node the attack reaches
                rss_at = rss_kb(apid) if apid and os.path.exists(f"/proc/{apid}") else None
                try:
                    report = await _one(attack, args, cfg, ctx, spec, admin, server_key, share, gen, no_big, m)
                except (zmq.ZMQError, OSError, CallError) as exc:  # a node killed under us (a chaos fault)
                    report = {"error": f"{type(exc).__name__}: {exc}"[:120]}
                sock = report.pop("_sock", None)
                if sock is not None:
                    slow_socks.append(sock)
                for label, peer_report in report.pop("_peers", {}).items():  # frames: one line per peer
                    _merge(reports, label, peer_report)
                if rss_at is not None and os.path.exists(f"/proc/{apid}"):
                    now_kb = rss_kb(apid)
                    report["node MiB after"] = now_kb // 1024
                    grew[attack] = max(grew.get(attack, 0), (now_kb - rss_at) // 1024)
                _merge(reports, attack, report)
            if args.hostile:  # what it did so far, should it be killed before the end
                print(f"round {rounds} done at {time.monotonic() - started:.0f} s: "
                      + "; ".join(f"{k} {v.get('sent', v.get('sent MiB', ''))}" for k, v in reports.items()),
                      flush=True)
            if not args.hostile or time.monotonic() - started > args.seconds:
                break
            for sock in slow_socks:  # a slow reader goes away at last (else each round adds one)
                sock.close(0)
            slow_socks.clear()

        after_value = await _retry(lambda: m.call(WITNESS, {"op": "get"}), args.hostile)
        answered = True
        if not args.hostile:
            answered = await m.call(WITNESS, {"op": "add", "n": 1}) == after_value + 1
            await m.call(WITNESS, {"op": "add", "n": -1})
        st = await _retry(m.status, args.hostile)
        node_info = next(n for n in st["nodes"] if n["name"] == args.node)
        rss_after = rss_kb(pid) if rss_before is not None and os.path.exists(f"/proc/{pid}") else None
        for sock in slow_socks:
            sock.close(0)
        ctx.destroy(0)

    if args.hostile:
        print(f"rounds {rounds} in {time.monotonic() - started:.0f} s")
    for label, report in reports.items():
        print(f"{label:>13}: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    counted = {k: node_info["stats"].get(k, 0) - stats_before.get(k, 0) for k in ("bad_messages", "over_limit", "not_allowed")}
    print(f"node {args.node} counted: " + ", ".join(f"{k} {v}" for k, v in counted.items()))
    checks = {"witness agent received nothing": after_value == before_value}
    if not args.hostile:
        checks["node still answers correctly"] = answered and node_info["alive"]
    if rss_after is not None and not args.hostile:
        grown = rss_after - rss_before
        print(f"node memory: {rss_before // 1024} MiB before, {rss_after // 1024} MiB after; grew while attacked: "
              + ", ".join(f"{k} {v} MiB" for k, v in grew.items()))
        checks["memory stayed bounded"] = grown < max(64 * 1024, rss_before // 2)
        sent_mib = reports.get("multipart", {}).get("sent MiB", 0)
        if sent_mib >= 16:  # a message that never ends must not grow the node by what it sends
            dropped = "ended" in reports.get("multipart", {})  # the node shut the connection
            checks[f"a message that never ends stayed bounded ({grew.get('multipart', 0)} MiB for "
                   f"{sent_mib} MiB sent{', connection shut by the node' if dropped else ''})"] = (
                dropped or grew.get("multipart", 0) < sent_mib // 2)
        if reports.get("slow", {}).get("sent", 0):
            checks[f"a slow reader stayed bounded ({grew.get('slow', 0)} MiB)"] = grew.get("slow", 0) < 128
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


async def _retry(what, patient: bool):
    """what(), retried for up to a minute when a chaos run may have a fault in force."""
    for attempt in range(60 if patient else 1):
        try:
            return await what()
        except CallError:
            if not patient or attempt == 59:
                raise
            await asyncio.sleep(1)


_NOT_SUMMED = {"node MiB after", "bytes each", "ledger KiB", "keys", "connections"}


def _merge(reports: dict, attack: str, report: dict) -> None:
    """Sum a round's counts into the attack's report (text fields: the latest)."""
    for key, value in report.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _NOT_SUMMED:
            reports.setdefault(attack, {})[key] = reports.get(attack, {}).get(key, 0) + value
        else:
            reports.setdefault(attack, {})[key] = value


async def _fill_big(m, kib: int) -> str | None:
    """The ledger a slow reader asks for, about `kib` KiB; or why there is none."""
    try:
        await m.spawn(BIG, "ledger")
    except AlreadyExists:
        pass  # from an earlier run
    except CallError as exc:
        return f"no ledger to read: {type(exc).__name__}: {exc}"[:160]
    have = await _retry(lambda: m.call(BIG, {"op": "len"}), True)
    for i in range(have, max(1, kib // 64)):
        await _retry(lambda: m.call(BIG, {"op": "append", "value": "x" * 65536}, request_id=f"fuzz-big-{i}"), True)
    return None


async def _one(attack: str, args, cfg, ctx, spec, admin, server_key, share: float, gen, no_big=None, m=None) -> dict:
    if attack == "frames":
        out = {}
        peers = [("no CURVE", None)]
        if cfg.secure:
            if args.stranger:
                peers.append(("unknown key", load_keypair(args.stranger)))
            peers.append(("admitted key", admin))
        for label, keys in peers:
            out[label] = await asyncio.to_thread(attack_frames, ctx, spec.endpoint, keys, server_key,
                                                 share / len(peers), gen)
        return {"_peers": out}
    if attack == "ids":
        return await asyncio.to_thread(attack_ids, ctx, spec.endpoint, admin, server_key, share)
    if attack == "maps":
        return await asyncio.to_thread(attack_maps, ctx, spec.endpoint, admin, server_key, share,
                                       cfg.limits.max_message_bytes, args.maps)
    if attack == "multipart":
        return await asyncio.to_thread(attack_multipart, spec.endpoint, cfg.secure, share, args.multipart_mib)
    if attack == "slow":
        if no_big:
            return {"skipped": no_big}
        big = cfg.nodes[args.big_node]
        st = await _retry(m.status, args.hostile)
        in_before = next((n["stats"].get("in", 0) for n in st["nodes"] if n["name"] == args.big_node), None)
        report = await asyncio.to_thread(attack_slow, ctx, big.endpoint, admin,
                                         big.public_key.encode() if cfg.secure else None, share, args.slow_reads)
        report["_in_before"] = in_before
        # honest calls to the ledger, one after another, until the node's count of requests
        # taken in (its status) says it has read the slow reader's too (at most 10 s)
        before = report.pop("_in_before", None)
        entries, end = 0, time.monotonic() + 10
        while True:
            entries = await _retry(lambda: m.call(BIG, {"op": "len"}, timeout=30), args.hostile)
            if before is None or time.monotonic() > end:
                break
            st = await _retry(m.status, args.hostile)
            taken = next((n["stats"].get("in", 0) for n in st["nodes"] if n["name"] == args.big_node), None)
            if taken is None or taken - before >= report["sent"]:
                break
        return {"node": args.big_node, "ledger KiB": entries * 64, **report}
    if attack == "keys":
        if not cfg.secure:
            return {"skipped": "the config is not secure: peers are anonymous, so limits cannot be per key "
                               "(run against a secure config, with --key)"}
        keys = [admin] + [load_keypair(k) for k in args.keys.split(",") if k]
        report = await asyncio.to_thread(attack_keys, ctx, spec.endpoint, keys, server_key, share)
        return {**report, "limits per key": f"burst {cfg.limits.peer_burst:g}, rate {cfg.limits.peer_rate:g}/s, "
                                            f"open {cfg.limits.peer_open_requests}"}
    raise ValueError(f"unknown attack {attack!r} (one of {', '.join(ATTACKS)})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", default=None)
    p.add_argument("--node", default="n1")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--key", default=None, help="an admin key (secure clusters)")
    p.add_argument("--stranger", default=None, help="a key the cluster does not know")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of: {', '.join(ATTACKS)}")
    p.add_argument("--maps", type=int, default=20, help="huge-map calls per round")
    p.add_argument("--multipart-mib", type=int, default=128,
                   help="MiB a raw peer sends without ending its message (more than a node should hold: 64)")
    p.add_argument("--slow-reads", type=int, default=300, help="reads of the big ledger a slow reader never reads back")
    p.add_argument("--big-kib", type=int, default=1024, help="size of the ledger the slow reader asks for")
    p.add_argument("--keys", default="", help="more admitted client keys (secret key files, comma-separated)")
    p.add_argument("--hostile", action="store_true",
                   help="a hostile peer in a chaos run: repeat the attacks for --seconds, ride out faults")
    a = p.parse_args()
    try:
        sys.exit(asyncio.run(main(a)))
    except (ConfigError, CallError) as exc:
        print(f"fuzz_node: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
