"""`zigbee2mqtt`: every device a Zigbee2MQTT bridge describes, each its own node.

The bridge publishes its device list, retained, on `<base>/bridge/devices`.
Each usable device (not the coordinator; interviewed, supported, enabled)
becomes a node named after its `friendly_name` (`hall/motion` → `hall_motion`),
with a field for each `definition.exposes` entry it publishes (access bit 1) or
takes (bit 2): `numeric` (unit, `value_min`/`value_max` as bounds), `binary`
(its `value_on`/`value_off`), `enum` (its values), `text`, and the `features`
of composites (`switch`, `light`, `climate`, a `composite` nests under its own
property: `level_config_current_level_startup`). Readings come from the JSON
on `<base>/<friendly_name>`, sets go to `<base>/<friendly_name>/set` as
`{"<property>": value}`, health from `<base>/<friendly_name>/availability`
(`{"state":"online"}`, or 1.x's plain `online`) and `<base>/bridge/state`.

A device's identity is its IEEE address: a renamed device keeps its node
(renamed), its history and its watches. A new list adds nodes while the gateway
runs; a device it no longer names stays, offline. Friendly names may contain
`/`: topics are matched against the known names, never split; a name that
would put our `/set` outside the device's own topic (wildcards, `bridge/…`,
empty levels) is refused. Two devices with one name are both skipped.

Messages on topics of devices not listed yet are kept until the list names
them, at most EARLY_MAX topics and EARLY_TOTAL bytes; more are dropped and
counted (the bridge node's `dropped`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from typing import Any

from gateway.hub import FieldSpec, Health
from gateway.mqtt.broker import Broker
from gateway.noise import Throttle
from gateway.values import Value, quoted

from .discovery import (
    MAX_CHOICES,
    MAX_DEPTH,
    MAX_DEVICES,
    MAX_FIELDS,
    MAX_TEXT,
    MAX_UNIT,
    Device,
    Discovering,
    Malformed,
    Spot,
    describe,
    dig,
    number,
    picked,
    sanitise,
    text,
)
from .zigbee2mqtt_config import Zigbee2MqttDevice

log = logging.getLogger("iot_gateway.zigbee2mqtt")

EARLY_MAX = 1000  # topics of devices not listed yet whose last message is kept until the list names them
EARLY_BYTES = 8 * 1024  # a bigger early message is not kept
EARLY_TOTAL = 1024 * 1024  # bytes of all early messages
INLINE_BYTES = 64 * 1024  # a bigger device list is parsed in a worker thread
AVAILABILITY = "/availability"
ONLINE, OFFLINE = "online", "offline"
COMPOSITES = {"switch", "light", "climate", "fan", "cover", "lock", "composite"}
ACTUATORS = {"switch", "light"}  # what their features set is the device's purpose: writable by default


def state_word(payload: bytes) -> bool | None:
    """True/False for an availability or bridge state (`{"state":"online"}` or plain `online`), None otherwise."""
    try:
        raw = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if raw.startswith("{"):
        try:
            doc = json.loads(raw)
        except ValueError:
            return None
        raw = doc.get("state") if isinstance(doc, dict) else None
        if not isinstance(raw, str):
            return None
    word = raw.strip().lower()
    return True if word == ONLINE else False if word == OFFLINE else None


def usable(entry: dict[str, Any]) -> str:
    """Why a listed device is not shown ("" when it is): the coordinator, one still interviewing…"""
    if entry.get("type") == "Coordinator":
        return "the coordinator"
    if entry.get("disabled") is True:
        return "disabled"
    state = entry.get("interview_state")
    done = state == "SUCCESSFUL" if state is not None else entry.get("interview_completed") is True
    if not done:
        return f"interview {str(state or 'not completed').lower()}"
    if entry.get("supported") is False:
        return "not supported by Zigbee2MQTT"
    if not isinstance(entry.get("definition"), dict):
        return "no definition"
    return ""


def bad_name(name: str) -> str:
    """Why a friendly name cannot be a device's own topic under the base topic ("" when it can)."""
    if any(c in name for c in "+#\x00") or name.startswith("/") or name.endswith("/") or "//" in name:
        return "it has a wildcard or an empty topic level"
    if name == "bridge" or name.startswith("bridge/"):
        return "it is the bridge's own topic"
    levels = name.split("/")
    if "set" in levels or "get" in levels or levels[-1] == "availability":
        return "it has a `set`, `get` or `availability` topic level"
    return ""


