"""`mqtt`: devices that publish and take commands on the `[mqtt]` broker.

Every mqtt device shares one paho client, the `Broker`, kept in
`Context.shared`. paho's network loop runs in its own thread; each paho
callback only hands its arguments to the event loop with
`call_soon_threadsafe`, and is guarded so it never raises (an exception in a
paho callback ends paho's thread without a word). On the event loop, messages
are routed to devices, payloads parsed, readings pushed and health reported.

The session is persistent (MQTT 3.1.1, clean session off, QoS 1
subscriptions, a stable client id), so the broker keeps what devices publish
while the gateway is away and delivers it when the gateway comes back.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import re
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import Config, MqttSection
from gateway.hub import Health, NotWritable
from gateway.values import BadValue, Value, coerce

from .base import Context, Driver
from .mqtt_config import MqttDevice, MqttField

log = logging.getLogger("iot_gateway.mqtt")

SHARED_KEY = "mqtt"
QOS = 1
RECONNECT_MIN = 1  # seconds; paho doubles the wait after each failure...
RECONNECT_MAX = 30  # ...up to this
START_GRACE = 2.0  # seconds to wait for every mqtt device to attach before connecting anyway
STOP_TIMEOUT = 2.0  # seconds to wait for the broker to take the "offline" status at stop
LOG_EVERY = 60.0  # seconds between two warnings about the same field
DRAIN_BATCH = 500  # paho callbacks run per event-loop turn, so a flood cannot starve the loop
MATCH_CACHE = 4096  # topics whose matching routes are remembered
SHOWN = 80  # characters of a bad payload quoted in a warning
ONLINE, OFFLINE = "online", "offline"

Handler = Callable[[str, str, bytes], None]  # (subscription, topic, payload)
F = TypeVar("F", bound=Callable[..., None])


class MqttError(Exception):
    """A command that did not reach the broker, or an MQTT setup problem; the message says why."""


class BadPayload(ValueError):
    """A message that holds no usable value for a field; the message says why."""


# ---------------------------------------------------------------- payloads


def default_client_id(config: Config) -> str:
    """`[mqtt] client_id`, else "iot-gateway-" and the gateway's JID (or its name) made topic-safe."""
    if config.mqtt is not None and config.mqtt.client_id:
        return config.mqtt.client_id
    source = config.xmpp.jid if config.xmpp is not None else config.gateway.name
    return "iot-gateway-" + (re.sub(r"[^a-z0-9_-]+", "-", source.lower()).strip("-") or "gateway")


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    return "an object"


def parse_json(text: str) -> Any:
    """The JSON document in `text`; BadPayload if it is not JSON."""
    try:
        return json.loads(text)
    except ValueError as e:
        msg = getattr(e, "msg", str(e))
        pos = getattr(e, "pos", None)
        raise BadPayload(
            f"not valid JSON ({msg}" + (f" at character {pos})" if pos is not None else ")")
        ) from None
    except RecursionError:
        raise BadPayload("JSON nested too deeply") from None


def lookup(doc: Any, path: str) -> Any:
    """The value at a dotted `path` in parsed JSON: object keys, and list indexes like `sensors.0.value`."""
    cur = doc
    done: list[str] = []
    for part in path.split("."):
        if isinstance(cur, dict):
            if part not in cur:
                raise BadPayload(f"no {'.'.join(done + [part])!r} in the payload")
            cur = cur[part]
        elif isinstance(cur, list):
            where = ".".join(done) or "the payload"
            try:
                i = int(part)
            except ValueError:
                raise BadPayload(f"{where} is a list: expected an index, got {part!r}") from None
            if not -len(cur) <= i < len(cur):
                raise BadPayload(f"{where} has {len(cur)} items, no index {i}")
            cur = cur[i]
        else:
            where = ".".join(done) or "the payload"
            raise BadPayload(f"{where} is {_kind(cur)}, cannot look up {part!r} in it")
        done.append(part)
    return cur


