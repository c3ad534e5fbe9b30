"""Ingest throughput: MQTT messages and serial lines into the hub, against bare clients.

Both run the gateway in this process (no XMPP: ingest does not touch it) and
flood it from outside: `bench.mqttpub` (pre-encoded packets on a raw socket, in
its own process, at QoS 0 and at QoS 1) for MQTT, `cat` into a socat pty for serial. The rate is counted
from the first to the last item received, so only the receiving side is timed.
Gateway and baseline alternate, round by round; each reports its median.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import serial

from gateway.app import Gateway
from gateway.config import parse
from gateway.hub import Field, Reading

from .clients import BenchError, Publisher, Subscriber
from .lab import Lab
from .results import Result, Target, cpu_model

MQTT_MESSAGES = 50_000
MQTT_DEVICES = 10  # one topic each; the messages are spread evenly over them
MQTT_ROUNDS = 5
SERIAL_LINES = 20_000
SERIAL_ROUNDS = 3
WAIT = 60.0  # seconds any one round may take before the benchmark gives up


def mqtt_payload(i: int) -> str:
    """A Zigbee2MQTT-like sensor message; the gateway reads one value out of it (json_path)."""
    return json.dumps(
        {
            "sensor": {"temperature": round(18 + (i % 100) / 10, 2), "humidity": 40.5},
            "battery": 97,
            "linkquality": 120,
        }
    )


def serial_line(i: int) -> str:
    """A keyvalue line as an Arduino sketch prints it: four fields."""
    return f"temp={20 + (i % 100) / 10:.2f} hum=40.1 pres=1013.2 co2={400 + i % 50}\n"


class Counter:
    """A hub listener that notes the times of the first and the `expected`-th reading."""

    def __init__(self, expected: int):
        self.expected = expected
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.done = asyncio.Event()

    def __call__(self, _f: Field, _r: Reading) -> None:
        self.count += 1
        if self.count == 1:
            self.first = time.perf_counter()
        if self.count == self.expected:
            self.last = time.perf_counter()
            self.done.set()

    def rate(self, per: int = 1) -> float:
        """Items per second between the first and the last, `per` readings making one item."""
        return (self.expected - per) / per / (self.last - self.first)


# ---------------------------------------------------------------- MQTT


async def mqtt_ingest(lab: Lab, work: Path) -> list[Result]:
    """readings/s through the MQTT driver (JSON, json_path, hub, history, two watches) vs bare paho,
    published at QoS 0 and at QoS 1."""
    topics = [f"bench/ingest/{i:02d}" for i in range(MQTT_DEVICES)]
    feeds = []
    for n, topic in enumerate(topics):
        path = work / f"mqtt-{n:02d}.txt"
        path.write_text("".join(mqtt_payload(i) + "\n" for i in range(n, MQTT_MESSAGES, MQTT_DEVICES)))
        feeds.append((topic, path))
    results = []
    for qos in (0, 1):
        gateway_rates, bare_rates = [], []
        for round_ in range(MQTT_ROUNDS):
            bare_rates.append(await _bare_mqtt(lab, topics, feeds, qos))
            gateway_rates.append(await _gateway_mqtt(lab, work / f"mqtt-gw-{qos}-{round_}", topics, feeds, qos))
        results.append(
            Result(
                f"mqtt_ingest.qos{qos}",
                statistics.median(gateway_rates),
                "readings/s",
                f"bare paho-mqtt subscriber, same broker and topics ({MQTT_MESSAGES:,} messages, QoS {qos}; "
                f"{cpu_model()})",  # the ratio differs between CPUs (issue 24: 0.86 on an AMD EPYC, 0.7 on a Xeon)
                statistics.median(bare_rates),
                Target("ratio>=", 0.8),
            )
        )
    return results


async def _publish(lab: Lab, feeds: list[tuple[str, Path]], qos: int) -> None:
    """Publish every line of each feed file to its topic, at `qos`, from a raw-socket publisher process."""
    args = [f"{topic}={path}" for topic, path in feeds]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.mqttpub", str(lab.mosquitto.port), str(qos), *args
    )
    if await proc.wait() != 0:
        raise BenchError(f"bench.mqttpub exited with code {proc.returncode}")


async def _bare_mqtt(lab: Lab, topics: list[str], feeds: list[tuple[str, Path]], qos: int) -> float:
    sub = Subscriber(lab.mosquitto.port, topics, "bench-bare").start(MQTT_MESSAGES)
    try:
        await _publish(lab, feeds, qos)
        if not await asyncio.to_thread(sub.done.wait, WAIT):
            raise BenchError(f"the bare subscriber got {sub.count} of {MQTT_MESSAGES} messages")
        return (MQTT_MESSAGES - 1) / (sub.last - sub.first)
    finally:
        sub.stop()


def mqtt_devices(topics: list[str]) -> list[dict[str, Any]]:
    """One mqtt device per topic, reading the temperature out of each message."""
    return [
        {
            "id": f"ing{n:02d}",
            "driver": "mqtt",
            "fields": [
                {"name": "temp", "unit": "°C", "decimals": 2, "topic": t, "json_path": "sensor.temperature"}
            ],
        }
        for n, t in enumerate(topics)
    ]


async def _gateway_mqtt(
    lab: Lab, folder: Path, topics: list[str], feeds: list[tuple[str, Path]], qos: int
) -> float:
    data = lab.config(folder.name, mqtt_devices(topics))
    data["gateway"]["state_dir"] = str(folder / "state")
    del data["xmpp"], data["contacts"]
    gw = Gateway(parse(data))
    await gw.start()
    try:
        admin = lab.jid("alice")
        for words in ("ing00.temp > 1000", "ing01.temp < -1000"):
            gw.watches.add(gw.watches.parse(admin, words.split()))
        await _subscribed(lab, gw, topics)
        counter = Counter(MQTT_MESSAGES)
        gw.hub.subscribe(reading=counter)
        await _publish(lab, feeds, qos)
        try:
            await asyncio.wait_for(counter.done.wait(), WAIT)
        except TimeoutError:
            raise BenchError(
                f"the gateway took {counter.count} of {MQTT_MESSAGES} readings in {WAIT:g} s"
            ) from None
        return counter.rate()
    finally:
        await gw.stop()


async def _subscribed(lab: Lab, gw: Gateway, topics: list[str]) -> None:
    """Publish to every topic until each device has a reading: the gateway's subscriptions are in place."""
    fields = [f for n in gw.hub.nodes.values() for f in n.fields.values()]
    pub = Publisher(lab.mosquitto.port, "bench-probe").start()
    try:
        deadline = time.monotonic() + 10
        while not all(f.latest is not None for f in fields):
            if time.monotonic() > deadline:
                raise BenchError("the gateway's mqtt devices got nothing within 10 s")
            for t in topics:
                pub.publish(t, mqtt_payload(0))
            await asyncio.sleep(0.1)
    finally:
        pub.stop()


