"""Team rooms (XEP-0045): the gateway joins them, posts health changes and
alerts there, and answers commands addressed to its nick (`gw: read weather.temp`)
from occupants whose real JID is a contact, with that contact's role.

Device data goes only to private rooms: members-only (strangers cannot join)
and non-anonymous (every occupant sees who else reads). A room the gateway
creates is configured that way, with the contacts as its only members; an
existing room is checked on every (re)join and on every configuration change,
and while it is not private the gateway posts nothing there.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slixmpp import JID
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.stanza import Message

from .auth import Actor
from .plot import Picture
from .upload import attach_oob
from .watches import Alert

if TYPE_CHECKING:
    from .xmpp import Session

log = logging.getLogger("iot_gateway.rooms")

JOIN_TIMEOUT = 20.0
ROOMCONFIG = "http://jabber.org/protocol/muc#roomconfig"
# Status codes of a room message saying its configuration changed (XEP-0045 §10.2.1).
CONFIG_CHANGED = {104, 172, 173, 174}
# Affiliations the gateway gives contacts in a room it owns; the gateway stays the only owner.
AFFILIATION = {"admin": "admin", "operator": "member", "viewer": "member"}


@dataclass
class Privacy:
    """Whether strangers could read a room, from its disco#info features."""

    private: bool
    reason: str = ""  # why not, in words for the log and the admins


class RoomError(Exception):
    """A room could not be configured as the gateway wants it."""


def privacy(features: set[str]) -> Privacy:
    """Private means members-only and non-anonymous. A password alone is not
    enough: anyone who has it (or guesses it) reads along, unseen by the contacts."""
    problems = []
    if "muc_membersonly" not in features:
        problems.append("not members-only: anyone on the server can join")
    if "muc_nonanonymous" not in features:
        problems.append("not non-anonymous: occupants cannot see who reads")
    return Privacy(not problems, "; ".join(problems))


