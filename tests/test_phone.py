"""Phone-first chat (README, "Phone-first chat"): receipts (XEP-0184), chat markers
(XEP-0333), corrections (XEP-0308) and retractions (XEP-0424) through the real
Prosody, and `status`, `read` and `list` laid out for a phone's width."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import slixmpp
from slixmpp.xmlstream import ET

from gateway.auth import Actor
from gateway.rows import WIDTH, ago
from gateway.hub import Health
from gateway.xmpp.phone import MEMORY, Phone
from gateway.xmpp.session import STRANGER_REPLY
from tests.conftest import RunningGateway
from tests.helpers import running, until
from tests.peer import Peer

RECEIPTS = "urn:xmpp:receipts"
MARKERS = "urn:xmpp:chat-markers:0"
CORRECT = "urn:xmpp:message-correct:0"
RETRACT = "urn:xmpp:message-retract:1"
FALLBACK = "This person attempted to retract a previous message, but it's unsupported by your client."


class Inbox:
    """Every message stanza (with a body or not) a peer gets from the gateway."""

    def __init__(self, peer: Peer, frm: str):
        self.frm = frm
        self.stanzas: list[slixmpp.Message] = []
        peer.client.add_filter("in", self._on)  # the `message` event skips stanzas without a body

    def _on(self, stanza: slixmpp.xmlstream.StanzaBase) -> slixmpp.xmlstream.StanzaBase:
        if isinstance(stanza, slixmpp.Message) and stanza["from"].bare == self.frm:
            self.stanzas.append(stanza)
        return stanza

    def ids(self, ns: str, name: str) -> list[str]:
        """The `id` of every <name xmlns=ns/> received so far."""
        return [el.get("id") for m in self.stanzas for el in m.xml.findall(f"{{{ns}}}{name}")]


def send(peer: Peer, to: str, body: str, *payload: str) -> str:
    """Send a chat message as a phone does (with an id and these payloads); return its id."""
    mid = uuid.uuid4().hex
    msg = peer.client.make_message(mto=to, mbody=body, mtype="chat")
    msg["id"] = mid
    for xml in payload:
        msg.xml.append(ET.fromstring(xml))
    msg.send()
    return mid


async def ask(peer: Peer, to: str, body: str, *payload: str) -> tuple[str, str]:
    """(message id, the gateway's answer) for a phone-style message."""
    peer.drain()
    mid = send(peer, to, body, *payload)
    return mid, await peer.reply_from(to)


REQUEST = f"<request xmlns='{RECEIPTS}'/>"
MARKABLE = f"<markable xmlns='{MARKERS}'/>"


def replace(mid: str) -> str:
    return f"<replace xmlns='{CORRECT}' id='{mid}'/>"


# ------------------------------------------------------------ receipts and markers


async def test_receipt_and_marker_for_a_contacts_command(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw, victor = running_gateway, peers["victor"]
    inbox = Inbox(victor, gw.jid)
    mid, reply = await ask(victor, gw.jid, "read sim.temp", REQUEST, MARKABLE)
    assert reply.startswith("sim.temp = "), reply
    # Sent when the command was accepted, so before its answer.
    assert inbox.ids(RECEIPTS, "received") == [mid]
    assert inbox.ids(MARKERS, "displayed") == [mid]
    # Only what was asked for: no marker for a message that is not markable, no receipt unrequested.
    plain, _ = await ask(victor, gw.jid, "read sim.temp", REQUEST)
    other, _ = await ask(victor, gw.jid, "read sim.temp", MARKABLE)
    assert inbox.ids(RECEIPTS, "received") == [mid, plain]
    assert inbox.ids(MARKERS, "displayed") == [mid, other]


async def test_stranger_gets_no_receipt_and_no_marker(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw, mallory = running_gateway, peers["mallory"]
    inbox = Inbox(mallory, gw.jid)
    _, reply = await ask(mallory, gw.jid, "read sim.temp", REQUEST, MARKABLE)
    assert reply == STRANGER_REPLY
    send(mallory, gw.jid, "status", REQUEST, MARKABLE)  # the second gets no answer at all
    # A ping is answered after every stanza sent before it has been handled: nothing else came.
    await mallory.client.plugin["xep_0199"].ping(gw.session.client.boundjid.full, timeout=10)
    assert [m["body"] for m in inbox.stanzas] == [STRANGER_REPLY]
    assert inbox.ids(RECEIPTS, "received") == [] and inbox.ids(MARKERS, "displayed") == []


# ------------------------------------------------------------ corrections and retractions


async def test_corrected_set_is_not_run_and_the_answer_says_why(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw, olive = running_gateway, peers["olive"]
    hub = gw.gateway.hub
    mid, reply = await ask(olive, gw.jid, "set sim.relay on", REQUEST)
    assert re.fullmatch(r"sim\.relay: \S+ → on", reply), reply
    entries = len(hub.audit.entries)
    inbox = Inbox(olive, gw.jid)
    fix, answer = await ask(olive, gw.jid, "set sim.relay off", replace(mid), REQUEST)
    assert answer.startswith("Not run: "), answer
    assert f"`set sim.relay on`, already ran ({reply})" in answer, answer
    assert "corrections don't re-run commands: send it again" in answer, answer
    assert hub.field("sim.relay").latest.value is True
    assert len(hub.audit.entries) == entries  # nothing attempted, nothing refused
    assert inbox.ids(RECEIPTS, "received") == [fix]  # it did arrive
    # Sent as a new message, it runs.
    _, again = await ask(olive, gw.jid, "set sim.relay off")
    assert again == "sim.relay: on → off"


async def test_corrected_read_is_answered(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw, victor = running_gateway, peers["victor"]
    mid, reply = await ask(victor, gw.jid, "read sim.tmp")
    assert reply.startswith("Error: "), reply
    _, fixed = await ask(victor, gw.jid, "read sim.temp", replace(mid))
    assert re.fullmatch(r"sim\.temp = -?\d+\.\d °C \(\d+ s ago\)", fixed), fixed
    # Edited again (Conversations refers to the first message each time): answered again.
    _, status = await ask(victor, gw.jid, "status", replace(mid))
    assert status.startswith("Test GW: 1/1 devices OK"), status
    # An edit of a message the gateway does not remember (before a restart) is a read too.
    _, listed = await ask(victor, gw.jid, "list", replace("unknown-id"))
    assert listed.startswith("1 device:"), listed


async def test_edit_that_would_change_something_is_never_run(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw, olive = running_gateway, peers["olive"]
    hub = gw.gateway.hub
    before = hub.field("sim.relay").latest.value
    entries = len(hub.audit.entries)
    mid, _ = await ask(olive, gw.jid, "read sim.relay")
    _, answer = await ask(olive, gw.jid, "set sim.relay on", replace(mid))
    assert answer.startswith("Not run: `set sim.relay on` came as an edit of `read sim.relay`"), answer
    _, answer = await ask(olive, gw.jid, "watch sim.temp > 100", replace("unknown-id"))
    assert answer.startswith("Not run: `watch sim.temp > 100` came as an edit,"), answer
    assert hub.field("sim.relay").latest.value == before
    assert len(hub.audit.entries) == entries
    assert gw.gateway.watches.visible(olive.jid, False) == []


async def test_only_commands_that_just_read_are_rerun_by_an_edit(
    running_gateway: RunningGateway, peers: dict[str, Peer]
) -> None:
    """An allow-list: `distrust`, `trust`, `set`, an unknown word, … as an edit are not run;
    a `read` is. Whatever the gateway does not know to be a read is never repeated."""
    gw, alice = running_gateway, peers["alice"]
    hub = gw.gateway.hub
    entries = len(hub.audit.entries)
    mid, _ = await ask(alice, gw.jid, "read sim.temp")
    fp = "ab" * 32
    for edit in (f"distrust {alice.jid} {fp}", f"trust {alice.jid} {fp}", "set sim.relay on", "frobnicate sim.relay"):
        _, answer = await ask(alice, gw.jid, edit, replace(mid))
        assert answer.startswith(f"Not run: `{edit}` came as an edit of `read sim.temp`, and "
                                 "corrections don't re-run commands: send it again"), answer
    assert len(hub.audit.entries) == entries
    # What ran under an edit is not repeated by an edit of it either, even into a read.
    mid, first = await ask(alice, gw.jid, "frobnicate")
    _, answer = await ask(alice, gw.jid, "read sim.temp", replace(mid))
    assert answer.startswith("Not run: your edit `read sim.temp`; corrections don't re-run commands: send it again"), answer
    assert f"`frobnicate`, already ran ({first})" in answer, answer
    # A read edited into another read is answered.
    mid, _ = await ask(alice, gw.jid, "read sim.tmp")
    _, fixed = await ask(alice, gw.jid, "read sim.temp", replace(mid))
    assert fixed.startswith("sim.temp = "), fixed


async def test_retraction_undoes_nothing_and_says_so(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw, olive = running_gateway, peers["olive"]
    hub = gw.gateway.hub
    mid, reply = await ask(olive, gw.jid, "set sim.relay on")
    entries = len(hub.audit.entries)
    # As Conversations sends it: the retraction, a fallback body, a fallback marker and a store hint.
    retract = (
        f"<retract xmlns='{RETRACT}' id='{mid}'/>",
        f"<fallback xmlns='urn:xmpp:fallback:0' for='{RETRACT}'/>",
        "<store xmlns='urn:xmpp:hints'/>",
    )
    _, answer = await ask(olive, gw.jid, FALLBACK, *retract)
    assert answer == f"Retracting `set sim.relay on` undoes nothing: it already ran ({reply}). " \
        "To change it back, send a new command.", answer
    assert hub.field("sim.relay").latest.value is True and len(hub.audit.entries) == entries
    # One the gateway does not remember: it still says nothing was undone, and runs nothing.
    _, answer = await ask(olive, gw.jid, FALLBACK, f"<retract xmlns='{RETRACT}' id='unknown-id'/>")
    assert answer.startswith("Retracting a message undoes nothing here"), answer


def test_memory_per_contact_is_bounded() -> None:
    client = slixmpp.ClientXMPP("gw@x/r", "pw")
    client.register_plugin("xep_0030")
    phone = Phone(SimpleNamespace(client=client))  # type: ignore[arg-type]

    def message(mid: str, body: str, *payload: str) -> slixmpp.Message:
        msg = client.make_message(mto="gw@x", mbody=body, mtype="chat")
        msg["id"] = mid
        for xml in payload:
            msg.xml.append(ET.fromstring(xml))
        return msg

    for i in range(MEMORY + 5):
        phone.remember(message(f"m{i}", "set sim.relay on"), "olive@x", "set sim.relay on", "sim.relay: off → on")
    told = phone.instead(message("e", "read sim.temp", replace(f"m{MEMORY + 4}")), "olive@x")
    assert told is not None and "already ran (sim.relay: off → on)" in told
    # The oldest are forgotten: an edit of one is treated as of an unknown message (a read runs).
    assert phone.instead(message("e", "read sim.temp", replace("m0")), "olive@x") is None
    assert len(phone._done["olive@x"]) == MEMORY
    # Another contact's ids are theirs alone.
    assert phone.instead(message("e", "read sim.temp", replace(f"m{MEMORY + 4}")), "victor@x") is None


async def test_features_in_disco(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    info = await peers["alice"].client.plugin["xep_0030"].get_info(running_gateway.session.client.boundjid.full)
    features = set(info["disco_info"]["features"])
    assert {RECEIPTS, MARKERS, CORRECT} <= features
    assert RETRACT not in features  # it undoes nothing, so clients should not offer it


# ------------------------------------------------------------ layouts for a phone

DEVICES = [
    {
        "id": "greenhouse",
        "name": "Greenhouse",
        "driver": "simulated",
        "interval": 3600,
        "fields": [
            {"name": "temperature", "unit": "°C", "decimals": 1, "base": 21.5, "amplitude": 0, "noise": 0},
            {"name": "humidity", "unit": "%", "decimals": 0, "base": 64, "amplitude": 0, "noise": 0},
            {"name": "heater", "type": "boolean", "writable": True},
            {"name": "setpoint", "unit": "°C", "decimals": 1, "writable": True, "min": 5, "max": 30, "initial": 20},
        ],
    },
    {
        "id": "weather",
        "driver": "simulated",
        "interval": 3600,
        "fields": [
            {"name": "wind", "unit": "km/h", "decimals": 1, "base": 12, "amplitude": 0, "noise": 0},
            {"name": "pressure", "unit": "hPa", "decimals": 1, "base": 1013.2, "amplitude": 0, "noise": 0},
            {"name": "soil_moisture_north_bed", "unit": "%", "decimals": 0, "base": 40, "amplitude": 0, "noise": 0},
        ],
    },
]
ADMIN = Actor("alice@x", "admin", "test")


def widest(text: str) -> int:
    return max(len(line) for line in text.split("\n"))


async def test_status_read_and_list_fit_a_phone(tmp_path: Path) -> None:
    async with running(tmp_path, *DEVICES) as gw:
        fields = [f for n in gw.hub.nodes.values() for f in n.fields.values()]
        await until(lambda: all(f.latest is not None for f in fields), "the first readings")
        gw.hub.push("weather", "wind", 3.5, at=time.time() - 150)
        gw.hub.set_health("weather", Health.OFFLINE, "serial port gone")
        replies = {c: await gw.commands.run(c, ADMIN) for c in ("status", "read", "read greenhouse", "list")}
        for command, reply in replies.items():
            assert widest(reply) <= WIDTH, f"{command}:\n{reply}"
        read = replies["read"].split("\n")
        # Units next to values, the age as a person says it, the unhealthy device's values under its health.
        assert "greenhouse: ok" in read and "weather: offline: serial port gone" in read
        assert re.fullmatch(r"  temperature +21\.5 °C  \d s ago", read[read.index("greenhouse: ok") + 1]), read
        assert re.fullmatch(r"  wind +3\.5 km/h  2 min ago", read[read.index("weather: offline: serial port gone") + 1]), read
        # A name too long for the columns goes on two lines instead of widening them.
        i = read.index("  soil_moisture_north_bed")
        assert re.fullmatch(r"    40 %  \d s ago", read[i + 1]), read
        status = replies["status"].split("\n")
        assert status[0] == "IoT gateway: 1/2 devices OK"
        assert re.fullmatch(r"greenhouse  ok       data \d s ago", status[1]), status
        assert re.fullmatch(r"weather     offline  data \d s ago", status[2]) and status[3] == "  serial port gone", status
        listed = replies["list"].split("\n")
        assert listed[0] == "2 devices:" and "greenhouse (simulated, Greenhouse)" in listed
        assert "  setpoint     number °C, writable 5..30" in listed and "  heater       on/off, writable" in listed
        # One field, one line, as before.
        line = await gw.commands.run("read weather.wind", ADMIN)
        assert line == "weather.wind = 3.5 km/h (2 min ago) [offline: serial port gone]"


def test_ages_read_as_a_person_says_them() -> None:
    assert [ago(s) for s in (-3, 0, 59.9, 60, 150, 3599, 3600, 5400, 47 * 3600, 2 * 86400, 9 * 86400)] == [
        "0 s ago", "0 s ago", "59 s ago", "1 min ago", "2 min ago", "59 min ago",
        "1 h ago", "1 h ago", "47 h ago", "2 d ago", "9 d ago",
    ]


async def test_edit_sent_before_the_answer_is_judged_after_the_original_ran(
    running_gateway: RunningGateway, peers: dict[str, Peer]
) -> None:
    # A phone on a slow link: the user edits before the first answer is back.
    gw, olive = running_gateway, peers["olive"]
    olive.drain()
    mid = send(olive, gw.jid, "set sim.speed 40")
    send(olive, gw.jid, "set sim.speed 60", replace(mid))
    first, second = await olive.reply_from(gw.jid), await olive.reply_from(gw.jid)
    assert re.fullmatch(r"sim\.speed: \d+ → 40", first), first
    assert f"`set sim.speed 40`, already ran ({first})" in second, second
    assert gw.gateway.hub.field("sim.speed").latest.value == 40
