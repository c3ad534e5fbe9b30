"""The gateway's read of MQTT packets (gateway/mqtt/client.py `LoopClient.read`): PUBLISH
packets whole in the buffer are taken apart without paho's per-packet code, everything else
goes through paho. Whatever the broker sends (a hostile or broken one included), in whatever
pieces the socket hands it over, the messages delivered, the PUBACKs sent and whether the
connection is closed are those of paho's own read. And the mqtt driver's quick ways through
a payload (devices/mqtt.py: `parse_json`, `lookup`, `to_value`) answer, and fail, as the
plain ones.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import paho.mqtt.client as paho
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from bench.mqttpub import length
from devices.mqtt import BadPayload, lookup, parse_json, to_value
from devices.mqtt_config import MqttField
from gateway.mqtt.client import LoopClient
from gateway.values import BadValue, coerce

Message = tuple[str | None, bytes, bool]  # topic (None: not UTF-8), payload, retain


class Wire:
    """A non-blocking socket handing out `pieces` one by one (a read never spans two), then
    `ending`: it would block, the broker closed it (EOF), or the connection was reset;
    what is sent is kept."""

    def __init__(self, pieces: list[bytes], ending: str = "block"):
        self.pieces = [p for p in pieces if p]
        self.ending = ending
        self.sent = bytearray()

    @property
    def waiting(self) -> bool:
        """Whether a read could still return something other than 'would block'."""
        return bool(self.pieces) or self.ending != "block"

    def recv(self, n: int) -> bytes:
        """At most `n` bytes of the current piece, then the ending."""
        if not self.pieces:
            if self.ending == "eof":
                return b""
            if self.ending == "reset":
                raise ConnectionResetError(104, "Connection reset by peer")
            raise BlockingIOError
        head = self.pieces[0]
        out, rest = head[:n], head[n:]
        if rest:
            self.pieces[0] = rest
        else:
            self.pieces.pop(0)
        return out

    def send(self, data: bytes) -> int:
        """Take everything."""
        self.sent += data
        return len(data)

    def close(self) -> None:
        """Nothing to close."""

    def fileno(self) -> int:
        """No descriptor."""
        return -1


def publish(topic: bytes, payload: bytes, qos: int, retain: bool, mid: int) -> bytes:
    """A PUBLISH packet (MQTT 3.1.1)."""
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + payload
    return bytes([0x30 | qos << 1 | retain]) + length(len(body)) + body


def message(topic: Any) -> str | None:
    try:
        return str(topic.decode())
    except UnicodeDecodeError:
        return None


Outcome = tuple[list[Message], bytes, list[str]]  # messages, bytes sent, disconnects


def paho_reads(pieces: list[bytes], ending: str) -> Outcome:
    """What plain paho makes of the bytes: the messages, what it sent, its disconnects."""
    got: list[Message] = []
    gone: list[str] = []
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="plain", protocol=paho.MQTTv311)
    c.on_message = lambda _c, _u, m: got.append((message(m._topic), bytes(m.payload), m.retain))
    c.on_disconnect = lambda _c, _u, _f, reason, _p: gone.append(str(reason))
    wire = Wire(pieces, ending)
    c._sock = wire  # type: ignore[assignment]
    while wire.waiting and c.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS:
        pass
    return got, bytes(wire.sent), gone


def gateway_reads(pieces: list[bytes], ending: str, limit: int) -> Outcome:
    """The same through LoopClient.read, `limit` packets a turn, as the broker calls it."""
    got: list[Message] = []
    gone: list[str] = []
    c = LoopClient(CallbackAPIVersion.VERSION2, client_id="gateway", protocol=paho.MQTTv311)
    c.on_message = lambda _c, _u, m: got.append((message(m._topic), bytes(m.payload), m.retain))
    c.on_publish_fast = lambda topic, payload, retain: got.append((topic, payload, retain))
    c.on_disconnect = lambda _c, _u, _f, reason, _p: gone.append(str(reason))
    wire = Wire(pieces, ending)
    c._sock = wire  # type: ignore[assignment]
    for _ in range(100_000):
        if not c.read(limit):
            break
    return got, bytes(wire.sent), gone


topics = st.one_of(
    st.text(min_size=1, max_size=40).map(lambda t: t.encode()),
    st.binary(max_size=8),  # empty, or not UTF-8: malformed, for paho to refuse
)
publishes = st.builds(
    publish,
    topics,
    st.one_of(st.binary(max_size=40), st.binary(min_size=120, max_size=20_000)),  # 1- to 3-byte lengths
    st.sampled_from([0, 1, 1, 2]),  # QoS 2 (never subscribed to) goes the paho way
    st.booleans(),
    st.integers(1, 65535),
)
others = st.sampled_from([
    b"\xd0\x00",  # PINGRESP
    b"\x90\x03\x00\x07\x01",  # SUBACK
    b"\x40\x02\x00\x09",  # PUBACK of a message we never sent
    b"\x30\x01\x00",  # a PUBLISH too short for its topic length
    b"\x32\x04\x00\x02ab",  # QoS 1 without its packet id
    b"\x30\xff\xff\xff\xff\x7f",  # a remaining length of five bytes
    b"\xf0\x00",  # no such packet type
])
streams = st.lists(st.one_of(publishes, publishes, publishes, others), max_size=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams, st.data(), st.sampled_from(["block", "eof", "reset"]), st.sampled_from([1, 3, 500]))
def test_the_gateways_read_is_paho_s_whatever_the_bytes_and_their_pieces(
    packets: list[bytes], data: st.DataObject, ending: str, limit: int
) -> None:
    stream = b"".join(packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts"))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert gateway_reads(pieces, ending, limit) == paho_reads(pieces, ending)


def test_a_handler_that_fails_neither_stops_the_read_nor_the_puback() -> None:
    calls: list[str] = []

    def handler(topic: str, payload: bytes, retain: bool) -> None:
        calls.append(topic)
        if topic == "a":
            raise RuntimeError("a broken driver")

    c = LoopClient(CallbackAPIVersion.VERSION2, client_id="gateway", protocol=paho.MQTTv311)
    c.on_publish_fast = handler
    wire = Wire([publish(b"a", b"1", 1, False, 7) + publish(b"b", b"2", 1, False, 8)])
    c._sock = wire  # type: ignore[assignment]
    assert c.read(500) is False  # all read, nothing more waiting
    assert calls == ["a", "b"]
    assert bytes(wire.sent) == b"\x40\x02\x00\x07\x40\x02\x00\x08"  # both acknowledged, in order


def test_a_turn_stops_at_its_limit_and_says_more_may_be_waiting() -> None:
    got: list[str] = []
    c = LoopClient(CallbackAPIVersion.VERSION2, client_id="gateway", protocol=paho.MQTTv311)
    c.on_publish_fast = lambda topic, payload, retain: got.append(payload.decode())
    c._sock = Wire([b"".join(publish(b"t", str(i).encode(), 0, False, 0) for i in range(10))])  # type: ignore[assignment]
    assert c.read(4) is True
    assert got == ["0", "1", "2", "3"]
    assert c.read(500) is False
    assert got == [str(i) for i in range(10)]


# ---------------------------------------------------------------- the driver's quick ways


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    """("ok", what `fn` returned) or ("error", its message)."""
    try:
        return "ok", fn(*args)
    except (BadPayload, BadValue) as e:
        return "error", str(e)


def plain_parse(text: str) -> Any:
    """parse_json as it was: json.loads, its errors as BadPayload."""
    try:
        return json.loads(text)
    except ValueError as e:
        raise BadPayload(f"not valid JSON ({e.msg} at character {e.pos})") from None  # type: ignore[attr-defined]
    except RecursionError:
        raise BadPayload("JSON nested too deeply") from None


documents = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "0", "x"]), inner, max_size=3),
    max_leaves=8,
)
json_texts = st.one_of(st.text(max_size=30), documents.map(json.dumps))
blanks = st.sampled_from(["", " ", "\n", "\t ", "\ufeff", "x", "}"])


@settings(max_examples=400, deadline=None)
@given(blanks, json_texts, blanks)
def test_parse_json_answers_and_fails_as_json_loads(before: str, text: str, after: str) -> None:
    text = before + text + after
    assert repr(outcome(parse_json, text)) == repr(outcome(plain_parse, text))  # repr: nan == nan
    deep = "[" * 100_000
    assert outcome(parse_json, deep) == ("error", "JSON nested too deeply")


@settings(max_examples=300, deadline=None)
@given(documents, st.lists(st.sampled_from(["a", "b", "0", "1", "-1", "x"]), min_size=1, max_size=3))
def test_lookup_and_to_value_answer_as_a_plain_walk_and_coerce(doc: Any, parts: list[str]) -> None:
    path = ".".join(parts)
    cur: Any = doc
    expected: tuple[str, Any] | None = None
    for part in parts:  # the walk as lookup did it, the dict case no longer first
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            expected = ("error", None)
            break
    got = outcome(lookup, doc, path)
    if expected is None:
        assert repr(got) == repr(("ok", cur))
    else:
        assert got[0] == "error"
        return
    for ftype in ("numeric", "integer", "boolean", "string"):
        f = MqttField(name="f", topic="t", type=ftype)
        plain = ("error", None) if cur is None or isinstance(cur, (dict, list)) else outcome(
            coerce, ftype, cur if ftype != "string" or isinstance(cur, str) else json.dumps(cur))
        quick = outcome(to_value, f, cur)
        assert quick[0] == plain[0] and (quick[0] == "error" or repr(quick) == repr(plain))


@given(st.one_of(st.floats(), st.integers(), st.booleans(), st.text(max_size=6), st.none()))
def test_to_value_of_a_single_value_is_coerce(raw: Any) -> None:
    for ftype in ("numeric", "integer", "boolean", "string"):
        f = MqttField(name="f", topic="t", type=ftype)
        plain = ("error", None) if raw is None else outcome(
            coerce, ftype, raw if ftype != "string" or isinstance(raw, str) else json.dumps(raw))
        quick = outcome(to_value, f, raw)
        assert quick[0] == plain[0] and (quick[0] == "error" or repr(quick) == repr(plain)), (ftype, raw)
