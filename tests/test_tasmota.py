"""The tasmota driver against a real Mosquitto, with the test playing the Tasmota devices.

Discovery messages are the fixtures in tests/discovery/ (a Sonoff POW R2 and a BME280
node, shaped as Tasmota's TasDiscoverMessage publishes them), with each test's own
discovery prefix and device topics, so retained messages of one do not reach another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.discovery import Malformed
from devices.tasmota import full_topic, relays, sensor_spots
from gateway.app import Gateway
from gateway.auth import Actor
from gateway.config import ConfigError, parse
from gateway.hub import Health
from gateway.demo.localservers import Mosquitto
from tests.helpers import until
from tests.contract import Contract, driver_contract
from tests.test_mqtt import Publisher

HERE = Path(__file__).resolve().parent / "discovery"
PLUG_CFG: dict[str, Any] = json.loads((HERE / "tasmota_plug_config.json").read_text())
PLUG_SNS: dict[str, Any] = json.loads((HERE / "tasmota_plug_sensors.json").read_text())
BME_CFG: dict[str, Any] = json.loads((HERE / "tasmota_sensor_config.json").read_text())
BME_SNS: dict[str, Any] = json.loads((HERE / "tasmota_sensor_sensors.json").read_text())
MESSAGES: dict[str, Any] = json.loads((HERE / "tasmota_messages.json").read_text())
ADMIN = Actor("admin@example.org", "admin", "test")


class Tasmota:
    """The test as two Tasmota devices: retained discovery and LWT; the plug answers POWER
    commands on stat/<t>/RESULT and STATUS 10 polls with its sensors, as the firmware does."""

    def __init__(self, pub: Publisher, port: int):
        self.pub = pub
        tag = uuid.uuid4().hex[:6]
        self.dp = f"tasmota-{tag}/discovery"
        self.plug = dict(PLUG_CFG, t=f"plug_{tag}")
        self.bme = dict(BME_CFG, t=f"balcony_{tag}")
        self.commands: list[tuple[str, str]] = []
        self.power = "OFF"
        self.answering = True
        ready = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="tas-" + tag)
        c.on_connect = lambda *_a: c.subscribe(f"cmnd/{self.plug['t']}/#", qos=1)
        c.on_subscribe = lambda *_a: ready.set()
        c.on_message = self._on_command
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert ready.wait(5), "tasmota stand-in could not subscribe"
        self.client = c

    def _on_command(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        t = self.plug["t"]
        body = msg.payload.decode()
        self.commands.append((msg.topic, body))
        if not self.answering:
            return
        if msg.topic.startswith(f"cmnd/{t}/POWER"):
            self.power = body
            self.client.publish(f"stat/{t}/RESULT", json.dumps({"POWER": body}), qos=1)
            self.client.publish(f"stat/{t}/POWER", body, qos=1)
        elif msg.topic == f"cmnd/{t}/STATUS" and body == "10":
            sns = json.loads(MESSAGES["plug"]["messages"][8]["payload"])
            self.client.publish(f"stat/{t}/STATUS10", json.dumps(sns), qos=1)

    async def announce(self, which: str = "both") -> None:
        for cfg, sns in ((self.plug, PLUG_SNS), (self.bme, BME_SNS)):
            if which not in ("both", cfg["t"]):
                continue
            await self.pub.send(f"{self.dp}/{cfg['mac']}/config", json.dumps(cfg), retain=True)
            await self.pub.send(f"{self.dp}/{cfg['mac']}/sensors", json.dumps(sns), retain=True)
            await self.pub.send(f"tele/{cfg['t']}/LWT", cfg["onln"], retain=True)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
async def tas(mosquitto: Mosquitto) -> AsyncIterator[Tasmota]:
    pub = Publisher(mosquitto.port)
    fake = Tasmota(pub, mosquitto.port)
    yield fake
    fake.stop()
    pub.stop()


async def started(tmp_path: Path, mosquitto: Mosquitto, tas: Tasmota, **extra: Any) -> Gateway:
    config = parse(
        {
            "gateway": {"name": "Tasmota test", "state_dir": str(tmp_path / "state"), "history_per_second": 0},
            "mqtt": {"url": mosquitto.url, "client_id": "gw-" + uuid.uuid4().hex[:8]},
            "devices": [{"id": "tas", "driver": "tasmota", "discovery_prefix": tas.dp, **extra}],
        }
    )
    gw = Gateway(config)
    await gw.start()
    return gw


def node_id(t: str) -> str:
    return t.lower()


# ---------------------------------------------------------------- parsing, no broker


def test_topics_relays_and_sensor_units() -> None:
    assert full_topic(PLUG_CFG) == ("cmnd/tasmota_5D3A1F/", "stat/tasmota_5D3A1F/", "tele/tasmota_5D3A1F/")
    custom = dict(PLUG_CFG, ft="%topic%/%prefix%/", tp=["c", "s", "t"])
    assert full_topic(custom, "%topic%/%prefix%/", ["c", "s", "t"])[2] == "tasmota_5D3A1F/t/"
    # Only the configured full topic and prefixes: a device's own `ft`/`tp` never choose where commands go.
    for forged in (dict(PLUG_CFG, ft="evil/%prefix%/%topic%/"), dict(PLUG_CFG, tp=["evil", "stat", "tele"]), dict(PLUG_CFG, t="x/y")):
        with pytest.raises(Malformed):
            full_topic(forged)
    one = relays(PLUG_CFG, "cmnd/x/")
    assert list(one) == ["power"] and one["power"].command == "cmnd/x/POWER1"
    two = relays(dict(PLUG_CFG, rl=[1, 0, 1, 3]), "cmnd/x/")
    assert list(two) == ["power1", "power3"]  # a shutter (3) is not an on/off field
    energy = sensor_spots(PLUG_SNS["sn"])
    assert energy["energy_power"].spec.unit == "W" and energy["energy_reactivepower"].spec.unit == "VAr"
    assert energy["energy_total"].spec.unit == "kWh" and "energy_totalstarttime" not in energy
    bme = sensor_spots(BME_SNS["sn"])
    assert bme["bme280_temperature"].spec.unit == "°C" and bme["bme280_pressure"].spec.unit == "hPa"
    fahrenheit = sensor_spots(dict(BME_SNS["sn"], TempUnit="F"))
    assert fahrenheit["bme280_dewpoint"].spec.unit == "°F"


# ---------------------------------------------------------------- through Mosquitto


async def test_discovery_sensors_relay_round_trip_and_lwt(tmp_path: Path, mosquitto: Mosquitto, tas: Tasmota) -> None:
    await tas.announce()
    gw = await started(tmp_path, mosquitto, tas)
    hub = gw.hub
    plug, bme = node_id(tas.plug["t"]), node_id(tas.bme["t"])
    try:
        await until(lambda: {plug, bme} <= set(hub.nodes), "both devices")
        assert hub.nodes[plug].name == "Kettle Plug" and hub.nodes[plug].driver == "tasmota"
        assert hub.field(f"{plug}.power").spec.writable
        assert hub.field(f"{bme}.bme280_humidity").spec.unit == "%"
        # The plug was polled (STATUS 10) and answered with its energy readings.
        await until(lambda: hub.field(f"{plug}.energy_power").latest is not None, "the polled energy readings")
        assert hub.field(f"{plug}.energy_power").latest.value == 2101
        await until(lambda: hub.nodes[plug].health.state is Health.OK, "the plug online (LWT)")
        # Telemetry of the sensor node.
        sensor = MESSAGES["sensor"]["messages"][1]["payload"]
        await tas.pub.send(f"tele/{tas.bme['t']}/SENSOR", sensor)
        await until(lambda: hub.field(f"{bme}.bme280_temperature").latest is not None, "the BME280 reading")
        assert hub.field(f"{bme}.bme280_temperature").latest.value == 18.6
        # A set: cmnd/<t>/POWER1 ON, confirmed by the device's stat/<t>/RESULT {"POWER":"ON"}.
        old, new = await gw.hub.write(f"{plug}.power", "on", ADMIN)
        assert new is True and (f"cmnd/{tas.plug['t']}/POWER1", "ON") in tas.commands
        assert hub.field(f"{plug}.power").latest.value is True
        assert gw.hub.audit.entries[-1].outcome == "applied"
        await gw.hub.write(f"{plug}.power", "off", ADMIN)
        assert (f"cmnd/{tas.plug['t']}/POWER1", "OFF") in tas.commands
        # tele/<t>/STATE reports the relay too.
        state = json.loads(MESSAGES["plug"]["messages"][5]["payload"])
        await tas.pub.send(f"tele/{tas.plug['t']}/STATE", json.dumps(state))
        await until(lambda: hub.field(f"{plug}.power").latest.value is True, "the relay from tele STATE")
        # LWT: offline and back.
        await tas.pub.send(f"tele/{tas.plug['t']}/LWT", "Offline", retain=True)
        await until(lambda: hub.nodes[plug].health.state is Health.OFFLINE, "the plug offline (LWT)")
        assert hub.nodes[bme].health.state is Health.OK
        await tas.pub.send(f"tele/{tas.plug['t']}/LWT", "Online", retain=True)
        await until(lambda: hub.nodes[plug].health.state is Health.OK, "the plug back")
        # A device that does not confirm: the set is unconfirmed, not applied.
        tas.answering = False
        with pytest.raises(Exception, match="not confirmed"):
            await gw.hub.write(f"{plug}.power", "on", ADMIN)
        assert gw.hub.audit.entries[-1].outcome == "unconfirmed"
    finally:
        await gw.stop()


async def test_removal_rename_and_hostile_discovery(tmp_path: Path, mosquitto: Mosquitto, tas: Tasmota, caplog: pytest.LogCaptureFixture) -> None:
    await tas.announce()
    gw = await started(tmp_path, mosquitto, tas)
    hub = gw.hub
    plug, bme = node_id(tas.plug["t"]), node_id(tas.bme["t"])
    alerts: list[str] = []
    gw.watches.sinks.append(lambda a: alerts.append(a.text))
    try:
        await until(lambda: {plug, bme} <= set(hub.nodes), "both devices")
        await until(lambda: hub.field("tas.devices").latest is not None and hub.field("tas.devices").latest.value == 2, "the count")
        caplog.set_level(logging.WARNING, "iot_gateway")
        mac = tas.bme["mac"]
        for bad in (b"\xff", "[1, 2]", json.dumps(dict(tas.bme, t=5)), json.dumps(dict(tas.bme, rl="x" * 100_000)), "{" * 10_000):
            await tas.pub.send(f"{tas.dp}/{mac}/config", bad, retain=True)
        await tas.pub.send(f"{tas.dp}/not-a-mac/config", json.dumps(tas.bme), retain=True)
        await tas.pub.send(f"{tas.dp}/{mac}/config", json.dumps(tas.bme), retain=True)
        await tas.pub.send(f"{tas.dp}/{mac}/sensors", json.dumps({"sn": {f"S{i}": {"V": i} for i in range(500)}}), retain=True)
        await asyncio.sleep(0.3)
        assert {plug, bme} <= set(hub.nodes), "bad discovery messages remove nothing"
        # Rename: the same MAC under a new topic keeps its history.
        await tas.pub.send(f"tele/{tas.bme['t']}/SENSOR", MESSAGES["sensor"]["messages"][1]["payload"])
        await until(lambda: hub.field(f"{bme}.bme280_temperature").latest is not None, "a reading")
        await gw.history.flush()
        moved = dict(tas.bme, t=tas.bme["t"] + "_2")
        await tas.pub.send(f"{tas.dp}/{mac}/sensors", json.dumps(BME_SNS), retain=True)
        await tas.pub.send(f"{tas.dp}/{mac}/config", json.dumps(moved), retain=True)
        await until(lambda: node_id(moved["t"]) in hub.nodes, "the renamed sensor")
        assert bme not in hub.nodes
        assert [r.value for r in hub.field(f"{node_id(moved['t'])}.bme280_temperature").history] == [18.6]
        await gw.history.flush()
        db = sqlite3.connect(tmp_path / "state" / "history.db")
        n = db.execute("SELECT count(*) FROM readings WHERE ref = ?", (f"{node_id(moved['t'])}.bme280_temperature",)).fetchone()[0]
        db.close()
        assert n == 1
        # Withdrawal: Tasmota withdraws a device with an empty retained config. It stays, offline.
        w = gw.watches.add(gw.watches.parse("alice@example.org", [plug, "offline"]))
        await tas.pub.send(f"{tas.dp}/{tas.plug['mac']}/config", b"", retain=True)
        await until(lambda: hub.nodes[plug].health.describe() == "offline (no longer listed by Tasmota)", "the plug offline")
        assert plug in hub.nodes and not gw.watches.missing(w.id)
        assert hub.field("tas.devices").latest.value == 1
        with pytest.raises(Exception, match="no longer listed"):
            await hub.write(f"{plug}.power", "on", ADMIN)
        await tas.announce(tas.plug["t"])  # announced again: ok again, the same node
        await until(lambda: hub.nodes[plug].health.state is Health.OK, "the plug back")
        assert hub.field("tas.devices").latest.value == 2
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == len(set(warnings)), "each problem is logged once"
        assert any("not a MAC address" in x for x in warnings) and any("more than 100" in x for x in warnings)
    finally:
        await gw.stop()
        for cfg in (tas.plug, tas.bme):
            await tas.pub.send(f"{tas.dp}/{cfg['mac']}/config", b"", retain=True)


# ---------------------------------------------------------------- what discovery may not do (issue 23)


class Listener:
    """A client subscribed to everything (`#`): what the gateway published, wherever it went."""

    def __init__(self, port: int):
        self.got: list[tuple[str, str]] = []
        ready = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="all-" + uuid.uuid4().hex[:6])
        c.on_connect = lambda *_a: c.subscribe("#", qos=1)
        c.on_subscribe = lambda *_a: ready.set()
        c.on_message = lambda _c, _u, msg: self.got.append((msg.topic, msg.payload.decode("utf-8", "replace")))
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert ready.wait(5), "listener could not subscribe"
        self.client = c

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_a_topic_clash_skips_only_the_pair(tmp_path: Path, mosquitto: Mosquitto, tas: Tasmota, caplog: pytest.LogCaptureFixture) -> None:
    """A forged config claiming the plug's topic: the pair is skipped with one line naming both;
    the plug stays as it was and works, and devices announced later are still found."""
    await tas.announce()
    gw = await started(tmp_path, mosquitto, tas)
    hub = gw.hub
    plug, bme = node_id(tas.plug["t"]), node_id(tas.bme["t"])
    caplog.set_level(logging.WARNING, "iot_gateway")
    try:
        await until(lambda: {plug, bme} <= set(hub.nodes), "both devices")
        forged = dict(tas.plug, mac="0000000000F1")
        await tas.pub.send(f"{tas.dp}/{forged['mac']}/config", json.dumps(forged), retain=True)
        def named(m: str) -> bool:
            return "claim the same topic" in m and tas.plug["mac"] in m and forged["mac"] in m

        late = dict(tas.bme, mac="0000000000F2", t=tas.bme["t"] + "_late")
        await tas.pub.send(f"{tas.dp}/{late['mac']}/config", json.dumps(late), retain=True)
        await until(lambda: node_id(late["t"]) in hub.nodes, "a device announced after the clash")
        await until(lambda: any(named(r.getMessage()) for r in caplog.records), "one line naming both")
        assert hub.nodes[plug].health.state is Health.OK and node_id(tas.plug["t"]) + "-2" not in hub.nodes
        old, new = await hub.write(f"{plug}.power", "on", ADMIN)
        assert new is True and (f"cmnd/{tas.plug['t']}/POWER1", "ON") in tas.commands
        assert len([r for r in caplog.records if "claim the same topic" in r.getMessage()]) == 1
    finally:
        await gw.stop()
        for mac in ("0000000000F1", "0000000000F2"):
            await tas.pub.send(f"{tas.dp}/{mac}/config", b"", retain=True)


async def test_a_forged_full_topic_never_points_commands_elsewhere(
    tmp_path: Path, mosquitto: Mosquitto, tas: Tasmota, caplog: pytest.LogCaptureFixture
) -> None:
    """`ft`/`tp` of a discovery config never choose where the gateway publishes: a device whose
    own differ from the configured ones is skipped (an existing one stays as it was)."""
    await tas.announce()
    gw = await started(tmp_path, mosquitto, tas)
    hub = gw.hub
    plug = node_id(tas.plug["t"])
    everything = Listener(mosquitto.port)
    caplog.set_level(logging.WARNING, "iot_gateway")
    try:
        await until(lambda: plug in hub.nodes, "the plug")
        evil = dict(tas.plug, mac="0000000000E1", t="x", ft="evil/%prefix%/%topic%/")
        await tas.pub.send(f"{tas.dp}/{evil['mac']}/config", json.dumps(evil), retain=True)
        hijack = dict(tas.plug, tp=["evil", "stat", "tele"])  # the plug's own config, its prefixes forged
        await tas.pub.send(f"{tas.dp}/{tas.plug['mac']}/config", json.dumps(hijack), retain=True)
        await tas.pub.send(f"{tas.dp}/probe/config", "1")  # handled after the two above (one connection, in order)
        await until(lambda: any("'probe' is not a MAC" in r.getMessage() for r in caplog.records), "the forged configs handled")
        for ref in ("x.power", f"{plug}.power"):
            try:
                await hub.write(ref, "on", ADMIN)
            except Exception:
                pass
        await tas.pub.send("probe/done", "1")
        await until(lambda: ("probe/done", "1") in everything.got, "everything published so far seen")
        wrong = [t for t, _ in everything.got if t.startswith("evil") or "/x/" in t]
        assert wrong == [] and "x" not in hub.nodes
        messages = [r.getMessage() for r in caplog.records]
        assert any("is not the configured '%prefix%/%topic%/'" in m for m in messages), messages
        assert any("are not the configured ['cmnd', 'stat', 'tele']" in m for m in messages), messages
        assert (f"cmnd/{tas.plug['t']}/POWER1", "ON") in tas.commands  # the plug as it was
    finally:
        everything.stop()
        await gw.stop()
        await tas.pub.send(f"{tas.dp}/0000000000E1/config", b"", retain=True)


async def test_a_sensor_key_that_makes_no_name_is_skipped(tmp_path: Path, mosquitto: Mosquitto, tas: Tasmota, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "iot_gateway")
    await tas.pub.send(f"{tas.dp}/{tas.bme['mac']}/config", json.dumps(tas.bme), retain=True)
    await tas.pub.send(f"{tas.dp}/{tas.bme['mac']}/sensors", json.dumps({"sn": dict(BME_SNS["sn"], **{"!!!": 5, "???": {"!!": 1}})}), retain=True)
    gw = await started(tmp_path, mosquitto, tas)
    bme = node_id(tas.bme["t"])
    try:
        await until(lambda: bme in gw.hub.nodes and "bme280_temperature" in gw.hub.nodes[bme].fields, "the sensor node")
        assert "" not in gw.hub.nodes[bme].fields
        await until(lambda: any("'!!!' skipped: its name makes no field name" in r.getMessage() for r in caplog.records), "the key said")
    finally:
        await gw.stop()
        await tas.pub.send(f"{tas.dp}/{tas.bme['mac']}/config", b"", retain=True)


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"full_topic": "evil/#/%topic%/"}, "devices.0.full_topic"),
        ({"full_topic": "%topic%/"}, "%prefix% and %topic% once each"),
        ({"full_topic": "%prefix%/%topic%/%hostname%/"}, "plain words"),
        ({"prefixes": ["cmnd", "cmnd", "tele"]}, "three different words"),
        ({"prefixes": ["cmnd", "st/at", "tele"]}, "single topic levels"),
        ({"writable": ["", "x.*"]}, "not a usable pattern"),
        ({"writable": "yes please"}, "writable"),
    ],
)
def test_topics_and_writable_config_checked(extra: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse({"mqtt": {"url": "mqtt://127.0.0.1:1883"}, "devices": [{"id": "tas", "driver": "tasmota", **extra}]})


async def test_the_driver_contract(tmp_path: Path, mosquitto: Mosquitto, tas: Tasmota) -> None:
    """tests/contract.py on a real Mosquitto, for the discovered plug: a set is applied once the
    plug reports it; LWT Offline makes it unhealthy, Online mends it."""
    await tas.announce()
    gw = await started(tmp_path, mosquitto, tas)
    plug = node_id(tas.plug["t"])
    lwt = f"tele/{tas.plug['t']}/LWT"
    try:
        await until(lambda: plug in gw.hub.nodes, "the plug")
        await driver_contract(Contract(
            gw.hub, plug, gw.stop, writes=[("power", True, True)],
            fail=lambda: tas.pub.send(lwt, "Offline", retain=True), mend=lambda: tas.pub.send(lwt, "Online", retain=True),
        ))
    except BaseException:
        await gw.stop()
        raise

