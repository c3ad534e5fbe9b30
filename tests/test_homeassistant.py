"""Home Assistant sees the gateway's own devices: MQTT discovery through a real Mosquitto.

Every discovery payload the gateway publishes is checked against Home
Assistant's documented schema (tests/discovery/ha_schema.json, extracted from
Home Assistant 2026.2.3): required keys, allowed device and state classes,
units that fit the device class. Commands come from a plain MQTT client, as
Home Assistant would send them, and go through the hub (role, bounds, audit).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from gpiozero.pins.mock import MockFactory
from paho.mqtt.enums import CallbackAPIVersion

from gateway.app import Gateway
from gateway.config import Config, ConfigError, parse
from gateway.auth import Actor
from gateway.mqtt.homeassistant import Layout, build, layout, state_payload
from gateway.hub import FieldSpec, Health, Hub
from gateway.demo.localservers import Mosquitto
from gateway.noise import Noise, Throttle
from tests.helpers import until
from tests.test_kernel import W1_ID, FakeSys
from tests.test_mqtt import Publisher
from tests.test_gpio import pins  # noqa: F401  (gpiozero's MockFactory, a fixture)

SCHEMA = json.loads((Path(__file__).parent / "discovery" / "ha_schema.json").read_text())
# The MQTT `text` entity is not in ha_schema.json: its rules from Home Assistant's mqtt/text.py.
TEXT = {"required": ["command_topic"], "max": 255}
COMMON = set(SCHEMA["common_optional"]) | {"name", "unique_id", "device", "origin", "qos"}


# ---------------------------------------------------------------- Home Assistant's schema


def ha_problems(component: str, doc: dict[str, Any]) -> list[str]:
    """Why Home Assistant would reject (or warn about) this discovery payload; [] when it is fine."""
    comps = SCHEMA["components"]
    if component == "text":
        rules: dict[str, Any] = {"required": TEXT["required"], "optional": {"state_topic": 1, "max": 1, "min": 1, "mode": 1}}
    elif component in comps:
        rules = comps[component]
    else:
        return [f"component {component!r} not checked by this test"]
    out = [f"missing required {k}" for k in rules["required"] if k not in doc]
    known = COMMON | set(rules["required"]) | set(rules["optional"])
    out += [f"unknown key {k}" for k in doc if k not in known]
    if "unique_id" not in doc:
        out.append("no unique_id: the entity cannot be linked to its device")
    if "object_id" in doc:
        out.append("object_id is deprecated: use default_entity_id")
    if ("availability" in doc) and ("availability_topic" in doc):
        out.append("availability and availability_topic are exclusive")
    for a in doc.get("availability", []):
        if "topic" not in a:
            out.append("an availability entry without a topic")
    if doc.get("availability_mode", "latest") not in SCHEMA["availability_modes"]:
        out.append(f"availability_mode {doc['availability_mode']!r}")
    if doc.get("entity_category") not in (None, *SCHEMA["entity_categories"]):
        out.append(f"entity_category {doc['entity_category']!r}")
    dev = doc.get("device")
    if dev is not None:
        out += [f"unknown device key {k}" for k in dev if k not in SCHEMA["device_block"]["keys"]]
        if not dev.get("identifiers") and not dev.get("connections"):
            out.append("device block without identifiers or connections")
        if "name" not in dev:
            out.append("device block without a name")
    if "origin" in doc and "name" not in doc["origin"]:
        out.append("origin without a name")
    dc = doc.get("device_class")
    if dc is not None and "device_classes" in rules and dc not in rules["device_classes"]:
        out.append(f"device_class {dc!r} is not one of {component}'s")
    unit = doc.get("unit_of_measurement")
    unit = SCHEMA["ambiguous_units"].get(unit, unit)
    if component == "sensor":
        sc = doc.get("state_class")
        if sc is not None and sc not in rules["state_classes"]:
            out.append(f"state_class {sc!r}")
        allowed = rules["device_class_units"].get(dc) if dc else None
        if allowed is not None and unit not in allowed:
            out.append(f"unit {unit!r} does not fit device_class {dc!r} (allowed: {allowed})")
        if dc and sc and sc not in rules["device_class_state_classes"].get(dc, [sc]):
            out.append(f"state_class {sc!r} is not one of device_class {dc!r}'s")
        if "options" in doc and (dc != "enum" or sc or unit):
            out.append("options need device_class enum and no state_class or unit")
        if dc in rules["non_numeric_device_classes"] and (sc or unit):
            out.append(f"device_class {dc!r} is not numeric: no state_class or unit")
    if component == "number":
        if doc.get("min", 0.0) > doc.get("max", 100.0):
            out.append("min > max")
        if doc.get("step", 1.0) < 0.001:
            out.append("step < 0.001")
        if doc.get("mode", "auto") not in rules["modes"]:
            out.append(f"mode {doc['mode']!r}")
        allowed = rules["device_class_units"].get(dc) if dc else None
        if allowed is not None and unit not in allowed:
            out.append(f"unit {unit!r} does not fit device_class {dc!r}")
    if component == "select" and not doc.get("options"):
        out.append("select without options")
    if component == "text" and doc.get("max", 255) > TEXT["max"]:
        out.append("text max above 255")
    return out


def test_the_schema_check_rejects_what_home_assistant_rejects() -> None:
    """The validator itself can fail: the invalid examples of tests/discovery/ha_discovery.md."""
    dev = {"identifiers": ["x"], "name": "X"}
    base = {"unique_id": "u", "device": dev}
    assert any("unit" in p for p in ha_problems("sensor", {**base, "state_topic": "t", "device_class": "temperature", "unit_of_measurement": "C"}))
    assert any("options" in p for p in ha_problems("select", {**base, "command_topic": "t/set"}))
    assert any("command_topic" in p for p in ha_problems("switch", {**base, "state_topic": "t"}))
    assert "min > max" in ha_problems("number", {**base, "command_topic": "t/set", "min": 10, "max": 5})
    assert any("identifiers" in p for p in ha_problems("sensor", {"unique_id": "u", "state_topic": "t", "device": {"name": "X"}}))
    assert any("device_class" in p for p in ha_problems("binary_sensor", {**base, "state_topic": "t", "device_class": "temperature"}))
    assert ha_problems("sensor", {**base, "state_topic": "t", "device_class": "temperature", "unit_of_measurement": "°C"}) == []


def test_entities_for_every_kind_of_field_pass_the_schema() -> None:
    """Units in Home Assistant's spelling, meters as totals, unbounded numbers, enums as select/enum sensor."""
    specs = [
        FieldSpec("reactive", unit="VAr"),
        FieldSpec("today", unit="kWh", decimals=3),
        FieldSpec("battery", type="integer", unit="%"),
        FieldSpec("setpoint", unit="°C", writable=True),
        FieldSpec("fan", writable=True, min=0.0, max=1.0),
        FieldSpec("rpm", type="integer", unit="rpm"),
        FieldSpec("door", type="boolean"),
        FieldSpec("note", type="string", writable=True),
    ]
    if "choices" in FieldSpec.__dataclass_fields__:  # enum fields of discovered devices
        specs += [
            FieldSpec("mode", type="string", writable=True, choices=("eco", "comfort")),  # type: ignore[call-arg]
            FieldSpec("phase", type="string", choices=("idle", "heating")),  # type: ignore[call-arg]
        ]
    hub = Hub()
    node = hub.add_node("box", "Box", "serial", specs)
    lay = Layout("homeassistant", "gw1", "iot-gateway/gw1", "iot-gateway-gw1/status")
    built = {f.name: build(node, f, lay, None) for f in node.fields.values()}
    assert {n: ha_problems(e.component, e.config) for n, e in built.items() if ha_problems(e.component, e.config)} == {}
    assert built["reactive"].config["unit_of_measurement"] == "var"
    assert (built["reactive"].config["device_class"], built["battery"].config["device_class"]) == ("reactive_power", "battery")
    assert built["today"].config["state_class"] == "total_increasing"
    setpoint = built["setpoint"].config
    assert (built["setpoint"].component, setpoint["mode"], setpoint["min"], setpoint["device_class"]) == ("number", "box", -1e9, "temperature")
    assert built["fan"].config["step"] == 0.01
    assert "device_class" not in built["rpm"].config and built["rpm"].config["state_class"] == "measurement"
    assert built["door"].config["device_class"] == "door" and built["note"].component == "text"
    assert built["setpoint"].config_topic == "homeassistant/number/gw1_box/setpoint/config"
    if "mode" in built:
        assert (built["mode"].component, built["mode"].config["options"]) == ("select", ["eco", "comfort"])
        assert (built["phase"].component, built["phase"].config["device_class"]) == ("sensor", "enum")
    assert [state_payload(v, d) for v, d in [(True, None), (21.456, 1), (0.1, None), (7, None)]] == ["ON", "21.5", "0.1", "7"]


