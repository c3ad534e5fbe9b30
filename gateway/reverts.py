"""Timed sets: `set device.field value for 10m` reverts by itself when the time is up.

Pending reverts are persisted in the state folder, so a restart does not leave
a heater on that was meant to run for ten minutes. A revert the device cannot
take right now (broker down, device offline, no answer) is kept, persisted and
retried with backoff, and at once when the device is back to ok, until it
applies or a newer `set` of the field replaces it; the owner is told when it
first fails and when it finally applies. A revert the hub refuses (the value is
out of bounds under a changed config, the field is gone or read-only, the role
no longer allows it) will never apply, so it is dropped and the owner told why.

A newer set of the field from any entry point (chat, room, ad-hoc, XEP-0325)
cancels its pending revert: Reverts listens to the hub's applied writes.

A revert whose device is not there (yet) is kept too: devices found on the
network (Zigbee2MQTT, Tasmota) appear a moment after a restart, or come back
after being unplugged; it runs as soon as the device appears, and is given up
(the owner told) only after WAIT_FOR_DEVICE.

Countdowns run on the monotonic clock; the wall-clock `due` is only what is
stored for the next start, so a clock stepped by NTP neither shortens nor
stretches a timed set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .auth import Actor, Forbidden
from .hub import Field, Health, HealthState, Hub, Node, NodeEvent, NotWritable, UnknownField
from .state import SaveError, StateDir
from .values import BadValue, Value, age, fmt
from .watches import Alert

log = logging.getLogger("iot_gateway.reverts")

STATE_FILE = "reverts.json"
RETRY_FIRST = 2.0  # seconds after the first failed try
RETRY_MAX = 60.0  # the backoff doubles up to this
# Refusals by the hub's own checks, before any I/O: trying again cannot help
# (an unknown field of a device that is not there is the exception: see _absent).
PERMANENT = (Forbidden, BadValue, NotWritable, UnknownField)
WAIT_FOR_DEVICE = 86_400.0  # seconds a revert waits for its device to appear before it is given up


class DeviceAbsent(Exception):
    """The revert's device is not in the hub: it may appear (a discovered device), so try again."""


@dataclass
class Revert:
    """Put `ref` back to `value` at `due` (Unix time), on behalf of `jid`.

    After a failed try, `due` is the next try, `tries` counts the failures and
    `error` is the latest one. `at` is the same moment on the monotonic clock,
    which is what the timer and the countdown use; `due` is only stored.
    """

    ref: str
    value: Value | None
    due: float
    jid: str
    role: str
    tries: int = 0
    error: str = ""
    failing_since: float = 0.0  # Unix time of the first failed try (0: none)
    at: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        if not self.at:
            self.at = time.monotonic() + (self.due - time.time())

    def left(self) -> float:
        """Seconds until it is due (monotonic)."""
        return self.at - time.monotonic()

    def stored(self) -> dict[str, object]:
        """What is saved: `due` recomputed from the monotonic deadline, in case the wall clock stepped."""
        d = asdict(self)
        d.pop("at")
        d["due"] = time.time() + self.left()
        return d

    def describe(self, now: float | None = None) -> str:
        """One line for `status` (`now` is ignored: the countdown is monotonic)."""
        if not self.tries:
            return f"pending: {self.ref} back to {fmt(self.value)} in {age(self.left())} (set by {self.jid})"
        return (
            f"retrying: {self.ref} back to {fmt(self.value)}, {self.tries} "
            f"{'try' if self.tries == 1 else 'tries'} failed ({self.error}), "
            f"next in {age(self.left())} (set by {self.jid})"
        )


