"""The gateway's contacts on another server: everything through s2s between two real Prosody servers
(tests/conftest.py `federated`), and what happens to alerts while the contact's server is down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.xmpp import STRANGER_REPLY
from tests.conftest import Federated, RunningGateway, start_gateway
from tests.helpers import until
from tests.peer import Peer

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
    finally:
        await victor.stop()
        await mallory.stop()
    assert fed_gateway.session.bounces.unreachable == {}


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
        texts = []
        for value in (31, 29, 32):
            await asyncio.sleep(0.2)  # past the watch's interval
            gw.gateway.hub.push("sim", "temp", value)
            texts.append(await hana.reply_from(gw.jid))
        assert [t.split(" ")[0] for t in texts] == ["ALERT", "CLEARED", "ALERT"]
        alice_jid = federated.provider.jid("alice")
        bounces = gw.session.bounces
        await until(lambda: alice_jid in bounces.unreachable and len(bounces.unreachable[alice_jid].held) == 3,
                    "the three alerts to alice to bounce", timeout=15)
        status = await hana.ask(gw.jid, "status")
        assert f"cannot reach {alice_jid} since" in status
        assert "remote-server-not-found; 3 held" in status
    finally:
        provider.start()
    try:
        alice = await federated.provider.peer("alice").start()  # her presence tells the gateway she is back
        note = await alice.message_from(gw.jid, timeout=15)
        assert note["body"].startswith("Delayed: your server could not be reached from here since")
        assert "3 alerts follow" in note["body"]
        late = [await alice.message_from(gw.jid) for _ in texts]
        assert [m["body"] for m in late] == texts  # in order, the same words as hana's
        stamps = [m["delay"]["stamp"] for m in late]
        assert all(s is not None for s in stamps) and stamps == sorted(stamps)
        assert bounces.unreachable == {}
        assert "cannot reach" not in await hana.ask(gw.jid, "status")
    finally:
        await hana.stop()
        await alice.stop()
