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

Then it checks that the node still answers a call correctly, that a witness agent
received nothing, and that the node's memory stayed bounded; it prints what it sent and
what the node counted, and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time

import msgpack
import zmq

import mesh
from mesh import wire
from mesh.config import load
from mesh.errors import CallError, ConfigError, ProtocolError
from mesh.security import load_keypair
from mesh.wire import Kind

WITNESS = "fuzz-witness"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


class Generator:
    """Frames that wire.decode refuses, of many shapes."""

    def __init__(self, rng: random.Random, max_bytes: int):
        self.rng, self.max_bytes = rng, max_bytes
        self.valid = [
            wire.encode(Kind.CALL, "r1", WITNESS, "fuzz", 1000, {"op": "add", "n": 1}),
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


def attack(ctx: zmq.Context, endpoint: str, curve, server_key: bytes | None, seconds: float, gen: Generator) -> dict:
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


async def main(args) -> int:
    cfg = load(args.config)
    if args.node not in cfg.nodes:
        print(f"fuzz_node: no node {args.node!r} in {cfg.path}", file=sys.stderr)
        return 2
    spec = cfg.nodes[args.node]
    rng = random.Random(args.seed)
    gen = Generator(rng, cfg.limits.max_message_bytes)
    admin = load_keypair(args.key) if cfg.secure else None
    async with mesh.connect(cfg, key=args.key) as m:
        try:
            await m.spawn(WITNESS, "counter")
        except CallError:
            pass  # exists from an earlier run
        before_value = await m.call(WITNESS, {"op": "get"})
        st = await m.status()
        node_info = next(n for n in st["nodes"] if n["name"] == args.node)
        pid, stats_before = node_info["pid"], node_info["stats"]
        rss_before = rss_kb(pid) if pid and os.path.exists(f"/proc/{pid}") else None

        ctx = zmq.Context()
        peers = [("no CURVE", None)]
        if cfg.secure:
            if args.stranger:
                peers.append(("unknown key", load_keypair(args.stranger)))
            peers.append(("admitted key", admin))
        share = args.seconds / len(peers)
        reports = {}
        for label, keys in peers:
            server_key = spec.public_key.encode() if cfg.secure else None
            reports[label] = await asyncio.to_thread(attack, ctx, spec.endpoint, keys, server_key, share, gen)
        ctx.destroy(0)

        after_value = await m.call(WITNESS, {"op": "get"})
        answered = await m.call(WITNESS, {"op": "add", "n": 1}) == after_value + 1
        await m.call(WITNESS, {"op": "add", "n": -1})
        st = await m.status()
        node_info = next(n for n in st["nodes"] if n["name"] == args.node)
        rss_after = rss_kb(pid) if rss_before is not None else None

    for label, report in reports.items():
        print(f"{label:>13}: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    counted = {k: node_info["stats"].get(k, 0) - stats_before.get(k, 0) for k in ("bad_messages", "over_limit", "not_allowed")}
    print(f"node {args.node} counted: " + ", ".join(f"{k} {v}" for k, v in counted.items()))
    checks = {
        "node still answers correctly": answered and node_info["alive"],
        "witness agent received nothing": after_value == before_value,
    }
    if rss_before is not None:
        grown = rss_after - rss_before
        print(f"node memory: {rss_before // 1024} MiB before, {rss_after // 1024} MiB after")
        checks["memory stayed bounded"] = grown < max(64 * 1024, rss_before // 2)
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", default=None)
    p.add_argument("--node", default="n1")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--key", default=None, help="an admin key (secure clusters)")
    p.add_argument("--stranger", default=None, help="a key the cluster does not know")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    try:
        sys.exit(asyncio.run(main(a)))
    except (ConfigError, CallError) as exc:
        print(f"fuzz_node: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
