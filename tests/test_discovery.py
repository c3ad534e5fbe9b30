"""The discovery surface as an XMPP client sees it, through the real Prosody:
disco#info and disco#items (XEP-0030), the caps hash in presence (XEP-0115),
the software version (XEP-0092) and the ad-hoc command list (XEP-0050),
each checked against what README.md and docs/xep.md promise."""

from __future__ import annotations

import base64
import hashlib
import tomllib
from importlib.metadata import version
from pathlib import Path

from slixmpp.xmlstream import ET

from tests.conftest import RunningGateway
from tests.peer import Peer
from tests.xep_helpers import XDATA, child, iq

INFO = "http://jabber.org/protocol/disco#info"
ITEMS = "http://jabber.org/protocol/disco#items"
CAPS = "http://jabber.org/protocol/caps"
COMMANDS = "http://jabber.org/protocol/commands"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
ROOT = Path(__file__).parent.parent

# docs/xep.md, "Discovery", plus ad-hoc commands (README) and disco itself.
FEATURES = {
    "urn:xmpp:iot:sensordata",
    "urn:xmpp:iot:control",
    COMMANDS,
    CAPS,
    INFO,
    "jabber:x:data",
    "http://jabber.org/protocol/xdata-validate",
    "urn:xmpp:ping",
    "jabber:iq:version",
    "urn:xmpp:receipts",  # README, "Phone-first chat"
    "urn:xmpp:chat-markers:0",
    "urn:xmpp:message-correct:0",
}
# README, "Ad-hoc commands": `Read sensors`, `Set actuator` and `Status`, with the same roles as chat.
READ, SET, STATUS = ("read", "Read sensors"), ("set", "Set actuator"), ("status", "Status")
COMMANDS_BY_USER = {"alice": [READ, SET, STATUS], "olive": [READ, SET, STATUS], "victor": [READ, STATUS]}


def full(gw: RunningGateway) -> str:
    return gw.session.client.boundjid.full


async def disco(peer: Peer, to: str, what: str, node: str | None = None) -> ET.Element:
    """The <query/> of a disco#info or disco#items result."""
    ns = INFO if what == "info" else ITEMS
    q = ET.Element(f"{{{ns}}}query")
    if node is not None:
        q.set("node", node)
    return child(await iq(peer, to, q), ns, "query")


def caps_ver(query: ET.Element) -> str:
    """The XEP-0115 verification string of a disco#info answer (section 5.1), computed here."""
    identities = sorted(
        (i.get("category", ""), i.get("type", ""), i.get(XML_LANG, ""), i.get("name", ""))
        for i in query.findall(f"{{{INFO}}}identity")
    )
    s = "".join("/".join(i) + "<" for i in identities)
    s += "".join(f + "<" for f in sorted(f.get("var", "") for f in query.findall(f"{{{INFO}}}feature")))
    forms = []
    for x in query.findall(f"{{{XDATA}}}x"):  # XEP-0128 extended information
        fields = {f.get("var"): sorted(v.text or "" for v in f.findall(f"{{{XDATA}}}value"))
                  for f in x.findall(f"{{{XDATA}}}field")}
        form_type = fields.pop("FORM_TYPE")[0]
        forms.append(form_type + "<" + "".join(var + "<" + "".join(v + "<" for v in vals)
                                               for var, vals in sorted(fields.items())))
    s += "".join(sorted(forms))
    return base64.b64encode(hashlib.sha1(s.encode()).digest()).decode()


