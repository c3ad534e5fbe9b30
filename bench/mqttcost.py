"""Instructions per MQTT message on the gateway's ingest path, against bare paho: a figure that
depends neither on the CPU model nor on what else the machine is doing.

`python -m bench.mqttcost [QOS]` runs each side under `valgrind --tool=callgrind` with
SMALL and LARGE messages and prints (Ir(LARGE) - Ir(SMALL)) / (LARGE - SMALL): the
instructions (user space) one more message costs. Start-up, warm-up and shutdown are the
same in both runs and cancel out.

- gateway: the Gateway of `bench mqtt_ingest` (10 mqtt devices reading `sensor.temperature`
  out of Zigbee2MQTT-like JSON, history.db, two watches, the bench's counting listener) in
  this process, without a broker: its paho client's socket is one that hands out the
  pre-encoded PUBLISH packets `bench.mqttpub` sends, and the broker's `_readable` runs as the
  event loop would call it. From the bytes to every hub listener: paho's packet read, the
  route, the driver's JSON, `hub.push`, memory's history, the rollups, the disk's thinning,
  the watches.
- paho: a bare paho client whose `on_message` only counts (the bench's baseline), reading
  the same bytes with `loop_read()` as its own network loop does.

The socket is not a real one, so system calls are not in the figures (paho's reads three
times per packet, the gateway's once per 64 KiB): the bench's wall-clock ratio is lower
than the ratio of these counts. `python -m bench.mqttcost child SIDE N FILE` is one run,
without valgrind (FILE: N packets as `packets` makes them).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SMALL = 2_000
LARGE = 12_000
DEVICES = 10


class Wire:
    """A non-blocking socket that hands out `data`, then would block."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def recv(self, n: int) -> bytes:
        """The next `n` bytes at most; BlockingIOError when all were read."""
        if self.pos >= len(self.data):
            raise BlockingIOError
        piece = self.data[self.pos:self.pos + n]
        self.pos += len(piece)
        return piece

    def send(self, data: bytes) -> int:
        """Everything is taken (PUBACKs at QoS 1)."""
        return len(data)

    def fileno(self) -> int:
        """No descriptor: nothing may wait on this socket."""
        return -1

    def close(self) -> None:
        """Nothing to close."""


def packets(n: int, qos: int) -> bytes:
    """`n` PUBLISH packets, round robin over the bench's topics, as bench.mqttpub sends them."""
    from .ingest import mqtt_payload
    from .mqttpub import publish_packet

    out = bytearray()
    for i in range(n):
        topic = f"bench/ingest/{i % DEVICES:02d}".encode()
        out += publish_packet(topic, mqtt_payload(i).encode(), qos, i % 65535 + 1)
    return bytes(out)


async def _gateway(feed: bytes, n: int, folder: Path) -> int:
    from gateway.app import Gateway
    from gateway.config import parse
    from gateway.mqtt.broker import Broker

    from .ingest import Counter, mqtt_devices

    Broker._begin = lambda self: None  # type: ignore[method-assign]  # no connection: the wire below
    topics = [f"bench/ingest/{i:02d}" for i in range(DEVICES)]
    data: dict[str, Any] = {
        "gateway": {"name": "bench mqttcost", "state_dir": str(folder / "state")},
        "mqtt": {"url": "mqtt://127.0.0.1:9", "client_id": "bench-mqttcost"},
        "devices": mqtt_devices(topics),
    }
    gw = Gateway(parse(data))
    await gw.start()
    try:
        for words in ("ing00.temp > 1000", "ing01.temp < -1000"):
            gw.watches.add(gw.watches.parse("alice@localhost", words.split()))
        counter = Counter(n)
        gw.hub.subscribe(reading=counter)
        broker: Broker = gw.ctx.shared["mqtt"]
        wire = Wire(feed)
        broker.client._sock = wire
        broker._sock = wire
        broker.connected = True
        while counter.count < n and (wire.pos < len(wire.data) or broker.client.rpos < len(broker.client.rbuf)):
            broker._readable()
            await asyncio.sleep(0)  # what the loop runs between reads: PUBACKs, a history batch
        broker._sock = broker.client._sock = None
        broker.connected = False
        return counter.count
    finally:
        await gw.stop()


def _paho(data: bytes) -> int:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    count = [0]
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=paho.MQTTv311)
    c.on_message = lambda _c, _u, _m: count.__setitem__(0, count[0] + 1)
    wire = Wire(data)
    c._sock = wire  # type: ignore[assignment]
    while wire.pos < len(wire.data):
        c.loop_read()
    return count[0]


def child(argv: list[str]) -> None:
    """One run: SIDE (gateway or paho), N messages read from FILE (made by `packets`); prints
    how many arrived."""
    side, n, data = argv[0], int(argv[1]), Path(argv[2]).read_bytes()
    if side == "gateway":
        with tempfile.TemporaryDirectory() as tmp:
            got = asyncio.run(_gateway(data, n, Path(tmp)))
    else:
        got = _paho(data)
    if got != n:
        raise SystemExit(f"{side}: {got} of {n} messages arrived")
    print(got)


def instructions(side: str, n: int, qos: int) -> int:
    """Ir of one child run under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        feed = Path(tmp) / "packets"
        feed.write_bytes(packets(n, qos))  # made here: json.dumps of the payloads is not the path's
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
             sys.executable, "-m", "bench.mqttcost", "child", side, str(n), str(feed)],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"callgrind run failed ({out.returncode}):\n{out.stderr[-2000:]}")
        m = re.search(r"Collected : (\d+)", out.stderr)
        if m is None:
            raise SystemExit(f"no 'Collected' line in valgrind's output:\n{out.stderr[-2000:]}")
        return int(m.group(1))


def per_message(side: str, qos: int) -> float:
    """Instructions one more message costs on `side`."""
    return (instructions(side, LARGE, qos) - instructions(side, SMALL, qos)) / (LARGE - SMALL)


def main(argv: list[str]) -> None:
    """Print Ir per message for the gateway and bare paho at the QoS given (0 without)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: apt install valgrind")
    qos = int(argv[0]) if argv else 0
    from .results import cpu_model

    gw, bare = per_message("gateway", qos), per_message("paho", qos)
    print(json.dumps({"qos": qos, "gateway_ir": round(gw), "paho_ir": round(bare), "ratio": round(gw / bare, 2),
                      "cpu": cpu_model()}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2:])
    else:
        main(sys.argv[1:])
