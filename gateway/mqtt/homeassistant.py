"""Home Assistant sees the gateway's own devices: MQTT discovery out, commands in through the hub.

A hub listener. With `[homeassistant]`, every field of the serial, GPIO,
kernel and simulated devices becomes a Home Assistant entity, announced by a
retained discovery config on the `[mqtt]` broker (the shared connection,
`gateway.mqtt.broker.Broker`). Devices of the mqtt, zigbee2mqtt and tasmota drivers
are not re-exported: Home Assistant reads those from the broker already.

Topics, with `<base>` = `[homeassistant] base_topic` (`iot-gateway/<node_id>`):

- `<prefix>/<component>/<node_id>_<device>/<field>/config`: discovery (retained);
- `<base>/<device>/<field>`: the field's state, published on change (retained);
- `<base>/<device>/<field>/set`: commands from Home Assistant, only with
  `commands = true` (else every entity is read-only and nothing is subscribed);
  subscribed as a command topic (`Broker.route(command=True)`): a command
  published while the gateway was away, or retained, is never run;
- `<base>/<device>`: `online` while the device's health is ok, else `offline` (retained);
- the broker connection's own `<client_id>/status` (`online`, `offline` as its
  last will): every entity needs both, so a stopped gateway shows unavailable.

A command goes through `Hub.write` as `homeassistant` with the configured role
and the entry point `mqtt`: checked and audited like one from chat. The topics
retained by a run are kept in `state_dir/homeassistant.json`; the next start
clears (empty retained payload) those of devices and fields no longer there.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from ..auth import Actor, Forbidden
from ..config import Config, HomeAssistantSection
from ..hub import Field, FieldSpec, Health, HealthState, Hub, HubError, Node, Reading
from ..noise import Throttle
from ..state import SaveError, StateDir
from ..values import BadValue, Value, clean
from .broker import Broker, MqttError, Sharing

log = logging.getLogger("iot_gateway.homeassistant")

STATE_FILE = "homeassistant.json"
NOT_EXPORTED = frozenset({"mqtt", "zigbee2mqtt", "tasmota"})  # Home Assistant has those already
ONLINE, OFFLINE = "online", "offline"
ON, OFF = "ON", "OFF"  # Home Assistant's default payloads for switches and binary sensors
MAX_COMMAND = 1024  # bytes of a command payload looked at
QUEUE = 100  # commands waiting at most; more are dropped (and logged)
TEXT_MAX = 255  # the longest state Home Assistant keeps
UNBOUNDED = 1e9  # min/max of a number entity whose field has no bounds (HA's default would be 0..100)
ACTOR = "homeassistant"
VIA = "mqtt"

# unit -> device class, for units Home Assistant accepts with that class (its spelling).
UNIT_CLASSES: dict[str, str] = {
    "°C": "temperature", "°F": "temperature", "K": "temperature",
    "hPa": "pressure", "Pa": "pressure", "kPa": "pressure", "bar": "pressure", "mbar": "pressure",
    "mmHg": "pressure", "inHg": "pressure", "psi": "pressure",
    "lx": "illuminance",
    "V": "voltage", "mV": "voltage", "kV": "voltage",
    "A": "current", "mA": "current",
    "W": "power", "kW": "power", "mW": "power",
    "VA": "apparent_power", "var": "reactive_power",
    "Wh": "energy", "kWh": "energy", "MWh": "energy",
    "dBm": "signal_strength",
    "Hz": "frequency", "kHz": "frequency",
    "ppm": "carbon_dioxide",
    "μg/m³": "pm25",
}
# Legacy spellings Home Assistant maps itself; published in its spelling.
UNIT_SPELLING = {"VAr": "var", "kVAr": "kvar", "µg/m³": "μg/m³", "µV": "μV", "µs": "μs"}
# "%" says little: the field's name tells humidity from battery from soil moisture.
PERCENT_CLASSES = (("hum", "humidity"), ("batt", "battery"), ("moist", "moisture"), ("soil", "moisture"))
TOTALS = {"energy"}  # meter readings that only grow
# Read-only on/off fields by their name (or gpio kind).
BINARY_CLASSES = (
    ("motion", "motion"), ("pir", "motion"), ("occupan", "occupancy"), ("presence", "presence"),
    ("door", "door"), ("window", "window"), ("smoke", "smoke"), ("leak", "moisture"), ("flood", "moisture"),
)
NUMBER_CLASSES = set(UNIT_CLASSES.values()) - {"pm25"} | {"humidity", "battery", "moisture"}


def _version() -> str:
    try:
        return importlib.metadata.version("iot-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "0"


VERSION = _version()


# ---------------------------------------------------------------- entities


@dataclass(frozen=True, slots=True)
class Layout:
    """Where this gateway's Home Assistant topics go, and its identifiers there."""

    prefix: str
    node_id: str
    base: str
    status_topic: str  # the broker connection's online/offline (its last will)

    @property
    def gateway_ids(self) -> str:
        """The gateway's own device identifier: every node's `via_device`."""
        return f"iot-gateway_{self.node_id}"

    def availability(self, device: str) -> str:
        """`<base>/<device>`: online while the device is healthy."""
        return f"{self.base}/{device}"

    def state(self, ref: str) -> str:
        """`<base>/<device>/<field>`."""
        return f"{self.base}/{ref.replace('.', '/', 1)}"

    def config(self, component: str, device: str, obj: str) -> str:
        """`<prefix>/<component>/<node_id>_<device>/<obj>/config`."""
        return f"{self.prefix}/{component}/{self.node_id}_{device}/{obj}/config"


