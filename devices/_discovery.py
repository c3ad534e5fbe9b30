"""What the drivers of self-describing MQTT devices share (`zigbee2mqtt`, `tasmota`).

One config entry (a Zigbee2MQTT bridge, Tasmota's discovery) yields many hub
nodes, added, removed and renamed while the gateway runs. A device's identity
is what its ecosystem keeps stable (an IEEE address, a MAC); its node id comes
from its name, so a rename moves the node (and its history) instead of making
a new one. Whatever arrives is checked like a hand-written config: names
sanitised, sizes bounded; a bad entry is logged once and skipped, and never
removes a device that was fine.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from gateway.configbase import DeviceBase
from gateway.hub import SENT, FieldSpec, Health, NotWritable, Unconfirmed, UnknownField
from gateway.values import Value

from .base import Context, Driver
from .mqtt import Broker, MqttError, _same, _short, _shown

log = logging.getLogger("iot_gateway.discovery")

MAX_DEVICES = 500  # devices one bridge may describe; a longer list is refused as a whole
MAX_FIELDS = 100  # fields of one device; a device with more is skipped
MAX_TEXT = 256  # characters of a name, property or enum value
MAX_UNIT = 32  # characters of a unit
MAX_CHOICES = 64  # values of an enum
MAX_DEPTH = 4  # nesting of composite features
MAX_PAYLOAD = 8 * 1024 * 1024  # bytes of one discovery message
ONCE_KEYS = 1000  # distinct problems remembered so each is logged once


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


def describe(payload: bytes, what: str) -> Any:
    """Parse a discovery message; Malformed when too big, not UTF-8 or not JSON."""
    if len(payload) > MAX_PAYLOAD:
        raise Malformed(f"{what} is {len(payload)} bytes, more than {MAX_PAYLOAD}")
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

    # ------------------------------------------------------------ nodes

    def _free_id(self, dev: Device) -> str:
        """`prefix` + the sanitised name, made unique among the hub's nodes (`-2`, `-3` …)."""
        base = (self.prefix + (sanitise(dev.name) or sanitise(dev.key) or "device"))[:60]
        hub = self.hub
        candidate, n = base, 1
        while candidate in hub.nodes and candidate != dev.node_id:
            n += 1
            candidate = f"{base}-{n}"
        if candidate != base:
            self.once.warn(f"{self.id}: {dev.name!r} is shown as {candidate}: the id {base} is taken by another device")
        return candidate

    def sync(self, found: dict[str, Device], keep: Iterable[str] = ()) -> None:
        """Make the hub's nodes match `found` (a complete, valid list): add, rename, update and
        remove. Devices named in `keep` (their entry was malformed this time) stay as they were."""
        why = f"{self.family} ({self.id})"
        kept = set(keep)
        for key in [k for k in self.devices if k not in found and k not in kept]:
            dev = self.devices.pop(key)
            self._forget(dev)
            try:
                self.hub.remove_node(dev.node_id, f"removed from {why}")
            except UnknownField:
                pass
        for key, dev in found.items():
            old = self.devices.get(key)
            if old is not None and old.same(dev):
                continue
            if old is None:
                dev.node_id = self._free_id(dev)
                self.hub.add_node(dev.node_id, dev.title, self.driver_name, [s.spec for s in dev.spots.values()], why=f"found by {why}")
                self.hub.set_writer(dev.node_id, partial(self._write, key))
                self.devices[key] = dev
                self._adopt(dev, None)
                self.refresh(dev)
                continue
            dev.node_id = old.node_id
            dev.available = old.available
            if old.name != dev.name:
                new_id = self._free_id(dev)
                if new_id != old.node_id:
                    self.hub.rename_node(old.node_id, new_id, dev.title, why=f"renamed in {why}: {old.name} → {dev.name}")
                    dev.node_id = new_id
            node = self.hub.nodes.get(dev.node_id)
            if node is not None:
                node.name = dev.title
            self.hub.update_fields(dev.node_id, [s.spec for s in dev.spots.values()], why=f"changed in {why}")
            self.devices[key] = dev
            self._adopt(dev, old)
            self.refresh(dev)
        self.push("devices", len(self.devices))

    @property
    def driver_name(self) -> str:
        """The `driver` of the config entry, shown by `list` for every node it found."""
        return self.device.driver  # type: ignore[no-any-return]

    def _adopt(self, dev: Device, old: Device | None) -> None:
        """A device was added (`old` None) or changed: subscribe to what it needs."""

    def _forget(self, dev: Device) -> None:
        """A device went away: drop its subscriptions and pending sets."""
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
        if waiting is not None and not waiting[1].done() and _same(waiting[0], value, spot.spec.decimals if spot else None):
            waiting[1].set_result(None)

    async def _write(self, key: str, name: str, value: Value) -> str | None:
        """Publish a set; where the device reports the field, wait until it reports the new value
        (applied: None). A write-only field (`effect`, `identify`) is only SENT."""
        dev = self.devices.get(key)
        spot = dev.spots.get(name) if dev is not None else None
        if dev is None or spot is None or not spot.spec.writable:
            raise NotWritable(f"{name} is not writable")
        if self.broker is None:
            raise MqttError(f"{self.id} is not running")
        topic, payload = self.command(dev, spot, value)
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
            log.info("%s.%s: published %s to %s", dev.node_id, name, _short(payload), topic)
            if waiter is None:
                self.hub.push(dev.node_id, name, value)  # write-only: the acknowledged command stands in as the value
                return SENT
            timeout = self.device.confirm_timeout  # type: ignore[attr-defined]
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                last = self._reported.get(wkey)
                seen = "" if last is None else f"; it last reported {_shown(last)}"
                raise Unconfirmed(f"not confirmed: the device did not report the new state within {timeout:g} s{seen}") from None
            return None
        finally:
            if waiter is not None and self._waiting.get(wkey, (None, None))[1] is waiter:
                del self._waiting[wkey]

    def command(self, dev: Device, spot: Spot, value: Value) -> tuple[str, str]:
        """(topic, payload) that sets `spot` to `value`."""
        raise NotImplementedError

    # ------------------------------------------------------------ start and stop

    async def start(self) -> None:
        broker = Broker.shared(self.ctx)
        self.broker = broker
        self.routes(broker)
        self.health(Health.STARTING, broker.reason)  # until the broker tells otherwise (at once if it knows)
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
