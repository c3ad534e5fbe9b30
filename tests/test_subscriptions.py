"""Presence subscriptions as real clients make them, through the real Prosody, on fresh accounts
(a gateway and a contact of their own, so no earlier test's roster counts): whichever side asks
first, and whatever the client does with the gateway's request, a contact ends up seeing the
gateway online with its health text, and the gateway subscribed to the contact. A stranger gets
neither the gateway's presence nor a request from it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import RunningGateway, XmppServer, gateway_config, start_gateway
from tests.helpers import until
from tests.peer import Peer

HEALTH = "Test GW: 1/1 devices OK"
WAIT = 15.0  # seconds for a subscription step through Prosody on a loaded machine


def _fresh(server: XmppServer, name: str) -> tuple[str, str]:
    """A new account on the suite's Prosody: (JID, password)."""
    password = secrets.token_urlsafe(12)
    return server.prosody.register(f"{name}-{secrets.token_hex(4)}", password), password


class Accounts:
    """A fresh gateway account and a fresh contact (admin) of it, plus a fresh stranger."""

    def __init__(self, server: XmppServer):
        self.server = server
        self.gateway, self.gateway_password = _fresh(server, "gw")
        self.contact, self.contact_password = _fresh(server, "wendy")
        self.stranger, self.stranger_password = _fresh(server, "eve")

    def peer(self, jid: str, password: str) -> Peer:
        return Peer(jid, password, self.server.prosody.address, self.server.prosody.ca_file, gateway=self.gateway)

    async def start_gateway(self, tmp_path: Path) -> RunningGateway:
        xmpp = {"jid": self.gateway, "password": self.gateway_password}
        config = gateway_config(self.server, tmp_path, xmpp=xmpp, contacts=[{"jid": self.contact, "role": "admin"}])
        return await start_gateway(config, self.gateway_password)


@pytest.fixture
async def accounts(xmpp_server: XmppServer) -> AsyncIterator[Accounts]:
    yield Accounts(xmpp_server)


def online(gateway: str):
    """A presence of the gateway that says it is online, with its health."""
    return lambda p: p["from"].bare == gateway and p["type"] in ("available", "away", "xa", "dnd", "chat") and p["status"] == HEALTH


async def test_a_contact_who_asks_sees_the_gateway_online_and_is_asked_back(accounts: Accounts, tmp_path: Path) -> None:
    """Gajim's "Add contact", Converse's "Add a contact", the demo's page: the contact subscribes; the
    gateway approves, its presence with its health follows at once, and it asks back, even after the
    contact had declined its first request."""
    gw = await accounts.start_gateway(tmp_path)
    roster = gw.session.client.client_roster
    wendy = accounts.peer(accounts.contact, accounts.contact_password)
    wendy.client.auto_authorize = False  # declines the request the gateway sent when it started
    await wendy.start()
    try:
        await until(lambda: not roster[accounts.contact]["pending_out"], "the contact declining the gateway's request", WAIT)
        assert not roster[accounts.contact]["to"]
        wendy.client.auto_authorize = None  # from now on, by hand
        wendy.client.send_presence_subscription(pto=accounts.gateway)
        pres = await wendy.presence_from(accounts.gateway, online(accounts.gateway))
        assert pres["from"].resource == "gateway"
        mine = wendy.client.client_roster[accounts.gateway]
        await until(lambda: mine["to"], "the contact's subscription to the gateway", WAIT)
        await until(lambda: mine["pending_in"], "the gateway asking back", WAIT)
        mine.authorize()
        await until(lambda: roster[accounts.contact]["to"] and roster[accounts.contact]["from"], "both ways on the gateway's side", WAIT)
    finally:
        await wendy.stop()
        await gw.stop()


async def test_a_contact_who_answers_the_gateways_request_sees_it_online(accounts: Accounts, tmp_path: Path) -> None:
    """Conversations, Dino, Converse with auto_subscribe: the gateway's request is approved and
    answered with one of the contact's own; the gateway approves it and its presence follows."""
    gw = await accounts.start_gateway(tmp_path)
    wendy = accounts.peer(accounts.contact, accounts.contact_password)
    wendy.client.auto_authorize = True
    wendy.client.auto_subscribe = True  # slixmpp: approve, then subscribe back
    await wendy.start()
    try:
        await wendy.presence_from(accounts.gateway, online(accounts.gateway))
        roster = gw.session.client.client_roster
        await until(lambda: roster[accounts.contact]["to"] and roster[accounts.contact]["from"], "both ways on the gateway's side", WAIT)
    finally:
        await wendy.stop()
        await gw.stop()


async def test_a_contact_subscribed_while_the_gateway_was_away_sees_it_online(accounts: Accounts, tmp_path: Path) -> None:
    """The contact asked while the gateway was not running: the server keeps the request, the gateway
    approves it when it comes online and the contact gets its presence with its health."""
    wendy = accounts.peer(accounts.contact, accounts.contact_password)
    await wendy.start()
    try:
        wendy.client.send_presence_subscription(pto=accounts.gateway)
        await asyncio.sleep(0.3)  # the request reaches the server before the gateway starts
        gw = await accounts.start_gateway(tmp_path)
        try:
            await wendy.presence_from(accounts.gateway, online(accounts.gateway))
        finally:
            await gw.stop()
    finally:
        await wendy.stop()


async def test_a_stranger_who_subscribes_gets_nothing(accounts: Accounts, tmp_path: Path) -> None:
    """A stranger's request is refused: no presence (no health) and no request back; the gateway's
    roster does not keep them."""
    gw = await accounts.start_gateway(tmp_path)
    eve = accounts.peer(accounts.stranger, accounts.stranger_password)
    eve.client.auto_authorize = True  # would approve a request from the gateway, if one came
    await eve.start()
    try:
        eve.client.send_presence_subscription(pto=accounts.gateway)
        await eve.presence_from(accounts.gateway, lambda p: p["type"] == "unsubscribed")
        # A contact's presence goes out within the same exchange (the tests above): a marker ping
        # to the gateway and back bounds the wait for anything else it would have sent.
        await eve.client.plugin["xep_0199"].ping(gw.session.client.boundjid.full, timeout=10)
        await asyncio.sleep(0.5)
        sent = [p for p in eve.presences if p["from"].bare == accounts.gateway]
        # `unavailable` without a status: Prosody's answer to a request it has no approval for, and
        # the one RFC 6121 has the refusing side send after `unsubscribed`.
        assert {p["type"] for p in sent} <= {"unsubscribed", "unavailable"}, [str(p) for p in sent]
        assert not any(p["status"] for p in sent), [str(p) for p in sent]
        item = eve.client.client_roster[accounts.gateway]
        assert not item["to"] and not item["from"] and not item["pending_in"], "the gateway asked the stranger back"
        theirs = gw.session.client.client_roster[accounts.stranger]
        assert not any(theirs[k] for k in ("to", "from", "pending_out")), theirs
    finally:
        await eve.stop()
        await gw.stop()
