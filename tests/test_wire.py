import msgpack
import pytest

from mesh import wire
from mesh.errors import ProtocolError
from mesh.wire import Kind


def roundtrip(**kw):
    return wire.decode(wire.encode(**kw))


def test_call_roundtrip():
    msg = roundtrip(kind=Kind.CALL, id="r1", target="a1", sender="client:x", ttl_ms=500, body={"op": "get"})
    assert (msg.kind, msg.id, msg.target, msg.sender, msg.ttl_ms, msg.body) == (Kind.CALL, "r1", "a1", "client:x", 500, {"op": "get"})


def test_response_frame_matches_encode():
    packed = msgpack.packb({"x": [1, 2]})
    assert wire.response_frame("id1", wire.REPLY_TAG + packed) == wire.reply("id1", {"x": [1, 2]})
    err = ["NoSuchAgent", "no agent", None]
    assert wire.response_frame("id1", wire.ERROR_TAG + msgpack.packb(err)) == wire.error("id1", err)


def test_batch_carries_envelopes_and_isolates_bad_ones():
    good = [wire.encode(Kind.CAST, None, f"a{i}", None, None, i) for i in range(20)]
    bad = msgpack.packb([1, 2, 3])  # an array, but not an envelope
    msg = wire.decode(wire.batch_frame(good[:10] + [bad] + good[10:]))
    assert msg.kind == Kind.BATCH and len(msg.body) == 21
    assert isinstance(msg.body[10], ProtocolError)
    assert [m.body for m in msg.body if not isinstance(m, ProtocolError)] == list(range(20))


def test_batch_within_batch_is_refused_per_element():
    inner = wire.batch_frame([wire.encode(Kind.CAST, None, "a", None, None, 1)] * 2)
    msg = wire.decode(wire.batch_frame([wire.encode(Kind.CAST, None, "a", None, None, 1), inner]))
    assert isinstance(msg.body[1], ProtocolError)


@pytest.mark.parametrize("frame, fragment", [
    (b"", "not a msgpack message"),
    (b"\xc1", "not a msgpack message"),
    (msgpack.packb({"a": 1}), "not a mesh envelope"),
    (msgpack.packb([1, 1, "r", "a", None, None, None]), "not a mesh envelope"),
    (msgpack.packb([2, 1, "r", "a", None, 10, None, None]), "unsupported protocol version"),
    (msgpack.packb([1, 99, "r", "a", None, 10, None, None]), "unknown message kind"),
    (msgpack.packb([1, True, "r", "a", None, 10, None, None]), "unknown message kind"),
    (msgpack.packb([1, 1, None, "a", None, 10, None, None]), "CALL needs a request id"),
    (msgpack.packb([1, 1, "", "a", None, 10, None, None]), "request id"),
    (msgpack.packb([1, 1, "r" * 129, "a", None, 10, None, None]), "request id"),
    (msgpack.packb([1, 1, "r", None, None, 10, None, None]), "target name"),
    (msgpack.packb([1, 1, "r", "x" * 201, None, 10, None, None]), "target name"),
    (msgpack.packb([1, 1, "r", "a", 5, 10, None, None]), "sender"),
    (msgpack.packb([1, 1, "r", "a", None, -1, None, None]), "ttl_ms"),
    (msgpack.packb([1, 1, "r", "a", None, 1.5, None, None]), "ttl_ms"),
    (msgpack.packb([1, 1, "r", "a", None, 10, None, [1]]), "meta"),
    (msgpack.packb([1, 4, "r", None, None, None, "oops", None]), "ERROR: body must be"),
    (msgpack.packb([1, 10, "r", None, None, None, {"name": "x"}, None]), "lacks 'kind'"),
    (msgpack.packb([1, 10, "r", None, None, None, {"name": "bad name", "kind": "k"}, None]), "invalid agent name"),
    (msgpack.packb([1, 10, "r", None, None, None, {"name": "x", "kind": "k", "evil": 1}, None]), "unknown field"),
    (msgpack.packb([1, 10, "r", None, None, None, {"name": "x", "kind": "k", "restart": "sometimes"}, None]), "restart must be"),
    (msgpack.packb([1, 21, "r", None, None, None, {"node": "n", "boot": "b", "seq": True}, None]), "wrong type"),
    (msgpack.packb([1, 21, "r", None, None, None, {"seq": 1}, None]), "lacks 'node'"),
    (msgpack.packb([1, 7, None, None, None, None, [], None]), "envelopes"),
    (msgpack.packb([1, 1, "r", "a", None, 10, msgpack.ExtType(5, b"x"), None]), "extension type"),
])
def test_decode_names_what_is_wrong(frame, fragment):
    with pytest.raises(ProtocolError) as err:
        wire.decode(frame)
    assert fragment in str(err.value)


def test_decode_keeps_request_id_when_readable():
    frame = msgpack.packb([1, 99, "req-7", "a", None, 10, None, None])
    with pytest.raises(ProtocolError) as err:
        wire.decode(frame)
    assert err.value.request_id == "req-7"


def test_decode_refuses_oversized_frames():
    frame = wire.encode(Kind.CAST, None, "a", None, None, "x" * 2000)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        wire.decode(frame, max_bytes=1000)


def test_deep_nesting_is_a_protocol_error():
    deep = b"\x91" * 100_000 + b"\xc0"
    frame = b"\x98\x01\x02\xc0\xa1a\xc0\xc0" + deep + b"\xc0"
    with pytest.raises(ProtocolError):
        wire.decode(frame)


@pytest.mark.parametrize("name, ok", [
    ("a", True), ("user-42", True), ("doc/17:v2", True), ("x" * 200, True),
    ("", False), ("-lead", False), ("has space", False), ("x" * 201, False), (5, False), ("é", False),
])
def test_valid_name(name, ok):
    assert wire.valid_name(name) is ok


def test_retry_decisions_ask_one_question():
    from mesh.errors import (AgentDown, BadRequest, CallTimeout, LinkDown, Moved, Retryable, Unavailable,
                             error_from_wire, error_to_wire)
    for err in (AgentDown("x"), LinkDown("x"), Moved("x"), Unavailable("x")):
        assert isinstance(err, Retryable) and err.retryable
    full = error_from_wire(error_to_wire(Unavailable("disk full", {"retry": False})))
    assert isinstance(full, Retryable) and not full.retryable   # trying again would fail the same way
    assert not BadRequest("x").retryable and not CallTimeout("x").retryable


def test_an_error_only_a_caller_raises_crosses_the_wire_as_what_it_is_a_kind_of():
    """A node that passes a client's request on (a spawn to the supervisor's node) and
    loses that link answers with the LinkDown its own caller raised: the client must see
    a retryable AgentDown, not a plain CallError that ends its retries."""
    from mesh.errors import AgentDown, LinkDown, error_from_wire, error_to_wire
    err = error_from_wire(error_to_wire(LinkDown("no connection to node n1")))
    assert type(err) is AgentDown and err.retryable
    assert "no connection to node n1" in str(err)
