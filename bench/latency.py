"""Round trips through a running gateway process. Each is interleaved, sample by
sample, with its baseline, so both see the same machine at the same moment."""

from __future__ import annotations

import asyncio
import json

from .clients import BenchError, Client, Publisher, Subscriber, within
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


async def readout_latency(lab: Lab, alice: Client) -> list[Result]:
    """XEP-0323 momentary read-out of 100 fields, `<req/>` to done='true', vs ping.

    Also what the stack alone takes to carry the read-out's `<fields/>` message:
    the same element sent from one bare client to another through the same Prosody.
    """
    to = lab.gateway_jid
    for _ in range(WARMUP):
        await alice.ping(to)
        await alice.readout(to, READOUT_NODES)
    payload = alice.last_fields
    assert payload is not None
    pings, reads = [], []
    for _ in range(SAMPLES):
        pings.append(await alice.ping(to))
        seconds, fields = await alice.readout(to, READOUT_NODES)
        if fields != READOUT_FIELDS:
            raise BenchError(f"a read-out of {READOUT_NODES} gave {fields} fields, not {READOUT_FIELDS}")
        reads.append(seconds)
    bob, carol = await lab.client("bob").start(), await lab.client("carol").start()
    try:
        carried = []
        for _ in range(SAMPLES):
            arrived = carol.chat_from(bob.jid, body=False)
            sent = bob.send(carol.jid, payload=payload)
            carried.append((await within(arrived, "bob's <fields/> message to carol", 10)).at - sent)
    finally:
        await bob.stop()
        await carol.stop()
    stack = Result(
        "readout_latency.stack.p50", percentile(carried, 50) * 1000, "ms", PING, percentile(pings, 50) * 1000
    )
    return [*pair("readout_latency", reads, PING, pings, 50, Target("ratio<=", 2)), stack]


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
