"""The zigbee2mqtt driver against a real Mosquitto, with the test playing Zigbee2MQTT.

The device list, states and availability are the fixtures in tests/discovery/
(shaped as Zigbee2MQTT 2.x publishes them; SOURCES.md says where they come from).
Each test uses its own base topic, so retained messages of one do not reach another.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.zigbee2mqtt import convert, spots, state_word, usable
from gateway.app import Gateway
from gateway.auth import Actor
from gateway.config import Config, parse
from gateway.hub import Health
from gateway.demo.localservers import Mosquitto
from gateway.values import BadValue
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.helpers import until
from tests.test_mqtt import Publisher
from tests.contract import Contract, driver_contract
from tests.xep_helpers import SD, Inbox, by_name, child, iq, values

HERE = Path(__file__).resolve().parent / "discovery"
DEVICES: list[dict[str, Any]] = json.loads((HERE / "z2m_bridge_devices.json").read_text())
STATES: dict[str, Any] = json.loads((HERE / "z2m_states.json").read_text())
ADMIN = Actor("admin@example.org", "admin", "test")
SHOWN = {"living_room_climate", "kitchen_kettle_plug", "hall_ceiling", "hall_motion"}


def config(tmp_path: Path, url: str, base: str, **extra: Any) -> Config:
    return parse(
        {
            # Every reading reaches history.db (no thinning to 2 a second): the rename test counts rows.
            "gateway": {"name": "Z2M test", "state_dir": str(tmp_path / "state"), "history_per_second": 0},
            "mqtt": {"url": url, "client_id": "gw-" + uuid.uuid4().hex[:8]},
            "devices": [{"id": "zb", "driver": "zigbee2mqtt", "base_topic": base, **extra}],
        }
    )


class Z2m:
    """The test as Zigbee2MQTT: publishes the bridge's retained topics, and answers sets with the
    new state (as Z2M does once the device reported it)."""

    def __init__(self, pub: Publisher, base: str):
        self.pub = pub
        self.base = base
        self.sets: list[tuple[str, dict[str, Any]]] = []
        self.state: dict[str, dict[str, Any]] = {}
        self._sub: paho.Client | None = None

    async def devices(self, devices: list[dict[str, Any]] | str | bytes) -> None:
        body = devices if isinstance(devices, (str, bytes)) else json.dumps(devices)
        await self.pub.send(f"{self.base}/bridge/devices", body, retain=True)

    async def bridge(self, payload: str) -> None:
        await self.pub.send(f"{self.base}/bridge/state", payload, retain=True)

    async def report(self, name: str, state: dict[str, Any]) -> None:
        self.state.setdefault(name, {}).update(state)
        await self.pub.send(f"{self.base}/{name}", json.dumps(self.state[name]))

    def answer_sets(self, port: int) -> None:
        """Subscribe to `<base>/+/+/set` and report each set back as the device's new state."""
        ready = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="z2m-" + uuid.uuid4().hex[:8])
        c.on_connect = lambda *_a: c.subscribe(f"{self.base}/#", qos=1)
        c.on_subscribe = lambda *_a: ready.set()

        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            if not msg.topic.endswith("/set"):
                return
            name = msg.topic[len(self.base) + 1 : -len("/set")]
            body = json.loads(msg.payload)
            self.sets.append((msg.topic, body))
            self.state.setdefault(name, {}).update(body)
            c.publish(f"{self.base}/{name}", json.dumps(self.state[name]), qos=1)

        c.on_message = on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert ready.wait(5), "z2m stand-in could not subscribe"
        self._sub = c

    def stop(self) -> None:
        if self._sub is not None:
            self._sub.disconnect()
            self._sub.loop_stop()


@pytest.fixture
async def z2m(mosquitto: Mosquitto) -> AsyncIterator[Z2m]:
    pub = Publisher(mosquitto.port)
    fake = Z2m(pub, "z2m-" + uuid.uuid4().hex[:8])
    yield fake
    fake.stop()
    pub.stop()


async def started(tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m, **extra: Any) -> Gateway:
    gw = Gateway(config(tmp_path, mosquitto.url, z2m.base, **extra))
    await gw.start()
    return gw


def renamed(devices: list[dict[str, Any]], old: str, new: str) -> list[dict[str, Any]]:
    out = copy.deepcopy(devices)
    for d in out:
        if d["friendly_name"] == old:
            d["friendly_name"] = new
    return out


# ---------------------------------------------------------------- parsing, no broker