def to_value(f: MqttField, raw: Any) -> Value:
    """Turn what a message holds for field `f` into a value of its type; BadPayload if it does not fit."""
    if raw is None:
        raise BadPayload("the value is null")
    if isinstance(raw, (dict, list)):
        raise BadPayload(f"expected a single value, got {_kind(raw)}")
    if f.type == "boolean" and f.payload_on is not None and f.payload_off is not None:
        text = raw if isinstance(raw, str) else json.dumps(raw)
        word = text.strip().lower()
        if word == f.payload_on.strip().lower():
            return True
        if word == f.payload_off.strip().lower():
            return False
        try:
            return coerce("boolean", raw)
        except BadValue:
            raise BadPayload(f"expects {f.payload_on!r} or {f.payload_off!r}, got {_short(text)}") from None
    if f.type == "string" and not isinstance(raw, str):
        raw = json.dumps(raw)
    try:
        return coerce(f.type, raw)
    except BadValue as e:
        raise BadPayload(str(e)) from None


def _is_json(template: str) -> bool:
    try:
        json.loads(template.replace("{value}", "0"))
    except ValueError:
        return False
    return True


def render(f: MqttField, value: Value) -> str:
    """The payload that sets field `f` to `value`.

    Booleans become `payload_on`/`payload_off`, or ON/OFF (what Tasmota and
    Zigbee2MQTT take); whole floats lose their `.0`. With `command_template`,
    every `{value}` in it is replaced by that text; when the template is JSON,
    the text is escaped as JSON string content, so no value can break out of
    its quotes, and the result must parse as JSON.
    """
    if isinstance(value, bool):
        text = (f.payload_on or "ON") if value else (f.payload_off or "OFF")
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = str(value)
    template = f.command_template
    if template is None:
        return text
    if not _is_json(template):
        return template.replace("{value}", text)
    out = template.replace("{value}", json.dumps(text)[1:-1])
    try:
        json.loads(out)
    except ValueError:
        raise MqttError(f"command_template {template!r} gives invalid JSON for {text!r}: {out!r}") from None
    return out


def _short(text: str) -> str:
    return repr(text if len(text) <= SHOWN else text[: SHOWN - 1] + "…")


def _describe(err: BaseException | None) -> str:
    """A short reason for a failed connection attempt."""
    if err is None:
        return "connection failed"
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {err.verify_message or err}"
    if isinstance(err, ssl.SSLError):
        return f"TLS error: {err.reason or err}"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


class Throttle:
    """Lets one warning per key through every `every` seconds and counts the ones held back."""

    def __init__(self, every: float = LOG_EVERY):
        self.every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, key: str, message: str) -> None:
        """Log `message` as a warning unless `key` was warned about less than `every` seconds ago."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        log.warning("%s%s", message, f" ({held} more like it not logged)" if held else "")


# ---------------------------------------------------------------- the shared client


def _guarded(fn: F) -> F:
    """Wrap a paho callback so that it never raises: paho's thread would end silently."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("mqtt: error in %s (ignored)", fn.__name__)

    return wrapper  # type: ignore[return-value]


