"""A plain XMPP client for tests: what a person's phone would be."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path

import slixmpp
from slixmpp.util import bytes as utf8
from slixmpp.util.sasl.mechanisms import SCRAM
from slixmpp.xmlstream import StanzaBase

from tests import schema

TIMEOUT = 10.0
LOGIN_TIMEOUT = 30.0  # TLS and SCRAM on a 2-core machine under load can take many seconds


def pbkdf2_hi(self: SCRAM, text: str | bytes, salt: bytes, iterations: int) -> bytes:
    """SCRAM's Hi() is PBKDF2-HMAC: the same bytes as slixmpp's loop in Python, in C (30 ms less a login)."""
    return hashlib.pbkdf2_hmac(self.hash().name, utf8(text), salt, iterations)


# Every login in the test process (the peers' and the gateways' run in process) costs
# 10,000 HMACs; the suite logs in thousands of times. Checked against the original in test_peer.py.
slow_hi = SCRAM.Hi
SCRAM.Hi = pbkdf2_hi  # type: ignore[method-assign]
_contexts: dict[tuple[Path, int], ssl.SSLContext] = {}


def tls_context(ca_file: Path) -> ssl.SSLContext | None:
    """A client context that trusts `ca_file` only, made once per file (and version of it): slixmpp's
    own default loads the system's CA bundle twice for each client (50 ms a login), which no test needs.
    None (slixmpp's default) when there is no such file."""
    try:
        key = (Path(ca_file), Path(ca_file).stat().st_mtime_ns)
    except OSError:
        return None
    if key not in _contexts:
        _contexts[key] = ssl.create_default_context(cafile=str(ca_file))
    return _contexts[key]


class Peer:
    """A slixmpp client that records the messages and presences it receives."""

    def __init__(self, jid: str, password: str, address: str, ca_file: Path, gateway: str | None = None):
        self.client = slixmpp.ClientXMPP(jid, password, ssl_context=tls_context(ca_file))
        # Every stanza from the gateway (from anyone when `gateway` is None) is
        # checked against the XEP schemas before any handler sees it.
        self.gateway = gateway
        self.draft_ids: set[str] = set()  # XEP-0323 requests this peer made with `id` (older drafts)
        self.client.add_filter("in", self._validate)
        self.client.add_filter("out", self._note_draft_id)
        for plugin in ("xep_0030", "xep_0004", "xep_0045", "xep_0050", "xep_0199", "xep_0203"):
            self.client.register_plugin(plugin)
        self.client.ca_certs = ca_file
        self.client.enable_direct_tls = False
        self.client.auto_authorize = True
        self.client.auto_subscribe = False
        host, port = address.rsplit(":", 1)
        self.address = (host, int(port))
        self.messages: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
        self.room_messages: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
        self.presences: list[slixmpp.Presence] = []
        self.presence_event = asyncio.Event()
        self._started = asyncio.Event()
        self.client.add_event_handler("session_start", self._on_start)
        self.client.add_event_handler("message", self._on_message)
        self.client.add_event_handler("presence", self._on_presence)

    @property
    def jid(self) -> str:
        return self.client.boundjid.bare

    def _validate(self, stanza: StanzaBase) -> StanzaBase:
        frm = slixmpp.JID(stanza.xml.get("from") or "")
        if frm.bare and (self.gateway is None or frm.bare == self.gateway):
            kind = stanza.xml.tag.rpartition("}")[2]
            summary = f"<{kind} type={stanza.xml.get('type')!r}> from {frm} to {self.jid}"
            schema.check(stanza.xml, summary, frozenset(self.draft_ids))
        return stanza

    def _note_draft_id(self, stanza: StanzaBase) -> StanzaBase:
        if (rid := schema.draft_id(stanza.xml)) is not None:
            self.draft_ids.add(rid)
        return stanza

    async def _on_start(self, _e: object) -> None:
        self.client.send_presence()
        await self.client.get_roster()
        self._started.set()

    def _on_message(self, msg: slixmpp.Message) -> None:
        if msg["type"] in ("chat", "normal", "error") and msg["body"]:
            self.messages.put_nowait(msg)
        elif msg["type"] == "groupchat" and msg["body"]:
            self.room_messages.put_nowait(msg)

    def _on_presence(self, pres: slixmpp.Presence) -> None:
        self.presences.append(pres)
        self.presence_event.set()

    async def start(self) -> "Peer":
        self.client.connect(*self.address)
        await asyncio.wait_for(self._started.wait(), LOGIN_TIMEOUT)
        return self

    async def stop(self) -> None:
        try:
            await asyncio.wait_for(self.client.disconnect(wait=0.5), 3)
        except Exception:
            self.client.abort()

    def drain(self) -> None:
        """Forget messages received so far."""
        while not self.messages.empty():
            self.messages.get_nowait()

    async def ask(self, to: str, body: str, timeout: float = TIMEOUT) -> str:
        """Send a chat message and return the body of the next message from `to`."""
        self.drain()
        self.client.send_message(mto=to, mbody=body, mtype="chat")
        return await self.reply_from(to, timeout)

    async def reply_from(self, frm: str, timeout: float = TIMEOUT) -> str:
        """The body of the next chat message from the bare JID `frm`."""
        return (await self.message_from(frm, timeout))["body"]

    async def message_from(
        self, frm: str, timeout: float = TIMEOUT, match: Callable[[str], bool] = lambda body: True
    ) -> slixmpp.Message:
        """The next chat message from the bare JID `frm` whose body passes `match` (others are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.messages.get()
                if msg["from"].bare == frm and match(msg["body"]):
                    return msg

    async def ask_for(self, to: str, body: str, expect: str | Callable[[str], bool], timeout: float = TIMEOUT) -> str:
        """Send a chat message and return the first body from `to` that is the answer: one that
        starts with `expect`, or passes it. Alerts and one-time notices that arrive meanwhile
        are skipped, not taken for the answer."""
        self.drain()
        self.client.send_message(mto=to, mbody=body, mtype="chat")
        return await self.reply_matching(to, expect, timeout)

    async def reply_matching(self, frm: str, expect: str | Callable[[str], bool], timeout: float = TIMEOUT) -> str:
        """The body of the next chat message from `frm` that starts with `expect` (or passes it)."""
        match = expect if callable(expect) else lambda b: b.startswith(expect)
        return (await self.message_from(frm, timeout, match))["body"]

    async def join(self, room: str, nick: str) -> None:
        """Join a MUC room."""
        await self.client.plugin["xep_0045"].join_muc_wait(room, nick, maxstanzas=0, timeout=TIMEOUT)

    async def room_said(self, room: str, nick: str, timeout: float = TIMEOUT) -> str:
        """The body of the next groupchat message from `nick` in `room`."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.room_messages.get()
                if msg["from"].bare == room and msg["from"].resource == nick:
                    return msg["body"]

    async def presence_from(self, frm: str, pred=lambda p: True, timeout: float = TIMEOUT) -> slixmpp.Presence:
        """Wait for a presence from `frm` matching `pred` (already received ones count)."""
        async with asyncio.timeout(timeout):
            while True:
                for p in self.presences:
                    if p["from"].bare == frm and pred(p):
                        return p
                self.presence_event.clear()
                await self.presence_event.wait()