def test_only_usable_devices_are_shown() -> None:
    why = {d["friendly_name"]: usable(d) for d in DEVICES}
    assert why["Coordinator"] == "the coordinator"
    assert why["0x54ef4410001a2b3c"].startswith("interview in_progress")
    assert why["0xa4c1380f1e2d3c4b"].startswith("interview failed")  # a generated definition is not enough
    assert {n for n, w in why.items() if not w} == {"living_room/climate", "kitchen/kettle_plug", "hall/ceiling", "hall/motion"}
    v1 = json.loads((HERE / "z2m_bridge_devices_v1.json").read_text())
    assert [usable(d) for d in v1] == ["not supported by Zigbee2MQTT", "the coordinator"]


def test_exposes_become_fields() -> None:
    light = spots(next(d for d in DEVICES if d["friendly_name"] == "hall/ceiling")["definition"]["exposes"], "x")
    b = light["brightness"].spec
    assert (b.type, b.writable, b.min, b.max) == ("numeric", True, 0, 254)
    assert light["state"].spec.type == "boolean" and (light["state"].on, light["state"].off) == ("ON", "OFF")
    assert light["color_temp"].spec.unit == "mired"
    # A composite nests under its property; its write-only feature is writable and not read.
    nested = light["level_config_current_level_startup"]
    assert nested.path == ("level_config", "current_level_startup")
    assert not light["color_options_execute_if_off"].readable and light["color_options_execute_if_off"].spec.writable
    assert light["effect"].spec.choices[:2] == ("blink", "breathe") and not light["effect"].readable
    assert light["linkquality"].spec.unit == "lqi" and not light["linkquality"].spec.writable
    # A value that does not fit its declared type is not a reading.
    assert convert(nested, "previous") is None and convert(nested, 3) == 3.0
    motion = spots(next(d for d in DEVICES if d["friendly_name"] == "hall/motion")["definition"]["exposes"], "x")
    assert convert(motion["occupancy"], True) is True and convert(motion["occupancy"], "ON") is None
    assert state_word(b'{"state":"offline"}') is False and state_word(b"online") is True and state_word(b"maybe") is None


# ---------------------------------------------------------------- through Mosquitto


async def test_devices_readings_and_bridge_node(tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m) -> None:
    await z2m.devices(DEVICES)
    await z2m.bridge('{"state":"online"}')
    gw = await started(tmp_path, mosquitto, z2m)
    try:
        hub = gw.hub
        await until(lambda: SHOWN <= set(hub.nodes), "the four devices")
        assert set(hub.nodes) == SHOWN | {"zb"}
        assert hub.nodes["hall_ceiling"].name == "hall/ceiling" and hub.nodes["hall_ceiling"].driver == "zigbee2mqtt"
        await until(lambda: hub.field("zb.devices").latest is not None, "the bridge's device count")
        assert hub.field("zb.devices").latest.value == 4
        assert hub.nodes["zb"].health.state is Health.OK
        for name, dev in STATES["devices"].items():
            await z2m.report(name, dev["messages"][0])
        await until(lambda: hub.field("hall_ceiling.brightness").latest is not None, "the light's state")
        await until(lambda: hub.field("hall_motion.occupancy").latest is not None, "the motion sensor's state")
        await until(lambda: hub.field("living_room_climate.pressure").latest is not None, "the climate sensor's state")
        assert hub.field("living_room_climate.temperature").latest.value == 21.47
        assert hub.field("living_room_climate.temperature").spec.unit == "°C"
        assert hub.field("hall_motion.occupancy").latest.value is True
        assert hub.field("hall_motion.motion_sensitivity").latest.value == "medium"
        assert hub.field("hall_ceiling.state").latest.value is True
        assert hub.field("hall_ceiling.level_config_execute_if_off").latest.value is False
        assert hub.field("hall_ceiling.level_config_current_level_startup").latest is None  # "previous": skipped
        assert hub.nodes["hall_ceiling"].health.state is Health.OK
    finally:
        await gw.stop()


