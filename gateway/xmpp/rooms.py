"""Team rooms (XEP-0045): the gateway joins them, posts health changes and
alerts there, and answers commands addressed to its nick (`gw: read weather.temp`)
from occupants whose real JID is a contact, with that contact's role.

Device data goes only to private rooms: members-only (strangers cannot join)
and non-anonymous (every occupant sees who else reads). A room the gateway
creates is configured that way, with the contacts as its only members; an
existing room is checked on every (re)join and on every configuration change,
and while it is not private the gateway posts nothing there.

Several gateways may share a room as a fleet (`[xmpp] peers`, docs/fleet.md):
each answers `all: status` in its own turn, stays quiet about devices it does
not have, prefixes its alerts with its site, and shows the fleet with `fleet`.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import random
import time
from dataclasses import dataclass

from slixmpp import JID
from slixmpp.exceptions import IqError, IqTimeout, PresenceError
from slixmpp.stanza import Message, Presence

from ..auth import Actor
from ..commands import Progress
from .fleet import SHOW, Member, addressed, concerns, delay, nick_for, overview
from ..plot import Picture
from .upload import attach_oob
from ..watches import Alert
from .frontend import Door, FrontEnd
from .presence import health_summary


log = logging.getLogger("iot_gateway.rooms")

JOIN_TIMEOUT = 20.0
ROOMCONFIG = "http://jabber.org/protocol/muc#roomconfig"
# Status codes of a room message saying its configuration changed (XEP-0045 §10.2.1).
CONFIG_CHANGED = {104, 172, 173, 174}
# Affiliations the gateway gives contacts in a room it owns; the gateway stays the only owner.
AFFILIATION = {"admin": "admin", "operator": "member", "viewer": "member"}
NICK_TRIES = 9  # nick, nick-2 … nick-9 when someone else has it
RETRY_FIRST = 15.0  # seconds before joining a room again that refused us (not a member yet, …)
RETRY_MAX = 300.0


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


class Rooms(FrontEnd):
    """Joins `[xmpp] rooms` on every session start and serves commands there."""

    def __init__(self, session: Door):
        super().__init__(session)
        xcfg = session.xcfg
        self.rooms = [JID(r) for r in xcfg.rooms]
        self.jids = {r.bare for r in self.rooms}
        # Fellow gateways: members of rooms we own, never obeyed. Our own JID may be
        # in the list, so that one list fits every gateway of the fleet.
        self.peers = set(xcfg.peers) - {xcfg.jid.lower()}
        self.aliases = xcfg.all_aliases
        # In a fleet every gateway would be `gw`: the default nick is then the site's name.
        named = "nick" in xcfg.model_fields_set or not self.peers
        self.nick = xcfg.nick if named else nick_for(session.config.gateway.name, self.aliases)
        self.nicks: dict[str, str] = {}  # room → the nick we joined it as (with a suffix after a clash)
        self._retries: dict[str, asyncio.Task[None]] = {}
        self.joined: set[str] = set()  # joined and checked
        self.private: set[str] = set()  # joined rooms that get device data
        self.exposed: dict[str, str] = {}  # joined rooms that do not, with why
        self._warned: set[str] = set()  # rooms the admins were told about; survives reconnects
        self._notices: list[Alert] = []  # our messages to the admins, not for the rooms
        self._nick_told: set[tuple[str, str]] = set()  # (room, notice) told the admins once
        # `[xmpp] omemo = "require"`: nothing in clear in rooms either (see `_say`).
        self.sealed = xcfg.omemo == "require"
        if not self.rooms:
            return
        self.client.register_plugin("xep_0045")
        self.client.add_event_handler("session_start", self._on_session_start)
        self.client.add_event_handler("disconnected", self._on_disconnected)
        self.client.add_event_handler("groupchat_message", self._on_message)
        self.client.add_event_handler("groupchat_config_status", self._on_config_status)
        session.alert_hooks.append(self.post_alert)
        # Servers do not pass presence updates on to rooms: mirror ours into the private ones.
        self.client.add_filter("out", self._mirror_presence)
        session.commands.fleet = self.overview

    def _on_disconnected(self, _event: object) -> None:
        for task in self._retries.values():
            task.cancel()
        self._retries.clear()
        self.nicks.clear()
        self.joined.clear()
        self.private.clear()
        self.exposed.clear()

    async def _on_session_start(self, _event: object) -> None:
        await asyncio.gather(*(self._join(room) for room in self.rooms))

    async def _join(self, room: JID, retry: bool = True) -> None:
        for n in range(1, NICK_TRIES + 1):
            nick = self.nick if n == 1 else f"{self.nick}-{n}"
            try:
                result = await self._join_as(room, nick)
                break
            except PresenceError as e:
                if e.condition == "conflict" and n < NICK_TRIES:
                    continue  # someone else (another gateway?) is that nick: never answer as one
                problem: Exception = e
            except Exception as e:
                problem = e
            log.error("cannot join room %s as %s: %s", room, nick, problem)
            if retry:
                self._retry(room)
            return
        me = result[0]["muc"]
        if nick != self.nick:
            log.warning("room %s: the nick %s is taken by another occupant; joined as %s", room, self.nick, nick)
            nick = await self._reclaim(room, nick, me["affiliation"])
        self.nicks[room.bare] = nick
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
        self._announce(room.bare)
        if nick != self.nick and room.bare in self.private:
            # Contacts address `gw:`; whoever holds that nick here is not us, and they should know.
            self._say(room.bare, (
                f"This gateway is {nick} in this room: the nick {self.nick} here belongs to another occupant "
                f"({self._holder(room) or 'unknown'}), not to this gateway. Address me as `{nick}:`."
            ))
        if self.sealed:
            self._tell_admins_once(room.bare, (
                f"Room {room.bare}: with [xmpp] omemo = \"require\" the gateway posts there only OMEMO-encrypted "
                "messages, for the devices of the contacts in the room (nothing when it cannot encrypt), shows no "
                "device health in its room presence, and runs no commands from the room: ask in a direct chat."
            ))
        log.info("joined room %s as %s", room, nick)

    async def _reclaim(self, room: JID, nick: str, affiliation: str) -> str:
        """Another occupant holds our nick, so we joined as `nick`. Where we may (owner or admin
        of the room) the holder is kicked and we take our nick back; a fellow gateway of the fleet
        keeps it. Otherwise the admins are told once which name we answer to there. Our nick now."""
        holder = self._holder(room)
        if affiliation in ("owner", "admin") and holder not in self.peers:
            muc = self.client.plugin["xep_0045"]
            try:
                await muc.set_role(room, self.nick, "none", reason=f"{self.nick} is this room's gateway",
                                   timeout=JOIN_TIMEOUT)
                taken = await muc.set_self_nick(room, self.nick, timeout=JOIN_TIMEOUT)
            except (IqError, IqTimeout, TimeoutError) as e:
                log.error("room %s: could not take back the nick %s from %s: %s", room, self.nick, holder, e)
            else:
                if taken == self.nick:
                    self._tell_admins_once(room.bare, f"Room {room.bare}: {holder or 'another occupant'} held the "
                                           f"gateway's nick {self.nick}; the gateway (owner) removed them and took it back.")
                    return taken
                nick = taken
        if holder in self.peers:
            why = f"{holder}, a fellow gateway of the fleet, is {self.nick} there"
        else:
            why = (f"the nick {self.nick} is held by {holder or 'another occupant'}, and the gateway cannot take it "
                   "back (it is not the room's owner or admin; an owner can remove that occupant)")
        self._tell_admins_once(room.bare, f"Room {room.bare}: {why}. This gateway is {nick} there, and says so in the room.")
        return nick

    def _holder(self, room: JID) -> str:
        """The bare real JID of whoever is `self.nick` in `room` ("" when the room hides it)."""
        real = self.client.plugin["xep_0045"].get_jid_property(room, self.nick, "jid")
        return JID(real).bare.lower() if real else ""

    def _say(self, room: str, text: str, stamp: float | None = None) -> None:
        """Post `text` in `room`, every message the gateway posts there: plain (a Picture with its
        XEP-0066 link), or with omemo = "require" encrypted for the contacts in the room, or not at all."""
        msg = self.client.make_message(mto=room, mbody=text, mtype="groupchat")
        if stamp is not None:
            msg["delay"]["stamp"] = dt.datetime.fromtimestamp(stamp, dt.timezone.utc)
        if not self.sealed:
            attach_oob(msg, text).send()
            return
        asyncio.ensure_future(self._say_sealed(room, msg))

    async def _say_sealed(self, room: str, msg: Message) -> None:
        omemo, readers = self.session.omemo, self._contacts_in(room)
        why = "no contact is in the room" if omemo is None or not readers else None
        # Encrypted before the edge filter sees it: cleaned and split here, as for direct replies.
        for part in ([] if why else self.session.edge.split(msg["body"])):
            out = copy.copy(msg)
            out["body"] = part
            why = await omemo.to_room(room, part, readers, out)
            if why:
                break
        if why:
            log.info("room %s: not posted, cannot encrypt it (%s)", room, why)
            self._tell_admins_once(room, (
                f"Room {room}: a message for the room was not posted: it cannot be encrypted ({why}), "
                "and with [xmpp] omemo = \"require\" nothing goes to a room in clear."
            ))

    def _contacts_in(self, room: str) -> set[str]:
        """The bare real JIDs of the occupants of `room` who are contacts."""
        muc = self.client.plugin["xep_0045"]
        found = set()
        for nick in muc.get_roster(JID(room)):
            real = muc.get_jid_property(JID(room), nick, "jid")
            bare = JID(real).bare.lower() if real else ""
            if bare and self.session.config.contact(bare) is not None:
                found.add(bare)
        return found

    def _tell_admins_once(self, room: str, text: str) -> None:
        if (room, text) not in self._nick_told:
            self._nick_told.add((room, text))
            self._tell_admins(text)

    async def _join_as(self, room: JID, nick: str) -> tuple[Presence, Message, list[Presence], list[Message]]:
        """Join `room` as `nick`; PresenceError when the room refuses (a taken nick: conflict).

        slixmpp only reports errors that carry the MUC element, which Prosody leaves out
        of a nick conflict: without this watch a clash would look like a timeout.
        """
        refused: asyncio.Future[Presence] = asyncio.get_running_loop().create_future()

        def on_error(pres: Presence) -> None:
            if pres["from"].bare == room.bare and not refused.done():
                refused.set_result(pres)

        join = asyncio.ensure_future(self.client.plugin["xep_0045"].join_muc_wait(
            room, nick, password=self.session.xcfg.room_password, maxstanzas=0, timeout=JOIN_TIMEOUT,
        ))
        self.client.add_event_handler("presence_error", on_error)
        try:
            await asyncio.wait({join, refused}, timeout=JOIN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.client.del_event_handler("presence_error", on_error)
        if join.done():
            return join.result()
        join.cancel()
        if refused.done():
            raise PresenceError(refused.result())
        raise asyncio.TimeoutError(f"no answer from the room within {JOIN_TIMEOUT:g} s")

    def _retry(self, room: JID) -> None:
        """Join again later: in a fleet the room may not exist yet, or its owner may not
        have made us a member yet, when we start."""
        task = self._retries.get(room.bare)
        if task is None or task.done():
            self._retries[room.bare] = asyncio.ensure_future(self._keep_joining(room))

    async def _keep_joining(self, room: JID) -> None:
        wait = RETRY_FIRST
        while room.bare not in self.joined and self.session.online.is_set():
            await asyncio.sleep(wait * random.uniform(0.75, 1.25))
            wait = min(wait * 2, RETRY_MAX)
            await self._join(room, retry=False)

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
        wanted = {p: "member" for p in self.peers}  # fellow gateways: members, nothing more
        wanted.update({c.jid: AFFILIATION[c.role] for c in self.session.config.contacts})
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
            self._announce(room.bare)

    def _announce(self, room: str) -> None:
        """Our health as our presence in `room`, so the fleet sees it; an empty status where
        the room is not private (the health names devices)."""
        show, status = None, ""
        if room in self.private and not self.sealed:
            show, status = health_summary(self.session.config.gateway.name, self.session.hub)
        self.client.send_presence(pto=f"{room}/{self.nicks[room]}", pshow=show, pstatus=status)

    def _mirror_presence(self, stanza: object) -> object:
        """An out filter: a copy of each broadcast availability to every private room we are in."""
        if self.sealed:
            return stanza  # the status names devices: never in clear in a room
        if isinstance(stanza, Presence) and stanza.xml.get("to") is None and stanza.xml.get("type") is None:
            for room in self.private & self.joined:
                copy = stanza.__copy__()
                copy["to"] = f"{room}/{self.nicks[room]}"
                copy.send()
        return stanza

    def post_alert(self, alert: Alert, delayed: bool) -> None:
        """Post an alert's text in every joined private room."""
        for i, notice in enumerate(self._notices):
            if notice is alert:
                del self._notices[i]
                return
        # In a fleet, several gateways post in one room: the site says whose greenhouse is too hot.
        text = f"[{self.session.config.gateway.name}] {alert.text}" if self.peers else alert.text
        for room in self.private:
            self._say(room, text, alert.time if delayed else None)

    async def _on_message(self, msg: Message) -> None:
        room = msg["from"].bare
        nick = msg["from"].resource
        mine = self.nicks.get(room)
        if room not in self.joined or nick == mine or msg["delay"]["stamp"] is not None:
            return
        received = time.monotonic()
        body = msg["body"] or ""
        cmd = addressed(body, mine or self.nick, self.aliases)
        if cmd is None:
            return
        real = self.client.plugin["xep_0045"].get_jid_property(JID(room), nick, "jid")
        bare = JID(real).bare.lower() if real else None
        if bare in self.peers:
            return  # a fellow gateway: whatever it says is no command for us (no answer loops)
        contact = self.session.config.contact(bare) if bare else None
        if contact is None:
            log.info("ignored a command in %s from %s (real JID %s): not a contact", room, nick, real)
            return
        if len(body.encode()) > 4096 or not self.session.allow_rate(contact.jid):
            return
        if self.sealed:
            log.info("ignored a command in %s from %s: omemo = \"require\" takes no commands in rooms", room, bare)
            return
        if room not in self.private:
            reason = self.exposed.get(room, "not checked")
            self._say(room, f"{nick}: This room is not private ({reason}); ask me in a direct chat.")
            return
        if cmd.everyone and not concerns(self.session.hub, cmd.text):
            return  # `all: read boiler.temp` is for the gateway that has it

        async def progress(text: str) -> None:  # "sent, waiting for the device", before the reply
            self._say(room, f"{nick}: {text}")

        reply = await self._answer(
            cmd.text, cmd.everyone, Actor(contact.jid, contact.role, "room"), None if cmd.everyone else progress
        )
        if cmd.everyone:
            # Take our turn, so the fleet's answers come in nick order and spread over about a second.
            wait = delay(mine or self.nick, self._fleet_nicks(room)) - (time.monotonic() - received)
            if wait > 0:
                await asyncio.sleep(wait)
            if room not in self.joined:
                return
        # A picture's body must be the bare URL for clients to show it inline.
        self._say(room, reply if isinstance(reply, Picture) else f"{nick}: {reply}")

    async def _answer(self, text: str, everyone: bool, actor: Actor, progress: Progress | None = None) -> str:
        """The reply to a room command; to `all: status`, one line (the presence's summary)."""
        if everyone and text.lower() == "status":
            return health_summary(self.session.config.gateway.name, self.session.hub)[1]
        return await self.session.run_command(text, actor, progress)

    def _fleet_nicks(self, room: str) -> list[str]:
        """The nicks of the fleet's gateways in `room` (ours included)."""
        muc = self.client.plugin["xep_0045"]
        nicks = [self.nicks[room]]
        for nick in muc.get_roster(JID(room)):
            real = muc.get_jid_property(JID(room), nick, "jid")
            if real and JID(real).bare.lower() in self.peers:
                nicks.append(nick)
        return nicks

    def overview(self) -> str:
        """The `fleet` reply: per joined room, each gateway of the fleet and its health
        as its presence in the room says (configured peers that are not there, too)."""

        if not self.joined:
            return "This gateway is in no room, so it sees no fleet."
        muc = self.client.plugin["xep_0045"]
        show, status = health_summary(self.session.config.gateway.name, self.session.hub)
        parts = []
        for room in sorted(self.joined):
            members = [Member(self.nicks[room], self.session.xcfg.jid, SHOW.get(show, show or "ok"), status, me=True)]
            seen: set[str] = set()
            for nick in muc.get_roster(JID(room)):
                real = muc.get_jid_property(JID(room), nick, "jid")
                bare = JID(real).bare.lower() if real else ""
                if bare in self.peers and nick != self.nicks[room]:
                    seen.add(bare)
                    other = muc.get_jid_property(JID(room), nick, "show")
                    text = muc.get_jid_property(JID(room), nick, "status") or "(no status)"
                    members.append(Member(nick, bare, SHOW.get(other, other), text))
            members += [Member("", p, "absent", "not in the room") for p in sorted(self.peers - seen)]
            parts.append(overview(room, members))
        return "\n\n".join(parts)
