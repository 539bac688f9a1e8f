"""Property tests of the decoder: whatever arrives, decode returns a valid Msg or raises
ProtocolError; it never raises anything else, and valid messages survive the trip."""

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mesh import wire
from mesh.errors import ProtocolError
from mesh.wire import Kind

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# msgpack-able values, nested a little
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def check(frame: bytes) -> None:
    try:
        msg = wire.decode(frame, max_bytes=64 * 1024)
    except ProtocolError:
        return
    assert isinstance(msg, wire.Msg) and isinstance(msg.kind, Kind)
    if msg.kind == Kind.BATCH:
        assert all(isinstance(m, (wire.Msg, ProtocolError)) for m in msg.body)


@SETTINGS
@given(st.binary(max_size=512))
@example(b"\x98" + b"\xc0" * 8)
@example(b"\xdd\xff\xff\xff\xff")          # a huge array header with nothing behind it
@example(b"\xc6\x7f\xff\xff\xff")          # a huge bin header with nothing behind it
def test_random_bytes(frame):
    check(frame)


@SETTINGS
@given(st.lists(values, min_size=0, max_size=10))
def test_type_confused_envelopes(fields):
    check(msgpack.packb(fields))


@SETTINGS
@given(st.sampled_from(list(Kind)), st.one_of(st.none(), st.text(max_size=140)), values, values,
       st.one_of(st.none(), st.integers(-5, 2**40)))
def test_every_kind_with_arbitrary_fields(kind, rid, target, body, ttl):
    check(msgpack.packb([1, int(kind), rid, target, None, ttl, body, None]))


@SETTINGS
@given(st.integers(0, 80), st.binary(min_size=1, max_size=4))
def test_truncated_and_mutated_valid_messages(cut, noise):
    frame = wire.encode(Kind.CALL, "rid-1", "agent", "client:x", 1000, {"op": "add", "n": [1, 2, {"x": b"y"}]})
    check(frame[:cut])
    for i in range(0, len(frame), 7):
        check(frame[:i] + noise + frame[i + len(noise):])


@SETTINGS
@given(st.integers(1, 200))
def test_deep_nesting(depth):
    body = None
    for _ in range(depth):
        body = [body]
    check(msgpack.packb([1, 1, "r", "a", None, 10, body, None]))
    check(b"\x98\x01\x01\xa1r\xa1a\xc0\x0a" + b"\x91" * depth * 100 + b"\xc0\xc0")


@SETTINGS
@given(st.lists(st.one_of(st.binary(max_size=30), st.just(wire.encode(Kind.CAST, None, "a", None, None, 1))),
                min_size=1, max_size=20))
def test_batches_of_anything(elements):
    check(wire.batch_frame(elements))


@SETTINGS
@given(st.sampled_from([Kind.CALL, Kind.CAST, Kind.INFO]), st.text(min_size=1, max_size=40), values)
def test_valid_messages_roundtrip(kind, target, body):
    rid = "r-1" if kind == Kind.CALL else None
    msg = wire.decode(wire.encode(kind, rid, target, "client:x", 500, body))
    assert (msg.kind, msg.id, msg.target, msg.ttl_ms) == (kind, rid, target, 500)
    assert msg.body == msgpack.unpackb(msgpack.packb(body), strict_map_key=False)


def test_oversized_frames_are_refused_before_decoding():
    big = wire.encode(Kind.CAST, None, "a", None, None, b"x" * 100_000)
    try:
        wire.decode(big, max_bytes=1000)
    except ProtocolError as err:
        assert "exceeds the limit" in str(err)
    else:
        raise AssertionError("accepted")
