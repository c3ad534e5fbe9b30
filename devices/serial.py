"""`serial`: text lines from a serial port (USB adapter, UART, Arduino, ...).

The port is opened with pyserial and its file descriptor registered with the
event loop (`loop.add_reader`), so reading never blocks and needs no thread.
Each line (ended by CR, LF or both) is decoded, parsed in the device's
`format` (keyvalue, json or regex) and its fields pushed into the hub. Bad
lines are logged (rate-limited) and skipped; lines over `MAX_LINE` bytes are
dropped without losing the next one.

When the port goes away (path gone, read error, EOF) the device turns
`offline` with the reason, and the driver reopens it with a backoff of 1 s
doubling to 30 s. The configured path is resolved again every CHECK_EVERY
seconds: when it leads to another device node than the one open (a
`/dev/serial/by-id/…` link re-pointed by udev while the old node still
exists), the port is closed and the path opened anew, instead of reading the
old node forever. After a reopen it stays `offline` ("reopened, waiting for
data") until the first valid line, which turns it `ok` again.

Writable fields send their `command` template with `{value}` filled in; with
an `ack_pattern`, the set only succeeds when a matching line comes back
within `ack_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import serial

from gateway.hub import Health, NotWritable
from gateway.values import BadValue, Value, coerce

from .base import Context, Driver
from .serial_config import SerialDevice, SerialField

log = logging.getLogger("iot_gateway.serial")

MAX_LINE = 4096  # bytes; a longer line is dropped whole
READ_CHUNK = 4096  # bytes read per readiness callback, so a flood cannot starve the loop
RETRY_FIRST = 1.0  # seconds before the first reopen attempt, doubling ...
RETRY_MAX = 30.0  # ... up to this
CHECK_EVERY = 1.0  # seconds between checks that an open port's path still exists and leads to it
SEND_TIMEOUT = 2.0  # seconds the port may refuse output (buffer full) before a set fails
BAD_LINE_BURST = 5  # bad lines logged per device per window ...
BAD_LINE_WINDOW = 60.0  # ... of this many seconds; the rest are counted

PARITY = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}
STOPBITS = {1: serial.STOPBITS_ONE, 1.5: serial.STOPBITS_ONE_POINT_FIVE, 2: serial.STOPBITS_TWO}
# Read errors that mean the device went away rather than a fault of the line.
GONE_ERRNOS = {errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF, errno.ENOENT}
NO_DATA = "device reports readiness to read but returned no data"


class SerialError(Exception):
    """A set that could not be carried out on a serial device; the message says why."""


class PortOffline(SerialError):
    """The port is not open, so nothing can be sent."""


class NoAck(SerialError):
    """The device did not answer a command with a line matching `ack_pattern` in time."""


class BadLine(ValueError):
    """A line that cannot be read in the device's format."""


def backoff(first: float, limit: float) -> Iterator[float]:
    """Delays between reopen attempts: `first`, doubling, capped at `limit`."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, limit)


class LineBuffer:
    """Splits a byte stream into lines at CR or LF, with a bound on line length.

    `feed()` returns the complete lines so far, and None for each line longer
    than `limit` bytes: such a line is dropped up to its end, and the next
    line is kept. Empty lines (as between CR and LF) are skipped.
    """

    _EOL = re.compile(rb"[\r\n]")

    def __init__(self, limit: int = MAX_LINE):
        self.limit = limit
        self._buf = bytearray()
        self._skipping = False

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | None]:
        """Add received bytes; return the lines they complete (None: an over-long line dropped)."""
        out: list[bytes | None] = []
        buf = self._buf
        buf += data
        start = 0
        while (m := self._EOL.search(buf, start)) is not None:
            end = m.start()
            if self._skipping:
                self._skipping = False  # the end of a line already reported as too long
            elif end - start > self.limit:
                out.append(None)
            elif end > start:
                out.append(bytes(buf[start:end]))
            start = end + 1
        del buf[:start]
        if len(buf) > self.limit:
            if not self._skipping:
                out.append(None)
                self._skipping = True
            buf.clear()
        return out


class Throttle:
    """Logs at most `burst` warnings per `window` seconds and counts the ones held back."""

    def __init__(
        self,
        logger: logging.Logger,
        burst: int = BAD_LINE_BURST,
        window: float = BAD_LINE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger = logger
        self.burst = burst
        self.window = window
        self.clock = clock
        self._start = clock()
        self._count = 0
        self._held = 0

    def warning(self, msg: str, *args: Any) -> None:
        """Log `msg` unless this window's budget is spent."""
        now = self.clock()
        if now - self._start >= self.window:
            if self._held:
                self.logger.warning(
                    "%d more bad lines were not logged in the last %g s", self._held, self.window
                )
            self._start, self._count, self._held = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            self.logger.warning(msg, *args)
            if self._count == self.burst:
                self.logger.warning("(more bad lines are held back for up to %g s)", self.window)
        else:
            self._held += 1