# ---------------------------------------------------------------- serial


class Wire:
    """A socat pty pair: the reader opens `a`, the feeder writes into `b`."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.a = folder / "ttyA"
        self.b = folder / "ttyB"
        tool = shutil.which("socat")
        if tool is None:
            raise BenchError("socat not found: install the socat package (make deps does)")
        self.proc = subprocess.Popen(
            [tool, f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not (self.a.exists() and self.b.exists()):
            if time.monotonic() > deadline:
                raise BenchError("socat made no pty pair within 5 s")
            time.sleep(0.01)

    def feed(self, path: Path) -> subprocess.Popen[bytes]:
        """`cat path > b`: writes as fast as the reader at the other end takes it."""
        fd = os.open(self.b, os.O_WRONLY | os.O_NOCTTY)
        try:
            return subprocess.Popen(["cat", str(path)], stdout=fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Stop socat; both links vanish."""
        self.proc.terminate()
        self.proc.wait(5)


async def serial_ingest(lab: Lab, work: Path) -> Result:
    """keyvalue lines/s through the serial driver vs bare pyserial readline, on socat ptys."""
    lines = work / "serial.txt"
    lines.write_text("".join(serial_line(i) for i in range(SERIAL_LINES)))
    gateway_rates, bare_rates = [], []
    for round_ in range(SERIAL_ROUNDS):
        bare_rates.append(await asyncio.to_thread(_bare_serial, work / f"pty-bare-{round_}", lines))
        gateway_rates.append(await _gateway_serial(lab, work / f"pty-gw-{round_}", lines))
    return Result(
        "serial_ingest",
        statistics.median(gateway_rates),
        "lines/s",
        f"bare pyserial readline, same kind of pty ({SERIAL_LINES:,} lines of 4 fields; {cpu_model()})",
        statistics.median(bare_rates),
        Target("ratio>=", 0.8),
    )


def _bare_serial(folder: Path, lines: Path) -> float:
    wire = Wire(folder)
    port = serial.Serial(str(wire.a), 115200, timeout=5)
    feeder = wire.feed(lines)
    try:
        first = last = 0.0
        for n in range(1, SERIAL_LINES + 1):
            if not port.readline():
                raise BenchError(f"pyserial read {n - 1} of {SERIAL_LINES} lines, then nothing for 5 s")
            last = time.perf_counter()
            if n == 1:
                first = last
        return (SERIAL_LINES - 1) / (last - first)
    finally:
        feeder.wait(5)
        port.close()
        wire.close()


async def _gateway_serial(lab: Lab, folder: Path, lines: Path) -> float:
    wire = Wire(folder)
    data = lab.config(
        folder.name,
        [
            {
                "id": "rig",
                "driver": "serial",
                "port": str(wire.a),
                "baudrate": 115200,
                "fields": [
                    {"name": "temp", "unit": "°C", "decimals": 2},
                    {"name": "hum", "unit": "%"},
                    {"name": "pres", "unit": "hPa"},
                    {"name": "co2", "type": "integer", "unit": "ppm"},
                ],
            }
        ],
    )
    data["gateway"]["state_dir"] = str(folder / "state")
    del data["xmpp"], data["contacts"], data["mqtt"]
    gw = Gateway(parse(data))
    await gw.start()
    feeder = None
    try:
        await _until(lambda: gw.drivers["rig"].connected, "the serial port to open")
        counter = Counter(SERIAL_LINES * 4)
        gw.hub.subscribe(reading=counter)
        feeder = wire.feed(lines)
        try:
            await asyncio.wait_for(counter.done.wait(), WAIT)
        except TimeoutError:
            raise BenchError(
                f"the gateway took {counter.count // 4} of {SERIAL_LINES} lines in {WAIT:g} s"
            ) from None
        return counter.rate(per=4)
    finally:
        if feeder is not None:
            feeder.wait(5)
        await gw.stop()
        wire.close()


async def _until(cond: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)
