"""Presence tells device health: serial unplug/replug and MQTT LWT through the real stack."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

import devices.serial as sd
from gateway.demo.localservers import Mosquitto
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.test_serial import Wire, until


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sd, "RETRY_FIRST", 0.05)
    monkeypatch.setattr(sd, "RETRY_MAX", 0.4)
    monkeypatch.setattr(sd, "CHECK_EVERY", 0.05)


def publish(broker: Mosquitto, topic: str, payload: str, retain: bool = False) -> None:
    cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", topic, "-m", payload]
    subprocess.run(cmd + (["-r"] if retain else []), check=True, timeout=10)


async def test_presence_follows_serial_unplug_and_mqtt_lwt(
    xmpp_server: XmppServer, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    wire = Wire(tmp_path)
    await wire.plug()
    devices = [
        {"id": "weather", "driver": "serial", "port": str(wire.a), "fields": [{"name": "temp"}]},
        {"id": "plug", "driver": "mqtt", "availability_topic": "pres/plug/LWT",
         "fields": [{"name": "power", "topic": "pres/plug/SENSOR", "json_path": "ENERGY.Power"}]},
    ]
    publish(mosquitto, "pres/plug/LWT", "Online", retain=True)
    config = gateway_config(xmpp_server, tmp_path, devices=devices, mqtt={"url": mosquitto.url, "client_id": "presence-test"})
    gw = await start_gateway(config, xmpp_server.passwords["gateway"])
    alice = await xmpp_server.peer("alice").start()

    marks = [time.monotonic()]

    def mark() -> None:
        """Forget presences so far and start the clock: the next change is about to happen."""
        alice.presences.clear()
        marks.append(time.monotonic())

    async def status(show: str, timeout: float = 5.0) -> tuple[str, float]:
        t0 = marks[-1]
        pres = await alice.presence_from(gw.jid, lambda p: p["type"] in ("available", "away", "xa", "dnd", "chat") and p["show"] == show, timeout)
        return pres["status"], time.monotonic() - t0

    try:
        await wire.send(b"temp=21.5\n")
        alice.client.send_presence_subscription(pto=gw.jid)
        text, _ = await status("")
        assert text == "Test GW: 2/2 devices OK"

        mark()
        await wire.unplug()
        text, took = await status("away")
        assert text.startswith("Test GW: 1/2 OK · weather: offline: serial port")
        assert took < 3

        mark()
        publish(mosquitto, "pres/plug/LWT", "Offline", retain=True)
        text, took = await status("xa")
        assert text.startswith("Test GW: 0/2 OK · weather: offline") and "plug: offline (LWT)" in text
        assert took < 3

        mark()
        await wire.plug()
        await until(lambda: "waiting for data" in gw.gateway.hub.nodes["weather"].health.reason, what="the port reopened")
        await wire.send(b"temp=22\n")
        publish(mosquitto, "pres/plug/LWT", "online", retain=True)
        text, _ = await status("")
        assert text == "Test GW: 2/2 devices OK"
    finally:
        await alice.stop()
        await gw.stop()
        await wire.unplug()


async def test_flapping_device_cannot_flood_contacts(xmpp_server: XmppServer, tmp_path: Path) -> None:
    from gateway.hub import Health

    gw = await start_gateway(gateway_config(xmpp_server, tmp_path), xmpp_server.passwords["gateway"])
    alice = await xmpp_server.peer("alice").start()
    try:
        alice.client.send_presence_subscription(pto=gw.jid)
        await alice.presence_from(gw.jid, lambda p: p["type"] == "available")
        await asyncio.sleep(2.2)  # past the debounce window of the first presence
        alice.presences.clear()
        for i in range(40):  # 40 health changes in about 2 s
            gw.gateway.hub.set_health("sim", Health.OFFLINE if i % 2 == 0 else Health.OK, f"flap {i}")
            await asyncio.sleep(0.05)
        gw.gateway.hub.set_health("sim", Health.OFFLINE, "final")
        await asyncio.sleep(2.5)
        mine = [p for p in alice.presences if p["from"].bare == gw.jid]
        assert 1 <= len(mine) <= 3
        assert mine[-1]["status"] == "Test GW: 0/1 OK · sim: offline: final"
    finally:
        await alice.stop()
        await gw.stop()
