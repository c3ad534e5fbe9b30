"""The benchmarks' clients: an XMPP contact that times what it receives, and bare MQTT clients.

Every time is `time.perf_counter()` in this process, taken in the handler that
receives the stanza or message, so the gateway and its baselines are timed the
same way.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import paho.mqtt.client as paho
import slixmpp
from paho.mqtt.enums import CallbackAPIVersion
from slixmpp import Iq, Message, Presence
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

SD = "urn:xmpp:iot:sensordata"
TIMEOUT = 30.0
T = TypeVar("T")


class BenchError(RuntimeError):
    """Something a benchmark waits for did not happen; the message says what."""


class Arrival(NamedTuple):
    """A message and when it arrived."""

    at: float
    msg: Message


class Client:
    """A plain slixmpp client, as a contact's phone would be, that notes when stanzas arrive."""

    def __init__(self, jid: str, password: str, address: str, ca_file: Path):
        c = slixmpp.ClientXMPP(jid, password)
        c.register_plugin("xep_0199")
        c.ca_certs = ca_file
        c.enable_direct_tls = False
        # Accept the gateway's subscription and ask for its presence in return.
        c.auto_authorize = True
        c.auto_subscribe = True
        self.client = c
        host, port = address.rsplit(":", 1)
        self.address = (host, int(port))
        self.presences: list[tuple[float, str]] = []  # (arrival, full JID) of available presences
        self._presence = asyncio.Event()
        self._started = asyncio.Event()
        self._waiters: list[tuple[Callable[[Message], bool], asyncio.Future[Arrival]]] = []
        self._readouts: dict[str, tuple[list[int], asyncio.Future[float]]] = {}
        self._seqnr = 0
        self.last_fields: ET.Element | None = None  # the done='true' <fields/> of the latest read-out
        c.add_event_handler("session_start", self._on_start)
        c.add_event_handler("presence_available", self._on_available)
        # A raw handler: slixmpp's "message" event skips messages without a body (XEP-0323's).
        c.register_handler(
            Callback("bench inbox", MatchXPath(f"{{{c.default_ns}}}message"), self._on_message)
        )

    @property
    def jid(self) -> str:
        """The bare JID."""
        return self.client.boundjid.bare

    async def start(self) -> Client:
        """Connect and wait until the session is up (presence sent, roster fetched)."""
        self.client.connect(*self.address)
        try:
            await asyncio.wait_for(self._started.wait(), TIMEOUT)
        except TimeoutError:
            raise BenchError(f"{self.client.boundjid} could not log in to the benchmark's Prosody") from None
        return self

    async def stop(self) -> None:
        """Disconnect (abort when the server does not answer)."""
        try:
            await asyncio.wait_for(self.client.disconnect(wait=0.5), 3)
        except (TimeoutError, OSError):
            self.client.abort()
        # slixmpp cancels its send task only when the client is garbage-collected, which
        # asyncio reports as "Task was destroyed but it is pending": end it here instead.
        sender = getattr(self.client, "_run_out_filters", None)
        if sender is not None and not sender.done():
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _on_start(self, _event: object) -> None:
        self.client.send_presence()
        await self.client.get_roster()
        self._started.set()

    def _on_available(self, pres: Presence) -> None:
        self.presences.append((time.perf_counter(), str(pres["from"])))
        self._presence.set()

    def _on_message(self, msg: Message) -> None:
        now = time.perf_counter()
        for waiter in list(self._waiters):
            match, fut = waiter
            if match(msg):
                self._waiters.remove(waiter)
                if not fut.done():
                    fut.set_result(Arrival(now, msg))
        for el in msg.xml:
            if el.tag == f"{{{SD}}}fields" and el.get("seqnr") in self._readouts:
                count, fut = self._readouts[el.get("seqnr")]
                count[0] += sum(len(ts) for node in el for ts in node)
                if el.get("done") == "true" and not fut.done():
                    self.last_fields = el
                    fut.set_result(now)

    def expect(self, match: Callable[[Message], bool]) -> asyncio.Future[Arrival]:
        """A future for the next message that `match`es."""
        fut: asyncio.Future[Arrival] = asyncio.get_running_loop().create_future()
        self._waiters.append((match, fut))
        return fut

    def chat_from(self, jid: str, body: bool = True) -> asyncio.Future[Arrival]:
        """A future for the next message from bare `jid` (with a body, unless `body` is False)."""
        return self.expect(lambda m: m["from"].bare == jid and (bool(m["body"]) or not body))

    def send(self, to: str, body: str | None = None, payload: ET.Element | None = None) -> float:
        """Send a chat message (a body, an XML payload or both); returns the time just before."""
        msg = self.client.make_message(mto=to, mbody=body, mtype="chat")
        if payload is not None:
            msg.append(payload)
        now = time.perf_counter()
        msg.send()
        return now

    async def ping(self, to: str) -> float:
        """Seconds for an XEP-0199 ping to full JID `to` and its answer."""
        iq = self.client.make_iq_get(ito=to)
        iq.enable("ping")
        arrived: list[float] = []
        start = time.perf_counter()
        await iq.send(callback=lambda _r: arrived.append(time.perf_counter()), timeout=TIMEOUT)
        return arrived[0] - start

    async def ask(self, to: str, body: str) -> tuple[float, str]:
        """(seconds from sending a chat message to bare JID `to` until its reply arrived, the reply)."""
        reply = self.chat_from(to)
        start = self.send(to, body)
        got = await within(reply, f"a reply from {to} to {body!r}")
        return got.at - start, got.msg["body"]

    async def readout(
        self, to: str, nodes: list[str] | None = None, timeout: float = TIMEOUT
    ) -> tuple[float, int]:
        """An XEP-0323 momentary read-out of `nodes` (all without) from full JID `to`.

        Returns (seconds from sending `<req/>` until `done='true'` arrived, fields received).
        """
        self._seqnr += 1
        seqnr = str(self._seqnr)
        req = ET.Element(f"{{{SD}}}req", {"seqnr": seqnr, "momentary": "true"})
        for node in nodes or []:
            ET.SubElement(req, f"{{{SD}}}node", {"nodeId": node})
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()  # arrival of done='true'
        count = [0]
        self._readouts[seqnr] = (count, done)
        iq: Iq = self.client.make_iq_get(ito=to)
        iq.append(req)
        start = time.perf_counter()
        accepted = iq.send(timeout=timeout)
        try:
            try:
                await accepted  # the fields' arrival is noted by the handler meanwhile
            except IqError as e:
                raise BenchError(f"read-out {seqnr} refused: {e.iq['error']['text']}") from None
            arrived = await within(done, f"read-out {seqnr} from {to}", timeout)
        finally:
            del self._readouts[seqnr]
        return arrived - start, count[0]

    async def presence_after(self, jid: str, after: float, timeout: float = TIMEOUT) -> float:
        """Arrival time of the first available presence from bare `jid` that arrived after `after`."""
        async with asyncio.timeout(timeout):
            while True:
                for at, frm in self.presences:
                    if at > after and frm.split("/")[0] == jid:
                        return at
                self._presence.clear()
                await self._presence.wait()