def spots(exposes: Any, what: str, problems: list[str] | None = None) -> dict[str, Spot]:
    """The fields of a device from its `definition.exposes`; Malformed when they cannot be used.
    A property that makes no field name (`!!!`) is skipped and said in `problems`."""
    if not isinstance(exposes, list):
        raise Malformed(f"{what}: definition.exposes is not a list")
    out: dict[str, Spot] = {}
    _walk(exposes, (), 0, out, what, False, problems if problems is not None else [])
    if len(out) > MAX_FIELDS:
        raise Malformed(f"{what}: {len(out)} fields, more than {MAX_FIELDS}")
    return out


def _walk(exposes: list[Any], path: tuple[str, ...], depth: int, out: dict[str, Spot], what: str, actuator: bool, problems: list[str]) -> None:
    if depth > MAX_DEPTH:
        raise Malformed(f"{what}: features nested more than {MAX_DEPTH} deep")
    if len(exposes) > MAX_FIELDS:
        raise Malformed(f"{what}: more than {MAX_FIELDS} exposes")
    for x in exposes:
        if not isinstance(x, dict):
            raise Malformed(f"{what}: an expose is not an object")
        kind = text(x.get("type"), f"{what}: an expose's type")
        if "features" in x and kind in COMPOSITES:
            features = x["features"]
            if not isinstance(features, list):
                raise Malformed(f"{what}: features of a {kind} is not a list")
            prop = x.get("property")
            # A plain composite sets and reports its features nested under its own property.
            sub = path + (text(prop, f"{what}: a composite's property"),) if kind == "composite" and prop else path
            _walk(features, sub, depth + 1, out, what, actuator or kind in ACTUATORS, problems)
            continue
        if kind not in ("numeric", "binary", "enum", "text"):
            continue  # list and the like: no single value
        spot = _spot(x, kind, path, what, actuator, problems)
        if spot is None:
            continue
        if spot.spec.name in out:
            continue  # the same property exposed twice (a light's state and its switch): the first counts
        out[spot.spec.name] = spot


def _spot(x: dict[str, Any], kind: str, path: tuple[str, ...], what: str, actuator: bool, problems: list[str]) -> Spot | None:
    prop = text(x.get("property"), f"{what}: an expose's property")
    access = x.get("access", 1)
    if isinstance(access, bool) or not isinstance(access, int):
        raise Malformed(f"{what}.{prop}: access is not a number")
    readable, writable = bool(access & 1), bool(access & 2)
    if not (readable or writable):
        return None
    name = sanitise("_".join(path + (prop,)))
    if not name:
        problems.append(f"{what}: property {prop!r} skipped: it makes no field name")
        return None
    desc = x.get("description")
    description = desc[:MAX_TEXT] if isinstance(desc, str) and desc.isprintable() else ""
    unit = text(x.get("unit", ""), f"{what}.{prop}: unit", MAX_UNIT)
    if kind == "numeric":
        lo = number(x.get("value_min"), f"{what}.{prop}: value_min")
        hi = number(x.get("value_max"), f"{what}.{prop}: value_max")
        if lo is not None and hi is not None and lo > hi:
            raise Malformed(f"{what}.{prop}: value_min is above value_max")
        spec = FieldSpec(name, "numeric", unit, None, writable, lo, hi, description)
        return Spot(spec, path + (prop,), readable, actuator=actuator)
    if kind == "binary":
        on, off = x.get("value_on", True), x.get("value_off", False)
        for v in (on, off):
            if isinstance(v, str):
                text(v, f"{what}.{prop}: value_on/value_off")
            elif not isinstance(v, (bool, int, float)):
                raise Malformed(f"{what}.{prop}: value_on/value_off is not a value")
        if on == off:
            raise Malformed(f"{what}.{prop}: value_on and value_off are the same")
        spec = FieldSpec(name, "boolean", unit, None, writable, None, None, description)
        return Spot(spec, path + (prop,), readable, on, off, actuator=actuator)
    choices: tuple[str, ...] = ()
    if kind == "enum":
        values = x.get("values")
        if not isinstance(values, list) or not values or len(values) > MAX_CHOICES:
            raise Malformed(f"{what}.{prop}: values is not a list of 1 to {MAX_CHOICES}")
        choices = tuple(text(v, f"{what}.{prop}: an enum value") for v in values)
    spec = FieldSpec(name, "string", unit, None, writable, None, None, description, choices)
    return Spot(spec, path + (prop,), readable, actuator=actuator)


