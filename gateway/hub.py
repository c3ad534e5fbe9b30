"""The sensor-data model: nodes (devices), fields, readings, history and health.

Data flows one way: drivers push readings and health into the hub; listeners
(XMPP session, console, alerts, XEP-0323) subscribe to what changes. Writes go
the other way, hub → driver, after authorization and validation here, so no
entry point can skip them.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from .audit import AuditLog
from .auth import Actor, Forbidden, Permission, require
from .noise import Noise
from .values import BadValue, Value, check_bounds, coerce, fmt

log = logging.getLogger("iot_gateway.hub")

WRITE_TIMEOUT = 10.0


class Health(StrEnum):
    """A device's state as listeners see it."""

    STARTING = "starting"
    OK = "ok"
    STALE = "stale"
    ERROR = "error"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of one field at one time (Unix seconds)."""

    value: Value
    time: float


@dataclass(frozen=True, slots=True)
class HealthState:
    """A device's health, why, and since when."""

    state: Health
    reason: str = ""
    since: float = 0.0

    @property
    def healthy(self) -> bool:
        """True when the device is delivering data."""
        return self.state is Health.OK

    def describe(self) -> str:
        """`ok`, or the state with its reason: `offline: serial port gone`, `offline (LWT)`."""
        if not self.reason:
            return self.state.value
        sep = " " if self.reason.startswith("(") else ": "
        return self.state.value + sep + self.reason


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong with the gateway itself rather than a device: `history: not saved: disk full`."""

    component: str
    message: str
    since: float = 0.0

    def describe(self) -> str:
        """`component: message`, as status, presence and alerts show it."""
        return f"{self.component}: {self.message}"


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """The metadata a driver declares for one field."""

    name: str
    type: str = "numeric"
    unit: str = ""
    decimals: int | None = None
    writable: bool = False
    min: float | None = None
    max: float | None = None
    description: str = ""
    # The only values a string field takes (an enum of a discovered device); checked on every write.
    choices: tuple[str, ...] = ()
    # The value the device's config calls safe (gpio `safe_value`): where a timed set with no
    # earlier reading goes back to.
    safe: Value | None = None


class History:
    """A field's last `maxlen` readings, oldest first, as a ring of times and values.

    Reading objects would cost about 100 bytes each, and a gateway keeps
    history_size of them for every field; here a numeric reading takes 16
    bytes (two doubles) and any other 16 bytes plus its value. Appending,
    len(), indexing and iteration work as on a deque of Readings.
    """

    __slots__ = ("_start", "_times", "_values", "maxlen")

    def __init__(self, maxlen: int, numeric: bool = False):
        self.maxlen = maxlen
        self._times = array("d")
        self._values: array[float] | list[Value] = array("d") if numeric else []
        self._start = 0  # where the oldest reading is, once the ring is full

    def append(self, reading: Reading) -> None:
        """Add the newest reading, dropping the oldest when full."""
        value = reading.value
        if isinstance(self._values, array) and type(value) is not float:
            self._values = list(self._values)  # not a number after all: keep any value
        if len(self._times) < self.maxlen:
            self._times.append(reading.time)
            self._values.append(value)
        else:
            i = self._start
            self._times[i] = reading.time
            self._values[i] = value
            self._start = (i + 1) % self.maxlen

    def take(self, times: "array[float]", values: "array[float] | list[Value]") -> None:
        """Hold these readings (oldest first; the newest `maxlen`) instead of any it held, keeping
        the arrays given rather than copies: a restart restores a full history this way (200
        fields of 1,000 readings took 0.5 s one append at a time, and copies built in the database
        thread stayed behind in its malloc arena, 2 MB)."""
        if len(times) != len(values):
            raise ValueError(f"{len(times)} times for {len(values)} values")
        if len(times) > self.maxlen:
            times, values = times[-self.maxlen:], values[-self.maxlen:]
        self._times = times
        self._values = values
        self._start = 0

    def __len__(self) -> int:
        return len(self._times)

    def __getitem__(self, index: int) -> Reading:
        n = len(self._times)
        if not -n <= index < n:
            raise IndexError("history index out of range")
        i = (self._start + index) % n
        return Reading(self._values[i], self._times[i])

    def __iter__(self) -> Iterator[Reading]:
        s = self._start
        times, values = self._times, self._values
        for t, v in zip(times[s:], values[s:]):
            yield Reading(v, t)
        for t, v in zip(times[:s], values[:s]):
            yield Reading(v, t)

    def since(self, start: float) -> tuple[list[float], list[Value]]:
        """(times, values) of the readings at or after `start`, oldest first: copied in C, so a
        day of readings is not turned into Reading objects on the event loop (plots)."""
        s = self._start
        times = self._times[s:] + self._times[:s]
        values = self._values[s:] + self._values[:s]
        i = bisect.bisect_left(times, start)
        return times[i:].tolist(), (values[i:].tolist() if isinstance(values, array) else values[i:])


@dataclass(eq=False)
class Field:
    """A field of a node: its metadata, latest reading and bounded history."""

    node: "Node"
    spec: FieldSpec
    history: History
    latest: Reading | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @cached_property
    def ref(self) -> str:
        """`device.field`, the name users type (built once: every reading's listeners ask for it;
        a renamed node forgets it)."""
        return f"{self.node.id}.{self.spec.name}"


@dataclass(eq=False)
class Node:
    """A device as the hub knows it."""

    id: str
    name: str
    driver: str
    stale_after: float | None = None
    fields: dict[str, Field] = field(default_factory=dict)
    health: HealthState = HealthState(Health.STARTING, "not started yet")
    last_seen: float | None = None  # wall clock, for display
    # Monotonic times for durations: a wall clock stepped back (a Pi without RTC
    # syncing its time) must not make a silent device look fresh.
    seen_at: float | None = None
    health_at: float = field(default_factory=time.monotonic)
    # True while `stale` is the hub's own verdict (no data for stale_after), which the next
    # reading ends; a driver's `stale` (a sensor failing among good ones) only the driver ends.
    hub_stale: bool = False

    def silent_for(self, now: float | None = None) -> float | None:
        """Seconds since the last reading (monotonic), or None when none has come yet."""
        if self.seen_at is None:
            return None
        return (time.monotonic() if now is None else now) - self.seen_at


@dataclass(frozen=True, slots=True)
class NodeEvent:
    """A device that appeared, went away, was renamed or changed its fields while the gateway runs.

    `kind` is "added", "removed", "renamed" (`old_id` is the id it had) or "changed" (`gone`
    names the fields it no longer has, `new` those it gained); `why` is for the user
    ("removed from Zigbee2MQTT").
    """

    kind: str
    node: Node
    old_id: str = ""
    gone: tuple[str, ...] = ()
    new: tuple[str, ...] = ()
    why: str = ""


class HubError(Exception):
    """Base of the hub's errors; messages are meant for the user."""


