"""A wrong or stepped wall clock (a Pi has no RTC): durations use the monotonic clock,
stamps from the future are not trusted, and history order does not depend on stamps.

The shim is `time.time` itself, patched for the whole process (the gateway's
modules call `time.time()`), while `time.monotonic` and the servers' clocks
stay true: what a Pi sees when NTP steps its clock.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.auth import Actor
from gateway.config import parse
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.helpers import until

OLIVE = Actor("olive@localhost", "operator", "chat")


def shift_wall_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """From now on the wall clock reads `seconds` off (negative: behind)."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


async def test_a_command_stamped_in_the_future_is_not_carried_out(
    xmpp_server: XmppServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await xmpp_server.peer("alice").start()
    gw_jid = xmpp_server.jid("gateway")
    try:
        # Sent while the gateway is offline: the server stores it with a delay stamp.
        alice.client.send_message(mto=gw_jid, mbody="set sim.relay on", mtype="chat")
        await asyncio.sleep(0.5)
        # The gateway boots with its clock a day behind: the stamp is a day in its future.
        shift_wall_clock(monkeypatch, -86400)
        gw = await start_gateway(gateway_config(xmpp_server, tmp_path), xmpp_server.passwords["gateway"])
        try:
            reply = await alice.reply_from(gw_jid)
            assert re.fullmatch(
                r"Ignored a command the server stamped 2[34](\.\d)? h ahead of the gateway's clock, so its age is "
                r"unknown \(is the gateway's clock wrong\?\); send it again\.",
                reply,
            ), reply
            assert gw.gateway.hub.field("sim.relay").latest.value is False
            assert not [e for e in gw.gateway.hub.audit.entries if e.ref == "sim.relay"]
        finally:
            await gw.stop()
    finally:
        await alice.stop()


async def test_stale_detection_and_countdowns_survive_the_clock_stepping_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse({
        "gateway": {"state_dir": str(tmp_path / "state")},
        "devices": [
            # One reading at start, then silence: it must go stale after 1 s.
            {"id": "quiet", "driver": "simulated", "interval": 3600, "stale_after": 1, "fields": [{"name": "t"}]},
            {"id": "sim", "driver": "simulated", "interval": 0.2,
             "fields": [{"name": "relay", "type": "boolean", "writable": True}]},
        ],
    })
    gw = Gateway(config)
    await gw.start()
    try:
        await until(lambda: gw.hub.nodes["quiet"].health.healthy, "the first reading")
        reply = await gw.commands.run("set sim.relay on for 30m", OLIVE)
        assert reply == "sim.relay: off → on, back to off in 30 min"

        shift_wall_clock(monkeypatch, -3600)  # NTP steps the clock back an hour
        await until(lambda: gw.hub.nodes["quiet"].health.state.value == "stale", "the silent device going stale", 5)
        status = await gw.commands.run("status", OLIVE)
        assert "back to off in 30 min" in status, status
        quiet = next(line for line in status.splitlines() if line.startswith("quiet"))
        assert "stale" in quiet and not re.search(r"data 0 s", quiet), status
        assert gw.hub.nodes["quiet"].silent_for() >= 1
        # What is stored for the next start is the real deadline in the (new) wall clock's terms.
        stored = gw.reverts.pending["sim.relay"].stored()
        assert abs(stored["due"] - (time.time() + 1800)) < 60
    finally:
        await gw.stop()


def _config(tmp_path: Path) -> object:
    return parse({
        "gateway": {"state_dir": str(tmp_path / "state"), "history_size": 5},
        "devices": [{"id": "probe", "driver": "simulated", "interval": 3600, "fields": [{"name": "t", "noise": 0}]}],
    })


async def test_readings_stamped_in_the_future_do_not_erase_newer_real_ones(tmp_path: Path) -> None:
    gw = Gateway(_config(tmp_path))
    await gw.start()
    try:
        # The clock was a day ahead for a while: five readings stamped tomorrow, 5091 °C ...
        for i in range(5):
            gw.hub.push("probe", "t", 5091 + i, at=time.time() + 86400 + i)
        await gw.history.flush()
        # ... then it was corrected, and real readings came in.
        now = time.time()
        for i in range(5):
            gw.hub.push("probe", "t", 20 + i, at=now - 10 + i)  # a second apart: none thinned out
        await gw.history.flush()
    finally:
        await gw.stop()

    again = Gateway(_config(tmp_path))
    await again.start()
    try:
        f = again.hub.field("probe.t")
        stored = [r.value for r in f.history]
        # The simulated probe adds one reading of its own at start, after the restored ones.
        assert stored[:4] == [21, 22, 23, 24] or stored == [20, 21, 22, 23, 24], stored
        assert 5091 not in stored
        assert "24" in await again.commands.run("history probe.t", OLIVE)
    finally:
        await again.stop()


async def test_a_newer_set_from_any_entry_point_cancels_the_pending_revert(
    xmpp_server: XmppServer, tmp_path: Path
) -> None:
    from tests.xep_helpers import child, iq, CTRL

    gw = await start_gateway(gateway_config(xmpp_server, tmp_path), xmpp_server.passwords["gateway"])
    olive = await xmpp_server.peer("olive").start()
    reverts = gw.gateway.reverts
    try:
        assert await olive.ask(gw.jid, "set sim.relay on for 30m") == "sim.relay: off → on, back to off in 30 min"
        # A second timed set keeps the first one's way back (off), not the intermediate value.
        assert await olive.ask(gw.jid, "set sim.relay on for 1h") == "sim.relay: on → on, back to off in 1.0 h"
        assert reverts.pending["sim.relay"].value is False
        # XEP-0325 from a machine: the field is set anew, so the old timer must not flip it back.
        answer = await iq(olive, gw.session.client.boundjid.full,
                          "<set xmlns='urn:xmpp:iot:control'><node nodeId='sim'/>"
                          "<boolean name='relay' value='true'/></set>", "set")
        child(answer, CTRL, "setResponse")
        assert "sim.relay" not in reverts.pending
        assert gw.gateway.state.load("reverts.json", None) == []
        # A plain chat set after a timed one still says the revert is cancelled.
        await olive.ask(gw.jid, "set sim.relay off for 10m")
        assert await olive.ask(gw.jid, "set sim.relay on") == "sim.relay: off → on (the pending timed revert is cancelled)"
        assert not reverts.pending
        # An ad-hoc write by another contact cancels too (the hub's write path, whoever asks).
        await olive.ask(gw.jid, "set sim.speed 10 for 10m")
        await gw.gateway.hub.write("sim.speed", 20, Actor("alice@localhost", "admin", "adhoc"))
        assert not reverts.pending
        assert "pending" not in await olive.ask(gw.jid, "status")
    finally:
        await olive.stop()
        await gw.stop()
