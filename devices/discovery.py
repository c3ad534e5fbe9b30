"""What the drivers of self-describing MQTT devices share (`zigbee2mqtt`, `tasmota`).

One config entry (a Zigbee2MQTT bridge, Tasmota's discovery) yields many hub
nodes, added and renamed while the gateway runs. A device's identity is what
its ecosystem keeps stable (an IEEE address, a MAC); its node id comes from its
name, so a rename moves the node (and its history) instead of making a new one.
A node id, once given to an identity, stays that identity's (kept in the state
folder): another device taking the name later gets another id, so watches and
history, which follow node ids, follow the device and never pass to a newcomer.

Whatever arrives is checked like a hand-written config: names sanitised, sizes
bounded; a bad entry is logged once and skipped. Discovery never takes away: a
device no longer listed is kept, offline, with its watches and history. Nor
does it widen: a field is writable only when the device says so, the config
allows it and it was not read-only earlier in this run; commands go only to the
device's own topics.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from gateway.configbase import DeviceBase
from gateway.hub import SENT, FieldSpec, Health, NotWritable, Unconfirmed
from gateway.mqtt.broker import Broker, MqttError
from gateway.state import SaveError
from gateway.values import Value, quoted, same, shown

from .base import Context, Driver

log = logging.getLogger("iot_gateway.discovery")

MAX_DEVICES = 500  # devices one bridge may describe; a longer list is refused as a whole
MAX_FIELDS = 100  # fields of one device; a device with more is skipped
MAX_TEXT = 256  # characters of a name, property or enum value
MAX_UNIT = 32  # characters of a unit
MAX_CHOICES = 64  # values of an enum
MAX_DEPTH = 4  # nesting of composite features
MAX_PAYLOAD = 8 * 1024 * 1024  # bytes of one discovery message
ONCE_KEYS = 1000  # distinct problems remembered so each is logged once
NODE_ID = re.compile(r"[a-z0-9_-]{1,70}")  # what _free_id makes: a stored id is checked against it
IDS_KEPT = 2000  # identities whose node id is remembered (the oldest not shown now is forgotten first)


class Malformed(ValueError):
    """A discovery entry that cannot be used as it is; the message says what is wrong."""


def text(v: Any, what: str, limit: int = MAX_TEXT) -> str:
    """`v` as a bounded string without control characters; Malformed otherwise."""
    if not isinstance(v, str):
        raise Malformed(f"{what} is not a string")
    if len(v) > limit:
        raise Malformed(f"{what} is longer than {limit} characters")
    if not v.isprintable():
        raise Malformed(f"{what} contains control characters")
    return v


def number(v: Any, what: str) -> float | None:
    """A finite number (bound), None when absent; Malformed when it is something else."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise Malformed(f"{what} is not a number")
    return float(v)


def sanitise(name: str) -> str:
    """A hub id or field name from a device's own name: lower case, runs of anything but
    letters, digits, `_` and `-` become `_` (`hall/Motion 2` → `hall_motion_2`), at most 64."""
    out = re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_")
    return out[:64].rstrip("_")


def dig(doc: Any, path: tuple[str, ...] | list[str]) -> Any:
    """The value at `path` in a JSON document (`{"ENERGY": {"Power": 5}}`, ("ENERGY", "Power") → 5), or None."""
    for key in path:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def picked(name: str, include: list[str], exclude: list[str]) -> bool:
    """Whether `name` passes `include` (empty: everything) and `exclude` (shell patterns)."""
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def describe(payload: bytes, what: str, limit: int = MAX_PAYLOAD) -> Any:
    """Parse a discovery message; Malformed when too big, not UTF-8 or not JSON."""
    if len(payload) > limit:
        raise Malformed(f"{what} is {len(payload)} bytes, more than {limit}")
    try:
        return json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise Malformed(f"{what} is not UTF-8 text") from None
    except RecursionError:
        raise Malformed(f"{what} is nested too deeply") from None
    except ValueError as e:
        raise Malformed(f"{what} is not JSON ({getattr(e, 'msg', e)})") from None