# ---------------------------------------------------------------- MQTT helpers


def retained(port: int, *filters: str) -> dict[str, str]:
    """Every retained message under `filters` now: a fresh client subscribes, then publishes a marker;
    the broker sends the retained messages before the marker, so when it arrives, all are in."""
    marker = "ha-test-marker/" + uuid.uuid4().hex
    got: dict[str, str] = {}
    done = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="snap-" + uuid.uuid4().hex[:8])

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == marker:
            done.set()
        elif msg.retain:
            got[msg.topic] = msg.payload.decode()

    c.on_message = on_message
    c.on_subscribe = lambda *_a: c.publish(marker, b"x", qos=1)
    c.on_connect = lambda *_a: c.subscribe([(f, 1) for f in (*filters, marker)])
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert done.wait(10), "the marker did not come back"
    finally:
        c.disconnect()
        c.loop_stop()
    return got


class Watcher:
    """A client that keeps every message under some filters: (topic, payload, retained)."""

    def __init__(self, port: int, *filters: str, auth: tuple[str, str] | None = None, session: str | None = None):
        """`session`: a client id whose persistent session (QoS 1 subscriptions) stays on the broker."""
        self.messages: list[tuple[str, str, bool]] = []
        ready = threading.Event()
        c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=session or "watch-" + uuid.uuid4().hex[:8], clean_session=session is None
        )
        if auth is not None:
            c.username_pw_set(*auth)
        c.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload.decode(), bool(m.retain)))
        c.on_connect = lambda *_a: c.subscribe([(f, 1) for f in filters])
        c.on_subscribe = lambda *_a: ready.set()
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert ready.wait(10), "watcher could not subscribe"
        self.client = c

    def last(self, topic: str) -> str | None:
        """The latest payload seen on `topic`."""
        for t, p, _r in reversed(list(self.messages)):
            if t == topic:
                return p
        return None

    def live(self, topic: str) -> int:
        """How many messages on `topic` arrived live (not as retained ones on subscribing)."""
        return sum(1 for t, _p, r in list(self.messages) if t == topic and not r)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def ids() -> dict[str, str]:
    """A discovery prefix, node id and client id of this test's own, on the suite's shared broker."""
    tag = uuid.uuid4().hex[:8]
    return {"prefix": f"ha-{tag}", "node": f"gw-{tag}", "client": f"iot-gateway-test-{tag}"}


