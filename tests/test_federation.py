"""The gateway's contacts on another server: everything through s2s between two real Prosody servers
(tests/conftest.py `federated`), and what happens to alerts while the contact's server is down."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from slixmpp import Message
from slixmpp.exceptions import IqError

from gateway.xmpp import bounces as bounces_module
from gateway.demo.localservers import Mosquitto, Prosody
from gateway.watches import Alert
from gateway.xmpp import session as xmpp_module
from gateway.xmpp.session import STRANGER_REPLY
from tests import test_phone as phone
from tests.conftest import ROGUE, Federated, RunningGateway, XmppServer, gateway_config, start_gateway
from tests.helpers import until
from tests.peer import Peer
from tests.test_adhoc import execute, step
from tests.test_fleet import ask, said
from tests.xep_helpers import SD, Inbox, by_name, child, iq, values

COMMANDS = "http://jabber.org/protocol/commands"
SIM = [{
    "id": "sim", "driver": "simulated", "interval": 3600,
    "fields": [
        {"name": "temp", "unit": "°C", "noise": 0, "amplitude": 0, "base": 20},
        {"name": "relay", "type": "boolean", "writable": True},
    ],
}]


@pytest.fixture
async def fed_gateway(federated: Federated, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    """The gateway on home.example, with contacts there and on provider.example."""
    running = await start_gateway(federated.config(tmp_path, devices=SIM), federated.home.passwords["gateway"])
    yield running
    await running.stop()


async def subscribed(peer: Peer, gateway: RunningGateway) -> None:
    """Wait until the gateway is subscribed to `peer`'s presence (the subscription went through s2s)."""
    roster = gateway.session.client.client_roster
    await until(lambda: bool(roster[peer.jid]["to"]), f"the gateway's subscription to {peer.jid}", timeout=15)


async def fire(gw: RunningGateway, hana: Peer, temps: tuple[float, ...] = (31, 29, 32)) -> list[str]:
    """Push each of `temps` to sim.temp past the watch's interval; the alert texts hana (an admin
    on the gateway's server who gets every alert) received, in order."""
    texts = []
    for value in temps:
        await asyncio.sleep(0.2)  # past the watch's interval
        gw.gateway.hub.push("sim", "temp", value)
        texts.append(await hana.reply_from(gw.jid))
    return texts


async def came_late_in_order(peer: Peer, gw: RunningGateway, texts: list[str]) -> None:
    """`peer` gets the alerts `texts` from the gateway, in that order, each stamped (XEP-0203) in order."""
    late = [await peer.message_from(gw.jid, match=lambda b: b.split(" ")[0] in ("ALERT", "CLEARED"))
            for _ in texts]
    assert [m["body"] for m in late] == texts  # in order, the same words as hana's
    stamps = [m["delay"]["stamp"] for m in late]
    assert all(s is not None for s in stamps) and stamps == sorted(stamps)


async def test_chat_by_role_across_servers(federated: Federated, fed_gateway: RunningGateway,
                                           remote_contact: Peer) -> None:
    alice = remote_contact
    await subscribed(alice, fed_gateway)
    assert (await alice.ask(fed_gateway.jid, "read sim.temp")).startswith("sim.temp = 20")
    assert (await alice.ask(fed_gateway.jid, "set sim.relay on")).startswith("sim.relay")
    victor = await federated.provider.peer("victor").start()
    mallory = await federated.provider.peer("mallory").start()
    try:
        assert (await victor.ask(fed_gateway.jid, "set sim.relay off")).startswith("Refused:")
        assert await mallory.ask(fed_gateway.jid, "read") == STRANGER_REPLY
        mallory.client.send_presence(pto=fed_gateway.jid, ptype="subscribe")
        await mallory.presence_from(fed_gateway.jid, lambda p: p["type"] == "unsubscribed")
    finally:
        await victor.stop()
        await mallory.stop()
    assert fed_gateway.session.bounces.unreachable == {}