async def test_enum_and_bounds_refused_before_any_publish(tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m) -> None:
    await z2m.devices(DEVICES)
    z2m.answer_sets(mosquitto.port)
    gw = await started(tmp_path, mosquitto, z2m, writable=True)  # the settings too, not only the light
    try:
        await until(lambda: "hall_motion" in gw.hub.nodes, "the motion sensor")
        with pytest.raises(BadValue, match="must be one of: low, medium, high"):
            await gw.hub.write("hall_motion.motion_sensitivity", "extreme", ADMIN)
        with pytest.raises(BadValue, match="254"):
            await gw.hub.write("hall_ceiling.brightness", "300", ADMIN)
        await asyncio.sleep(0.3)
        assert z2m.sets == []
        assert [e.outcome for e in gw.hub.audit.entries][-2:] == ["refused", "refused"]
        await gw.hub.write("hall_motion.motion_sensitivity", "high", ADMIN)
        assert z2m.sets[-1] == (f"{z2m.base}/hall/motion/set", {"motion_sensitivity": "high"})
        await gw.hub.write("hall_ceiling.level_config_current_level_startup", "30", ADMIN)
        assert z2m.sets[-1][1] == {"level_config": {"current_level_startup": 30}}
        # Write-only (access 2): the acknowledged command is the value; nothing to wait for.
        await gw.hub.write("hall_ceiling.effect", "blink", ADMIN)
        await until(lambda: z2m.sets[-1][1] == {"effect": "blink"}, "the effect's /set")
        assert gw.hub.audit.entries[-1].outcome == "sent"  # nothing reports it: not called applied
    finally:
        await gw.stop()


async def test_availability_json_legacy_and_bridge_state(tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m) -> None:
    await z2m.devices(DEVICES)
    await z2m.bridge('{"state":"online"}')
    gw = await started(tmp_path, mosquitto, z2m)
    hub = gw.hub
    try:
        await until(lambda: "kitchen_kettle_plug" in hub.nodes, "the plug")
        plug = hub.nodes["kitchen_kettle_plug"]
        avail = f"{z2m.base}/kitchen/kettle_plug/availability"
        await z2m.pub.send(avail, '{"state":"offline"}', retain=True)
        await until(lambda: plug.health.state is Health.OFFLINE, "the plug offline (JSON)")
        await z2m.pub.send(avail, "online", retain=True)  # Zigbee2MQTT 1.x
        await until(lambda: plug.health.state is Health.OK, "the plug online (legacy plain text)")
        await z2m.pub.send(avail, "offline", retain=True)
        await until(lambda: plug.health.state is Health.OFFLINE, "the plug offline (legacy)")
        await z2m.pub.send(avail, '{"state":"online"}', retain=True)
        await until(lambda: plug.health.state is Health.OK, "the plug online again")
        await z2m.bridge('{"state":"offline"}')
        await until(lambda: all(hub.nodes[n].health.state is Health.OFFLINE for n in SHOWN | {"zb"}), "every device offline with the bridge")
        assert plug.health.reason == "(Zigbee2MQTT bridge offline)"
        await z2m.bridge('{"state":"online"}')
        await until(lambda: all(hub.nodes[n].health.state is Health.OK for n in SHOWN | {"zb"}), "every device back")
    finally:
        await gw.stop()


async def test_hostile_lists_change_nothing(tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m, caplog: pytest.LogCaptureFixture) -> None:
    await z2m.devices(DEVICES)
    gw = await started(tmp_path, mosquitto, z2m)
    hub = gw.hub
    try:
        await until(lambda: SHOWN <= set(hub.nodes), "the four devices")
        caplog.set_level(logging.WARNING, "iot_gateway")
        many = [{"friendly_name": f"d{i}", "ieee_address": f"0x{i:016x}", "type": "EndDevice"} for i in range(10_000)]
        big = [dict(DEVICES[1], friendly_name=f"d{i}", ieee_address=f"0x{i:016x}") for i in range(10_000)]
        huge = copy.deepcopy(DEVICES)
        huge[1]["friendly_name"] = "x" * 100_000  # the climate sensor: kept as it was
        wrong = copy.deepcopy(DEVICES)
        wrong[2]["definition"]["exposes"] = [{"type": "numeric", "property": 5, "access": "all"}]  # the plug
        wrong[3]["definition"]["exposes"] = "lots"  # the light
        nested: Any = []
        for _ in range(50):
            nested = [{"type": "composite", "property": "p", "features": nested}]
        wrong[4]["definition"]["exposes"] = nested  # the motion sensor
        drv = gw.drivers["zb"]
        for bad in (b"\xff\xfe", "{not json", '{"devices": []}', json.dumps(many), json.dumps(big), json.dumps(huge), json.dumps(wrong), "[" * 100_000):
            seen = drv._seq
            await z2m.devices(bad)
            await z2m.devices(bad)  # the same again: logged once
            # Each list is dealt with before the next (a big one is parsed in a thread, and a newer
            # list that is applied first wins over it, silently: here every list must be looked at).
            await until(lambda: drv._seq >= seen + 2 and drv._applied == drv._seq, "the hostile list handled")
        await z2m.pub.send(f"{z2m.base}/hall/ceiling", "[" * 50_000)
        await z2m.pub.send(f"{z2m.base}/hall/ceiling", '{"brightness": "bright", "state": 7}')
        # A valid list still works after all that: here, the light is renamed.
        await z2m.devices(renamed(DEVICES, "hall/ceiling", "hall/lamp"))
        await until(lambda: "hall_lamp" in hub.nodes, "the valid list after the hostile ones")
        assert set(hub.nodes) == {"zb", "living_room_climate", "kitchen_kettle_plug", "hall_lamp", "hall_motion"}
        assert {f.name for f in hub.nodes["kitchen_kettle_plug"].fields.values()} >= {"power", "state", "energy"}
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == len(set(warnings)), "each problem is logged once"
        assert any("10000 devices, more than 500" in w for w in warnings)
        assert any("bytes, more than" in w for w in warnings)
        assert any("zb: " in w and "longer than 256" in w for w in warnings)
        assert any("nested more than" in w for w in warnings)
    finally:
        await gw.stop()


