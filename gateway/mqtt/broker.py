"""The one connection to the `[mqtt]` broker that every MQTT user shares: the `Broker`.

Its users are the MQTT-based drivers (`mqtt`, `zigbee2mqtt`, `tasmota` in devices/) and
the Home Assistant export (gateway/mqtt/homeassistant.py); the first to ask creates it
(`Broker.shared`), the last to `leave` closes it. It is a paho client driven from the
event loop (no paho thread): the socket is read on `add_reader`, messages are routed to
their users' handlers right there, and what a turn queued (PUBACKs, commands) goes out
in one write.

The session is persistent (MQTT 3.1.1, clean session off, QoS 1
subscriptions, a stable client id), so the broker keeps what devices publish
while the gateway is away and delivers it when the gateway comes back.
Command topics (Home Assistant's `…/set`) are the exception: a command is
run now or never, so they are subscribed at QoS 0 (Mosquitto keeps no QoS 0
message for an offline client: `queue_qos0_messages false`), and a command
that is retained, or arrives before this connection's subscription to it is
confirmed (kept from an older session), is dropped and logged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ..config import Config, MqttSection
from ..hub import Hub
from ..noise import Throttle
from .client import LoopClient, accepts_anonymous, describe

log = logging.getLogger("iot_gateway.mqtt")

SHARED_KEY = "mqtt"
QOS = 1
RECONNECT_MIN = 1.0  # seconds; the wait doubles after each failure...
RECONNECT_MAX = 30.0  # ...up to this, and goes back to RECONNECT_MIN only once a connection held STABLE s
STABLE = 60.0  # seconds a connection must stay up before the backoff resets
KICKED_WITHIN = 30.0  # a connection the broker closes this soon after accepting it...
KICKED_TIMES = 3  # ...this many times in a row: another client uses our client id
TWIN_WAIT = 300.0  # seconds between attempts while another client seems to use our client id
PROBLEM = "mqtt"  # the component name in the hub's problems
OPEN_PROBLEM = "broker"  # the hub's problem when the broker lets clients in without a password
OPEN_BROKER = (
    "the broker accepts clients without a password: anyone on the network can fake readings "
    "and send commands; give it a password_file and an acl_file (docs/mqtt.md)"
)
READ_BATCH = 500  # packets handled per event-loop turn, so a flood cannot starve the loop
START_GRACE = 2.0  # seconds to wait for every mqtt device to attach before connecting anyway
STOP_TIMEOUT = 2.0  # seconds to wait for the broker to take the "offline" status at stop
MATCH_CACHE = 4096  # topics whose matching routes are remembered
ONLINE, OFFLINE = "online", "offline"

Handler = Callable[[str, str, bytes], None]  # (subscription, topic, payload)
F = TypeVar("F", bound=Callable[..., None])


class MqttError(Exception):
    """A command that did not reach the broker, or an MQTT setup problem; the message says why."""


class Sharing(Protocol):
    """Where the one broker is kept between its users: the drivers' `Context` (devices/base.py)."""

    hub: Hub
    config: Config
    shared: dict[str, Any]
    guest: bool  # another process runs this config: take none of its MQTT session


def default_client_id(config: Config) -> str:
    """`[mqtt] client_id`, else "iot-gateway-" and `[gateway] id` (never the JID: topics are seen by every client)."""
    if config.mqtt is not None and config.mqtt.client_id:
        return config.mqtt.client_id
    return f"iot-gateway-{config.gateway.id}"


# ---------------------------------------------------------------- the shared client


