"""The state folder: honest replies when saving fails, persisted acks, timed reverts
that outlive an unreachable device, and one process per folder."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.auth import Actor
from gateway.config import parse
from gateway.demo.localservers import Mosquitto, free_port
from gateway.state import SaveError, StateDir
from gateway.watches import Alert
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.helpers import answering
from tests.test_mqtt import Echo, Publisher, retained, until

ROOT = Path(__file__).resolve().parent.parent
ALICE = Actor("alice@x", "admin", "test")
FULL = "state folder full (No space left on device)"


def config(state_dir: Path, speed_max: int = 100) -> Any:
    return parse({
        "gateway": {"name": "S", "state_dir": str(state_dir)},
        "contacts": [{"jid": "alice@x", "role": "admin"}],
        "devices": [{
            "id": "sim", "driver": "simulated", "interval": 3600,
            "fields": [
                {"name": "temp", "unit": "°C", "noise": 0, "amplitude": 0, "base": 20},
                {"name": "speed", "type": "integer", "writable": True, "min": 0, "max": speed_max},
            ],
        }],
    })


def collect(g: Gateway) -> list[Alert]:
    out: list[Alert] = []
    g.watches.sinks.append(out.append)
    g.reverts.sinks.append(out.append)
    return out


async def run(g: Gateway, text: str) -> str:
    return await g.commands.run(text, ALICE)


def stored(state_dir: Path, name: str) -> Any:
    return json.loads((state_dir / name).read_text())


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (needs root and mount rights; skipped otherwise): room for history.db, then fill it."""
    mnt = tmp_path / "state"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); "
                    "test_save_failure_is_specific_logged_once_and_retried covers ENOSPC without it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    try:
        with open(filler, "wb") as f:
            for _ in range(1000):  # 1 MiB takes 256 of these
                f.write(b"x" * 4096)
                f.flush()
    except OSError as e:
        assert e.errno == errno.ENOSPC
        return filler
    raise AssertionError(f"{folder} never filled up")


async def test_full_disk_replies_say_not_saved_and_nothing_is_lost_once_space_is_back(
    tiny_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="iot_gateway.state")
    g = Gateway(config(tiny_fs))
    await g.start()
    try:
        assert (await run(g, "watch sim.temp > 30")).startswith("Watch #1 set: sim.temp > 30.")
        before = (tiny_fs / "watches.json").read_bytes()
        filler = fill(tiny_fs)

        assert await run(g, "watch sim.temp < 0") == (
            f"Watch #2 set: sim.temp < 0, but NOT saved: {FULL}; it will be lost on restart"
            " (saving is retried every 30 s). Remove it with: unwatch 2"
        )
        assert await run(g, "unwatch 1") == (
            f"Watch #1 removed: sim.temp > 30, but NOT saved: {FULL}; it will be back after a restart"
            " (saving is retried every 30 s)"
        )
        reply = await run(g, "set sim.speed 40 for 30m")
        assert reply == (
            f"sim.speed: 0 → 40, back to 0 in 30 min, but NOT saved: {FULL}; a restart before then would"
            " forget to go back (saving is retried every 30 s)"
        )
        assert f"NOT saving state: {FULL}" in (await run(g, "status")).split("\n")
        # The old file is whole and no temporary file is left behind.
        assert (tiny_fs / "watches.json").read_bytes() == before
        assert sorted(p.name for p in tiny_fs.iterdir() if p.name.startswith(".")) == []
        # Three failed saves, one log line for the cause.
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "iot_gateway.state"]
        assert len(errors) == 1 and "No space left on device" in errors[0].getMessage()

        filler.unlink()
        g.state.retry()  # what the 30 s timer calls
        assert [w["id"] for w in stored(tiny_fs, "watches.json")["watches"]] == [2]
        assert [r["ref"] for r in stored(tiny_fs, "reverts.json")] == ["sim.speed"]
        assert "saving works again" in caplog.text
        assert "NOT saving" not in await run(g, "status")
    finally:
        await g.stop()
    g2 = Gateway(config(tiny_fs))
    await g2.start()
    try:
        assert await run(g2, "watches") == "1 watches:\n#2  sim.temp < 0\n  ok"
        assert "sim.speed" in g2.reverts.pending
    finally:
        await g2.stop()