async def test_pairing_removal_rename_watches_and_history(tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m) -> None:
    await z2m.devices([d for d in DEVICES if d["friendly_name"] != "hall/motion"])
    gw = await started(tmp_path, mosquitto, z2m)
    hub = gw.hub
    alerts: list[str] = []
    gw.watches.sinks.append(lambda a: alerts.append(a.text))
    try:
        await until(lambda: "hall_ceiling" in hub.nodes, "the first devices")
        assert "hall_motion" not in hub.nodes
        await z2m.devices(DEVICES)  # paired while running
        await until(lambda: "hall_motion" in hub.nodes, "the paired motion sensor")
        await until(lambda: hub.field("zb.devices").latest.value == 4, "the count of 4")
        w = gw.watches.add(gw.watches.parse("alice@example.org", ["hall_motion.occupancy", "change"]))
        await z2m.devices([d for d in DEVICES if d["friendly_name"] != "hall/motion"])  # unpaired
        await until(lambda: hub.nodes["hall_motion"].health.state is Health.OFFLINE, "the motion sensor offline, not removed")
        assert hub.nodes["hall_motion"].health.reason == "(no longer listed by Zigbee2MQTT)"
        assert not gw.watches.missing(w.id) and hub.field("zb.devices").latest.value == 3
        await z2m.devices(DEVICES)  # back
        await until(lambda: hub.nodes["hall_motion"].health.state is Health.OK, "the motion sensor back")
        await z2m.report("hall/motion", {"occupancy": True})
        await z2m.report("hall/motion", {"occupancy": False})
        await until(lambda: any("changed: on → off" in a for a in alerts), "the watch working again")

        # A rename (same IEEE address) keeps the node's history, in memory and in history.db.
        for power in (10, 20, 30):
            await z2m.report("kitchen/kettle_plug", {"power": power})
        await until(lambda: len(hub.field("kitchen_kettle_plug.power").history) == 3, "three readings")
        await gw.history.flush()
        w2 = gw.watches.add(gw.watches.parse("alice@example.org", ["kitchen_kettle_plug.power", ">", "1000"]))
        await z2m.devices(renamed(DEVICES, "kitchen/kettle_plug", "kitchen/kettle"))
        await until(lambda: "kitchen_kettle" in hub.nodes, "the renamed plug")
        assert "kitchen_kettle_plug" not in hub.nodes
        assert [r.value for r in hub.field("kitchen_kettle.power").history] == [10, 20, 30]
        assert gw.watches.watches[w2.id].target == "kitchen_kettle.power"
        await z2m.report("kitchen/kettle", {"power": 40})
        await until(lambda: len(hub.field("kitchen_kettle.power").history) == 4, "a reading under the new name")
        await gw.history.flush()
        db = sqlite3.connect(tmp_path / "state" / "history.db")
        rows = db.execute("SELECT v FROM readings WHERE ref = 'kitchen_kettle.power' ORDER BY rowid").fetchall()
        stale = db.execute("SELECT count(*) FROM readings WHERE ref LIKE 'kitchen_kettle_plug.%'").fetchone()[0]
        db.close()
        assert [float(r[0]) for r in rows] == [10, 20, 30, 40] and stale == 0
    finally:
        await gw.stop()
    # After a restart the stored watch waits for its device, and the history comes back with it.
    gw = await started(tmp_path, mosquitto, z2m)
    try:
        assert gw.watches.watches[w2.id].target == "kitchen_kettle.power"
        await until(lambda: "kitchen_kettle" in gw.hub.nodes, "the plug after a restart")
        await until(lambda: len(gw.hub.field("kitchen_kettle.power").history) >= 4, "its history back")
        assert not gw.watches.missing(w2.id)
    finally:
        await gw.stop()


