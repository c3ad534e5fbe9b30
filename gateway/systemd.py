"""systemd integration: sd_notify(3) over $NOTIFY_SOCKET, written by hand.

Under a `Type=notify` unit systemd passes the address of a datagram socket in
$NOTIFY_SOCKET (a path, or `@name` for an abstract socket) and, with
`WatchdogSec=`, the watchdog period in $WATCHDOG_USEC. The service sends it
`READY=1`, `STATUS=...`, `WATCHDOG=1` and `STOPPING=1`. The protocol is one
datagram of newline-separated `KEY=value` lines, so no libsystemd is needed.
Outside systemd every call does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("iot_gateway.systemd")


class NotifyError(ValueError):
    """$NOTIFY_SOCKET holds an address this module cannot use."""


def notify_address(value: str) -> str:
    """The AF_UNIX address for a $NOTIFY_SOCKET value: `@name` becomes abstract (leading NUL)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise NotifyError(f"NOTIFY_SOCKET={value!r}: only /path and @abstract unix sockets are supported")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when no watchdog is asked of this process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    # systemd sets WATCHDOG_PID to the main process; a child that inherited the env must not ping.
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


class Notifier:
    """What the gateway tells systemd: readiness, status lines, watchdog pings, shutdown.

    Never raises and never blocks the event loop: a message that cannot be sent
    is logged (once as a warning, then at debug level) and dropped.
    """

    def __init__(self, env: Mapping[str, str] | None = None):
        env = dict(os.environ if env is None else env)
        self.address: str | None = None
        self.interval: float | None = None
        self._sock: socket.socket | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._warned = False
        self._status: str | None = None
        value = env.get("NOTIFY_SOCKET")
        if not value:
            return
        try:
            self.address = notify_address(value)
        except NotifyError as e:
            log.warning("%s; not notifying systemd", e)
            return
        self.interval = watchdog_interval(env)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens."""
        return self._sock is not None

    def send(self, *lines: str) -> None:
        """Send `KEY=value` lines as one message."""
        if self._sock is None or self.address is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "cannot notify systemd (%s): %s", "; ".join(lines), e.strerror or e)

    def ready(self, status: str) -> None:
        """Tell systemd the service is up, with its first status line."""
        self._status = status
        self.send("READY=1", f"STATUS={_one_line(status)}")

    def status(self, status: str) -> None:
        """Update the status line `systemctl status` shows; repeats are not sent."""
        if status != self._status:
            self._status = status
            self.send(f"STATUS={_one_line(status)}")

    def stopping(self) -> None:
        """Tell systemd the service is shutting down."""
        self.send("STOPPING=1", "STATUS=Stopping")

    def start_watchdog(self) -> None:
        """Ping the watchdog from this event loop, so a loop that hangs stops the pings and gets restarted."""
        if self.enabled and self.interval is not None and self._watchdog is None:
            log.debug("systemd watchdog: pinging every %.3g s", self.interval)
            self._watchdog = asyncio.create_task(self._ping(self.interval), name="systemd-watchdog")

    async def close(self) -> None:
        """Stop the watchdog pings and close the socket."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _ping(self, interval: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)


def status_line(summary: str, online: bool, reason: str | None = None) -> str:
    """The STATUS= text: the health summary, and while XMPP is down, why (when known and not already said).

    `Greenhouse: 3/3 devices OK (XMPP login refused: wrong password for gw@example.org)`.
    """
    if online:
        return summary
    if not reason or reason.partition(": ")[2] in summary:
        return f"{summary} (XMPP offline)"
    return f"{summary} ({reason})"


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value assignment.
    return " ".join(text.splitlines())
