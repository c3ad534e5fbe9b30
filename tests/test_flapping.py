"""Issue 19, item 1: a flapping link never reaches contacts as one alert per flap.

Health alerts are debounced per device (a state is told once it has lasted
`health_debounce` seconds), and a device that flaps gets one summary, then
quiet until it is stable; the state it ends in is always told. Through the real
Prosody, and once through a real MQTT availability topic (LWT) on Mosquitto.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

from gateway.app import Gateway
from gateway.config import parse
from gateway.hub import Health
from gateway.demo.localservers import Mosquitto
from gateway.watches import FLAP_QUIET, Alert
from tests.conftest import RunningGateway, XmppServer, gateway_config, start_gateway
from tests.helpers import until
from tests.peer import Peer
from tests.test_mqtt import Publisher, unique

DEBOUNCE = 0.5  # seconds; a flapping device is quiet until it kept one state FLAP_QUIET × this
FLAPS = 40


def config(server: XmppServer, tmp_path: Path, devices: list[dict[str, Any]] | None = None, **extra: Any) -> Any:
    gateway = {"name": "Test GW", "state_dir": str(tmp_path / "state"), "health_debounce": DEBOUNCE}
    return gateway_config(server, tmp_path, devices, gateway=gateway, **extra)


async def told(peer: Peer, jid: str, quiet: float) -> list[str]:
    """Every message from `jid` until none came for `quiet` seconds (at most 20 messages)."""
    bodies: list[str] = []
    for _ in range(20):
        try:
            bodies.append(await peer.reply_from(jid, timeout=quiet))
        except TimeoutError:
            return bodies
    return bodies


def ends_ok(messages: list[str], device: str) -> bool:
    """Whether the last message tells the device is ok now (as a health alert or an offline watch's)."""
    return bool(messages) and (
        messages[-1] in (f"{device}: back to ok", f"CLEARED #1 {device} is back to ok") or messages[-1].endswith("; now ok")
    )


async def test_a_flapping_device_is_summarised_and_a_real_outage_told_once(
    xmpp_server: XmppServer, tmp_path: Path
) -> None:
    gw = await start_gateway(config(xmpp_server, tmp_path), xmpp_server.passwords["gateway"])
    alice = await xmpp_server.peer("alice").start()  # admin: health alerts
    victor = await xmpp_server.peer("victor").start()  # viewer with an offline watch
    hub = gw.gateway.hub
    try:
        assert await victor.ask(gw.jid, "watch sim offline interval 1s") == (
            "Watch #1 set: sim offline interval 1s. Remove it with: unwatch 1"
        )
        for _ in range(FLAPS):
            hub.set_health("sim", Health.OFFLINE, "link lost")
            await asyncio.sleep(0.02)
            hub.set_health("sim", Health.OK)
            await asyncio.sleep(0.02)
        quiet = FLAP_QUIET * DEBOUNCE + 2
        to_alice, to_victor = await asyncio.gather(told(alice, gw.jid, quiet), told(victor, gw.jid, quiet))
        for got in (to_alice, to_victor):
            assert 1 <= len(got) <= 2, got
            summary = re.fullmatch(r"sim: flapping: offline (\d+) times in the last \d+ s; now (ok|offline: link lost)",
                                   got[0])
            assert summary and int(summary[1]) >= 5, got
            assert ends_ok(got, "sim"), got  # the state it ended in is told
        # A blip shorter than the debounce is not news.
        hub.set_health("sim", Health.OFFLINE, "blip")
        await asyncio.sleep(DEBOUNCE / 5)
        hub.set_health("sim", Health.OK)
        # A real outage: one message when it started (stamped then), one when it is over.
        raised = time.time()
        hub.set_health("sim", Health.OFFLINE, "unplugged")
        alert = await alice.message_from(gw.jid)
        assert alert["body"] == "sim: offline: unplugged"
        stamp = alert["delay"]["stamp"]
        assert stamp is not None and abs(stamp.timestamp() - raised) < 0.5, stamp
        assert await victor.reply_from(gw.jid) == "ALERT #1 sim is offline: unplugged"
        hub.set_health("sim", Health.OK)
        assert await alice.reply_from(gw.jid) == "sim: back to ok"
        assert await victor.reply_from(gw.jid) == "CLEARED #1 sim is back to ok"
        assert await told(alice, gw.jid, 2 * DEBOUNCE) == []
        assert await told(victor, gw.jid, 2 * DEBOUNCE) == []
    finally:
        await alice.stop()
        await victor.stop()
        await gw.stop()


async def test_a_flapping_mqtt_availability_topic_is_summarised(
    xmpp_server: XmppServer, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    p = unique("flappy")
    device = {"id": "plug", "driver": "mqtt", "availability_topic": f"tele/{p}/LWT",
              "fields": [{"name": "power", "unit": "W", "topic": f"tele/{p}/power"}]}
    cfg = config(xmpp_server, tmp_path, [device], mqtt={"url": mosquitto.url, "client_id": unique("gwflap")})
    pub = Publisher(mosquitto.port)
    await pub.send(f"tele/{p}/LWT", "Online", retain=True)
    running: RunningGateway = await start_gateway(cfg, xmpp_server.passwords["gateway"])
    alice = await xmpp_server.peer("alice").start()
    node = running.gateway.hub.nodes["plug"]
    try:
        deadline = time.monotonic() + 10
        while not node.health.healthy:
            assert time.monotonic() < deadline, node.health
            await asyncio.sleep(0.05)
        for _ in range(FLAPS):  # the plug's Wi-Fi drops and comes back: its LWT flaps
            await pub.send(f"tele/{p}/LWT", "Offline", retain=True)
            await pub.send(f"tele/{p}/LWT", "Online", retain=True)
        got = await told(alice, running.jid, FLAP_QUIET * DEBOUNCE + 2)
        assert 1 <= len(got) <= 2, got
        assert re.fullmatch(r"plug: flapping: offline \d+ times in the last \d+ s; now (ok|offline \(LWT\))", got[0]), got
        assert ends_ok(got, "plug"), got
        # A real outage of the plug is still told, once each way.
        await pub.send(f"tele/{p}/LWT", "Offline", retain=True)
        assert await alice.reply_from(running.jid) == "plug: offline (LWT)"
        await pub.send(f"tele/{p}/LWT", "Online", retain=True)
        assert await alice.reply_from(running.jid) == "plug: back to ok"
        assert await told(alice, running.jid, 2 * DEBOUNCE) == []
    finally:
        pub.stop()
        await alice.stop()
        await running.stop()


async def test_health_news_follows_a_renamed_device_and_is_dropped_for_a_removed_one(tmp_path: Path) -> None:
    g = Gateway(parse({
        "gateway": {"state_dir": str(tmp_path / "state"), "health_debounce": 0.2},
        "contacts": [{"jid": "alice@x", "role": "admin"}],
        "devices": [{"id": "sim", "driver": "simulated", "interval": 3600, "fields": [{"name": "t"}]}],
    }))
    await g.start()
    alerts: list[Alert] = []
    g.watches.sinks.append(alerts.append)
    try:
        g.hub.set_health("sim", Health.OFFLINE, "unplugged")
        await until(lambda: len(alerts) == 1, "the offline alert")
        g.hub.rename_node("sim", "probe")
        g.hub.set_health("probe", Health.OK)  # contacts heard "sim: offline": this is news
        await until(lambda: len(alerts) == 2, "the back-to-ok alert")
        assert [(a.text, a.to) for a in alerts] == [
            ("sim: offline: unplugged", ("alice@x",)), ("probe: back to ok", ("alice@x",))
        ]
        g.hub.set_health("probe", Health.OFFLINE, "gone")
        g.hub.remove_node("probe", "unpaired")
        await asyncio.sleep(0.5)
        assert len(alerts) == 2
    finally:
        await g.stop()
