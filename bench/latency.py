"""Round trips through a running gateway process. Each is interleaved, sample by
sample, with its baseline, so both see the same machine at the same moment."""

from __future__ import annotations

import asyncio
import copy
import json
from xml.sax.saxutils import quoteattr

from slixmpp import Iq, Message
from slixmpp.xmlstream import ET
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath
from slixmpp.xmlstream.tostring import tostring

from .clients import SD, BenchError, Client, Publisher, Subscriber, within
from .lab import Lab
from .results import Result, Target, percentile

SAMPLES = 1000  # per quantity: enough for a p99 that is not a single outlier
WARMUP = 20
READOUT_NODES = [f"sim{n:02d}" for n in range(18)] + ["mq00", "mq01"]  # 100 fields
READOUT_FIELDS = 100
PING = "XEP-0199 ping round trip, same connection"


def pair(
    name: str, samples: list[float], baseline: str, base: list[float], target_on: int, target: Target
) -> list[Result]:
    """`name.p50` and `name.p99` in ms against the same percentiles of `base`; the target
    goes on the percentile `target_on`."""
    return [
        Result(
            f"{name}.p{q}",
            percentile(samples, q) * 1000,
            "ms",
            baseline,
            percentile(base, q) * 1000,
            target if q == target_on else None,
        )
        for q in (50, 99)
    ]


class Replayer:
    """A bare client that answers a `<req/>` with the bytes the gateway sent for it.

    It replies with the same `<accepted/>` IQ result and the same `<fields/>` messages,
    split the same way, each already serialised (send_raw): what Prosody and the two
    clients' XML code cost by themselves, without the gateway's work. The bench's
    clients run no XEP-0198, so send_raw keeps nothing out of step.
    """

    SEQ = "__SEQNR__"

    def __init__(self, client: Client, fields: list[ET.Element], to: str):
        self.client = client
        c = client.client
        self.texts: list[str] = []
        for el in fields:
            el = copy.deepcopy(el)
            el.set("seqnr", self.SEQ)
            msg = c.make_message(mto=to)
            msg.append(el)
            self.texts.append(tostring(msg.xml, xmlns=c.default_ns, stream=c, top_level=True))
        c.register_handler(Callback("bench replay", MatchXPath(f"{{{c.default_ns}}}iq/{{{SD}}}req"), self._on_req))

    def _on_req(self, iq: Iq) -> None:
        seqnr = iq.xml.find(f"{{{SD}}}req").get("seqnr", "")
        c = self.client.client
        c.send_raw(
            f"<iq type=\"result\" id={quoteattr(iq['id'])} to={quoteattr(str(iq['from']))}>"
            f"<accepted xmlns=\"{SD}\" seqnr={quoteattr(seqnr)} /></iq>"
        )
        for text in self.texts:
            c.send_raw(text.replace(self.SEQ, seqnr))


async def capture(alice: Client, to: str, nodes: list[str]) -> list[ET.Element]:
    """The `<fields/>` elements of one read-out of `nodes` from `to`, as they arrived."""
    got: list[ET.Element] = []
    c = alice.client
    name = "bench capture"

    def keep(msg: Message) -> None:
        got.extend(el for el in msg.xml if el.tag == f"{{{SD}}}fields")

    c.register_handler(Callback(name, MatchXPath(f"{{{c.default_ns}}}message/{{{SD}}}fields"), keep))
    try:
        await alice.readout(to, nodes)
    finally:
        c.remove_handler(name)
    return got


