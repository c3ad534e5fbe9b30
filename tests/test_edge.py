"""What leaves through the XMPP door (gateway/xmpp/edge.py), through the suite's real Prosody:
characters XML cannot carry arriving by every door, replies larger than the server's
stanza limit, and who is told the gateway's software version."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from slixmpp.features.feature_limits.limits import Limits
from slixmpp.xmlstream.tostring import tostring

from gateway.xmpp.edge import split, text_cost, tidy
from gateway.hub import FieldSpec
from gateway.values import NOT_XML
from gateway.demo.localservers import Mosquitto
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.helpers import until
from tests.peer import Peer
from tests.test_adhoc import execute
from tests.test_mqtt import Publisher
from tests.test_omemo import Omemo, alice, befriend, server  # noqa: F401 (fixtures)
from tests.test_omemo import start as omemo_start
from tests.test_serial import Wire
from tests.test_tasmota import PLUG_CFG
from tests.xep_helpers import Inbox, by_name, iq, values

BAD = "a\x01b\ud800c\x00d\ufffe"  # a control character, a lone surrogate, NUL, a non-character
XDATA = "jabber:x:data"
SHOWN = "a\ufffdb\ufffdc\ufffdd\ufffd"
Z2M_ENTRY = {
    "ieee_address": "0x00124b00edge0001",
    "friendly_name": "label",
    "type": "EndDevice",
    "supported": True,
    "disabled": False,
    "interview_state": "SUCCESSFUL",
    "definition": {"model": "T1", "vendor": "Test", "description": "a text sensor",
                   "exposes": [{"type": "text", "name": "note", "property": "note", "access": 1}]},
}


class Heard:
    """Messages from the gateway to one peer, looked up by their text in any order."""

    def __init__(self, peer: Peer, gw: str):
        self.peer, self.gw = peer, gw
        self.bodies: list[str] = []

    async def find(self, expect: str) -> str:
        """The first message (taken from those not yet found) that contains `expect`."""
        for _ in range(100):
            for body in self.bodies:
                if expect in body:
                    self.bodies.remove(body)
                    return body
            self.bodies.append(await self.peer.reply_from(self.gw))
        raise AssertionError(f"no message containing {expect!r}")

    async def ask(self, text: str, expect: str) -> str:
        """Send `text`; the answer containing `expect`."""
        self.peer.client.send_message(mto=self.gw, mbody=text, mtype="chat")
        return await self.find(expect)


async def test_control_characters_from_every_door_keep_the_session(
    xmpp_server: XmppServer, mosquitto: Mosquitto, tmp_path: Path, peers: dict[str, Peer]
) -> None:
    tag = uuid.uuid4().hex[:8]
    wire = Wire(tmp_path)
    await wire.plug()
    pub = Publisher(mosquitto.port)
    devices: list[dict[str, Any]] = [
        # The config door: a device name and a field description.
        {"id": "plain", "name": "Plain\x01 box", "driver": "mqtt", "fields": [
            {"name": "note", "type": "string", "topic": f"edge-{tag}/note", "json_path": "v", "description": "d\x02"},
        ]},
        {"id": "zb", "driver": "zigbee2mqtt", "base_topic": f"z2m-{tag}"},
        {"id": "line", "driver": "serial", "port": str(wire.a), "fields": [{"name": "mode", "type": "string"}]},
        {"id": "tas", "driver": "tasmota", "discovery_prefix": f"tas-{tag}/discovery"},
    ]
    config = gateway_config(xmpp_server, tmp_path, devices=devices, mqtt={"url": mosquitto.url, "client_id": "gw-" + tag})
    gw = await start_gateway(config, xmpp_server.passwords["gateway"])
    drops: list[object] = []
    gw.session.client.add_event_handler("disconnected", drops.append)
    alice = peers["alice"]
    heard = Heard(alice, gw.jid)
    try:
        alice.client.send_presence_subscription(pto=gw.jid)
        await pub.send(f"edge-{tag}/note", json.dumps({"v": "first"}))
        await until(lambda: gw.gateway.hub.field("plain.note").latest is not None, "the first value")
        assert "set" in await heard.ask("watch plain.note change", "Watch #")
        # The doors: a JSON string from MQTT (a lone surrogate arrives as a JSON escape), a
        # Zigbee2MQTT text field, a serial line, and a gateway problem that presence shows.
        await pub.send(f"edge-{tag}/note", json.dumps({"v": BAD}))
        await pub.send(f"z2m-{tag}/bridge/devices", json.dumps([Z2M_ENTRY]), retain=True)
        await until(lambda: "label" in gw.gateway.hub.nodes, "the Zigbee2MQTT device")
        await pub.send(f"z2m-{tag}/label", json.dumps({"note": BAD}))
        await wire.send(b"mode=s\x01x\x7fy\n")
        # Tasmota: a device name and a sensor key with such characters, a string where a number goes.
        plug = dict(PLUG_CFG, t=f"plug_{tag}", dn="Plug" + BAD)
        sensors = {"sn": {"ENERGY": {"Power": 5, "Note" + BAD: 1}, "Label": BAD}}
        await pub.send(f"tas-{tag}/discovery/{plug['mac']}/config", json.dumps(plug), retain=True)
        await pub.send(f"tas-{tag}/discovery/{plug['mac']}/sensors", json.dumps(sensors), retain=True)
        await until(lambda: f"plug_{tag}" in gw.gateway.hub.nodes, "the Tasmota device")
        await pub.send(f"tele/plug_{tag}/SENSOR", json.dumps({"ENERGY": {"Power": BAD}, "Label": BAD}))
        hub = gw.gateway.hub
        await until(lambda: all(hub.field(r).latest is not None for r in ("label.note", "line.mode")), "the values")
        hub.set_problem("edge", "trouble\x03 here")

        assert SHOWN in await heard.find("plain.note")  # the watch's alert
        reply = await heard.ask("read", "values")
        assert reply.count(SHOWN) == 2 and "s\ufffdx\x7fy" in reply and f"plug_{tag}" in reply
        assert SHOWN in await heard.ask("history plain.note", "readings")
        assert "trouble\ufffd here" in await heard.find("trouble")
        pres = await alice.presence_from(gw.jid, lambda p: "trouble" in (p["status"] or ""))
        assert "trouble\ufffd here" in pres["status"]

        inbox = Inbox(alice)
        answer = await iq(alice, gw.session.client.boundjid.full, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='5' all='true'/>")
        assert answer['type'] == 'result', answer
        got = values(await inbox.readout(5))
        assert by_name(got, "plain")["note"].value == SHOWN and by_name(got, "label")["note"].value == SHOWN
        assert by_name(got, "plain")["Name"].value == "Plain\ufffd box"
        # The ad-hoc read form carries the description from the config.
        form = (await execute(alice, gw, "read")).xml.find(f".//{{{XDATA}}}x")
        assert "d\ufffd" in [d.text for d in form.iter(f"{{{XDATA}}}desc")]
        # The same stream all along: the server never closed it.
        assert drops == [] and gw.session.online.is_set()
        assert "values" in await heard.ask("read", "values")
    finally:
        await gw.stop()
        pub.stop()
        await wire.unplug()


def test_split_cuts_between_lines_and_summarises() -> None:
    rows = [f"row {i:<5} & <more>" for i in range(3000)]
    text = "3000 values:\n" + "\n".join(rows)
    parts = split(text, 4000, max_parts=4)
    assert len(parts) == 4 and all(text_cost(p) <= 4000 for p in parts)
    # Whole rows in order, none cut, none repeated; the last part says what was left out.
    shown = [line for p in parts for line in p.split("\n")]
    assert shown[0] == "3000 values:" and shown[1:-1] == rows[: len(shown) - 2], shown[-2:]
    assert shown[-1] == f"… {3001 - len(shown) + 1} more lines not shown: too long for chat. Ask for less (e.g. one device or field)."
    # A blank line where a part is cut starts no part: each part is tidy.
    parts = split("title\n" + "\n\n".join(rows[:400]), 4000)
    assert len(parts) > 1 and all(p == tidy(p) and p.strip() for p in parts)
    assert split("short", 4000) == ["short"]


@pytest.mark.parametrize("limit", [None, 40_000])
async def test_replies_fit_the_servers_stanza_limit(
    xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer], limit: int | None
) -> None:
    gw = await start_gateway(gateway_config(xmpp_server, tmp_path), xmpp_server.passwords["gateway"])
    client = gw.session.client
    assert client.limits.max_bytes is None, "Prosody 0.12 offers no XEP-0478: the default applies"
    if limit is not None:
        client.limits = Limits(limit, None)  # as a server offering XEP-0478 would say
    most = limit or 64 * 1024  # XEP-0478's absence: the gateway assumes 64 KiB
    drops: list[object] = []
    client.add_event_handler("disconnected", drops.append)
    sizes: list[int] = []

    async def measure(stanza: Any) -> Any:
        """The bytes of each stanza as it leaves (an async filter sees read-outs already made text)."""
        text = stanza if isinstance(stanza, str) else tostring(stanza.xml, xmlns=client.default_ns, stream=client, top_level=True)
        sizes.append(len(text.encode()))
        return stanza

    client.add_filter("out_sce", measure)
    hub = gw.gateway.hub
    specs = [FieldSpec(f"f{i:05d}", type="integer", writable=True, min=0, max=9) for i in range(50_000)]
    hub.add_node("big", "Big", "none", specs)
    for spec in specs[:2000]:
        hub.push("big", spec.name, 7)
    alice = peers["alice"]
    heard = Heard(alice, gw.jid)
    try:
        assert "f00000" in await heard.ask("read big", "big:")
        rest = await heard.find("more lines not shown")
        assert "Ask for less" in rest
        inbox = Inbox(alice)
        await iq(alice, client.boundjid.full, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='9'><node nodeId='big'/></req>", timeout=60)
        got = values(await inbox.readout(9, timeout=60))
        assert len(got) == 50_000 and got[0].name == "f00000" and got[0].value == "7"
        # Fields whose values grow fivefold once escaped: 100 of them (one message's worth) would be 500 kB.
        wide = [FieldSpec(f"w{i:03d}", type="string") for i in range(120)]
        hub.add_node("wide", "Wide", "none", wide)
        for spec in wide:
            hub.push("wide", spec.name, "&" * 1000)
        await iq(alice, client.boundjid.full, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='10'><node nodeId='wide'/></req>")
        got = values(await inbox.readout(10))
        assert len(got) == 120 and {v.value for v in got} == {"&" * 1000}
        answer = await iq(alice, client.boundjid.full, "<getForm xmlns='urn:xmpp:iot:control'><node nodeId='big'/></getForm>", timeout=60)
        assert answer["type"] == "result"
        form = answer.xml.find(".//{jabber:x:data}x")
        shown = len(form.findall("{jabber:x:data}field"))
        assert 0 < shown < 50_000
        assert f"{50_000 - shown} of 50000 fields not shown" in form.find("{jabber:x:data}instructions").text
        form = (await execute(alice, gw, "set", timeout=60)).xml.find(f".//{{{XDATA}}}x")
        assert any("fields not shown" in (i.text or "") for i in form.iter(f"{{{XDATA}}}instructions"))
        assert drops == [] and gw.session.online.is_set()
        assert len(sizes) > 500 and max(sizes) <= most
        assert "sim:" in await heard.ask("read sim", "sim:")
    finally:
        await gw.stop()


async def test_software_version_for_contacts_only(running_gateway: Any, peers: dict[str, Peer]) -> None:
    gw = running_gateway.jid + "/" + running_gateway.session.xcfg.resource
    version = "<query xmlns='jabber:iq:version'/>"
    answer = await iq(peers["mallory"], gw, version)
    assert answer["type"] == "error" and answer["error"]["condition"] == "service-unavailable"
    answer = await iq(peers["victor"], gw, version)
    assert answer["type"] == "result"
    assert answer.xml.find("{jabber:iq:version}query/{jabber:iq:version}name").text == "iot-gateway"


async def test_home_assistant_gets_names_and_values_cleaned(mosquitto: Mosquitto, tmp_path: Path) -> None:
    from tests.test_homeassistant import configs, ha_config, started, wait_retained

    tag = uuid.uuid4().hex[:8]
    ids = {"prefix": f"ha-{tag}", "node": f"gw-{tag}", "client": f"iot-gateway-test-{tag}"}
    box = {"id": "box", "name": "Box\x01", "driver": "simulated", "interval": 60,
           "fields": [{"name": "mode", "type": "string", "initial": "m\x01"}]}
    async with started(ha_config(mosquitto, tmp_path, ids, [box])) as gw:
        gw.hub.push("box", "mode", BAD)
        snap = await wait_retained(
            mosquitto.port, lambda s: SHOWN in s.values() and configs(s, ids["prefix"]), "the cleaned state",
            f"{ids['prefix']}/#", f"iot-gateway/{ids['node']}/#",
        )
        names = {c["device"]["name"] for c in configs(snap, ids["prefix"]).values()}
        assert "Box\ufffd" in names and not any(NOT_XML.search(p) for p in snap.values())


async def test_an_encrypted_long_reply_is_cleaned_and_split_before_encryption(
    server: XmppServer, tmp_path: Path, alice: Omemo
) -> None:
    gw = await omemo_start(server, tmp_path)
    drops: list[object] = []
    gw.session.client.add_event_handler("disconnected", drops.append)
    try:
        await befriend(gw, alice)
        specs = [FieldSpec(f"f{i:05d}", type="string") for i in range(20_000)]
        gw.gateway.hub.add_node("big", "Big", "none", specs)
        gw.gateway.hub.push("big", "f00000", BAD)
        await alice.send(gw.jid, "read big")
        first = await alice.next()
        assert first[0] == "encrypted" and first[1].startswith("big:") and SHOWN in first[1]
        for _ in range(6):
            assert (await alice.next())[0] == "encrypted"
        kind, last = await alice.next()
        assert kind == "encrypted" and "more lines not shown" in last
        assert (await alice.ask(gw.jid, "read sim.relay"))[1].startswith("sim.relay = ")
        assert drops == [] and gw.session.online.is_set()
    finally:
        await gw.stop()
