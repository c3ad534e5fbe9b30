"""The gateway on a real Prosody: contacts read and set, roles hold, strangers get nothing."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.commands import Commands
from gateway.xmpp.session import STRANGER_REPLY, Session
from tests.conftest import RunningGateway, XmppServer, gateway_config
from tests.peer import Peer


async def test_admin_reads_and_sets_over_xmpp(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    alice, gw = peers["alice"], running_gateway
    reply = await alice.ask(gw.jid, "read sim.temp")
    assert re.fullmatch(r"sim\.temp = -?\d+\.\d °C \(\d+ s ago\)", reply), reply

    reply = await alice.ask(gw.jid, "set sim.relay on")
    assert reply == "sim.relay: off → on"
    relay = gw.gateway.hub.field("sim.relay")
    assert relay.latest is not None and relay.latest.value is True
    assert await alice.ask(gw.jid, "read sim.relay") == "sim.relay = on (0 s ago)"
    entry = gw.gateway.hub.audit.entries[-1]
    assert (entry.actor.jid, entry.actor.via, entry.ref, entry.old, entry.new, entry.outcome) == (
        "alice@localhost", "chat", "sim.relay", False, True, "applied"
    )


async def test_viewer_cannot_set(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    victor, gw = peers["victor"], running_gateway
    reply = await victor.ask(gw.jid, "set sim.relay on")
    assert reply == "Refused: set needs the operator role, you are viewer."
    assert gw.gateway.hub.field("sim.relay").latest.value is False
    entry = gw.gateway.hub.audit.entries[-1]
    assert (entry.actor.jid, entry.outcome) == ("victor@localhost", "refused")
    # Reading is still fine for a viewer.
    assert (await victor.ask(gw.jid, "read sim.relay")).startswith("sim.relay = off")


async def test_operator_set_is_checked_against_bounds(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    olive, gw = peers["olive"], running_gateway
    reply = await olive.ask(gw.jid, "set sim.speed 150")
    assert reply == "Error: sim.speed 150 is above the maximum 100."
    assert gw.gateway.hub.field("sim.speed").latest.value == 0
    reply = await olive.ask(gw.jid, "set sim.speed fast")
    assert reply == "Error: sim.speed expects a whole number, got 'fast'."
    assert await olive.ask(gw.jid, "set sim.speed 40") == "sim.speed: 0 → 40"
    assert gw.gateway.hub.field("sim.speed").latest.value == 40


async def test_stranger_gets_no_data_and_no_subscription(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    mallory, gw = peers["mallory"], running_gateway
    assert await mallory.ask(gw.jid, "read sim.temp") == STRANGER_REPLY
    # Only one refusal: a second attempt is met with silence.
    mallory.client.send_message(mto=gw.jid, mbody="read", mtype="chat")
    with pytest.raises(TimeoutError):
        await mallory.reply_from(gw.jid, timeout=1.5)

    mallory.client.send_presence_subscription(pto=gw.jid)
    refused = await mallory.presence_from(gw.jid, lambda p: p["type"] == "unsubscribed")
    assert refused["type"] == "unsubscribed"
    await asyncio.sleep(0.5)
    assert not any(p["from"].bare == gw.jid and p["type"] == "available" for p in mallory.presences)
    assert gw.jid not in [str(j) for j in mallory.client.client_roster if mallory.client.client_roster[j]["to"]]


async def test_contact_sees_health_in_presence(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    alice, gw = peers["alice"], running_gateway
    alice.client.send_presence_subscription(pto=gw.jid)
    pres = await alice.presence_from(gw.jid, lambda p: p["type"] == "available")
    assert pres["status"] == "Test GW: 1/1 devices OK"
    assert pres["show"] == ""

    from gateway.hub import Health

    gw.gateway.hub.set_health("sim", Health.OFFLINE, "unplugged")
    pres = await alice.presence_from(gw.jid, lambda p: p["show"] == "xa")
    assert pres["status"] == "Test GW: 0/1 OK · sim: offline: unplugged"


async def test_unknown_command_and_errors_get_clear_replies(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    alice, gw = peers["alice"], running_gateway
    assert await alice.ask(gw.jid, "reboot now") == "Unknown command 'reboot'. Type help for the list of commands."
    assert await alice.ask(gw.jid, "read nope.temp") == "Error: no device 'nope'; devices: sim."
    assert await alice.ask(gw.jid, "set sim.temp 3") == "Error: sim.temp is read-only."
    assert "\nset device.field value — " in await alice.ask(gw.jid, "help")


async def test_command_sent_while_offline_is_not_executed(
    xmpp_server: XmppServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.xmpp.session

    # Commands delayed by less than MAX_COMMAND_AGE (a resumed network drop) still run.
    monkeypatch.setattr(gateway.xmpp.session, "MAX_COMMAND_AGE", 0.3)
    alice = await xmpp_server.peer("alice").start()
    gw_jid = xmpp_server.jid("gateway")
    try:
        # The gateway is offline: the server stores the message for later.
        alice.client.send_message(mto=gw_jid, mbody="set sim.relay on", mtype="chat")
        await asyncio.sleep(1.0)
        config = gateway_config(xmpp_server, tmp_path)
        gw = Gateway(config)
        await gw.start()
        session = Session(config, gw.hub, Commands(gw.hub), xmpp_server.passwords["gateway"])
        session.connect()
        try:
            reply = await alice.reply_from(gw_jid)
            assert reply == "Ignored a command sent while the gateway was offline; send it again."
            assert gw.hub.field("sim.relay").latest.value is False
        finally:
            await session.stop()
            await gw.stop()
    finally:
        await alice.stop()


async def test_a_stopped_session_leaves_nothing_on_the_hub(xmpp_server: XmppServer, tmp_path: Path) -> None:
    """The session and its front-ends (XEP-0323, XEP-0325, rooms, ...) unsubscribe from the hub
    when stopped, so a session rebuilt on the same gateway does not leave the old one listening."""
    config = gateway_config(xmpp_server, tmp_path)
    gw = Gateway(config)
    await gw.start()
    try:
        alone = gw.hub.listeners()
        for _ in range(2):  # a first session, then a rebuilt one
            session = Session(config, gw.hub, gw.commands, xmpp_server.passwords["gateway"], (gw.watches, gw.reverts))
            session.connect()
            await asyncio.wait_for(session.online.wait(), 10)
            assert gw.hub.listeners() > alone
            await session.stop()
            assert gw.hub.listeners() == alone
    finally:
        await gw.stop()
