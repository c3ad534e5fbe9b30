"""The gateway's read of MQTT packets (gateway/mqtt/client.py `LoopClient.read`): PUBLISH
packets whole in the buffer are taken apart without paho's per-packet code, everything else
goes through paho. Whatever the broker sends (a hostile or broken one included), in whatever
pieces the socket hands it over, the messages delivered, the PUBACKs sent and whether the
connection is closed are those of paho's own read.
"""

from __future__ import annotations

import struct
from typing import Any

import paho.mqtt.client as paho
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from gateway.mqtt.client import LoopClient

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


def length(n: int) -> bytes:
    """MQTT's remaining length: 7 bits a byte, low first."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


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