async def test_include_exclude_and_prefix(tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m) -> None:
    await z2m.devices(DEVICES)
    gw = await started(tmp_path, mosquitto, z2m, include=["hall/*"], exclude=["*/motion"], prefix="zb-")
    try:
        await until(lambda: "zb-hall_ceiling" in gw.hub.nodes, "the light")
        await asyncio.sleep(0.2)
        assert set(gw.hub.nodes) == {"zb", "zb-hall_ceiling"}
    finally:
        await gw.stop()


# ---------------------------------------------------------------- through XMPP


async def test_chat_readout_and_set_round_trip(xmpp_server: XmppServer, tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m, peers: dict) -> None:
    await z2m.devices(DEVICES)
    await z2m.bridge('{"state":"online"}')
    z2m.answer_sets(mosquitto.port)
    cfg = gateway_config(
        xmpp_server,
        tmp_path,
        # The light's settings and effects too, not only what the light is for (state, brightness …).
        devices=[{"id": "zb", "driver": "zigbee2mqtt", "base_topic": z2m.base, "writable": ["hall/ceiling.*"]}],
        mqtt={"url": mosquitto.url, "client_id": "gw-" + uuid.uuid4().hex[:8]},
    )
    running = await start_gateway(cfg, xmpp_server.passwords["gateway"])
    alice = peers["alice"]
    try:
        await until(lambda: SHOWN <= set(running.gateway.hub.nodes), "the devices")
        await z2m.report("hall/ceiling", STATES["devices"]["hall/ceiling"]["messages"][0])
        await until(lambda: running.gateway.hub.field("hall_ceiling.brightness").latest is not None, "the light's state")
        listing = await alice.ask_for(running.jid, "list", lambda b: "devices:" in b.split("\n")[0])
        assert "hall_ceiling (zigbee2mqtt, hall/ceiling)" in listing
        assert "brightness" in listing and "writable 0..254" in listing
        # An enum says which values a set takes, wrapped to a phone's width.
        assert "one of: blink · breathe · okay" in " ".join(listing.split()), listing
        assert max(len(line) for line in listing.split("\n")) <= 40, listing
        read = await alice.ask_for(running.jid, "read hall_ceiling.brightness", "hall_ceiling.brightness")
        assert "215" in read
        answer = await alice.ask_for(running.jid, "set hall_ceiling.brightness 128", "hall_ceiling.brightness")
        assert answer.startswith("hall_ceiling.brightness: 215 → 128"), answer
        assert (f"{z2m.base}/hall/ceiling/set", {"brightness": 128}) in z2m.sets
        inbox = Inbox(alice)
        answer_iq = await iq(alice, running.session.client.boundjid.full, f"<req xmlns='{SD}' seqnr='7' momentary='true'><node nodeId='hall_ceiling'/></req>")
        child(answer_iq, SD, "accepted")
        got = by_name(values(await inbox.readout(7)), "hall_ceiling")
        assert float(got["brightness"].value) == 128 and got["brightness"].attrs["writable"] == "true"
        assert got["state"].type == "boolean" and got["state"].value == "true"

        # A client discovering the gateway sees the discovered devices as nodes (XEP-0323/0325),
        # and a device no longer listed by Zigbee2MQTT stays there, offline.
        gw_full = running.session.client.boundjid.full
        items = await alice.client.plugin["xep_0030"].get_items(jid=gw_full, timeout=10)
        assert SHOWN <= {node for _, node, _ in items["disco_items"]["items"]}
        info = await alice.client.plugin["xep_0030"].get_info(jid=gw_full, node="hall_ceiling", timeout=10)
        assert {SD, "urn:xmpp:iot:control"} <= set(info["disco_info"]["features"])
        await z2m.devices([d for d in DEVICES if d.get("friendly_name") != "hall/ceiling"])
        await until(lambda: running.gateway.hub.nodes["hall_ceiling"].health.state is Health.OFFLINE, "the light offline")
        items = await alice.client.plugin["xep_0030"].get_items(jid=gw_full, timeout=10)
        nodes = {node for _, node, _ in items["disco_items"]["items"]}
        assert "hall_ceiling" in nodes and "hall_motion" in nodes
        status = await alice.ask(running.jid, "status")
        assert "no longer listed by Zigbee2MQTT" in status, status
    finally:
        await running.stop()