def lookup(doc: Any, path: list[str]) -> tuple[bool, Any]:
    """(True, value) at a dotted path of dict keys and list indexes, else (False, None)."""
    cur = doc
    for part in path:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isascii() and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False, None
    return True, cur


class Parser:
    """Turns one decoded line into raw field values, in the device's format."""

    def __init__(self, device: SerialDevice):
        self.format = device.format
        self.fields = device.fields
        self._by_key = {f.key or f.name: f.name for f in device.fields}
        seps = re.escape(device.separators.replace(" ", ""))
        if " " in device.separators:
            seps += r"\s"  # a space separator stands for any whitespace, tabs included
        self._split = re.compile(f"[{seps}]+")
        self._paths = {
            f.name: f.json_path.split(".") if f.json_path else [f.key or f.name]
            for f in device.fields
        }
        self._rx = re.compile(device.pattern) if device.pattern else None

    def parse(self, text: str) -> dict[str, Any]:
        """{field name: raw value} for the fields found in `text`; BadLine if unreadable."""
        if self.format == "json":
            return self._json(text)
        if self.format == "regex":
            return self._regex(text)
        return self._keyvalue(text)

    def _keyvalue(self, text: str) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for token in self._split.split(text.strip()):
            key, eq, raw = token.partition("=")
            name = self._by_key.get(key.strip())
            if eq and name is not None:
                found[name] = raw.strip()
        return found

    def _json(self, text: str) -> dict[str, Any]:
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise BadLine(f"not JSON ({e})") from None
        except RecursionError:
            raise BadLine("JSON nested too deeply") from None
        found: dict[str, Any] = {}
        for name, path in self._paths.items():
            ok, value = lookup(doc, path)
            if ok and value is not None:
                found[name] = value
        return found

    def _regex(self, text: str) -> dict[str, Any]:
        assert self._rx is not None
        m = self._rx.search(text)
        if m is None:
            raise BadLine("does not match the pattern")
        groups = m.groupdict()
        return {
            name: groups[key]
            for key, name in self._by_key.items()
            if groups.get(key) is not None
        }


def convert(f: SerialField, raw: Any) -> Value:
    """A raw value from a line as a value of the field's type; BadValue if it is not one."""
    if isinstance(raw, (dict, list)):
        raise BadValue("is a JSON object or list, not a single value (check json_path)")
    if f.type == "boolean" and f.payload_on is not None and isinstance(raw, str):
        word = raw.strip().casefold()
        if word == f.payload_on.casefold():
            return True
        if word == (f.payload_off or "").casefold():
            return False
    return coerce(f.type, raw)


def plain(x: float) -> str:
    """A float without exponent or a needless `.0`: 21, 21.5, 0.0000001."""
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return format(Decimal(repr(x)), "f")


def render(f: SerialField, value: Value) -> str:
    """The field's `command` with `{value}` filled in."""
    if isinstance(value, bool):
        if f.payload_on is not None and f.payload_off is not None:
            text = f.payload_on if value else f.payload_off
        else:
            text = "1" if value else "0"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = plain(value)
    else:
        text = value
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise SerialError("the value cannot contain control characters such as line breaks")
    assert f.command is not None
    return f.command.replace("{value}", text)