class Reverts:
    """Pending reverts, one per field at most; each runs as a timer on the loop."""

    def __init__(self, hub: Hub, state: StateDir):
        self.hub = hub
        self.state = state
        self.pending: dict[str, Revert] = {}
        self.sinks: list[Callable[[Alert], None]] = []
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # The revert a write just cancelled, with that write's actor: `taken` hands it to the chat `set`.
        self._replaced: dict[str, tuple[Actor, Revert]] = {}

    def start(self) -> None:
        """Load stored reverts and arm their timers (overdue ones run at once)."""
        self.hub.subscribe(self, health=self._on_health, write=self._on_write, node=self._on_node)
        if self.state.readonly is not None:
            # They belong to the process that owns the folder: it runs them.
            log.info("stored timed reverts are left to the process that owns %s", self.state.path)
            return
        raw = self.state.load(STATE_FILE, [])
        for item in raw if isinstance(raw, list) else []:
            try:
                r = Revert(**item)
                if not self._absent(r.ref):
                    self.hub.field(r.ref)
            except Exception as e:
                log.warning("dropping stored revert %r: %s", item, e)
                continue
            self.pending[r.ref] = r
            self._arm(r)

    async def stop(self) -> None:
        """Disarm timers and wait out a try in flight; pending reverts stay on disk for the next start."""
        self.hub.unsubscribe_all(self)
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def add(self, ref: str, value: Value | None, seconds: float, actor: Actor) -> Revert:
        """Schedule putting `ref` back to `value` in `seconds`; replaces a pending one.

        Check `unsaved` afterwards: the revert runs either way, but survives a restart only if saved.
        """
        self._drop(ref)
        r = Revert(ref, value, time.time() + seconds, actor.jid, actor.role, at=time.monotonic() + seconds)
        self.pending[ref] = r
        self._save()
        self._arm(r)
        return r

    def origin(self, ref: str, new: Value) -> Value | None:
        """Where a timed set of `ref` to `new` goes back to: the value a pending timed set of it
        would go back to, else its last reading, else its configured safe value, else for a
        boolean the opposite of `new`; None when there is nothing to go back to."""
        pending = self.pending.get(ref)
        if pending is not None and pending.value is not None:
            return pending.value
        f = self.hub.field(ref)
        if f.latest is not None:
            return f.latest.value
        if f.spec.safe is not None:
            return f.spec.safe
        if f.spec.type == "boolean" and isinstance(new, bool):
            return not new
        return None

    def cancel(self, ref: str) -> Revert | None:
        """Drop the pending (or retrying) revert of `ref`, if any."""
        r = self._drop(ref)
        if r is not None:
            self._save()
        return r

    def taken(self, ref: str, actor: Actor) -> Revert | None:
        """The pending revert of `ref` that `actor`'s write just cancelled, if any (asked once, right after the write)."""
        item = self._replaced.pop(ref, None)
        return item[1] if item is not None and item[0] is actor else None

    def _on_write(self, f: Field, old: Value | None, new: Value, actor: Actor) -> None:
        """A newer set of a field, from whichever entry point, cancels its pending revert."""
        self._replaced.pop(f.ref, None)
        if actor.via == "timer" or f.ref not in self.pending:
            return
        r = self._drop(f.ref)
        assert r is not None
        self._replaced[f.ref] = (actor, r)
        self._save()
        log.info("%s: pending timed revert cancelled by a newer set from %s via %s", f.ref, actor.jid, actor.via)

    @property
    def unsaved(self) -> SaveError | None:
        """Why the pending reverts in memory are not all on disk, or None when they are."""
        return self.state.error(STATE_FILE)

    def _drop(self, ref: str) -> Revert | None:
        h = self._timers.pop(ref, None)
        if h is not None:
            h.cancel()
        return self.pending.pop(ref, None)

    def _arm(self, r: Revert) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, r.left())
        self._timers[r.ref] = loop.call_later(delay, self._spawn, r)

    def _spawn(self, r: Revert) -> None:
        self._timers.pop(r.ref, None)
        task = asyncio.create_task(self._run(r), name=f"revert:{r.ref}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("timed revert failed unexpectedly", exc_info=task.exception())

    def _on_health(self, node: Node, old: HealthState) -> None:
        """A device back to ok: retry its failed reverts now rather than at the next backoff."""
        if node.health.state is not Health.OK:
            return
        for r in list(self.pending.values()):
            if r.tries and r.ref.split(".", 1)[0] == node.id and r.ref in self._timers:
                self._timers.pop(r.ref).cancel()
                self._spawn(r)

    def _absent(self, ref: str) -> bool:
        """Whether `ref`'s device is not in the hub (it may appear later), as opposed to a field it lacks."""
        return ref.split(".", 1)[0] not in self.hub.nodes

    def _on_node(self, event: NodeEvent) -> None:
        """A device appeared (discovered, or back): run its reverts that were waiting for it now."""
        if event.kind not in ("added", "renamed"):
            return
        for r in list(self.pending.values()):
            if r.tries and r.ref.split(".", 1)[0] == event.node.id and r.ref in self._timers:
                self._timers.pop(r.ref).cancel()
                self._spawn(r)

    async def _run(self, r: Revert) -> None:
        if self.pending.get(r.ref) is not r:
            return
        if r.value is None:  # stored by an older version, which switched without knowing where back was
            f = None if self._absent(r.ref) else self.hub.nodes[r.ref.split(".", 1)[0]].fields.get(r.ref.split(".", 1)[1])
            if f is None or f.spec.safe is None:
                self._finish(r, f"{r.ref}: time is up, but there was no earlier value to go back to")
                return
            r.value = f.spec.safe
        try:
            if self._absent(r.ref):
                if r.failing_since and time.time() - r.failing_since > WAIT_FOR_DEVICE:
                    text = (
                        f"{r.ref}: going back to {fmt(r.value)} is given up: "
                        f"{r.ref.split('.', 1)[0]} has not been here for {age(WAIT_FOR_DEVICE)}"
                    )
                    log.error("%s", text)
                    self._finish(r, text)
                    return
                raise DeviceAbsent(f"{r.ref.split('.', 1)[0]} is not here (yet)")
            old, new = await self.hub.write(r.ref, r.value, Actor(r.jid, r.role, "timer"))
        except PERMANENT as e:
            text = f"{r.ref}: time is up, but going back to {fmt(r.value)} was refused: {e}; it stays as it is"
            log.error("%s", text)
            self._finish(r, text)
            return
        except Exception as e:  # the device, not the request: it may work later
            if self.pending.get(r.ref) is not r:
                return  # replaced while the write was in flight
            r.tries += 1
            r.error = str(e)
            r.failing_since = r.failing_since or time.time()
            wait = min(RETRY_MAX, RETRY_FIRST * 2 ** (r.tries - 1))
            r.due, r.at = time.time() + wait, time.monotonic() + wait
            self._save()
            self._arm(r)
            if r.tries == 1:
                text = (
                    f"{r.ref}: time is up, but going back to {fmt(r.value)} failed: {e}. "
                    "Retrying until it works; status shows it"
                )
                log.error("%s", text)
                self._tell(r, text)
            else:
                log.info("%s: revert try %d failed: %s", r.ref, r.tries, e)
            return
        if self.pending.get(r.ref) is not r:
            return
        text = f"{r.ref}: time is up, back to {fmt(new)} (was {fmt(old)})"
        if r.tries:
            text = f"{r.ref}: back to {fmt(new)} (was {fmt(old)}), applied after {r.tries} failed " + (
                "try" if r.tries == 1 else "tries"
            )
            log.info("%s", text)
        self._finish(r, text)

    def _finish(self, r: Revert, text: str) -> None:
        if self.pending.get(r.ref) is r:
            self._drop(r.ref)
            self._save()
        self._tell(r, text)

    def _tell(self, r: Revert, text: str) -> None:
        for sink in self.sinks:
            try:
                sink(Alert(text, time.time(), (r.jid,)))
            except Exception:
                log.exception("revert sink failed")

    def _save(self) -> None:
        """Write the pending reverts; on failure `unsaved` says why (the state folder logs it, once)."""
        try:
            self.state.save(STATE_FILE, [r.stored() for r in self.pending.values()])
        except SaveError:
            pass