async def test_disco_info_caps_and_version(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw, alice = running_gateway, peers["alice"]
    info = await disco(alice, full(gw), "info")
    identities = [dict(i.attrib) for i in info.findall(f"{{{INFO}}}identity")]
    # README: `[gateway] name` is "shown in presence status and the disco identity".
    assert identities == [{"category": "client", "type": "bot", "name": "Test GW"}]
    features = [f.get("var") for f in info.findall(f"{{{INFO}}}feature")]
    assert len(features) == len(set(features)), features  # XEP-0115: duplicates make the hash invalid
    assert FEATURES <= set(features), FEATURES - set(features)

    # XEP-0115: the gateway's presence carries a hash of exactly that disco#info.
    alice.client.send_presence_subscription(pto=gw.jid)
    pres = await alice.presence_from(gw.jid, lambda p: p.xml.find(f"{{{CAPS}}}c") is not None)
    c = pres.xml.find(f"{{{CAPS}}}c")
    assert c.get("hash") == "sha-1" and c.get("node")
    assert c.get("ver") == caps_ver(info)
    # README, "Presence": available, with the health summary as status.
    assert (pres["show"], pres["status"]) == ("", "Test GW: 1/1 devices OK")
    # A client that does not know the hash asks for node#ver: the same answer.
    again = await disco(alice, full(gw), "info", f"{c.get('node')}#{c.get('ver')}")
    assert caps_ver(again) == c.get("ver")

    # XEP-0092: the package's name and version, as pyproject.toml says.
    answer = child(await iq(alice, full(gw), "<query xmlns='jabber:iq:version'/>"), "jabber:iq:version", "query")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert answer.findtext("{jabber:iq:version}name") == "iot-gateway" == project["name"]
    assert answer.findtext("{jabber:iq:version}version") == version("iot-gateway") == project["version"]


async def test_disco_items_list_the_devices_as_nodes(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw, victor = running_gateway, peers["victor"]
    # docs/xep.md: one item per device, jid = the gateway's full JID, node = device id, name = device name.
    items = await disco(victor, full(gw), "items")
    assert [dict(i.attrib) for i in items.findall(f"{{{ITEMS}}}item")] == [
        {"jid": full(gw), "node": "sim", "name": "sim"}
    ]
    node = await disco(victor, full(gw), "info", "sim")
    assert [dict(i.attrib) for i in node.findall(f"{{{INFO}}}identity")] == [
        {"category": "hierarchy", "type": "leaf", "name": "sim"}
    ]
    # sim has writable fields: it is a control node too.
    assert {"urn:xmpp:iot:sensordata", "urn:xmpp:iot:control"} <= {f.get("var") for f in node.findall(f"{{{INFO}}}feature")}


async def test_command_list_per_role(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw = running_gateway
    for user, expected in COMMANDS_BY_USER.items():
        items = await disco(peers[user], full(gw), "items", COMMANDS)
        got = sorted((i.get("node"), i.get("name")) for i in items.findall(f"{{{ITEMS}}}item"))
        assert got == sorted(expected), user
        assert {i.get("jid") for i in items.findall(f"{{{ITEMS}}}item")} == {full(gw)}, user


async def test_stranger_gets_an_empty_command_list(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    # Not an error: an empty list, as for a client with no command it may run.
    items = await disco(peers["mallory"], full(running_gateway), "items", COMMANDS)
    assert items.findall(f"{{{ITEMS}}}item") == []


def test_caps_hash_as_in_the_xep_0115_examples() -> None:
    # XEP-0115 5.2 "Simple Generation Example" and 5.3 "Complex Generation Example".
    simple = ET.fromstring(
        f"<query xmlns='{INFO}'><identity category='client' name='Exodus 0.9.1' type='pc'/>"
        f"<feature var='{CAPS}'/><feature var='{INFO}'/><feature var='http://jabber.org/protocol/disco#items'/>"
        "<feature var='http://jabber.org/protocol/muc'/></query>"
    )
    assert caps_ver(simple) == "QgayPKawpkPSDYmwT/WM94uAlu0="
    complex_ = ET.fromstring(
        f"<query xmlns='{INFO}'>"
        "<identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>"
        "<identity xml:lang='el' category='client' name='Ψ 0.11' type='pc'/>"
        f"<feature var='{CAPS}'/><feature var='{INFO}'/><feature var='http://jabber.org/protocol/disco#items'/>"
        "<feature var='http://jabber.org/protocol/muc'/>"
        f"<x xmlns='{XDATA}' type='result'>"
        "<field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value></field>"
        "<field var='ip_version' type='text-multi'><value>ipv4</value><value>ipv6</value></field>"
        "<field var='os'><value>Mac</value></field><field var='os_version'><value>10.5.1</value></field>"
        "<field var='software'><value>Psi</value></field><field var='software_version'><value>0.11</value></field>"
        "</x></query>"
    )
    assert caps_ver(complex_) == "q07IKJEyjvHSyhy//CH0CxmKi8w="


async def test_strangers_learn_no_device_from_discovery(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    # README: strangers get nothing; docs/xep.md: "they learn nothing about nodes or fields".
    gw, mallory = running_gateway, peers["mallory"]
    items = await disco(mallory, full(gw), "items")
    assert items.findall(f"{{{ITEMS}}}item") == []
    # A device node answers a stranger as a node that does not exist does.
    for node in ("sim", "nosuch"):
        q = ET.Element(f"{{{INFO}}}query", node=node)
        answer = await iq(mallory, full(gw), q)
        assert (answer["type"], answer["error"]["condition"]) == ("error", "item-not-found"), node
    # The gateway itself stays discoverable: what it is, not what it has.
    info = await disco(mallory, full(gw), "info")
    assert "urn:xmpp:iot:sensordata" in {f.get("var") for f in info.findall(f"{{{INFO}}}feature")}
