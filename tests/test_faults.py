"""Faults through the real stack: network drops, the XMPP server going away,
a driver crashing, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.demo.localservers import Prosody
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.proxy import Proxy

ROOT = Path(__file__).resolve().parent.parent
ROOM = "ops@conference.localhost"


async def test_short_network_drop_resumes_without_losing_stanzas(xmpp_server: XmppServer, tmp_path: Path) -> None:
    proxy = await Proxy(xmpp_server.prosody.port).start()
    config = gateway_config(xmpp_server, tmp_path, xmpp={"server": proxy.address})
    gw = await start_gateway(config, xmpp_server.passwords["gateway"])
    resumed = asyncio.Event()
    gw.session.client.add_event_handler("session_resumed", lambda _e: resumed.set())
    alice = await xmpp_server.peer("alice").start()
    try:
        proxy.cut()
        # While the gateway's link is down, alice's command waits in the server's
        # hibernated session (XEP-0198) instead of being lost.
        alice.client.send_message(mto=gw.jid, mbody="set sim.relay on", mtype="chat")
        reply = await alice.reply_matching(gw.jid, "sim.relay", timeout=20)
        assert reply == "sim.relay: off → on"
        assert resumed.is_set()
        assert proxy.connections == 2
    finally:
        await alice.stop()
        await gw.stop()
        await proxy.stop()


async def test_xmpp_server_restart_restores_presence_and_rooms(tmp_path: Path) -> None:
    prosody = Prosody(tmp_path / "prosody")
    pw = {"gateway": "gw-pass-2", "alice": "alice-pass-2", "victor": "v-pass", "olive": "o-pass"}
    for user, p in pw.items():
        prosody.register(user, p)
    prosody.start()
    server = XmppServer(prosody, pw)
    config = gateway_config(server, tmp_path, xmpp={"rooms": [ROOM]})
    gw = await start_gateway(config, pw["gateway"])
    try:
        prosody.stop()
        await asyncio.sleep(3)
        assert not gw.session.online.is_set()
        prosody.start()
        back = time.monotonic()
        alice = await server.peer("alice").start()
        try:
            alice.client.send_presence_subscription(pto=gw.jid)
            pres = await alice.presence_from(gw.jid, lambda p: p["type"] == "available", timeout=10)
            assert pres["status"] == "Test GW: 1/1 devices OK"
            while ROOM not in gw.session.rooms.joined and time.monotonic() - back < 10:
                await asyncio.sleep(0.1)
            assert ROOM in gw.session.rooms.joined
            assert time.monotonic() - back < 10
            await alice.join(ROOM, "alice")
            alice.client.send_message(mto=ROOM, mbody="gw: status", mtype="groupchat")
            assert (await alice.room_said(ROOM, "gw")).startswith("alice: Test GW: 1/1 devices OK")
        finally:
            await alice.stop()
    finally:
        await gw.stop()
        prosody.stop()


async def test_a_crashing_driver_marks_its_device_and_the_rest_carries_on(xmpp_server: XmppServer, tmp_path: Path) -> None:
    from devices.simulated import SimulatedDriver

    devices = [
        {"id": "good", "driver": "simulated", "interval": 0.1, "fields": [{"name": "temp"}]},
        {"id": "bad", "driver": "simulated", "interval": 0.1, "fields": [{"name": "temp"}]},
    ]
    original = SimulatedDriver._sample

    def sample(self: SimulatedDriver, now: float | None = None) -> None:
        if self.id == "bad" and self._started:
            raise RuntimeError("sensor library blew up")
        original(self, now)

    SimulatedDriver._sample = sample  # type: ignore[method-assign]
    try:
        gw = await start_gateway(gateway_config(xmpp_server, tmp_path, devices=devices), xmpp_server.passwords["gateway"])
        try:
            await asyncio.sleep(0.5)
            bad = gw.gateway.hub.nodes["bad"].health
            assert (bad.state.value, bad.reason) == ("error", "driver failed: RuntimeError: sensor library blew up")
            before = len(gw.gateway.hub.field("good.temp").history)
            await asyncio.sleep(0.3)
            assert len(gw.gateway.hub.field("good.temp").history) > before
            alice = await xmpp_server.peer("alice").start()
            try:
                assert (await alice.ask_for(gw.jid, "status", "Test GW")).startswith("Test GW: 1/2 devices OK")
            finally:
                await alice.stop()
        finally:
            await gw.stop()
    finally:
        SimulatedDriver._sample = original  # type: ignore[method-assign]


def _console(tmp_path: Path) -> subprocess.Popen:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'[gateway]\nstate_dir = "{tmp_path}/state"\n'
        '[[devices]]\nid = "sim"\ndriver = "simulated"\n'
        '  [[devices.fields]]\n  name = "t"\n'
    )
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "console", "--config", str(cfg)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_ready(proc: subprocess.Popen) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "console" in line, line


def test_sigint_stops_cleanly_and_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    proc = _console(tmp_path)
    _wait_ready(proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(5) == 0
    assert time.monotonic() - t0 < 5
    assert "received SIGINT, stopping" in proc.stderr.read()

    proc = _console(tmp_path)
    _wait_ready(proc)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGTERM)
    code = proc.wait(5)
    err = proc.stderr.read()
    assert code in (0, 1)  # 1 when the second signal cut the stop short
    assert "received SIGTERM, stopping" in err