class Rooms:
    """Joins `[xmpp] rooms` on every session start and serves commands there."""

    def __init__(self, session: "Session"):
        self.session = session
        self.client = session.client
        self.rooms = [JID(r) for r in session.xcfg.rooms]
        self.jids = {r.bare for r in self.rooms}
        self.nick = session.xcfg.nick
        self.joined: set[str] = set()  # joined and checked
        self.private: set[str] = set()  # joined rooms that get device data
        self.exposed: dict[str, str] = {}  # joined rooms that do not, with why
        self._warned: set[str] = set()  # rooms the admins were told about; survives reconnects
        self._notices: list[Alert] = []  # our messages to the admins, not for the rooms
        if not self.rooms:
            return
        self.client.register_plugin("xep_0045")
        self.client.add_event_handler("session_start", self._on_session_start)
        self.client.add_event_handler("disconnected", self._on_disconnected)
        self.client.add_event_handler("groupchat_message", self._on_message)
        self.client.add_event_handler("groupchat_config_status", self._on_config_status)
        session.alert_hooks.append(self.post_alert)

    def _on_disconnected(self, _event: object) -> None:
        self.joined.clear()
        self.private.clear()
        self.exposed.clear()

    async def _on_session_start(self, _event: object) -> None:
        await asyncio.gather(*(self._join(room) for room in self.rooms))

    async def _join(self, room: JID) -> None:
        muc = self.client.plugin["xep_0045"]
        try:
            result = await muc.join_muc_wait(
                room, self.nick, password=self.session.xcfg.room_password,
                maxstanzas=0, timeout=JOIN_TIMEOUT,
            )
        except Exception as e:
            log.error("cannot join room %s as %s: %s", room, self.nick, e)
            return
        me = result[0]["muc"]
        if 201 in me["status_codes"]:
            # We created the room; it stays locked (nobody else can join) until configured.
            try:
                await self._configure(room)
                log.info("created room %s: members-only, non-anonymous, contacts as members", room)
            except (IqError, IqTimeout, RoomError) as e:
                log.error("could not configure new room %s: %s", room, e)
        if me["affiliation"] == "owner":
            await self._sync_members(room)
        await self._check(room)
        self.joined.add(room.bare)
        log.info("joined room %s as %s", room, self.nick)

    async def _configure(self, room: JID) -> None:
        """Make a room the gateway owns members-only, non-anonymous, hidden and persistent."""
        muc = self.client.plugin["xep_0045"]
        offered = (await muc.get_room_config(room, timeout=JOIN_TIMEOUT)).get_fields()
        wanted: dict[str, object] = {
            "muc#roomconfig_membersonly": True,
            "muc#roomconfig_whois": "anyone",
            "muc#roomconfig_publicroom": False,
            # Persistent: the member list outlives the gateway's absence, and
            # nobody can recreate the room as an open one while it is away.
            "muc#roomconfig_persistentroom": True,
        }
        password = self.session.xcfg.room_password
        if password:
            wanted["muc#roomconfig_passwordprotectedroom"] = True
            wanted["muc#roomconfig_roomsecret"] = password
        for var in ("muc#roomconfig_membersonly", "muc#roomconfig_whois"):
            if var not in offered:
                raise RoomError(f"the server offers no {var} option; use a room configured by hand")
        form = self.client.plugin["xep_0004"].make_form(ftype="submit")
        form.add_field(var="FORM_TYPE", ftype="hidden", value=ROOMCONFIG)
        for var, value in wanted.items():
            if var in offered:
                form.add_field(var=var, ftype=offered[var]["type"], value=value)
        await muc.set_room_config(room, form, timeout=JOIN_TIMEOUT)

    async def _sync_members(self, room: JID) -> None:
        """In a room the gateway owns, the contacts are its members (admins its
        admins) and nobody else is, as with the roster."""
        muc = self.client.plugin["xep_0045"]
        wanted = {c.jid: AFFILIATION[c.role] for c in self.session.config.contacts}
        try:
            current: dict[str, str] = {}
            for aff in ("member", "admin"):
                for jid in await muc.get_affiliation_list(room, aff, timeout=JOIN_TIMEOUT):
                    current[JID(jid).bare.lower()] = aff
            changes = [(j, a) for j, a in wanted.items() if current.get(j) != a]
            changes += [(j, "none") for j in current if j not in wanted]
            for jid, aff in changes:
                await muc.set_affiliation(room, aff, jid=jid, timeout=JOIN_TIMEOUT)
                log.info("room %s: %s is now %s", room, jid, aff)
        except (IqError, IqTimeout) as e:
            log.error("could not set the members of room %s: %s", room, e)

    async def _check(self, room: JID) -> None:
        """Read the room's configuration and decide whether it gets device data."""
        try:
            info = await self.client.plugin["xep_0030"].get_info(jid=room, timeout=JOIN_TIMEOUT)
            verdict = privacy(set(info["disco_info"]["features"]))
        except (IqError, IqTimeout) as e:
            verdict = Privacy(False, f"its configuration cannot be read ({e})")
        bare = room.bare
        if verdict.private:
            self.private.add(bare)
            self.exposed.pop(bare, None)
            if bare in self._warned:
                self._warned.discard(bare)
                self._tell_admins(f"Room {bare} is private now: the gateway posts device data there again.")
            return
        self.private.discard(bare)
        self.exposed[bare] = verdict.reason
        if bare not in self._warned:
            self._warned.add(bare)
            self._tell_admins(
                f"Room {bare} is not private ({verdict.reason}), so the gateway posts no device data "
                "there. Make it members-only and non-anonymous, with the contacts as members."
            )

    def _tell_admins(self, text: str) -> None:
        log.warning("%s", text)
        admins = tuple(c.jid for c in self.session.config.contacts if c.role == "admin")
        if admins:
            notice = Alert(text, time.time(), admins)
            self._notices.append(notice)
            del self._notices[:-100]  # one the session's queue dropped never comes back
            self.session.deliver(notice)

    async def _on_config_status(self, msg: Message) -> None:
        room = msg["from"]
        if room.bare in self.joined and msg["muc"]["status_codes"] & CONFIG_CHANGED:
            await self._check(JID(room.bare))

    def post_alert(self, alert: Alert, delayed: bool) -> None:
        """Post an alert's text in every joined private room."""
        for i, notice in enumerate(self._notices):
            if notice is alert:
                del self._notices[i]
                return
        for room in self.private:
            msg = self.client.make_message(mto=room, mbody=alert.text, mtype="groupchat")
            if delayed:
                msg["delay"]["stamp"] = dt.datetime.fromtimestamp(alert.time, dt.timezone.utc)
            msg.send()

    async def _on_message(self, msg: Message) -> None:
        room = msg["from"].bare
        nick = msg["from"].resource
        if room not in self.joined or nick == self.nick or msg["delay"]["stamp"] is not None:
            return
        body = msg["body"] or ""
        text = self._addressed(body)
        if text is None:
            return
        real = self.client.plugin["xep_0045"].get_jid_property(JID(room), nick, "jid")
        contact = self.session.config.contact(JID(real).bare) if real else None
        if contact is None:
            log.info("ignored a command in %s from %s (real JID %s): not a contact", room, nick, real)
            return
        if len(body.encode()) > 4096 or not self.session.allow_rate(contact.jid):
            return
        if room not in self.private:
            reason = self.exposed.get(room, "not checked")
            self.client.send_message(
                mto=room, mtype="groupchat",
                mbody=f"{nick}: This room is not private ({reason}); ask me in a direct chat.",
            )
            return
        reply = await self.session.run_command(text, Actor(contact.jid, contact.role, "room"))
        if isinstance(reply, Picture):  # the body must be the bare URL for clients to show it inline
            attach_oob(self.client.make_message(mto=room, mbody=reply, mtype="groupchat"), reply).send()
            return
        self.client.send_message(mto=room, mbody=f"{nick}: {reply}", mtype="groupchat")

    def _addressed(self, body: str) -> str | None:
        """The command in `gw: read x` / `gw, read x`, or None when not addressed to us."""
        n = len(self.nick)
        if body[:n].lower() == self.nick.lower() and body[n:n + 1] in (":", ","):
            return body[n + 1:].strip()
        return None