SIM = {
    "id": "sim",
    "name": "Simulated box",
    "driver": "simulated",
    "interval": 0.2,
    "fields": [
        {"name": "temp", "unit": "°C", "decimals": 1, "noise": 0},
        {"name": "relay", "type": "boolean", "writable": True},
        {"name": "speed", "type": "integer", "writable": True, "min": 0, "max": 100},
        {"name": "label", "type": "string", "writable": True, "initial": "hello"},
        {"name": "mode", "type": "string"},
    ],
}
PLUG = {  # an mqtt device: Home Assistant reads it from the broker itself, so it is not re-exported
    "id": "plug",
    "driver": "mqtt",
    "fields": [{"name": "power", "unit": "W", "topic": "ha-test/plug/power"}],
}


def ha_config(mosquitto: Mosquitto, tmp_path: Path, ids: dict[str, str], devices: list[dict[str, Any]], **ha: Any) -> Config:
    return parse(
        {
            "gateway": {"name": "HA test", "state_dir": str(tmp_path / "state")},
            "mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto.port}", "client_id": ids["client"]},
            "homeassistant": {"discovery_prefix": ids["prefix"], "node_id": ids["node"], "commands": True, **ha},
            "devices": devices,
        }
    )


@asynccontextmanager
async def started(config: Config) -> AsyncIterator[Gateway]:
    gw = Gateway(config)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def wait_retained(port: int, pred: Any, what: str, *filters: str) -> dict[str, str]:
    """Snapshots of the retained messages until `pred(snapshot)` holds (at most 50 tries, 0.1 s apart)."""
    snap: dict[str, str] = {}
    for _ in range(50):
        snap = await asyncio.to_thread(retained, port, *filters)
        if pred(snap):
            return snap
        await asyncio.sleep(0.1)
    raise AssertionError(f"never saw {what}; retained: {sorted(snap)}")