async def test_save_failure_is_specific_logged_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same without mount rights: ENOSPC injected at the one place StateDir writes."""
    caplog.set_level(logging.INFO, logger="iot_gateway.state")
    state = StateDir(tmp_path / "state")
    real_write = state._write
    failing = {"errno": errno.ENOSPC}

    def write(name: str, value: Any) -> None:
        if failing["errno"]:
            raise OSError(failing["errno"], os.strerror(failing["errno"]))
        real_write(name, value)

    monkeypatch.setattr(state, "_write", write)
    for i in range(3):
        with pytest.raises(SaveError) as e:
            state.save("watches.json", {"n": i})
    assert e.value.reason == FULL
    assert str(e.value) == f"cannot save watches.json: {FULL}"
    assert state.error("watches.json") is e.value
    failing["errno"] = errno.EROFS  # another cause: logged too, once
    for _ in range(2):
        with pytest.raises(SaveError, match="read-only file system"):
            state.save("reverts.json", [])
    assert [r.getMessage().split(": ", 1)[0] for r in caplog.records if r.levelno == logging.ERROR] == [
        "cannot save watches.json in " + str(state.path),
        "cannot save reverts.json in " + str(state.path),
    ]
    failing["errno"] = 0
    state.retry()
    assert stored(state.path, "watches.json") == {"n": 2}  # the latest value, kept in memory meanwhile
    assert state.error("watches.json") is None and state.error("reverts.json") is None


def test_save_fsyncs_the_file_and_then_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    StateDir(tmp_path / "state").save("x.json", [1])
    assert synced == ["file", "dir"]


# ---------------------------------------------------------------- acks


async def test_ack_survives_a_restart(tmp_path: Path) -> None:
    g = Gateway(config(tmp_path / "state"))
    await g.start()
    try:
        alerts = collect(g)
        reply = await run(g, "watch sim.temp > 10 interval 1s")
        assert reply.startswith("Watch #1 set: sim.temp > 10 interval 1s (firing now)")
        await asyncio.sleep(0)  # the alert of a new watch follows its reply
        assert await run(g, "ack 1") == "Watch #1 acknowledged: silent until it clears."
        assert [a.text for a in alerts] == ["ALERT #1 sim.temp > 10 interval 1s: now 20 °C"]
    finally:
        await g.stop()
    g2 = Gateway(config(tmp_path / "state"))
    alerts = collect(g2)
    await g2.start()
    try:
        g2.hub.push("sim", "temp", 21)
        assert alerts == []  # old code: the watch fired again at start
        assert await run(g2, "watches") == "1 watches:\n#1  sim.temp > 10 interval 1s\n  FIRING (acked)"
        g2.hub.push("sim", "temp", 5)
        assert [a.text for a in alerts] == ["CLEARED #1 sim.temp > 10 interval 1s: now 5 °C"]
        assert stored(tmp_path / "state", "watches.json")["watches"][0]["acked"] is False
        g2.hub.push("sim", "temp", 25)
        assert alerts[-1].text == "ALERT #1 sim.temp > 10 interval 1s: now 25 °C"
    finally:
        await g2.stop()


# ---------------------------------------------------------------- timed reverts


def plug(p: str) -> list[dict[str, Any]]:
    return [{
        "id": "plug", "driver": "mqtt", "fields": [
            {"name": "relay", "type": "boolean", "writable": True, "topic": f"stat/{p}/POWER",
             "command_topic": f"cmnd/{p}/POWER", "payload_on": "ON", "payload_off": "OFF", "retain": True},
        ],
    }]


async def publish(port: int, topic: str, payload: str) -> None:
    pub = Publisher(port)
    try:
        await pub.send(topic, payload)
    finally:
        pub.stop()


async def test_revert_due_while_broker_is_down_is_retried_and_the_owner_told(
    xmpp_server: XmppServer, tmp_path: Path
) -> None:
    broker = Mosquitto(tmp_path / "broker", port=free_port())
    broker.start()
    p = "plug-" + uuid.uuid4().hex[:6]
    cfg = gateway_config(xmpp_server, tmp_path, devices=plug(p), mqtt={"url": broker.url})
    running = await start_gateway(cfg, xmpp_server.passwords["gateway"])
    gw, jid = running.gateway, running.jid
    olive = await xmpp_server.peer("olive").start()
    echo = Echo(broker.port, {f"cmnd/{p}/POWER": (f"stat/{p}/POWER", str)})  # the plug confirms each set
    try:
        await until(lambda: gw.hub.nodes["plug"].health.healthy, "broker connection")
        await publish(broker.port, f"stat/{p}/POWER", "OFF")
        await until(lambda: gw.hub.field("plug.relay").latest is not None, "the plug's state")
        assert await olive.ask(jid, "set plug.relay on for 3s") == "plug.relay: off → on, back to off in 3 s"
        await publish(broker.port, f"stat/{p}/POWER", "ON")  # the plug reports its new state
        await until(lambda: gw.hub.field("plug.relay").latest.value is True, "the plug on")
        broker.stop()
        await until(lambda: not gw.hub.nodes["plug"].health.healthy, "the plug offline")

        told = await olive.reply_matching(jid, "plug.relay: ", timeout=10)
        assert told.startswith("plug.relay: time is up, but going back to off failed: plug refused the write: "
                               "not connected to the MQTT broker")
        assert told.endswith("Retrying until it works; status shows it")
        status = await olive.ask(jid, "status")
        assert re.search(r"retrying: plug\.relay back to off, \d+ tr(y|ies) failed \(.*\), next in \d+ s "
                         r"\(set by olive@localhost\)", status), status
        assert stored(tmp_path / "state", "reverts.json")[0]["tries"] >= 1

        broker.start()
        told = await olive.reply_matching(jid, "plug.relay: ", timeout=20)
        assert re.fullmatch(r"plug\.relay: back to off \(was on\), applied after \d+ failed tr(y|ies)", told), told
        assert await retained(broker.port, f"cmnd/{p}/POWER") == "1 OFF"
        entry = gw.hub.audit.entries[-1]
        assert (entry.actor.jid, entry.actor.via, entry.new, entry.outcome) == ("olive@localhost", "timer", False, "applied")
        assert gw.reverts.pending == {} and stored(tmp_path / "state", "reverts.json") == []
        assert "retrying" not in await olive.ask(jid, "status")
    finally:
        echo.stop()
        await olive.stop()
        await running.stop()
        broker.stop()


async def test_failing_revert_is_still_retried_after_a_gateway_restart(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", port=free_port())
    broker.start()
    p = "plug-" + uuid.uuid4().hex[:6]
    cfg = parse({
        "gateway": {"name": "S", "state_dir": str(tmp_path / "state")},
        "contacts": [{"jid": "alice@x", "role": "admin"}],
        "mqtt": {"url": broker.url, "client_id": "gw-" + uuid.uuid4().hex[:8]},
        "devices": plug(p),
    })
    g = Gateway(cfg)
    await g.start()
    echo = Echo(broker.port, {f"cmnd/{p}/POWER": (f"stat/{p}/POWER", str)})  # the plug confirms each set
    try:
        await until(lambda: g.hub.nodes["plug"].health.healthy, "broker connection")
        await publish(broker.port, f"stat/{p}/POWER", "OFF")
        await until(lambda: g.hub.field("plug.relay").latest is not None, "the plug's state")
        await run(g, "set plug.relay on for 1s")
        broker.stop()
        await until(lambda: g.reverts.pending["plug.relay"].tries >= 1, "a failed revert", 10)
    finally:
        await g.stop()
    g2 = Gateway(cfg)
    alerts = collect(g2)
    await g2.start()
    try:
        assert "retrying: plug.relay back to off, " in await run(g2, "status")
        broker.start()
        await until(lambda: not g2.reverts.pending, "the revert applied after the restart", 20)
        assert re.fullmatch(r"plug\.relay: back to off \(was .+\), applied after \d+ failed tr(y|ies)", alerts[-1].text)
        assert alerts[-1].to == ("alice@x",)
        assert await retained(broker.port, f"cmnd/{p}/POWER") == "1 OFF"
    finally:
        echo.stop()
        await g2.stop()
        broker.stop()


async def test_refused_revert_is_dropped_not_retried(tmp_path: Path) -> None:
    g = Gateway(config(tmp_path / "state"))
    await g.start()
    try:
        await run(g, "set sim.speed 80")
        assert await run(g, "set sim.speed 10 for 1s") == "sim.speed: 80 → 10, back to 80 in 1 s"
    finally:
        await g.stop()
    # The config now allows at most 50: going back to 80 can never be right.
    g2 = Gateway(config(tmp_path / "state", speed_max=50))
    alerts = collect(g2)
    await g2.start()
    try:
        await until(lambda: not g2.reverts.pending, "the revert handled", 5)
        assert [a.text for a in alerts] == [
            "sim.speed: time is up, but going back to 80 was refused: sim.speed 80 is above the maximum 50;"
            " it stays as it is"
        ]
        assert stored(tmp_path / "state", "reverts.json") == []
        await asyncio.sleep(2.5)  # longer than the first retry would wait: nothing more happens
        assert len(alerts) == 1
        assert [e.outcome for e in g2.hub.audit.entries] == ["refused"]
    finally:
        await g2.stop()


# ---------------------------------------------------------------- one process per state folder


def run_config(tmp_path: Path, server: XmppServer) -> Path:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f"""
[gateway]
name = "Locked GW"
state_dir = "{tmp_path}/state"
[xmpp]
jid = "{server.jid('gateway')}"
server = "{server.prosody.address}"
ca_file = "{server.prosody.ca_file}"
[[contacts]]
jid = "{server.jid('alice')}"
role = "admin"
[[devices]]
id = "sim"
driver = "simulated"
  [[devices.fields]]
  name = "temp"
  [[devices.fields]]
  name = "lamp"
  type = "boolean"
  writable = true