class UnknownField(HubError):
    """No such device or field."""


class NotWritable(HubError):
    """The field cannot be set."""


class DeviceError(HubError):
    """The device could not carry out a write."""


class Unconfirmed(DeviceError):
    """The command went out, but the device did not report the new state in time (audited `unconfirmed`)."""


ReadingListener = Callable[[Field, Reading], None]
HealthListener = Callable[[Node, HealthState], None]
# (component, new, old): new is None when the problem cleared, old None when it is new.
ProblemListener = Callable[[str, Problem | None, Problem | None], None]
# (field, old, new, actor) after a write was applied, from whatever entry point.
WriteListener = Callable[["Field", Value | None, Value, Actor], None]
NodeListener = Callable[[NodeEvent], None]
# A driver's write returns None when applied, or SENT when the command went out but the
# device reports no state to confirm it (MQTT without a state topic): audited `sent`.
Writer = Callable[[str, Value], Awaitable[str | None]]
SENT = "sent"


class Written(tuple):  # type: ignore[type-arg]
    """What Hub.write returns: (old, new) as a tuple, and `sent`, True when the command went out
    but nothing reports the device's state, so nobody can say it was applied."""

    sent: bool

    def __new__(cls, old: Value | None, new: Value, sent: bool = False) -> "Written":
        w = super().__new__(cls, (old, new))
        w.sent = sent
        return w