async def test_a_timed_set_falling_due_before_its_device_reappears_waits_for_it(
    tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m
) -> None:
    """`set … for` on a discovered device, then a restart: the device is found only after the
    broker connects, so at start the revert's device is not there yet. It must wait for it,
    not be dropped (the light would stay on for good)."""
    await z2m.devices(DEVICES)
    await z2m.bridge('{"state":"online"}')
    z2m.answer_sets(mosquitto.port)
    alice = Actor("alice@example.org", "admin", "chat")
    gw = await started(tmp_path, mosquitto, z2m)
    try:
        await until(lambda: "hall_ceiling" in gw.hub.nodes, "the light")
        await z2m.report("hall/ceiling", {"state": "OFF"})
        await until(lambda: gw.hub.field("hall_ceiling.state").latest is not None, "the light's state")
        reply = await gw.commands.run("set hall_ceiling.state on for 1s", alice)
        assert "off → on" in reply, reply
    finally:
        await gw.stop()  # before it falls due: the revert stays on disk
    await asyncio.sleep(1.2)  # due while the gateway is down
    gw = await started(tmp_path, mosquitto, z2m)
    told: list[str] = []
    gw.reverts.sinks.append(lambda a: told.append(a.text))
    try:
        assert "hall_ceiling.state" in gw.reverts.pending  # kept although the device is not there yet
        await until(lambda: (f"{z2m.base}/hall/ceiling/set", {"state": "OFF"}) in z2m.sets, "the light switched back off")
        await until(lambda: "hall_ceiling.state" not in gw.reverts.pending, "the revert done")
        assert gw.hub.field("hall_ceiling.state").latest.value is False
    finally:
        await gw.stop()


# ---------------------------------------------------------------- what discovery may not do (issue 23)


