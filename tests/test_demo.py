"""`make demo`'s pieces: the simulated Tasmota-style plug, the fake DS18B20 folder,
and the devices of config/demo.toml, answering in chat through the suite's
Prosody and Mosquitto (the demo's own servers sit on fixed ports, so the test
does not start `gateway.demo` itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.kernel import discover, read_file
from gateway.demo import run as demo
from gateway.config import load
from gateway.demo.devices import Plug, Thermometer
from gateway.demo.localservers import Mosquitto
from gateway.demo.run import second_server_config
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.helpers import until

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "config" / "demo.toml"


class Listener:
    """A plain paho client that records what is published on some topics."""

    def __init__(self, port: int, *topics: str):
        self.got: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="listen-" + uuid.uuid4().hex[:8])
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(5), "listener could not subscribe"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.got.append((msg.topic, msg.payload.decode()))

    def said(self, topic: str) -> list[str]:
        with self._lock:
            return [p for t, p in self.got if t == topic]

    def send(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def demo_devices(w1_root: Path) -> list[dict[str, Any]]:
    """config/demo.toml's devices as they are, with the thermometer folder moved to `w1_root`
    and the kernel device read every second (the demo reads every 5 s)."""
    devices = tomllib.loads(DEMO_CONFIG.read_text())["devices"]
    for d in devices:
        if d["driver"] == "kernel":
            d["w1_root"] = str(w1_root)
            d["interval"] = 1
    return devices


@pytest.fixture
def thermometer(tmp_path: Path) -> Thermometer:
    t = Thermometer(tmp_path / "sys" / "bus" / "w1" / "devices")
    t.lay_out()
    return t


@pytest.fixture
def demo_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, dict[str, str]]]:
    """A Mosquitto set up as `make demo`'s: no anonymous clients, the demo's accounts and ACL."""
    pw = {u: uuid.uuid4().hex for u in demo.MQTT_ACCOUNTS}
    broker = Mosquitto(tmp_path / "demo-broker", acl=demo.ACL, accounts=pw)
    broker.start()
    yield broker, pw
    broker.stop()


@pytest.fixture
def plug(demo_broker: tuple[Mosquitto, dict[str, str]]) -> Iterator[Plug]:
    broker, pw = demo_broker
    p = Plug("127.0.0.1", broker.port, topic=demo.PLUG_TOPIC, interval=0.5, password=pw[demo.PLUG_TOPIC])
    p.start()
    yield p
    p.stop()


# ---------------------------------------------------------------- the demo config


def test_demo_config_has_every_kind_of_device(tmp_path: Path) -> None:
    # A copy in a fresh checkout: no .demo/ folder yet.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.toml").write_text(DEMO_CONFIG.read_text())
    config = load(tmp_path / "config" / "demo.toml")
    drivers = {d.id: d.driver for d in config.devices}
    assert {"simulated", "mqtt", "kernel"} <= set(drivers.values())
    assert drivers["plug"] == "mqtt" and drivers["pi"] == "kernel"
    assert config.mqtt is not None and config.mqtt.url == "mqtt://127.0.0.1:11883"
    # The broker lets no anonymous client in: the gateway logs in with the password `make demo` puts
    # in its environment, and trusts the demo's CA the same way (nothing the demo makes is named).
    assert (config.mqtt.username, config.gateway.id) == (demo.MQTT_GATEWAY, demo.GATEWAY_ID)
    assert config.mqtt.password_file is None and config.mqtt.password is None
    assert config.xmpp is not None and config.xmpp.ca_file is None and config.xmpp.password_file is None
    env = demo.gateway_env({"gateway": "x", demo.MQTT_GATEWAY: "y"}, tmp_path / "ca.pem")
    assert (env["IOT_GATEWAY_XMPP_PASSWORD"], env["SSL_CERT_FILE"]) == ("x", str(tmp_path / "ca.pem"))
    with mock.patch.dict(os.environ, env):
        assert config.mqtt.resolve_password() == "y"
    pi = next(d for d in config.devices if d.id == "pi")
    # Relative paths are relative to the config file, like state_dir, wherever the gateway runs.
    assert pi.w1_root.resolve() == tmp_path / ".demo" / "sys" / "bus" / "w1" / "devices"
    assert [f.sensor for f in pi.fields] == [f"w1:{Thermometer.SENSOR_ID}"]


def test_a_fresh_checkout_s_demo_config_passes_check(tmp_path: Path) -> None:
    """`iot-gateway check --config config/demo.toml` before any `make demo` (as on a freshly installed Pi)."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.toml").write_text(DEMO_CONFIG.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOT_GATEWAY_")}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", "config/demo.toml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "$IOT_GATEWAY_MQTT_PASSWORD at run time (not set in this environment" in done.stdout
    assert not (tmp_path / ".demo" / "mosquitto").exists()


def test_second_server_config_puts_you_on_the_other_server(tmp_path: Path) -> None:
    """`make demo SECOND_SERVER=1` runs config/demo.toml rewritten: the gateway on home.example, you elsewhere."""
    (tmp_path / ".demo").mkdir()
    path = tmp_path / ".demo" / "second-server.toml"  # where `make demo` writes it, beside its state
    path.write_text(second_server_config(DEMO_CONFIG.read_text()))
    config = load(path)
    assert config.xmpp is not None
    assert (config.xmpp.jid, config.xmpp.server, config.xmpp.ca_file) == ("gateway@home.example", "127.0.0.2:15222", None)
    assert [(c.jid, c.role) for c in config.contacts] == [("you@provider.example", "admin"), ("viewer@home.example", "viewer")]
    assert config.gateway.state_dir.resolve() == tmp_path / ".demo" / "state"
    with pytest.raises(ValueError, match="no \"gateway@localhost\" to rewrite"):
        second_server_config("[xmpp]\n")


def test_device_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "gw.toml").write_text(
        '[gateway]\nstate_dir = "state"\n'
        '[[devices]]\nid = "pi"\ndriver = "kernel"\nw1_root = "sys/w1"\n'
        '  [[devices.fields]]\n  name = "level"\n  path = "data/level"\n'
        '  [[devices.fields]]\n  name = "abs"\n  path = "/sys/class/thermal/thermal_zone0/temp"\n'
    )
    pi = load(folder / "gw.toml").devices[0]
    assert pi.w1_root == folder / "sys" / "w1"
    assert pi.iio_root == Path("/sys/bus/iio/devices")  # defaults stay the real ones
    assert [f.path for f in pi.fields] == [folder / "data" / "level", Path("/sys/class/thermal/thermal_zone0/temp")]


# ---------------------------------------------------------------- the fake DS18B20


def test_thermometer_is_laid_out_as_the_kernel_does_and_moves(thermometer: Thermometer) -> None:
    root = thermometer.root
    assert (root / "w1_bus_master1").is_dir()
    assert discover(root, root / "none", root / "none") == [(Thermometer.SENSOR_ID, f"w1:{Thermometer.SENSOR_ID}")]
    folder = root / Thermometer.SENSOR_ID
    first = read_file(folder / "temperature", 0.001)
    assert read_file(folder / "w1_slave", 0.001) == first  # `crc=.. YES` and the same t=
    assert (folder / "w1_slave").read_text().splitlines()[0].endswith("YES")
    assert first * 16 == pytest.approx(round(first * 16), abs=0.02)  # 1/16 °C steps, as a DS18B20
    seen = {first}
    now = time.time()
    for step in range(1, 6):
        thermometer.tick(now + step * thermometer.interval * 20)
        seen.add(read_file(folder / "temperature", 0.001))
    assert len(seen) > 1
    assert all(10 < t < 30 for t in seen)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left


# ---------------------------------------------------------------- the Tasmota-style plug


async def test_plug_answers_its_command_topic_like_tasmota(mosquitto: Mosquitto) -> None:
    topic = "plug-" + uuid.uuid4().hex[:6]
    stat, cmnd, sensor = f"stat/{topic}/POWER", f"cmnd/{topic}/POWER", f"tele/{topic}/SENSOR"
    listener = Listener(mosquitto.port, stat, sensor, f"tele/{topic}/LWT", f"stat/{topic}/RESULT")
    plug = Plug("127.0.0.1", mosquitto.port, topic=topic, interval=0.5)
    plug.start()
    try:
        await until(lambda: listener.said(f"tele/{topic}/LWT") == ["Online"], "LWT Online")
        await until(lambda: listener.said(stat) == ["OFF"], "the first state")
        await until(lambda: bool(listener.said(sensor)), "the first telemetry")
        assert json.loads(listener.said(sensor)[0])["ENERGY"]["Power"] == 0

        for payload, expected in (("ON", "ON"), ("toggle", "OFF"), ("2", "ON"), ("off", "OFF"), ("1", "ON")):
            count = len(listener.said(stat))
            listener.send(cmnd, payload)
            await until(lambda: len(listener.said(stat)) > count, f"the answer to {payload}")
            assert listener.said(stat)[-1] == expected, payload
        assert plug.on
        await until(lambda: json.loads(listener.said(sensor)[-1])["ENERGY"]["Power"] > 0, "power drawn")
        assert json.loads(listener.said(f"stat/{topic}/RESULT")[-1]) == {"POWER": "ON"}

        # A query (empty) and a payload it does not know answer the state and change nothing.
        for payload in ("", "BLINK"):
            count = len(listener.said(stat))
            listener.send(cmnd, payload)
            await until(lambda: len(listener.said(stat)) > count, f"the answer to {payload!r}")
            assert listener.said(stat)[-1] == "ON" and plug.on

        count = len(listener.said(sensor))
        await until(lambda: len(listener.said(sensor)) >= count + 2, "periodic telemetry")
    finally:
        plug.stop()
    await until(lambda: listener.said(f"tele/{topic}/LWT")[-1:] == ["Offline"], "LWT Offline on stop")
    listener.stop()


# ---------------------------------------------------------------- through XMPP


async def test_plug_and_thermometer_answer_in_chat(
    xmpp_server: XmppServer, demo_broker: tuple[Mosquitto, dict[str, str]], plug: Plug, thermometer: Thermometer,
    tmp_path: Path,
) -> None:
    broker, pw = demo_broker
    secret = tmp_path / "mqtt.password"
    secret.write_text(pw[demo.MQTT_GATEWAY])
    config = gateway_config(
        xmpp_server, tmp_path, devices=demo_devices(thermometer.root),
        mqtt={"url": broker.url, "username": demo.MQTT_GATEWAY, "password_file": str(secret)},
        gateway={"name": "Demo greenhouse", "id": demo.GATEWAY_ID, "state_dir": str(tmp_path / "state"), "health_debounce": 0},
    )
    gw = await start_gateway(config, xmpp_server.passwords["gateway"])
    hub = gw.gateway.hub
    alice = await xmpp_server.peer("alice").start()
    try:
        def latest(ref: str) -> Any:
            r = hub.field(ref).latest
            return None if r is None else r.value

        await until(lambda: None not in (latest("plug.relay"), latest("plug.power"), latest("pi.soil")), "first readings", 10)
        reply = await alice.ask_for(gw.jid, "read plug", lambda b: b.startswith("plug: ") and "\n" in b)
        assert reply.startswith("plug: ok"), reply
        assert "\nrelay " in reply and "off" in reply and "\npower " in reply  # rows under the device's heading

        first = thermometer.celsius
        reply = await alice.ask_for(gw.jid, "read pi", lambda b: b.startswith("pi: ") and "\n" in b)
        assert reply.startswith("pi: ok") and f"{first:.2f} °C" in reply, reply

        thermometer.write(first + 1.5)
        await until(lambda: latest("pi.soil") == pytest.approx(first + 1.5), "the new temperature", 10)
        assert f"{first + 1.5:.2f} °C" in await alice.ask_for(gw.jid, "read pi.soil", "pi.soil")

        reply = await alice.ask_for(gw.jid, "set plug.relay on", "plug.relay")
        assert reply == "plug.relay: off → on", reply
        await until(lambda: plug.on, "the plug to switch on")
        await until(lambda: latest("plug.relay") is True and (latest("plug.power") or 0) > 0, "the plug's report")
        reply = await alice.ask_for(gw.jid, "read plug", lambda b: b.startswith("plug: ") and "\n" in b)
        assert " on" in reply and " 0.0 W" not in reply, reply
        assert "alice@" in await alice.ask_for(gw.jid, "log plug.relay", "Last ")
    finally:
        await alice.stop()
        await gw.stop()