class Zigbee2MqttDriver(Discovering):
    """One Zigbee2MQTT bridge: its devices as nodes, their state as readings, sets through `/set`."""

    family = "Zigbee2MQTT"

    def __init__(self, device: Zigbee2MqttDevice, ctx: Any):
        super().__init__(device, ctx)
        self.base = device.base_topic
        self.bridge: bool | None = None  # bridge/state: online, offline, not heard yet
        self.listed = False  # a usable device list has arrived
        self._names: dict[str, str] = {}  # friendly name -> IEEE address
        self._early: OrderedDict[str, bytes] = OrderedDict()  # topic rest -> payload, for names not listed yet
        self._early_bytes = 0
        self._seq = 0  # device lists received; a list parsed late does not undo a newer one
        self._applied = 0
        self._throttle = Throttle()

    # ------------------------------------------------------------ topics

    def routes(self, broker: Broker) -> None:
        broker.route(self, f"{self.base}/#", self._on_message)

    def _on_message(self, sub: str, topic: str, payload: bytes) -> None:
        rest = topic[len(self.base) + 1 :]
        if rest == "bridge/devices":
            self._on_devices(payload)
            return
        if rest == "bridge/state":
            self._on_bridge(payload)
            return
        if rest.startswith("bridge/"):
            return  # logging, events, responses: not device state
        key = self._names.get(rest)
        if key is not None:
            self._on_state(self.devices[key], rest, payload)
            return
        if rest.endswith(AVAILABILITY):
            key = self._names.get(rest[: -len(AVAILABILITY)])
            if key is not None:
                self._on_availability(self.devices[key], payload)
                return
        if rest.endswith(("/set", "/get")) or "/set/" in rest or "/get/" in rest:
            return  # commands (ours among them), not state
        if not payload:
            return
        # A device the list has not named yet (messages do not come in the order published): its
        # last message is kept, within bounds; the rest is counted, never kept.
        old = self._early.pop(rest, None)
        self._early_bytes -= len(old) if old is not None else 0
        if len(payload) > EARLY_BYTES or (old is None and (len(self._early) >= EARLY_MAX or self._early_bytes + len(payload) > EARLY_TOTAL)):
            self.drop(f"messages of devices not listed by {self.base}/bridge/devices: more than {EARLY_MAX} "
                      f"topics or {EARLY_TOTAL // 1024} KB, or over {EARLY_BYTES // 1024} KB each")
            return
        self._early[rest] = payload
        self._early_bytes += len(payload)

    def _on_bridge(self, payload: bytes) -> None:
        state = state_word(payload)
        if state is None:
            if payload:
                self.once.warn(f"{self.id}: {self.base}/bridge/state skipped: expected online or offline, got {quoted(payload.decode('utf-8', 'replace'))}")
            return
        self.bridge = state
        self.bridge_health()
        self.refresh_all()

    def bridge_health(self) -> None:
        broker = self.broker
        if broker is None or not broker.connected:
            self.health(Health.OFFLINE, broker.reason if broker is not None else "not running")
        elif self.bridge is False:
            self.health(Health.OFFLINE, "(Zigbee2MQTT bridge offline)")
        elif not self.listed:
            self.health(Health.STARTING, f"waiting for {self.base}/bridge/devices")
        else:
            self.health(Health.OK)

    def health_of(self, dev: Device) -> tuple[Health, str]:
        state, reason = super().health_of(dev)
        if state is Health.OK and self.bridge is False:
            return Health.OFFLINE, "(Zigbee2MQTT bridge offline)"
        return state, reason

    # ------------------------------------------------------------ the device list

    def _on_devices(self, payload: bytes) -> None:
        self._seq += 1
        seq = self._seq
        if len(payload) <= INLINE_BYTES:
            self._apply(seq, self._parse(payload))
            return
        # A big list (hundreds of devices) is parsed off the event loop.
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self._parse, payload)
        fut.add_done_callback(lambda f: f.cancelled() or self._apply(seq, f.result()))

    def _parse(self, payload: bytes) -> tuple[dict[str, Device], set[str], list[str]] | str:
        """(devices by IEEE address, addresses to keep as they are, problems to log) from a device
        list, or why it is unusable as a whole.

        Runs in a worker thread for a big list: no hub, no logging of repeated problems here."""
        try:
            doc = describe(payload, f"{self.base}/bridge/devices")
        except Malformed as e:
            return str(e)
        if not isinstance(doc, list):
            return f"{self.base}/bridge/devices is not a list of devices"
        if len(doc) > MAX_DEVICES:
            return f"{self.base}/bridge/devices lists {len(doc)} devices, more than {MAX_DEVICES}"
        found: dict[str, Device] = {}
        keep: set[str] = set()
        problems: list[str] = []
        for i, entry in enumerate(doc):
            where = f"{self.base}/bridge/devices[{i}]"
            try:
                if not isinstance(entry, dict):
                    raise Malformed(f"{where} is not an object")
                ieee = text(entry.get("ieee_address"), f"{where}.ieee_address", 64)
                name = text(entry.get("friendly_name"), f"{where}.friendly_name")
            except Malformed as e:
                problems.append(f"{self.id}: {e}: skipped")
                continue
            if not picked(name, self.device.include, self.device.exclude):  # type: ignore[attr-defined]
                continue
            why = bad_name(name)
            if why:
                problems.append(f"{self.id}: {name!r} ({ieee}) skipped: its name cannot be a topic of its own: {why}")
                keep.add(ieee)
                continue
            why = usable(entry)
            if why:
                if entry.get("type") != "Coordinator" and why != "disabled":
                    problems.append(f"{self.id}: {name!r} ({ieee}) not shown: {why}")
                    keep.add(ieee)  # re-interviewing: it stays as it was until the interview is over
                continue
            try:
                definition = entry["definition"]
                found[ieee] = Device(ieee, name, name, spots(definition.get("exposes"), f"{self.id}: {name!r}", problems))
            except Malformed as e:
                problems.append(f"{e}: device skipped")
                keep.add(ieee)
        by_name: dict[str, list[str]] = {}
        for ieee, dev in found.items():
            by_name.setdefault(dev.name, []).append(ieee)
        for name, twice in by_name.items():
            if len(twice) > 1:
                problems.append(f"{self.id}: devices {' and '.join(sorted(twice))} are both named {name!r}: both skipped until one is renamed")
                for ieee in twice:
                    del found[ieee]
                    keep.add(ieee)
        return found, keep, problems

    def _apply(self, seq: int, result: Any) -> None:
        if seq < self._applied:
            return  # a newer list was applied meanwhile
        self._applied = seq
        if isinstance(result, str):
            self.once.warn(f"{self.id}: device list skipped, devices kept as they were: {result}")
            return
        found, keep, problems = result
        for p in problems:
            self.once.warn(p)
        self.sync(found, keep)
        self._names = {d.name: k for k, d in self.devices.items() if d.listed}
        if not self.listed:
            self.listed = True
            self.bridge_health()

    def _adopt(self, dev: Device, old: Device | None) -> None:
        self._names[dev.name] = dev.key
        for rest in (dev.name + AVAILABILITY, dev.name):
            payload = self._early.pop(rest, None)
            if payload is not None:
                self._early_bytes -= len(payload)
                self._on_message("", f"{self.base}/{rest}", payload)

    def _forget(self, dev: Device) -> None:
        super()._forget(dev)
        if self._names.get(dev.name) == dev.key:
            del self._names[dev.name]

    # ------------------------------------------------------------ state

    def _on_availability(self, dev: Device, payload: bytes) -> None:
        state = state_word(payload)
        if state is None:
            if payload:
                self._throttle.warn(f"avail:{dev.key}", f"{dev.node_id}: availability skipped: expected online or offline, got {quoted(payload.decode('utf-8', 'replace'))}")
            return
        dev.available = state
        self.refresh(dev)

    def _on_state(self, dev: Device, rest: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            doc = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            self._throttle.warn(f"state:{dev.key}", f"{dev.node_id}: message on {self.base}/{rest} skipped: not JSON; payload {quoted(payload.decode('utf-8', 'replace'))}")
            return
        if not isinstance(doc, dict):
            return
        for name, spot in dev.spots.items():
            if not spot.readable:
                continue
            raw = dig(doc, spot.path)
            if raw is None:
                continue
            value = convert(spot, raw)
            if value is None:
                self._throttle.warn(
                    f"value:{dev.key}:{name}",
                    f"{dev.node_id}.{name}: reading {quoted(json.dumps(raw))} does not fit a {spot.spec.type} field: skipped",
                )
                continue
            self.reading(dev, name, value)

    def command(self, dev: Device, spot: Spot, value: Value) -> tuple[str, str]:
        out: Any
        if isinstance(value, bool):
            out = spot.on if value else spot.off
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        else:
            out = value
        for key in reversed(spot.path):
            out = {key: out}
        return f"{self.base}/{dev.name}/set", json.dumps(out)

    def owns(self, dev: Device, topic: str) -> bool:
        return topic == f"{self.base}/{dev.name}/set" and not bad_name(dev.name)


def convert(spot: Spot, raw: Any) -> Value | None:
    """What a state message holds for a field as a value of its type, or None when it does not fit
    (a light's `current_level_startup` of `"previous"`)."""
    kind = spot.spec.type
    if kind == "boolean":
        if raw == spot.on and type(raw) is type(spot.on):
            return True
        if raw == spot.off and type(raw) is type(spot.off):
            return False
        if isinstance(raw, str):
            word = raw.strip().lower()
            if isinstance(spot.on, str) and word == spot.on.lower():
                return True
            if isinstance(spot.off, str) and word == spot.off.lower():
                return False
        return None
    if kind == "numeric":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            return None
        return float(raw)
    if isinstance(raw, str):
        return raw[:MAX_TEXT]
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return json.dumps(raw)
    return None


DRIVER = Zigbee2MqttDriver