def configs(snap: dict[str, str], prefix: str) -> dict[str, dict[str, Any]]:
    return {t: json.loads(p) for t, p in snap.items() if t.startswith(prefix + "/") and t.endswith("/config") and p}


# ---------------------------------------------------------------- discovery


async def test_every_field_of_simulated_kernel_and_gpio_devices_is_discovered_valid_and_retained(
    mosquitto: Mosquitto, tmp_path: Path, ids: dict[str, str], pins: MockFactory,  # noqa: F811
) -> None:
    sysfs = FakeSys(tmp_path / "sys")
    sysfs.ds18b20(W1_ID, 21500)
    sysfs.chip("iio", "iio:device0", "bme280", in_humidityrelative_input="45500", in_pressure_input="100.523")
    cpu = tmp_path / "cpu_temp"
    cpu.write_text("48312\n")
    kernel = {
        "id": "pi", "driver": "kernel", "interval": 1, **sysfs.roots(),
        "fields": [
            {"name": "soil", "sensor": f"w1:{W1_ID}"},
            {"name": "humidity", "sensor": "iio:bme280:humidityrelative"},
            {"name": "pressure", "sensor": "iio:bme280:pressure"},
        ],
    }
    gpio = {
        "id": "pins", "name": "Pins", "driver": "gpio",
        "fields": [
            {"name": "pir", "kind": "motion_sensor", "pin": 4},
            {"name": "lamp", "kind": "led", "pin": 17},
            {"name": "fan", "kind": "pwm_output", "pin": 18},
            {"name": "cpu", "kind": "cpu_temperature", "path": str(cpu), "interval": 0.2},
        ],
    }
    p, node = ids["prefix"], ids["node"]
    base = f"iot-gateway/{node}"
    config = ha_config(mosquitto, tmp_path, ids, [SIM, kernel, gpio, PLUG])
    expected = {
        f"{p}/binary_sensor/{node}/status/config",
        *(f"{p}/{c}/{node}_sim/{f}/config" for c, f in [("sensor", "temp"), ("switch", "relay"), ("number", "speed"), ("text", "label"), ("sensor", "mode")]),
        *(f"{p}/sensor/{node}_pi/{f}/config" for f in ("soil", "humidity", "pressure")),
        *(f"{p}/{c}/{node}_pins/{f}/config" for c, f in [("binary_sensor", "pir"), ("switch", "lamp"), ("number", "fan"), ("sensor", "cpu")]),
    }
    async with started(config) as gw:
        snap = await wait_retained(
            mosquitto.port,
            lambda s: set(configs(s, p)) == expected and f"{base}/pi/soil" in s and f"{base}/pins/cpu" in s,
            "every config and the first states", f"{p}/#", f"{base}/#",
        )
        docs = configs(snap, p)
        problems = {t: ha_problems(t.split("/")[1], d) for t, d in docs.items()}
        assert {t: v for t, v in problems.items() if v} == {}

        gw_ids = f"iot-gateway_{node}"
        status = f"{ids['client']}/status"
        gateway = docs[f"{p}/binary_sensor/{node}/status/config"]
        assert gateway["device"]["identifiers"] == [gw_ids] and gateway["state_topic"] == status
        for topic, d in docs.items():
            if "status/config" in topic:
                continue
            dev_id = topic.split("/")[2].removeprefix(node + "_")
            assert d["device"]["via_device"] == gw_ids
            assert d["device"]["identifiers"] == [f"{gw_ids}_{dev_id}"]
            assert d["availability"] == [{"topic": status}, {"topic": f"{base}/{dev_id}"}]
            assert d["availability_mode"] == "all"
        assert len({json.dumps(d["device"]["identifiers"]) for d in docs.values()}) == 4  # the gateway and 3 devices
        assert not any("plug" in t for t in snap)  # mqtt devices are not re-exported

        temp = docs[f"{p}/sensor/{node}_sim/temp/config"]
        assert (temp["device_class"], temp["unit_of_measurement"], temp["state_class"]) == ("temperature", "°C", "measurement")
        assert temp["state_topic"] == f"{base}/sim/temp" and temp["suggested_display_precision"] == 1
        assert temp["device"]["name"] == "Simulated box" and temp["name"] == "Temp"
        relay = docs[f"{p}/switch/{node}_sim/relay/config"]
        assert (relay["state_topic"], relay["command_topic"]) == (f"{base}/sim/relay", f"{base}/sim/relay/set")
        speed = docs[f"{p}/number/{node}_sim/speed/config"]
        assert (speed["min"], speed["max"], speed["step"], speed["mode"]) == (0, 100, 1, "slider")
        fan = docs[f"{p}/number/{node}_pins/fan/config"]
        assert (fan["min"], fan["max"]) == (0.0, 1.0)
        assert docs[f"{p}/sensor/{node}_pi/humidity/config"]["device_class"] == "humidity"
        assert docs[f"{p}/sensor/{node}_pi/pressure/config"]["unit_of_measurement"] == "hPa"
        assert docs[f"{p}/binary_sensor/{node}_pins/pir/config"]["device_class"] == "motion"
        assert "device_class" not in docs[f"{p}/sensor/{node}_sim/mode/config"]

        assert (snap[f"{base}/sim"], snap[f"{base}/pi"], snap[f"{base}/pins"]) == ("online",) * 3
        assert snap[f"{base}/pi/soil"] == "21.50" and snap[f"{base}/sim/relay"] == "OFF"
        assert snap[f"{base}/sim/label"] == "hello" and snap[f"{base}/pins/cpu"] == "48.3"

        # States go out on change, retained; availability follows health.
        watcher = Watcher(mosquitto.port, f"{base}/#")
        try:
            await asyncio.to_thread(pins.pin(4).drive_high)
            await until(lambda: watcher.last(f"{base}/pins/pir") == "ON", "pir ON")
            gw.hub.set_health("pi", Health.OFFLINE, "sensor gone")
            await until(lambda: watcher.last(f"{base}/pi") == "offline", "pi offline")
            gw.hub.set_health("pi", Health.OK)
            await until(lambda: watcher.last(f"{base}/pi") == "online", "pi back online")
            # The cpu file keeps the same value: its readings are not news, and not published.
            history = gw.hub.field("pins.cpu").history
            n = len(history)
            await until(lambda: len(history) >= n + 3, "three more cpu readings")
            await asyncio.to_thread(pins.pin(4).drive_low)  # published after them, in order
            await until(lambda: watcher.last(f"{base}/pins/pir") == "OFF", "pir OFF")
            assert watcher.live(f"{base}/pins/cpu") == 0
        finally:
            watcher.stop()
    # Stopped: the broker connection's status is `offline`, so every entity is unavailable.
    snap = await asyncio.to_thread(retained, mosquitto.port, status)
    assert snap[status] == "offline"


