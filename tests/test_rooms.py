"""Team rooms (XEP-0045) through the real Prosody: rooms the gateway creates are
private (members-only, non-anonymous, contacts as members); rooms that are not
private get no device data; a room's JID is never a roster contact."""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
from slixmpp import JID

from gateway.hub import Health
from gateway.xmpp.rooms import ROOMCONFIG, privacy
from tests.conftest import RunningGateway, XmppServer, gateway_config, start_gateway
from tests.peer import Peer

MUC = "conference.localhost"


def new_room(prefix: str) -> str:
    """A room name no other test uses (rooms the gateway creates are persistent)."""
    return f"{prefix}-{secrets.token_hex(4)}@{MUC}"


async def joined(gw: RunningGateway, room: str) -> None:
    """Wait (bounded) until the gateway has joined and checked `room`."""
    for _ in range(100):
        if room in gw.session.rooms.joined:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the gateway did not join {room}")


async def gateway_in(server: XmppServer, tmp_path: Path, room: str, **xmpp: Any) -> RunningGateway:
    gw = await start_gateway(gateway_config(server, tmp_path, xmpp={"rooms": [room], **xmpp}), server.passwords["gateway"])
    await joined(gw, room)
    return gw


async def features(peer: Peer, room: str) -> set[str]:
    info = await peer.client.plugin["xep_0030"].get_info(jid=room, timeout=10)
    return set(info["disco_info"]["features"])


async def create_room(owner: Peer, room: str, **config: Any) -> None:
    """`owner` creates `room` with the server's defaults plus `config` (roomconfig fields)."""
    muc = owner.client.plugin["xep_0045"]
    await owner.join(room, owner.jid.split("@")[0])
    form = owner.client.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", ftype="hidden", value=ROOMCONFIG)
    for var, value in config.items():
        form.add_field(var=f"muc#roomconfig_{var}", ftype="boolean" if isinstance(value, bool) else None, value=value)
    await muc.set_room_config(room, form, timeout=10)


async def chat_lines(peer: Peer, frm: str, timeout: float = 1.0) -> list[str]:
    """Every chat message from `frm` until none arrives for `timeout` seconds (at most 50)."""
    lines = []
    try:
        for _ in range(50):
            lines.append(await peer.reply_from(frm, timeout=timeout))
    except TimeoutError:
        pass
    return lines


async def room_lines(peer: Peer, room: str, nick: str, timeout: float = 1.0) -> list[str]:
    """Every message `nick` says in `room` until nothing comes for `timeout` seconds (at most 50)."""
    lines = []
    try:
        for _ in range(50):
            lines.append(await peer.room_said(room, nick, timeout=timeout))
    except TimeoutError:
        pass
    return lines


async def join_error(peer: Peer, room: str) -> str:
    """Try to join `room`; the error condition the room answers with."""
    nick = peer.jid.split("@")[0]
    peer.client.plugin["xep_0045"].make_join_stanza(JID(room), nick, maxstanzas=0).send()
    pres = await peer.presence_from(room, lambda p: p["type"] in ("error", "available"))
    assert pres["type"] == "error", f"{peer.jid} joined {room}"
    return pres["error"]["condition"]


def test_privacy_needs_members_only_and_non_anonymous() -> None:
    assert privacy({"muc_membersonly", "muc_nonanonymous", "muc_hidden"}).private
    # A password alone keeps nobody out who has it: not private.
    assert not privacy({"muc_passwordprotected", "muc_nonanonymous", "muc_open"}).private
    assert "members-only" in privacy({"muc_nonanonymous"}).reason
    assert "non-anonymous" in privacy({"muc_membersonly", "muc_semianonymous"}).reason