class Broker:
    """The one paho client of the `[mqtt]` section, shared by every mqtt device.

    Everything but the paho callbacks runs on the event loop thread, so routes,
    subscriptions and connection state need no locks.
    """

    def __init__(self, cfg: MqttSection, client_id: str, loop: asyncio.AbstractEventLoop, expected: set[str]):
        self.cfg = cfg
        self.client_id = client_id
        self.status_topic = f"{client_id}/status"
        self.loop = loop
        self.connected = False
        self.reason = f"connecting to {cfg.url}"
        self._failed = False  # True once a connection attempt failed or the connection was lost
        self._expected = expected
        self._users: list[MqttDriver] = []
        self._routes: list[tuple[object, str, Handler]] = []
        self._matches: dict[str, list[tuple[str, Handler]]] = {}  # topic -> matching routes
        self._inbox: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = collections.deque()
        self._drain_due = False  # a `_drain` is scheduled on the loop
        self._subs: dict[str, None] = {}
        self._sub_mids: dict[int, list[str]] = {}
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._started = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self.client = self._make_client()

    @classmethod
    def shared(cls, ctx: Context) -> Broker:
        """The broker of `ctx`, created on first use."""
        broker = ctx.shared.get(SHARED_KEY)
        if broker is None:
            if ctx.config.mqtt is None:
                raise MqttError("no [mqtt] section: mqtt devices need the broker url")
            expected = {d.id for d in ctx.config.devices if d.driver == "mqtt"}
            broker = cls(ctx.config.mqtt, default_client_id(ctx.config), asyncio.get_running_loop(), expected)
            ctx.shared[SHARED_KEY] = broker
        return broker

    def _make_client(self) -> paho.Client:
        cfg = self.cfg
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
        )
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.resolve_password())
        if cfg.tls:
            c.tls_set(ca_certs=str(cfg.ca_file) if cfg.ca_file else None)
        c.will_set(self.status_topic, OFFLINE, qos=QOS, retain=True)
        c.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        return c

    # ------------------------------------------------------------ devices

    def attach(self, user: MqttDriver) -> None:
        """Register a device; connecting starts once every mqtt device of the config is attached.

        Waiting for all of them means the messages the broker kept for us
        while we were away find their device when they arrive.
        """
        self._users.append(user)
        if self._started:
            return
        if {u.id for u in self._users} >= self._expected:
            self._begin()
        elif self._timer is None:
            self._timer = self.loop.call_later(START_GRACE, self._begin)

    def detach(self, user: MqttDriver) -> bool:
        """Forget a device and its routes; True when it was the last one."""
        if user in self._users:
            self._users.remove(user)
        self._routes = [r for r in self._routes if r[0] is not user]
        self._matches = {}
        return not self._users

    def route(self, owner: object, sub: str, handler: Handler) -> None:
        """Call `handler(sub, topic, payload)` on the event loop for each message matching `sub`."""
        self._routes.append((owner, sub, handler))
        self._matches = {}
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
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive)
        self.client.loop_start()

    # ------------------------------------------------------------ commands

    async def publish(self, topic: str, payload: str, retain: bool) -> None:
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
        try:
            await asyncio.wait_for(fut, self.cfg.command_timeout)
        except TimeoutError:
            raise MqttError(
                f"the broker did not confirm within {self.cfg.command_timeout:g} s "
                "(no PUBACK); the command may still be delivered"
            ) from None
        finally:
            self._acks.pop(info.mid, None)

    # ------------------------------------------------------------ stopping

    async def close(self) -> None:
        """Publish the "offline" status, disconnect and end paho's thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail_acks("the MQTT client is stopping")
        if self._started:
            await asyncio.to_thread(self._shutdown, self.connected)
        self.connected = False

    def _shutdown(self, connected: bool) -> None:
        """Blocking part of `close`, run in a worker thread."""
        if connected:
            try:
                info = self.client.publish(self.status_topic, OFFLINE, qos=QOS, retain=True)
                info.wait_for_publish(STOP_TIMEOUT)
            except (RuntimeError, ValueError) as e:
                log.warning("mqtt: could not publish %s to %s: %s", OFFLINE, self.status_topic, e)
        self.client.disconnect()
        self.client.loop_stop()
        log.info("mqtt: disconnected from %s", self.cfg.url)

    # ------------------------------------------------------------ paho thread

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        # One wake-up of the loop per batch, not per message: call_soon_threadsafe
        # costs a write to the loop's self-pipe each time, as much as the rest of a
        # message's way into the hub. Order is kept: everything goes through the inbox.
        self._inbox.append((fn, args))
        if not self._drain_due:
            self._drain_due = True
            self.loop.call_soon_threadsafe(self._drain)

    @_guarded
    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties,
    ) -> None:
        self._call(self._connected, not reason.is_failure, str(reason), flags.session_present)

    @_guarded
    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError:`, so the error is at hand.
        self._call(self._unreachable, _describe(sys.exception()))

    @_guarded
    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        props: Properties,
    ) -> None:
        self._call(self._lost, str(reason))

    @_guarded
    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._call(self._deliver, msg.topic, bytes(msg.payload))

    @_guarded
    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties
    ) -> None:
        self._call(self._acked, mid, str(reason) if reason.is_failure else None)

    @_guarded
    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Properties
    ) -> None:
        self._call(self._subscribed, mid, [str(r) if r.is_failure else None for r in reasons])

    # ------------------------------------------------------------ event loop side

    def _connected(self, ok: bool, reason: str, session_present: bool) -> None:
        if self._closed:
            return
        if not ok:
            self._down(f"broker refused the connection: {reason}")
            return
        self.connected = True
        self.reason = ""
        log.info(
            "mqtt: connected to %s as %s (%s session)",
            self.cfg.url,
            self.client_id,
            "resumed" if session_present else "new",
        )
        self.client.publish(self.status_topic, ONLINE, qos=QOS, retain=True)
        self._subscribe(list(self._subs))
        for user in list(self._users):
            user.broker_up()

    def _unreachable(self, detail: str) -> None:
        if not self._closed:
            self._down(f"broker unreachable: {detail}")

    def _lost(self, reason: str) -> None:
        if self._closed or not self.connected:
            return
        detail = "" if reason in ("Success", "Unspecified error", "Normal disconnection") else f": {reason}"
        self._down(f"broker connection lost{detail}")

    def _down(self, reason: str) -> None:
        if reason != self.reason or self.connected:
            log.warning(
                "mqtt: %s (%s); retrying every %d-%d s", reason, self.cfg.url, RECONNECT_MIN, RECONNECT_MAX
            )
        self.connected = False
        self._failed = True
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

    def _drain(self) -> None:
        """Run what the paho thread handed over, up to DRAIN_BATCH items per loop turn."""
        # Cleared first: anything the paho thread adds from now on schedules another drain.
        self._drain_due = False
        inbox = self._inbox
        for _ in range(min(len(inbox), DRAIN_BATCH)):
            fn, args = inbox.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("mqtt: error in %s", getattr(fn, "__name__", fn))
        if inbox and not self._drain_due:
            self._drain_due = True
            self.loop.call_soon(self._drain)

    def _deliver(self, topic: str, payload: bytes) -> None:
        if self._closed:
            return
        routes = self._matches.get(topic)
        if routes is None:
            # paho's topic_matches_sub builds a matcher tree on every call: match each topic once.
            routes = [(sub, h) for _owner, sub, h in self._routes if paho.topic_matches_sub(sub, topic)]
            if len(self._matches) >= MATCH_CACHE:
                self._matches = {}
            self._matches[topic] = routes
        for sub, handler in routes:
            try:
                handler(sub, topic, payload)
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
        rc, mid = self.client.subscribe([(t, QOS) for t in topics])
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._sub_mids[mid] = topics

    def _subscribed(self, mid: int, failures: list[str | None]) -> None:
        topics = self._sub_mids.pop(mid, [])
        for topic, failure in zip(topics, failures):
            if failure is not None:
                log.error("mqtt: the broker refused the subscription to %s: %s", topic, failure)

    @property
    def failed(self) -> bool:
        """True when the last connection attempt failed or the connection was lost."""
        return self._failed and not self.connected


# ---------------------------------------------------------------- the driver


class MqttDriver(Driver[MqttDevice]):
    """One device's topics on the shared broker: readings in, commands out, availability as health."""

    def __init__(self, device: MqttDevice, ctx: Context):
        super().__init__(device, ctx)
        self._fields = {f.name: f for f in device.fields}
        self._by_topic: dict[str, list[MqttField]] = {}
        for f in device.fields:
            if f.topic is not None:
                self._by_topic.setdefault(f.topic, []).append(f)
        self._available: bool | None = None
        self._broker: Broker | None = None
        self._throttle = Throttle()

    async def start(self) -> None:
        broker = Broker.shared(self.ctx)
        self._broker = broker
        for topic in self._by_topic:
            broker.route(self, topic, self._on_reading)
        if self.device.availability_topic is not None:
            broker.route(self, self.device.availability_topic, self._on_availability)
        if broker.connected:
            self.broker_up()
        elif broker.failed:
            self.broker_down(broker.reason)
        else:
            self.health(Health.STARTING, broker.reason)
        broker.attach(self)

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is None:
            return
        if broker.detach(self):
            if self.ctx.shared.get(SHARED_KEY) is broker:
                del self.ctx.shared[SHARED_KEY]
            try:
                await broker.close()
            except Exception:
                log.exception("mqtt: error while disconnecting")

    async def write(self, field: str, value: Value) -> None:
        f = self._fields.get(field)
        if f is None or f.command_topic is None:
            raise NotWritable(f"{self.id}.{field} is read-only")
        if self._broker is None:
            raise MqttError(f"{self.id} is not running")
        payload = render(f, value)
        await self._broker.publish(f.command_topic, payload, f.retain)
        log.info("%s.%s: published %s to %s", self.id, field, _short(payload), f.command_topic)
        if f.topic is None:
            # No state topic to confirm it: the acknowledged command is the new value.
            self.push(field, value)

    # ------------------------------------------------------------ broker state

    def broker_up(self) -> None:
        """The broker connection is up: health follows availability, if the device has any."""
        if self.device.availability_topic is None or self._available is True:
            self.health(Health.OK)
        elif self._available is False:
            self.health(Health.OFFLINE, "(LWT)")
        else:
            self.health(Health.STARTING, f"waiting for availability on {self.device.availability_topic}")

    def broker_down(self, reason: str) -> None:
        """The broker cannot be reached: the device cannot be either."""
        self.health(Health.OFFLINE, reason)

    # ------------------------------------------------------------ messages

    def _on_reading(self, sub: str, topic: str, payload: bytes) -> None:
        fields = self._by_topic[sub]
        if not payload:
            log.debug("%s: empty message on %s ignored", self.id, topic)
            return
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            for f in fields:
                self._bad(f, topic, "not UTF-8 text", payload.decode("utf-8", "replace"))
            return
        doc: Any = None
        doc_error: BadPayload | None = None
        parsed = False
        for f in fields:
            try:
                if f.json_path is None:
                    raw: Any = text.strip()
                else:
                    if not parsed:
                        parsed = True
                        try:
                            doc = parse_json(text)
                        except BadPayload as e:
                            doc_error = e
                    if doc_error is not None:
                        raise doc_error
                    raw = lookup(doc, f.json_path)
                value = to_value(f, raw)
            except BadPayload as e:
                self._bad(f, topic, str(e), text)
                continue
            self.push(f.name, value)

    def _bad(self, f: MqttField, topic: str, why: str, text: str) -> None:
        self._throttle.warn(
            f"field:{f.name}",
            f"{self.id}.{f.name}: message on {topic} skipped: {why}; payload {_short(text)}",
        )

    def _on_availability(self, sub: str, topic: str, payload: bytes) -> None:
        d = self.device
        text = payload.decode("utf-8", "replace").strip()
        if not text:
            return
        try:
            raw: Any = (
                text
                if d.availability_json_path is None
                else lookup(parse_json(text), d.availability_json_path)
            )
        except BadPayload as e:
            self._throttle.warn("availability", f"{self.id}: availability message on {topic} skipped: {e}")
            return
        word = (raw if isinstance(raw, str) else json.dumps(raw)).strip().lower()
        if word == d.payload_available.strip().lower():
            self._available = True
        elif word == d.payload_not_available.strip().lower():
            self._available = False
        else:
            self._throttle.warn(
                "availability",
                f"{self.id}: availability message on {topic} skipped: expected "
                f"{d.payload_available!r} or {d.payload_not_available!r}, got {_short(text)}",
            )
            return
        if self._broker is not None and self._broker.connected:
            self.broker_up()


DRIVER = MqttDriver
