"""MQTT faults of issue 19 through a real Mosquitto: a set the broker's ACL denies, a denied
subscription, two gateways with one client id, and a device flooding readings."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import gateway.mqtt.broker as mqtt
from gateway.mqtt.broker import Broker
from gateway.app import Gateway
from gateway.auth import Actor
from gateway.hub import Health, Unconfirmed
from gateway.demo.localservers import Mosquitto
from gateway.state import StateDir, StateLocked
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.helpers import until
from tests.test_mqtt import Echo, Publisher, gateways, health, make_config, unique, values  # noqa: F401
from tests.test_rooms import gateway_in, new_room

ADMIN = Actor("admin@example.org", "admin", "test")
DYNSEC = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def plug(p: str, **device: Any) -> dict[str, Any]:
    return {
        "id": "plug", "driver": "mqtt", **device, "fields": [
            {"name": "relay", "type": "boolean", "writable": True, "topic": f"stat/{p}/POWER",
             "command_topic": f"cmnd/{p}/POWER"},
            {"name": "led", "type": "boolean", "writable": True, "command_topic": f"led/{p}/set"},
        ],
    }


# ---------------------------------------------------------------- item 2: a set the broker refused


async def test_a_set_the_broker_denies_is_not_confirmed_and_audited_so(
    xmpp_server: XmppServer, tmp_path: Path
) -> None:
    cid = unique("gwacl")
    # Anonymous clients may read cmnd/# but not publish there: MQTT 3.1.1 still PUBACKs the publish.
    broker = Mosquitto(
        tmp_path / "broker",
        acl=f"topic read cmnd/#\ntopic readwrite stat/#\ntopic readwrite led/#\ntopic readwrite {cid}/#\n",
    )
    broker.start()
    p = unique("plug")
    config = gateway_config(
        xmpp_server, tmp_path, devices=[plug(p, confirm_timeout=2)], mqtt={"url": broker.url, "client_id": cid}
    )
    running = await start_gateway(config, xmpp_server.passwords["gateway"])
    gw = running.gateway
    echo = Echo(broker.port, {f"cmnd/{p}/POWER": (f"stat/{p}/POWER", str)})  # the plug: it never hears the set
    alice = await xmpp_server.peer("alice").start()
    try:
        await until(lambda: health(gw, "plug") == (Health.OK, ""), "broker connection")
        # Still waiting after a second: the contact hears so, then the outcome.
        assert await alice.ask_for(running.jid, "set plug.relay on", "plug.relay") == "plug.relay: on sent, waiting for the device…"
        assert await alice.reply_matching(running.jid, "Error: plug.relay") == (
            "Error: plug.relay: on sent, not confirmed: the device did not report the new state within 2 s."
        )
        entry = gw.hub.audit.entries[-1]
        assert (entry.ref, entry.new, entry.outcome) == ("plug.relay", True, "unconfirmed")
        assert entry.reason == "not confirmed: the device did not report the new state within 2 s"
        assert echo.heard == [] and values(gw, "plug.relay") == []
        # Without a state topic nothing can confirm it: "sent", claiming no change, audited so.
        assert await alice.ask_for(running.jid, "set plug.led on", "plug.led") == "plug.led: on sent"
        entry = gw.hub.audit.entries[-1]
        assert (entry.ref, entry.new, entry.outcome) == ("plug.led", True, "sent")
        log = await alice.ask_for(running.jid, "log plug.led", "Last ")
        assert re.search(r"\nplug\.led  on sent  \d+ s ago\n  by alice@localhost via chat$", log), log
    finally:
        echo.stop()
        await alice.stop()
        await running.stop()
        broker.stop()


async def test_a_set_the_device_confirms_is_applied(
    mosquitto: Mosquitto, gateways: list[Gateway], tmp_path: Path  # noqa: F811
) -> None:
    p = unique("plug")
    gw = Gateway(make_config(tmp_path, mosquitto.url, [plug(p, confirm_timeout=5)]))
    gateways.append(gw)
    await gw.start()
    await until(lambda: health(gw, "plug") == (Health.OK, ""), "broker connection")
    # A device that reports what it was told, as a Tasmota plug does on stat/.
    echo = Echo(mosquitto.port, {f"cmnd/{p}/POWER": (f"stat/{p}/POWER", str)})
    try:
        assert await gw.hub.write("plug.relay", "on", ADMIN) == (None, True)
    finally:
        echo.stop()
    assert gw.hub.audit.entries[-1].outcome == "applied"
    # A device that reports something else: not confirmed, and the reply says what it reported.
    stubborn = Echo(mosquitto.port, {f"cmnd/{p}/POWER": (f"stat/{p}/POWER", lambda _p: "ON")})
    gw.drivers["plug"].device.confirm_timeout = 0.5  # type: ignore[misc]
    try:
        with pytest.raises(Unconfirmed, match=r"within 0\.5 s; it last reported on$"):
            await gw.hub.write("plug.relay", "off", ADMIN)
    finally:
        stubborn.stop()


def slowly(payload: str) -> str:
    """A plug that takes a moment to switch before it reports its state (on its own paho thread)."""
    time.sleep(1.5)
    return payload


async def test_a_set_the_device_confirms_late_says_sent_then_applied(
    xmpp_server: XmppServer, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    p = unique("plug")
    config = gateway_config(xmpp_server, tmp_path, devices=[plug(p, confirm_timeout=5)],
                            mqtt={"url": mosquitto.url, "client_id": unique("gwslow")})
    running = await start_gateway(config, xmpp_server.passwords["gateway"])
    gw = running.gateway
    alice = await xmpp_server.peer("alice").start()
    echo = Echo(mosquitto.port, {f"cmnd/{p}/POWER": (f"stat/{p}/POWER", slowly)})
    try:
        await until(lambda: health(gw, "plug") == (Health.OK, ""), "broker connection")
        assert await alice.ask_for(running.jid, "set plug.relay on", "plug.relay") == "plug.relay: on sent, waiting for the device…"
        assert await alice.reply_matching(running.jid, "plug.relay") == "plug.relay: — → on"
        assert gw.hub.audit.entries[-1].outcome == "applied"
        echo.states[f"cmnd/{p}/POWER"] = (f"stat/{p}/POWER", str)  # now a quick one: no interim message
        assert await alice.ask_for(running.jid, "set plug.relay off", "plug.relay") == "plug.relay: on → off"
        with pytest.raises(TimeoutError):
            await alice.reply_matching(running.jid, "plug.relay", timeout=1.5)
    finally:
        echo.stop()
        await alice.stop()
        await running.stop()


async def test_a_slow_set_in_a_room_says_sent_then_the_outcome(xmpp_server: XmppServer, tmp_path: Path) -> None:
    room = new_room("slow")
    gw = await gateway_in(xmpp_server, tmp_path, room)
    hub = gw.gateway.hub
    write = hub._writers["sim"]

    async def slow(field: str, value: Any) -> None:  # a device that takes a while to confirm
        await asyncio.sleep(1.5)
        await write(field, value)

    hub.set_writer("sim", slow)
    olive = await xmpp_server.peer("olive").start()
    try:
        await olive.join(room, "olive")
        olive.client.send_message(mto=room, mbody="gw: set sim.speed 40", mtype="groupchat")
        assert await olive.room_said(room, "gw") == "olive: sim.speed: 40 sent, waiting for the device…"
        assert await olive.room_said(room, "gw") == "olive: sim.speed: 0 → 40"
    finally:
        await olive.stop()
        await gw.stop()


# ---------------------------------------------------------------- item 2: a denied subscription


async def test_a_denied_subscription_is_logged_and_shown_in_health(
    gateways: list[Gateway], tmp_path: Path, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    if not Path(DYNSEC).exists():
        pytest.skip("Mosquitto's dynamic security plugin is not installed")
    caplog.set_level(logging.INFO, logger="iot_gateway.mqtt")
    # Mosquitto's acl_file never refuses a SUBSCRIBE (it filters deliveries); its dynamic
    # security plugin answers a denied one with SUBACK 0x80, as other brokers do.
    broker = Mosquitto(tmp_path / "broker")
    dynsec = broker.root / "dynsec.json"
    dynsec.write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True, "subscribe": True, "unsubscribe": True},
        "clients": [], "groups": [{"groupname": "anon", "roles": [{"rolename": "limited"}], "clients": []}],
        "roles": [{"rolename": "limited", "acls": [
            {"acltype": "subscribePattern", "topic": "secret/#", "priority": 0, "allow": False}]}],
        "anonymousGroup": "anon",
    }))
    with broker.config.open("a") as f:
        f.write(f"plugin {DYNSEC}\nplugin_opt_config_file {dynsec}\n")
    broker.start()
    try:
        gw = Gateway(make_config(tmp_path, broker.url, [
            {"id": "vault", "driver": "mqtt", "fields": [{"name": "t", "topic": "secret/t"}]},
            {"id": "open", "driver": "mqtt", "fields": [{"name": "t", "topic": "open/t"}]},
        ]))
        gateways.append(gw)
        await gw.start()
        await until(lambda: health(gw, "vault")[0] is Health.ERROR, "the refusal in vault's health")
        assert health(gw, "vault") == (
            Health.ERROR,
            "the broker refused the subscription to secret/t (SUBACK failure 0x80): check its ACL for anonymous clients",
        )
        assert health(gw, "open") == (Health.OK, "")
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors == ["mqtt: the broker refused the subscription to secret/t (SUBACK failure 0x80): "
                          "check its ACL for anonymous clients"]
    finally:
        for g in list(gateways):
            gateways.remove(g)
            await g.stop()
        broker.stop()


# ---------------------------------------------------------------- item 1: twins


async def test_two_gateways_with_one_client_id_back_off_and_say_so_once(
    mosquitto: Mosquitto, gateways: list[Gateway], tmp_path: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="iot_gateway.mqtt")
    monkeypatch.setattr(mqtt, "RECONNECT_MIN", 0.2)  # quick retries, so they fight at once
    monkeypatch.setattr(mqtt, "RECONNECT_MAX", 0.4)
    cid = unique("clone")
    t = unique("twin")
    devices = [{"id": "probe", "driver": "mqtt", "fields": [{"name": "n", "topic": f"{t}/n"}]}]
    one = Gateway(make_config(tmp_path / "one", mosquitto.url, devices, client_id=cid))
    two = Gateway(make_config(tmp_path / "two", mosquitto.url, devices, client_id=cid))
    for gw in (one, two):
        gateways.append(gw)
        await gw.start()
    brokers: list[Broker] = [one.ctx.shared["mqtt"], two.ctx.shared["mqtt"]]
    await until(lambda: any("mqtt" in gw.hub.problems for gw in (one, two)), "one of them to notice the other", 20)
    twin = next(gw for gw in (one, two) if "mqtt" in gw.hub.problems)
    other = two if twin is one else one
    problem = f"another client is using MQTT client id {cid}"
    assert twin.hub.problems["mqtt"].message == problem
    assert health(twin, "probe") == (Health.OFFLINE, problem)
    # It backs off hard (minutes), so the other keeps the connection and works.
    assert next(b for b in brokers if b.twin).wait >= 0.8 * mqtt.TWIN_WAIT
    changes: list[str] = []
    twin.hub.subscribe(health=lambda node, old: changes.append(node.health.describe()))
    await until(lambda: health(other, "probe") == (Health.OK, ""), "the other gateway to hold the connection", 10)
    pub = Publisher(mosquitto.port)
    try:
        await pub.send(f"{t}/n", "5")
        await until(lambda: values(other, "probe.n") == [5.0], "a reading at the other gateway")
    finally:
        pub.stop()
    assert changes == []  # no alert per flap
    said = [r.getMessage() for r in caplog.records if "most likely another client uses the client id" in r.getMessage()]
    assert len(said) == 1 and f"{cid!r}" in said[0] and "retrying every 5 min" in said[0], said


async def test_a_console_next_to_the_gateway_never_takes_its_mqtt_session(
    mosquitto: Mosquitto, gateways: list[Gateway], tmp_path: Path,  # noqa: F811
) -> None:
    """`iot-gateway console` on the running gateway's config (the README suggests it) uses the
    state read-only, and its own MQTT client id with a clean session: no twin fight, and the
    gateway's queued QoS 1 readings stay the gateway's."""
    cid = unique("shared-config")
    t = unique("console")
    devices = [{"id": "probe", "driver": "mqtt", "fields": [{"name": "n", "topic": f"{t}/n"}]}]
    config = make_config(tmp_path, mosquitto.url, devices, client_id=cid)
    owner = StateDir(config.gateway.state_dir)
    owner.lock()
    gw = Gateway(config, owner)
    gateways.append(gw)
    await gw.start()
    await until(lambda: health(gw, "probe")[0] is Health.OK, "the gateway connected")
    guest_state = StateDir(config.gateway.state_dir)
    with pytest.raises(StateLocked) as locked:
        guest_state.lock()
    guest_state.use_readonly(locked.value)
    console = Gateway(config, guest_state)
    gateways.append(console)
    await console.start()
    await until(lambda: health(console, "probe")[0] is Health.OK, "the console connected")
    guest: Broker = console.ctx.shared["mqtt"]
    assert guest.client_id.startswith(f"{cid}-console-") and not guest.persistent
    pub = Publisher(mosquitto.port)
    try:
        await pub.send(f"{t}/n", "7")
        await until(lambda: values(gw, "probe.n") == [7.0] and values(console, "probe.n") == [7.0], "both read it")
    finally:
        pub.stop()
    assert "mqtt" not in gw.hub.problems and "mqtt" not in console.hub.problems
    assert gw.ctx.shared["mqtt"].client_id == cid and health(gw, "probe") == (Health.OK, "")


# ---------------------------------------------------------------- item 6: a flooding device


async def test_a_flooding_device_reaches_disk_at_most_twice_per_field_per_second(
    mosquitto: Mosquitto, gateways: list[Gateway], tmp_path: Path  # noqa: F811
) -> None:
    messages = 5000
    t = unique("flood")
    config = make_config(tmp_path, mosquitto.url, [
        {"id": "flood", "driver": "mqtt", "fields": [{"name": "n", "type": "integer", "topic": f"{t}/n"}]},
    ])
    gw = Gateway(config)
    gateways.append(gw)
    await gw.start()
    field = gw.hub.field("flood.n")
    await until(lambda: health(gw, "flood") == (Health.OK, ""), "broker connection")
    feed = tmp_path / "feed.txt"
    feed.write_text("".join(f"{i}\n" for i in range(messages)))
    with feed.open("rb") as f:
        await asyncio.to_thread(
            subprocess.run, ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mosquitto.port), "-t", f"{t}/n", "-q", "1", "-l"],
            stdin=f, check=True, timeout=60,
        )
    await until(lambda: field.latest is not None and field.latest.value == messages - 1, "the last message", 30)
    assert len(field.history) == 1000  # memory keeps every reading (up to history_size)
    gateways.remove(gw)
    await gw.stop()  # writes what is held back
    con = sqlite3.connect(Path(config.gateway.state_dir) / "history.db")
    stamps = [t for (t,) in con.execute("SELECT t FROM readings WHERE ref = 'flood.n' ORDER BY rowid")]
    last = con.execute("SELECT v FROM readings WHERE ref = 'flood.n' ORDER BY rowid DESC LIMIT 1").fetchone()
    con.close()
    per_second: dict[int, int] = {}
    for s in stamps:
        per_second[int(s)] = per_second.get(int(s), 0) + 1
    assert max(per_second.values()) <= 2, per_second
    assert last == (str(messages - 1),)  # the latest reading is on disk: a restart shows it
