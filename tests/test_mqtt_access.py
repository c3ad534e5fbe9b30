"""Who may do what on the broker: the gateway warns about a broker that lets anyone in, and the
Mosquitto ACL of docs/mqtt.md (and `make demo`) leaves strangers and other devices no way to
switch anything, while the gateway and Home Assistant still work. Real Mosquitto brokers with
a password_file, one per test."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.mqtt.broker import OPEN_BROKER, OPEN_PROBLEM, accepts_anonymous
from gateway.demo import run as demo
from gateway.app import Gateway
from gateway.auth import Actor
from gateway.config import Config, parse
from gateway.demo.devices import Plug
from gateway.demo.localservers import Mosquitto
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.helpers import until
from tests.test_homeassistant import Watcher
from tests.test_mqtt import Publisher

ROOT = Path(__file__).resolve().parent.parent
ADMIN = Actor("admin@example.org", "admin", "test")
GW_USER = demo.MQTT_GATEWAY
METER = {"id": "meter", "driver": "mqtt", "fields": [{"name": "power", "topic": "tele/meter/SENSOR"}]}


def broker_with(tmp_path: Path, anonymous: bool, acl: str | None = None) -> tuple[Mosquitto, dict[str, str]]:
    """A started Mosquitto with an account for the gateway, the plug, Home Assistant and Zigbee2MQTT."""
    pw = {u: secrets.token_hex(8) for u in (*demo.MQTT_ACCOUNTS, "zigbee2mqtt")}
    broker = Mosquitto(tmp_path / "broker", acl=acl, accounts=pw, anonymous=anonymous)
    broker.start()
    return broker, pw


@pytest.fixture
def stop_later() -> Iterator[list[Any]]:
    """Brokers, plugs and clients a test started, stopped at the end whatever happened."""
    things: list[Any] = []
    yield things
    for t in reversed(things):
        t.stop()


def mqtt_section(broker: Mosquitto, pw: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    secret = tmp_path / "mqtt.password"
    secret.write_text(pw[GW_USER] + "\n")
    return {"url": broker.url, "username": GW_USER, "password_file": str(secret)}


# ---------------------------------------------------------------- a broker open to anyone


async def test_a_broker_open_to_anonymous_clients_is_told_in_the_log_status_and_to_admins_once(
    xmpp_server: XmppServer, tmp_path: Path, stop_later: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    broker, pw = broker_with(tmp_path, anonymous=True)
    stop_later.append(broker)
    config = gateway_config(xmpp_server, tmp_path, devices=[METER], mqtt=mqtt_section(broker, pw, tmp_path))
    alice = await xmpp_server.peer("alice").start()
    running = await start_gateway(config, xmpp_server.passwords["gateway"])
    try:
        gw = running.gateway
        for _ in range(50):  # the admin's alert, among whatever else the gateway says first
            said = await alice.reply_from(running.jid, 10)
            if "without a password" in said:
                break
        assert said == f"{OPEN_PROBLEM}: {OPEN_BROKER}"
        assert gw.ctx.shared["mqtt"].open is True
        reply = await alice.ask(running.jid, "status")
        assert f"{OPEN_PROBLEM}: {OPEN_BROKER}" in reply, reply
        assert sum("without a password" in r.getMessage() for r in caplog.records) == 1
    finally:
        await alice.stop()
        await running.stop()


async def test_a_broker_that_refuses_anonymous_clients_gives_no_warning(
    tmp_path: Path, stop_later: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    broker, pw = broker_with(tmp_path, anonymous=False)
    stop_later.append(broker)
    config = parse({
        "gateway": {"state_dir": str(tmp_path / "state")},
        "mqtt": mqtt_section(broker, pw, tmp_path),
        "devices": [METER],
    })
    assert config.mqtt is not None and await asyncio.to_thread(accepts_anonymous, config.mqtt) is False
    gw = Gateway(config)
    await gw.start()
    try:
        mqtt = gw.ctx.shared["mqtt"]
        await until(lambda: mqtt.connected and mqtt.open is not None, "the anonymous check done")
        assert mqtt.open is False and OPEN_PROBLEM not in gw.hub.problems
        assert not any("without a password" in r.getMessage() for r in caplog.records)
        assert pw[GW_USER] not in caplog.text  # the password is never logged
    finally:
        await gw.stop()


# ---------------------------------------------------------------- the documented ACL


def test_the_docs_show_the_acl_the_demo_uses() -> None:
    assert demo.ACL in (ROOT / "docs" / "mqtt.md").read_text()


def demo_config(broker: Mosquitto, pw: dict[str, str], tmp_path: Path) -> Config:
    """config/demo.toml's plug and a writable simulated relay, on `broker` as the demo's gateway,
    with Home Assistant commands on."""
    plug = {
        "id": "plug", "driver": "mqtt", "availability_topic": "tele/plug/LWT", "confirm_timeout": 5,
        "fields": [{
            "name": "relay", "type": "boolean", "writable": True,
            "topic": "stat/plug/POWER", "command_topic": "cmnd/plug/POWER",
        }],
    }
    sim = {"id": "sim", "driver": "simulated", "interval": 0.2, "fields": [
        {"name": "relay", "type": "boolean", "writable": True},
        {"name": "speed", "type": "integer", "writable": True, "min": 0, "max": 100},
    ]}
    return parse({
        "gateway": {"name": "Demo greenhouse", "id": demo.GATEWAY_ID, "state_dir": str(tmp_path / "state")},
        "mqtt": mqtt_section(broker, pw, tmp_path),
        "homeassistant": {"commands": True},
        "devices": [plug, sim],
    })


async def test_with_the_documented_acl_strangers_and_other_devices_switch_nothing(
    tmp_path: Path, stop_later: list[Any]
) -> None:
    broker, pw = broker_with(tmp_path, anonymous=False, acl=demo.ACL)
    stop_later.append(broker)
    plug = Plug("127.0.0.1", broker.port, topic=demo.PLUG_TOPIC, interval=0.5, password=pw[demo.PLUG_TOPIC])
    plug.start()
    stop_later.append(plug)
    ha_set = f"iot-gateway/{demo.GATEWAY_ID}/sim"
    gw = Gateway(demo_config(broker, pw, tmp_path))
    await gw.start()
    hass = Publisher(broker.port, "homeassistant", pw["homeassistant"])
    stop_later.append(hass)
    states = Watcher(broker.port, "stat/plug/POWER", auth=("homeassistant", pw["homeassistant"]))
    stop_later.append(states)
    try:
        hub = gw.hub
        await until(lambda: hub.field("plug.relay").latest is not None, "the plug's state read by the gateway")

        # An anonymous client cannot even connect.
        for topic in (f"{ha_set}/relay/set", "cmnd/plug/POWER"):
            r = await asyncio.to_thread(
                subprocess.run,
                ["mosquitto_pub", "-p", str(broker.port), "-h", "127.0.0.1", "-q", "1", "-t", topic, "-m", "ON"],
                capture_output=True, text=True, timeout=15,
            )
            assert r.returncode != 0 and "not authori" in (r.stderr + r.stdout).lower(), r
        # Other devices' accounts: the broker takes the publish (MQTT 3.1.1 says nothing) and drops it.
        for user in (demo.PLUG_TOPIC, "zigbee2mqtt"):
            other = Publisher(broker.port, user, pw[user])
            try:
                await other.send(f"{ha_set}/relay/set", "ON")
                await other.send("cmnd/plug/POWER", "ON")
            finally:
                other.stop()
        # Home Assistant's own commands come after theirs: once they are carried out, theirs would have been.
        answers = len(states.messages)
        await hass.send("cmnd/plug/POWER", "")  # a query: the plug answers its state
        await hass.send(f"{ha_set}/speed/set", "7")
        await until(lambda: len(hub.audit.entries) >= 1, "Home Assistant's command audited")
        await until(lambda: len(states.messages) > answers, "the plug's answer to the query")
        assert [e.line() for e in hub.audit.entries] == ["homeassistant via mqtt: sim.speed 0 -> 7"]
        assert hub.field("sim.relay").latest.value is False
        assert not plug.on and states.messages[-1][1] == "OFF"

        # The gateway itself works: its command reaches the plug, which confirms it.
        await hub.write("plug.relay", True, ADMIN)
        assert plug.on and hub.field("plug.relay").latest.value is True
        assert gw.ctx.shared["mqtt"].refused == {}  # every subscription of the gateway is allowed
    finally:
        await gw.stop()
