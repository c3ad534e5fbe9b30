"""Team rooms (XEP-0045): the gateway joins them, posts health changes and
alerts there, and answers commands addressed to its nick (`gw: read weather.temp`)
from occupants whose real JID is a contact, with that contact's role."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import TYPE_CHECKING

from slixmpp import JID
from slixmpp.stanza import Message

from .auth import Actor
from .watches import Alert

if TYPE_CHECKING:
    from .xmpp import Session

log = logging.getLogger("iot_gateway.rooms")

JOIN_TIMEOUT = 20.0


class Rooms:
    """Joins `[xmpp] rooms` on every session start and serves commands there."""

    def __init__(self, session: "Session"):
        self.session = session
        self.client = session.client
        self.rooms = [JID(r) for r in session.xcfg.rooms]
        self.nick = session.xcfg.nick
        self.joined: set[str] = set()
        if not self.rooms:
            return
        self.client.register_plugin("xep_0045")
        self.client.add_event_handler("session_start", self._on_session_start)
        self.client.add_event_handler("disconnected", lambda _e: self.joined.clear())
        self.client.add_event_handler("groupchat_message", self._on_message)
        session.alert_hooks.append(self.post_alert)

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
        if 201 in result[0]["muc"]["status_codes"]:
            # We created the room: accept the server's default configuration (an "instant room").
            try:
                form = self.client.plugin["xep_0004"].make_form(ftype="submit")
                await muc.set_room_config(room, form)
            except Exception as e:
                log.warning("could not unlock new room %s: %s", room, e)
        self.joined.add(room.bare)
        log.info("joined room %s as %s", room, self.nick)

    def post_alert(self, alert: Alert, delayed: bool) -> None:
        """Post an alert's text in every joined room."""
        for room in self.joined:
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
        reply = await self.session.run_command(text, Actor(contact.jid, contact.role, "room"))
        self.client.send_message(mto=room, mbody=f"{nick}: {reply}", mtype="groupchat")

    def _addressed(self, body: str) -> str | None:
        """The command in `gw: read x` / `gw, read x`, or None when not addressed to us."""
        n = len(self.nick)
        if body[:n].lower() == self.nick.lower() and body[n:n + 1] in (":", ","):
            return body[n + 1:].strip()
        return None
