"""Helpers for the XEP-0323/0325 tests: a gateway with typed fields, raw IQs, and an inbox
for the read-out messages, all over the suite's real Prosody."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slixmpp import Iq, Message
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream import ET
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher.base import MatcherBase

from gateway.app import Gateway
from gateway.commands import Commands
from gateway.hub import FieldSpec, Hub
from gateway.xmpp.session import Session
from tests import schema
from tests.conftest import XmppServer, gateway_config
from tests.peer import Peer

SD = "urn:xmpp:iot:sensordata"
CTRL = "urn:xmpp:iot:control"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
XDATA = "jabber:x:data"
XDV = "http://jabber.org/protocol/xdata-validate"
TIMEOUT = 10.0

# Readings never change on their own (interval of an hour, no wave, no noise),
# so tests can assert exact values; writable fields echo what was set.
DEVICES: list[dict[str, Any]] = [
    {
        "id": "sim",
        "name": "Test rig",
        "driver": "simulated",
        "interval": 3600,
        "fields": [
            {"name": "temp", "unit": "°C", "decimals": 2, "base": 21.5, "amplitude": 0, "noise": 0},
            {"name": "rpm", "type": "integer", "unit": "rpm", "base": 1500, "amplitude": 0, "noise": 0},
            {"name": "count", "type": "integer", "base": 7, "amplitude": 0, "noise": 0},
            {"name": "door", "type": "boolean", "base": 1, "amplitude": 0, "noise": 0},
            {"name": "mode", "type": "string", "amplitude": 0, "noise": 0},
            {"name": "relay", "type": "boolean", "writable": True},
            {"name": "speed", "type": "integer", "writable": True, "min": 0, "max": 100, "description": "Fan speed"},
            {"name": "setpoint", "unit": "°C", "decimals": 1, "writable": True, "min": 5, "max": 30, "initial": 20},
            {"name": "label", "type": "string", "writable": True, "initial": "hello"},
        ],
    },
    {
        "id": "pump",
        "name": "Pump",
        "driver": "simulated",
        "interval": 3600,
        "fields": [
            {"name": "relay", "type": "boolean", "writable": True},
            {"name": "flow", "unit": "l/min", "decimals": 1, "base": 12, "amplitude": 0, "noise": 0},
        ],
    },
]
# A node with no driver: its fields are never read and its health stays "starting".
PROBE = [FieldSpec("level", unit="cm"), FieldSpec("alarm", type="boolean")]


@dataclass
class XepGateway:
    """The gateway under test, its session and the full JID clients address."""

    gateway: Gateway
    session: Session

    @property
    def hub(self) -> Hub:
        return self.gateway.hub

    @property
    def jid(self) -> str:
        return self.session.client.boundjid.full


@asynccontextmanager
async def running(xmpp_server: XmppServer, tmp_path: Path) -> AsyncIterator[XepGateway]:
    """The gateway with `sim`, `pump` and the driverless `probe`, online on Prosody."""
    config = gateway_config(xmpp_server, tmp_path, devices=DEVICES)
    gw = Gateway(config)
    await gw.start()
    gw.hub.add_node("probe", "Probe", "none", PROBE)
    session = Session(config, gw.hub, Commands(gw.hub, config.gateway.name), xmpp_server.passwords["gateway"])
    try:
        session.connect()
        await asyncio.wait_for(session.online.wait(), TIMEOUT)
        yield XepGateway(gw, session)
    finally:
        await session.stop()
        await gw.stop()


def xml(text: str) -> ET.Element:
    """An element from XML text, as written in the XEPs' examples."""
    return ET.fromstring(text)