async def test_home_assistant_asking_again_gets_every_config_again(
    mosquitto: Mosquitto, tmp_path: Path, ids: dict[str, str]
) -> None:
    p, node = ids["prefix"], ids["node"]
    topic = f"{p}/sensor/{node}_sim/temp/config"
    async with started(ha_config(mosquitto, tmp_path, ids, [SIM])):
        await wait_retained(mosquitto.port, lambda s: topic in s, "the temp config", f"{p}/#")
        watcher = Watcher(mosquitto.port, f"{p}/#")
        pub = Publisher(mosquitto.port)
        try:
            assert watcher.live(topic) == 0
            await pub.send(f"{p}/status", "online")  # Home Assistant's birth message
            await until(lambda: watcher.live(topic) == 1, "the config published again")
        finally:
            pub.stop()
            watcher.stop()


# ---------------------------------------------------------------- commands


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[Publisher]:
    pub = Publisher(mosquitto.port)
    yield pub
    pub.stop()


async def test_a_command_from_home_assistant_is_applied_audited_and_reported(
    mosquitto: Mosquitto, tmp_path: Path, ids: dict[str, str], publisher: Publisher
) -> None:
    base = f"iot-gateway/{ids['node']}"
    async with started(ha_config(mosquitto, tmp_path, ids, [SIM, PLUG], exclude=["sim.mode"])) as gw:
        hub = gw.hub
        await wait_retained(mosquitto.port, lambda s: f"{base}/sim/relay" in s, "the relay state", f"{base}/#")
        watcher = Watcher(mosquitto.port, f"{base}/#")
        try:
            await publisher.send(f"{base}/sim/relay/set", "ON")  # what a Home Assistant switch sends
            await until(lambda: len(hub.audit.entries) == 1, "the set audited")
            assert hub.field("sim.relay").latest.value is True
            await until(lambda: watcher.last(f"{base}/sim/relay") == "ON", "the new state published")
            entry = hub.audit.entries[-1]
            assert entry.line() == "homeassistant via mqtt: sim.relay off -> on"
            assert (entry.actor.role, entry.outcome) == ("operator", "applied")

            await publisher.send(f"{base}/sim/speed/set", "42.0")  # a number entity sends floats
            await until(lambda: len(hub.audit.entries) == 2, "the second set audited")
            assert hub.field("sim.speed").latest.value == 42
            assert hub.audit.entries[-1].line() == "homeassistant via mqtt: sim.speed 0 -> 42"

            # Out of bounds: refused, audited, not applied.
            await publisher.send(f"{base}/sim/speed/set", "150")
            await until(lambda: hub.audit.entries[-1].outcome == "refused", "the refusal audited")
            assert hub.audit.entries[-1].reason == "150 is above the maximum 100"
            assert hub.field("sim.speed").latest.value == 42
            # A topic of no published writable field (the mqtt device, an excluded or read-only field): ignored.
            before = len(hub.audit.entries)
            for topic in (f"{base}/plug/power/set", f"{base}/sim/mode/set", f"{base}/sim/temp/set"):
                await publisher.send(topic, "1")
            await publisher.send(f"{base}/sim/relay/set", "OFF")  # commands run in order: this one comes last
            await until(lambda: len(hub.audit.entries) > before, "the last command audited")
            assert [e.line() for e in list(hub.audit.entries)[before:]] == ["homeassistant via mqtt: sim.relay on -> off"]
        finally:
            watcher.stop()