async def within(fut: asyncio.Future[T], what: str, timeout: float = TIMEOUT) -> T:
    """The result of `fut`; BenchError naming `what` if it takes longer than `timeout`."""
    try:
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        raise BenchError(f"no {what} within {timeout:g} s") from None


class Subscriber:
    """A bare paho-mqtt subscriber that only notes when messages arrive (its own network thread)."""

    def __init__(self, port: int, topics: list[str], client_id: str):
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.expected = 0
        self.done = threading.Event()
        self._subscribed = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        c.on_message = self._on_message
        c.on_subscribe = lambda *_a: self._subscribed.set()
        c.on_connect = lambda *_a: c.subscribe([(t, 1) for t in topics])
        self.client = c
        self.port = port

    def start(self, expected: int = 0) -> Subscriber:
        """Connect, subscribe, and wait for the broker's SUBACK; `done` is set after `expected` messages."""
        self.expected = expected
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        if not self._subscribed.wait(TIMEOUT):
            raise BenchError("the bare MQTT subscriber got no SUBACK")
        return self

    def stop(self) -> None:
        """Disconnect and end the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _client: paho.Client, _userdata: object, _msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        self.count += 1
        if self.count == 1:
            self.first = now
        self.last = now
        if self.count == self.expected:
            self.done.set()


class Publisher:
    """A paho-mqtt client that publishes QoS 0 messages, as most sensors do."""

    def __init__(self, port: int, client_id: str):
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        self._connected = threading.Event()
        c.on_connect = lambda *_a: self._connected.set()
        self.client = c
        self.port = port

    def start(self) -> Publisher:
        """Connect and wait for the broker's CONNACK."""
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        if not self._connected.wait(TIMEOUT):
            raise BenchError("the MQTT publisher could not connect")
        return self

    def publish(self, topic: str, payload: str) -> float:
        """Publish, and return the time just before handing the message to paho."""
        now = time.perf_counter()
        self.client.publish(topic, payload, qos=0)
        return now

    def stop(self) -> None:
        """Disconnect and end the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