@dataclass(slots=True)
class Entity:
    """One field as a Home Assistant entity: its discovery topic and payload, its state and command topics."""

    ref: str
    component: str
    config_topic: str
    config: dict[str, Any]
    state_topic: str
    command_topic: str | None = None
    spec: FieldSpec | None = None


def layout(config: Config, status_topic: str) -> Layout:
    """The topics and ids of `config` (whose `[homeassistant]` is set), the broker's status topic given."""
    ha = config.homeassistant
    assert ha is not None
    node_id = ha.node_id or config.gateway.id or "gateway"
    return Layout(ha.discovery_prefix, node_id, ha.base_topic or f"iot-gateway/{node_id}", status_topic)


def title(name: str) -> str:
    """An entity name from a field name: `pump_speed` → `Pump speed`."""
    text = name.replace("_", " ").replace("-", " ").strip()
    return text[:1].upper() + text[1:] if text else name


def entity_id(component: str, *parts: str) -> str:
    """`sensor.greenhouse_temp`: Home Assistant's entity ids are lower case letters, digits and `_`."""
    return component + "." + re.sub(r"[^a-z0-9_]+", "_", "_".join(parts).lower()).strip("_")


def sensor_class(spec: FieldSpec, unit: str) -> str | None:
    """The sensor device class a field's unit (and, for `%`, its name) says, or None."""
    if unit == "%":
        low = spec.name.lower()
        return next((cls for word, cls in PERCENT_CLASSES if word in low), None)
    if unit == "ppm" and "co2" not in spec.name.lower():
        return None
    if unit == "μg/m³" and "pm25" not in spec.name.lower().replace(".", "").replace("_", ""):
        return None
    return UNIT_CLASSES.get(unit)


def binary_class(spec: FieldSpec, kind: str | None) -> str | None:
    """The binary sensor device class of a read-only on/off field, from its gpio kind or name."""
    if kind == "motion_sensor":
        return "motion"
    low = spec.name.lower()
    return next((cls for word, cls in BINARY_CLASSES if word in low), None)


def _step(spec: FieldSpec) -> float:
    if spec.type == "integer":
        return 1
    if spec.decimals is not None:
        return max(10.0 ** -spec.decimals, 0.001)
    if spec.min is not None and spec.max is not None and spec.max > spec.min:
        return max(round((spec.max - spec.min) / 100, 3), 0.001)
    return 0.001