async def iq(peer: Peer, to: str, payload: ET.Element | str, itype: str = "get", timeout: float = TIMEOUT) -> Iq:
    """Send an IQ with `payload` and return the answer, result or error;
    SchemaViolation if the gateway sent anything its XEP's schema rejects."""
    stanza = peer.client.Iq()
    stanza["to"] = to
    stanza["type"] = itype
    stanza.append(xml(payload) if isinstance(payload, str) else payload)
    try:
        answer = await stanza.send(timeout=timeout)
    except IqError as e:
        answer = e.iq
    except IqTimeout:
        raise AssertionError(f"no answer to {payload!r} within {timeout} s") from None
    schema.raise_failures()
    return answer


def error_of(answer: Iq) -> tuple[str, str, str]:
    """(error type, condition, text) of an IQ error; AssertionError for a result."""
    assert answer["type"] == "error", f"expected an IQ error, got {answer}"
    return answer["error"]["type"], answer["error"]["condition"], answer["error"]["text"]


def child(answer: Iq, ns: str, name: str) -> ET.Element:
    """The payload element `name` of an IQ result."""
    assert answer["type"] == "result", f"expected a result, got {answer}"
    el = answer.xml.find(f"{{{ns}}}{name}")
    assert el is not None, f"no <{name}/> in {answer}"
    return el


class _SensorData(MatcherBase):
    def __init__(self) -> None:
        super().__init__(SD)

    def match(self, stanza: Any) -> bool:
        return isinstance(stanza, Message) and any(el.tag.startswith(f"{{{SD}}}") for el in stanza.xml)


class Inbox:
    """Collects the XEP-0323 elements (fields, failure, started, done) a peer receives."""

    def __init__(self, peer: Peer):
        self.items: asyncio.Queue[tuple[str, ET.Element]] = asyncio.Queue()
        # slixmpp's "message" event only fires for messages with a body.
        peer.client.register_handler(Callback("sensor-data inbox", _SensorData(), self._on_message))

    def _on_message(self, msg: Message) -> None:
        for el in msg.xml:
            if el.tag.startswith(f"{{{SD}}}"):
                self.items.put_nowait((str(msg["from"]), el))

    async def next(self, timeout: float = TIMEOUT) -> ET.Element:
        """The next sensor-data element."""
        _frm, el = await asyncio.wait_for(self.items.get(), timeout)
        return el

    async def readout(self, seqnr: int | str, timeout: float = TIMEOUT, attr: str = "seqnr") -> list[ET.Element]:
        """Every element of read-out `seqnr`, up to the one marked done='true'."""
        got: list[ET.Element] = []
        async with asyncio.timeout(timeout):
            while True:
                el = await self.next(timeout)
                if el.get(attr) != str(seqnr):
                    continue
                got.append(el)
                if el.get("done") == "true" or el.tag == f"{{{SD}}}done":
                    return got

    async def nothing(self, wait: float = 0.5) -> None:
        """Assert that no sensor-data element arrives within `wait` seconds."""
        try:
            el = await self.next(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected {ET.tostring(el)!r}")


@dataclass
class Value:
    """One field of a read-out, flattened."""

    node: str
    timestamp: str
    type: str
    name: str
    value: str
    attrs: dict[str, str]

    def flags(self) -> set[str]:
        """The field types and quality-of-service flags set to true (not `writable`)."""
        return {k for k, v in self.attrs.items() if v == "true" and k != "writable"}


def values(elements: list[ET.Element]) -> list[Value]:
    """The fields of every `<fields/>` element, in order."""
    out = []
    for el in elements:
        if el.tag != f"{{{SD}}}fields":
            continue
        for node in el.findall(f"{{{SD}}}node"):
            for ts in node.findall(f"{{{SD}}}timestamp"):
                for f in ts:
                    out.append(Value(node.get("nodeId"), ts.get("value"), f.tag.split("}")[1], f.get("name"), f.get("value"), dict(f.attrib)))
    return out


def by_name(vals: list[Value], node: str | None = None) -> dict[str, Value]:
    """Fields by name (the last one wins), optionally of one node."""
    return {v.name: v for v in vals if node is None or v.node == node}
