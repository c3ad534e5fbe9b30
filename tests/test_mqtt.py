"""The mqtt driver against a real Mosquitto: payloads, availability, commands, outages."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

import gateway.mqtt.broker as mqtt
from devices.mqtt import (
    BadPayload,
    lookup,
    render,
    to_value,
)
from gateway.mqtt.broker import Broker, MqttError, default_client_id
from gateway.app import Gateway
from gateway.auth import Actor
from devices.mqtt_config import MqttField
from gateway.config import Config, ConfigError, parse
from gateway.hub import DeviceError, Health
from gateway.demo.localservers import Mosquitto, free_port, make_certs
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.contract import Contract, driver_contract
from tests.helpers import until

ROOT = Path(__file__).resolve().parent.parent
ADMIN = Actor("admin@example.org", "admin", "test")


# ---------------------------------------------------------------- helpers


def make_config(tmp_path: Path, url: str, devices: list[dict[str, Any]], **mqtt: Any) -> Config:
    """A config without XMPP for one broker; a fresh client id unless given."""
    mqtt.setdefault("client_id", "gw-" + uuid.uuid4().hex[:8])
    return parse(
        {
            "gateway": {"name": "MQTT test", "state_dir": str(tmp_path / "state")},
            "mqtt": {"url": url, **mqtt},
            "devices": devices,
        }
    )


def values(gw: Gateway, ref: str) -> list[Any]:
    return [r.value for r in gw.hub.field(ref).history]


def health(gw: Gateway, node: str) -> tuple[Health, str]:
    h = gw.hub.nodes[node].health
    return h.state, h.reason


def paho_threads(config: Config) -> list[str]:
    # There is no paho thread any more (paho runs on the event loop): this stays a check that none appears.
    """paho network threads of the gateway's MQTT client still running."""
    cid = config.mqtt.client_id if config.mqtt else None
    return [t.name for t in threading.enumerate() if t.name == f"paho-mqtt-client-{cid}"]


class Publisher:
    """Another MQTT client, as a device would be: a plain paho client on its own thread."""

    def __init__(self, port: int, user: str | None = None, password: str | None = None):
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="pub-" + uuid.uuid4().hex[:8])
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        deadline = time.monotonic() + 5
        while not self.client.is_connected():
            assert time.monotonic() < deadline, "publisher could not connect"
            time.sleep(0.01)

    async def send(self, topic: str, payload: str | bytes, retain: bool = False) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        await asyncio.to_thread(info.wait_for_publish, 5)
        assert info.is_published(), f"broker did not take {topic}"

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Any:
    pub = Publisher(mosquitto.port)
    yield pub
    pub.stop()