def entry(devices: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(d for d in devices if d.get("friendly_name") == name)


def test_a_property_without_a_name_is_skipped_not_the_device() -> None:
    problems: list[str] = []
    got = spots([{"type": "numeric", "property": "!!!", "access": 1}, {"type": "numeric", "property": "t", "access": 1}], "zb: 'x'", problems)
    assert list(got) == ["t"] and "'!!!' skipped: it makes no field name" in problems[0]


async def test_an_empty_list_marks_devices_offline_and_keeps_everything(tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m) -> None:
    """A forged `[]` on bridge/devices: every device stays listed, offline with the reason; watches
    and history are kept; the real list back makes them ok again."""
    await z2m.devices(DEVICES)
    await z2m.bridge('{"state":"online"}')
    gw = await started(tmp_path, mosquitto, z2m)
    hub = gw.hub
    alice = Actor("alice@example.org", "admin", "chat")
    try:
        await until(lambda: SHOWN <= set(hub.nodes), "the four devices")
        for power in (10, 20):
            await z2m.report("kitchen/kettle_plug", {"power": power})
        await until(lambda: len(hub.field("kitchen_kettle_plug.power").history) == 2, "two readings")
        w = gw.watches.add(gw.watches.parse(alice.jid, ["kitchen_kettle_plug.power", "change"]))
        w2 = gw.watches.add(gw.watches.parse(alice.jid, ["hall_motion", "offline"]))
        await gw.history.flush()
        await z2m.devices("[]")
        await until(lambda: all(hub.nodes[n].health.state is Health.OFFLINE for n in SHOWN), "every device offline")
        assert SHOWN <= set(hub.nodes)
        assert {hub.nodes[n].health.reason for n in SHOWN} == {"(no longer listed by Zigbee2MQTT)"}
        assert {w.id, w2.id} <= set(gw.watches.watches) and not gw.watches.missing(w.id) and not gw.watches.missing(w2.id)
        assert [r.value for r in hub.field("kitchen_kettle_plug.power").history] == [10, 20]
        status = await gw.commands.run("status", alice)
        assert "no longer listed by Zigbee2MQTT" in status, status
        with pytest.raises(Exception, match="no longer listed"):
            await hub.write("kitchen_kettle_plug.state", "on", ADMIN)
        await gw.history.flush()
        db = sqlite3.connect(tmp_path / "state" / "history.db")
        kept = db.execute("SELECT count(*) FROM readings WHERE ref = 'kitchen_kettle_plug.power'").fetchone()[0]
        db.close()
        assert kept == 2
        await z2m.devices(DEVICES)  # the real list back
        await until(lambda: all(hub.nodes[n].health.state is Health.OK for n in SHOWN), "every device ok again")
        await z2m.report("kitchen/kettle_plug", {"power": 30})
        await until(lambda: len(hub.field("kitchen_kettle_plug.power").history) == 3, "readings again")
    finally:
        await gw.stop()


async def test_a_forged_list_never_makes_a_field_writable_nor_leaves_the_device_topic(
    tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m, caplog: pytest.LogCaptureFixture
) -> None:
    """By default only what a light or switch is for is writable; a later list never makes a
    read-only field writable; a name that would put /set outside the device's topic is refused."""
    await z2m.devices(DEVICES)
    z2m.answer_sets(mosquitto.port)
    gw = await started(tmp_path, mosquitto, z2m)
    hub = gw.hub
    try:
        await until(lambda: SHOWN <= set(hub.nodes), "the four devices")
        assert hub.field("hall_ceiling.state").spec.writable and hub.field("kitchen_kettle_plug.state").spec.writable
        assert not hub.field("hall_motion.motion_sensitivity").spec.writable  # a setting, not what it is for
        assert "effect" not in hub.nodes["hall_ceiling"].fields  # write-only and not to be written: nothing left
        caplog.set_level(logging.WARNING, "iot_gateway")
        forged = copy.deepcopy(DEVICES)
        climate = entry(forged, "living_room/climate")
        climate["definition"]["exposes"] = [{"type": "light", "features": [dict(x, access=7) for x in climate["definition"]["exposes"]]}]
        entry(forged, "hall/motion")["friendly_name"] = "bridge/request/device/remove"
        evil = dict(entry(forged, "kitchen/kettle_plug"), friendly_name="x/+/#", ieee_address="0x00000000000000e1")
        twin = dict(entry(forged, "hall/ceiling"), ieee_address="0x00000000000000e2")  # a second hall/ceiling
        await z2m.devices(forged + [evil, twin])
        await until(lambda: any("both named 'hall/ceiling'" in r.getMessage() for r in caplog.records), "the twin refused")
        await until(lambda: any("it stays read-only" in r.getMessage() for r in caplog.records), "the widening refused")
        assert not hub.field("living_room_climate.temperature").spec.writable
        with pytest.raises(Exception, match="read-only"):
            await hub.write("living_room_climate.temperature", "5", ADMIN)
        assert any("its name cannot be a topic of its own" in r.getMessage() for r in caplog.records)
        assert hub.nodes["hall_motion"].health.state is not Health.OFFLINE  # refused entries stay as they were
        assert hub.nodes["hall_ceiling"].health.state is not Health.OFFLINE  # the pair skipped, not dropped
        await hub.write("hall_ceiling.brightness", "100", ADMIN)
        await hub.write("kitchen_kettle_plug.state", "on", ADMIN)
        topics = {t for t, _ in z2m.sets}
        assert topics == {f"{z2m.base}/hall/ceiling/set", f"{z2m.base}/kitchen/kettle_plug/set"}, topics
    finally:
        await gw.stop()


async def test_a_new_device_with_an_old_name_inherits_neither_watches_nor_history(
    tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m
) -> None:
    """Another IEEE address under hall/motion's friendly name: it gets an id of its own, now and
    after a restart; hall_motion's watches and history stay hall_motion's; admins are told."""
    await z2m.devices(DEVICES)
    gw = await started(tmp_path, mosquitto, z2m)
    hub = gw.hub
    alice = Actor("alice@example.org", "admin", "chat")
    told: list[str] = []
    hub.subscribe(problem=lambda component, new, old: told.append(new.describe() if new else f"{component} cleared"))
    newcomer = [d for d in DEVICES if d.get("friendly_name") != "hall/motion"]
    newcomer.append(dict(entry(DEVICES, "hall/motion"), ieee_address="0x00000000000000b2"))
    try:
        await until(lambda: "hall_motion" in hub.nodes, "the motion sensor")
        await z2m.report("hall/motion", {"temperature": 21.5})
        await until(lambda: hub.field("hall_motion.temperature").latest is not None, "a reading")
        w = gw.watches.add(gw.watches.parse(alice.jid, ["hall_motion.temperature", ">", "30"]))
        await gw.history.flush()
        await z2m.devices(newcomer)
        await until(lambda: "hall_motion-2" in hub.nodes, "the newcomer under an id of its own")
        assert hub.nodes["hall_motion"].health.state is Health.OFFLINE
        assert gw.watches.watches[w.id].target == "hall_motion.temperature"
        assert len(hub.field("hall_motion-2.temperature").history) == 0
        await z2m.report("hall/motion", {"temperature": 35})
        await until(lambda: hub.field("hall_motion-2.temperature").latest is not None, "the newcomer's reading")
        assert not gw.watches.watches[w.id].firing  # the newcomer's 35 is not hall_motion's
        await until(lambda: any("0x00000000000000b2" in t and "hall_motion-2" in t for t in told), "admins told")
        assert len([t for t in told if "0x00000000000000b2" in t]) == 1, told
        await gw.history.flush()
    finally:
        await gw.stop()
    # After a restart only the newcomer is listed: the id hall_motion is still the old device's.
    await z2m.devices(newcomer)
    gw = await started(tmp_path, mosquitto, z2m)
    try:
        await until(lambda: "hall_motion-2" in gw.hub.nodes, "the newcomer after a restart")
        assert "hall_motion" not in gw.hub.nodes and gw.watches.missing(w.id)
        await until(lambda: len(gw.hub.field("hall_motion-2.temperature").history) == 1, "its own history back")
        assert gw.hub.field("hall_motion-2.temperature").history[0].value == 35
        assert "0x00000000000000b2" in gw.hub.problems["zb"].message
        status = await gw.commands.run("status", alice)
        assert "has the name of 0x0017880106f2c3d4" in status, status
    finally:
        await gw.stop()


async def test_messages_of_unknown_devices_take_bounded_memory(tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m, caplog: pytest.LogCaptureFixture) -> None:
    """Messages on topics of devices nobody listed are kept (the list may come later), within
    1,000 topics and 1 MB; the rest are dropped and counted, said once in the log."""
    gw = await started(tmp_path, mosquitto, z2m)
    hub = gw.hub
    drv = gw.drivers["zb"]
    caplog.set_level(logging.WARNING, "iot_gateway")
    try:
        await until(lambda: hub.field("zb.dropped").latest is not None, "the count at 0")
        await z2m.pub.send(f"{z2m.base}/hall/motion", '{"temperature": 19}', retain=True)  # before the list: kept
        body = json.dumps({"v": "x" * 8000})
        for i in range(150):
            await z2m.pub.send(f"{z2m.base}/stranger_{i}", body)
        await until(lambda: hub.field("zb.dropped").latest.value >= 1, "messages dropped and counted")
        assert drv._early_bytes <= 1024 * 1024 and len(drv._early) < 150
        assert len([r for r in caplog.records if "the others dropped" in r.getMessage()]) == 1
        await z2m.devices(DEVICES)
        await until(lambda: "hall_motion" in hub.nodes, "the list")
        await until(lambda: hub.field("hall_motion.temperature").latest is not None, "the early message kept")
    finally:
        await gw.stop()


async def test_the_driver_contract(tmp_path: Path, mosquitto: Mosquitto, z2m: Z2m) -> None:
    """tests/contract.py on a real Mosquitto, for a discovered light: a set is applied once the
    bridge reports the new state, a write-only one only sent; the device's availability offline
    makes it unhealthy, online mends it."""
    await z2m.devices(DEVICES)
    await z2m.bridge('{"state":"online"}')
    z2m.answer_sets(mosquitto.port)
    gw = await started(tmp_path, mosquitto, z2m, writable=True)  # the effects too (write-only)
    avail = f"{z2m.base}/hall/ceiling/availability"
    try:
        await until(lambda: "hall_ceiling" in gw.hub.nodes, "the light")
        await driver_contract(Contract(
            gw.hub, "hall_ceiling", gw.stop, writes=[("state", True, True), ("effect", "blink", False)],
            fail=lambda: z2m.pub.send(avail, '{"state":"offline"}', retain=True),
            mend=lambda: z2m.pub.send(avail, '{"state":"online"}', retain=True),
        ))
    except BaseException:
        await gw.stop()
        raise

