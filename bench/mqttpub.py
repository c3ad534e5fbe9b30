"""A fast MQTT 3.1.1 publisher for the ingest benchmark: pre-encoded packets on a raw socket.

`python -m bench.mqttpub PORT QOS TOPIC=FILE ...` publishes every line of each
file to its topic (the topics interleaved), as fast as the broker takes them,
then disconnects. At QoS 1 it waits for every PUBACK. paho and mosquitto_pub
top out near a bare subscriber's rate (mosquitto_pub -q 1 keeps at most 20
messages in flight), so neither can show whether a subscriber keeps up.
It runs as its own process, so it takes nothing from the measured one.
"""

from __future__ import annotations

import socket
import struct
import sys
from pathlib import Path

CHUNK = 256 * 1024  # bytes per sendall


def length(n: int) -> bytes:
    """MQTT's remaining length: 7 bits a byte, low first."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def connect_packet(client_id: str) -> bytes:
    """CONNECT, clean session, keepalive 60 s."""
    body = _string(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + _string(client_id.encode())
    return b"\x10" + length(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, qos: int, mid: int) -> bytes:
    """PUBLISH of `payload` to `topic` (packet id `mid` at QoS 1)."""
    body = _string(topic) + (struct.pack("!H", mid) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + length(len(body)) + body


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        got = sock.recv(n - len(data))
        if not got:
            raise ConnectionError("the broker closed the connection")
        data += got
    return data


def publish(port: int, qos: int, feeds: list[tuple[str, Path]], client_id: str = "bench-rawpub") -> int:
    """Publish the feeds; the number of messages sent."""
    lines = [(t.encode(), p.read_bytes().splitlines()) for t, p in feeds]
    packets = bytearray()
    mid = 0
    for i in range(max(len(ls) for _t, ls in lines)):
        for topic, ls in lines:
            if i < len(ls):
                mid = mid % 65535 + 1
                packets += publish_packet(topic, ls[i], qos, mid)
    count = sum(len(ls) for _t, ls in lines)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id))
    if _read_exact(sock, 4)[3] != 0:
        raise ConnectionError("the broker refused the connection")
    view = memoryview(packets)
    acked = 0
    if qos:
        import threading

        def acks() -> None:
            nonlocal acked
            buf = b""
            while acked < count:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
                whole = len(buf) // 4 * 4  # PUBACKs are 4 bytes each
                acked += whole // 4
                buf = buf[whole:]

        reader = threading.Thread(target=acks, daemon=True)
        reader.start()
    for start in range(0, len(view), CHUNK):
        sock.sendall(view[start : start + CHUNK])
    if qos:
        reader.join(120)
        if acked < count:
            raise ConnectionError(f"only {acked} of {count} PUBACKs came")
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()
    return count


def main(argv: list[str]) -> int:
    """The command line above."""
    port, qos = int(argv[0]), int(argv[1])
    feeds = [(a.split("=", 1)[0], Path(a.split("=", 1)[1])) for a in argv[2:]]
    publish(port, qos, feeds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
