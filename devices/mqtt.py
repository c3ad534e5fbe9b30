"""`mqtt`: devices that publish and take commands on the `[mqtt]` broker.

Every mqtt device shares one connection, the `Broker` (gateway/mqtt/broker.py,
which explains how it reads, writes and keeps its session). A device routes its
state and availability topics there: each message is parsed and pushed into the
hub right in the broker's read; a set publishes the rendered payload and, when
the field has a state topic, waits for the device to report the value.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from gateway.hub import SENT, Health, NotWritable, Unconfirmed
from gateway.mqtt.broker import Broker, MqttError
from gateway.noise import Throttle
from gateway.values import BadValue, Value, coerce, quoted, same, shown

from .base import Context, Driver
from .mqtt_config import MqttDevice, MqttField

log = logging.getLogger("iot_gateway.mqtt")

class BadPayload(ValueError):
    """A message that holds no usable value for a field; the message says why."""


# ---------------------------------------------------------------- payloads


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


_decode = json.JSONDecoder().raw_decode  # json.loads's own decoder, without its checks around it


def parse_json(text: str) -> Any:
    """The JSON document in `text`; BadPayload if it is not JSON."""
    try:
        # Most payloads are a document and nothing else: json.loads less its whitespace
        # handling, a third of its cost on every message. Anything else goes to json.loads.
        doc, end = _decode(text)
        if end == len(text):
            return doc
    except (ValueError, RecursionError):
        pass
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
    parts = path.split(".")
    for k, part in enumerate(parts):
        if type(cur) is dict and part in cur:  # the common case, first
            cur = cur[part]
            continue
        done = parts[:k]
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
    return cur


def to_value(f: MqttField, raw: Any) -> Value:
    """Turn what a message holds for field `f` into a value of its type; BadPayload if it does not fit."""
    if type(raw) is float and raw - raw == 0.0 and f.type == "numeric":
        return raw  # a finite number for a numeric field: what coerce returns, without the call
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
            raise BadPayload(f"expects {f.payload_on!r} or {f.payload_off!r}, got {quoted(text)}") from None
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
        self._throttle = Throttle(logger=log)
        # field -> (value asked for, resolved when the state topic reports it): sets waiting for the device
        self._waiting: dict[str, tuple[Value, asyncio.Future[None]]] = {}
        self._reported: dict[str, Value] = {}  # the last state each field reported

    async def start(self) -> None:
        broker = Broker.shared(self.ctx)
        self._broker = broker
        for topic in self._by_topic:
            broker.route(self, topic, self._on_reading)
        if self.device.availability_topic is not None:
            broker.route(self, self.device.availability_topic, self._on_availability)
        self.health(Health.STARTING, broker.reason)  # until the broker tells otherwise (at once if it knows)
        broker.attach(self)

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.leave(self.ctx, self)

    async def write(self, field: str, value: Value) -> str | None:
        """Publish the command; with a state topic, wait until the device reports the new state.

        MQTT 3.1.1 gives no error for a publish the broker's ACL denies: the
        PUBACK only says the broker took it. So where the field has a state
        topic, a set counts as applied only once that topic reports the value
        (within the device's `confirm_timeout`); else Unconfirmed says so.
        """
        f = self._fields.get(field)
        if f is None or f.command_topic is None:
            raise NotWritable(f"{self.id}.{field} is read-only")
        if self._broker is None:
            raise MqttError(f"{self.id} is not running")
        payload = render(f, value)
        waiter: asyncio.Future[None] | None = None
        if f.topic is not None:
            previous = self._waiting.get(field)
            if previous is not None and not previous[1].done():
                previous[1].cancel()  # a newer set of the field: the older one is not waited for any more
            waiter = asyncio.get_running_loop().create_future()
            self._waiting[field] = (value, waiter)
        try:
            await self._broker.publish(f.command_topic, payload, f.retain)
            log.info("%s.%s: published %s to %s", self.id, field, quoted(payload), f.command_topic)
            if waiter is None:
                # No state topic to confirm it: the acknowledged command stands in as the value,
                # but the set is only "sent" (nothing reported that the device took it).
                self.push(field, value)
                return SENT
            timeout = self.device.confirm_timeout
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                last = self._reported.get(field)
                seen = "" if last is None else f"; it last reported {shown(last)}"
                log.warning("%s.%s: %s not confirmed on %s within %g s%s", self.id, field, quoted(payload), f.topic, timeout, seen)
                raise Unconfirmed(
                    f"not confirmed: the device did not report the new state within {timeout:g} s{seen}"
                ) from None
            return None  # confirmed: applied
        finally:
            if waiter is not None and self._waiting.get(field, (None, None))[1] is waiter:
                del self._waiting[field]

    def _confirm(self, f: MqttField, value: Value) -> None:
        """A state report: it confirms a set waiting for this value."""
        self._reported[f.name] = value
        waiting = self._waiting.get(f.name)
        if waiting is not None and not waiting[1].done() and same(waiting[0], value, f.decimals):
            waiting[1].set_result(None)

    # ------------------------------------------------------------ broker state

    def broker_up(self) -> None:
        """The broker connection is up: health follows availability, if the device has any."""
        refused = self._refused()
        if refused:
            self.health(Health.ERROR, refused)
        elif self.device.availability_topic is None or self._available is True:
            self.health(Health.OK)
        elif self._available is False:
            self.health(Health.OFFLINE, "(LWT)")
        else:
            self.health(Health.STARTING, f"waiting for availability on {self.device.availability_topic}")

    def _refused(self) -> str:
        """Why the broker refused one of this device's subscriptions, or ""."""
        broker = self._broker
        if broker is None or not broker.refused:
            return ""
        for sub in [*self._by_topic, self.device.availability_topic]:
            if sub in broker.refused:
                return broker.refused[sub]
        return ""

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
            if f.command_topic is not None:
                self._confirm(f, value)

    def _bad(self, f: MqttField, topic: str, why: str, text: str) -> None:
        self._throttle.warn(
            f"field:{f.name}",
            f"{self.id}.{f.name}: message on {topic} skipped: {why}; payload {quoted(text)}",
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
                f"{d.payload_available!r} or {d.payload_not_available!r}, got {quoted(text)}",
            )
            return
        if self._broker is not None and self._broker.connected:
            self.broker_up()



DRIVER = MqttDriver
