"""The gateway's XMPP session (slixmpp): roster, presence, chat commands.

It listens to the hub and talks to contacts; it never imports a driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.stanza import Iq, Message, Presence
from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from ..auth import Actor
from ..commands import Aside, Commands, Progress
from ..config import Config, ConfigError
from .bounces import TRANSIENT, Bounces, Sent, alert_for
from . import redact
from .control import Control, forms_in_order
from .adhoc import AdHoc
from .floods import Floods  # the rate limits (gateway/xmpp/floods.py)
from .edge import Edge
from .frontend import FrontEnd
from ..hub import HealthState, Hub, Node, Problem
from .link import Link
from .phone import Phone
from .presence import health_summary
from .rooms import Rooms
from .readouts import SensorData
from .upload import Uploader, attach_oob
from ..values import age
from ..watches import Alert

if TYPE_CHECKING:
    from .omemo import Omemo

log = logging.getLogger("iot_gateway.xmpp")

STRANGER_REPLY = "This gateway only answers its configured contacts."
STRANGER_MEMORY = 1000  # JIDs remembered so each stranger gets the refusal once
PRESENCE_MIN_GAP = 2.0  # seconds between presence updates, so a flapping device cannot flood
MAX_BODY = 4096
MAX_COMMAND_AGE = 60.0  # seconds: older delayed commands are not carried out
# Seconds a delay stamp may be ahead of our clock: beyond it, the gateway's clock (a Pi
# without RTC) or the server's is wrong, and the command's age cannot be known.
MAX_STAMP_AHEAD = 60.0
QUEUE_SIZE = 500  # alerts kept while disconnected; the oldest go first
BLOCK_AFTER = 3  # subscription requests from one stranger before blocking them (XEP-0191)


class Session:
    """One XMPP client connection for the gateway; reconnects until stopped."""

    def __init__(
        self,
        config: Config,
        hub: Hub,
        commands: Commands,
        password: str,
        sources: Iterable[object] = (),
    ):
        if config.xmpp is None:
            raise ValueError("no [xmpp] section in the config")
        self.config = config
        self.xcfg = config.xmpp
        self.hub = hub
        self.commands = commands
        self.online = asyncio.Event()
        self._stopping = False
        self._strangers: OrderedDict[str, None] = OrderedDict()
        self._presence_task: asyncio.Task[None] | None = None
        self._last_presence = 0.0
        self._queue: deque[Alert] = deque(maxlen=QUEUE_SIZE)
        # Alert messages sent (one recipient each), by stanza id, until the server acknowledged
        # them (XEP-0198); those unacknowledged when the link drops are stamped, or sent again.
        self._unacked: OrderedDict[str, Alert] = OrderedDict()
        self._unconfirmed: list[Alert] = []  # held by XEP-0198: re-sent by slixmpp on resumption, by us otherwise
        self._lost: list[Alert] = []  # never left: sent again on the next session, resumed or new
        self._alert_ids: OrderedDict[str, None] = OrderedDict()  # ids of recent alert messages
        # Per contact, commands run one at a time in order of arrival.
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}
        self.floods = Floods(config.gateway, self.xcfg.jid.partition("@")[2])  # per contact and per remote server
        self._throttled: set[str] = set()
        self._sub_requests: dict[str, int] = {}
        # Messages to contacts that bounce (their server down, …): held and sent again (bounces.py).
        self.bounces = Bounces(self._resend_held, self._tell_delayed, self._ping, self.online.is_set,
                               lambda jid: bool(self.client.client_roster[jid].resources))
        commands.unreachable = self.bounces.describe
        # The server answers a command list asked of our bare JID itself, with nothing: `help`
        # names this resource, where they are (docs/webchat.md).
        commands.adhoc = lambda: self.client.boundjid.full
        # Called with (alert, delayed) after an alert went to contacts: rooms post it too.
        self.alert_hooks: list = []
        # Things with a `sinks` list of alert callbacks: watches, timed reverts.
        for source in sources:
            source.sinks.append(self.deliver)  # type: ignore[attr-defined]

        redact.install()  # slixmpp's debug log of the stream must not carry SASL payloads
        # The system's CAs as slixmpp's default context has them, read once (it reads them twice).
        c = slixmpp.ClientXMPP(f"{self.xcfg.jid}/{self.xcfg.resource}", password, ssl_context=ssl.create_default_context())
        self.client = c
        # Forms, disco, version, caps in presence, blocking, stream management, delay.
        for plugin in ("xep_0004", "xep_0030", "xep_0092", "xep_0115", "xep_0191", "xep_0198", "xep_0203"):
            c.register_plugin(plugin)
        # Pings answered; our own keepalive (link.py) sends them, so that one path reconnects.
        c.register_plugin("xep_0199", pconfig={"keepalive": False})
        c.plugin["xep_0030"].add_identity(category="client", itype="bot", name=config.gateway.name)
        c.plugin["xep_0092"].software_name = "iot-gateway"
        c.plugin["xep_0092"].version = _version()
        c.add_filter("out", forms_in_order)  # slixmpp writes form elements out of XEP-0004's order
        c.add_filter("out", self._not_connected)
        # Every stanza cleaned of what XML cannot carry and kept under the server's size limit.
        self.edge = Edge(c)
        c.add_filter("out", self.edge.filter)
        # XEP-0092 answers contacts only: strangers learn nothing about the software.
        c.remove_handler("Software Version")
        c.register_handler(Callback("Software Version", StanzaPath("iq@type=get/software_version"), self._on_version))
        c.add_filter("out", self._remember_sent)
        if self.xcfg.ca_file is not None:
            c.ca_certs = self.xcfg.ca_file
        if not self.xcfg.tls_verify:
            log.warning("TLS certificate verification is OFF (allowed for a loopback server only)")
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            c.ssl_context = ctx
        if self.xcfg.address is not None:
            c.enable_direct_tls = self.xcfg.direct_tls
            c.enable_starttls = not self.xcfg.direct_tls
        c.auto_authorize = None  # we decide: contacts yes, everyone else no
        c.auto_subscribe = False
        c.add_event_handler("session_start", self._on_session_start)
        c.add_event_handler("session_resumed", self._on_session_resumed)
        c.add_event_handler("message", self._on_message)
        c.add_event_handler("message_error", self._on_bounce)
        c.add_event_handler("presence_subscribe", self._on_subscribe)
        c.add_event_handler("presence_available", self._on_available)
        c.add_event_handler("disconnected", self._on_disconnected)
        c.add_event_handler("stanza_acked", self._on_acked)
        # Connecting, keepalive, reconnecting and why it is offline.
        self.link = Link(c, self.xcfg, hub)
        hub.subscribe(self, health=self._on_health, problem=self._on_problem)
        hub.subscribe(self, node=self._on_node)  # a device discovered or removed changes the counts
        self.rooms = Rooms(self)
        self.phone = Phone(self)  # receipts, markers, edits, retractions
        self.omemo = _omemo(self)  # end-to-end encryption (gateway/xmpp/omemo.py); None when off
        if self.omemo is not None:
            commands.omemo = self.omemo
        elif self.xcfg.omemo_unavailable:
            log.info("%s", self.xcfg.omemo_unavailable)
            commands.notes.append(self.xcfg.omemo_unavailable)
        self.adhoc = AdHoc(self)
        self.sensordata = SensorData(self)
        self.control = Control(self)
        self.frontends: list[FrontEnd] = [
            f for f in (self.rooms, self.phone, self.omemo, self.adhoc, self.sensordata, self.control) if f is not None
        ]
        for front in self.frontends:
            front.start()
        # Plots go up through XEP-0363 on our own server; off: sparklines only.
        if self.xcfg.uploads:
            commands.plots.uploads = Uploader(c, self.xcfg.jid.split("@", 1)[1], self.xcfg.ca_file)
        else:
            commands.plots.no_uploads = "picture uploads are off in this gateway ([xmpp] uploads = false)"
        # Problems found while starting, before this session existed: told once it is online.
        for p in list(hub.problems.values()):
            self._on_problem(p.component, p, None)

    # ------------------------------------------------------------ lifecycle

    def connect(self) -> None:
        """Start connecting; `online` is set once the session is up."""
        self._stopping = False
        self.link.connect()

    @property
    def offline_reason(self) -> str | None:
        """Why the session is not up (`XMPP login refused: wrong password for …`), None when unknown or up."""
        return None if self.online.is_set() else self.link.reason

    async def stop(self) -> None:
        """Say goodbye and disconnect; no reconnect afterwards."""
        self._stopping = True
        self.link.close()
        self.hub.unsubscribe_all(self)
        for front in reversed(self.frontends):
            front.stop()
        self.bounces.stop()
        if self._presence_task is not None:
            self._presence_task.cancel()
        if self.online.is_set():
            self.online.clear()
            try:
                self.client.send_presence(ptype="unavailable", pstatus="Gateway stopping")
                await asyncio.wait_for(self.client.disconnect(wait=1.0), 3)
            except (asyncio.TimeoutError, Exception):
                self.client.abort()
        else:
            self.client.abort()

    async def _on_session_start(self, _event: object) -> None:
        c = self.client
        await c.plugin["xep_0115"].update_caps(broadcast=False)  # the caps hash of every feature
        self._send_presence()
        try:
            await c.get_roster(timeout=15)
        except Exception as e:
            log.warning("could not fetch the roster: %s", e)
        self._sync_roster()
        log.info("online as %s", c.boundjid)
        self.online.set()
        # A new session: alerts the old one never got acknowledged are sent again, stamped.
        self._resend(self._unconfirmed + self._lost)
        self._flush_queue()

    def _on_session_resumed(self, _event: object) -> None:
        # XEP-0198: the server kept our session (roster, presence, rooms) and
        # slixmpp re-sent what it had not acknowledged (alerts among it stamped on the drop).
        log.info("session resumed as %s", self.client.boundjid)
        self.online.set()
        self._resend(self._lost)
        self._flush_queue()

    def _on_disconnected(self, reason: object) -> None:
        # The link (link.py) decides when to come back; here: what happens to alerts in flight.
        self.online.clear()
        self._hold_unacked()

    def _hold_unacked(self) -> None:
        """Alerts the server has not acknowledged: those XEP-0198 holds are stamped with their time
        (a resumed session re-sends them late) and kept in case the session cannot be resumed;
        those that never left (queued as the link broke) are sent again on the next session."""
        held = {
            stanza["id"]: stanza
            for _seq, stanza in self.client.plugin["xep_0198"].unacked_queue
            if isinstance(stanza, Message)
        }
        for mid, alert in self._unacked.items():
            stanza = held.get(mid)
            if stanza is not None:
                _stamp(stanza, alert, self.client.boundjid.bare)
                self._unconfirmed.append(alert)
            else:
                self._lost.append(alert)
        self._unacked.clear()
        del self._unconfirmed[:-QUEUE_SIZE]
        del self._lost[:-QUEUE_SIZE]

    def _resend(self, alerts: list[Alert]) -> None:
        self._unconfirmed, self._lost = [], []
        for alert in alerts:
            self._send_alert(alert, delayed=True, hooks=False)

    def _not_connected(self, stanza: StanzaBase) -> StanzaBase | None:
        """Outgoing filter: a stanza dequeued once the socket is gone would raise NotConnectedError
        (a traceback per stanza). Alerts are re-sent by `_hold_unacked`; a reply waits for the next
        session in slixmpp's queue; anything else, and everything while stopping, is dropped."""
        c = self.client
        if c.transport is not None:
            return stanza
        if not self._stopping and isinstance(stanza, Message) and stanza["id"] not in self._alert_ids:
            if not getattr(c, "_session_started", True):
                c.send(stanza)  # held until the session is back
        log.debug("not sent, the connection is gone: %s", stanza)
        return None

    def _on_acked(self, stanza: object) -> None:
        if isinstance(stanza, Message):
            self._unacked.pop(stanza["id"], None)

    def _on_version(self, iq: Iq) -> None:
        """XEP-0092 for contacts; a stranger gets service-unavailable, as if there were no such service."""
        if self.config.contact(iq["from"].bare.lower()) is None:
            log.info("refused a software version query from stranger %s", iq["from"].bare)
            reply = iq.reply()
            reply.error()
            reply["error"]["type"] = "cancel"
            reply["error"]["condition"] = "service-unavailable"
            reply.send()
            return
        version = self.client.plugin["xep_0092"]
        reply = iq.reply()
        reply["software_version"]["name"] = version.software_name
        reply["software_version"]["version"] = version.version
        reply.send()

    # ------------------------------------------------------------ roster

    def _sync_roster(self) -> None:
        """Subscribe to every contact; drop roster entries that are not contacts."""
        roster = self.client.client_roster
        wanted = {c.jid for c in self.config.contacts}
        for jid in list(roster.keys()):
            bare = str(jid).lower()
            # A room's presences put its JID in slixmpp's local roster; it is no contact.
            if bare in self.rooms.jids:
                continue
            if bare not in wanted and bare != self.xcfg.jid.lower():
                log.info("removing %s from the roster: not a configured contact", bare)
                self.client.del_roster_item(bare)
        for jid in wanted:
            item = roster[jid]
            if not item["to"] and not item["pending_out"]:
                item.subscribe()
            if item["pending_in"] and not item["from"]:
                item.authorize()

    def _on_subscribe(self, pres: Presence) -> None:
        bare = pres["from"].bare.lower()
        item = self.client.client_roster[bare]
        if self.config.contact(bare) is None:
            if not self.floods.refuse_stranger(bare):
                return  # left pending on the server: refused when it offers it again, within the budget
            log.info("refused presence subscription from stranger %s", bare)
            item.unauthorize()
            self._sub_requests[bare] = self._sub_requests.get(bare, 0) + 1
            if self._sub_requests[bare] == BLOCK_AFTER:
                asyncio.ensure_future(self._block(bare))
            if len(self._sub_requests) > STRANGER_MEMORY:
                self._sub_requests.pop(next(iter(self._sub_requests)))
            return
        # `subscribed`, then our current presence, health in its status: slixmpp's authorize() sends
        # it, and the server sends it too (RFC 6121 3.1.5), so the contact sees the health at once.
        # Asked back, so a contact who declined our first request is asked again
        # (tests/test_subscriptions.py).
        item.authorize()
        if not item["to"] and not item["pending_out"]:
            item.subscribe()

    async def _block(self, bare: str) -> None:
        try:
            await self.client.plugin["xep_0191"].block([bare], timeout=10)
            log.warning("blocked %s after %d refused subscription requests", bare, BLOCK_AFTER)
        except Exception as e:
            log.info("could not block %s (server without XEP-0191?): %s", bare, e)

    # ------------------------------------------------------------ alerts

    def deliver(self, alert: Alert) -> None:
        """Send an alert to its contacts now, or queue it until the session is back."""
        if not self.online.is_set():
            self._queue.append(alert)
            return
        self._send_alert(alert, delayed=False)

    def _flush_queue(self) -> None:
        while self._queue and self.online.is_set():
            self._send_alert(self._queue.popleft(), delayed=True)

    def _send_alert(
        self, alert: Alert, delayed: bool, hooks: bool = True, answer: bool = False, note: bool = False
    ) -> None:
        """Send an alert (or, with `answer`, an answer that bounced; with `note`, the note on delayed
        ones) to each of its contacts, stamped; held instead for a contact whose server is down."""
        sm = self.client.plugin["xep_0198"]
        for jid in alert.to:
            if self.bounces.holding(jid):
                self.bounces.hold(jid, alert.text, alert.time, alert=not answer)
                continue
            # Cleaned and tidied here too: OMEMO encrypts the text before the edge filter sees it.
            msg = self.client.make_message(mto=jid, mbody=self.edge.text(alert.text), mtype="chat")
            msg["id"] = self.client.new_id()
            self.bounces.sent(msg["id"], jid, alert.text, alert.time, alert=not answer, note=note)
            # XEP-0203 on every alert, even one sent at once: bytes already handed to a server
            # that then stalls arrive whenever it wakes up, and must still say when it happened.
            _stamp(msg, alert, self.client.boundjid.bare)
            if sm.enabled_out:
                self._unacked[msg["id"]] = dataclasses.replace(alert, to=(jid,))
                self._alert_ids[msg["id"]] = None
                while len(self._unacked) > QUEUE_SIZE:
                    self._unacked.popitem(last=False)
                while len(self._alert_ids) > 2 * QUEUE_SIZE:
                    self._alert_ids.popitem(last=False)
            if self.omemo is not None:
                self.omemo.send_alert(msg)  # encrypted to known devices; re-encrypted from the text when resent
            else:
                msg.send()
        if hooks:
            for hook in self.alert_hooks:
                hook(alert, delayed)

    # ------------------------------------------------------------ presence

    def _on_node(self, event: object) -> None:
        """A device was added, removed or renamed while running: presence counts follow."""
        if self.online.is_set() and (self._presence_task is None or self._presence_task.done()):
            self._presence_task = asyncio.ensure_future(self._debounced_presence())

    def _on_health(self, node: Node, old: HealthState) -> None:
        if not self.online.is_set():
            return
        if self._presence_task is None or self._presence_task.done():
            self._presence_task = asyncio.ensure_future(self._debounced_presence())

    def _on_problem(self, component: str, new: Problem | None, old: Problem | None) -> None:
        """A gateway problem appeared, changed or cleared: presence shows it; admins hear when it appears and clears."""
        if self.online.is_set() and (self._presence_task is None or self._presence_task.done()):
            self._presence_task = asyncio.ensure_future(self._debounced_presence())
        if (new is None) == (old is None):
            return  # only its wording changed (another cause): no new message for the same trouble
        text = new.describe() if new is not None else f"{component}: back to ok"
        to = tuple(c.jid for c in self.config.contacts if c.role == "admin" and c.alert_level != "none")
        self.deliver(Alert(text, time.time(), to))

    async def _debounced_presence(self) -> None:
        wait = self._last_presence + PRESENCE_MIN_GAP - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        # A short settle so a burst of changes goes out as one presence.
        await asyncio.sleep(0.2)
        if self.online.is_set():
            self._send_presence()

    def _send_presence(self) -> None:
        show, status = health_summary(self.config.gateway.name, self.hub)
        kwargs = {"pstatus": status}
        if show:
            kwargs["pshow"] = show
        self.client.send_presence(**kwargs)
        self._last_presence = time.monotonic()

    # ------------------------------------------------------------ chat

    async def on_message(self, msg: Message) -> None:
        """Handle a chat message as if it had just arrived (OMEMO hands on decrypted bodiless ones)."""
        await self._on_message(msg)

    def _resend_held(self, sent: Sent) -> None:
        self._send_alert(alert_for(sent), delayed=True, hooks=False, answer=not sent.alert)

    def _tell_delayed(self, jid: str, text: str) -> None:
        self._send_alert(Alert(text, time.time(), (jid,)), delayed=True, hooks=False, note=True)

    def _remember_sent(self, stanza: StanzaBase) -> StanzaBase:
        """Outgoing filter: answers to contacts are remembered by id, so one that bounces is sent
        again (alerts are remembered as they are made). Encrypted ones are not: their text is gone."""
        if isinstance(stanza, Message) and stanza["type"] in ("chat", "normal") and stanza["body"]:
            to = stanza["to"].bare.lower()
            encrypted = any(child.tag.endswith("}encrypted") for child in stanza.xml)
            if not encrypted and self.config.contact(to) is not None:
                if not stanza["id"]:
                    stanza["id"] = self.client.new_id()
                self.bounces.sent(stanza["id"], to, stanza["body"], time.time(), alert=False)
        return stanza

    def _on_available(self, pres: Presence) -> None:
        bare = pres["from"].bare.lower()
        if self.config.contact(bare) is not None:
            self.bounces.reachable(bare)

    async def _ping(self, domain: str) -> bool:
        """Whether `domain`'s server answers (any answer but "cannot reach it" counts)."""
        try:
            await self.client.plugin["xep_0199"].send_ping(domain, timeout=10)
        except IqError as e:
            return e.iq["error"]["condition"] not in TRANSIENT
        except IqTimeout:
            return False
        return True

    def _on_bounce(self, msg: Message) -> None:
        """A message of ours came back as an error (the contact's server is down, …): bounces.py decides."""
        err = msg["error"]
        self.bounces.bounced(str(msg["from"]), msg["id"], err["condition"], err["type"], err["text"])

    async def _on_message(self, msg: Message) -> None:
        if msg["type"] not in ("chat", "normal"):
            return
        sender = msg["from"].bare.lower()
        contact = self.config.contact(sender)
        # Counted before any decryption: a flood of garbage OMEMO costs a contact's budget, not our CPU.
        # (Chat states and receipts, without body or payload, are not worked on and not counted.)
        if contact is not None and (msg["body"] or (self.omemo is not None and self.omemo.encrypted(msg))):
            if not self._within_rate(msg, sender):
                return
        secure = False  # came OMEMO-encrypted: every answer goes back encrypted
        if self.omemo is not None:
            # Before the body check: OMEMO key exchanges have no body. A contact's encrypted message
            # comes back decrypted (its fallback body is never run); strangers' are not decrypted.
            opened = await self.omemo.incoming(msg)
            if opened is None:
                return
            msg, secure = opened
        body = msg["body"]
        if not body:
            return  # chat states, receipts and the like
        if contact is None:
            self._refuse_stranger(msg, sender)
            return
        self.bounces.reachable(sender)  # they reached us: what was held for them goes out now
        stamp = msg["delay"]["stamp"]
        if stamp is not None and stamp.timestamp() - time.time() > MAX_STAMP_AHEAD:
            # The age of a command stamped in our future cannot be known (a Pi without
            # RTC booting with an old clock would call a day-old command fresh): not run.
            ahead = stamp.timestamp() - time.time()
            log.warning("ignored a command from %s stamped %.0f s ahead of this gateway's clock: is the clock wrong?",
                        sender, ahead)
            await self._answer(
                msg,
                f"Ignored a command the server stamped {age(ahead)} ahead of the gateway's clock, so "
                "its age is unknown (is the gateway's clock wrong?); send it again.",
                secure,
            )
            return
        if stamp is not None and time.time() - stamp.timestamp() > MAX_COMMAND_AGE:
            # Sent while the gateway was offline: acting on it now could flip an
            # actuator long after the sender meant to. (A short network drop that
            # XEP-0198 resumes delivers commands only seconds late: those run.)
            await self._answer(msg, "Ignored a command sent while the gateway was offline; send it again.", secure)
            return
        if len(body.encode()) > MAX_BODY:
            await self._answer(msg, f"Message too long (over {MAX_BODY} bytes).", secure)
            return
        self.phone.accepted(msg)  # XEP-0184 receipt, XEP-0333 displayed
        # A `read` after a `set` sees the set's result. A plot gives up its turn once it has its readings:
        # its upload runs beside the next commands, and its picture comes when the upload is done.
        async with self._turn(sender) as aside:
            # An edit of a set, a retraction: answered, never run (in turn: the original is known by then).
            answer = self.phone.instead(msg, sender)
            if answer is not None:
                await self._answer(msg, answer, secure)
                return
            reply = await self.run_command(
                body, Actor(sender, contact.role, "chat"), progress=lambda text: self._answer(msg, text, secure),
                aside=aside,
            )
            self.phone.remember(msg, sender, body, reply)
            if secure:
                await self._answer(msg, reply, secure)  # the picture's URL inside, no OOB in clear
            else:
                attach_oob(msg.reply(reply), reply).send()

    def _within_rate(self, msg: Message, sender: str) -> bool:
        """Count a contact's message; over the limit, one notice (in clear: nothing was decrypted), then silence."""
        notice = self.floods.allow(sender)
        if notice is None:
            self._throttled.discard(sender)
            return True
        if sender not in self._throttled:
            self._throttled.add(sender)
            msg.reply(notice).send()
        return False

    async def _answer(self, msg: Message, text: str, secure: bool) -> None:
        """Reply to a contact's message: OMEMO-encrypted when it came encrypted, else plain."""
        if secure and self.omemo is not None:
            # Encrypted before the edge filter sees it: cleaned and split here.
            for part in self.edge.split(text):
                await self.omemo.reply(msg, part)
        else:
            msg.reply(text).send()

    @contextlib.asynccontextmanager
    async def _turn(self, jid: str) -> AsyncIterator[Aside]:
        """One command of `jid` at a time, in order of arrival (asyncio.Lock wakes waiters first come, first served).
        Yields a function that ends the turn early, for a command that goes on beside the next ones."""
        lock, users = self._turns.get(jid) or (asyncio.Lock(), 0)
        self._turns[jid] = (lock, users + 1)
        held = False

        def release() -> None:
            nonlocal held
            if held:
                held = False
                lock.release()

        try:
            await lock.acquire()
            held = True
            yield release
        finally:
            release()
            lock, users = self._turns[jid]
            if users == 1:
                del self._turns[jid]
            else:
                self._turns[jid] = (lock, users - 1)

    async def run_command(
        self, text: str, actor: Actor, progress: Progress | None = None, aside: Aside | None = None
    ) -> str:
        """Run a chat command; an unexpected failure is logged and answered, never raised.
        `progress` sends an interim message ("sent, waiting for the device") before the reply;
        `aside` is called when the command goes on beside the next ones (Commands.run)."""
        try:
            return await self.commands.run(text.strip(), actor, progress=progress, aside=aside)
        except Exception:
            log.exception("command %r from %s failed", text[:100], actor.jid)
            return "Internal error while running that command; it has been logged."

    def allow_rate(self, jid: str) -> bool:
        """Count a command of `jid`: False over its limit or its remote server's (gateway/xmpp/floods.py)."""
        return self.floods.allow(jid) is None

    def _refuse_stranger(self, msg: Message, sender: str) -> None:
        if sender in self._strangers or not self.floods.refuse_stranger(sender):
            return
        log.info("refused a message from stranger %s", sender)
        self._strangers[sender] = None
        if len(self._strangers) > STRANGER_MEMORY:
            self._strangers.popitem(last=False)
        msg.reply(STRANGER_REPLY).send()


def _stamp(msg: Message, alert: Alert, by: str) -> None:
    """Mark a message as delayed (XEP-0203): it tells when the alert happened."""
    msg["delay"]["stamp"] = dt.datetime.fromtimestamp(alert.time, dt.timezone.utc)
    msg["delay"]["from"] = by


def _omemo(session: Session) -> "Omemo | None":
    """OMEMO for the session, unless `[xmpp] omemo = "off"`; its packages are imported only then."""
    policy = session.xcfg.omemo
    if policy == "off":
        return None
    try:
        from .omemo import STORE, Omemo
    except ImportError as e:
        raise ConfigError([f"xmpp.omemo: {policy!r} needs the OMEMO packages ({e}); set omemo = \"off\""]) from None
    return Omemo(session, policy, session.config.gateway.state_dir / STORE)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("iot-gateway")
    except Exception:
        return "0"
