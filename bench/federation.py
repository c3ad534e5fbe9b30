"""A contact on another server (docs/federation.md) against one on the gateway's own server, in
one run: chat round trip, an XEP-0323 read-out of 100 fields and a watch's alert, sample by
sample; then the time from the contact's server coming back to the last delayed alert delivered.

Two federated Prosody servers of their own (gateway/localservers.py `Federation`): home.example,
where the gateway and `near` have their accounts, and provider.example, where `far` has hers.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

from gateway.demo.localservers import Federation, Prosody

from .clients import BenchError, Client, Publisher, within
from .lab import RESOURCE, GatewayProcess, Lab
from .latency import WARMUP, pair
from .results import Result

SAMPLES = 500  # per quantity and contact
HOME, PROVIDER = "home.example", "provider.example"
FIELDS = 100
TOPIC = "bench/fed/t"
LOCAL = "the same for a contact on the gateway's own server"


class Servers:
    """home.example and provider.example, federated, with the accounts this benchmark uses."""

    def __init__(self, root: Path, nagle: bool):
        self.federation = Federation(root / "federation", {HOME: "127.0.0.2", PROVIDER: "127.0.0.3"})
        self.home = Prosody(root / HOME, domain=HOME, uploads=False, federation=self.federation, nagle=nagle)
        self.provider = Prosody(
            root / PROVIDER, domain=PROVIDER, uploads=False, federation=self.federation, nagle=nagle
        )
        self.passwords = {user: secrets.token_urlsafe(12) for user in ("gateway", "near", "far")}

    def start(self) -> None:
        self.federation.start()
        for user, server in (("gateway", self.home), ("near", self.home), ("far", self.provider)):
            server.register(user, self.passwords[user])
        self.home.start()
        self.provider.start()

    def stop(self) -> None:
        self.home.stop()
        self.provider.stop()
        self.federation.stop()

    def client(self, user: str) -> Client:
        server = self.provider if user == "far" else self.home
        return Client(f"{user}@{server.domain}", self.passwords[user], server.address, server.ca_file)


def gateway(lab: Lab, servers: Servers, work: Path) -> GatewayProcess:
    """The gateway on home.example: 100 simulated fields to read, one MQTT field to watch;
    near (same server) and far (provider.example) as admins, far with every alert."""
    devices = [
        {"id": "sim", "driver": "simulated", "interval": 3600,
         "fields": [{"name": f"f{i}", "noise": 0, "amplitude": 0, "base": i} for i in range(FIELDS)]},
        {"id": "mq", "driver": "mqtt", "fields": [{"name": "t", "topic": TOPIC}]},
    ]
    data = lab.config("federation", devices)
    home = servers.home
    data["xmpp"].update({"jid": f"gateway@{HOME}", "password": servers.passwords["gateway"],
                         "server": home.address, "ca_file": str(home.ca_file)})
    data["contacts"] = [{"jid": f"near@{HOME}", "role": "admin"},
                        {"jid": f"far@{PROVIDER}", "role": "admin", "alerts": "all"}]
    return GatewayProcess(work / "federation", data)


async def federation(lab: Lab, work: Path) -> list[Result]:
    """Chat, read-out and alert latency for far against near, then the delayed alerts' recovery."""
    servers = Servers(work / "servers", lab.nagle)
    servers.start()
    gw = gateway(lab, servers, work)
    near, far = servers.client("near"), servers.client("far")
    pub = Publisher(lab.mosquitto.port, "bench-federation-publisher")
    try:
        await near.start()
        await far.start()
        pub.start()
        jid = f"gateway@{HOME}"
        full = f"{jid}/{RESOURCE}"
        started = gw.start()
        await near.presence_after(jid, started, timeout=60)
        await far.presence_after(jid, started, timeout=60)
        for _ in range(50):  # until the gateway's MQTT subscription is up: it reads what is published
            pub.publish(TOPIC, "20")
            await asyncio.sleep(0.1)
            if "mq.t = 20" in (await near.ask(jid, "read mq.t"))[1]:
                break
        else:
            raise BenchError(f"the gateway does not read {TOPIC}: {(await near.ask(jid, 'read mq'))[1]!r}")
        _, reply = await near.ask(jid, "watch mq.t > 30 interval 0.001s")
        if not reply.startswith("Watch #"):
            raise BenchError(f"the gateway did not take the watch: {reply!r}")
        chats: dict[Client, list[float]] = {near: [], far: []}
        reads: dict[Client, list[float]] = {near: [], far: []}
        alerts: dict[Client, list[float]] = {near: [], far: []}
        for i in range(WARMUP + SAMPLES):
            for client in (near, far):
                seconds, reply = await client.ask(jid, "read sim.f1")
                if "sim.f1" not in reply:
                    raise BenchError(f"`read sim.f1` was answered with {reply!r}")
                chats[client].append(seconds)
                seconds, got = await client.readout(full, ["sim"])
                if got != FIELDS:
                    raise BenchError(f"a read-out of sim gave {got} fields, not {FIELDS}")
                reads[client].append(seconds)
            # One publish, one alert (ALERT and CLEARED in turn) to both: the same moment for each.
            arrived = {c: c.expect(lambda m: m["from"].bare == jid and m["body"].startswith(("ALERT", "CLEARED")))
                       for c in (near, far)}
            sent = pub.publish(TOPIC, "35" if i % 2 == 0 else "20")
            for client, fut in arrived.items():
                alerts[client].append((await within(fut, "the watch's message", 10)).at - sent)
        recovery = await _recovery(servers, near, far, pub, jid)
    finally:
        pub.stop()
        gw.stop()
        await near.stop()
        await far.stop()
        servers.stop()
    return [
        *pair("federation.chat", chats[far][WARMUP:], LOCAL, chats[near][WARMUP:], 50, None),
        *pair("federation.readout_100", reads[far][WARMUP:], LOCAL, reads[near][WARMUP:], 50, None),
        *pair("federation.alert", alerts[far][WARMUP:], LOCAL, alerts[near][WARMUP:], 50, None),
        Result("federation.recovery", recovery, "s"),
    ]


async def _recovery(servers: Servers, near: Client, far: Client, pub: Publisher, jid: str) -> float:
    """Seconds from provider.example accepting connections again to the last of three alerts
    that bounced while it was down reaching far, who logs in again at once."""
    await far.stop()
    servers.provider.stop()
    for value in ("35", "20", "35"):  # ALERT, CLEARED, ALERT
        arrived = near.expect(lambda m: m["from"].bare == jid and m["body"].startswith(("ALERT", "CLEARED")))
        pub.publish(TOPIC, value)
        await within(arrived, "the watch's message to near", 10)
    await asyncio.sleep(1.0)  # the gateway's server tries s2s and bounces the three
    servers.provider.start()
    back = time.perf_counter()
    again = servers.client("far")
    seen = []

    def fourth(msg: object) -> bool:  # the note, then the three alerts
        if msg["from"].bare == jid and msg["body"]:  # type: ignore[index]
            seen.append(msg)
        return len(seen) == 4

    last = again.expect(fourth)
    try:
        await again.start()
        got = await within(last, "the last delayed alert", 30)
    finally:
        await again.stop()
    if not seen[0]["body"].startswith("Delayed:"):  # type: ignore[index]
        raise BenchError(f"far's first message after the outage is not the note: {seen[0]['body']!r}")  # type: ignore[index]
    return got.at - back
