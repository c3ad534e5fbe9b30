"""Watches and alerts: edge-triggered conditions on fields and devices.

`watch weather.temp > 30 hysteresis 0.5 interval 5m`, `watch plug.power change`,
`watch weather offline`. A watch sends one alert when its condition becomes
true and one when it clears; `ack` silences a firing watch until it clears.
Device health changes go to contacts whose `alerts` setting asks for them,
debounced: a new state is told once it has lasted `health_debounce` seconds, and
a device whose link flaps gets one summary instead of a message per flap.
Watches, and which firing watches are acknowledged, are persisted in the
state folder and survive a restart.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .config import Config
from .hub import Field, Health, HealthState, Hub, Node, NodeEvent, Reading
from .state import SaveError, StateDir
from .values import BadValue, Value, age, coerce, fmt, parse_duration

log = logging.getLogger("iot_gateway.watches")

OPS: dict[str, Callable[[Value, Value], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
DEFAULT_INTERVAL = 60.0  # seconds between repeated alerts of one watch
MAX_WATCHES = 200  # in all; each contact has a quota too ([gateway] watches_per_contact / _admin)
STATE_FILE = "watches.json"
# A device that went from ok to a problem FLAP_COUNT times within FLAP_WINDOW seconds is
# flapping: one summary, then quiet until it has kept one state for FLAP_QUIET debounce periods.
FLAP_COUNT = 5
FLAP_WINDOW = 600.0
FLAP_QUIET = 6
BAD = (Health.OFFLINE, Health.ERROR, Health.STALE)


class WatchError(ValueError):
    """A watch that cannot be created or changed; the message says why."""


@dataclass
class Watch:
    """One condition a contact asked to be told about."""

    id: int
    owner: str
    target: str  # device.field, or device for `offline`
    kind: str  # "compare", "change" or "offline"
    op: str = ""
    threshold: Value | None = None
    hysteresis: float = 0.0
    interval: float = DEFAULT_INTERVAL
    interval_text: str = ""  # the interval as the user typed it (`5m`), echoed back as given
    acked: bool = field(default=False, compare=False)  # persisted: an ack survives a restart
    # Runtime state, not persisted.
    firing: bool = field(default=False, compare=False)
    last_sent: float = field(default=0.0, compare=False)
    last_value: Value | None = field(default=None, compare=False)
    notified: bool = field(default=False, compare=False)

    def describe(self) -> str:
        """The watch as the user typed it."""
        if self.kind == "compare":
            text = f"{self.target} {self.op} {fmt(self.threshold)}"
            if self.hysteresis:
                text += f" hysteresis {fmt(self.hysteresis)}"
        else:
            text = f"{self.target} {self.kind}"
        if self.interval_text:
            text += f" interval {self.interval_text}"
        elif self.interval != DEFAULT_INTERVAL:
            text += f" interval {self.interval:g}s"
        return text

    def to_json(self) -> dict[str, object]:
        """What is persisted: the definition and the ack, not the runtime state."""
        d = asdict(self)
        for k in ("firing", "last_sent", "last_value", "notified"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class Alert:
    """A message for some contacts (and the rooms), stamped with when it happened."""

    text: str
    time: float
    to: tuple[str, ...]
    watch_id: int | None = None


Sink = Callable[[Alert], None]


@dataclass
class Told:
    """What contacts last heard of one device's health, and its recent problems (monotonic times)."""

    said: str = "ok"  # "ok", or the problem as described (`offline (LWT)`)
    changed: float = 0.0  # when its health last changed
    downs: deque[tuple[float, Health]] = field(default_factory=deque)  # ok → problem, within FLAP_WINDOW
    flapping: float | None = None  # when it was found flapping; None while it is not
    summarised: bool = False  # the flapping summary went out
    timer: asyncio.TimerHandle | None = None