async def test_created_room_is_members_only_with_contacts_as_members(
    xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]
) -> None:
    room = new_room("team")
    gw = await gateway_in(xmpp_server, tmp_path, room)
    try:
        alice, victor, mallory = peers["alice"], peers["victor"], peers["mallory"]
        assert await join_error(mallory, room) == "registration-required"

        got = await features(alice, room)
        assert {"muc_membersonly", "muc_nonanonymous", "muc_hidden", "muc_persistent"} <= got

        muc = alice.client.plugin["xep_0045"]
        members = {str(j) for j in await muc.get_affiliation_list(room, "member", timeout=10)}
        admins = {str(j) for j in await muc.get_affiliation_list(room, "admin", timeout=10)}
        owners = {str(j) for j in await muc.get_affiliation_list(room, "owner", timeout=10)}
        assert members == {"olive@localhost", "victor@localhost"}
        assert admins == {"alice@localhost"}
        assert owners == {"gateway@localhost"}

        await alice.join(room, "alice")
        await victor.join(room, "victor")
        victor.client.send_message(mto=room, mbody="gw: read sim.relay", mtype="groupchat")
        for peer in (alice, victor):
            assert (await peer.room_said(room, "gw")).startswith("victor: sim.relay = off")
        gw.gateway.hub.set_health("sim", Health.ERROR, "driver crashed")
        for peer in (alice, victor):
            assert await peer.room_said(room, "gw") == "sim: error: driver crashed"
        assert not any("not private" in line for line in await chat_lines(alice, gw.jid, 0.5))
    finally:
        await gw.stop()


OPEN_ROOMS = {
    "open": {},  # the server's defaults: anyone may join, semi-anonymous
    "open-nonanonymous": {"whois": "anyone"},
    "password-only": {"whois": "anyone", "roomsecret": "s3cret", "passwordprotectedroom": True},
}


@pytest.mark.parametrize("kind", OPEN_ROOMS)
async def test_room_strangers_can_read_gets_no_device_data(
    kind: str, xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]
) -> None:
    alice, mallory = peers["alice"], peers["mallory"]
    room = new_room(kind)
    await create_room(mallory, room, **OPEN_ROOMS[kind])
    password = OPEN_ROOMS[kind].get("roomsecret")
    alice.drain()
    gw = await gateway_in(xmpp_server, tmp_path, room, room_password=password)
    try:
        assert room not in gw.session.rooms.private
        warning = [m for m in await chat_lines(alice, gw.jid) if room in m]
        assert len(warning) == 1 and "not private" in warning[0], warning
        reason = gw.session.rooms.exposed[room]
        assert "not members-only" in reason and ("not non-anonymous" in reason) == (kind == "open")

        gw.gateway.hub.set_health("sim", Health.ERROR, "driver crashed")  # goes to alice, not the room
        assert await alice.reply_from(gw.jid) == "sim: error: driver crashed"
        await alice.client.plugin["xep_0045"].join_muc_wait(room, "alice", password=password, maxstanzas=0, timeout=10)
        alice.client.send_message(mto=room, mbody="gw: read sim.temp", mtype="groupchat")
        said = await room_lines(mallory, room, "gw")
        if kind == "open":
            assert said == []  # the gateway cannot see alice's real JID: ignored
        else:
            assert said == [f"alice: This room is not private ({gw.session.rooms.exposed[room]}); ask me in a direct chat."]
        assert not any("sim" in line for line in said)
    finally:
        await gw.stop()


async def test_room_made_private_later_gets_device_data(
    xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]
) -> None:
    alice, mallory = peers["alice"], peers["mallory"]
    room = new_room("later")
    await create_room(mallory, room, whois="anyone")
    gw = await gateway_in(xmpp_server, tmp_path, room)
    try:
        assert room not in gw.session.rooms.private
        muc = mallory.client.plugin["xep_0045"]
        for jid in ("gateway@localhost", "alice@localhost"):
            await muc.set_affiliation(room, "member", jid=jid, timeout=10)
        form = mallory.client.plugin["xep_0004"].make_form(ftype="submit")
        form.add_field(var="FORM_TYPE", ftype="hidden", value=ROOMCONFIG)
        form.add_field(var="muc#roomconfig_membersonly", ftype="boolean", value=True)
        await muc.set_room_config(room, form, timeout=10)
        for _ in range(100):  # the gateway re-checks on the config-change notice (status 104)
            if room in gw.session.rooms.private:
                break
            await asyncio.sleep(0.1)
        assert room in gw.session.rooms.private
        said = [m for m in await chat_lines(alice, gw.jid) if room in m]
        assert said[-1] == f"Room {room} is private now: the gateway posts device data there again."
        gw.gateway.hub.set_health("sim", Health.ERROR, "driver crashed")
        assert await mallory.room_said(room, "gw") == "sim: error: driver crashed"
    finally:
        await gw.stop()


