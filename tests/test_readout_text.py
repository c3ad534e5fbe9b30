"""XEP-0323 read-outs written as XML text (gateway/xmpp/sensordata.py): escaping of hostile
names, units and values, XEP-0198 counting, and the resend of an unacknowledged
read-out after a resumed stream; all through the suite's real Prosody."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from slixmpp.xmlstream import ET
from slixmpp.xmlstream.tostring import tostring

from gateway.app import Gateway
from gateway.commands import Commands
from gateway.hub import FieldSpec, Hub
from gateway.xmpp.sensordata import ReadoutRequest, TextMessage, messages, read
from gateway.xmpp.session import Session
from tests.conftest import XmppServer, gateway_config
from tests.peer import Peer
from tests.proxy import Proxy
from tests.xep_helpers import DEVICES, SD, Inbox, XepGateway, by_name, iq, running, values

# Quotes of both kinds, markup, an entity, a CDATA end and a non-BMP character. (Not tabs or
# newlines: Prosody passes attribute values on with them literal, so clients read spaces.)
HOSTILE = "a<b>&amp;\"q\" 'x' ]]> 😀"
ODD = [
    FieldSpec("t<&\"'>😀", unit="µ<&\"'>😀", decimals=1),
    FieldSpec("s" + HOSTILE, type="string"),
    FieldSpec("ctl", type="string"),
    FieldSpec("on/off & \"so\"", type="boolean"),
]


@pytest.fixture
async def xgw(xmpp_server: XmppServer, tmp_path: Path) -> AsyncIterator[XepGateway]:
    async with running(xmpp_server, tmp_path) as gw:
        yield gw


async def test_hostile_names_units_and_values_are_escaped(xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]) -> None:
    async with running(xmpp_server, tmp_path) as xgw:
        xgw.hub.add_node("odd", "Odd <names> & \"quotes\"", "none", ODD)
        xgw.hub.push("odd", ODD[0].name, 21.25)
        xgw.hub.push("odd", ODD[1].name, HOSTILE)
        # Characters XML cannot carry: a server would close the gateway's stream on them.
        xgw.hub.push("odd", "ctl", "bell\x07 nul\x00 ok")
        xgw.hub.push("odd", ODD[3].name, True)
        alice = peers["alice"]
        inbox = Inbox(alice)
        # iq() fails the test if any payload does not validate against the XEP's schema.
        await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='1' all='true'><node nodeId='odd'/></req>")
        got = by_name(values(await inbox.readout(1)))
        temp = got[ODD[0].name]
        assert (temp.type, temp.value, temp.attrs["unit"]) == ("numeric", "21.2", ODD[0].unit)
        assert (got[ODD[1].name].type, got[ODD[1].name].value) == ("string", HOSTILE)
        assert got["ctl"].value == "bell\ufffd nul\ufffd ok"
        assert got[ODD[3].name].value == "true"
        assert got["Name"].value == "Odd <names> & \"quotes\""
        # The stream survived: the next read-out arrives as well.
        await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='2'><node nodeId='sim'/></req>")
        assert by_name(values(await inbox.readout(2)))["temp"].value == "21.50"


async def test_readouts_are_counted_by_stream_management(xgw: XepGateway, peers: dict[str, Peer]) -> None:
    sm = xgw.session.client.plugin["xep_0198"]
    assert sm.enabled_out, "the suite's Prosody offers XEP-0198"
    alice = peers["alice"]
    inbox = Inbox(alice)
    xgw.session.sensordata.per_message = 3  # several <fields/> messages per read-out
    for seqnr in (1, 2, 3):
        await iq(alice, xgw.jid, f"<req xmlns='urn:xmpp:iot:sensordata' seqnr='{seqnr}' all='true'/>")
        assert len(await inbox.readout(seqnr)) > 3
    # The server's count of what it received must equal the gateway's count of what it sent.
    sm.request_ack()
    deadline = time.monotonic() + 10
    while (sm.last_ack != sm.seq or sm.unacked_queue) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert (sm.last_ack, len(sm.unacked_queue)) == (sm.seq, 0)


async def test_unacked_readout_is_resent_with_its_fields_after_a_resume(xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]) -> None:
    proxy = await Proxy(xmpp_server.prosody.port).start()
    config = gateway_config(xmpp_server, tmp_path, devices=DEVICES, xmpp={"server": proxy.address})
    gw = Gateway(config)
    await gw.start()
    session = Session(config, gw.hub, Commands(gw.hub, config.gateway.name), xmpp_server.passwords["gateway"])
    try:
        session.connect()
        await asyncio.wait_for(session.online.wait(), 10)
        client = session.client
        sm = client.plugin["xep_0198"]
        resumed = asyncio.Event()
        client.add_event_handler("session_resumed", lambda _e: resumed.set())
        alice = peers["alice"]
        inbox = Inbox(alice)
        req = ReadoutRequest(41, nodes=[gw.hub.nodes["sim"]])
        (payload,) = messages(41, "seqnr", read(req))
        # A read-out written into a link that then dies: counted and kept by XEP-0198, never
        # received by the server. (Made by hand: a real one would race the proxy's cut.)
        lost = TextMessage(client)
        lost["to"] = alice.client.boundjid.full
        lost.payload = payload
        sm.seq = (sm.seq + 1) % 2**32
        sm.unacked_queue.append((sm.seq, lost))
        proxy.cut()
        await asyncio.wait_for(resumed.wait(), 20)
        got = by_name(values(await inbox.readout(41, timeout=10)))
        assert got["temp"].value == "21.50" and len(got) == len(DEVICES[0]["fields"])
    finally:
        await session.stop()
        await gw.stop()
        await proxy.stop()


def test_materialized_payload_serialises_like_the_text() -> None:
    req = ReadoutRequest(7)
    hub = Hub()
    hub.add_node("odd", "Odd", "none", ODD)
    hub.push("odd", ODD[1].name, HOSTILE)
    req.nodes = [hub.nodes["odd"]]
    (payload,) = messages(7, "seqnr", read(req))
    msg = TextMessage()
    msg["to"] = "alice@localhost/x"
    msg.payload = payload
    text = msg.to_text()
    msg.materialize()
    assert msg.payload == ""
    again = tostring(msg.xml, top_level=True)
    assert ET.tostring(ET.fromstring(text)) == ET.tostring(ET.fromstring(again))
    # By name: the unread `ctl` string comes first whenever a second boundary falls between the
    # push and the read-out (its "missing" value is stamped with the read-out's time).
    strings = {e.get("name"): e.get("value") for e in ET.fromstring(text).iter(f"{{{SD}}}string")}
    assert strings[ODD[1].name] == HOSTILE and strings["ctl"] == ""