def build(node: Node, f: Field, lay: Layout, kind: str | None, commands: bool = True) -> Entity:
    """The entity of field `f` of `node`: its component and discovery payload.

    Without `commands`, a writable field is published read-only (a sensor or binary sensor).
    """
    spec = f.spec
    ref = f.ref
    unit = UNIT_SPELLING.get(spec.unit, spec.unit)
    options: tuple[str, ...] = tuple(getattr(spec, "choices", ()) or ())  # enum fields (FieldSpec.choices)
    writable = spec.writable and commands
    if spec.type == "boolean":
        component = "switch" if writable else "binary_sensor"
    elif options:
        component = "select" if writable else "sensor"
    elif spec.type in ("numeric", "integer"):
        component = "number" if writable else "sensor"
    else:
        component = "text" if writable else "sensor"
    state_topic = lay.state(ref)
    cfg: dict[str, Any] = {
        "name": title(spec.name),
        "unique_id": f"{lay.node_id}.{ref}",
        "default_entity_id": entity_id(component, node.id, spec.name),
        "state_topic": state_topic,
        "availability": [{"topic": lay.status_topic}, {"topic": lay.availability(node.id)}],
        "availability_mode": "all",
        "device": {
            "identifiers": [f"{lay.gateway_ids}_{node.id}"],
            "name": node.name,
            "manufacturer": "iot-gateway",
            "model": f"{node.driver} device",
            "via_device": lay.gateway_ids,
        },
        "origin": {"name": "iot-gateway", "sw_version": VERSION},
    }
    command_topic = f"{state_topic}/set" if writable else None
    if command_topic is not None:
        cfg["command_topic"] = command_topic
    if component == "sensor" and options:
        cfg["device_class"] = "enum"
        cfg["options"] = list(options)
    elif component == "sensor" and spec.type in ("numeric", "integer"):
        dev_class = sensor_class(spec, unit)
        if unit:
            cfg["unit_of_measurement"] = unit
        if dev_class:
            cfg["device_class"] = dev_class
        cfg["state_class"] = "total_increasing" if dev_class in TOTALS else "measurement"
        if spec.decimals is not None:
            cfg["suggested_display_precision"] = spec.decimals
    elif component == "binary_sensor":
        dev_class = binary_class(spec, kind)
        if dev_class:
            cfg["device_class"] = dev_class
    elif component == "number":
        cfg["min"] = spec.min if spec.min is not None else -UNBOUNDED
        cfg["max"] = spec.max if spec.max is not None else UNBOUNDED
        cfg["step"] = _step(spec)
        cfg["mode"] = "slider" if spec.min is not None and spec.max is not None else "box"
        if unit:
            cfg["unit_of_measurement"] = unit
        dev_class = sensor_class(spec, unit)
        if dev_class in NUMBER_CLASSES:
            cfg["device_class"] = dev_class
    elif component == "select":
        cfg["options"] = list(options)
    elif component == "text":
        cfg["max"] = TEXT_MAX
    obj = spec.name
    return Entity(ref, component, lay.config(component, node.id, obj), cfg, state_topic, command_topic, spec)


def gateway_entity(name: str, lay: Layout) -> Entity:
    """The gateway's own device in Home Assistant: one connectivity sensor on the broker status topic."""
    cfg: dict[str, Any] = {
        "name": "Status",
        "unique_id": f"{lay.node_id}.status",
        "default_entity_id": entity_id("binary_sensor", lay.node_id, "status"),
        "state_topic": lay.status_topic,
        "payload_on": ONLINE,
        "payload_off": OFFLINE,
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "device": {
            "identifiers": [lay.gateway_ids],
            "name": name,
            "manufacturer": "iot-gateway",
            "model": "iot-gateway",
            "sw_version": VERSION,
        },
        "origin": {"name": "iot-gateway", "sw_version": VERSION},
    }
    topic = f"{lay.prefix}/binary_sensor/{lay.node_id}/status/config"
    return Entity("", "binary_sensor", topic, cfg, lay.status_topic)