class Watches:
    """Evaluates watches on every reading and health change, and sends alerts to the sinks."""

    def __init__(self, hub: Hub, config: Config, state: StateDir):
        self.hub = hub
        self.config = config
        self.state = state
        self.watches: dict[int, Watch] = {}
        self.next_id = 1
        self.sinks: list[Sink] = []
        self._held: list[Alert] | None = None  # alerts raised while a new watch is primed
        # Watches whose device or field is not there (removed at run time, or not discovered
        # yet after a restart) -> what their owner was told ("" when nothing yet).
        self._missing: dict[int, str] = {}
        hub.subscribe(self, node=self._on_node)
        self.debounce = config.gateway.health_debounce
        self._told: dict[str, Told] = {}
        self._load()
        hub.subscribe(self, reading=self._on_reading, health=self._on_health, node=self._follow)

    # ------------------------------------------------------------ management

    def parse(self, owner: str, words: list[str]) -> Watch:
        """Build (not add) a watch from `watch` command words; WatchError if they make no sense."""
        if not words:
            raise WatchError("Say what to watch")
        target, rest = words[0], words[1:]
        opts: dict[str, str] = {}
        # Trailing options: hysteresis X, interval D.
        while len(rest) >= 2 and rest[-2].lower() in ("hysteresis", "interval"):
            opts[rest[-2].lower()] = rest[-1]
            rest = rest[:-2]
        interval = DEFAULT_INTERVAL
        if "interval" in opts:
            try:
                interval = parse_duration(opts["interval"])
            except BadValue as e:
                raise WatchError(str(e)) from None
        if "." not in target:
            node = self.hub.node(target)
            if [w.lower() for w in rest] != ["offline"]:
                raise WatchError(f"For a device say `watch {node.id} offline`; for a value, `watch {node.id}.FIELD > 30`")
            if "hysteresis" in opts:
                raise WatchError("hysteresis only applies to comparisons")
            return Watch(0, owner, node.id, "offline", interval=interval, interval_text=opts.get("interval", ""))
        f = self.hub.field(target)
        if [w.lower() for w in rest] == ["change"]:
            if "hysteresis" in opts:
                raise WatchError("hysteresis only applies to comparisons")
            return Watch(0, owner, f.ref, "change", interval=interval, interval_text=opts.get("interval", ""))
        if len(rest) != 2 or rest[0] not in OPS:
            raise WatchError(
                "Say a comparison (> >= < <= == !=) and a value, `change`, or for a device `offline`"
            )
        op, raw = rest
        try:
            threshold = coerce(f.spec.type, raw)
        except BadValue as e:
            raise WatchError(f"{f.ref} {e}") from None
        if f.spec.type in ("boolean", "string") and op not in ("==", "!="):
            raise WatchError(f"{f.ref} is {f.spec.type}: only == and != apply")
        hyst = 0.0
        if "hysteresis" in opts:
            try:
                hyst = float(opts["hysteresis"])
            except ValueError:
                raise WatchError(f"hysteresis must be a number, got {opts['hysteresis']!r}") from None
            if not 0 <= hyst < 1e12 or op in ("==", "!="):
                raise WatchError("hysteresis must be a positive number and only applies to > >= < <=")
        return Watch(0, owner, f.ref, "compare", op, threshold, hyst, interval, opts.get("interval", ""))

    def add(self, watch: Watch) -> Watch:
        """Register a parsed watch, give it an id, persist, and evaluate it against the current state."""
        for w in self.watches.values():
            if w.owner == watch.owner and _definition(w) == _definition(watch):
                raise WatchError(f"You already have this watch as #{w.id}")
        quota = self.quota(watch.owner)
        mine = [w.id for w in self.watches.values() if w.owner == watch.owner]
        if len(mine) >= quota:
            contact = self.config.contact(watch.owner)
            role = contact.role if contact is not None else "viewer"
            raise WatchError(
                f"You have {len(mine)} watch{'' if len(mine) == 1 else 'es'}, your quota as {role} ({quota}); "
                + (f"free one with `unwatch ID` (e.g. unwatch {mine[0]})" if mine else "ask an admin")
            )
        if len(self.watches) >= MAX_WATCHES:
            raise WatchError(
                f"The gateway holds its most watches ({MAX_WATCHES}) in all; "
                "free one of yours with `unwatch ID`, or ask an admin"
            )
        watch.id = self.next_id
        self.next_id += 1
        self.watches[watch.id] = watch
        self._save()
        # A watch that holds already alerts at once, but after the command's reply
        # ("Watch #1 set"): its alerts wait for the next turn of the event loop.
        self._held = []
        try:
            self._prime(watch)
        finally:
            held, self._held = self._held, None
        if held:
            try:
                asyncio.get_running_loop().call_soon(self._emit_all, held)
            except RuntimeError:  # no event loop (a script): nothing to wait for
                self._emit_all(held)
        return watch

    def quota(self, jid: str) -> int:
        """How many watches `jid` may have: `watches_per_admin` for admins, `watches_per_contact` for others."""
        contact = self.config.contact(jid)
        g = self.config.gateway
        return g.watches_per_admin if contact is not None and contact.role == "admin" else g.watches_per_contact

    def remove(self, watch_id: int, jid: str, admin: bool) -> Watch:
        """Delete a watch; only its owner or an admin may."""
        w = self._get(watch_id, jid, admin)
        del self.watches[watch_id]
        self._save()
        return w

    def ack(self, watch_id: int, jid: str, admin: bool) -> Watch:
        """Silence a firing watch until it clears."""
        w = self._get(watch_id, jid, admin)
        if not w.firing:
            raise WatchError(f"#{w.id} is not firing")
        w.acked = True
        self._save()
        return w

    @property
    def unsaved(self) -> SaveError | None:
        """Why the watches in memory are not all on disk, or None when they are."""
        return self.state.error(STATE_FILE)

    def visible(self, jid: str, admin: bool) -> list[Watch]:
        """The watches a contact may see: their own, or all for an admin."""
        return [w for w in self.watches.values() if admin or w.owner == jid]

    def stop(self) -> None:
        """Stop listening to the hub and cancel the pending health checks (the gateway is stopping:
        its devices' last changes are not news)."""
        self.hub.unsubscribe_all(self)
        for told in self._told.values():
            if told.timer is not None:
                told.timer.cancel()
                told.timer = None

    def _get(self, watch_id: int, jid: str, admin: bool) -> Watch:
        w = self.watches.get(watch_id)
        if w is None or not (admin or w.owner == jid):
            raise WatchError(f"No watch #{watch_id} of yours")
        return w

    # ------------------------------------------------------------ persistence

    def _load(self) -> None:
        data = self.state.load(STATE_FILE, {})
        self.next_id = int(data.get("next_id", 1)) if isinstance(data, dict) else 1
        for raw in data.get("watches", []) if isinstance(data, dict) else []:
            try:
                w = Watch(**raw)
                if w.acked:
                    # It was firing and acknowledged: it stays silent until it clears,
                    # and its clearing is announced (the alert was sent before the restart).
                    w.firing = w.notified = True
                if self._later(w.target):
                    self._missing[w.id] = ""  # a discovered device: back once its bridge lists it
                elif w.kind == "offline":
                    self.hub.node(w.target)
                else:
                    self.hub.field(w.target)
            except Exception as e:
                log.warning("dropping stored watch %r: %s", raw, e)
                continue
            self.watches[w.id] = w
            self.next_id = max(self.next_id, w.id + 1)

    def _save(self) -> None:
        """Write the watches; on failure `unsaved` says why (the state folder logs it, once)."""
        try:
            self.state.save(
                STATE_FILE,
                {"next_id": self.next_id, "watches": [w.to_json() for w in self.watches.values()]},
            )
        except SaveError:
            pass

    # ------------------------------------------------------------ devices that come and go

    def _later(self, target: str) -> bool:
        """Whether `target` may appear after start: it is not there now, and a driver discovers devices."""
        node = self.hub.nodes.get(_node_of(target))
        there = node is not None and ("." not in target or target.partition(".")[2] in node.fields)
        return not there and any(getattr(d, "discovers", False) for d in self.config.devices)

    def missing(self, watch_id: int) -> bool:
        """True while a watch's device or field is gone (it waits for it to come back)."""
        return watch_id in self._missing

    def _on_node(self, event: NodeEvent) -> None:
        """A device was added, removed, renamed or changed at run time: its watches follow, and
        the owner of a watch whose device or field went away is told, not left with a silent watch."""
        node = event.node
        if event.kind == "renamed":
            moved = False
            for w in self.watches.values():
                if _node_of(w.target) == event.old_id:
                    old = w.target
                    w.target = node.id + w.target[len(event.old_id):]
                    moved = True
                    why = f" ({event.why})" if event.why else ""
                    self._emit(Alert(f"#{w.id} now watches {w.target}: {old} was renamed{why}", time.time(), (w.owner,), w.id))
            if moved:
                self._save()
            return
        for w in list(self.watches.values()):
            if _node_of(w.target) != node.id:
                continue
            present = event.kind != "removed" and ("." not in w.target or w.target.partition(".")[2] in node.fields)
            if not present:
                if self._missing.get(w.id):
                    continue  # its owner knows already
                what = "device" if event.kind == "removed" or "." not in w.target else "field"
                why = f" ({event.why})" if event.why else ""
                self._missing[w.id] = f"{w.target} is gone"
                w.firing, w.notified = False, False
                self._emit(Alert(f"#{w.id} {w.describe()}: the {what} {w.target} is gone{why}; the watch waits "
                                 f"for it to come back. Remove it with: unwatch {w.id}", time.time(), (w.owner,), w.id))
            elif w.id in self._missing:
                if self._missing.pop(w.id):
                    self._emit(Alert(f"#{w.id} {w.target} is back: watching again", time.time(), (w.owner,), w.id))
                try:
                    self._prime(w)
                except Exception as e:  # the field came back with another type
                    log.warning("watch #%s on %s not primed: %s", w.id, w.target, e)

    # ------------------------------------------------------------ evaluation

    def _prime(self, w: Watch) -> None:
        """Take the current state as the starting point, so a new watch fires at once if true."""
        if w.kind == "offline":
            self._health_watch(w, self.hub.node(w.target), time.time())
        else:
            f = self.hub.field(w.target)
            if w.kind == "change":
                w.last_value = f.latest.value if f.latest else None
            elif f.latest is not None:
                self._compare(w, f, f.latest)

    def _on_reading(self, f: Field, r: Reading) -> None:
        ref = f.ref
        for w in list(self.watches.values()):
            if w.target != ref:
                continue
            if w.kind == "compare":
                self._compare(w, f, r)
            elif w.kind == "change":
                if w.last_value is not None and r.value != w.last_value:
                    self._send(w, f"#{w.id} {ref} changed: {fmt(w.last_value, f.spec.decimals)} → "
                               f"{fmt(r.value, f.spec.decimals)}{_unit(f)}", r.time, repeat=True)
                w.last_value = r.value

    def _compare(self, w: Watch, f: Field, r: Reading) -> None:
        value = r.value
        try:
            true_now = OPS[w.op](value, w.threshold)
        except TypeError:
            return
        if not w.firing and true_now:
            w.firing, w.acked = True, False
            self._send(w, f"ALERT #{w.id} {w.describe()}: {_now(f, value)}", r.time)
        elif w.firing and not true_now and self._cleared(w, value):
            self._clear(w)
            if w.notified:
                self._send(w, f"CLEARED #{w.id} {w.describe()}: {_now(f, value)}", r.time, clear=True)

    @staticmethod
    def _cleared(w: Watch, value: Value) -> bool:
        if not w.hysteresis or not isinstance(value, (int, float)):
            return True
        t = float(w.threshold)  # type: ignore[arg-type]
        if w.op in (">", ">="):
            return value < t - w.hysteresis
        return value > t + w.hysteresis

    def _on_health(self, node: Node, old: HealthState) -> None:
        """A device's health changed: tell contacts (and offline watches) once the new state has
        lasted `health_debounce` seconds; a flapping device gets one summary instead."""
        s = self._told.setdefault(node.id, Told())
        if self.debounce <= 0:
            self._tell(node, s)
            return
        now = time.monotonic()
        s.changed = now
        if node.health.state in BAD and old.state not in BAD:
            s.downs.append((now, node.health.state))
        while s.downs and now - s.downs[0][0] > FLAP_WINDOW:
            s.downs.popleft()
        if s.flapping is None and len(s.downs) >= FLAP_COUNT:
            s.flapping = now
        self._schedule(node, s)

    def _follow(self, event: NodeEvent) -> None:
        """What contacts heard of a device follows it when renamed; a removed one's pending news is dropped."""
        if event.kind == "renamed" and event.old_id in self._told:
            self._told[event.node.id] = self._told.pop(event.old_id)
        elif event.kind == "removed":
            s = self._told.pop(event.node.id, None)
            if s is not None and s.timer is not None:
                s.timer.cancel()

    def _due(self, s: Told) -> float:
        """When a device's pending health news is due (monotonic)."""
        if s.flapping is not None and not s.summarised:
            return s.flapping + self.debounce  # how it is once the burst has gone on a while
        if s.flapping is not None:
            return s.changed + FLAP_QUIET * self.debounce
        return s.changed + self.debounce

    def _schedule(self, node: Node, s: Told) -> None:
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a script): nothing to wait with
            self._tell(node, s)
            return
        s.timer = loop.call_later(max(0.0, self._due(s) - time.monotonic()), self._check, node, s)

    def _check(self, node: Node, s: Told) -> None:
        """A device's health news is due: the flapping summary, or its state if contacts heard another."""
        s.timer = None
        if s.flapping is not None and not s.summarised:
            s.summarised = True
            self._summarise(node, s)
            self._schedule(node, s)  # quiet until it has kept one state a while
            return
        if s.flapping is not None:  # stable again: tell how it ended up; count flaps anew
            s.flapping, s.summarised = None, False
            s.downs.clear()
        self._tell(node, s)

    def _tell(self, node: Node, s: Told) -> None:
        """Tell the device's current health, unless it is what contacts heard last (or not news)."""
        h = node.health
        said = _said(h)
        if said is None or said == s.said:
            return  # starting up is not news; nor is a state they know
        s.said = said
        for w in list(self.watches.values()):
            if w.kind == "offline" and w.target == node.id:
                self._health_watch(w, node, h.since)
        text = f"{node.id}: back to ok" if h.healthy else f"{node.id}: {h.describe()}"
        self._emit(Alert(text, h.since, self._health_contacts()))

    def _summarise(self, node: Node, s: Told) -> None:
        """One message for a burst of flaps, to everyone who would have heard of each flap."""
        now = time.monotonic()
        h = node.health
        kinds = {state for _t, state in s.downs}
        word = kinds.pop().value if len(kinds) == 1 else "not ok"
        text = (f"{node.id}: flapping: {word} {len(s.downs)} times in the last {age(now - s.downs[0][0])}; "
                f"now {h.describe()}")
        to = set(self._health_contacts())
        bad = h.state in BAD
        for w in list(self.watches.values()):
            if w.kind != "offline" or w.target != node.id or w.acked:
                continue
            to |= {w.owner} | {c.jid for c in self.config.contacts if c.alert_level == "all"}
            # The summary told its owner how the device is now: the watch follows, silently.
            if bad and not w.firing:
                w.firing, w.notified, w.last_sent = True, True, now
            elif w.firing and h.healthy:
                self._clear(w)
        said = _said(h)
        if said is not None:
            s.said = said
        self._emit(Alert(text, time.time(), tuple(sorted(to))))

    def _health_contacts(self) -> tuple[str, ...]:
        return tuple(c.jid for c in self.config.contacts if c.alert_level in ("all", "health"))

    def _health_watch(self, w: Watch, node: Node, now: float) -> None:
        bad = node.health.state in BAD
        if bad and not w.firing:
            w.firing, w.acked = True, False
            self._send(w, f"ALERT #{w.id} {node.id} is {node.health.describe()}", now)
        elif not bad and w.firing and node.health.healthy:
            self._clear(w)
            if w.notified:
                self._send(w, f"CLEARED #{w.id} {node.id} is back to ok", now, clear=True)

    def _clear(self, w: Watch) -> None:
        was_acked = w.acked
        w.firing, w.acked = False, False
        if was_acked:
            self._save()  # the stored ack no longer applies

    def _send(self, w: Watch, text: str, at: float, repeat: bool = False, clear: bool = False) -> None:
        now = time.monotonic()
        if not clear:
            if w.acked or (w.last_sent and now - w.last_sent < w.interval):
                log.info("alert suppressed (acknowledged, or within the interval): %s", text)
                if not repeat:
                    w.notified = False  # so its clearing is not announced either
                return
            w.last_sent = now
            w.notified = True
        to = {w.owner} | {c.jid for c in self.config.contacts if c.alert_level == "all"}
        self._emit(Alert(text, at, tuple(sorted(to)), w.id))

    def _emit_all(self, alerts: list[Alert]) -> None:
        for a in alerts:
            self._emit(a)

    def _emit(self, alert: Alert) -> None:
        if self._held is not None:
            self._held.append(alert)
            return
        log.info("alert: %s", alert.text)
        for sink in self.sinks:
            try:
                sink(alert)
            except Exception:
                log.exception("alert sink failed")


def _said(h: HealthState) -> str | None:
    """A health as contacts are told it: "ok", the problem, or None for `starting` (not news)."""
    if h.state is Health.STARTING:
        return None
    return "ok" if h.healthy else h.describe()


def _node_of(target: str) -> str:
    return target.partition(".")[0]


def _definition(w: Watch) -> dict[str, object]:
    return w.to_json() | {"id": 0, "acked": False, "interval_text": ""}


def _unit(f: Field) -> str:
    return f" {f.spec.unit}" if f.spec.unit else ""


def _now(f: Field, value: Value) -> str:
    return f"now {fmt(value, f.spec.decimals)}{_unit(f)}"
