"""XEP-0323 read-outs on a real Prosody: raw stanzas from the XEP's examples, slixmpp's own
client plugin, filters, types, flags, failures, queueing, cancel, roles and bad requests."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from slixmpp.xmlstream import ET

from gateway.hub import Health
from tests.conftest import XmppServer
from tests.peer import Peer
from tests.xep_helpers import (
    SD,
    Inbox,
    Value,
    XepGateway,
    by_name,
    child,
    error_of,
    iq,
    running,
    values,
)

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
async def xgw(xmpp_server: XmppServer, tmp_path: Path) -> AsyncIterator[XepGateway]:
    async with running(xmpp_server, tmp_path) as gw:
        yield gw


def stamp(t: float) -> str:
    """The xs:dateTime the gateway uses for Unix time `t` (UTC, milliseconds)."""
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def when(seconds_from_now: float) -> str:
    return stamp(time.time() + seconds_from_now)


async def test_momentary_readout_as_in_the_xep(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice = peers["alice"]
    inbox = Inbox(alice)
    # "Read-out request of momentary values from a device", to a node of this gateway.
    answer = await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='1' momentary='true'><node nodeId='sim'/></req>")
    accepted = child(answer, SD, "accepted")
    assert accepted.attrib == {"seqnr": "1"}
    msgs = await inbox.readout(1)
    assert [m.tag for m in msgs] == [f"{{{SD}}}fields"] and msgs[0].get("done") == "true"
    got = by_name(values(msgs))
    assert set(got) == set(xgw.hub.nodes["sim"].fields)  # momentary only: no status, no identity
    temp = got["temp"]
    assert (temp.node, temp.type, temp.value, temp.attrs["unit"]) == ("sim", "numeric", "21.50", "°C")
    assert temp.flags() == {"momentary", "automaticReadout"} and temp.attrs["writable"] == "false"
    assert temp.timestamp == stamp(xgw.hub.field("sim.temp").latest.time)
    assert (got["rpm"].type, got["rpm"].value, got["rpm"].attrs["unit"]) == ("numeric", "1500", "rpm")
    assert (got["count"].type, got["count"].value) == ("long", "7")
    assert (got["speed"].type, got["speed"].value, got["speed"].attrs["writable"]) == ("int", "0", "true")
    assert (got["door"].type, got["door"].value) == ("boolean", "false")
    assert (got["mode"].type, got["mode"].value) == ("string", "low")
    assert (got["setpoint"].value, got["label"].value) == ("20.0", "hello")
    assert "unit" not in got["count"].attrs


async def test_node_and_field_filters(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice = peers["alice"]
    inbox = Inbox(alice)
    # "Read-out of specific fields", with this gateway's names.
    await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='6' momentary='true'>"
             "<node nodeId='sim'/><field name='temp'/><field name='speed'/></req>")
    got = values(await inbox.readout(6))
    assert [(v.node, v.name) for v in got] == [("sim", "temp"), ("sim", "speed")]

    # "Read-out of multiple devices": two nodes, every field of each.
    await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='5' momentary='true'>"
             "<node nodeId='pump'/><node nodeId='probe'/></req>")
    got = values(await inbox.readout(5))
    assert [(v.node, v.name) for v in got] == [("pump", "relay"), ("pump", "flow"), ("probe", "level"), ("probe", "alarm")]

    # No <node/>: every node. A field name only one node has: only that node answers.
    await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='7' momentary='true'><field name='flow'/></req>")
    got = values(await inbox.readout(7))
    assert [(v.node, v.name, v.value) for v in got] == [("pump", "flow", "12.0")]


async def test_status_and_identity_readouts(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice = peers["alice"]
    inbox = Inbox(alice)
    await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='2' status='true' identity='true'/>")
    got = values(await inbox.readout(2))
    sim = by_name(got, "sim")
    assert set(sim) == {"Health", "Health since", "Last seen", "Data age", "Device ID", "Name", "Driver"}
    health = sim["Health"]
    assert (health.type, health.value, health.attrs["dataType"]) == ("enum", "ok", "iot-gateway:health")
    assert health.flags() == {"status", "automaticReadout"}
    assert sim["Health since"].type == "dateTime" and STAMP.fullmatch(sim["Health since"].value)
    assert sim["Last seen"].value == stamp(xgw.hub.nodes["sim"].last_seen)
    assert sim["Data age"].type == "duration" and re.fullmatch(r"PT\d+(\.\d+)?S", sim["Data age"].value)
    assert [(sim[n].type, sim[n].value) for n in ("Device ID", "Name", "Driver")] == [
        ("string", "sim"), ("string", "Test rig"), ("string", "simulated")
    ]
    assert sim["Device ID"].flags() == {"identity", "automaticReadout"}
    probe = by_name(got, "probe")
    assert (probe["Health"].value, probe["Health reason"].value) == ("starting", "not started yet")
    assert "Last seen" not in probe  # never read
    # The older drafts' `identification` is the same field type.
    await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='3' identification='true'><node nodeId='pump'/></req>")
    assert [v.name for v in values(await inbox.readout(3))] == ["Device ID", "Name", "Driver"]


async def test_quality_flags_follow_device_health(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice, hub = peers["alice"], xgw.hub
    inbox = Inbox(alice)
    req = "<req xmlns='urn:xmpp:iot:sensordata' seqnr='{n}' momentary='true'><node nodeId='{node}'/></req>"
    await iq(alice, xgw.jid, req.format(n=1, node="probe"))
    probe = by_name(values(await inbox.readout(1)))
    assert probe["level"].flags() == {"momentary", "missing"} and probe["level"].value == "NaN"
    assert probe["alarm"].flags() == {"momentary", "missing"}

    hub.set_health("sim", Health.STALE, "no data for 60 s")
    await iq(alice, xgw.jid, req.format(n=2, node="sim"))
    sim = by_name(values(await inbox.readout(2)))
    assert {n: v.flags() for n, v in sim.items()} == {n: {"momentary", "automaticReadout", "warning"} for n in sim}
    assert sim["temp"].value == "21.50"  # the last value, still with its own time

    hub.set_health("sim", Health.OFFLINE, "unplugged")
    await iq(alice, xgw.jid, req.format(n=3, node="sim"))
    msgs = await inbox.readout(3)
    assert all(m.tag == f"{{{SD}}}fields" for m in msgs)  # values known: no failure
    assert all(v.flags() == {"momentary", "automaticReadout", "error"} for v in values(msgs))


async def test_failure_for_a_node_that_cannot_be_read(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice, hub = peers["alice"], xgw.hub
    inbox = Inbox(alice)
    hub.set_health("probe", Health.OFFLINE, "unplugged")
    await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='2' momentary='true'>"
             "<node nodeId='sim'/><node nodeId='probe'/></req>")
    msgs = await inbox.readout(2)
    assert [m.tag.split("}")[1] for m in msgs] == ["fields", "failure"]
    assert msgs[0].get("done") is None and msgs[1].get("done") == "true"
    assert {v.node for v in values(msgs)} == {"sim"}
    errors = msgs[1].findall(f"{{{SD}}}error")
    assert [(e.get("nodeId"), e.text) for e in errors] == [("probe", "probe is offline: unplugged")]
    assert errors[0].get("timestamp") == stamp(hub.nodes["probe"].health.since)
    # Status still reads: the health is what is known about it.
    await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='3' status='true'><node nodeId='probe'/></req>")
    msgs = await inbox.readout(3)
    assert [m.tag for m in msgs] == [f"{{{SD}}}fields"]
    assert by_name(values(msgs))["Health"].value == "offline"


async def test_historical_values_from_the_hub_within_from_to(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice, hub = peers["alice"], xgw.hub
    inbox = Inbox(alice)
    t0 = math.floor(time.time()) - 1000
    for i, v in enumerate((1.0, 2.0, 3.0, 4.0)):
        hub.push("sim", "temp", v, at=t0 + 100 * i)
    await iq(alice, xgw.jid, f"<req xmlns='urn:xmpp:iot:sensordata' seqnr='4' historical='true' "
             f"from='{stamp(t0 + 50)}' to='{stamp(t0 + 200)}'><node nodeId='sim'/><field name='temp'/></req>")
    got = values(await inbox.readout(4))
    assert [(v.name, v.value, v.timestamp) for v in got] == [
        ("temp", "2.00", stamp(t0 + 100)), ("temp", "3.00", stamp(t0 + 200))
    ]
    assert got[0].flags() == {"historicalOther", "automaticReadout"}
    # A historical* type of the schema asks for the same history; from/to are inclusive.
    await iq(alice, xgw.jid, f"<req xmlns='urn:xmpp:iot:sensordata' seqnr='5' historicalHour='true' "
             f"from='{stamp(t0)}' to='{stamp(t0 + 300)}'><node nodeId='sim'/><field name='temp'/></req>")
    assert [v.value for v in values(await inbox.readout(5))] == ["1.00", "2.00", "3.00", "4.00"]
    answer = await iq(alice, xgw.jid, f"<req xmlns='urn:xmpp:iot:sensordata' seqnr='6' historical='true' "
                      f"from='{stamp(t0 + 200)}' to='{stamp(t0)}'/>")
    assert error_of(answer)[:2] == ("modify", "bad-request")


async def test_large_readout_is_split_over_messages(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice = peers["alice"]
    inbox = Inbox(alice)
    await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='10' all='true'/>")
    whole = values(await inbox.readout(10))
    xgw.session.sensordata.per_message = 4
    await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='11' all='true'/>")
    msgs = await inbox.readout(11)
    assert len(msgs) == math.ceil(len(whole) / 4) and len(msgs) > 5
    assert [m.get("done") for m in msgs] == [None] * (len(msgs) - 1) + ["true"]
    assert all(len(values([m])) <= 4 for m in msgs)

    def key(v: Value) -> tuple:
        return (v.node, v.type, v.name, v.value, tuple(sorted(v.flags())))

    # Same read-out either way (the Data age of the status part moves on).
    assert [key(v) for v in values(msgs) if v.name != "Data age"] == [key(v) for v in whole if v.name != "Data age"]


async def test_when_in_the_future_is_queued_then_started(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice = peers["alice"]
    inbox = Inbox(alice)
    asked = time.monotonic()
    # "Scheduled read-out of device with multiple responses", one second ahead.
    answer = await iq(alice, xgw.jid, f"<req xmlns='urn:xmpp:iot:sensordata' seqnr='4' all='true' when='{when(1.0)}'/>")
    assert child(answer, SD, "accepted").attrib == {"seqnr": "4", "queued": "true"}
    await inbox.nothing(0.5)
    msgs = await inbox.readout(4)
    assert time.monotonic() - asked >= 0.9
    assert msgs[0].tag == f"{{{SD}}}started" and msgs[0].attrib == {"seqnr": "4"}
    assert msgs[-1].get("done") == "true"
    assert by_name(values(msgs), "sim")["temp"].value == "21.50"

    answer = await iq(alice, xgw.jid, f"<req xmlns='urn:xmpp:iot:sensordata' seqnr='5' all='true' when='{when(3 * 86400)}'/>")
    typ, cond, text = error_of(answer)
    assert (typ, cond) == ("modify", "not-acceptable") and "ahead" in text


async def test_cancel_a_queued_readout(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice = peers["alice"]
    inbox = Inbox(alice)
    # "Cancelling a scheduled read-out request".
    answer = await iq(alice, xgw.jid, f"<req xmlns='urn:xmpp:iot:sensordata' seqnr='8' all='true' when='{when(1.0)}'/>")
    assert child(answer, SD, "accepted").get("queued") == "true"
    answer = await iq(alice, xgw.jid, "<cancel xmlns='urn:xmpp:iot:sensordata' seqnr='8'/>")
    assert child(answer, SD, "cancelled").attrib == {"seqnr": "8"}
    await inbox.nothing(1.6)  # past its time: nothing was sent
    # Nothing left to cancel, and another client cannot cancel someone else's.
    answer = await iq(alice, xgw.jid, "<cancel xmlns='urn:xmpp:iot:sensordata' seqnr='8'/>")
    assert error_of(answer)[1] == "item-not-found"
    await iq(alice, xgw.jid, f"<req xmlns='urn:xmpp:iot:sensordata' seqnr='9' when='{when(60)}'/>")
    answer = await iq(peers["victor"], xgw.jid, "<cancel xmlns='urn:xmpp:iot:sensordata' seqnr='9'/>")
    assert error_of(answer)[1] == "item-not-found"
    answer = await iq(alice, xgw.jid, "<cancel xmlns='urn:xmpp:iot:sensordata' seqnr='9'/>")
    assert child(answer, SD, "cancelled").get("seqnr") == "9"


async def test_viewer_reads_and_stranger_is_refused(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    victor, mallory = peers["victor"], peers["mallory"]
    inbox = Inbox(victor)
    answer = await iq(victor, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='1' momentary='true'/>")
    assert child(answer, SD, "accepted").get("seqnr") == "1"
    assert by_name(values(await inbox.readout(1)), "pump")["flow"].value == "12.0"

    snoop = Inbox(mallory)
    # "Momentary read-out rejected".
    answer = await iq(mallory, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='3' momentary='true'/>")
    assert error_of(answer) == ("cancel", "forbidden", "Access denied.")
    answer = await iq(mallory, xgw.jid, "<cancel xmlns='urn:xmpp:iot:sensordata' seqnr='3'/>")
    assert error_of(answer)[1] == "forbidden"
    await snoop.nothing(0.5)


async def test_names_in_answers_come_from_the_hub(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice = peers["alice"]
    inbox = Inbox(alice)
    bait = "evil&lt;b&gt;node"
    answer = await iq(alice, xgw.jid, f"<req xmlns='urn:xmpp:iot:sensordata' seqnr='1'><node nodeId='{bait}'/></req>")
    typ, cond, text = error_of(answer)
    assert (typ, cond) == ("cancel", "item-not-found")
    assert "evil" not in text and "sim, pump, probe" in text
    answer = await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='2'><field name='evilfield'/></req>")
    typ, cond, text = error_of(answer)
    assert cond == "item-not-found" and "evil" not in text
    # Unknown field names among known ones are hints the gateway skips, not echoes.
    await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='3'>"
             "<node nodeId='sim'/><field name='evilfield'/><field name='temp'/></req>")
    msgs = await inbox.readout(3)
    assert [v.name for v in values(msgs)] == ["temp"]
    assert "evil" not in b"".join(ET.tostring(m) for m in msgs).decode()


async def test_malformed_requests_get_errors_and_service_goes_on(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice = peers["alice"]
    inbox = Inbox(alice)
    bad = {
        "<req xmlns='urn:xmpp:iot:sensordata' momentary='true'/>": "bad-request",  # no seqnr
        "<req xmlns='urn:xmpp:iot:sensordata' seqnr='one'/>": "bad-request",
        "<req xmlns='urn:xmpp:iot:sensordata' seqnr='99999999999'/>": "bad-request",  # not an xs:int
        "<req xmlns='urn:xmpp:iot:sensordata' seqnr='1'><sensor id='sim'/></req>": "bad-request",
        "<req xmlns='urn:xmpp:iot:sensordata' seqnr='1' urgent='true'/>": "bad-request",
        "<req xmlns='urn:xmpp:iot:sensordata' seqnr='1' momentary='maybe'/>": "bad-request",
        "<req xmlns='urn:xmpp:iot:sensordata' seqnr='1' historical='true' from='yesterday'/>": "bad-request",
        "<req xmlns='urn:xmpp:iot:sensordata' seqnr='1' when='2013-02-30T19:00:00'/>": "bad-request",
        "<req xmlns='urn:xmpp:iot:sensordata' seqnr='1'><node/></req>": "bad-request",
        "<req xmlns='urn:xmpp:iot:sensordata' seqnr='1'><field/></req>": "bad-request",
        "<req xmlns='urn:xmpp:iot:sensordata' seqnr='1'><node nodeId='sim' sourceId='Meters'/></req>": "item-not-found",
        "<cancel xmlns='urn:xmpp:iot:sensordata'/>": "bad-request",
    }
    for payload, condition in bad.items():
        answer = await iq(alice, xgw.jid, payload)
        assert error_of(answer)[1] == condition, payload
    answer = await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='1'/>", itype="set")
    assert error_of(answer)[:2] == ("modify", "bad-request")
    await inbox.nothing(0.3)
    await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='42' momentary='true'><node nodeId='pump'/></req>")
    assert by_name(values(await inbox.readout(42)))["flow"].value == "12.0"


async def test_huge_requests_are_refused(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice = peers["alice"]
    inbox = Inbox(alice)
    nodes = "<node nodeId='sim'/>" * 5000
    answer = await iq(alice, xgw.jid, f"<req xmlns='urn:xmpp:iot:sensordata' seqnr='1'>{nodes}</req>")
    typ, cond, text = error_of(answer)
    assert (typ, cond) == ("modify", "not-acceptable") and "256" in text
    fields = "".join(f"<field name='f{i}'/>" for i in range(3000))
    answer = await iq(alice, xgw.jid, f"<req xmlns='urn:xmpp:iot:sensordata' seqnr='2'>{fields}</req>")
    assert error_of(answer)[1] == "not-acceptable"
    await inbox.nothing(0.3)
    await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='3'><node nodeId='sim'/><field name='temp'/></req>")
    assert [v.value for v in values(await inbox.readout(3))] == ["21.50"]


async def test_id_instead_of_seqnr_from_other_drafts(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice = peers["alice"]
    inbox = Inbox(alice)
    answer = await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' id='77' momentary='true'><field name='flow'/></req>")
    assert child(answer, SD, "accepted").attrib == {"id": "77"}
    msgs = await inbox.readout(77, attr="id")
    assert msgs[-1].get("done") == "true" and [v.value for v in values(msgs)] == ["12.0"]


async def test_interop_with_slixmpp_xep_0323_client(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    olive = peers["olive"]
    olive.client.register_plugin("xep_0323")
    plugin = olive.client.plugin["xep_0323"]
    events: asyncio.Queue[dict] = asyncio.Queue()

    def callback(**kw: object) -> None:
        events.put_nowait(kw)

    async def until(result: str) -> list[dict]:
        got = []
        async with asyncio.timeout(10):
            while not got or got[-1]["result"] != result:
                got.append(await events.get())
        return got

    plugin.request_data(olive.client.boundjid.full, xgw.jid, callback, nodeIds=["sim"], flags={"momentary": "true"})
    got = await until("done")
    assert [e["result"] for e in got] == ["accepted", "fields", "done"]
    assert got[1]["nodeId"] == "sim" and got[1]["timestamp"] == stamp(xgw.hub.field("sim.temp").latest.time)
    fields = {f["name"]: f for f in got[1]["fields"]}
    assert fields["temp"] == {
        "name": "temp", "typename": "numeric", "value": "21.50", "unit": "°C",
        "flags": {"momentary": "true", "automaticReadout": "true"},
    }
    assert (fields["door"]["typename"], fields["door"]["value"]) == ("boolean", "false")
    assert (fields["label"]["typename"], fields["label"]["value"]) == ("string", "hello")
    # Its draft predates <int/> and <long/>: those fields are not parsed on its side.
    assert "count" not in fields and "speed" not in fields

    plugin.request_data(olive.client.boundjid.full, xgw.jid, callback, nodeIds=["pump"],
                        flags={"status": "true", "momentary": "true"})
    got = await until("done")
    names = {f["name"]: f for e in got if e["result"] == "fields" for f in e["fields"]}
    assert names["flow"]["value"] == "12.0"
    assert (names["Health"]["typename"], names["Health"]["dataType"]) == ("enum", "iot-gateway:health")
    assert "Device ID" not in names

    seqnr = plugin.request_data(olive.client.boundjid.full, xgw.jid, callback, flags={"momentary": "true", "when": when(30)})
    assert [e["result"] for e in await until("queued")] == ["queued"]
    plugin.cancel_request(seqnr)
    assert [e["result"] for e in await until("cancelled")] == ["cancelled"]


async def test_discovery_and_caps(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    alice = peers["alice"]
    gw_bare = xgw.session.client.boundjid.bare
    info = await iq(alice, xgw.jid, "<query xmlns='http://jabber.org/protocol/disco#info'/>")
    features = {f for f in info["disco_info"]["features"]}
    assert {
        "urn:xmpp:iot:sensordata", "urn:xmpp:iot:control", "jabber:x:data", "urn:xmpp:ping",
        "jabber:iq:version", "http://jabber.org/protocol/caps", "http://jabber.org/protocol/xdata-validate",
    } <= features
    assert ("client", "bot", None, "Test GW") in info["disco_info"]["identities"]
    items = await iq(alice, xgw.jid, "<query xmlns='http://jabber.org/protocol/disco#items'/>")
    assert {(str(i[0]), i[1], i[2]) for i in items["disco_items"]["items"]} == {
        (xgw.jid, "sim", "Test rig"), (xgw.jid, "pump", "Pump"), (xgw.jid, "probe", "Probe")
    }
    node = await iq(alice, xgw.jid, "<query xmlns='http://jabber.org/protocol/disco#info' node='probe'/>")
    assert set(node["disco_info"]["features"]) == {"urn:xmpp:iot:sensordata"}  # no writable field
    node = await iq(alice, xgw.jid, "<query xmlns='http://jabber.org/protocol/disco#info' node='pump'/>")
    assert set(node["disco_info"]["features"]) == {"urn:xmpp:iot:sensordata", "urn:xmpp:iot:control"}

    version = await iq(alice, xgw.jid, "<query xmlns='jabber:iq:version'/>")
    assert version["software_version"]["name"] == "iot-gateway"

    # XEP-0115: the presence carries a caps hash that matches the disco#info above.
    alice.client.register_plugin("xep_0115")
    alice.client.send_presence_subscription(pto=gw_bare)
    pres = await alice.presence_from(gw_bare, lambda p: p.xml.find("{http://jabber.org/protocol/caps}c") is not None)
    caps = pres.xml.find("{http://jabber.org/protocol/caps}c")
    assert caps.get("hash") == "sha-1"
    assert caps.get("ver") == alice.client.plugin["xep_0115"].generate_verstring(info["disco_info"], "sha-1")