def state_payload(value: Value, decimals: int | None) -> str:
    """A value as Home Assistant reads it: ON/OFF, numbers as text (to the field's decimals)."""
    if isinstance(value, bool):
        return ON if value else OFF
    if isinstance(value, float):
        return f"{value:.{decimals}f}" if decimals is not None else repr(value)
    return str(value)


def command_value(spec: FieldSpec, text: str) -> Any:
    """What a command payload means for the hub: Home Assistant sends numbers as `42.0` or `42`."""
    if spec.type in ("numeric", "integer"):
        try:
            return float(text)
        except ValueError:
            return text  # the hub refuses it, with the reason, and audits it
    return text


# ---------------------------------------------------------------- the bridge


@dataclass
class _Pending:
    """Retained messages waiting to go out, latest per topic."""

    messages: dict[str, str] = field(default_factory=dict)
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, topic: str, payload: str) -> None:
        self.messages.pop(topic, None)  # keep the order of the latest
        self.messages[topic] = payload
        self.event.set()


class HomeAssistant:
    """Publishes discovery, states and availability of the gateway's own devices; applies Home Assistant's commands."""

    id = "[homeassistant]"  # how the shared broker knows its users; no device id has brackets

    def __init__(self, hub: Hub, config: Config, ctx: Sharing, state: StateDir):
        ha = config.homeassistant
        if ha is None:
            raise ValueError("no [homeassistant] section")
        self.hub = hub
        self.config = config
        self.section: HomeAssistantSection = ha
        self.ctx = ctx
        self.state = state
        self.actor = Actor(ACTOR, ha.role, VIA)
        self.broker: Broker | None = None
        self.layout: Layout | None = None
        self.entities: dict[str, Entity] = {}  # ref -> entity
        self._by_command: dict[str, Entity] = {}  # command topic -> entity
        self._nodes: list[str] = []  # devices with at least one entity
        self._published: dict[str, str] = {}  # state topic -> the payload last queued
        self._pending = _Pending()
        self._commands: asyncio.Queue[tuple[Entity, str]] = asyncio.Queue(QUEUE)
        self._tasks: list[asyncio.Task[None]] = []
        self._cleared = False  # what an earlier run left is cleared once per start
        self._throttle = Throttle(logger=log, noise=hub.noise)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Attach to the shared broker, build the entities and subscribe to the hub."""
        broker = Broker.shared(self.ctx)
        self.broker = broker
        self.layout = lay = layout(self.config, broker.status_topic)
        if self.section.enabled:
            self.entities = self._build(lay)
            self._by_command = {e.command_topic: e for e in self.entities.values() if e.command_topic}
            self._nodes = list(dict.fromkeys(ref.split(".")[0] for ref in self.entities))
            if self.section.commands:
                broker.route(self, f"{lay.base}/+/+/set", self._on_command, command=True)
            broker.route(self, f"{lay.prefix}/status", self._on_ha_status)
            self.hub.subscribe(self, reading=self._on_reading, health=self._on_health)
            self._tasks.append(asyncio.create_task(self._run_commands(), name="homeassistant-commands"))
            log.info(
                "homeassistant: %d entities of %d devices under %s/…/%s_*, states under %s, commands %s",
                len(self.entities), len(self._nodes),
                lay.prefix, lay.node_id, lay.base,
                "on" if self.section.commands else "off (read-only)",
            )
        self._tasks.append(asyncio.create_task(self._run_publish(), name="homeassistant-publish"))
        broker.attach(self)  # calls broker_up at once if the connection is already there

    async def stop(self) -> None:
        """Stop publishing; the broker's `offline` status makes every entity unavailable."""
        self.hub.unsubscribe_all(self)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("homeassistant: %s failed", task.get_name())
        self._tasks.clear()
        broker, self.broker = self.broker, None
        if broker is not None:
            await broker.leave(self.ctx, self)

    def _build(self, lay: Layout) -> dict[str, Entity]:
        kinds = {
            (d.id, f.name): getattr(f, "kind", None) for d in self.config.devices for f in getattr(d, "fields", [])
        }
        excluded = set(self.section.exclude)
        found: set[str] = set()
        entities: dict[str, Entity] = {}
        for node in self.hub.nodes.values():
            if node.driver in NOT_EXPORTED:
                continue
            if node.id in excluded:
                found.add(node.id)
                continue
            for f in node.fields.values():
                if f.ref in excluded:
                    found.add(f.ref)
                    continue
                entities[f.ref] = build(node, f, lay, kinds.get((node.id, f.name)), self.section.commands)
        for ref in sorted(excluded - found):
            log.warning("homeassistant: exclude names %r, which is no field or device of this gateway", ref)
        return entities

    # ------------------------------------------------------------ broker state (called by the Broker)

    def broker_up(self) -> None:
        """Connected (again): (re)publish every config, availability and state; clear what is gone."""
        lay = self.layout
        if lay is None:
            return
        messages = self._everything()
        if not self._cleared:
            self._cleared = True
            topics = self._topics()
            stored = self.state.load(STATE_FILE, {})
            old = stored.get("retained", []) if isinstance(stored, dict) else []
            gone = [t for t in old if isinstance(t, str) and t not in set(topics)]
            for topic in gone:
                self._pending.put(topic, "")  # an empty retained message deletes it (and the entity)
            if gone:
                log.info("homeassistant: clearing %d retained topics of devices or fields no longer published", len(gone))
            self._save(topics)
        for topic, payload in messages.items():
            self._pending.put(topic, payload)
        self._pending.event.set()

    def broker_down(self, reason: str) -> None:
        """Disconnected: what is pending waits for the next `broker_up`."""

    def _topics(self) -> list[str]:
        """Every retained topic of this run, states not sent yet included (a later run clears what is gone)."""
        lay = self.layout
        assert lay is not None
        if not self.entities:
            return []
        topics = [gateway_entity(self.config.gateway.name, lay).config_topic]
        topics += [e.config_topic for e in self.entities.values()]
        topics += [lay.availability(n) for n in self._nodes]
        topics += [e.state_topic for e in self.entities.values()]
        return topics

    def _everything(self) -> dict[str, str]:
        """What to publish (retained) on every connection: configs first, then availability and states."""
        lay = self.layout
        assert lay is not None
        out: dict[str, str] = {}
        if not self.entities:
            return out
        gw = gateway_entity(self.config.gateway.name, lay)
        out[gw.config_topic] = _json(gw.config)
        for e in self.entities.values():
            out[e.config_topic] = _json(e.config)
        for node_id in self._nodes:
            out[lay.availability(node_id)] = self._availability(self.hub.nodes[node_id].health)
        for e in self.entities.values():
            f = self.hub.field(e.ref)
            if f.latest is not None:
                payload = state_payload(f.latest.value, f.spec.decimals)
                self._published[e.state_topic] = payload
                out[e.state_topic] = payload
        return out

    def _save(self, topics: list[str]) -> None:
        try:
            self.state.save(STATE_FILE, {"retained": topics})
        except SaveError as e:
            log.warning("homeassistant: %s; removed devices may stay in Home Assistant", e)

    @staticmethod
    def _availability(health: HealthState) -> str:
        return ONLINE if health.state is Health.OK else OFFLINE

    # ------------------------------------------------------------ hub listeners

    def _on_reading(self, f: Field, reading: Reading) -> None:
        e = self.entities.get(f.ref)
        if e is None:
            return
        payload = state_payload(reading.value, f.spec.decimals)
        if self._published.get(e.state_topic) == payload:
            return  # states go out on change
        self._published[e.state_topic] = payload
        self._pending.put(e.state_topic, payload)

    def _on_health(self, node: Node, old: HealthState) -> None:
        lay = self.layout
        if lay is None or node.driver in NOT_EXPORTED:
            return
        if node.id in self._nodes and self._availability(node.health) != self._availability(old):
            self._pending.put(lay.availability(node.id), self._availability(node.health))

    # ------------------------------------------------------------ publishing

    async def _run_publish(self) -> None:
        """Send what is pending, latest per topic; keep what the broker did not take for the next connection."""
        pending = self._pending
        while True:
            await pending.event.wait()
            pending.event.clear()
            broker = self.broker
            if broker is None or not broker.connected or not pending.messages:
                continue
            batch, pending.messages = pending.messages, {}
            # The door's edge: names and values from devices may hold what no UTF-8 text should.
            results = await asyncio.gather(
                *(broker.publish(t, clean(p), True) for t, p in batch.items()), return_exceptions=True
            )
            for (topic, payload), result in zip(batch.items(), results):
                if isinstance(result, MqttError):
                    pending.messages.setdefault(topic, payload)  # unless a newer one is queued
                    self._throttle.warn("homeassistant: publishing failed", f"homeassistant: could not publish to {topic}: {result}")
                elif isinstance(result, BaseException):
                    log.error("homeassistant: publishing to %s failed", topic, exc_info=result)

    # ------------------------------------------------------------ commands

    def _on_command(self, sub: str, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a retained command being cleared
        e = self._by_command.get(topic)
        if e is None:
            self._throttle.warn(
                "homeassistant: commands on unknown topics", f"homeassistant: command on {topic} ignored: no writable field of this gateway is published there"
            )
            return
        text = payload[:MAX_COMMAND + 1].decode("utf-8", "replace").strip()
        try:
            self._commands.put_nowait((e, text))
        except asyncio.QueueFull:
            self._throttle.warn("homeassistant: commands dropped (queue full)", f"homeassistant: more than {QUEUE} commands waiting: {e.ref} {text[:40]!r} dropped")

    async def _run_commands(self) -> None:
        """Apply commands one at a time, in the order they came."""
        while True:
            e, text = await self._commands.get()
            await self.apply(e, text)

    async def apply(self, e: Entity, text: str) -> None:
        """Set `e`'s field to what Home Assistant sent, through the hub (role, type, bounds, audit)."""
        assert e.spec is not None
        try:
            await self.hub.write(e.ref, command_value(e.spec, text), self.actor)
        except (Forbidden, HubError, BadValue) as err:
            log.warning("homeassistant: %s %r refused: %s", e.ref, text[:40], err)
            # Home Assistant may show what it asked for: show it the field's actual state again.
            latest = self.hub.field(e.ref).latest
            if latest is not None:
                self._pending.put(e.state_topic, state_payload(latest.value, e.spec.decimals))
        except Exception:
            log.exception("homeassistant: setting %s failed", e.ref)

    def _on_ha_status(self, sub: str, topic: str, payload: bytes) -> None:
        """Home Assistant (re)started: it asks for every config again."""
        if payload.strip().lower() == b"online" and self.broker is not None and self.broker.connected:
            # Logged once a minute: a flapping status topic must not fill the log (counts in `status`).
            self._throttle.info(
                f"homeassistant: Home Assistant online on {topic}", "homeassistant: Home Assistant is online; publishing every entity again"
            )
            self.broker_up()


def _json(doc: dict[str, Any]) -> str:
    return json.dumps(_cleaned(doc), ensure_ascii=False, separators=(",", ":"))


def _cleaned(doc: Any) -> Any:
    """`doc` with every string in it cleaned (values.clean): JSON would keep a control character
    in a name as an escape, which Home Assistant then shows."""
    if isinstance(doc, str):
        return clean(doc)
    if isinstance(doc, dict):
        return {k: _cleaned(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_cleaned(v) for v in doc]
    return doc