async def test_readout_adhoc_and_receipts_across_servers(fed_gateway: RunningGateway, remote_contact: Peer) -> None:
    """XEP-0323 read-out, an ad-hoc `set` on the gateway's full JID, XEP-0184/0333 for a chat command:
    the same answers through s2s as on one server."""
    gw, alice = fed_gateway, remote_contact
    await subscribed(alice, gw)
    full = gw.session.client.boundjid.full
    inbox = Inbox(alice)
    answer = await iq(alice, full, f"<req xmlns='{SD}' seqnr='7' momentary='true'><node nodeId='sim'/></req>")
    assert child(answer, SD, "accepted").attrib == {"seqnr": "7"}
    got = by_name(values(await inbox.readout(7)))
    assert (got["temp"].value, got["temp"].attrs["unit"]) == ("20.0", "°C")

    # Asked of the bare JID, the gateway's server answers, not the gateway (docs/federation.md).
    with pytest.raises(IqError) as bare:
        await alice.client.plugin["xep_0030"].get_items(jid=gw.jid, node=COMMANDS, timeout=10)
    assert bare.value.iq["error"]["condition"] == "service-unavailable"
    first = await execute(alice, gw, "set")
    done = await step(alice, gw, first["command"]["sessionid"], {"sim.relay": "1"})
    assert done["command"]["status"] == "completed"
    assert gw.gateway.hub.field("sim.relay").latest.value is True

    chat = phone.Inbox(alice, gw.jid)
    mid, reply = await phone.ask(alice, gw.jid, "read sim.relay", phone.REQUEST, phone.MARKABLE)
    assert reply.startswith("sim.relay = on")
    assert chat.ids(phone.RECEIPTS, "received") == [mid]
    assert chat.ids(phone.MARKERS, "displayed") == [mid]


async def test_alerts_bounced_by_a_down_server_come_late_in_order_and_stamped(
    federated: Federated, fed_gateway: RunningGateway, remote_contact: Peer
) -> None:
    """The issue's case: the owner's server is down while a watch fires, clears and fires again."""
    gw, alice = fed_gateway, remote_contact
    await subscribed(alice, gw)
    reply = await alice.ask(gw.jid, "watch sim.temp > 30 interval 0.1s")
    assert reply.startswith("Watch #1 set")
    hana = await federated.home.peer("hana").start()  # on the gateway's own server: not affected
    provider = federated.provider.prosody
    try:
        await alice.stop()
        provider.stop()
        texts = await fire(gw, hana)
        assert [t.split(" ")[0] for t in texts] == ["ALERT", "CLEARED", "ALERT"]
        alice_jid = federated.provider.jid("alice")
        bounces = gw.session.bounces
        await until(lambda: alice_jid in bounces.unreachable and len(bounces.unreachable[alice_jid].held) == 3,
                    "the three alerts to alice to bounce", timeout=15)
        status = await hana.ask(gw.jid, "status")
        assert f"cannot reach {alice_jid} since" in status
        assert "remote-server-not-found (Server-to-server connection failed: connection refused); 3 held" in status
    finally:
        provider.start()
    try:
        alice = await federated.provider.peer("alice").start()  # her presence tells the gateway she is back
        note = await alice.message_from(gw.jid, timeout=15)
        assert note["body"].startswith("Delayed: your server could not be reached from here since")
        assert "3 alerts follow" in note["body"]
        await came_late_in_order(alice, gw, texts)
        assert bounces.unreachable == {}
        assert "cannot reach" not in await hana.ask(gw.jid, "status")
    finally:
        await hana.stop()
        await alice.stop()


