"""The serial driver on socat pty pairs: formats, bad lines, unplug and replug, commands, acks, XMPP.

The gateway opens one end of a pty pair (`Wire.a`); the test plays the device
on the other end (`Wire.b`). Unplugging stops socat, so both links vanish and
the gateway's end reports an I/O error, as when a USB adapter is pulled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import serial

import devices.serial as sd
from devices.base import Context
from gateway.app import build_hub
from gateway.auth import Actor
from devices.serial_config import SerialDevice
from gateway.config import ConfigError, load, parse
from gateway.hub import DeviceError, Health, Hub
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.contract import Contract, driver_contract

ROOT = Path(__file__).resolve().parent.parent
SOCAT = shutil.which("socat") or "/usr/bin/socat"
ADMIN = Actor("alice@localhost", "admin", "test")


async def until(cond: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    """Wait (bounded) until `cond()` is true."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


class Wire:
    """A socat pty pair: the gateway opens `a`, the test is the device on `b`."""

    def __init__(self, folder: Path):
        self.a = folder / "ttyA"
        self.b = folder / "ttyB"
        self.log = folder / "socat.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.fd: int | None = None
        self._buf = bytearray()

    async def plug(self) -> None:
        # A plain Popen: asyncio's child watcher would add a thread per child to the thread count.
        with open(self.log, "ab") as log:  # noqa: ASYNC230
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                [SOCAT, "-d", "-d", f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )
        await until(lambda: self.a.exists() and self.b.exists(), what="socat's pty links")
        self.fd = os.open(self.b, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self._buf.clear()

    async def unplug(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc is not None:
            proc, self.proc = self.proc, None
            proc.terminate()
            await until(lambda: proc.poll() is not None, what="socat to exit")
        await until(lambda: not os.path.lexists(self.a) and not os.path.lexists(self.b), what="links to vanish")

    async def send(self, data: bytes) -> None:
        """Write all of `data` to the device end, yielding while the pty is full."""
        assert self.fd is not None
        view = memoryview(data)
        deadline = time.monotonic() + 5
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                assert time.monotonic() < deadline, "the gateway does not read"
                await asyncio.sleep(0.005)

    async def line(self, timeout: float = 3.0) -> bytes:
        """The next line (with its newline) the gateway wrote to the device end."""
        assert self.fd is not None
        async with asyncio.timeout(timeout):
            while b"\n" not in self._buf:
                try:
                    self._buf += os.read(self.fd, 4096)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
        end = self._buf.index(b"\n") + 1
        out = bytes(self._buf[:end])
        del self._buf[:end]
        return out

    def unread(self) -> bytes:
        """Whatever the gateway wrote that no `line()` has taken yet."""
        assert self.fd is not None
        try:
            self._buf += os.read(self.fd, 4096)
        except BlockingIOError:
            pass
        out = bytes(self._buf)
        self._buf.clear()
        return out


class Rig:
    """A hub with one serial device `dev` and its running driver."""

    def __init__(self, hub: Hub, driver: sd.SerialDriver):
        self.hub = hub
        self.driver = driver

    def history(self, name: str) -> list[Any]:
        return [r.value for r in self.hub.field(f"dev.{name}").history]

    def value(self, name: str) -> Any:
        latest = self.hub.field(f"dev.{name}").latest
        return None if latest is None else latest.value

    @property
    def health(self) -> tuple[Health, str]:
        h = self.hub.node("dev").health
        return h.state, h.reason

    async def wait_health(self, state: Health, reason: str | None = None) -> None:
        await until(
            lambda: self.health[0] is state and (reason is None or self.health[1] == reason),
            what=f"health {state} {reason or ''} (now {self.health})",
        )

    async def wait_values(self, name: str, expected: list[Any]) -> None:
        await until(lambda: self.history(name) == expected, what=f"{name} == {expected} (now {self.history(name)})")


Start = Callable[..., Awaitable[Rig]]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reopen attempts every 50 ms (doubling to 400 ms) instead of 1 s to 30 s, to keep the file fast."""
    monkeypatch.setattr(sd, "RETRY_FIRST", 0.05)
    monkeypatch.setattr(sd, "RETRY_MAX", 0.4)
    monkeypatch.setattr(sd, "CHECK_EVERY", 0.05)


@pytest.fixture
async def wire(tmp_path: Path) -> AsyncIterator[Wire]:
    w = Wire(tmp_path)
    await w.plug()
    yield w
    await w.unplug()


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start a serial device `dev` on a port: `await start(port, fields=[...], **options)`."""
    running: list[sd.SerialDriver] = []

    async def go(port: Path | str, fields: list[dict[str, Any]], **options: Any) -> Rig:
        config = parse({"devices": [{"id": "dev", "driver": "serial", "port": str(port), "fields": fields, **options}]})
        hub = build_hub(config)
        hub.bind(asyncio.get_running_loop())
        device = config.devices[0]
        driver = sd.DRIVER(device, Context(hub, config))
        hub.set_writer("dev", driver.write)
        await driver.start()
        running.append(driver)
        return Rig(hub, driver)

    yield go
    for driver in running:
        await driver.stop()


async def started(start: Start, wire: Wire, fields: list[dict[str, Any]], **options: Any) -> Rig:
    rig = await start(wire.a, fields, **options)
    await until(lambda: rig.driver.connected, what="the port to open")
    return rig


# ---------------------------------------------------------------- formats


async def test_keyvalue_lines_with_each_separator(start: Start, wire: Wire) -> None:
    rig = await started(start, wire, [
        {"name": "temp"},
        {"name": "hum", "type": "integer", "key": "H"},
        {"name": "door", "type": "boolean"},
        {"name": "mode", "type": "string"},
    ])
    assert rig.health == (Health.STARTING, f"waiting for data from {wire.a}")
    await wire.send(b"temp=21.5 H=40 door=1 mode=auto\n")
    await wire.send(b"temp=22,H=41;door=off\tmode=eco\r\n")
    await wire.send(b"noise=9;temp=23.5,, H=42\n")
    await rig.wait_values("hum", [40, 41, 42])
    assert rig.history("temp") == [21.5, 22.0, 23.5]
    assert rig.history("door") == [True, False]
    assert rig.history("mode") == ["auto", "eco"]
    assert rig.health == (Health.OK, "")
    assert rig.driver.bad_lines == 0


def test_keyvalue_custom_separators() -> None:
    device = SerialDevice.model_validate({
        "id": "d", "driver": "serial", "port": "/dev/ttyUSB0", "separators": "|",
        "fields": [{"name": "temp"}, {"name": "hum", "key": "H"}],
    })
    assert sd.Parser(device).parse("temp=1.5|H=40 x|y=2") == {"temp": "1.5", "hum": "40 x"}


async def test_json_lines_with_paths(start: Start, wire: Wire) -> None:
    rig = await started(start, wire, [
        {"name": "temp", "json_path": "sensors.0.value"},
        {"name": "hum", "type": "integer"},
        {"name": "relay", "type": "boolean", "json_path": "state.relay", "payload_on": "ON", "payload_off": "OFF"},
        {"name": "status", "type": "string", "key": "st"},
    ], format="json")
    await wire.send(b'{"sensors": [{"value": 21.5}, {"value": 3}], "hum": 40, "state": {"relay": "ON"}, "st": "ok"}\n')
    await wire.send(b'{"sensors": [{"value": "22.5"}], "state": {"relay": "off"}}\n')
    # Bad lines: no known field, not JSON, nested too deep, an object where a value belongs.
    await wire.send(b'{"hum": null, "sensors": []}\n{"sensors": [\n' + b"[" * 3000 + b"\n")
    await wire.send(b'{"sensors": [{"value": {"x": 1}}], "hum": 41}\n')
    await rig.wait_values("hum", [40, 41])
    assert rig.history("temp") == [21.5, 22.5]
    assert rig.history("relay") == [True, False]
    assert rig.history("status") == ["ok"]
    assert rig.driver.bad_lines == 4


async def test_regex_lines_with_named_groups(start: Start, wire: Wire) -> None:
    rig = await started(start, wire, [
        {"name": "temp"},
        {"name": "hum", "type": "integer"},
        {"name": "door", "type": "boolean", "payload_on": "OPEN", "payload_off": "SHUT"},
    ], format="regex", pattern=r"^T:(?P<temp>-?\d+(?:\.\d+)?)C H:(?P<hum>\d+)%(?: (?P<door>\w+))?$")
    await wire.send(b"T:21.5C H:40% OPEN\nT:abcC H:1%\nT:-3C H:41%\nT:4C H:42% SHUT\n")
    await rig.wait_values("hum", [40, 41, 42])
    assert rig.history("temp") == [21.5, -3.0, 4.0]
    assert rig.history("door") == [True, False]
    assert rig.driver.bad_lines == 1


# ---------------------------------------------------------------- bad input


async def test_bad_lines_are_skipped_and_nothing_else_lost(start: Start, wire: Wire) -> None:
    rig = await started(start, wire, [{"name": "temp"}, {"name": "hum", "type": "integer"}])
    await wire.send(b"#@! garbage ~~~\n")
    await wire.send(b"temp=" + b"9" * 5000 + b"\ntemp=21.5\n")  # over 4 KiB, then a good line
    await wire.send(b"temp=\xff\xfe1\n")  # not UTF-8
    await wire.send(b"temp=abc hum=40\n")  # one bad value, one good
    await wire.send(b"te")  # a line in two pieces
    await asyncio.sleep(0.05)
    await wire.send(b"mp=22.5\n")
    await wire.send(b"x" * 6000)  # over 4 KiB before its newline arrives
    await asyncio.sleep(0.05)
    await wire.send(b"yyy\ntemp=23.5\n")
    await wire.send(b"temp=" + b"0" * 4088 + b"1.5\n")  # exactly 4 KiB: kept
    await rig.wait_values("temp", [21.5, 22.5, 23.5, 1.5])
    assert rig.history("hum") == [40]
    assert rig.driver.bad_lines == 5
    assert rig.health == (Health.OK, "")


async def test_bad_lines_are_logged_rate_limited(
    start: Start, wire: Wire, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="iot_gateway.serial")
    rig = await started(start, wire, [{"name": "temp"}])
    await wire.send(b"".join(b"garbage %d\n" % i for i in range(40)) + b"temp=1\n")
    await rig.wait_values("temp", [1.0])
    assert rig.driver.bad_lines == 40
    skipped = [r for r in caplog.records if "line skipped" in r.getMessage()]
    assert len(skipped) == sd.BAD_LINE_BURST
    assert skipped[0].getMessage() == "dev: line skipped, no known field in it: 'garbage 0'"


def test_throttle_counts_what_it_holds_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="t")
    now = [0.0]
    t = sd.Throttle(logging.getLogger("t"), burst=2, window=10, clock=lambda: now[0])
    for i in range(7):
        t.warning("bad %d", i)
    now[0] = 11
    t.warning("bad again")
    assert [r.getMessage() for r in caplog.records] == [
        "bad 0", "bad 1", "(more bad lines are held back for up to 10 s)",
        "5 more bad lines were not logged in the last 10 s", "bad again",
    ]


def test_line_buffer_bounds_lines() -> None:
    buf = sd.LineBuffer(limit=8)
    assert buf.feed(b"ab\r\ncd") == [b"ab"]
    assert buf.feed(b"ef\n123456789") == [b"cdef", None]
    assert buf.pending == 0
    assert buf.feed(b"more of it\nok\n") == [b"ok"]
    assert buf.feed(b"123456789\n12345678\n") == [None, b"12345678"]


# ---------------------------------------------------------------- unplug, replug


def test_backoff_doubles_from_1_to_30_seconds() -> None:
    delays = sd.backoff(1.0, 30.0)
    assert [next(delays) for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]


async def test_unplug_goes_offline_and_replug_resumes(
    start: Start, wire: Wire, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="iot_gateway.serial")
    rig = await started(start, wire, [
        {"name": "temp"},
        {"name": "relay", "type": "boolean", "writable": True, "command": "RELAY {value}\n"},
    ])
    await wire.send(b"temp=21.5\n")
    await rig.wait_health(Health.OK)
    await wire.send(b"temp=99")  # cut off by the unplug: must never count
    await asyncio.sleep(0.05)

    await wire.unplug()
    await rig.wait_health(Health.OFFLINE, f"serial port gone: {wire.a}")
    assert not rig.driver.connected
    logged = [r.getMessage() for r in caplog.records]
    assert f"dev: {wire.a}: device reports readiness to read but returned no data" in " ".join(logged)
    assert "dev: partial line of 7 bytes discarded" in logged
    with pytest.raises(DeviceError) as err:
        await rig.hub.write("dev.relay", "on", ADMIN)
    assert str(err.value) == (
        f"dev refused the write: {wire.a} is not open (serial port gone: {wire.a}); the command was not sent"
    )

    await wire.plug()
    await rig.wait_health(Health.OFFLINE, f"serial port reopened, waiting for data: {wire.a}")
    await wire.send(b"temp=22.5\n")
    await rig.wait_health(Health.OK)
    await rig.wait_values("temp", [21.5, 22.5])
    assert await rig.hub.write("dev.relay", "on", ADMIN) == (None, True)
    assert await wire.line() == b"RELAY 1\n"


async def test_missing_port_at_start_is_retried(start: Start, tmp_path: Path) -> None:
    w = Wire(tmp_path)
    rig = await start(w.a, [{"name": "temp"}])
    await rig.wait_health(Health.OFFLINE, f"serial port not found: {w.a}")
    await w.plug()
    try:
        await rig.wait_health(Health.STARTING, f"waiting for data from {w.a}")
        await w.send(b"temp=5\n")
        await rig.wait_health(Health.OK)
        assert rig.history("temp") == [5.0]
    finally:
        await w.unplug()


async def test_vanished_path_is_noticed(start: Start, wire: Wire, tmp_path: Path) -> None:
    # A link of our own (like /dev/serial/by-id/...) that goes away while the pty itself stays usable.
    link = tmp_path / "by-id"
    link.symlink_to(wire.a)
    rig = await start(link, [{"name": "temp"}])
    await until(lambda: rig.driver.connected, what="the port to open")
    await wire.send(b"temp=1\n")
    await rig.wait_health(Health.OK)
    link.unlink()
    await rig.wait_health(Health.OFFLINE, f"serial port gone: {link}")
    link.symlink_to(wire.a)
    await until(lambda: rig.driver.connected, what="the reopen")
    await wire.send(b"temp=2\n")
    await rig.wait_health(Health.OK)
    assert rig.history("temp") == [1.0, 2.0]


async def test_busy_port_is_an_error_until_released(start: Start, wire: Wire) -> None:
    other = serial.Serial(str(wire.a), exclusive=True)
    try:
        rig = await start(wire.a, [{"name": "temp"}])
        await rig.wait_health(Health.ERROR, f"serial port busy: {wire.a} (another program has it open)")
    finally:
        other.close()
    await until(lambda: rig.driver.connected, what="the port to open once released")
    await wire.send(b"temp=3\n")
    await rig.wait_values("temp", [3.0])


async def test_no_fd_or_thread_leak_over_ten_replugs(start: Start, wire: Wire) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    rig = await started(start, wire, [{"name": "temp"}])
    await wire.send(b"temp=-1\n")
    await rig.wait_values("temp", [-1.0])
    fds_open = len(os.listdir("/proc/self/fd"))
    for i in range(10):
        await wire.unplug()
        await rig.wait_health(Health.OFFLINE, f"serial port gone: {wire.a}")
        await wire.plug()
        await until(lambda: rig.driver.connected, what=f"reopen {i}")
        await wire.send(b"temp=%d\n" % i)
        await until(lambda i=i: rig.value("temp") == i, what=f"reading {i}")
        assert (len(os.listdir("/proc/self/fd")), threading.active_count()) == (fds_open, threads)
    assert rig.history("temp") == [-1.0, *map(float, range(10))]
    await rig.driver.stop()
    assert not rig.driver.connected
    assert (len(os.listdir("/proc/self/fd")), threading.active_count()) == (fds, threads)


async def test_stale_after_silence_then_ok_again(start: Start, wire: Wire) -> None:
    rig = await started(start, wire, [{"name": "temp"}], stale_after=0.3)
    watcher = asyncio.create_task(rig.hub.watch_stale(every=0.05))
    try:
        await wire.send(b"temp=1\n")
        await rig.wait_health(Health.OK)
        await rig.wait_health(Health.STALE, "no data for 0.3 s")
        await wire.send(b"temp=2\n")
        await rig.wait_health(Health.OK)
        assert rig.history("temp") == [1.0, 2.0]
    finally:
        watcher.cancel()


async def test_serial_settings_reach_the_port(start: Start, wire: Wire) -> None:
    rig = await started(start, wire, [{"name": "temp"}], baudrate=115200, bytesize=7, parity="even", stopbits=2)
    port = rig.driver._port
    assert port is not None
    assert (port.baudrate, port.bytesize, port.parity, port.stopbits) == (115200, 7, "E", 2)


# ---------------------------------------------------------------- writes


async def test_commands_are_rendered_and_sent(start: Start, wire: Wire) -> None:
    rig = await started(start, wire, [
        {"name": "temp"},
        {"name": "relay", "type": "boolean", "writable": True, "command": "RELAY {value}\n"},
        {"name": "lamp", "type": "boolean", "writable": True, "command": "LAMP {value}\r\n",
         "payload_on": "ON", "payload_off": "OFF"},
        {"name": "speed", "type": "integer", "writable": True, "command": "SPEED {value}\n", "min": 0, "max": 100},
        {"name": "setpoint", "writable": True, "command": '{"sp": {value}}\n'},
        {"name": "label", "type": "string", "writable": True, "command": "LABEL {value}\n"},
    ])
    sets = [
        ("relay", "on", b"RELAY 1\n"), ("relay", "off", b"RELAY 0\n"),
        ("lamp", "on", b"LAMP ON\r\n"), ("lamp", "off", b"LAMP OFF\r\n"),
        ("speed", "40", b"SPEED 40\n"), ("setpoint", "21.5", b'{"sp": 21.5}\n'),
        ("setpoint", "21", b'{"sp": 21}\n'), ("setpoint", "0.0000001", b'{"sp": 0.0000001}\n'),
        ("label", "hello world", b"LABEL hello world\n"),
    ]
    for name, raw, sent in sets:
        await rig.hub.write(f"dev.{name}", raw, ADMIN)
        assert await wire.line() == sent
    assert [rig.value(n) for n in ("relay", "lamp", "speed", "setpoint", "label")] == [False, False, 40, 1e-7, "hello world"]

    with pytest.raises(DeviceError, match="cannot contain control characters"):
        await rig.hub.write("dev.label", "two\nlines", ADMIN)
    await asyncio.sleep(0.05)
    assert wire.unread() == b""
    assert rig.value("label") == "hello world"


async def test_ack_pattern_confirms_or_fails_a_set(start: Start, wire: Wire) -> None:
    rig = await started(start, wire, [
        {"name": "temp"},
        {"name": "relay", "type": "boolean", "writable": True, "command": "R{value}\n",
         "ack_pattern": r"^OK R[01]$", "ack_timeout": 0.5},
    ])
    task = asyncio.create_task(rig.hub.write("dev.relay", "on", ADMIN))
    assert await wire.line() == b"R1\n"
    await asyncio.sleep(0.1)
    assert not task.done()  # still waiting for the device
    await wire.send(b"temp=20\nOK R1\n")  # a reading first: it is not the acknowledgement
    assert await asyncio.wait_for(task, 2) == (None, True)
    assert rig.value("relay") is True and rig.value("temp") == 20.0
    assert rig.driver.bad_lines == 0

    began = time.monotonic()
    with pytest.raises(DeviceError) as err:
        await rig.hub.write("dev.relay", "off", ADMIN)
    assert 0.5 <= time.monotonic() - began < 2
    assert str(err.value) == (
        "dev refused the write: no reply matching '^OK R[01]$' within 0.5 s after sending 'R0\\n'"
    )
    assert await wire.line() == b"R0\n"
    assert rig.value("relay") is True
    assert rig.hub.audit.entries[-1].outcome == "failed"


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"format": "json", "separators": ","}, '`separators` only applies to format = "keyvalue"'),
        ({"fields": [{"name": "t", "json_path": "a.b"}]}, "`json_path` only applies to format = \"json\""),
        ({"format": "json", "fields": [{"name": "t", "json_path": "a..b"}]}, "must be dotted keys"),
        ({"encoding": "utf-9"}, "unknown encoding 'utf-9'"),
        ({"port": "ttyUSB0"}, "must be a device path like /dev/serial/by-id/"),
        ({"fields": [{"name": "a", "key": "x"}, {"name": "b", "key": "x"}]}, "two fields read the same key: x"),
        ({"fields": [{"name": "r", "type": "boolean", "payload_on": "ON"}]}, "give both `payload_on` and `payload_off`"),
        ({"fields": [{"name": "t", "ack_pattern": "OK"}]}, "`ack_pattern` is set but the field is not writable"),
        ({"fields": [{"name": "r", "writable": True, "command": "R{value}", "ack_pattern": "("}]}, "not a valid regular expression"),
        ({"parity": "pink"}, "devices.0.parity: Input should be"),
        ({"format": "regex", "pattern": "(?P<x>.)"}, "pattern has no group named 'temp'"),
    ],
)
def test_bad_serial_config_is_named(change: dict[str, Any], expected: str) -> None:
    device = {"id": "d", "driver": "serial", "port": "/dev/ttyUSB0", "fields": [{"name": "temp"}], **change}
    with pytest.raises(ConfigError) as err:
        parse({"devices": [device]})
    assert expected in str(err.value), str(err.value)