class Hub:
    """All nodes and fields; thread-safe for pushes, async for writes."""

    def __init__(self, history_size: int = 1000):
        self.history_size = history_size
        self.nodes: dict[str, Node] = {}
        self.audit = AuditLog()
        self._writers: dict[str, Writer] = {}
        self._reading_listeners: list[ReadingListener] = []
        self._health_listeners: list[HealthListener] = []
        # Gateway-wide problems by component (`history`, ...); devices have their health instead.
        self.problems: dict[str, Problem] = {}
        self.noise = Noise()  # causes whose log lines were held back (gateway.noise), for status
        self._problem_listeners: list[ProblemListener] = []
        self._write_listeners: list[WriteListener] = []
        self._node_listeners: list[NodeListener] = []
        self._owned: dict[int, list[Callable[..., None]]] = {}  # id(owner) -> its listeners
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None

    # ------------------------------------------------------------ building

    def add_node(
        self,
        node_id: str,
        name: str,
        driver: str,
        fields: Iterable[FieldSpec],
        stale_after: float | None = None,
        why: str = "",
    ) -> Node:
        """Declare a device and its fields; node listeners hear of it (a device discovered at run time)."""
        if node_id in self.nodes:
            raise ValueError(f"device {node_id!r} already exists")
        node = Node(node_id, name, driver, stale_after)
        node.health = HealthState(Health.STARTING, "not started yet", time.time())
        for spec in fields:
            node.fields[spec.name] = self._field(node, spec)
        self.nodes[node_id] = node
        self._tell(NodeEvent("added", node, new=tuple(node.fields), why=why))
        return node

    def _field(self, node: Node, spec: FieldSpec) -> Field:
        return Field(node, spec, History(self.history_size, spec.type == "numeric"))

    def remove_node(self, node_id: str, why: str = "") -> Node:
        """Forget a device that went away (unpaired); its writer goes too. UnknownField if there is none."""
        node = self.node(node_id)
        del self.nodes[node_id]
        self._writers.pop(node_id, None)
        node.health = HealthState(Health.OFFLINE, why or "removed", time.time())
        log.info("%s: removed%s", node_id, f" ({why})" if why else "")
        self._tell(NodeEvent("removed", node, gone=tuple(node.fields), why=why))
        return node

    def rename_node(self, old_id: str, new_id: str, name: str | None = None, why: str = "") -> Node:
        """Give a device a new id (and name), keeping its fields, history and writer."""
        node = self.node(old_id)
        if new_id != old_id:
            if new_id in self.nodes:
                raise ValueError(f"device {new_id!r} already exists")
            del self.nodes[old_id]
            node.id = new_id
            self.nodes[new_id] = node
            for f in node.fields.values():
                f.__dict__.pop("ref", None)  # the cached `device.field`
            writer = self._writers.pop(old_id, None)
            if writer is not None:
                self._writers[new_id] = writer
        if name is not None:
            node.name = name
        log.info("%s: renamed to %s%s", old_id, new_id, f" ({why})" if why else "")
        self._tell(NodeEvent("renamed", node, old_id=old_id, why=why))
        return node

    def update_fields(self, node_id: str, fields: Iterable[FieldSpec], why: str = "") -> NodeEvent | None:
        """Replace a device's fields (a new firmware, a changed definition): a field whose name
        stays keeps its history while its type does; the rest come and go. None when nothing changed."""
        node = self.node(node_id)
        specs = {s.name: s for s in fields}
        old = node.fields
        if {n: f.spec for n, f in old.items()} == specs and list(old) == list(specs):
            return None
        new_fields: dict[str, Field] = {}
        for name, spec in specs.items():
            f = old.get(name)
            if f is not None and f.spec.type == spec.type:
                f.spec = spec
                new_fields[name] = f
            else:
                new_fields[name] = self._field(node, spec)
        node.fields = new_fields
        event = NodeEvent(
            "changed",
            node,
            gone=tuple(n for n in old if n not in specs or new_fields[n] is not old[n]),
            new=tuple(n for n in specs if n not in old or new_fields[n] is not old[n]),
            why=why,
        )
        self._tell(event)
        return event

    def _tell(self, event: NodeEvent) -> None:
        for listener in self._node_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("node listener failed for %s", event.node.id)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach the hub to the event loop that owns it; pushes from other threads hop onto it."""
        self._loop = loop
        self._thread = threading.get_ident()

    def subscribe(
        self,
        owner: object = None,
        *,
        reading: ReadingListener | None = None,
        health: HealthListener | None = None,
        problem: ProblemListener | None = None,
        write: WriteListener | None = None,
        node: NodeListener | None = None,
    ) -> None:
        """Call `reading(field, reading)` on each new reading, `health(node, old)` on health changes,
        `problem(component, new, old)` when a gateway problem appears, changes or clears,
        `write(field, old, new, actor)` after a write was applied (any entry point),
        `node(event)` when a device is added, removed, renamed or changes its fields at run time.

        Listeners given with an `owner` (the object they belong to) all go with
        `unsubscribe_all(owner)`, so a part that stops leaves nothing behind."""
        for lst, listener in (
            (self._reading_listeners, reading),
            (self._health_listeners, health),
            (self._problem_listeners, problem),
            (self._write_listeners, write),
            (self._node_listeners, node),
        ):
            if listener is not None:
                lst.append(listener)
                if owner is not None:
                    self._owned.setdefault(id(owner), []).append(listener)

    def unsubscribe(self, callback: Callable[..., None]) -> None:
        """Stop calling a listener given to `subscribe`."""
        for lst in (
            self._reading_listeners,
            self._health_listeners,
            self._problem_listeners,
            self._write_listeners,
            self._node_listeners,
        ):
            if callback in lst:
                lst.remove(callback)

    def listeners(self) -> int:
        """How many listeners are subscribed, of every kind (a rebuilt session must not add to them)."""
        return sum(map(len, (
            self._reading_listeners,
            self._health_listeners,
            self._problem_listeners,
            self._write_listeners,
            self._node_listeners,
        )))

    def unsubscribe_all(self, owner: object) -> None:
        """Stop calling every listener subscribed under `owner` (nothing if there is none)."""
        for callback in self._owned.pop(id(owner), []):
            self.unsubscribe(callback)

    def set_writer(self, node_id: str, writer: Writer) -> None:
        """Route writes for `node_id` to a driver's async `writer(field, value)`."""
        self._writers[node_id] = writer

    # ------------------------------------------------------------ lookups

    def field(self, ref: str) -> Field:
        """The field named `device.field`; UnknownField otherwise."""
        node_id, dot, name = ref.partition(".")
        node = self.nodes.get(node_id)
        if node is None:
            raise UnknownField(f"no device {node_id!r}" + self._suggest(node_id, self.nodes))
        if not dot or not name:
            raise UnknownField(f"name a field of {node_id}: " + ", ".join(node.fields))
        f = node.fields.get(name)
        if f is None:
            raise UnknownField(
                f"{node_id} has no field {name!r}; it has: " + ", ".join(node.fields)
            )
        return f

    def node(self, node_id: str) -> Node:
        """The device `node_id`; UnknownField otherwise."""
        node = self.nodes.get(node_id)
        if node is None:
            raise UnknownField(f"no device {node_id!r}" + self._suggest(node_id, self.nodes))
        return node

    @staticmethod
    def _suggest(name: str, known: Iterable[str]) -> str:
        names = list(known)
        return f"; devices: {', '.join(names)}" if names else "; no devices configured"

    # ------------------------------------------------------------ driver side

    def push(self, node_id: str, name: str, value: Any, at: float | None = None) -> None:
        """Record a reading; safe to call from any thread. Bad values are logged and dropped."""
        if self._loop is not None and threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(self._push, node_id, name, value, at)
        else:
            self._push(node_id, name, value, at)

    def set_health(self, node_id: str, state: Health, reason: str = "") -> None:
        """Set a device's health; safe to call from any thread."""
        if self._loop is not None and threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(self._set_health, node_id, state, reason)
        else:
            self._set_health(node_id, state, reason)

    def set_problem(self, component: str, message: str | None) -> None:
        """Report a problem of a gateway component (`history`), or clear it with None; safe from any thread.

        Listeners hear of changes only: the same message again is not news.
        """
        if self._loop is not None and threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(self._set_problem, component, message)
        else:
            self._set_problem(component, message)

    def _set_problem(self, component: str, message: str | None) -> None:
        old = self.problems.get(component)
        if message is None:
            if old is None:
                return
            new = None
            del self.problems[component]
            log.warning("%s: problem cleared", component)
        else:
            if old is not None and old.message == message:
                return
            new = Problem(component, message, old.since if old else time.time())
            self.problems[component] = new
            log.warning("gateway problem: %s", new.describe())
        for listener in self._problem_listeners:
            try:
                listener(component, new, old)
            except Exception:
                log.exception("problem listener failed for %s", component)

    def _push(self, node_id: str, name: str, value: Any, at: float | None) -> None:
        node = self.nodes.get(node_id)
        f = node.fields.get(name) if node else None
        if f is None:
            log.warning("reading for unknown field %s.%s dropped", node_id, name)
            return
        if type(value) is float and value - value == 0.0 and f.spec.type == "numeric":
            v = value  # a finite number for a numeric field (most readings): what coerce returns
        else:
            try:
                v = coerce(f.spec.type, value)
            except BadValue as e:
                log.warning("%s: bad reading dropped: %s", f.ref, e)
                return
        now = time.time()
        reading = Reading(v, now if at is None else at)
        f.latest = reading
        f.history.append(reading)
        node.last_seen = now
        node.seen_at = time.monotonic()
        if node.health.state is Health.STARTING or (node.health.state is Health.STALE and node.hub_stale):
            self._set_health(node_id, Health.OK, "")
        for listener in self._reading_listeners:
            try:
                listener(f, reading)
            except Exception:
                log.exception("reading listener failed for %s", f.ref)

    def _set_health(self, node_id: str, state: Health, reason: str, hub_stale: bool = False) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        old = node.health
        node.hub_stale = hub_stale
        if old.state is state and old.reason == reason:
            return
        node.health = HealthState(state, reason, time.time())
        node.health_at = time.monotonic()
        log.info("%s: %s", node_id, node.health.describe())
        for listener in self._health_listeners:
            try:
                listener(node, old)
            except Exception:
                log.exception("health listener failed for %s", node_id)

    def check_stale(self, now: float | None = None) -> None:
        """Mark devices `stale` that have sent nothing for their `stale_after` seconds.

        `now` is time.monotonic(): durations never use the wall clock, which may step.
        """
        now = time.monotonic() if now is None else now
        for node in self.nodes.values():
            if node.stale_after is None or node.health.state not in (Health.OK, Health.STARTING):
                continue
            since = node.seen_at if node.seen_at is not None else node.health_at
            if now - since > node.stale_after:
                self._set_health(node.id, Health.STALE, f"no data for {node.stale_after:g} s", hub_stale=True)

    def stale_due(self, now: float | None = None, longest: float = 60.0) -> float:
        """Seconds until `check_stale` could next find a device stale: the earliest deadline,
        and never more than the shortest `stale_after` (a device back to ok meanwhile is
        due no sooner than that) nor `longest`."""
        now = time.monotonic() if now is None else now
        due = longest
        for node in self.nodes.values():
            if node.stale_after is None:
                continue
            due = min(due, node.stale_after)
            if node.health.state in (Health.OK, Health.STARTING):
                since = node.seen_at if node.seen_at is not None else node.health_at
                due = min(due, since + node.stale_after - now)
        return max(due, 0.0)

    async def watch_stale(self, every: float = 60.0) -> None:
        """Run `check_stale` forever, at least each `every` seconds; start it as a task. It
        sleeps until a device could be due, not on a fixed tick: an idle Pi should not wake
        up for nothing."""
        while True:
            # A little past the deadline: check_stale wants strictly more than stale_after.
            await asyncio.sleep(self.stale_due(longest=every) + 0.01)
            self.check_stale()

    # ------------------------------------------------------------ writes

    def authorize(self, actor: Actor, attempts: Iterable[tuple[str, Any]]) -> None:
        """Raise Forbidden unless `actor` may set fields; when not, each attempted (ref, value) is
        audited as refused, once. Every entry point asks here (through `write`, or before it
        when it refuses a whole request, such as a submitted ad-hoc form) and nowhere else."""
        try:
            require(actor, Permission.SET)
        except Forbidden as e:
            self.refuse(actor, attempts, str(e))
            raise

    def refuse(self, actor: Actor, attempts: Iterable[tuple[str, Any]], reason: str) -> None:
        """Audit attempted (ref, value) sets as refused, once each, for a reason the entry point
        found before asking (an ad-hoc step from someone who did not start the session)."""
        for ref, raw in attempts:
            self.audit.record(actor, ref, None, _printable(raw), "refused", reason)

    def value(self, ref: str, raw: Any, actor: Actor | None = None) -> Value:
        """`raw` as a value `ref` may be set to (type, bounds, choices), without writing:
        UnknownField, NotWritable or BadValue (its message names the field) otherwise. With
        `actor`, a refusal is audited as theirs (an attempted write)."""
        f = self.field(ref)
        old = f.latest.value if f.latest else None
        if not f.spec.writable:
            if actor is not None:
                self.audit.record(actor, ref, old, _printable(raw), "refused", "not writable")
            raise NotWritable(f"{ref} is read-only")
        try:
            value = coerce(f.spec.type, raw)
            check_bounds(value, f.spec.min, f.spec.max)
            if f.spec.choices and value not in f.spec.choices:
                raise BadValue(f"must be one of: {', '.join(f.spec.choices)}; got {_printable(raw)!r}")
        except BadValue as e:
            if actor is not None:
                self.audit.record(actor, ref, old, _printable(raw), "refused", str(e))
            raise BadValue(f"{ref} {e}") from None
        return value

    async def write(self, ref: str, raw: Any, actor: Actor) -> Written:
        """Set a writable field on behalf of `actor`, after authorization and validation.

        Returns (old, new): the latest value before the write and the value applied (`sent`
        when only sent: see Written). Raises Forbidden, UnknownField, NotWritable,
        BadValue or DeviceError; every attempt is audited.
        """
        self.authorize(actor, [(ref, raw)])
        value = self.value(ref, raw, actor)
        f = self.field(ref)
        old = f.latest.value if f.latest else None
        writer = self._writers.get(f.node.id)
        if writer is None:
            self.audit.record(actor, ref, old, value, "failed", "device not running")
            raise DeviceError(f"{f.node.id} is not running")
        try:
            result = await asyncio.wait_for(writer(f.name, value), WRITE_TIMEOUT)
        except asyncio.TimeoutError:
            self.audit.record(actor, ref, old, value, "failed", "device did not answer")
            raise DeviceError(f"{f.node.id} did not confirm within {WRITE_TIMEOUT:g} s") from None
        except Unconfirmed as e:
            self.audit.record(actor, ref, old, value, "unconfirmed", str(e))
            raise Unconfirmed(f"{ref}: {fmt(value)} sent, {e}") from None
        except Exception as e:
            self.audit.record(actor, ref, old, value, "failed", str(e))
            raise DeviceError(f"{f.node.id} refused the write: {e}") from None
        sent = result == SENT
        self.audit.record(actor, ref, old, value, SENT if sent else "applied")
        for listener in self._write_listeners:
            try:
                listener(f, old, value, actor)
            except Exception:
                log.exception("write listener failed for %s", ref)
        return Written(old, value, sent)


def _printable(raw: Any) -> Any:
    text = str(raw)
    return text if len(text) <= 40 else text[:40] + "…"