def _guarded(fn: F) -> F:
    """Wrap a paho callback so that it never raises into paho's read of a packet."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("mqtt: error in %s (ignored)", fn.__name__)

    return wrapper  # type: ignore[return-value]


@runtime_checkable
class BrokerUser(Protocol):
    """What shares the broker: a driver (an `mqtt` device, a Zigbee2MQTT bridge, Tasmota
    discovery) told when the connection comes and goes."""

    id: str

    def broker_up(self) -> None:
        """The connection is up (again): report health accordingly."""

    def broker_down(self, reason: str) -> None:
        """The connection is down, for `reason`."""


@dataclass
class _Route:
    """Messages matching `sub` go to `handler`, on behalf of `owner` (a driver)."""

    owner: object
    sub: str
    handler: Handler
    command: bool = False  # True: only what is published now, while we are subscribed (never a kept copy)


class Broker:
    """One connection to the `[mqtt]` broker, shared by every mqtt device (and by later drivers).

    The surface is small: `route(owner, filter, handler)` to receive, `await
    publish(topic, payload, retain)` to send with QoS 1 and the broker's PUBACK.
    paho does the protocol, but its network loop is this event loop: the socket
    is on `add_reader`, handlers run directly in the read (a QoS 1 message is
    acknowledged after its handler returned, so after its reading is in the
    hub), at most READ_BATCH packets per turn so a flood cannot starve the
    loop, and what a turn queued goes out in one write. Only opening a
    connection (DNS, TCP, TLS handshake) runs in a worker thread.
    """

    def __init__(
        self,
        cfg: MqttSection,
        client_id: str,
        loop: asyncio.AbstractEventLoop,
        expected: set[str],
        persistent: bool = True,
    ):
        self.cfg = cfg
        self.client_id = client_id
        self.persistent = persistent  # False: a clean session, nothing queued for us while away
        self.status_topic = f"{client_id}/status"
        self.loop = loop
        self._loop_thread = threading.get_ident()
        self.hub: Hub | None = None  # for gateway-level problems (a twin using our client id)
        self.connected = False
        self.reason = f"connecting to {cfg.url}"
        self._failed = False  # True once a connection attempt failed or the connection was lost
        self._expected = expected
        self._users: list[BrokerUser] = []
        self._routes: list[_Route] = []
        self._matches: dict[str, list[_Route]] = {}  # topic -> matching routes
        self._subs: dict[str, None] = {}
        self._commands: set[str] = set()  # filters of command routes: QoS 0, nothing kept for later
        self._live: set[str] = set()  # command filters whose SUBACK came on this connection
        self._throttle = Throttle(logger=log)
        self._sub_mids: dict[int, list[str]] = {}
        self.refused: dict[str, str] = {}  # topic filter -> why the broker refused it (SUBACK 0x80)
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._started = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: Any = None  # the socket on add_reader, while there is one
        self._gone = asyncio.Event()  # set when the socket closes
        self._flush_due = False
        self._wleft = b""  # bytes the kernel did not take yet
        self._writer = False  # the socket is on add_writer
        self._misc: asyncio.TimerHandle | None = None
        self._up_since: float | None = None  # monotonic time of the last CONNACK
        self._stable: asyncio.TimerHandle | None = None
        self._delay = RECONNECT_MIN
        self._kicked = 0  # connections in a row the broker closed soon after accepting them
        self.twin = False  # another client seems to use our client id
        self.wait = 0.0  # seconds of the current wait before connecting again
        self._probe: asyncio.Task[None] | None = None  # is the broker open to anonymous clients?
        self.open: bool | None = None  # whether it is, once known (None: not known yet, or unknowable)
        self.client = self._make_client()

    @classmethod
    def shared(cls, ctx: Sharing) -> Broker:
        """The broker of `ctx`, created on first use."""
        broker = ctx.shared.get(SHARED_KEY)
        if broker is None:
            if ctx.config.mqtt is None:
                raise MqttError("no [mqtt] section: mqtt devices need the broker url")
            # Every driver on this broker (mqtt, zigbee2mqtt, tasmota …) declares the [mqtt] section.
            expected = {d.id for d in ctx.config.devices if SHARED_KEY in d.sections}
            client_id = default_client_id(ctx.config)
            if ctx.guest:  # never push the gateway off its client id, nor drain its persistent session
                client_id = f"{client_id}-console-{os.getpid()}"
            broker = cls(ctx.config.mqtt, client_id, asyncio.get_running_loop(), expected, not ctx.guest)
            broker.hub = ctx.hub
            broker._throttle.noise = ctx.hub.noise
            ctx.shared[SHARED_KEY] = broker
        return broker

    def _make_client(self) -> LoopClient:
        cfg = self.cfg
        c = LoopClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=not self.persistent,
            protocol=paho.MQTTv311,
        )
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.resolve_password())
        if cfg.tls:
            c.tls_set(ca_certs=str(cfg.ca_file) if cfg.ca_file else None)
        c.will_set(self.status_topic, OFFLINE, qos=QOS, retain=True)
        c.suppress_exceptions = True  # a failing handler must not end the read with the packet half-done
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish_fast = self._deliver  # most messages: read by LoopClient.publishes
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = None
        c.connect_async(cfg.host, cfg.port, cfg.keepalive)
        return c

    # ------------------------------------------------------------ devices

    def attach(self, user: BrokerUser) -> None:
        """Register a driver; connecting starts once every device of the config on this broker is attached.

        Waiting for all of them means the messages the broker kept for us
        while we were away find their device when they arrive. The user is
        told at once if the connection is already up, or already failed.
        """
        self._users.append(user)
        if self.connected:
            user.broker_up()
        elif self.failed:
            user.broker_down(self.reason)
        if self._started:
            return
        if {u.id for u in self._users} >= self._expected:
            self._begin()
        elif self._timer is None:
            self._timer = self.loop.call_later(START_GRACE, self._begin)

    def detach(self, user: BrokerUser) -> bool:
        """Forget a driver and its routes; True when it was the last one."""
        if user in self._users:
            self._users.remove(user)
        self._routes = [r for r in self._routes if r.owner is not user]
        self._matches = {}
        return not self._users

    async def leave(self, ctx: Sharing, user: BrokerUser) -> None:
        """`detach` a stopping user; the last one closes the connection and frees `ctx`'s slot."""
        if self.detach(user):
            if ctx.shared.get(SHARED_KEY) is self:
                del ctx.shared[SHARED_KEY]
            try:
                await self.close()
            except Exception:
                log.exception("mqtt: error while disconnecting")

    def unroute(self, owner: object, sub: str) -> None:
        """Stop `owner`'s routes on `sub` (a device gone at run time); unsubscribe when nobody else uses it."""
        self._routes = [r for r in self._routes if not (r.owner is owner and r.sub == sub)]
        self._matches = {}
        if sub in self._subs and not any(r.sub == sub for r in self._routes):
            del self._subs[sub]
            self._commands.discard(sub)
            self._live.discard(sub)
            self.refused.pop(sub, None)
            if self.connected:
                self.client.unsubscribe(sub)

    def route(self, owner: object, sub: str, handler: Handler, command: bool = False) -> None:
        """Call `handler(sub, topic, payload)` on the event loop for each message matching `sub`.

        `command=True` for topics that make the gateway act: subscribed at QoS 0 so that the
        broker keeps nothing for us while we are away, and only messages published while this
        connection is subscribed are delivered (no retained copy, nothing kept from before).
        """
        self._routes.append(_Route(owner, sub, handler, command))
        self._matches = {}
        if command:
            self._commands.add(sub)
        if sub not in self._subs:
            self._subs[sub] = None
            if self.connected:
                self._subscribe([sub])

    def _begin(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._started or self._closed:
            return
        self._started = True
        log.info("mqtt: connecting to %s as %s", self.cfg.url, self.client_id)
        self._task = self.loop.create_task(self._run(), name="mqtt-connection")

    # ------------------------------------------------------------ commands

    async def publish(self, topic: str, payload: str, retain: bool, timeout: float | None = None) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK; MqttError when it does not come."""
        if self._closed:
            raise MqttError("the MQTT client is stopped")
        if not self.connected:
            raise MqttError(f"not connected to the MQTT broker ({self.reason})")
        info = self.client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"could not publish to {topic}: {paho.error_string(info.rc)}")
        fut: asyncio.Future[None] = self.loop.create_future()
        self._acks[info.mid] = fut
        wait = self.cfg.command_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(fut, wait)
        except TimeoutError:
            raise MqttError(
                f"the broker did not confirm within {wait:g} s (no PUBACK); the command may still be delivered"
            ) from None
        finally:
            self._acks.pop(info.mid, None)

    # ------------------------------------------------------------ the connection

    async def _run(self) -> None:
        """Connect, wait for the connection to end, wait a while, again; until `close`."""
        while not self._closed:
            self._gone.clear()
            self.client.reset_buffers()
            opening = self.loop.run_in_executor(None, self._open)
            try:
                await asyncio.shield(opening)
            except asyncio.CancelledError:
                # Stopped mid-connect: close the socket once the worker has made it.
                opening.add_done_callback(lambda f: f.cancelled() or f.exception() or self._close_socket())
                raise
            except Exception as e:
                self._unreachable(describe(e))
            else:
                self._plug()
                await self._gone.wait()
            if self._closed:
                return
            self.wait = self._next_wait()
            await asyncio.sleep(self.wait)

    def _open(self) -> None:
        """Open the socket and queue CONNECT (a worker thread: DNS, TCP and TLS may block)."""
        self.client.reconnect()

    def _plug(self) -> None:
        """The socket is open: read it on the loop, send the queued CONNECT, start keepalive checks."""
        sock = self.client.socket()
        if sock is None:
            self._gone.set()
            return
        self._sock = sock
        self.loop.add_reader(sock, self._readable)
        self._schedule_flush()
        self._misc = self.loop.call_later(self._misc_every(), self._tick)

    def _misc_every(self) -> float:
        # paho pings once `keepalive` seconds passed without traffic; checking a quarter of that
        # often sends the ping in time (brokers allow 1.5 × keepalive) with few wake-ups.
        return max(1.0, self.cfg.keepalive / 4)

    def _tick(self) -> None:
        self._misc = None
        if self._sock is None:
            return
        self.client.loop_misc()
        self._schedule_flush()
        if self._sock is not None:
            self._misc = self.loop.call_later(self._misc_every(), self._tick)

    def _readable(self) -> None:
        """Handle up to READ_BATCH packets; more waiting (in the socket or our buffer) get the next turn."""
        if self.client.read(READ_BATCH):
            self.loop.call_soon(self._readable)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho queued a packet. From the worker thread (CONNECT) `_plug` sends it.
        if self._sock is not None:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send everything paho queued this turn in one write; the rest when the socket can take it."""
        self._flush_due = False
        c = self.client
        if self._sock is None:
            return
        c.batch = bytearray(self._wleft)
        try:
            c.loop_write()  # moves every queued packet into c.batch (a DISCONNECT closes the socket)
        finally:
            data, c.batch = bytes(c.batch), None
        sock = c.socket()
        if sock is None:
            self._wleft = b""
            return
        sent = 0
        try:
            sent = sock.send(data) if data else 0
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError:
            self._wleft = b""
            self._close_socket()
            return
        self._wleft = data[sent:]
        if self._wleft and not self._writer:
            self._writer = True
            self.loop.add_writer(sock, self._flush)
        elif not self._wleft and self._writer:
            self._writer = False
            self.loop.remove_writer(sock)

    def _send_now(self) -> None:
        """Write what is queued at once (stopping: a DISCONNECT closes the socket after it)."""
        c = self.client
        if c.socket() is None:
            return
        c.batch = None
        if self._wleft:
            try:
                c.socket().send(self._wleft)  # type: ignore[union-attr]
            except OSError:
                pass
            self._wleft = b""
        c.loop_write()

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if threading.get_ident() != self._loop_thread:
            self.loop.call_soon_threadsafe(self._unplug, sock)
        else:
            self._unplug(sock)

    def _unplug(self, sock: Any) -> None:
        if self._sock is None or sock is not self._sock:
            return
        self.loop.remove_reader(sock)
        if self._writer:
            self.loop.remove_writer(sock)
            self._writer = False
        self._sock = None
        self._wleft = b""
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        if self._stable is not None:
            self._stable.cancel()
            self._stable = None
        self._gone.set()

    def _close_socket(self) -> None:
        """Close the socket without a DISCONNECT: the broker publishes our will."""
        sock = self.client.socket()
        if sock is None:
            return
        self.client._sock_close()  # paho's own close: tells on_socket_close, then closes
        if not self._closed:
            self._lost("connection closed")

    # ------------------------------------------------------------ reconnect policy

    def _next_wait(self) -> float:
        """Seconds until the next attempt: doubling from RECONNECT_MIN to RECONNECT_MAX, jittered;
        TWIN_WAIT once the broker keeps closing the connection soon after accepting it."""
        up = self._up_since
        self._up_since = None
        if up is not None and self.client.eof and time.monotonic() - up < KICKED_WITHIN:
            self._kicked += 1
        elif up is not None:
            self._kicked = 0
        if self._kicked >= KICKED_TIMES and not self.twin:
            self.twin = True
            why = (
                f"the broker closed the connection within {KICKED_WITHIN:g} s of accepting it "
                f"{self._kicked} times in a row: most likely another client uses the client id "
                f"{self.client_id!r} (a second gateway with this config, a cloned SD card?)"
            )
            log.error("mqtt: %s; retrying every %s until a connection holds for %g s", why, _span(TWIN_WAIT), STABLE)
            if self.hub is not None:
                self.hub.set_problem(PROBLEM, f"another client is using MQTT client id {self.client_id}")
            self._down(f"another client is using MQTT client id {self.client_id}", quiet=True)
        if self.twin:
            return TWIN_WAIT * random.uniform(0.8, 1.2)
        wait = self._delay * random.uniform(0.5, 1.0)
        self._delay = min(self._delay * 2, RECONNECT_MAX)
        return wait

    def _held(self) -> None:
        """The connection stayed up STABLE seconds: back to quick retries, and no twin after all."""
        self._stable = None
        self._delay = RECONNECT_MIN
        self._kicked = 0
        if self.twin:
            self.twin = False
            log.warning("mqtt: the connection as %s has held for %g s: no other client uses it now", self.client_id, STABLE)
            if self.hub is not None:
                self.hub.set_problem(PROBLEM, None)
            for user in list(self._users):
                user.broker_up()

    # ------------------------------------------------------------ stopping

    async def close(self) -> None:
        """Publish the "offline" status, disconnect, stop reconnecting; idempotent."""
        if self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.connected:
            try:
                await self.publish(self.status_topic, OFFLINE, True, STOP_TIMEOUT)
            except MqttError as e:
                log.warning("mqtt: could not publish %s to %s: %s", OFFLINE, self.status_topic, e)
        self._closed = True
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
        self._fail_acks("the MQTT client is stopping")
        if self.client.socket() is not None:
            self.client.disconnect()
            self._send_now()
            self.client._sock_close()  # in case the DISCONNECT could not be written
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.twin and self.hub is not None:
            self.hub.set_problem(PROBLEM, None)
        if self.connected or self._started:
            log.info("mqtt: disconnected from %s", self.cfg.url)
        self.connected = False

    # ------------------------------------------------------------ paho callbacks (on the loop)

    @_guarded
    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties,
    ) -> None:
        self._connected(not reason.is_failure, str(reason), flags.session_present)

    @_guarded
    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        props: Properties,
    ) -> None:
        self._lost(str(reason))

    @_guarded
    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._deliver(msg.topic, msg.payload, msg.retain)

    @_guarded
    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties
    ) -> None:
        self._acked(mid, str(reason) if reason.is_failure else None)

    @_guarded
    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Properties
    ) -> None:
        self._subscribed(mid, [str(r) if r.is_failure else None for r in reasons])

    # ------------------------------------------------------------ connection state

    def _connected(self, ok: bool, reason: str, session_present: bool) -> None:
        if self._closed:
            return
        if not ok:
            self._down(f"broker refused the connection: {reason}")
            return
        self.connected = True
        self.reason = ""
        self._up_since = time.monotonic()
        self._stable = self.loop.call_later(STABLE, self._held)
        log.log(
            logging.DEBUG if self.twin else logging.INFO,
            "mqtt: connected to %s as %s (%s session)",
            self.cfg.url,
            self.client_id,
            "resumed" if session_present else "new",
        )
        self.client.publish(self.status_topic, ONLINE, qos=QOS, retain=True)
        self._live.clear()
        self._subscribe(list(self._subs))
        if self._probe is None and self.persistent:
            self._probe = self.loop.create_task(self._check_open(), name="mqtt-anonymous-check")
        if self.twin:
            return  # devices stay offline (with the reason) until the connection holds
        for user in list(self._users):
            user.broker_up()

    async def _check_open(self) -> None:
        """Once per start: warn (log, `status`, admins) when the broker lets anyone in."""
        if not self.cfg.username:
            self.open = True
            log.warning("mqtt: no username in [mqtt], and %s", OPEN_BROKER)
            return  # our own connection says it all; the problem is not repeated to admins at each start
        open_ = await asyncio.to_thread(accepts_anonymous, self.cfg)
        self.open = open_
        if open_ and not self._closed:
            if self.hub is not None:
                self.hub.set_problem(OPEN_PROBLEM, OPEN_BROKER)  # logged, in status, told to admins once
            else:
                log.warning("mqtt: %s", OPEN_BROKER)

    def _unreachable(self, detail: str) -> None:
        if not self._closed:
            self._down(f"broker unreachable: {detail}")

    def _lost(self, reason: str) -> None:
        if self._closed or not self.connected:
            return
        detail = "" if reason in ("Success", "Unspecified error", "Normal disconnection", "connection closed") else f": {reason}"
        self._down(f"broker connection lost{detail}", quiet=self.twin)

    def _down(self, reason: str, quiet: bool = False) -> None:
        if (reason != self.reason or self.connected) and not quiet:
            log.warning(
                "mqtt: %s (%s); retrying every %g-%g s", reason, self.cfg.url, RECONNECT_MIN, RECONNECT_MAX
            )
        self.connected = False
        self._failed = True
        if self.twin:
            reason = f"another client is using MQTT client id {self.client_id}"
        self.reason = reason
        self._fail_acks(
            f"{reason} before the broker confirmed the command; it is sent again when the connection is back"
        )
        for user in list(self._users):
            user.broker_down(reason)

    def _fail_acks(self, why: str) -> None:
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(MqttError(why))

    # ------------------------------------------------------------ messages

    def _deliver(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if self._closed:
            return
        routes = self._matches.get(topic)
        if routes is None:
            # paho's topic_matches_sub builds a matcher tree on every call: match each topic once.
            routes = [r for r in self._routes if paho.topic_matches_sub(r.sub, topic)]
            if len(self._matches) >= MATCH_CACHE:
                self._matches = {}
            self._matches[topic] = routes
        for r in routes:
            if r.command and retain:
                self._throttle.warn(f"mqtt: retained command on {topic}", f"mqtt: ignored a retained message on {topic}: commands must not be retained")
                continue
            if r.command and r.sub not in self._live:
                self._throttle.warn(
                    f"mqtt: late command on {topic}",
                    f"mqtt: ignored a command on {topic} kept by the broker from before this connection: commands are run now or never",
                )
                continue
            try:
                r.handler(r.sub, topic, payload)
            except Exception:
                log.exception("mqtt: handling a message on %s failed", topic)
        if not routes:
            log.debug("mqtt: message on %s matches no device", topic)

    def _acked(self, mid: int, failure: str | None) -> None:
        fut = self._acks.get(mid)
        if fut is None or fut.done():
            return
        if failure is None:
            fut.set_result(None)
        else:
            fut.set_exception(MqttError(f"the broker refused the command: {failure}"))

    def _subscribe(self, topics: list[str]) -> None:
        if not topics:
            return
        rc, mid = self.client.subscribe([(t, 0 if t in self._commands else QOS) for t in topics])
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._sub_mids[mid] = topics

    def _subscribed(self, mid: int, failures: list[str | None]) -> None:
        topics = self._sub_mids.pop(mid, [])
        for topic, failure in zip(topics, failures):
            if failure is None:
                if topic in self._commands:
                    self._live.add(topic)
                if self.refused.pop(topic, None) is not None:
                    log.warning("mqtt: the broker now accepts the subscription to %s", topic)
                    self._tell_owners(topic)
                continue
            who = f"user {self.cfg.username}" if self.cfg.username else "anonymous clients"
            why = f"the broker refused the subscription to {topic} (SUBACK failure 0x80): check its ACL for {who}"
            if self.refused.get(topic) != why:
                log.error("mqtt: %s", why)
            self.refused[topic] = why
            self._tell_owners(topic)

    def _tell_owners(self, topic: str) -> None:
        for r in self._routes:
            if r.sub == topic and r.owner in self._users and self.connected:
                r.owner.broker_up()

    @property
    def failed(self) -> bool:
        """True when the last connection attempt failed or the connection was lost."""
        return self._failed and not self.connected


def _span(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