async def test_a_retained_command_is_never_applied(
    mosquitto: Mosquitto, tmp_path: Path, ids: dict[str, str], publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    """A command someone published retained would otherwise flip the relay at every start and reconnect."""
    base = f"iot-gateway/{ids['node']}"
    await publisher.send(f"{base}/sim/relay/set", "ON", retain=True)
    try:
        async with started(ha_config(mosquitto, tmp_path, ids, [SIM])) as gw:
            await wait_retained(mosquitto.port, lambda s: f"{base}/sim/relay" in s, "the relay state", f"{base}/#")
            await until(lambda: "ignored a retained message on" in caplog.text, "the retained command ignored")
            await publisher.send(f"{base}/sim/speed/set", "7")  # a live command after it is still carried out
            await until(lambda: len(gw.hub.audit.entries) == 1, "the live command audited")
            assert [e.line() for e in gw.hub.audit.entries] == ["homeassistant via mqtt: sim.speed 0 -> 7"]
            assert gw.hub.field("sim.relay").latest.value is False
    finally:
        await publisher.send(f"{base}/sim/relay/set", "", retain=True)  # clear it from the shared broker


async def test_a_command_published_while_the_gateway_was_away_is_never_run(
    mosquitto: Mosquitto, tmp_path: Path, ids: dict[str, str], publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    """A click in Home Assistant made while the gateway was stopped must not switch the relay when it
    comes back; a reading published meanwhile still arrives (the persistent session keeps readings)."""
    base = f"iot-gateway/{ids['node']}"
    meter_topic = f"ha-away/{ids['node']}/power"
    meter = {"id": "meter", "driver": "mqtt", "fields": [{"name": "power", "unit": "W", "topic": meter_topic}]}
    config = ha_config(mosquitto, tmp_path, ids, [SIM, meter])
    async with started(config):
        await wait_retained(mosquitto.port, lambda s: f"{base}/sim/relay" in s, "the relay state", f"{base}/#")
    # Stopped; its session (and subscriptions) stay on the broker.
    await publisher.send(f"{base}/sim/relay/set", "ON")
    await publisher.send(meter_topic, "17")
    await asyncio.sleep(2)  # the click is a few seconds old when the gateway is back
    async with started(config) as gw:
        await until(lambda: [r.value for r in gw.hub.field("meter.power").history] == [17.0], "the reading kept for us")
        await publisher.send(f"{base}/sim/speed/set", "7")  # a live command is still carried out
        await until(lambda: len(gw.hub.audit.entries) >= 1, "the live command audited")
        assert [e.line() for e in gw.hub.audit.entries] == ["homeassistant via mqtt: sim.speed 0 -> 7"]
        assert gw.hub.field("sim.relay").latest.value is False


async def test_a_command_kept_in_an_older_qos1_session_is_dropped_and_logged_with_its_topic(
    mosquitto: Mosquitto, tmp_path: Path, ids: dict[str, str], publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    """A session left by an older version (its `…/set` subscribed with QoS 1) holds a command
    published while the gateway was away: it arrives first thing on connecting, and is not run."""
    base = f"iot-gateway/{ids['node']}"
    Watcher(mosquitto.port, f"{base}/+/+/set", session=ids["client"]).stop()
    await publisher.send(f"{base}/sim/relay/set", "ON")
    async with started(ha_config(mosquitto, tmp_path, ids, [SIM])) as gw:
        await until(lambda: f"ignored a command on {base}/sim/relay/set kept by the broker" in caplog.text, "the drop logged")
        await publisher.send(f"{base}/sim/speed/set", "7")
        await until(lambda: len(gw.hub.audit.entries) >= 1, "the live command audited")
        assert [e.line() for e in gw.hub.audit.entries] == ["homeassistant via mqtt: sim.speed 0 -> 7"]
        assert gw.hub.field("sim.relay").latest.value is False


async def test_without_commands_every_entity_is_read_only_and_set_topics_are_not_heard(
    mosquitto: Mosquitto, tmp_path: Path, ids: dict[str, str], publisher: Publisher
) -> None:
    p, node = ids["prefix"], ids["node"]
    base = f"iot-gateway/{node}"
    config = ha_config(mosquitto, tmp_path, ids, [SIM], commands=False)
    assert parse({"mqtt": {}, "homeassistant": {}}).homeassistant.commands is False  # off by default
    relay = f"{p}/binary_sensor/{node}_sim/relay/config"
    async with started(config) as gw:
        snap = await wait_retained(mosquitto.port, lambda s: relay in s and f"{base}/sim/relay" in s, "the read-only relay", f"{p}/#", f"{base}/#")
        docs = {t: d for t, d in configs(snap, p).items() if f"/{node}_sim/" in t}
        assert {t.split("/")[1] for t in docs} == {"sensor", "binary_sensor"}
        assert [t for t, d in docs.items() if "command_topic" in d] == []
        assert {t: ha_problems(t.split("/")[1], d) for t, d in docs.items() if ha_problems(t.split("/")[1], d)} == {}
        speed = docs[f"{p}/sensor/{node}_sim/speed/config"]
        assert (speed["state_topic"], speed["state_class"]) == (f"{base}/sim/speed", "measurement")
        watcher = Watcher(mosquitto.port, f"{p}/#")
        try:
            await publisher.send(f"{base}/sim/relay/set", "ON")
            await publisher.send(f"{p}/status", "online")  # after the command: when the configs come again, it was not heard
            await until(lambda: watcher.live(relay) == 1, "the configs published again")
        finally:
            watcher.stop()
        assert list(gw.hub.audit.entries) == [] and gw.hub.field("sim.relay").latest.value is False


async def test_a_flapping_home_assistant_status_logs_one_line_and_counts_in_status(
    mosquitto: Mosquitto, tmp_path: Path, ids: dict[str, str], publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="iot_gateway.homeassistant")
    p = ids["prefix"]
    cause = f"homeassistant: Home Assistant online on {p}/status"
    async with started(ha_config(mosquitto, tmp_path, ids, [SIM])) as gw:
        await wait_retained(mosquitto.port, lambda s: f"{p}/sensor/{ids['node']}_sim/temp/config" in s, "the temp config", f"{p}/#")
        for i in range(100):
            await publisher.send(f"{p}/status", "offline" if i % 2 else "online")
        await until(lambda: cause in gw.hub.noise.counts and gw.hub.noise.counts[cause].times == 50, "50 births counted")
        said = [r for r in caplog.records if "Home Assistant is online" in r.getMessage()]
        assert len(said) == 1
        reply = await gw.commands.run("status", Actor("admin@x", "admin", "test"))
        assert f"repeated: {cause} ×50 (49 not logged)" in reply.splitlines(), reply


def test_ids_in_topics_come_from_the_gateway_id_never_the_jid() -> None:
    config = parse({
        "gateway": {"name": "Shed #2"}, "xmpp": {"jid": "gw@example.org", "password": "x"},
        "mqtt": {}, "homeassistant": {},
    })
    lay = layout(config, "iot-gateway-shed-2/status")
    assert (lay.node_id, lay.base) == ("shed-2", "iot-gateway/shed-2")
    config = parse({"gateway": {"id": "barn"}, "mqtt": {}, "homeassistant": {}})
    assert layout(config, "x/status").base == "iot-gateway/barn"


def test_a_throttle_logs_one_line_per_cause_per_interval_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    noise = Noise()
    t = Throttle(every=60, logger=logging.getLogger("t"), noise=noise, clock=lambda: now[0])
    assert [t.warn("a", "A") for _ in range(3)] == [True, False, False]
    assert t.warn("b", "B")  # another cause has its own line
    now[0] = 61
    assert t.warn("a", "A again")
    assert [r.getMessage() for r in caplog.records] == ["A", "B", "A again (2 more like it not logged)"]
    assert noise.lines() == ["repeated: a ×4 (2 not logged)"]


async def test_a_viewer_role_refuses_home_assistant_commands(
    mosquitto: Mosquitto, tmp_path: Path, ids: dict[str, str], publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    base = f"iot-gateway/{ids['node']}"
    async with started(ha_config(mosquitto, tmp_path, ids, [SIM], role="viewer")) as gw:
        hub = gw.hub
        await wait_retained(mosquitto.port, lambda s: f"{base}/sim/relay" in s, "the relay state", f"{base}/#")
        await publisher.send(f"{base}/sim/relay/set", "ON")
        await until(lambda: len(hub.audit.entries) == 1, "the refusal audited")
        entry = hub.audit.entries[0]
        assert (entry.actor.jid, entry.actor.via, entry.outcome) == ("homeassistant", "mqtt", "refused")
        assert entry.reason == "set needs the operator role, you are viewer"
        assert hub.field("sim.relay").latest.value is False
        assert any("sim.relay 'ON' refused" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- removal


async def test_a_device_or_field_removed_from_the_config_is_removed_from_home_assistant_on_the_next_start(
    mosquitto: Mosquitto, tmp_path: Path, ids: dict[str, str]
) -> None:
    p, node = ids["prefix"], ids["node"]
    base = f"iot-gateway/{node}"
    tank = {"id": "tank", "driver": "simulated", "interval": 0.2, "fields": [{"name": "level", "unit": "%"}]}
    filters = (f"{p}/#", f"{base}/#")
    both = ha_config(mosquitto, tmp_path, ids, [SIM, tank])
    async with started(both):
        await wait_retained(mosquitto.port, lambda s: f"{base}/tank/level" in s and f"{p}/sensor/{node}_sim/mode/config" in s, "tank and sim", *filters)

    sim_without_mode = {**SIM, "fields": [f for f in SIM["fields"] if f["name"] != "mode"]}
    async with started(ha_config(mosquitto, tmp_path, ids, [sim_without_mode])):
        snap = await wait_retained(
            mosquitto.port,
            lambda s: not any("tank" in t or "/mode" in t for t in s) and f"{p}/sensor/{node}_sim/temp/config" in s,
            "tank and sim.mode gone", *filters,
        )
        assert f"{base}/sim/temp" in snap

    # enabled = false: everything published before is removed.
    async with started(ha_config(mosquitto, tmp_path, ids, [sim_without_mode], enabled=False)):
        await wait_retained(mosquitto.port, lambda s: not configs(s, p) and not any(t.startswith(base + "/sim") for t in s), "nothing left", *filters)


# ---------------------------------------------------------------- config


def test_the_homeassistant_section_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"homeassistant: Home Assistant discovery needs an \[mqtt\] section"):
        parse({"homeassistant": {}})
    with pytest.raises(ConfigError, match=r"homeassistant.role: .*got 'root'"):
        parse({"mqtt": {}, "homeassistant": {"role": "root"}})
    with pytest.raises(ConfigError, match=r"homeassistant.discovery_prefix: 'home/#'"):
        parse({"mqtt": {}, "homeassistant": {"discovery_prefix": "home/#"}})
    with pytest.raises(ConfigError, match=r"homeassistant.exclude: 'a.b.c': name a device"):
        parse({"mqtt": {}, "homeassistant": {"exclude": ["a.b.c"]}})
    assert parse({}).homeassistant is None  # off by default
    ha = parse({"mqtt": {}, "homeassistant": {}}).homeassistant
    assert ha is not None and (ha.enabled, ha.role, ha.discovery_prefix) == (True, "operator", "homeassistant")