class SerialDriver(Driver[SerialDevice]):
    """One serial port: reads lines into fields, sends commands for writable fields."""

    def __init__(self, device: SerialDevice, ctx: Context):
        super().__init__(device, ctx)
        self.path = device.port
        self.bad_lines = 0  # lines (or values in them) skipped since start
        self._fields = {f.name: f for f in device.fields}
        self._parser = Parser(device)
        self._throttle = Throttle(log)
        self._port: serial.Serial | None = None
        self._lines = LineBuffer()
        self._lost: asyncio.Future[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._acks: list[tuple[re.Pattern[str], asyncio.Future[str]]] = []
        self._write_lock = asyncio.Lock()
        self._delays = backoff(RETRY_FIRST, RETRY_MAX)
        self._receiving = False  # a valid line arrived since the port was (re)opened
        self._seen_data = False  # a valid line arrived since start
        self._reason = "not started"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._node: tuple[int, int] | None = None  # (st_dev, st_ino) of the device node open

    @property
    def connected(self) -> bool:
        """True while the port is open."""
        return self._port is not None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._set(Health.STARTING, f"opening {self.path}")
        self._task = asyncio.create_task(self._run(), name=f"serial:{self.id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close("the gateway is stopping")

    async def _run(self) -> None:
        """Open the port, wait until it is lost, back off, and again, until cancelled."""
        while True:
            try:
                if self._open():
                    await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug here must not end the retries
                log.exception("%s: unexpected error on %s", self.id, self.path)
                self._close(f"unexpected error: {e}")
                self._set(Health.ERROR, f"unexpected error on {self.path}: {e}")
            await asyncio.sleep(next(self._delays))

    def _open(self) -> bool:
        """Try to open the port; on failure report why and return False."""
        d = self.device
        try:
            port = serial.Serial(
                port=self.path,
                baudrate=d.baudrate,
                bytesize=d.bytesize,
                parity=PARITY[d.parity],
                stopbits=STOPBITS[d.stopbits],
                timeout=0,
                write_timeout=0,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as e:
            state, reason = self._open_problem(e)
            if reason != self._reason:
                log.warning("%s: %s", self.id, reason)
            else:
                log.debug("%s: still %s", self.id, reason)
            self._set(state, reason)
            return False
        assert self._loop is not None
        self._port = port
        st = os.fstat(port.fileno())
        self._node = (st.st_dev, st.st_ino)
        self._lines = LineBuffer()
        self._receiving = False
        self._lost = self._loop.create_future()
        self._loop.add_reader(port.fileno(), self._on_readable)
        log.info("%s: opened %s at %d baud", self.id, self.path, d.baudrate)
        if self._seen_data:
            self._set(Health.OFFLINE, f"serial port reopened, waiting for data: {self.path}")
        else:
            self._set(Health.STARTING, f"waiting for data from {self.path}")
        return True

    async def _watch(self) -> None:
        """Return once the open port is lost; notice a port whose path vanished."""
        lost = self._lost
        assert lost is not None
        while not lost.done():
            await asyncio.wait([lost], timeout=CHECK_EVERY)
            if lost.done():
                break
            try:
                st = os.stat(self.path)  # follows a by-id symlink to the node it leads to now
            except OSError:
                self._lose(f"serial port gone: {self.path}")
                continue
            if (st.st_dev, st.st_ino) != self._node:
                now = os.path.realpath(self.path)
                log.warning("%s: %s now leads to %s, another device node: reopening it", self.id, self.path, now)
                self._lose(f"serial port re-pointed: {self.path} now leads to {now}")

    def _open_problem(self, e: Exception) -> tuple[Health, str]:
        code = getattr(e, "errno", None)
        if code == errno.ENOENT or not os.path.exists(self.path):
            return Health.OFFLINE, f"serial port not found: {self.path}"
        if code in (errno.EACCES, errno.EPERM):
            return Health.ERROR, (
                f"no permission to open {self.path} (add the gateway's user to the dialout group)"
            )
        if code in (errno.EBUSY, errno.EAGAIN):  # EAGAIN: pyserial's exclusive lock is taken
            return Health.ERROR, f"serial port busy: {self.path} (another program has it open)"
        if code in GONE_ERRNOS:
            return Health.OFFLINE, f"serial port not available: {self.path} ({os.strerror(code)})"
        return Health.ERROR, f"cannot open {self.path}: {e}"

    def _failure(self, e: Exception) -> str:
        """Log a failed read or write of the open port; return the reason users see."""
        log.warning("%s: %s: %s", self.id, self.path, e)
        # pyserial wraps the OSError of a failed read in a SerialException without errno.
        code = getattr(e, "errno", None) or getattr(e.__context__, "errno", None)
        if NO_DATA in str(e) or code in GONE_ERRNOS or not os.path.exists(self.path):
            return f"serial port gone: {self.path}"
        return f"serial port failed: {self.path}: {e}"

    def _lose(self, reason: str) -> None:
        """The open port failed: close it, report `offline`, and wake `_run` to retry."""
        if self._port is None:
            return
        self._close(reason)
        self._set(Health.OFFLINE, reason)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(reason)

    def _close(self, reason: str) -> None:
        port, self._port = self._port, None
        if port is None:
            return
        if self._lines.pending:
            log.info("%s: partial line of %d bytes discarded", self.id, self._lines.pending)
        self._lines = LineBuffer()
        assert self._loop is not None
        with contextlib.suppress(Exception):
            self._loop.remove_reader(port.fileno())
        try:
            port.close()
        except (OSError, serial.SerialException) as e:
            log.debug("%s: error closing %s: %s", self.id, self.path, e)
        for _, waiter in self._acks:
            if not waiter.done():
                waiter.set_exception(PortOffline(f"{reason}; no acknowledgement received"))

    def _set(self, state: Health, reason: str = "") -> None:
        self._reason = reason
        self.health(state, reason)

    # ------------------------------------------------------------ reading

    def _on_readable(self) -> None:
        port = self._port
        if port is None:
            return
        try:
            data = port.read(READ_CHUNK)
        except (serial.SerialException, OSError) as e:
            self._lose(self._failure(e))
            return
        for line in self._lines.feed(data):
            if line is None:
                self._bad(f"a line longer than {MAX_LINE} bytes was dropped")
                continue
            try:
                self._on_line(line)
            except Exception:  # a bug must not stop the reading
                log.exception("%s: failed to handle line %r", self.id, line[:80])

    def _on_line(self, raw: bytes) -> None:
        try:
            text = raw.decode(self.device.encoding)
        except UnicodeDecodeError as e:
            self._bad(f"line is not valid {self.device.encoding} ({e.reason} at byte {e.start}): {raw[:80]!r}")
            return
        acked = self._ack(text)
        try:
            found = self._parser.parse(text)
        except BadLine as e:
            if not acked:
                self._bad(f"line skipped, {e}: {text[:80]!r}")
            return
        if not found:
            if not acked:
                self._bad(f"line skipped, no known field in it: {text[:80]!r}")
            return
        values: dict[str, Value] = {}
        for name, value in found.items():
            try:
                values[name] = convert(self._fields[name], value)
            except BadValue as e:
                self._bad(f"{self.id}.{name} {e} in line {text[:80]!r}")
        if not values:
            return
        if not self._receiving:
            self._receiving = self._seen_data = True
            self._delays = backoff(RETRY_FIRST, RETRY_MAX)
            self._set(Health.OK)
        now = time.time()
        for name, value in values.items():
            self.push(name, value, now)

    def _bad(self, what: str) -> None:
        self.bad_lines += 1
        self._throttle.warning("%s: %s", self.id, what)

    def _ack(self, text: str) -> bool:
        """Hand the line to the oldest pending command whose `ack_pattern` it matches."""
        for rx, waiter in self._acks:
            if not waiter.done() and rx.search(text):
                waiter.set_result(text)
                return True
        return False

    # ------------------------------------------------------------ writing

    async def write(self, field: str, value: Value) -> None:
        f = self._fields.get(field)
        if f is None or not f.writable or f.command is None:
            raise NotWritable(f"{self.id}.{field} is read-only")
        command = render(f, value)
        try:
            data = command.encode(self.device.encoding)
        except UnicodeEncodeError:
            raise SerialError(f"{command!r} cannot be sent as {self.device.encoding}") from None
        async with self._write_lock:
            if self._port is None:
                raise PortOffline(f"{self.path} is not open ({self._reason}); the command was not sent")
            entry: tuple[re.Pattern[str], asyncio.Future[str]] | None = None
            if f.ack_pattern is not None:
                assert self._loop is not None
                entry = (re.compile(f.ack_pattern), self._loop.create_future())
                self._acks.append(entry)
            try:
                await self._send(data)
                if entry is not None:
                    try:
                        await asyncio.wait_for(entry[1], f.ack_timeout)
                    except TimeoutError:
                        raise NoAck(
                            f"no reply matching {f.ack_pattern!r} within {f.ack_timeout:g} s "
                            f"after sending {command!r}"
                        ) from None
            finally:
                if entry is not None:
                    self._acks.remove(entry)
                    if not entry[1].done():
                        entry[1].cancel()
        log.info("%s: sent %r", self.id, command)
        self.push(field, value)

    async def _send(self, data: bytes) -> None:
        """Write all of `data` without blocking the loop.

        os.write on the non-blocking fd, because pyserial's write with
        write_timeout=0 spins when the output buffer is full.
        """
        assert self._loop is not None
        view = memoryview(data)
        deadline = self._loop.time() + SEND_TIMEOUT
        while view:
            port = self._port
            if port is None:
                raise PortOffline(f"{self.path} closed while sending; the command was not sent")
            try:
                n = os.write(port.fileno(), view)
            except BlockingIOError:
                n = 0
            except OSError as e:
                reason = self._failure(e)
                self._lose(reason)
                raise PortOffline(f"{reason}; the command was not sent") from None
            view = view[n:]
            if view:
                if self._loop.time() > deadline:
                    raise SerialError(
                        f"{self.path} did not take the command within {SEND_TIMEOUT:g} s (output buffer full)"
                    )
                await asyncio.sleep(0.01)


DRIVER = SerialDriver
