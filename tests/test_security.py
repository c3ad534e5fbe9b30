"""Authorization in one place: roles × entry points × read/set, through the real stack.

Every entry point (chat, room, ad-hoc, XEP-0323, XEP-0325) must give viewers
reads only, operators and admins reads and sets, and strangers nothing; every
refused set is audited with who tried and how.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from slixmpp.exceptions import IqError

from tests.conftest import RunningGateway, XmppServer, gateway_config, start_gateway
from tests.peer import Peer
from tests.xep_helpers import CTRL, SD, Inbox, child, error_of, iq

ROOM = "secure@conference.localhost"
ROLES = {"alice": "admin", "olive": "operator", "victor": "viewer", "mallory": None}
MAY_READ = {"alice", "olive", "victor"}
MAY_SET = {"alice", "olive"}
ENTRIES = ["chat", "room", "adhoc", "xep"]


@pytest.fixture(scope="module")
def matrix_results() -> dict:
    return {}


@pytest.fixture
async def gw(xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]) -> AsyncIterator[RunningGateway]:
    config = gateway_config(xmpp_server, tmp_path, xmpp={"rooms": [ROOM]})
    running = await start_gateway(config, xmpp_server.passwords["gateway"])
    for _ in range(50):
        if ROOM in running.session.rooms.joined:
            break
        await asyncio.sleep(0.1)
    for user in sorted(MAY_READ):  # mallory cannot join: the room is members-only (test_rooms.py)
        await peers[user].join(ROOM, user)
    yield running
    await running.stop()


async def read_via(entry: str, peer: Peer, user: str, gw: RunningGateway) -> bool:
    """Try to read sim.speed through `entry`; True when a value came back."""
    full = gw.session.client.boundjid.full
    if entry == "chat":
        peer.drain()
        peer.client.send_message(mto=gw.jid, mbody="read sim.speed", mtype="chat")
        try:
            return (await peer.reply_from(gw.jid, timeout=2)).startswith("sim.speed = ")
        except TimeoutError:
            return False
    if entry == "room":
        peer.client.send_message(mto=ROOM, mbody="gw: read sim.speed", mtype="groupchat")
        try:
            while True:
                said = await peer.room_said(ROOM, "gw", timeout=2)
                if said.startswith(f"{user}: "):
                    return said.startswith(f"{user}: sim.speed = ")
        except TimeoutError:
            return False
    if entry == "adhoc":
        req = peer.client.make_iq_set(ito=full)
        req["command"]["node"] = "read"
        req["command"]["action"] = "execute"
        try:
            resp = await req.send(timeout=5)
        except IqError as e:
            assert e.iq["error"]["condition"] == "forbidden"
            return False
        return "sim.speed" in resp["command"]["form"].get_fields()
    inbox = Inbox(peer)
    answer = await iq(peer, full, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='5' momentary='true'><node nodeId='sim'/></req>")
    if answer["type"] == "error":
        assert error_of(answer)[1] == "forbidden"
        return False
    child(answer, SD, "accepted")
    return any(el.find(f"{{{SD}}}node") is not None for el in await inbox.readout(5))


async def set_via(entry: str, peer: Peer, user: str, gw: RunningGateway, value: int) -> None:
    """Try to set sim.speed to `value` through `entry` and wait for the answer (if any)."""
    full = gw.session.client.boundjid.full
    if entry == "chat":
        peer.drain()
        peer.client.send_message(mto=gw.jid, mbody=f"set sim.speed {value}", mtype="chat")
        try:
            await peer.reply_from(gw.jid, timeout=2)
        except TimeoutError:
            pass
    elif entry == "room":
        peer.client.send_message(mto=ROOM, mbody=f"gw: set sim.speed {value}", mtype="groupchat")
        try:
            while not (await peer.room_said(ROOM, "gw", timeout=2)).startswith(f"{user}: "):
                pass
        except TimeoutError:
            pass
    elif entry == "adhoc":
        form = peer.client.plugin["xep_0004"].make_form(ftype="submit")
        form.add_field(var="sim.speed", value=str(value))
        req = peer.client.make_iq_set(ito=full)
        req["command"]["node"] = "set"
        req["command"]["action"] = "execute"
        try:
            resp = await req.send(timeout=5)
        except IqError as e:
            assert e.iq["error"]["condition"] == "forbidden"
            # Asking for the form is not a set; a client that kept the form submits it anyway.
            req = peer.client.make_iq_set(ito=full)
            req["command"]["node"] = "set"
            req["command"]["action"] = "execute"
            req["command"].append(form)
            with pytest.raises(IqError) as refused:
                await req.send(timeout=5)
            assert refused.value.iq["error"]["condition"] == "forbidden"
            return
        sub = peer.client.make_iq_set(ito=full)
        sub["command"]["node"] = "set"
        sub["command"]["sessionid"] = resp["command"]["sessionid"]
        sub["command"]["action"] = "complete"
        sub["command"].append(form)
        await sub.send(timeout=5)
    else:
        answer = await iq(peer, full, f"<set xmlns='{CTRL}'><node nodeId='sim'/><int name='speed' value='{value}'/></set>", "set")
        if answer["type"] == "error":
            assert error_of(answer)[1] == "forbidden"


@pytest.mark.parametrize("entry", ENTRIES)
async def test_roles_by_entry_point(entry: str, gw: RunningGateway, peers: dict[str, Peer]) -> None:
    hub = gw.gateway.hub
    for i, (user, role) in enumerate(ROLES.items()):
        peer = peers[user]
        assert await read_via(entry, peer, user, gw) is (user in MAY_READ), f"{user} read via {entry}"

        before = hub.field("sim.speed").latest.value
        audited = len(hub.audit.entries)
        value = 10 + i
        await set_via(entry, peer, user, gw, value)
        after = hub.field("sim.speed").latest.value
        if user in MAY_SET:
            assert after == value, f"{user} set via {entry}"
            entry_log = hub.audit.entries[-1]
            assert (entry_log.actor.jid, entry_log.outcome) == (f"{user}@localhost", "applied")
        else:
            assert after == before, f"{user} changed sim.speed via {entry}"
            new = list(hub.audit.entries)[audited:]
            assert all(e.outcome != "applied" for e in new)
            if role is not None:  # a known viewer's attempt is audited as refused
                assert [(e.actor.jid, e.outcome) for e in new] == [(f"{user}@localhost", "refused")]


async def test_tls_is_verified_and_an_untrusted_server_gets_no_login(
    xmpp_server: XmppServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.app import Gateway
    from gateway.xmpp.session import Session

    config = gateway_config(xmpp_server, tmp_path)
    config.xmpp.ca_file = None  # the suite's private CA is not among the system's trust anchors
    gw = Gateway(config)
    await gw.start()
    session = Session(config, gw.hub, gw.commands, xmpp_server.passwords["gateway"])
    session.connect()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(session.online.wait(), 3)
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
        assert "the XMPP server's TLS certificate is not trusted" in caplog.text  # said, with the fix
        assert "set [xmpp] ca_file" in caplog.text
    finally:
        await session.stop()
        await gw.stop()


async def test_tls_verify_off_is_allowed_on_loopback_only_and_warned(
    xmpp_server: XmppServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = gateway_config(xmpp_server, tmp_path, xmpp={"tls_verify": False})
    config.xmpp.ca_file = None
    gw = await start_gateway(config, xmpp_server.passwords["gateway"])
    try:
        assert "TLS certificate verification is OFF" in caplog.text
    finally:
        await gw.stop()
