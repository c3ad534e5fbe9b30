"""The gateway's XMPP session (slixmpp): roster, presence, chat commands.

It listens to the hub and talks to contacts; it never imports a driver.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Iterable

import slixmpp
from slixmpp.stanza import Message, Presence

from .auth import Actor
from .commands import Commands
from .config import Config
from . import redact
from .control import Control, forms_in_order
from .adhoc import AdHoc
from .hub import HealthState, Hub, Node, Problem
from .rooms import Rooms
from .sensordata import SensorData
from .upload import Uploader, attach_oob
from .watches import Alert

log = logging.getLogger("iot_gateway.xmpp")

STRANGER_REPLY = "This gateway only answers its configured contacts."
STRANGER_MEMORY = 1000  # JIDs remembered so each stranger gets the refusal once
PRESENCE_MIN_GAP = 2.0  # seconds between presence updates, so a flapping device cannot flood
MAX_BODY = 4096
RECONNECT_MAX = 60.0
MAX_COMMAND_AGE = 60.0  # seconds: older delayed commands are not carried out
QUEUE_SIZE = 500  # alerts kept while disconnected; the oldest go first
BLOCK_AFTER = 3  # subscription requests from one stranger before blocking them (XEP-0191)


def health_summary(name: str, hub: Hub) -> tuple[str | None, str]:
    """(show, status) for the gateway's presence from the devices' health and the gateway's own problems."""
    nodes = list(hub.nodes.values())
    bad = [n for n in nodes if not n.health.healthy]
    ok = len(nodes) - len(bad)
    problems = [p.describe() for p in hub.problems.values()]  # `history: not saved: …`
    if not bad:
        text = f"{name}: {ok}/{len(nodes)} devices OK"
        return ("away", " · ".join([text, *problems])) if problems else (None, text)
    details = " · ".join([*(f"{n.id}: {n.health.describe()}" for n in bad), *problems])
    show = "xa" if ok == 0 else "away"
    return show, f"{name}: {ok}/{len(nodes)} OK · {details}"


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
        self._reconnect_task: asyncio.Task[None] | None = None
        self._attempt = 0
        self._queue: deque[Alert] = deque(maxlen=QUEUE_SIZE)
        self._recent: dict[str, deque[float]] = {}
        self._throttled: set[str] = set()
        self._sub_requests: dict[str, int] = {}
        # Called with (alert, delayed) after an alert went to contacts: rooms post it too.
        self.alert_hooks: list = []
        # Things with a `sinks` list of alert callbacks: watches, timed reverts.
        for source in sources:
            source.sinks.append(self.deliver)  # type: ignore[attr-defined]

        redact.install()  # slixmpp's debug log of the stream must not carry SASL payloads
        c = slixmpp.ClientXMPP(f"{self.xcfg.jid}/{self.xcfg.resource}", password)
        self.client = c
        # Forms, disco, version, caps in presence, blocking, stream management, delay.
        for plugin in ("xep_0004", "xep_0030", "xep_0092", "xep_0115", "xep_0191", "xep_0198", "xep_0203"):
            c.register_plugin(plugin)
        # The plugin arms the keepalive on each session start and disarms it on disconnect.
        c.register_plugin(
            "xep_0199", pconfig={"keepalive": True, "interval": self.xcfg.keepalive, "timeout": 30}
        )
        c.plugin["xep_0030"].add_identity(category="client", itype="bot", name=config.gateway.name)
        c.plugin["xep_0092"].software_name = "iot-gateway"
        c.plugin["xep_0092"].version = _version()
        c.add_filter("out", forms_in_order)  # slixmpp writes form elements out of XEP-0004's order
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
        c.add_event_handler("presence_subscribe", self._on_subscribe)
        c.add_event_handler("disconnected", self._on_disconnected)
        c.add_event_handler("failed_auth", self._on_failed_auth)
        c.add_event_handler("connection_failed", self._on_connection_failed)
        hub.subscribe(health=self._on_health, problem=self._on_problem)
        self.rooms = Rooms(self)
        self.adhoc = AdHoc(self)
        self.sensordata = SensorData(self)
        self.control = Control(self)
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
        addr = self.xcfg.address
        if addr is None:
            self.client.connect()
        else:
            self.client.connect(addr[0], addr[1])

    async def stop(self) -> None:
        """Say goodbye and disconnect; no reconnect afterwards."""
        self._stopping = True
        self.hub.unsubscribe(self._on_health)
        self.hub.unsubscribe(self._on_problem)
        for task in (self._presence_task, self._reconnect_task):
            if task is not None:
                task.cancel()
        self.client.cancel_connection_attempt()
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
        self._attempt = 0
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
        self._flush_queue()

    def _on_session_resumed(self, _event: object) -> None:
        # XEP-0198: the server kept our session (roster, presence, rooms) and
        # slixmpp re-sent what it had not acknowledged.
        self._attempt = 0
        log.info("session resumed as %s", self.client.boundjid)
        self.online.set()
        self._flush_queue()

    def _on_disconnected(self, reason: object) -> None:
        self.online.clear()
        if self._stopping:
            return
        log.warning("disconnected from the XMPP server: %s", reason)
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._stopping:
            return
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        self._attempt += 1
        # Jittered exponential backoff: ~1, 2, 4, 8 … s, capped at a minute.
        delay = min(RECONNECT_MAX, 2 ** min(self._attempt - 1, 6) * random.uniform(0.75, 1.25))
        log.info("reconnecting in %.1f s", delay)
        await asyncio.sleep(delay)
        if not self._stopping:
            self.connect()

    def _on_failed_auth(self, _event: object) -> None:
        log.error("the XMPP server refused the gateway's password for %s", self.xcfg.jid)

    def _on_connection_failed(self, err: object) -> None:
        log.warning("cannot reach the XMPP server: %s", err)
        # Take retries over from slixmpp, whose own backoff grows to 5 minutes.
        self.client.cancel_connection_attempt()
        self._schedule_reconnect()

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
            log.info("refused presence subscription from stranger %s", bare)
            item.unauthorize()
            self._sub_requests[bare] = self._sub_requests.get(bare, 0) + 1
            if self._sub_requests[bare] == BLOCK_AFTER:
                asyncio.ensure_future(self._block(bare))
            if len(self._sub_requests) > STRANGER_MEMORY:
                self._sub_requests.pop(next(iter(self._sub_requests)))
            return
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

    def _send_alert(self, alert: Alert, delayed: bool) -> None:
        for jid in alert.to:
            msg = self.client.make_message(mto=jid, mbody=alert.text, mtype="chat")
            if delayed:
                # XEP-0203: mark when it happened, not when the link came back.
                msg["delay"]["stamp"] = dt.datetime.fromtimestamp(alert.time, dt.timezone.utc)
                msg["delay"]["from"] = self.client.boundjid.bare
            msg.send()
        for hook in self.alert_hooks:
            hook(alert, delayed)

    # ------------------------------------------------------------ presence

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

    async def _on_message(self, msg: Message) -> None:
        if msg["type"] not in ("chat", "normal"):
            return
        body = msg["body"]
        if not body:
            return  # chat states, receipts and the like
        sender = msg["from"].bare.lower()
        contact = self.config.contact(sender)
        if contact is None:
            self._refuse_stranger(msg, sender)
            return
        stamp = msg["delay"]["stamp"]
        if stamp is not None and time.time() - stamp.timestamp() > MAX_COMMAND_AGE:
            # Sent while the gateway was offline: acting on it now could flip an
            # actuator long after the sender meant to. (A short network drop that
            # XEP-0198 resumes delivers commands only seconds late: those run.)
            msg.reply("Ignored a command sent while the gateway was offline; send it again.").send()
            return
        if len(body.encode()) > MAX_BODY:
            msg.reply(f"Message too long (over {MAX_BODY} bytes).").send()
            return
        if not self.allow_rate(sender):
            if sender not in self._throttled:
                self._throttled.add(sender)
                g = self.config.gateway
                msg.reply(
                    f"Slow down: at most {g.rate_limit} commands per {g.rate_window:g} s. "
                    "Ignoring your messages until then."
                ).send()
            return
        self._throttled.discard(sender)
        reply = await self.run_command(body, Actor(sender, contact.role, "chat"))
        attach_oob(msg.reply(reply), reply).send()

    async def run_command(self, text: str, actor: Actor) -> str:
        """Run a chat command; an unexpected failure is logged and answered, never raised."""
        try:
            return await self.commands.run(text.strip(), actor)
        except Exception:
            log.exception("command %r from %s failed", text[:100], actor.jid)
            return "Internal error while running that command; it has been logged."

    def allow_rate(self, jid: str) -> bool:
        """Per-JID rate limit: at most `rate_limit` commands per `rate_window` seconds."""
        g = self.config.gateway
        now = time.monotonic()
        q = self._recent.setdefault(jid, deque())
        while q and now - q[0] > g.rate_window:
            q.popleft()
        if len(q) >= g.rate_limit:
            return False
        q.append(now)
        if len(self._recent) > STRANGER_MEMORY:
            self._recent.pop(next(iter(self._recent)))
        return True

    def _refuse_stranger(self, msg: Message, sender: str) -> None:
        log.info("ignored a message from stranger %s", sender)
        if sender in self._strangers:
            return
        self._strangers[sender] = None
        if len(self._strangers) > STRANGER_MEMORY:
            self._strangers.popitem(last=False)
        msg.reply(STRANGER_REPLY).send()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("iot-gateway")
    except Exception:
        return "0"