async def readout_latency(lab: Lab, alice: Client) -> list[Result]:
    """XEP-0323 momentary read-out of 100 fields, `<req/>` to done='true', against the
    stack's floor: the same request answered with the same bytes by a bare client.

    Samples alternate: gateway, floor, ping, so all three see the machine at the same moment.
    """
    to = lab.gateway_jid
    for _ in range(WARMUP):
        await alice.ping(to)
        await alice.readout(to, READOUT_NODES)
    fields = await capture(alice, to, READOUT_NODES)
    bob = await lab.client("bob").start()
    try:
        Replayer(bob, fields, str(alice.client.boundjid))
        floor_to = str(bob.client.boundjid)
        for _ in range(WARMUP):
            await alice.readout(floor_to, READOUT_NODES)
        pings, reads, floors = [], [], []
        for _ in range(SAMPLES):
            seconds, got = await alice.readout(to, READOUT_NODES)
            if got != READOUT_FIELDS:
                raise BenchError(f"a read-out of {READOUT_NODES} gave {got} fields, not {READOUT_FIELDS}")
            reads.append(seconds)
            seconds, got = await alice.readout(floor_to, READOUT_NODES)
            if got != READOUT_FIELDS:
                raise BenchError(f"the replayed read-out gave {got} fields, not {READOUT_FIELDS}")
            floors.append(seconds)
            pings.append(await alice.ping(to))
    finally:
        await bob.stop()
    split = f"{len(fields)} message{'s' if len(fields) > 1 else ''}"
    floor = f"the stack's floor: the same request answered with the same bytes ({split}) by a bare client"
    return [
        *pair("readout_latency", reads, floor, floors, 50, Target("ratio<=", 1.3)),
        Result("readout_latency.floor.p50", percentile(floors, 50) * 1000, "ms", PING, percentile(pings, 50) * 1000),
    ]


async def chat_latency(lab: Lab, alice: Client) -> list[Result]:
    """`read device.field` in chat until the reply arrives, vs ping."""
    to = lab.gateway_jid
    bare = lab.jid("gateway")
    for _ in range(WARMUP):
        await alice.ping(to)
        await alice.ask(bare, "read sim00.f0")
    pings, chats = [], []
    for _ in range(SAMPLES):
        pings.append(await alice.ping(to))
        seconds, reply = await alice.ask(bare, "read sim00.f0")
        if "sim00.f0" not in reply:
            raise BenchError(f"`read sim00.f0` was answered with {reply!r}")
        chats.append(seconds)
    return pair("chat_latency", chats, PING, pings, 50, Target("ratio<=", 2))


def sensor(temperature: float) -> str:
    """What mq00 publishes: a Zigbee2MQTT-like message for all five of its fields."""
    return json.dumps(
        {"temperature": temperature, "humidity": 41.2, "pressure": 1009.7, "battery": 88, "linkquality": 96}
    )


async def alert_latency(lab: Lab, alice: Client) -> list[Result]:
    """MQTT publish until the watch's message reaches the contact, vs a bare MQTT hop plus
    an XMPP message between two bare clients."""
    gateway = lab.jid("gateway")
    _, reply = await alice.ask(gateway, "watch mq00.temperature > 30 interval 0.001s")
    if not reply.startswith("Watch #"):
        raise BenchError(f"the gateway did not take the watch: {reply!r}")
    port = lab.mosquitto.port
    pub = Publisher(port, "bench-publisher").start()
    bare = Subscriber(port, ["bench/alert-baseline"], "bench-bare-alert").start()
    bob, carol = await lab.client("bob").start(), await lab.client("carol").start()
    try:
        alerts, base = [], []
        for i in range(WARMUP + SAMPLES):
            # The watch fires (ALERT) and clears (CLEARED) in turn: each publish sends one message.
            arrived = alice.expect(
                lambda m: m["from"].bare == gateway and m["body"].startswith(("ALERT", "CLEARED"))
            )
            sent = pub.publish("bench/mq00", sensor(35.0 if i % 2 == 0 else 20.0))
            alert = (await within(arrived, "the watch's message", 10)).at - sent
            mqtt = await _bare_hop(pub, bare)
            arrived = carol.chat_from(bob.jid)
            sent = bob.send(carol.jid, "ALERT #1 mq00.temperature > 30: now 35.0 °C")
            xmpp = (await within(arrived, "bob's message to carol", 10)).at - sent
            if i >= WARMUP:
                alerts.append(alert)
                base.append(mqtt + xmpp)
    finally:
        pub.stop()
        bare.stop()
        await bob.stop()
        await carol.stop()
    return pair(
        "alert_latency",
        alerts,
        "bare MQTT publish → subscriber plus an XMPP message between two bare clients",
        base,
        99,
        Target("ratio<=", 2),
    )


async def _bare_hop(pub: Publisher, sub: Subscriber) -> float:
    sub.expected = sub.count + 1
    sub.done.clear()
    sent = pub.publish("bench/alert-baseline", sensor(35.0))
    if not await asyncio.to_thread(sub.done.wait, 10):
        raise BenchError("the bare MQTT subscriber got nothing within 10 s")
    return sub.last - sent
