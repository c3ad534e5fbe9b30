"""`iot-gateway run` as a real process: online on Prosody, answers, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import XmppServer
from tests.helpers import answering

ROOT = Path(__file__).resolve().parent.parent


async def test_run_process_serves_and_stops_on_sigterm(xmpp_server: XmppServer, tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f"""
[gateway]
name = "Process GW"
state_dir = "{tmp_path}/state"
[xmpp]
jid = "{xmpp_server.jid('gateway')}"
server = "{xmpp_server.prosody.address}"
ca_file = "{xmpp_server.prosody.ca_file}"
omemo = "off"  # stderr is a pipe read at the end: OMEMO's first start (100 keys published) logs too much at --debug
[[contacts]]
jid = "{xmpp_server.jid('alice')}"
role = "admin"
[[devices]]
id = "sim"
driver = "simulated"
  [[devices.fields]]
  name = "lamp"
  type = "boolean"
  writable = true
"""
    )
    env = dict(os.environ, IOT_GATEWAY_XMPP_PASSWORD=xmpp_server.passwords["gateway"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(cfg), "--debug"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )
    alice = await xmpp_server.peer("alice").start()
    try:
        gw = xmpp_server.jid("gateway")
        await answering(alice, gw, "Process GW: 1/1")
        reply = await alice.ask_for(gw, "set sim.lamp on", "sim.lamp", timeout=3) if proc.poll() is None else proc.stderr.read()
        assert reply == "sim.lamp: off → on"
    finally:
        await alice.stop()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(10)
        finally:
            proc.kill()
        err = proc.stderr.read()
    assert code == 0, err
    assert time.monotonic() - t0 < 5
    assert "received SIGTERM, stopping" in err
    # The password must never reach the log, not even at debug level.
    assert xmpp_server.passwords["gateway"] not in err
    assert "alice@localhost via chat: sim.lamp off -> on" in err