class Echo:
    """A device that reports on its state topic what it is told on its command topic (`states`:
    command topic -> (state topic, payload → state payload)); a plain paho client on its own thread."""

    def __init__(self, port: int, states: dict[str, tuple[str, Any]]):
        self.states = states
        self.heard: list[str] = []
        self._ready = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="echo-" + uuid.uuid4().hex[:8])
        c.reconnect_delay_set(1, 1)  # back quickly after a broker restart (it subscribes again on connect)
        c.on_connect = lambda *_a: c.subscribe([(t, 1) for t in states])
        c.on_subscribe = lambda *_a: self._ready.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert self._ready.wait(5), "echo device could not subscribe"
        self.client = c

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.heard.append(msg.payload.decode())
        topic, answer = self.states[msg.topic]
        client.publish(topic, answer(msg.payload.decode()), qos=1)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Watcher:
    """A real `mosquitto_sub`, known to be subscribed once it has printed a retained marker."""

    def __init__(self, proc: asyncio.subprocess.Process, early: list[str]):
        self.proc = proc
        self.early = early

    @classmethod
    async def start(cls, port: int, topic: str, count: int, pub: Publisher) -> Watcher:
        """Watch `topic` until `count` messages came (retained ones included)."""
        marker = "ready/" + uuid.uuid4().hex[:8]
        await pub.send(marker, "ready", retain=True)
        # Both filters go in one SUBSCRIBE, so the marker's arrival means `topic` is live too.
        proc = await asyncio.create_subprocess_exec(
            "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-v",
            "-t", topic, "-t", marker, "-C", str(count + 1), "-W", "10",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        early: list[str] = []
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().rstrip("\n")
            assert line, "mosquitto_sub ended before it was subscribed"
            if line == f"{marker} ready":
                return cls(proc, early)
            early.append(line)

    async def lines(self) -> list[str]:
        """What mosquitto_sub printed on `topic`, once it has its count."""
        out, err = await asyncio.wait_for(self.proc.communicate(), 12)
        assert self.proc.returncode == 0, err.decode()
        return self.early + out.decode().splitlines()


async def retained(port: int, topic: str) -> str:
    """The retained message on `topic`, read by a fresh mosquitto_sub (flag and payload)."""
    r = await asyncio.to_thread(
        subprocess.run,
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-C", "1", "-W", "10", "-F", "%r %p"],
        capture_output=True, text=True, timeout=15,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture
async def gateways() -> AsyncIterator[list[Gateway]]:
    """Gateways a test started; those still running are stopped at the end, whatever happened."""
    started: list[Gateway] = []
    yield started
    for gw in started:
        await gw.stop()


async def start(gateways: list[Gateway], config: Config) -> Gateway:
    gw = Gateway(config)
    gateways.append(gw)
    await gw.start()
    return gw


async def stop(gateways: list[Gateway], gw: Gateway) -> None:
    gateways.remove(gw)
    await gw.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------- payloads, no broker


def mqtt_field(**kw: Any) -> MqttField:
    kw.setdefault("name", "f")
    kw.setdefault("topic", "t")
    return MqttField(**kw)


def test_lookup_follows_keys_and_list_indexes() -> None:
    doc = {"sensors": [{"value": 21.5}, {"value": "40"}], "ENERGY": {"Power": 12.5}}
    assert lookup(doc, "sensors.0.value") == 21.5
    assert lookup(doc, "sensors.-1.value") == "40"
    assert lookup(doc, "ENERGY.Power") == 12.5
    with pytest.raises(BadPayload, match=r"no 'ENERGY.Voltage' in the payload"):
        lookup(doc, "ENERGY.Voltage")
    with pytest.raises(BadPayload, match=r"sensors has 2 items, no index 5"):
        lookup(doc, "sensors.5.value")
    with pytest.raises(BadPayload, match=r"sensors is a list: expected an index, got 'first'"):
        lookup(doc, "sensors.first")
    with pytest.raises(BadPayload, match=r"ENERGY.Power is a number, cannot look up 'x'"):
        lookup(doc, "ENERGY.Power.x")


def test_to_value_accepts_strings_for_numbers_and_custom_booleans() -> None:
    assert to_value(mqtt_field(), "21.5") == 21.5
    assert to_value(mqtt_field(type="integer"), "40") == 40
    relay = mqtt_field(type="boolean", payload_on="ON", payload_off="OFF")
    assert (to_value(relay, "on"), to_value(relay, "OFF"), to_value(relay, True)) == (True, False, True)
    door = mqtt_field(type="boolean", payload_on="open", payload_off="closed")
    assert (to_value(door, "OPEN"), to_value(door, "Closed")) == (True, False)
    with pytest.raises(BadPayload, match=r"expects 'ON' or 'OFF', got 'MAYBE'"):
        to_value(relay, "MAYBE")
    with pytest.raises(BadPayload, match=r"expects a number, got 'abc'"):
        to_value(mqtt_field(), "abc")
    with pytest.raises(BadPayload, match=r"expected a single value, got an object"):
        to_value(mqtt_field(), {"a": 1})
    with pytest.raises(BadPayload, match="null"):
        to_value(mqtt_field(), None)
    assert to_value(mqtt_field(type="string"), 7) == "7"


def test_render_commands() -> None:
    def cmd(**kw: Any) -> MqttField:
        return mqtt_field(writable=True, command_topic="c", **kw)

    assert render(cmd(type="boolean"), True) == "ON"
    assert render(cmd(type="boolean"), False) == "OFF"
    assert render(cmd(type="boolean", payload_on="1", payload_off="0"), True) == "1"
    assert render(cmd(), 21.0) == "21"
    assert render(cmd(), 21.5) == "21.5"
    assert render(cmd(type="integer"), 40) == "40"
    assert render(cmd(type="boolean", command_template="POWER {value}"), True) == "POWER ON"
    assert render(cmd(type="boolean", command_template='{"state": "{value}"}'), False) == '{"state": "OFF"}'
    assert render(cmd(command_template='{"brightness": {value}}'), 128.0) == '{"brightness": 128}'
    # A quote in a string value is escaped, not an injection into the JSON document.
    out = render(cmd(type="string", command_template='{"text": "{value}", "x": 1}'), 'say "hi", "x": 2')
    assert out == '{"text": "say \\"hi\\", \\"x\\": 2", "x": 1}'
    # Braces of the user's JSON are left alone (no str.format).
    assert render(cmd(type="string", command_template='{"a": {"b": "{value}"}}'), "z") == '{"a": {"b": "z"}}'
    with pytest.raises(MqttError, match="gives invalid JSON"):
        render(cmd(type="string", command_template='{"text": {value}}'), "hello")


def test_client_id_defaults_to_the_gateway_id_never_its_jid(tmp_path: Path) -> None:
    base = {"mqtt": {"url": "mqtt://127.0.0.1:1883"}}
    with_jid = parse({**base, "xmpp": {"jid": "Green.House@example.org", "password": "x"}})
    assert default_client_id(with_jid) == "iot-gateway-iot-gateway"  # the default name's slug
    assert default_client_id(parse({**base, "gateway": {"name": "Shed #2"}})) == "iot-gateway-shed-2"
    assert default_client_id(parse({**base, "gateway": {"name": "Shed #2", "id": "barn-7"}})) == "iot-gateway-barn-7"
    assert parse({"gateway": {"name": "Серверная"}}).gateway.id == "gateway"  # nothing topic-safe left
    for bad in ("Barn", "a/b", "-x", "a+b", "x" * 65):
        with pytest.raises(ConfigError, match="gateway.id"):
            parse({"gateway": {"id": bad}})
    explicit = parse({"mqtt": {"url": "mqtt://127.0.0.1:1883", "client_id": "barn"}})
    assert default_client_id(explicit) == "barn"


@pytest.mark.parametrize(
    "mqtt, field, expected",
    [
        ({"password": "x"}, {}, "mqtt: a broker password needs a `username`"),
        ({"ca_file": __file__}, {}, "mqtt: `ca_file` only applies to an mqtts:// url"),
        ({"client_id": "a/b"}, {}, "mqtt.client_id"),
        ({}, {"payload_on": "ON", "payload_off": "OFF"}, 'only apply to type = "boolean"'),
        ({}, {"type": "boolean", "payload_on": "ON"}, "give both `payload_on` and `payload_off`"),
        ({}, {"json_path": "a..b"}, "json_path: must be dotted keys"),
        ({}, {"topic": "a/b#"}, "a wildcard must be a whole topic level"),
        ({}, {"writable": True, "command_topic": "c", "command_template": "SET"}, "must contain {value}"),
    ],
)
def test_bad_mqtt_config_is_named(mqtt: dict[str, Any], field: dict[str, Any], expected: str) -> None:
    data = {
        "mqtt": {"url": "mqtt://127.0.0.1:1883", **mqtt},
        "devices": [{"id": "d", "driver": "mqtt", "fields": [{"name": "f", "topic": "t", **field}]}],
    }
    with pytest.raises(ConfigError) as e:
        parse(data)
    assert any(expected in line for line in e.value.errors), e.value.errors


def test_example_config_passes_check() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(ROOT / "config" / "mqtt.example.toml")],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "MQTT: mqtt://" in r.stdout
    assert "  plug [mqtt]" in r.stdout and "  climate [mqtt]" in r.stdout


# ---------------------------------------------------------------- real broker


async def test_json_paths_raw_payloads_and_strings(
    mosquitto: Mosquitto, publisher: Publisher, gateways: list[Gateway], tmp_path: Path
) -> None:
    t = unique("env")
    config = make_config(tmp_path, mosquitto.url, [{
        "id": "env", "driver": "mqtt", "fields": [
            {"name": "temp", "topic": f"{t}/json", "json_path": "sensors.0.value"},
            {"name": "hum", "type": "integer", "topic": f"{t}/json", "json_path": "sensors.1.value"},
            {"name": "room", "type": "string", "topic": f"{t}/json", "json_path": "meta.name"},
            {"name": "raw", "topic": f"{t}/raw"},
            {"name": "label", "type": "string", "topic": f"{t}/label"},
        ],
    }])
    gw = await start(gateways, config)
    await until(lambda: health(gw, "env") == (Health.OK, ""), "env to be ok once connected")

    await publisher.send(f"{t}/json", '{"sensors": [{"value": 21.5}, {"value": "40"}], "meta": {"name": "attic"}}')
    await publisher.send(f"{t}/raw", " 19.25\n")
    await publisher.send(f"{t}/label", "hello world")
    await until(lambda: bool(values(gw, "env.label")), "the readings")
    assert values(gw, "env.temp") == [21.5]
    assert values(gw, "env.hum") == [40]
    assert values(gw, "env.room") == ["attic"]
    assert values(gw, "env.raw") == [19.25]
    assert values(gw, "env.label") == ["hello world"]


async def test_tasmota_plug(mosquitto: Mosquitto, publisher: Publisher, gateways: list[Gateway], tmp_path: Path) -> None:
    p = unique("plug")
    config = make_config(tmp_path, mosquitto.url, [{
        "id": "plug", "driver": "mqtt", "availability_topic": f"tele/{p}/LWT", "fields": [
            {"name": "power", "unit": "W", "topic": f"tele/{p}/SENSOR", "json_path": "ENERGY.Power"},
            {"name": "voltage", "type": "integer", "topic": f"tele/{p}/SENSOR", "json_path": "ENERGY.Voltage"},
            {"name": "relay", "type": "boolean", "writable": True, "topic": f"stat/{p}/POWER",
             "command_topic": f"cmnd/{p}/POWER", "payload_on": "ON", "payload_off": "OFF"},
        ],
    }])
    gw = await start(gateways, config)
    await until(lambda: health(gw, "plug")[1].startswith("waiting"), "the broker connection")
    assert health(gw, "plug") == (Health.STARTING, f"waiting for availability on tele/{p}/LWT")

    await publisher.send(f"tele/{p}/LWT", "online")  # defaults are Online/Offline, any case
    await until(lambda: health(gw, "plug") == (Health.OK, ""), "plug ok after LWT Online")

    await publisher.send(f"tele/{p}/SENSOR", '{"Time": "2024-05-01T12:00:00", "ENERGY": {"Power": 12.5, "Voltage": 230}}')
    await publisher.send(f"stat/{p}/POWER", "ON")
    await publisher.send(f"stat/{p}/POWER", "off")
    await until(lambda: len(values(gw, "plug.relay")) == 2, "two relay states")
    assert values(gw, "plug.power") == [12.5]
    assert values(gw, "plug.voltage") == [230]
    assert values(gw, "plug.relay") == [True, False]

    watcher = await Watcher.start(mosquitto.port, f"cmnd/{p}/POWER", 2, publisher)
    echo = Echo(mosquitto.port, {f"cmnd/{p}/POWER": (f"stat/{p}/POWER", str)})
    try:
        # Applied once the plug reports the new state itself on stat/: a command is not a reading.
        assert await gw.hub.write("plug.relay", "on", ADMIN) == (False, True)
        assert await gw.hub.write("plug.relay", "off", ADMIN) == (True, False)
    finally:
        echo.stop()
    assert await watcher.lines() == [f"cmnd/{p}/POWER ON", f"cmnd/{p}/POWER OFF"]
    assert values(gw, "plug.relay") == [True, False, True, False]
    assert [e.outcome for e in gw.hub.audit.entries] == ["applied", "applied"]

    await publisher.send(f"tele/{p}/LWT", "Offline")
    await until(lambda: health(gw, "plug") == (Health.OFFLINE, "(LWT)"), "plug offline after LWT")


async def test_zigbee2mqtt_devices(mosquitto: Mosquitto, publisher: Publisher, gateways: list[Gateway], tmp_path: Path) -> None:
    z = unique("zigbee2mqtt")
    # Retained before the gateway starts, as Zigbee2MQTT leaves it.
    await publisher.send(f"{z}/sensor/availability", '{"state":"online"}', retain=True)
    await publisher.send(f"{z}/light/availability", '{"state":"offline"}', retain=True)
    availability = {"availability_json_path": "state", "payload_available": "online", "payload_not_available": "offline"}
    config = make_config(tmp_path, mosquitto.url, [
        {"id": "sensor", "driver": "mqtt", "availability_topic": f"{z}/sensor/availability", **availability, "fields": [
            {"name": "temperature", "unit": "°C", "topic": f"{z}/sensor", "json_path": "temperature"},
            {"name": "humidity", "unit": "%", "topic": f"{z}/sensor", "json_path": "humidity"},
            {"name": "battery", "type": "integer", "unit": "%", "topic": f"{z}/sensor", "json_path": "battery"},
        ]},
        {"id": "light", "driver": "mqtt", "availability_topic": f"{z}/light/availability", **availability, "fields": [
            {"name": "state", "type": "boolean", "writable": True, "topic": f"{z}/light", "json_path": "state",
             "command_topic": f"{z}/light/set", "command_template": '{"state": "{value}"}'},
            {"name": "brightness", "type": "integer", "writable": True, "min": 0, "max": 254,
             "command_topic": f"{z}/light/set", "command_template": '{"brightness": {value}}'},
        ]},
    ])
    gw = await start(gateways, config)
    await until(lambda: health(gw, "sensor") == (Health.OK, ""), "retained online availability")
    await until(lambda: health(gw, "light") == (Health.OFFLINE, "(LWT)"), "retained offline availability")

    await publisher.send(f"{z}/sensor", '{"temperature":21.3,"humidity":40,"battery":90,"linkquality":120}')
    await until(lambda: bool(values(gw, "sensor.battery")), "sensor readings")
    assert (values(gw, "sensor.temperature"), values(gw, "sensor.humidity"), values(gw, "sensor.battery")) == (
        [21.3], [40.0], [90]
    )

    await publisher.send(f"{z}/light/availability", '{"state":"online"}', retain=True)
    await until(lambda: health(gw, "light") == (Health.OK, ""), "light back online")
    watcher = await Watcher.start(mosquitto.port, f"{z}/light/set", 2, publisher)
    # Zigbee2MQTT answers a set with the device's whole state on its topic.
    echo = Echo(mosquitto.port, {f"{z}/light/set": (f"{z}/light", lambda p: p if "state" in p else '{"state": "ON"}')})
    try:
        await gw.hub.write("light.state", "on", ADMIN)
        await gw.hub.write("light.brightness", "128", ADMIN)
    finally:
        echo.stop()
    assert await watcher.lines() == [f'{z}/light/set {{"state": "ON"}}', f'{z}/light/set {{"brightness": 128}}']
    # brightness has no state topic: the acknowledged command is its value.
    assert values(gw, "light.brightness") == [128]
    assert values(gw, "light.state")[0] is True

    await publisher.send(f"{z}/sensor/availability", '{"state":"offline"}', retain=True)
    await until(lambda: health(gw, "sensor") == (Health.OFFLINE, "(LWT)"), "sensor offline")


async def test_retained_commands_and_gateway_status(
    mosquitto: Mosquitto, publisher: Publisher, gateways: list[Gateway], tmp_path: Path
) -> None:
    s = unique("setpoint")
    cid = unique("gw")
    config = make_config(tmp_path, mosquitto.url, [{
        "id": "heat", "driver": "mqtt", "fields": [
            {"name": "target", "unit": "°C", "writable": True, "min": 5, "max": 30,
             "command_topic": f"{s}/set", "retain": True},
        ],
    }], client_id=cid)
    gw = await start(gateways, config)
    await until(lambda: health(gw, "heat") == (Health.OK, ""), "connection")
    assert await retained(mosquitto.port, f"{cid}/status") == "1 online"
    await gw.hub.write("heat.target", "21.5", ADMIN)
    assert await retained(mosquitto.port, f"{s}/set") == "1 21.5"

    await stop(gateways, gw)
    assert await retained(mosquitto.port, f"{cid}/status") == "1 offline"
    assert paho_threads(config) == []


async def test_malformed_payloads_are_logged_once_and_skipped(
    mosquitto: Mosquitto, publisher: Publisher, gateways: list[Gateway], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="iot_gateway.mqtt")
    m = unique("bad")
    config = make_config(tmp_path, mosquitto.url, [{
        "id": "dev", "driver": "mqtt", "fields": [
            {"name": "a", "topic": f"{m}/a", "json_path": "x"},
            {"name": "b", "topic": f"{m}/b", "json_path": "x.y"},
            {"name": "c", "topic": f"{m}/c"},
            {"name": "d", "type": "boolean", "topic": f"{m}/d", "payload_on": "ON", "payload_off": "OFF"},
            {"name": "e", "topic": f"{m}/e", "json_path": "x"},
        ],
    }])
    gw = await start(gateways, config)
    await until(lambda: health(gw, "dev") == (Health.OK, ""), "connection")

    for _ in range(3):
        await publisher.send(f"{m}/a", "{not json")
    await publisher.send(f"{m}/b", '{"x": 5}')
    await publisher.send(f"{m}/b", '{"z": 1}')
    await publisher.send(f"{m}/c", "abc")
    await publisher.send(f"{m}/c", b"\xff\xfe")
    await publisher.send(f"{m}/d", "MAYBE")
    await publisher.send(f"{m}/e", '{"x": {"deep": 1}}')
    await publisher.send(f"{m}/a", '{"x": 1}')
    await publisher.send(f"{m}/b", '{"x": {"y": "2"}}')
    await publisher.send(f"{m}/c", "3")
    await publisher.send(f"{m}/d", "on")
    await publisher.send(f"{m}/e", '{"x": 5}')
    await until(lambda: bool(values(gw, "dev.e")), "the good messages")
    await asyncio.sleep(0.1)

    assert [values(gw, f"dev.{n}") for n in "abcde"] == [[1.0], [2.0], [3.0], [True], [5.0]]
    assert health(gw, "dev") == (Health.OK, "")
    warnings = [r.getMessage() for r in caplog.records if r.name == "iot_gateway.mqtt" and r.levelno == logging.WARNING]
    per_field = {n: [w for w in warnings if w.startswith(f"dev.{n}:")] for n in "abcde"}
    assert {n: len(ws) for n, ws in per_field.items()} == {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}
    assert per_field["a"][0].startswith(f"dev.a: message on {m}/a skipped: not valid JSON")
    assert f"dev.b: message on {m}/b skipped: x is a number, cannot look up 'y'" in per_field["b"][0]
    assert "expects a number, got 'abc'" in per_field["c"][0]
    assert "expects 'ON' or 'OFF', got 'MAYBE'" in per_field["d"][0]
    assert "expected a single value, got an object" in per_field["e"][0]

    # A paho callback never raises, even on what paho itself cannot decode (a non-UTF-8 topic):
    # an exception there would end paho's network thread without a word.
    broker: Broker = gw.ctx.shared["mqtt"]
    broker._on_message(broker.client, None, paho.MQTTMessage(topic=b"\xff\xfe"))
    assert any(r.levelno == logging.ERROR and "_on_message" in r.getMessage() for r in caplog.records)
    await publisher.send(f"{m}/c", "4")
    await until(lambda: values(gw, "dev.c") == [3.0, 4.0], "a reading after the failed callback")


async def test_broker_down_at_start_then_restarted_mid_test_loses_nothing(
    gateways: list[Gateway], tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="iot_gateway.mqtt")
    # The backoff only resets after a connection held 60 s: keep the retries quick for the test.
    monkeypatch.setattr(mqtt, "RECONNECT_MAX", 2.0)
    port = free_port()
    broker = Mosquitto(tmp_path / "broker", port=port)
    config = make_config(tmp_path, broker.url, [{
        "id": "meter", "driver": "mqtt", "fields": [
            {"name": "count", "type": "integer", "topic": "meter/count"},
            {"name": "reset", "type": "boolean", "writable": True, "command_topic": "meter/reset"},
        ],
    }])
    began = time.monotonic()
    gw = await start(gateways, config)
    assert time.monotonic() - began < 1.0
    await until(lambda: health(gw, "meter")[0] is Health.OFFLINE, "broker unreachable")
    assert health(gw, "meter") == (Health.OFFLINE, "broker unreachable: Connection refused")
    with pytest.raises(DeviceError, match=r"not connected to the MQTT broker \(broker unreachable: Connection refused\)"):
        await gw.hub.write("meter.reset", "on", ADMIN)

    broker.start()
    pub: Publisher | None = None
    try:
        await until(lambda: health(gw, "meter") == (Health.OK, ""), "connection once the broker is up", 8)
        pub = Publisher(port)
        # QoS 0: at QoS 1 the broker, stopped right below, may not have the gateway's PUBACK yet
        # and would rightly deliver the reading again after its restart.
        pub.client.publish("meter/count", "0", qos=0)
        await until(lambda: values(gw, "meter.count") == [0], "first reading")

        broker.stop()
        await until(lambda: health(gw, "meter") == (Health.OFFLINE, "broker connection lost"), "connection lost")
        with pytest.raises(DeviceError, match="not connected to the MQTT broker"):
            await gw.hub.write("meter.reset", "on", ADMIN)
        n = 20
        infos = [pub.client.publish("meter/count", str(i), qos=1) for i in range(1, n + 1)]
        # paho kept them: there was no broker to take them yet.
        assert {i.rc for i in infos} == {MQTTErrorCode.MQTT_ERR_NO_CONN}
        broker.start()
        await until(lambda: len(values(gw, "meter.count")) == n + 1, f"{n} readings after the restart", 15)
        assert values(gw, "meter.count") == list(range(n + 1))
        # The broker kept our session (and subscriptions) across its restart.
        connects = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mqtt: connected")]
        assert [c.rsplit(" ", 2)[-2] for c in connects] == ["(new", "(resumed"]
        await until(lambda: health(gw, "meter") == (Health.OK, ""), "ok after reconnect")
        await gw.hub.write("meter.reset", "on", ADMIN)
        assert values(gw, "meter.reset") == [True]
    finally:
        if pub is not None:
            pub.stop()
        await stop(gateways, gw)
        broker.stop()
    assert paho_threads(config) == []


async def test_messages_sent_while_the_gateway_is_away_arrive_when_it_returns(
    mosquitto: Mosquitto, publisher: Publisher, gateways: list[Gateway], tmp_path: Path
) -> None:
    t = unique("away")
    devices = [{"id": "probe", "driver": "mqtt", "fields": [{"name": "n", "type": "integer", "topic": f"{t}/n"}]}]
    config = make_config(tmp_path, mosquitto.url, devices)
    gw = await start(gateways, config)
    await until(lambda: health(gw, "probe") == (Health.OK, ""), "connection")
    driver = gw.drivers["probe"]
    await stop(gateways, gw)
    await driver.stop()  # a second stop is harmless
    assert paho_threads(config) == []

    for i in range(10):
        await publisher.send(f"{t}/n", str(i))
    gw2 = await start(gateways, config)
    await until(lambda: len(values(gw2, "probe.n")) == 10, "the 10 messages kept by the broker")
    assert values(gw2, "probe.n") == list(range(10))


async def test_gateway_will_marks_it_offline_on_a_dropped_connection(
    mosquitto: Mosquitto, publisher: Publisher, gateways: list[Gateway], tmp_path: Path
) -> None:
    cid = unique("gw")
    t = unique("will")
    config = make_config(tmp_path, mosquitto.url, [
        {"id": "probe", "driver": "mqtt", "fields": [{"name": "n", "topic": f"{t}/n"}]},
    ], client_id=cid)
    gw = await start(gateways, config)
    states: list[tuple[Health, str]] = []
    gw.hub.subscribe(health=lambda node, old: states.append((node.health.state, node.health.reason)))
    await until(lambda: health(gw, "probe") == (Health.OK, ""), "connection")
    watcher = await Watcher.start(mosquitto.port, f"{cid}/status", 3, publisher)
    broker: Broker = gw.ctx.shared["mqtt"]
    sock = broker.client.socket()
    assert sock is not None
    sock.shutdown(2)  # the network drops: no DISCONNECT packet, so the broker sends our will
    lines = await watcher.lines()
    assert lines == [f"{cid}/status online", f"{cid}/status offline", f"{cid}/status online"]
    await until(lambda: health(gw, "probe") == (Health.OK, ""), "ok after reconnect")
    assert (Health.OFFLINE, "broker connection lost") in states
    await publisher.send(f"{t}/n", "7")
    await until(lambda: values(gw, "probe.n") == [7.0], "a reading after reconnect")


async def test_set_fails_honestly_when_the_broker_does_not_acknowledge(gateways: list[Gateway], tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    config = make_config(tmp_path, broker.url, [{
        "id": "valve", "driver": "mqtt", "fields": [
            {"name": "open", "type": "boolean", "writable": True, "command_topic": "valve/set"},
        ],
    }], command_timeout=0.5)
    try:
        gw = await start(gateways, config)
        await until(lambda: health(gw, "valve") == (Health.OK, ""), "connection")
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)  # connected, but the broker answers nothing
        try:
            with pytest.raises(DeviceError, match=r"did not confirm within 0\.5 s \(no PUBACK\)"):
                await gw.hub.write("valve.open", "on", ADMIN)
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        assert values(gw, "valve.open") == []
        assert gw.hub.audit.entries[-1].outcome == "failed"
        await stop(gateways, gw)
    finally:
        broker.stop()


async def test_tls_and_password(gateways: list[Gateway], tmp_path: Path) -> None:
    ca, cert, key = make_certs(tmp_path / "certs", ["localhost"])
    broker = Mosquitto(tmp_path / "broker")
    passwd = broker.root / "passwd"
    await asyncio.to_thread(
        subprocess.run, ["mosquitto_passwd", "-c", "-b", str(passwd), "meter", "s3cret"], check=True, capture_output=True
    )
    text = broker.config.read_text().replace("allow_anonymous true\n", "allow_anonymous false\n")
    text += f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\npassword_file {passwd}\n"
    broker.config.write_text(text)
    broker.start()
    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret\n")
    url = f"mqtts://localhost:{broker.port}"
    devices = [{"id": "meter", "driver": "mqtt", "fields": [{"name": "n", "topic": "meter/n"}]}]
    try:
        good = await start(gateways, make_config(tmp_path, url, devices, ca_file=str(ca), username="meter", password_file=str(secret)))
        wrong = await start(gateways, make_config(tmp_path / "w", url, devices, ca_file=str(ca), username="meter", password="nope"))
        untrusted = await start(gateways, make_config(tmp_path / "u", url, devices, username="meter", password="s3cret"))
        await until(lambda: health(good, "meter") == (Health.OK, ""), "TLS connection with the right password")
        await until(lambda: health(wrong, "meter")[0] is Health.OFFLINE, "refusal")
        assert re.fullmatch(r"broker refused the connection: (Not authorized|Bad user name or password)", health(wrong, "meter")[1])
        await until(lambda: health(untrusted, "meter")[0] is Health.OFFLINE, "TLS failure")
        assert health(untrusted, "meter")[1].startswith("broker unreachable: TLS certificate not trusted")

        r = await asyncio.to_thread(
            subprocess.run,
            ["mosquitto_pub", "-h", "localhost", "-p", str(broker.port), "--cafile", str(ca),
             "-u", "meter", "-P", "s3cret", "-q", "1", "-t", "meter/n", "-m", "42"],
            capture_output=True, text=True, timeout=10,
        )
        assert r.returncode == 0, r.stderr
        await until(lambda: values(good, "meter.n") == [42.0], "a reading over TLS")
    finally:
        for gw in list(gateways):
            await stop(gateways, gw)
        broker.stop()


async def test_unreadable_password_file_is_a_device_error(gateways: list[Gateway], tmp_path: Path) -> None:
    config = make_config(tmp_path, "mqtt://127.0.0.1:1", [
        {"id": "a", "driver": "mqtt", "fields": [{"name": "n", "topic": "a/n"}]},
    ], username="u", password_file=str(tmp_path / "missing"))
    gw = await start(gateways, config)
    missing = tmp_path / "missing"
    assert health(gw, "a") == (Health.ERROR, f"failed to start: mqtt.password_file: cannot read {missing}: No such file or directory")
    assert paho_threads(config) == []


# ---------------------------------------------------------------- through XMPP


async def test_contact_reads_and_sets_an_mqtt_device_over_xmpp(
    xmpp_server: XmppServer, mosquitto: Mosquitto, publisher: Publisher, tmp_path: Path
) -> None:
    p = unique("plug")
    config = gateway_config(xmpp_server, tmp_path, devices=[{
        "id": "plug", "driver": "mqtt", "fields": [
            {"name": "power", "unit": "W", "topic": f"tele/{p}/SENSOR", "json_path": "ENERGY.Power"},
            {"name": "relay", "type": "boolean", "writable": True, "topic": f"stat/{p}/POWER",
             "command_topic": f"cmnd/{p}/POWER"},
        ],
    }], mqtt={"url": mosquitto.url})
    running = await start_gateway(config, xmpp_server.passwords["gateway"])
    gw = running.gateway
    alice = None
    try:
        alice = await xmpp_server.peer("alice").start()
        gw_jid = xmpp_server.jid("gateway")
        await until(lambda: health(gw, "plug") == (Health.OK, ""), "broker connection")
        # The client id comes from the gateway's configured id ("Test GW"), never from its JID.
        assert await retained(mosquitto.port, "iot-gateway-test-gw/status") == "1 online"

        await publisher.send(f"tele/{p}/SENSOR", '{"ENERGY": {"Power": 12.5}}')
        await publisher.send(f"stat/{p}/POWER", "OFF")
        await until(lambda: bool(values(gw, "plug.relay")), "readings")
        reply = await alice.ask_for(gw_jid, "read plug.power", "plug.power")
        assert re.fullmatch(r"plug\.power = 12\.5 W \(\d+ s ago\)", reply), reply

        watcher = await Watcher.start(mosquitto.port, f"cmnd/{p}/POWER", 1, publisher)
        echo = Echo(mosquitto.port, {f"cmnd/{p}/POWER": (f"stat/{p}/POWER", str)})
        try:
            assert await alice.ask_for(gw_jid, "set plug.relay on", "plug.relay") == "plug.relay: off → on"
        finally:
            echo.stop()
        assert await watcher.lines() == [f"cmnd/{p}/POWER ON"]
        entry = gw.hub.audit.entries[-1]
        assert (entry.actor.jid, entry.ref, entry.new, entry.outcome) == ("alice@localhost", "plug.relay", True, "applied")
    finally:
        if alice is not None:
            await alice.stop()
        await running.stop()


async def test_the_driver_contract(mosquitto: Mosquitto, publisher: Publisher, gateways: list[Gateway], tmp_path: Path) -> None:
    """tests/contract.py on a real Mosquitto: a set is applied once the plug reports it (and only
    sent where nothing reports the state); LWT Offline makes the device unhealthy, Online mends it."""
    p = unique("plug")
    config = make_config(tmp_path, mosquitto.url, [{
        "id": "plug", "driver": "mqtt", "availability_topic": f"tele/{p}/LWT", "fields": [
            {"name": "relay", "type": "boolean", "writable": True, "topic": f"stat/{p}/POWER",
             "command_topic": f"cmnd/{p}/POWER"},
            {"name": "blind", "type": "boolean", "writable": True, "command_topic": f"cmnd/{p}/BLIND"},
        ],
    }])
    gw = await start(gateways, config)
    await until(lambda: health(gw, "plug")[1].startswith("waiting"), "the broker connection")
    await publisher.send(f"tele/{p}/LWT", "Online")
    echo = Echo(mosquitto.port, {f"cmnd/{p}/POWER": (f"stat/{p}/POWER", str)})
    try:
        await driver_contract(Contract(
            gw.hub, "plug", lambda: stop(gateways, gw), writes=[("relay", True, True), ("blind", True, False)],
            fail=lambda: publisher.send(f"tele/{p}/LWT", "Offline"), mend=lambda: publisher.send(f"tele/{p}/LWT", "Online"),
        ))
    finally:
        echo.stop()