def test_example_config_passes_check() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(ROOT / "config" / "serial.example.toml")],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"\[serial /dev/serial/by-id/\S+\]", r.stdout), r.stdout
    commands = [f.command for d in load(ROOT / "config" / "serial.example.toml").devices for f in d.fields if f.command]
    assert commands == ["FAN {value}\n", "SP {value}\r\n", '{"relay": "{value}"}\n']


# ---------------------------------------------------------------- through XMPP


async def test_contact_reads_and_sets_over_xmpp(xmpp_server: XmppServer, tmp_path: Path, wire: Wire) -> None:
    config = gateway_config(xmpp_server, tmp_path, devices=[{
        "id": "bench", "driver": "serial", "port": str(wire.a),
        "fields": [
            {"name": "temp", "unit": "°C", "decimals": 1},
            {"name": "relay", "type": "boolean", "writable": True, "command": "RELAY {value}\n",
             "payload_on": "ON", "payload_off": "OFF", "ack_pattern": "^OK$"},
        ],
    }])
    running = await start_gateway(config, xmpp_server.passwords["gateway"])
    gw = running.gateway
    alice = None
    try:
        alice = await xmpp_server.peer("alice").start()
        gw_jid = xmpp_server.jid("gateway")
        driver = gw.drivers["bench"]
        assert isinstance(driver, sd.SerialDriver)
        await until(lambda: driver.connected, what="the port to open")
        await wire.send(b"temp=21.54\n")
        await until(lambda: gw.hub.field("bench.temp").latest is not None, what="the reading")

        reply = await alice.ask_for(gw_jid, "read bench.temp", "bench.temp")
        assert re.fullmatch(r"bench\.temp = 21\.5 °C \(\d s ago\)", reply), reply

        asked = asyncio.create_task(alice.ask_for(gw_jid, "set bench.relay on", "bench.relay"))
        assert await wire.line(timeout=10) == b"RELAY ON\n"
        await wire.send(b"OK\n")
        assert await asyncio.wait_for(asked, 10) == "bench.relay: — → on"
        assert gw.hub.field("bench.relay").latest.value is True
    finally:
        if alice is not None:
            await alice.stop()
        await running.stop()


async def test_the_driver_contract(start: Start, wire: Wire) -> None:
    """tests/contract.py through a socat pty: a set is written to the port, unplugging makes the
    device unhealthy with the reason, a replug with data mends it; stop closes the port."""
    rig = await started(start, wire, [
        {"name": "temp"},
        {"name": "relay", "type": "boolean", "writable": True, "command": "RELAY {value}\n"},
    ])
    await wire.send(b"temp=21.5\n")

    async def replug() -> None:
        await wire.plug()
        await until(lambda: rig.driver.connected, what="the port to reopen")
        await wire.send(b"temp=22.5\n")

    await driver_contract(Contract(
        rig.hub, "dev", rig.driver.stop, writes=[("relay", True, True)], fail=wire.unplug, mend=replug,
    ))
    assert not rig.driver.connected
