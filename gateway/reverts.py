"""Timed sets: `set device.field value for 10m` reverts by itself when the time is up.

Pending reverts are persisted in the state folder, so a restart does not leave
a heater on that was meant to run for ten minutes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .auth import Actor
from .hub import Hub
from .state import StateDir
from .values import Value, fmt
from .watches import Alert

log = logging.getLogger("iot_gateway.reverts")

STATE_FILE = "reverts.json"


@dataclass
class Revert:
    """Put `ref` back to `value` at `due` (Unix time), on behalf of `jid`."""

    ref: str
    value: Value | None
    due: float
    jid: str
    role: str


class Reverts:
    """Pending reverts, one per field at most; each runs as a timer on the loop."""

    def __init__(self, hub: Hub, state: StateDir):
        self.hub = hub
        self.state = state
        self.pending: dict[str, Revert] = {}
        self.sinks: list[Callable[[Alert], None]] = []
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def start(self) -> None:
        """Load stored reverts and arm their timers (overdue ones run at once)."""
        raw = self.state.load(STATE_FILE, [])
        for item in raw if isinstance(raw, list) else []:
            try:
                r = Revert(**item)
                self.hub.field(r.ref)
            except Exception as e:
                log.warning("dropping stored revert %r: %s", item, e)
                continue
            self.pending[r.ref] = r
            self._arm(r)

    def stop(self) -> None:
        """Disarm timers; pending reverts stay on disk for the next start."""
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()

    def add(self, ref: str, value: Value | None, seconds: float, actor: Actor) -> Revert:
        """Schedule putting `ref` back to `value` in `seconds`; replaces a pending one."""
        self.cancel(ref)
        r = Revert(ref, value, time.time() + seconds, actor.jid, actor.role)
        self.pending[ref] = r
        self._save()
        self._arm(r)
        return r

    def cancel(self, ref: str) -> Revert | None:
        """Drop the pending revert of `ref`, if any."""
        h = self._timers.pop(ref, None)
        if h is not None:
            h.cancel()
        r = self.pending.pop(ref, None)
        if r is not None:
            self._save()
        return r

    def _arm(self, r: Revert) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, r.due - time.time())
        self._timers[r.ref] = loop.call_later(delay, lambda: asyncio.ensure_future(self._run(r)))

    async def _run(self, r: Revert) -> None:
        if self.pending.get(r.ref) is not r:
            return
        self._timers.pop(r.ref, None)
        del self.pending[r.ref]
        self._save()
        if r.value is None:
            text = f"{r.ref}: time is up, but there was no earlier value to go back to"
        else:
            try:
                old, new = await self.hub.write(r.ref, r.value, Actor(r.jid, r.role, "timer"))
                text = f"{r.ref}: time is up, back to {fmt(new)} (was {fmt(old)})"
            except Exception as e:  # whatever it was, tell the owner rather than lose it
                text = f"{r.ref}: time is up, but going back to {fmt(r.value)} failed: {e}"
                log.error("%s", text)
        for sink in self.sinks:
            try:
                sink(Alert(text, time.time(), (r.jid,)))
            except Exception:
                log.exception("revert sink failed")

    def _save(self) -> None:
        try:
            self.state.save(STATE_FILE, [asdict(r) for r in self.pending.values()])
        except OSError as e:
            log.error("cannot save pending reverts to %s: %s", self.state.path, e)
