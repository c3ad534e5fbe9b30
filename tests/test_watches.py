"""Watches, timed sets and persisted history, on the hub without XMPP."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.auth import Actor
from gateway.config import parse
from gateway.hub import Health
from gateway.watches import Alert

ALICE = Actor("alice@x", "admin", "test")
VICTOR = Actor("victor@x", "viewer", "test")


def config(tmp_path: Path, **gateway: object):
    return parse({
        # Health alerts at once unless a test asks for the debounce (test_flapping.py does).
        "gateway": {"name": "W", "state_dir": str(tmp_path / "state"), "health_debounce": 0, **gateway},
        "contacts": [{"jid": "alice@x", "role": "admin"}, {"jid": "victor@x", "role": "viewer"},
                     {"jid": "olive@x", "role": "operator", "alerts": "all"}],
        "devices": [{
            "id": "sim", "driver": "simulated", "interval": 3600,
            "fields": [
                {"name": "temp", "unit": "°C", "noise": 0, "amplitude": 0, "base": 20},
                {"name": "relay", "type": "boolean", "writable": True},
                {"name": "speed", "type": "integer", "writable": True, "min": 0, "max": 100},
            ],
        }],
    })


@pytest.fixture
async def gw(tmp_path: Path):
    g = Gateway(config(tmp_path))
    await g.start()
    yield g
    await g.stop()


def collect(g: Gateway) -> list[Alert]:
    out: list[Alert] = []
    g.watches.sinks.append(out.append)
    g.reverts.sinks.append(out.append)
    return out


async def run(g: Gateway, text: str, actor: Actor = ALICE) -> str:
    return await g.commands.run(text, actor)


async def test_compare_watch_fires_once_per_crossing_with_hysteresis(gw: Gateway) -> None:
    alerts = collect(gw)
    reply = await run(gw, "watch sim.temp > 30 hysteresis 1 interval 1s", VICTOR)
    assert reply == "Watch #1 set: sim.temp > 30 hysteresis 1 interval 1s. Remove it with: unwatch 1"
    for v in (25, 31, 32, 29.5, 33):  # 29.5 is inside the hysteresis band: still firing
        gw.hub.push("sim", "temp", v)
    assert [a.text for a in alerts] == ["ALERT #1 sim.temp > 30 hysteresis 1 interval 1s: now 31 °C"]
    assert alerts[0].to == ("olive@x", "victor@x")  # the owner, and olive who asked for all alerts
    gw.hub.push("sim", "temp", 28.5)
    assert alerts[-1].text == "CLEARED #1 sim.temp > 30 hysteresis 1 interval 1s: now 28.5 °C"
    assert len(alerts) == 2


async def test_interval_suppresses_a_quick_refire_and_its_clear(gw: Gateway) -> None:
    alerts = collect(gw)
    await run(gw, "watch sim.temp > 30")  # default interval: 60 s
    for v in (31, 29, 31, 29):
        gw.hub.push("sim", "temp", v)
    assert [a.text.split(":")[0] for a in alerts] == ["ALERT #1 sim.temp > 30", "CLEARED #1 sim.temp > 30"]


async def test_change_and_offline_watches(gw: Gateway) -> None:
    alerts = collect(gw)
    await run(gw, "watch sim.relay change interval 1s")
    await run(gw, "watch sim offline")
    gw.hub.push("sim", "relay", True)
    gw.hub.set_health("sim", Health.OFFLINE, "unplugged")
    gw.hub.set_health("sim", Health.OK)
    texts = [a.text for a in alerts]
    assert "#1 sim.relay changed: off → on" in texts
    assert "ALERT #2 sim is offline: unplugged" in texts
    assert "CLEARED #2 sim is back to ok" in texts
    # Health changes also go to admins (alice by default) and contacts with alerts = "all".
    health = [a for a in alerts if a.watch_id is None]
    assert [(a.text, a.to) for a in health] == [
        ("sim: offline: unplugged", ("alice@x", "olive@x")),
        ("sim: back to ok", ("alice@x", "olive@x")),
    ]


async def test_ack_silences_until_clear(gw: Gateway) -> None:
    alerts = collect(gw)
    await run(gw, "watch sim offline interval 1s")
    gw.hub.set_health("sim", Health.OFFLINE, "a")
    assert await run(gw, "ack 1") == "Watch #1 acknowledged: silent until it clears."
    assert await run(gw, "ack 1", VICTOR) == "Error: No watch #1 of yours."
    gw.hub.set_health("sim", Health.OK)
    assert await run(gw, "ack 1") == "Error: #1 is not firing."
    assert [a.text for a in alerts if a.watch_id] == ["ALERT #1 sim is offline: a", "CLEARED #1 sim is back to ok"]


@pytest.mark.parametrize("cmd, error", [
    ("watch", "Error: Say what to watch."),
    ("watch sim.temp >> 3", "Error: Say a comparison (> >= < <= == !=) and a value, `change`, or for a device `offline`."),
    ("watch sim.temp > hot", "Error: sim.temp expects a number, got 'hot'."),
    ("watch sim.relay > 1", "Error: sim.relay is boolean: only == and != apply."),
    ("watch sim.nope > 1", "Error: sim has no field 'nope'; it has: temp, relay, speed."),
    ("watch sim online", "Error: For a device say `watch sim offline`; for a value, `watch sim.FIELD > 30`."),
    ("watch sim.temp > 3 interval soon", "Error: 'soon' is not a duration (use 30s, 15m, 6h, 2d)."),
    ("unwatch x", "Give the watch number, as listed by watches. Usage: unwatch ID (more: help unwatch)"),
    ("unwatch 99", "Error: No watch #99 of yours."),
])
async def test_bad_watch_commands_get_clear_errors(gw: Gateway, cmd: str, error: str) -> None:
    assert await run(gw, cmd) == error
    assert gw.watches.watches == {}


async def test_watches_survive_restart_and_are_listed(tmp_path: Path) -> None:
    g = Gateway(config(tmp_path))
    await g.start()
    await run(g, "watch sim.temp >= 25", VICTOR)
    await run(g, "watch sim offline")
    await g.stop()
    g2 = Gateway(config(tmp_path))
    await g2.start()
    try:
        assert await run(g2, "watches", VICTOR) == "1 watches:\n#1  sim.temp >= 25\n  ok"
        listing = await run(g2, "watches")
        assert listing.endswith("\n#2  sim offline\n  ok") and "\n  ok, of victor@x" in listing, listing
        assert await run(g2, "unwatch 1", VICTOR) == "Watch #1 removed: sim.temp >= 25"
        assert (await run(g2, "watch sim.temp < 0")).startswith("Watch #3 set")
    finally:
        await g2.stop()


async def test_watch_quotas_per_contact_then_the_global_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.watches.MAX_WATCHES", 4)
    g = Gateway(config(tmp_path, watches_per_contact=1, watches_per_admin=2))
    await g.start()
    try:
        olive = Actor("olive@x", "operator", "test")
        assert (await run(g, "watch sim.temp > 50")).startswith("Watch #1 set")
        assert (await run(g, "watch sim.temp > 60")).startswith("Watch #2 set")
        assert await run(g, "watch sim.temp > 70") == (
            "Error: You have 2 watches, your quota as admin (2); free one with `unwatch ID` (e.g. unwatch 1).")
        assert (await run(g, "watch sim.temp > 70", VICTOR)).startswith("Watch #3 set")
        assert (await run(g, "watch sim.temp > 70", olive)).startswith("Watch #4 set")
        assert await run(g, "watch sim.temp > 80", olive) == (
            "Error: You have 1 watch, your quota as operator (1); free one with `unwatch ID` (e.g. unwatch 4).")
        await run(g, "unwatch 4", olive)
        await run(g, "unwatch 1")
        assert (await run(g, "watch sim.temp > 80", olive)).startswith("Watch #5 set")  # room again
        assert (await run(g, "watch sim.temp > 90")).startswith("Watch #6 set")  # 4 in all now
        await run(g, "unwatch 3", VICTOR)
        monkeypatch.setattr("gateway.watches.MAX_WATCHES", 3)
        assert await run(g, "watch sim.temp > 10", VICTOR) == (
            "Error: The gateway holds its most watches (3) in all; free one of yours with `unwatch ID`, or ask an admin.")
    finally:
        await g.stop()


async def test_timed_set_reverts_and_is_listed(gw: Gateway) -> None:
    alerts = collect(gw)
    reply = await run(gw, "set sim.relay on for 1s")
    assert reply == "sim.relay: off → on, back to off in 1 s"
    assert "pending: sim.relay back to off in" in await run(gw, "status")
    await asyncio.sleep(1.3)
    assert gw.hub.field("sim.relay").latest.value is False
    assert alerts[-1].text == "sim.relay: time is up, back to off (was on)"
    assert alerts[-1].to == ("alice@x",)
    assert gw.hub.audit.entries[-1].actor.via == "timer"
    assert "pending" not in await run(gw, "status")


async def test_plain_set_cancels_a_pending_revert(gw: Gateway) -> None:
    await run(gw, "set sim.speed 50 for 1s")
    assert await run(gw, "set sim.speed 70") == "sim.speed: 50 → 70 (the pending timed revert is cancelled)"
    await asyncio.sleep(1.2)
    assert gw.hub.field("sim.speed").latest.value == 70


async def test_timed_set_refused_for_viewer_and_bad_durations(gw: Gateway) -> None:
    assert (await run(gw, "set sim.relay on for 10m", VICTOR)).startswith("Refused:")
    assert await run(gw, "set sim.relay on for ever") == "Error: 'ever' is not a duration (use 30s, 15m, 6h, 2d)."
    assert await run(gw, "set sim.relay on for 9d") == "Error: 9d is longer than the 7 days a timed set may last."
    assert gw.reverts.pending == {}
    assert gw.hub.field("sim.relay").latest.value is False


async def test_pending_revert_survives_restart(tmp_path: Path) -> None:
    g = Gateway(config(tmp_path))
    await g.start()
    await run(g, "set sim.speed 40 for 2s")
    await g.stop()
    g2 = Gateway(config(tmp_path))
    await g2.start()
    try:
        assert "sim.speed" in g2.reverts.pending
        # The simulated device starts at 0 again: it reports 40 as the real one would (a set would cancel the revert).
        g2.hub.push("sim", "speed", 40)
        await asyncio.sleep(2.3)
        assert g2.hub.field("sim.speed").latest.value == 0
        assert g2.reverts.pending == {}
    finally:
        await g2.stop()


async def test_a_timed_set_with_no_earlier_value_persists_where_it_goes_back(tmp_path: Path) -> None:
    g = Gateway(config(tmp_path))
    await g.start()
    g.hub.field("sim.speed").latest = None  # nothing reported yet
    g.hub.field("sim.relay").latest = None
    assert await run(g, "set sim.speed 40 for 2s then 7") == "sim.speed: — → 40, back to 7 in 2 s"
    assert await run(g, "set sim.relay on for 2s") == "sim.relay: — → on, back to off in 2 s"
    await g.stop()
    stored = json.loads((tmp_path / "state" / "reverts.json").read_text())
    assert {r["ref"]: r["value"] for r in stored} == {"sim.speed": 7, "sim.relay": False}
    g2 = Gateway(config(tmp_path))
    await g2.start()
    try:
        g2.hub.push("sim", "speed", 40)  # the device reports the state it was left in
        g2.hub.push("sim", "relay", True)
        await asyncio.sleep(2.3)
        assert (g2.hub.field("sim.speed").latest.value, g2.hub.field("sim.relay").latest.value) == (7, False)
        assert g2.reverts.pending == {}
    finally:
        await g2.stop()


async def test_history_persists_across_restart_and_windows(tmp_path: Path) -> None:
    # Every reading reaches the disk here (history_per_second = 0); the default thinning of a
    # burst to two per second is tested in tests/test_mqtt_faults.py.
    g = Gateway(config(tmp_path, history_size=5, history_per_second=0))
    await g.start()
    for v in range(10):
        g.hub.push("sim", "temp", v)
    await g.stop()
    g2 = Gateway(config(tmp_path, history_size=5, history_per_second=0))
    await g2.start()
    try:
        # The stored five (5..9) come back, then the simulated device's first reading (20).
        values = [r.value for r in g2.hub.field("sim.temp").history]
        assert values == [6.0, 7.0, 8.0, 9.0, 20.0]
        # Memory holds 5, not the hour: history.db answers, with every reading (issue 24).
        reply = await run(g2, "history sim.temp 1h")
        lines = reply.split("\n")
        assert lines[0].startswith("sim.temp: 1h at 1-minute resolution, 1 rows; data since ")
        assert "min 0 at " in reply and "max 20 at " in reply and "; 12 readings" in reply  # 10 + 20 at each start
        assert (await run(g2, "history sim.temp 0")).startswith(
            "The count must be a whole number from 1 to 100. Usage: history device.field [n | window] (more: help history)")
        assert (await run(g2, "history sim.temp 5x")).startswith("Error: '5x' is not a window; use 30m, 6h, 7d")
    finally:
        await g2.stop()


async def test_log_shows_changes_and_refusals(gw: Gateway) -> None:
    await run(gw, "set sim.relay on")
    await run(gw, "set sim.relay on", VICTOR)
    await run(gw, "set sim.speed 500")
    out = await run(gw, "log sim")
    lines = out.split("\n")
    assert lines[0] == "Last 3 actuator changes and attempts:"
    # Per change a row (field, change, age) within a phone's width; who asked, and why it was refused, under it.
    assert re.sub(r"\d+ s ago", "N s ago", out).split("\n")[1:] == [
        "sim.speed  refused (500)  N s ago",
        "  by alice@x via test: 500 is above the",
        "  maximum 100",
        "sim.relay  refused (on)   N s ago",
        "  by victor@x via test: set needs the",
        "  operator role, you are viewer",
        "sim.relay  off → on       N s ago",
        "  by alice@x via test",
    ], out
    assert await run(gw, "log sim.temp") == "No actuator changes recorded for sim.temp."


async def test_interval_is_echoed_as_given(tmp_path: Path) -> None:
    g = Gateway(config(tmp_path))
    await g.start()
    try:
        reply = await run(g, "watch sim.temp > 30 interval 5m", VICTOR)
        assert reply == "Watch #1 set: sim.temp > 30 interval 5m. Remove it with: unwatch 1"
        assert g.watches.watches[1].interval == 300
        # The same watch written another way is still the same watch.
        assert await run(g, "watch sim.temp > 30 interval 300s", VICTOR) == "Error: You already have this watch as #1."
        assert await run(g, "watch sim offline interval 2h", VICTOR) == (
            "Watch #2 set: sim offline interval 2h. Remove it with: unwatch 2"
        )
    finally:
        await g.stop()
    g2 = Gateway(config(tmp_path))
    await g2.start()
    try:
        assert await run(g2, "watches", VICTOR) == "2 watches:\n#1  sim.temp > 30 interval 5m\n  ok\n#2  sim offline interval 2h\n  ok"
    finally:
        await g2.stop()


async def test_a_watch_that_holds_already_alerts_after_its_reply(gw: Gateway) -> None:
    alerts = collect(gw)
    reply = await run(gw, "watch sim.temp > 10")  # temp is 20
    assert reply == "Watch #1 set: sim.temp > 10 (firing now). Remove it with: unwatch 1"
    assert alerts == []  # not yet: the reply goes out first
    await asyncio.sleep(0)
    assert [a.text for a in alerts] == ["ALERT #1 sim.temp > 10: now 20 °C"]
