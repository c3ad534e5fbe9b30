"""The operator's chat through the real Prosody: alerts, queued alerts, rooms,
ad-hoc commands, rate limits and blocking strangers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from slixmpp.exceptions import IqError

from gateway.auth import Actor
from gateway.hub import Health
from gateway.demo.localservers import Prosody
from tests.conftest import RunningGateway, XmppServer, gateway_config, start_gateway
from tests.peer import Peer

ALICE = Actor("alice@localhost", "admin", "test")
ROOM = "ops@conference.localhost"


async def test_watch_alert_and_clear_reach_the_contact(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    alice, gw = peers["alice"], running_gateway
    reply = await alice.ask(gw.jid, "watch sim.speed > 50 interval 1s")
    assert reply == "Watch #1 set: sim.speed > 50 interval 1s. Remove it with: unwatch 1"
    # The alert is raised while the set is applied, so it may come before the reply.
    first = await alice.ask(gw.jid, "set sim.speed 60")
    assert {first, await alice.reply_from(gw.jid)} == {"sim.speed: 0 → 60", "ALERT #1 sim.speed > 50 interval 1s: now 60"}
    assert await alice.ask(gw.jid, "set sim.speed 70") == "sim.speed: 60 → 70"  # still above: no new alert
    first = await alice.ask(gw.jid, "set sim.speed 10")
    assert {first, await alice.reply_from(gw.jid)} == {"sim.speed: 70 → 10", "CLEARED #1 sim.speed > 50 interval 1s: now 10"}
    with pytest.raises(TimeoutError):
        await alice.reply_from(gw.jid, timeout=0.5)


async def test_watch_reply_comes_before_its_first_alert(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    alice, gw = peers["alice"], running_gateway
    # sim.speed is 0 already: the watch fires at once, and says so after it is confirmed.
    reply = await alice.ask(gw.jid, "watch sim.speed >= 0")
    assert reply == "Watch #1 set: sim.speed >= 0 (firing now). Remove it with: unwatch 1"
    assert await alice.reply_from(gw.jid) == "ALERT #1 sim.speed >= 0: now 0"


async def test_health_change_goes_to_admins_only(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw = running_gateway
    gw.gateway.hub.set_health("sim", Health.OFFLINE, "serial port gone")
    assert await peers["alice"].reply_from(gw.jid) == "sim: offline: serial port gone"
    with pytest.raises(TimeoutError):
        await peers["victor"].reply_from(gw.jid, timeout=0.5)


async def test_rate_limit_notice_then_silence(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    olive, gw = peers["olive"], running_gateway
    olive.drain()
    for _ in range(25):
        olive.client.send_message(mto=gw.jid, mbody="list", mtype="chat")
    replies = []
    with pytest.raises(TimeoutError):
        while True:
            replies.append(await olive.reply_from(gw.jid, timeout=1.5))
    assert len(replies) == 21
    assert replies[-1] == "Slow down: at most 20 commands per 10 s. Ignoring your messages until then."
    assert all(r.startswith("1 device:") for r in replies[:20])


async def test_stranger_blocked_after_repeated_subscription_requests(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    mallory, gw = peers["mallory"], running_gateway
    for _ in range(3):
        mallory.client.send_presence_subscription(pto=gw.jid)
        await asyncio.sleep(0.2)
    blocked: set = set()
    for _ in range(30):
        await asyncio.sleep(0.1)
        result = await gw.session.client.plugin["xep_0191"].get_blocked()
        blocked = {str(item["jid"]) for item in result["blocklist"]["items"]}
        if blocked:
            break
    assert blocked == {"mallory@localhost"}
    await gw.session.client.plugin["xep_0191"].unblock(["mallory@localhost"])


async def test_adhoc_set_form_for_operator_and_forbidden_for_viewer(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw = running_gateway
    full = f"{gw.jid}/gateway"

    async def execute(peer: Peer, node: str):
        iq = peer.client.make_iq_set(ito=full)
        iq["command"]["node"] = node
        iq["command"]["action"] = "execute"
        return await iq.send(timeout=10)

    with pytest.raises(IqError) as e:
        await execute(peers["victor"], "set")
    assert e.value.iq["error"]["condition"] == "forbidden"
    with pytest.raises(IqError) as e:
        await execute(peers["mallory"], "read")
    assert e.value.iq["error"]["condition"] == "forbidden"

    olive = peers["olive"]
    resp = await execute(olive, "set")
    form = resp["command"]["form"]
    assert set(form.get_fields()) == {"sim.relay", "sim.speed"}
    speed = form.get_fields()["sim.speed"]
    assert speed["validate"]["datatype"] == "xs:integer"
    assert speed["validate"]["range"] == {"minimum": "0", "maximum": "100"}

    async def submit(values: dict[str, str]):
        iq = olive.client.make_iq_set(ito=full)
        iq["command"]["node"] = "set"
        iq["command"]["sessionid"] = resp["command"]["sessionid"]
        iq["command"]["action"] = "complete"
        sub = olive.client.plugin["xep_0004"].make_form(ftype="submit")
        for var, value in values.items():
            sub.add_field(var=var, value=value)
        iq["command"].append(sub)
        return await iq.send(timeout=10)

    done = await submit({"sim.speed": "500", "sim.relay": "1"})
    assert done["command"]["notes"] == [("error", "Nothing was changed: sim.speed 500 is above the maximum 100")]
    assert gw.gateway.hub.field("sim.relay").latest.value is False

    resp = await execute(olive, "set")
    done = await submit({"sim.speed": "30", "sim.relay": "1"})
    assert done["command"]["notes"] == [("info", "sim.relay: off → on; sim.speed: 0 → 30")]
    assert gw.gateway.hub.field("sim.speed").latest.value == 30
    assert gw.gateway.hub.audit.entries[-1].actor == Actor("olive@localhost", "operator", "adhoc")

    read = await execute(peers["victor"], "read")
    assert read["command"]["form"].get_fields()["sim.speed"]["value"].startswith("30 (")


async def test_room_commands_honour_roles_and_ignore_strangers(xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]) -> None:
    config = gateway_config(xmpp_server, tmp_path, xmpp={"rooms": [ROOM], "nick": "gw"})
    gw = await start_gateway(config, xmpp_server.passwords["gateway"])
    try:
        for _ in range(50):  # the gateway joins (and creates) the room right after coming online
            if ROOM in gw.session.rooms.joined:
                break
            await asyncio.sleep(0.1)
        assert ROOM in gw.session.rooms.joined
        for user in ("alice", "victor"):  # mallory cannot join: the room is members-only (test_rooms.py)
            await peers[user].join(ROOM, user)
        alice = peers["alice"]

        alice.client.send_message(mto=ROOM, mbody="gw: read sim.relay", mtype="groupchat")
        assert (await alice.room_said(ROOM, "gw")).startswith("alice: sim.relay = off")

        alice.client.send_message(mto=ROOM, mbody="hello everyone", mtype="groupchat")
        peers["mallory"].client.send_message(mto=ROOM, mbody="gw: set sim.relay on", mtype="groupchat")
        peers["victor"].client.send_message(mto=ROOM, mbody="gw, set sim.relay on", mtype="groupchat")
        reply = await alice.room_said(ROOM, "gw")
        assert reply == "victor: Refused: set needs the operator role, you are viewer."
        assert gw.gateway.hub.field("sim.relay").latest.value is False

        gw.gateway.hub.set_health("sim", Health.ERROR, "driver crashed")
        assert await alice.room_said(ROOM, "gw") == "sim: error: driver crashed"
        with pytest.raises(TimeoutError):
            await alice.room_said(ROOM, "gw", timeout=0.5)  # nothing for mallory's command
    finally:
        await gw.stop()


async def test_alerts_raised_while_disconnected_arrive_later_with_their_time(tmp_path: Path) -> None:
    # A Prosody of its own: this test stops it.
    prosody = Prosody(tmp_path / "prosody")
    pw = {"gateway": "gw-pass-1", "alice": "alice-pass-1"}
    for user, p in pw.items():
        prosody.register(user, p)
    prosody.start()
    server = XmppServer(prosody, pw)
    config = gateway_config(server, tmp_path, xmpp={"keepalive": 5})
    gw = await start_gateway(config, pw["gateway"])
    try:
        gw.gateway.watches.add(gw.gateway.watches.parse("alice@localhost", ["sim.speed", ">", "50", "interval", "1s"]))
        prosody.stop()
        for _ in range(50):
            if not gw.session.online.is_set():
                break
            await asyncio.sleep(0.1)
        assert not gw.session.online.is_set()
        raised = time.time()
        await gw.gateway.hub.write("sim.speed", 80, ALICE)
        await asyncio.sleep(0.5)
        prosody.start()
        alice = await server.peer("alice").start()
        try:
            msg = await alice.message_from("gateway@localhost", timeout=30)
            assert msg["body"] == "ALERT #1 sim.speed > 50 interval 1s: now 80"
            stamp = msg["delay"]["stamp"]
            assert stamp is not None and abs(stamp.timestamp() - raised) < 1.5
            assert gw.session.online.is_set()
        finally:
            await alice.stop()
    finally:
        await gw.stop()
        prosody.stop()


async def test_timed_set_knows_where_it_goes_back_before_it_switches(
    running_gateway: RunningGateway, peers: dict[str, Peer]
) -> None:
    alice, gw = peers["alice"], running_gateway
    hub = gw.gateway.hub
    # Fields no reading has come for yet (an MQTT device whose state topic has said nothing).
    hub.field("sim.relay").latest = None
    hub.field("sim.speed").latest = None
    # No earlier value, no safe value, not a boolean: refused up front, nothing switches.
    reply = await alice.ask_for(gw.jid, "set sim.speed 30 for 8s", "Error")
    assert reply == "Error: no earlier value of sim.speed to go back to: give one, e.g. `set sim.speed 30 for 8s then 0`."
    assert hub.field("sim.speed").latest is None and not gw.gateway.reverts.pending
    last = hub.audit.entries[-1]  # a refused set, audited as one
    assert (last.ref, last.outcome, last.reason) == ("sim.speed", "refused", "timed set with no earlier value to go back to")
    # `then` is checked like any set value, before anything is written.
    reply = await alice.ask_for(gw.jid, "set sim.speed 30 for 8s then 500", "Error")
    assert reply == "Error: sim.speed 500 is above the maximum 100."
    assert hub.field("sim.speed").latest is None and not gw.gateway.reverts.pending
    reply = await alice.ask_for(gw.jid, "set sim.speed 30 for 1s then 5", "sim.speed")
    assert reply == "sim.speed: — → 30, back to 5 in 1 s"
    assert await alice.reply_matching(gw.jid, "sim.speed: time") == "sim.speed: time is up, back to 5 (was 30)"
    # A boolean with no earlier value goes back to the opposite of what was set.
    reply = await alice.ask_for(gw.jid, "set sim.relay on for 1s", "sim.relay")
    assert reply == "sim.relay: — → on, back to off in 1 s"
    assert await alice.reply_matching(gw.jid, "sim.relay: time") == "sim.relay: time is up, back to off (was on)"
    assert hub.field("sim.relay").latest.value is False


async def test_one_viewer_cannot_take_every_watch(xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]) -> None:
    gateway = {"name": "Test GW", "state_dir": str(tmp_path / "state"), "health_debounce": 0, "watches_per_contact": 2}
    gw = await start_gateway(gateway_config(xmpp_server, tmp_path, gateway=gateway), xmpp_server.passwords["gateway"])
    try:
        victor, olive = peers["victor"], peers["olive"]
        assert (await victor.ask_for(gw.jid, "watch sim.temp > 1000", "Watch")).startswith("Watch #1 set")
        assert (await victor.ask_for(gw.jid, "watch sim.speed > 90", "Watch")).startswith("Watch #2 set")
        reply = await victor.ask_for(gw.jid, "watch sim.speed < -1", "Error")
        assert reply == "Error: You have 2 watches, your quota as viewer (2); free one with `unwatch ID` (e.g. unwatch 1)."
        assert len(gw.gateway.watches.watches) == 2
        # Another contact is not held back by the viewer's watches.
        assert (await olive.ask_for(gw.jid, "watch sim.speed > 90", "Watch")).startswith("Watch #3 set")
        # Freeing one makes room again.
        assert (await victor.ask_for(gw.jid, "unwatch 1", "Watch")).startswith("Watch #1 removed")
        assert (await victor.ask_for(gw.jid, "watch sim.speed < -1", "Watch")).startswith("Watch #4 set")
    finally:
        await gw.stop()