async def test_room_jid_is_never_a_roster_contact(
    xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="iot_gateway")
    room = new_room("sync")
    open_room = new_room("sync-open")
    await create_room(peers["mallory"], open_room)
    config = gateway_config(xmpp_server, tmp_path, xmpp={"rooms": [room, open_room]})
    gw = await start_gateway(config, xmpp_server.passwords["gateway"])
    try:
        await joined(gw, room)
        await joined(gw, open_room)
        session = gw.session
        # A clean disconnect ends the server-side session: the reconnect is a
        # fresh session (not an XEP-0198 resumption), so the roster is synced again.
        await session.client.disconnect(wait=1.0)
        for _ in range(150):
            if room in session.rooms.joined and open_room in session.rooms.joined:
                break
            await asyncio.sleep(0.1)
        assert room in session.rooms.joined and room in session.rooms.private
        roster = await session.client.get_roster(timeout=10)
        assert not {room, open_room} & {str(j) for j in roster["roster"]["items"]}
        lines = [r.getMessage() for r in caplog.records]
        assert not [m for m in lines if "roster" in m and MUC in m], lines
        # The admins heard about the open room once, not once per join.
        assert len([m for m in lines if m.startswith(f"Room {open_room} is not private")]) == 1
    finally:
        await gw.stop()


# ------------------------------------------------------------ the gateway's nick


async def test_owner_gateway_takes_its_nick_back_from_an_impostor(
    xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]
) -> None:
    """In a room the gateway owns, an occupant who took `gw` first is removed, and the gateway
    joins as `gw`: contacts never talk to the impostor thinking it is the gateway."""
    alice, victor = peers["alice"], peers["victor"]
    room = new_room("nick")
    gw = await gateway_in(xmpp_server, tmp_path, room)  # creates the room: owner
    await gw.stop()
    await victor.join(room, "gw")  # a member, with the gateway's nick while it is away
    alice.drain()
    gw = await gateway_in(xmpp_server, tmp_path, room)
    try:
        assert gw.session.rooms.nicks[room] == "gw"
        muc = gw.session.client.plugin["xep_0045"]
        occupants = {n: JID(muc.get_jid_property(JID(room), n, "jid")).bare for n in muc.get_roster(JID(room))}
        assert occupants == {"gw": gw.jid}, occupants  # victor was removed
        told = [m for m in await chat_lines(alice, gw.jid) if room in m]
        assert told == [f"Room {room}: victor@localhost held the gateway's nick gw; the gateway (owner) removed "
                        "them and took it back."], told
        await alice.join(room, "alice")
        alice.client.send_message(mto=room, mbody="gw: read sim.relay", mtype="groupchat")
        assert (await alice.room_said(room, "gw")).startswith("alice: sim.relay = ")
    finally:
        await gw.stop()


async def test_gateway_that_cannot_take_its_nick_back_says_which_name_it_has(
    xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]
) -> None:
    """In someone else's private room, an occupant holding `gw` stays; the gateway joins as
    `gw-2` and says so, once to the admins and in the room: never quietly under another name."""
    alice, olive, mallory = peers["alice"], peers["olive"], peers["mallory"]
    room = new_room("theirs")
    await create_room(mallory, room, whois="anyone", membersonly=True)
    muc = mallory.client.plugin["xep_0045"]
    for jid in ("gateway@localhost", "alice@localhost", "olive@localhost"):
        await muc.set_affiliation(room, "member", jid=jid, timeout=10)
    await olive.join(room, "gw")
    alice.drain()
    gw = await gateway_in(xmpp_server, tmp_path, room)
    try:
        assert gw.session.rooms.nicks[room] == "gw-2"
        assert room in gw.session.rooms.private
        said = await mallory.room_said(room, "gw-2")
        assert said == ("This gateway is gw-2 in this room: the nick gw here belongs to another occupant "
                        "(olive@localhost), not to this gateway. Address me as `gw-2:`."), said
        told = [m for m in await chat_lines(alice, gw.jid) if room in m]
        assert len(told) == 1 and "held by olive@localhost" in told[0] and "This gateway is gw-2 there" in told[0], told
        assert "gw" in muc.get_roster(JID(room))  # olive was not removed
    finally:
        await gw.stop()