class Once:
    """Logs each distinct problem once (a retained bad payload comes back on every reconnect)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def warn(self, message: str) -> None:
        """Log `message` as a warning unless it was logged before."""
        if message in self._seen:
            return
        if len(self._seen) >= ONCE_KEYS:
            self._seen.clear()
        self._seen.add(message)
        log.warning("%s", message)


@dataclass
class Spot:
    """Where one field of a discovered device lives: its spec, and how to read and set it."""

    spec: FieldSpec
    path: tuple[str, ...] = ()  # keys in the state JSON (Zigbee2MQTT); the key (Tasmota)
    readable: bool = True
    on: Any = True  # what the device says for a boolean's on and off
    off: Any = False
    command: str = ""  # a command topic of its own (Tasmota relays)
    actuator: bool = False  # what the device is for (a light's or switch's feature, a relay), not a setting


@dataclass
class Device:
    """A discovered device as its driver knows it."""

    key: str  # its identity: IEEE address, MAC
    name: str  # its own name (friendly name, topic)
    title: str  # what the hub shows as its name
    spots: dict[str, Spot]
    extra: dict[str, Any] = field(default_factory=dict)  # the driver's own (topics, availability texts)
    node_id: str = ""
    available: bool | None = None
    listed: bool = True  # False once its bridge no longer lists it: kept, offline

    def same(self, other: "Device") -> bool:
        """Whether `other` describes the device exactly as this one does."""
        return (self.name, self.title, self.spots, self.extra) == (other.name, other.title, other.spots, other.extra)


class Discovering(Driver[DeviceBase]):
    """Base of the drivers whose config entry stands for many devices found on the broker.

    The config entry itself is a hub node too (the bridge): its health is the
    discovery's, its `devices` field the number of devices shown.
    """

    family = ""  # "Zigbee2MQTT", "Tasmota": in messages to the user
    prefix = ""

    def __init__(self, device: Any, ctx: Context):
        super().__init__(device, ctx)
        self.prefix = device.prefix
        self.devices: dict[str, Device] = {}  # by identity
        self.once = Once()
        self.broker: Broker | None = None
        # (identity, field) -> (value asked for, resolved when the device reports it)
        self._waiting: dict[tuple[str, str], tuple[Value, asyncio.Future[None]]] = {}
        self._reported: dict[tuple[str, str], Value] = {}
        self._readonly: dict[str, set[str]] = {}  # identity -> fields read-only in this run: they stay so
        self.dropped = 0  # messages of devices not listed, dropped (too many to keep)
        self._ids_file = f"discovery-{self.id}.json"
        self.ids: dict[str, str] = {}  # identity -> node id, kept in the state folder
        self._owner: dict[str, str] = {}  # node id -> identity
        self._load_ids()

    # ------------------------------------------------------------ node ids

    def _load_ids(self) -> None:
        state = self.ctx.state
        raw = state.load(self._ids_file, {}) if state is not None else {}
        ids = raw.get("ids") if isinstance(raw, dict) else None
        for key, node_id in list(ids.items())[-IDS_KEPT:] if isinstance(ids, dict) else []:
            if isinstance(key, str) and isinstance(node_id, str) and NODE_ID.fullmatch(node_id) and node_id not in self._owner:
                self.ids[key] = node_id
                self._owner[node_id] = key

    def _remember(self, key: str, node_id: str) -> None:
        """`node_id` is `key`'s from now on (its former id is free again: its watches and history moved along)."""
        old = self.ids.pop(key, None)
        if old == node_id:
            self.ids[key] = node_id  # last used last: forgotten last
            return
        if old is not None:
            self._owner.pop(old, None)
        self.ids[key] = node_id
        self._owner[node_id] = key
        for k in [k for k in self.ids if k not in self.devices and k != key][: max(0, len(self.ids) - IDS_KEPT)]:
            self._owner.pop(self.ids.pop(k), None)
        state = self.ctx.state
        if state is None or state.readonly is not None:
            return
        try:
            state.save(self._ids_file, {"ids": self.ids})
        except SaveError:
            pass  # logged by the state folder, retried, and a hub problem

    def _base(self, dev: Device) -> str:
        return (self.prefix + (sanitise(dev.name) or sanitise(dev.key) or "device"))[:60]

    def _holder(self, node_id: str, dev: Device) -> str:
        """Who holds `node_id` other than `dev`, in words ("" when it is free for `dev`)."""
        key = self._owner.get(node_id)
        if key is not None and key != dev.key:
            other = self.devices.get(key)
            if other is not None and other.listed:
                return f"{other.name!r}'s ({key})"
            return f"the id of {key}, a device not listed now (its watches and history stay with it)"
        if node_id in self.hub.nodes and node_id != dev.node_id:
            return "taken by another device"
        return ""

    def _free_id(self, dev: Device, reuse: bool = True) -> str:
        """The id `dev` had (`reuse`), else `prefix` + its sanitised name, made unique among the hub's
        nodes and the ids of other identities (`-2`, `-3` …)."""
        mine = self.ids.get(dev.key)
        if reuse and mine is not None and not self._holder(mine, dev):
            return mine
        base = self._base(dev)
        candidate, n = base, 1
        while self._holder(candidate, dev):
            n += 1
            candidate = f"{base}-{n}"
        if candidate != base:
            self.once.warn(f"{self.id}: {dev.name!r} ({dev.key}) is shown as {candidate}: {base} is {self._holder(base, dev)}")
        return candidate

    def _claims(self) -> None:
        """A hub problem (told to admins once) while a listed device has the name of one not listed:
        a replaced device, or one pretending to be it."""
        claims = []
        for dev in self.devices.values():
            base = self._base(dev)
            key = self._owner.get(base)
            other = self.devices.get(key) if key is not None else None
            if dev.listed and key is not None and key != dev.key and (other is None or not other.listed):
                claims.append(f"{dev.name!r} ({dev.key}) has the name of {key}, not listed now: shown as "
                              f"{dev.node_id}; {base} keeps its watches and history")
        more = f" and {len(claims) - 3} more" if len(claims) > 3 else ""
        message = "; ".join(claims[:3]) + more + f" (rename the new device in {self.family} to end this)"
        self.hub.set_problem(self.id, message if claims else None)

    # ------------------------------------------------------------ nodes

    def sync(self, found: dict[str, Device], keep: Iterable[str] = ()) -> None:
        """Make the hub's nodes match `found` (a complete, valid list): add, rename and update; a
        device no longer listed is kept, offline. Devices named in `keep` (their entry was malformed
        this time) stay as they were."""
        why = f"{self.family} ({self.id})"
        kept = set(keep)
        for dev in found.values():
            self._police(dev)
        for key, dev in self.devices.items():
            if key not in found and key not in kept and dev.listed:
                dev.listed = False
                self._forget(dev)
                log.warning("%s: %r (%s) is no longer listed by %s: kept, offline, with its watches and history", dev.node_id, dev.name, key, why)
                self.refresh(dev)
        # Known devices first: one renamed away frees its id for a new device in the same list.
        for key, dev in sorted(found.items(), key=lambda kv: kv[0] not in self.devices):
            old = self.devices.get(key)
            if old is not None and old.listed and old.same(dev):
                continue
            if old is None:
                if len(self.devices) >= MAX_DEVICES:
                    self.once.warn(f"{self.id}: {dev.name!r} ({key}) not shown: {MAX_DEVICES} devices are known already")
                    continue
                dev.node_id = self._free_id(dev)
                self._remember(key, dev.node_id)
                self.hub.add_node(dev.node_id, dev.title, self.driver_name, [s.spec for s in dev.spots.values()], why=f"found by {why}")
                self.hub.set_writer(dev.node_id, partial(self._write, key))
                self.devices[key] = dev
                self._adopt(dev, None)
                self.refresh(dev)
                continue
            dev.node_id = old.node_id
            dev.available = old.available
            if old.name != dev.name:
                new_id = self._free_id(dev, reuse=False)
                if new_id != old.node_id:
                    self.hub.rename_node(old.node_id, new_id, dev.title, why=f"renamed in {why}: {old.name} → {dev.name}")
                    dev.node_id = new_id
                    self._remember(key, new_id)
            node = self.hub.nodes.get(dev.node_id)
            if node is not None:
                node.name = dev.title
            self.hub.update_fields(dev.node_id, [s.spec for s in dev.spots.values()], why=f"changed in {why}")
            self.devices[key] = dev
            self._adopt(dev, old if old.listed else None)
            self.refresh(dev)
        self.push("devices", sum(1 for d in self.devices.values() if d.listed))
        for key in [k for k in self._readonly if k not in self.devices]:
            del self._readonly[key]  # a device never shown: nothing of it to remember
        self._claims()

    def drop(self, why: str) -> None:
        """A message of a device not listed was dropped (too many to keep): counted in the bridge's
        `dropped`, and `why` logged once."""
        self.dropped += 1
        self.once.warn(f"{self.id}: {why}; the others dropped (counted in {self.id}.dropped)")
        if self.dropped == 1 or self.dropped % 100 == 0:  # a flood must not become a flood of readings
            self.push("dropped", self.dropped)

    def _police(self, dev: Device) -> None:
        """A field is writable only when its device says so, the config's `writable` allows it and
        it was not read-only earlier in this run (a later description never widens what a set may do)."""
        allow = self.device.writable  # type: ignore[attr-defined]
        seen = self._readonly.setdefault(dev.key, set())
        for name, spot in list(dev.spots.items()):
            if isinstance(allow, list):
                ok = any(fnmatch.fnmatchcase(f"{dev.name}.{name}", p) for p in allow)
            else:
                ok = spot.actuator if allow is None else allow
            ok = ok and spot.spec.writable
            if ok and name in seen:
                self.once.warn(f"{self.id}: {dev.name!r} ({dev.key}).{name} is described as settable now, but it was "
                               "read-only: it stays read-only until the gateway restarts")
                ok = False
            if ok:
                continue
            seen.add(name)
            if not spot.readable:
                del dev.spots[name]  # write-only, and not to be written: nothing left of it
            elif spot.spec.writable:
                spot.spec = replace(spot.spec, writable=False)

    @property
    def driver_name(self) -> str:
        """The `driver` of the config entry, shown by `list` for every node it found."""
        return self.device.driver  # type: ignore[no-any-return]

    def _adopt(self, dev: Device, old: Device | None) -> None:
        """A device was added (`old` None) or changed: subscribe to what it needs."""

    def _forget(self, dev: Device) -> None:
        """A device is no longer listed: drop its subscriptions and pending sets."""
        for (key, name), (_, fut) in list(self._waiting.items()):
            if key == dev.key and not fut.done():
                fut.cancel()

    def node_of(self, dev: Device) -> str:
        """The hub id of a device now."""
        return dev.node_id

    # ------------------------------------------------------------ health

    def refresh(self, dev: Device) -> None:
        """Set a device's health from the broker, the bridge and its own availability."""
        state, reason = self.health_of(dev)
        self.hub.set_health(dev.node_id, state, reason)

    def health_of(self, dev: Device) -> tuple[Health, str]:
        """A device's health now; drivers add their bridge's state."""
        broker = self.broker
        if broker is None or not broker.connected:
            return Health.OFFLINE, broker.reason if broker is not None else "not running"
        if not dev.listed:
            return Health.OFFLINE, f"(no longer listed by {self.family})"
        if dev.available is False:
            return Health.OFFLINE, "(availability)"
        return Health.OK, ""

    def refresh_all(self) -> None:
        """Every device's health again (the broker or the bridge changed)."""
        for dev in self.devices.values():
            self.refresh(dev)

    def broker_up(self) -> None:
        """The broker is back: the bridge and every device follow."""
        self.bridge_health()
        self.refresh_all()

    def broker_down(self, reason: str) -> None:
        """The broker is gone: so is every device."""
        self.health(Health.OFFLINE, reason)
        for dev in self.devices.values():
            self.hub.set_health(dev.node_id, Health.OFFLINE, reason)

    def bridge_health(self) -> None:
        """The config entry's own node: ok while the broker is up."""
        self.health(Health.OK)

    # ------------------------------------------------------------ readings and writes

    def reading(self, dev: Device, name: str, value: Value) -> None:
        """Push a reading of a device and confirm a set waiting for it."""
        self.hub.push(dev.node_id, name, value)
        key = (dev.key, name)
        self._reported[key] = value
        waiting = self._waiting.get(key)
        spot = dev.spots.get(name)
        if waiting is not None and not waiting[1].done() and same(waiting[0], value, spot.spec.decimals if spot else None):
            waiting[1].set_result(None)

    async def _write(self, key: str, name: str, value: Value) -> str | None:
        """Publish a set; where the device reports the field, wait until it reports the new value
        (applied: None). A write-only field (`effect`, `identify`) is only SENT."""
        dev = self.devices.get(key)
        spot = dev.spots.get(name) if dev is not None else None
        if dev is None or spot is None or not spot.spec.writable:
            raise NotWritable(f"{name} is not writable")
        if not dev.listed:
            raise MqttError(f"{dev.node_id} is no longer listed by {self.family}: nothing sent")
        if self.broker is None:
            raise MqttError(f"{self.id} is not running")
        topic, payload = self.command(dev, spot, value)
        if not self.owns(dev, topic):
            log.warning("%s.%s: %s is not one of the device's own topics: nothing sent", dev.node_id, name, topic)
            raise NotWritable(f"{name}: the command topic is not the device's own: nothing sent")
        waiter: asyncio.Future[None] | None = None
        wkey = (key, name)
        if spot.readable:
            previous = self._waiting.get(wkey)
            if previous is not None and not previous[1].done():
                previous[1].cancel()
            waiter = asyncio.get_running_loop().create_future()
            self._waiting[wkey] = (value, waiter)
        try:
            await self.broker.publish(topic, payload, False)
            log.info("%s.%s: published %s to %s", dev.node_id, name, quoted(payload), topic)
            if waiter is None:
                self.hub.push(dev.node_id, name, value)  # write-only: the acknowledged command stands in as the value
                return SENT
            timeout = self.device.confirm_timeout  # type: ignore[attr-defined]
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                last = self._reported.get(wkey)
                seen = "" if last is None else f"; it last reported {shown(last)}"
                raise Unconfirmed(f"not confirmed: the device did not report the new state within {timeout:g} s{seen}") from None
            return None
        finally:
            if waiter is not None and self._waiting.get(wkey, (None, None))[1] is waiter:
                del self._waiting[wkey]

    def command(self, dev: Device, spot: Spot, value: Value) -> tuple[str, str]:
        """(topic, payload) that sets `spot` to `value`."""
        raise NotImplementedError

    def owns(self, dev: Device, topic: str) -> bool:
        """Whether `topic` is one of the device's own command topics (checked before every publish)."""
        raise NotImplementedError

    # ------------------------------------------------------------ start and stop

    async def start(self) -> None:
        broker = Broker.shared(self.ctx)
        self.broker = broker
        self.routes(broker)
        self.health(Health.STARTING, broker.reason)  # until the broker tells otherwise (at once if it knows)
        self.push("dropped", self.dropped)
        broker.attach(self)

    def routes(self, broker: Broker) -> None:
        """Subscribe to the discovery topics."""
        raise NotImplementedError

    async def stop(self) -> None:
        broker, self.broker = self.broker, None
        for _, fut in self._waiting.values():
            if not fut.done():
                fut.cancel()
        if broker is not None:
            await broker.leave(self.ctx, self)