async def test_alerts_to_a_server_back_while_the_contact_is_offline_go_to_its_offline_store(
    federated: Federated, fed_gateway: RunningGateway, remote_contact: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No presence tells the gateway the server is back (alice stays offline): a ping to her server does."""
    monkeypatch.setattr(bounces_module, "PROBE_EVERY", 0.5)
    gw, alice = fed_gateway, remote_contact
    await subscribed(alice, gw)
    assert (await alice.ask(gw.jid, "watch sim.temp > 30 interval 0.1s")).startswith("Watch #1 set")
    alice_jid, bounces = alice.jid, gw.session.bounces
    provider = federated.provider.prosody
    try:
        await alice.stop()
        provider.stop()
        gw.gateway.hub.push("sim", "temp", 31)
        await until(lambda: alice_jid in bounces.unreachable and len(bounces.unreachable[alice_jid].held) == 1,
                    "the alert to alice to bounce", timeout=15)
    finally:
        provider.start()
    await until(lambda: alice_jid not in bounces.unreachable, "a ping to find her server back", timeout=15)
    alice = await federated.provider.peer("alice").start()  # her server kept what came while she was away
    try:
        note = await alice.message_from(gw.jid)
        assert "1 alert follows, each stamped" in note["body"]
        assert (await alice.reply_from(gw.jid)).startswith("ALERT #1 sim.temp > 30")
    finally:
        await alice.stop()


async def test_a_contact_who_blocked_the_gateway_is_not_retried(
    federated: Federated, fed_gateway: RunningGateway
) -> None:
    """`service-unavailable` from a blocking contact's server will not heal: nothing held, no probe, told in status."""
    gw = fed_gateway
    victor = await federated.provider.peer("victor").start()
    hana = await federated.home.peer("hana").start()
    blocking = f"<block xmlns='urn:xmpp:blocking'><item jid='{gw.jid}'/></block>"
    try:
        await subscribed(victor, gw)
        assert (await victor.ask(gw.jid, "watch sim.temp > 30 interval 0.1s")).startswith("Watch #1 set")
        assert (await iq(victor, victor.jid, blocking, "set"))["type"] == "result"
        bounces = gw.session.bounces
        await fire(gw, hana, (31, 29))
        await until(lambda: victor.jid in bounces.unreachable and bounces.unreachable[victor.jid].dropped == 2,
                    "both alerts to victor to bounce", timeout=15)
        assert bounces.unreachable[victor.jid].held == [] and not bounces.holding(victor.jid)
        status = await hana.ask(gw.jid, "status")
        assert f"cannot reach {victor.jid} since" in status
        assert "service-unavailable; not retried, 2 dropped" in status
    finally:
        await iq(victor, victor.jid, blocking.replace("<block", "<unblock").replace("</block>", "</unblock>"), "set")
        await victor.stop()
        await hana.stop()


async def test_a_server_with_a_wrong_certificate_is_refused_and_named_once(
    federated: Federated, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """rogue.example's certificate is from a CA nobody trusts: with s2s_secure_auth the gateway's
    server refuses the link, and the gateway says once (log, status) which contact it cannot reach."""
    rogue = Prosody(federated.root / ROGUE, domain=ROGUE, uploads=False, federation=federated.federation, own_ca=True)
    bob = rogue.register("bob", secrets.token_urlsafe(12))
    rogue.start()
    contacts = [*federated.contacts(), {"jid": bob, "role": "viewer", "alerts": "all"}]
    gw = await start_gateway(federated.config(tmp_path, devices=SIM, contacts=contacts),
                             federated.home.passwords["gateway"])
    hana = await federated.home.peer("hana").start()
    try:
        assert (await hana.ask(gw.jid, "watch sim.temp > 30 interval 0.1s")).startswith("Watch #1 set")
        bounces = gw.session.bounces
        await fire(gw, hana, (31, 29))
        await until(lambda: bob in bounces.unreachable and len(bounces.unreachable[bob].held) == 2,
                    "both alerts to bob to bounce", timeout=15)
        status = await hana.ask(gw.jid, "status")
        assert f"cannot reach {bob} since" in status
        assert "certificate is not trusted); 2 held" in status
        said = [r for r in caplog.records if r.name == "iot_gateway.bounces" and bob in r.getMessage()]
        assert len(said) == 1 and said[0].levelname == "WARNING"
    finally:
        await hana.stop()
        await gw.stop()
        rogue.stop()


async def test_a_command_delivered_late_through_s2s_is_not_run(
    federated: Federated, remote_contact: Peer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice's `set` reaches the gateway's server while the gateway is away: stored there, delivered
    late and stamped when it comes back. Older than the limit: not run, and she is told (through s2s)."""
    monkeypatch.setattr(xmpp_module, "MAX_COMMAND_AGE", 1.0)
    config = federated.config(tmp_path, devices=SIM)
    password = federated.home.passwords["gateway"]
    gw = await start_gateway(config, password)
    alice = remote_contact
    await subscribed(alice, gw)
    await gw.stop()
    alice.client.send_message(mto=gw.jid, mbody="set sim.relay on", mtype="chat")
    await asyncio.sleep(1.5)  # older than the (shortened) limit by the time the gateway is back
    gw = await start_gateway(config, password)
    try:
        answer = await alice.reply_from(gw.jid, timeout=15)
        assert answer == "Ignored a command sent while the gateway was offline; send it again."
        assert gw.gateway.hub.field("sim.relay").latest.value is not True
    finally:
        await gw.stop()


async def test_an_answer_bounced_while_a_set_waited_for_its_device_comes_late(
    federated: Federated, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Not only alerts: the answer to alice's `set` (it waited for an MQTT device that never
    confirmed) bounces as her server is down, and reaches her once she is back."""
    plug = {"id": "plug", "driver": "mqtt", "confirm_timeout": 2, "fields": [
        {"name": "relay", "type": "boolean", "writable": True,
         "topic": "fed/plug/state", "command_topic": "fed/plug/set"}]}
    config = federated.config(tmp_path, devices=[*SIM, plug], mqtt={"url": mosquitto.url, "client_id": "fed-bounce"})
    gw = await start_gateway(config, federated.home.passwords["gateway"])
    alice = await federated.provider.peer("alice").start()
    provider = federated.provider.prosody
    try:
        await subscribed(alice, gw)
        await until(lambda: gw.gateway.hub.nodes["plug"].health.healthy, "the plug's broker connection")
        alice.client.send_message(mto=gw.jid, mbody="set plug.relay on", mtype="chat")
        assert (await alice.reply_from(gw.jid)).endswith("sent, waiting for the device…")
        await alice.stop()
        provider.stop()
        bounces = gw.session.bounces
        await until(lambda: alice.jid in bounces.unreachable and len(bounces.unreachable[alice.jid].held) == 1,
                    "the answer to bounce", timeout=15)
        answer = bounces.unreachable[alice.jid].held[0].text
    finally:
        provider.start()
    alice = await federated.provider.peer("alice").start()
    try:
        note = await alice.reply_from(gw.jid, timeout=15)
        assert "1 message follows, each stamped" in note
        assert await alice.reply_from(gw.jid) == answer
        assert "not confirmed" in answer
    finally:
        await alice.stop()
        await gw.stop()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # slixmpp-omemo 2.2 on slixmpp 1.17
async def test_omemo_across_servers_and_an_encrypted_alert_that_bounced(
    federated: Federated, tmp_path: Path
) -> None:
    """OMEMO with a contact on another server (device lists over PEP through s2s): an encrypted
    command is answered encrypted; an alert encrypted for her that bounced comes late, encrypted."""
    from tests.test_omemo import Omemo, befriend, omemo_ready

    # alice an operator here: admins are also told of her new OMEMO device, an alert that could
    # still be on its way (and bounce) when her server stops.
    contacts = [{**c, "role": "operator"} if c["jid"].startswith("alice@") else c for c in federated.contacts()]
    config = federated.config(tmp_path, devices=SIM, xmpp={"omemo": "accept"}, contacts=contacts)
    gw = await start_gateway(config, federated.home.passwords["gateway"])
    alice = await Omemo(federated.provider, "alice").start()
    provider = federated.provider.prosody
    try:
        await omemo_ready(gw)  # its device list and bundles are on its server: alice can fetch them
        # Presence subscriptions both ways, whatever earlier tests left (PEP sends device lists to
        # subscribers): the gateway asks her when it starts, if it is not subscribed yet, and her
        # client approves; she asks it here (a contact: approved). Both must be done, on both sides.
        alice.client.send_presence(pto=gw.jid, ptype="subscribe")
        await befriend(gw, alice)
        await until(lambda: alice.client.client_roster[gw.jid]["subscription"] == "both",
                    "alice's roster: the gateway subscribed both ways", timeout=15)
        # Her client fetches the gateway's device list if no PEP notification brought it yet (Omemo.send).
        kind, body = await alice.ask(gw.jid, "read sim.temp")
        assert (kind, body.split(" (")[0]) == ("encrypted", "sim.temp = 20 °C")
        provider.stop()
        gw.session.deliver(Alert("tank low", time.time(), (alice.jid,)))
        bounces = gw.session.bounces
        await until(lambda: alice.jid in bounces.unreachable and len(bounces.unreachable[alice.jid].held) == 1,
                    "the encrypted alert to bounce", timeout=15)
    finally:
        provider.start()
    # The note's look-up of her devices is the slower one (as it was once under load): the alert
    # behind it must still wait its turn.
    manager = await gw.session.omemo.manager()
    lookup = manager.get_device_information

    async def slow_first(bare: str) -> object:
        if not slowed:
            slowed.append(bare)
            await asyncio.sleep(0.5)
        return await lookup(bare)

    slowed: list[str] = []
    manager.get_device_information = slow_first
    try:
        alice.drain()
        alice.client.connect(*alice.address)  # the same phone (device) logs in again
        assert (await alice.next())[1].startswith("Delayed: your server could not be reached")
        assert await alice.next() == ("encrypted", "tank low")
    finally:
        await alice.stop()
        await gw.stop()


async def test_a_room_on_a_third_server_with_members_from_all_three(
    federated: Federated, rooms_server: XmppServer, tmp_path: Path
) -> None:
    """The gateway (home.example) creates a private room on rooms.example; hana (home), alice
    (provider) and rob (rooms.example) are its members; rob's `gw: read` is answered to all."""
    rob_jid = rooms_server.jid("rob")
    room = f"team-{secrets.token_hex(4)}@{rooms_server.prosody.muc}"
    contacts = [*federated.contacts(), {"jid": rob_jid, "role": "viewer"}]
    config = federated.config(tmp_path, devices=SIM, contacts=contacts, xmpp={"rooms": [room]})
    gw = await start_gateway(config, federated.home.passwords["gateway"])
    peers = [await federated.home.peer("hana").start(), await federated.provider.peer("alice").start(),
             await rooms_server.peer("rob").start()]
    hana, alice, rob = peers
    try:
        await until(lambda: room in gw.session.rooms.joined, f"the gateway in {room}", timeout=20)
        assert room in gw.session.rooms.private
        for peer in peers:
            await peer.join(room, peer.jid.split("@")[0])
        rob.client.send_message(mto=room, mbody="gw: read sim.relay", mtype="groupchat")
        for peer in peers:
            assert (await peer.room_said(room, "gw")).startswith("rob: sim.relay = off")
    finally:
        for peer in peers:
            await peer.stop()
        await gw.stop()


async def test_a_fleet_across_servers_answers_all_status_once_each(
    federated: Federated, rooms_server: XmppServer, tmp_path: Path
) -> None:
    """Two gateways on two servers, their team room on a third: `all: status` from alice (on the
    provider) is answered once by each, in nick order."""
    room = f"fleet-{secrets.token_hex(4)}@{rooms_server.prosody.muc}"
    fleet = {"rooms": [room], "peers": [federated.home.jid("gateway"), federated.provider.jid("gateway")]}
    sites = []
    for server, name in ((federated.home, "Greenhouse"), (federated.provider, "Boiler room")):
        state = tmp_path / name.split()[0] / "state"
        config = gateway_config(server, tmp_path, devices=SIM, xmpp=fleet, contacts=federated.contacts(),
                                gateway={"name": name, "state_dir": str(state), "health_debounce": 0})
        sites.append(await start_gateway(config, server.passwords["gateway"]))
        if not sites[1:]:  # the first creates the room and makes the other a member
            await until(lambda: room in sites[0].session.rooms.private, f"{room} created", timeout=20)
    alice = await federated.provider.peer("alice").start()
    try:
        await until(lambda: all(room in s.session.rooms.joined for s in sites), "both gateways in the room", 20)
        await alice.join(room, "alice")
        await said(alice, room, 0.5)  # what was said before alice asks
        assert await ask(alice, room, "all: status") == [
            ("boiler-room", "alice: Boiler room: 1/1 devices OK"),
            ("greenhouse", "alice: Greenhouse: 1/1 devices OK"),
        ]
    finally:
        await alice.stop()
        for site in sites:
            await site.stop()


async def test_an_error_counts_only_for_the_contact_its_message_went_to() -> None:
    """Errors are input from outside: one for an id we never sent, or from another JID than the
    message went to, holds nothing and marks nobody; a final one after transient ones counts
    what was held as dropped."""
    resent: list[str] = []
    b = bounces_module.Bounces(lambda s: resent.append(s.text), lambda j, t: resent.append(t), _never, lambda: True)
    b.sent("m1", "alice@provider.example", "ALERT #1", 1.0, alert=True)
    b.bounced("mallory@provider.example", "m1", "remote-server-not-found", "cancel")
    b.bounced("alice@provider.example", "no-such-id", "remote-server-not-found", "cancel")
    assert b.unreachable == {}
    b.bounced("Alice@provider.example", "m1", "remote-server-not-found", "cancel", "x" * 500)
    u = b.unreachable["alice@provider.example"]
    assert [s.text for s in u.held] == ["ALERT #1"] and len(u.cause) < 200
    b.sent("m2", "alice@provider.example", "ALERT #2", 2.0, alert=True)
    b.bounced("alice@provider.example", "m2", "forbidden", "auth")
    u = b.unreachable["alice@provider.example"]
    assert (u.final, u.held, u.dropped) == (True, [], 2)
    b.stop()


async def _never(domain: str) -> bool:
    return False


async def test_an_error_from_one_of_the_contacts_clients_holds_nothing() -> None:
    """A hibernated XEP-0198 session that expires bounces what it held (`recipient-unavailable`,
    from the full JID): the contact's account still takes messages, so nothing is held."""
    b = bounces_module.Bounces(lambda s: None, lambda j, t: None, _never, lambda: True)
    b.sent("m1", "olive@home.example", "ALERT #1", 1.0, alert=True)
    b.bounced("olive@home.example/phone", "m1", "recipient-unavailable", "wait")
    assert b.unreachable == {} and not b.holding("olive@home.example")
    b.sent("m2", "olive@home.example", "ALERT #2", 2.0, alert=True)
    b.bounced("olive@home.example/phone", "m2", "remote-server-not-found", "cancel")  # her server: counts
    assert b.holding("olive@home.example")
    b.stop()


async def test_an_expired_session_bouncing_from_the_bare_jid_holds_nothing_while_the_contact_is_online() -> None:
    """Prosody bounces what an expired hibernated session held as an error reply to the message,
    so one sent to the bare JID comes back from the bare JID (`recipient-unavailable`). While a
    client of hers is online (and got the message too), nothing is held; with none, it is."""
    online = {"olive@home.example"}
    b = bounces_module.Bounces(lambda s: None, lambda j, t: None, _never, lambda: True, lambda jid: jid in online)
    b.sent("m1", "olive@home.example", "ALERT #1", 1.0, alert=True)
    b.bounced("olive@home.example", "m1", "recipient-unavailable", "cancel")
    assert b.unreachable == {} and not b.holding("olive@home.example")
    online.clear()
    b.sent("m2", "olive@home.example", "ALERT #2", 2.0, alert=True)
    b.bounced("olive@home.example", "m2", "recipient-unavailable", "cancel")
    assert b.holding("olive@home.example")
    b.stop()


async def test_a_remote_server_that_floods_is_held_to_a_budget_per_domain(
    federated: Federated, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Contacts on provider.example may send 2 commands each per window, 3 all together; its
    strangers get at most 3 refusal lines a window, however many JIDs it has. hana, on the
    gateway's own server, is still answered; alice is answered again once the window has passed."""
    window = 6.0
    gateway = {"name": "Test GW", "state_dir": str(tmp_path / "state"), "health_debounce": 0,
               "rate_limit": 2, "domain_rate_limit": 3, "rate_window": window}
    provider = federated.provider
    strangers = [provider.prosody.register(f"flood{i}", provider.passwords["mallory"]) for i in range(4)]
    gw = await start_gateway(federated.config(tmp_path, devices=SIM, gateway=gateway),
                             federated.home.passwords["gateway"])
    refused: list[str] = []

    def count_refusals(stanza: object) -> object:
        if isinstance(stanza, Message) and stanza["body"] == STRANGER_REPLY:
            refused.append(stanza["to"].bare)
        return stanza

    gw.session.client.add_filter("out", count_refusals)
    peers = [await provider.peer(u).start() for u in ("alice", "victor", "mallory")]
    alice, victor, mallory = peers
    for jid in strangers:
        peer = Peer(jid, provider.passwords["mallory"], provider.prosody.address, provider.prosody.ca_file)
        peers.append(await peer.start())
    hana = await federated.home.peer("hana").start()
    try:
        await subscribed(alice, gw)
        for peer in (alice, alice, victor):  # 3 commands from provider.example: its whole budget
            assert (await peer.ask(gw.jid, "read sim.temp")).startswith("sim.temp = 20")
        assert (await victor.ask(gw.jid, "read sim.temp")).startswith(
            "Slow down: the accounts on provider.example together sent more than 3 commands in 6 s.")
        assert (await hana.ask(gw.jid, "read sim.temp")).startswith("sim.temp = 20")  # the own server: no such budget
        for stranger in [mallory, *peers[3:]]:  # 5 strangers, at once
            stranger.client.send_message(mto=gw.jid, mbody="read", mtype="chat")
        await asyncio.sleep(window)  # the window passes; alice's server sends her next command after the strangers'
        assert (await alice.ask(gw.jid, "read sim.temp")).startswith("sim.temp = 20")
        assert len(refused) == 3 and len(set(refused)) == 3
        floods = [r for r in caplog.records if r.name == "iot_gateway.floods"]
        assert [r.getMessage() for r in floods] == [
            "strangers from provider.example: more than 3 in 6 s; ignoring them unanswered until it passes"]
    finally:
        for peer in [*peers, hana]:
            await peer.stop()
        await gw.stop()


@contextlib.contextmanager
def stalled(prosody: Prosody) -> Iterator[None]:
    """The server frozen (SIGSTOP): its sockets stay open, nothing is read or answered; SIGCONT after."""
    assert prosody.proc is not None
    os.kill(prosody.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(prosody.proc.pid, signal.SIGCONT)


async def test_alerts_sent_while_the_contacts_server_stalls_arrive_in_order_and_stamped(
    federated: Federated, fed_gateway: RunningGateway, remote_contact: Peer
) -> None:
    """provider.example freezes with the s2s link up: the gateway's server writes the alerts into the
    link (the kernel buffers them), nothing bounces; hana on the gateway's own server is answered
    meanwhile; once the server wakes, alice gets the three alerts in order, each stamped."""
    gw, alice = fed_gateway, remote_contact
    await subscribed(alice, gw)
    assert (await alice.ask(gw.jid, "watch sim.temp > 30 interval 0.1s")).startswith("Watch #1 set")
    hana = await federated.home.peer("hana").start()
    try:
        with stalled(federated.provider.prosody):
            texts = await fire(gw, hana)
            assert [t.split(" ")[0] for t in texts] == ["ALERT", "CLEARED", "ALERT"]
            assert (await hana.ask(gw.jid, "read sim.temp")).startswith("sim.temp = 32")
            assert "cannot reach" not in await hana.ask(gw.jid, "status")
        await came_late_in_order(alice, gw, texts)
        assert gw.session.bounces.unreachable == {}
    finally:
        await hana.stop()


async def test_alerts_to_a_server_that_stalls_before_the_link_is_up_bounce_and_come_late(
    federated: Federated, fed_gateway: RunningGateway, remote_contact: Peer
) -> None:
    """provider.example restarts and freezes at once: the gateway's server opens a new s2s link, the
    kernel takes the connection, nothing answers. After `s2s_timeout` (S2S_TIMEOUT in localservers)
    the alerts bounce and are held; hana is answered meanwhile; once the server wakes and alice
    logs in, she gets the note and the alerts, in order, stamped."""
    gw, alice = fed_gateway, remote_contact
    await subscribed(alice, gw)
    assert (await alice.ask(gw.jid, "watch sim.temp > 30 interval 0.1s")).startswith("Watch #1 set")
    await alice.stop()
    hana = await federated.home.peer("hana").start()
    provider, bounces = federated.provider.prosody, gw.session.bounces
    try:
        provider.stop()  # the gateway's server's link to it closes
        provider.start()
        with stalled(provider):
            texts = await fire(gw, hana)
            await until(lambda: alice.jid in bounces.unreachable and len(bounces.unreachable[alice.jid].held) == 3,
                        "the three alerts to alice to bounce", timeout=25)  # s2s_timeout is 10 s
            status = await hana.ask(gw.jid, "status")
            assert f"cannot reach {alice.jid} since" in status
            assert "(Server-to-server connection failed: connection-timeout); 3 held" in status
        alice = await federated.provider.peer("alice").start()  # her presence says she is back
        note = await alice.reply_matching(gw.jid, "Delayed: your server could not be reached", timeout=15)
        assert "3 alerts follow, each stamped" in note
        await came_late_in_order(alice, gw, texts)
    finally:
        await hana.stop()
        await alice.stop()