"""
    )
    cfg.chmod(0o600)  # it holds no password, but a readable config gets a warning on stderr
    return cfg


async def test_second_process_on_a_state_folder_refuses_or_is_read_only(xmpp_server: XmppServer, tmp_path: Path) -> None:
    cfg = run_config(tmp_path, xmpp_server)
    state = tmp_path / "state"
    env = dict(os.environ, IOT_GATEWAY_XMPP_PASSWORD=xmpp_server.passwords["gateway"])
    cmd = [sys.executable, "-m", "gateway"]
    first = subprocess.Popen([*cmd, "run", "--config", str(cfg)], cwd=ROOT, env=env,
                             stderr=subprocess.PIPE, text=True)
    alice = await xmpp_server.peer("alice").start()
    try:
        gw = xmpp_server.jid("gateway")
        await answering(alice, gw, "Locked GW: ")
        assert (await alice.ask_for(gw, "watch sim.temp > 99", "Watch")).startswith("Watch #1 set")

        second = await asyncio.to_thread(
            subprocess.run, [*cmd, "run", "--config", str(cfg)], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=30)
        assert second.returncode == 3, second.stderr
        assert second.stderr.strip() == (
            f"error: state folder {state} is in use by another iot-gateway process (PID {first.pid}):"
            " stop it, or give this gateway its own [gateway] state_dir"
        )

        before = (state / "watches.json").read_bytes()
        console = await asyncio.to_thread(
            subprocess.run, [*cmd, "console", "--config", str(cfg)], cwd=ROOT,
            input="watches\nwatch sim.temp < -5\nset sim.lamp on for 30m\nstatus\n",
            capture_output=True, text=True, timeout=60)
        assert console.returncode == 0, console.stderr
        assert f"note: state folder {state} is in use by another iot-gateway process (PID {first.pid});" \
            " this console uses it read-only" in console.stderr
        out = console.stdout.splitlines()
        assert out[1:4] == ["1 watches:", "#1  sim.temp > 99", "  ok, of alice@localhost"], out  # it sees the gateway's watches
        readonly = f"state folder {state} is in use by another iot-gateway process (PID {first.pid}) (this process uses it read-only)"
        assert f"Watch #2 set: sim.temp < -5, but NOT saved: {readonly}; it will be lost on restart." \
            " Remove it with: unwatch 2" in out
        assert f"sim.lamp: off → on, back to off in 30 min, but NOT saved: {readonly}; a restart before then" \
            " would forget to go back" in out
        assert f"NOT saving state: {readonly}" in out
        assert (state / "watches.json").read_bytes() == before
        assert not (state / "reverts.json").exists()
        # The gateway numbers on from its own state: no second #2.
        assert (await alice.ask_for(gw, "watch sim.temp < 0", "Watch")).startswith("Watch #2 set")
        assert [w["id"] for w in stored(state, "watches.json")["watches"]] == [1, 2]
    finally:
        await alice.stop()
        first.terminate()
        try:
            code = first.wait(10)
        finally:
            first.kill()
        err = first.stderr.read()
    assert code == 0, err
    # Once the first has stopped, the folder is free again.
    check = await asyncio.to_thread(
        subprocess.run, [*cmd, "console", "--config", str(cfg)], cwd=ROOT, input="watches\n",
        capture_output=True, text=True, timeout=60)
    assert "read-only" not in check.stderr and "\n#2  sim.temp < 0\n  ok, of alice@localhost\n" in check.stdout
