"""Links that misbehave, through the real stack: a twin gateway on the same JID, a dead
link (a partition held by a proxy, a server stopped with SIGSTOP), a refused
password, a link that drops right after every login, a stop right after login,
the state folder failing, and a serial by-id link re-pointed."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devices import serial as sd
from gateway.xmpp import link
from gateway.app import Gateway
from gateway.commands import Commands
from gateway.hub import Health
from gateway.demo.localservers import Prosody
from gateway.systemd import status_line
from gateway.xmpp.session import Session
from tests.conftest import USERS, RunningGateway, XmppServer, gateway_config, start_gateway
from tests.helpers import until
from tests.proxy import Proxy
from tests.test_serial import Wire
from tests.test_state import fill, tiny_fs  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parent.parent
GW = "gateway@localhost"
TROUBLE = ("Traceback", "not-well-formed", "Parse error", "NotConnectedError")


def xmpp_messages(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.ERROR) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


# ---------------------------------------------------------------- twins


async def test_twin_gateways_back_off_for_minutes_and_say_so_once(
    xmpp_server: XmppServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(link, "CONFLICT_FIRST", 1.0)  # minutes in real life
    caplog.set_level(logging.INFO, logger="iot_gateway")
    pw = xmpp_server.passwords["gateway"]
    alice = await xmpp_server.peer("alice").start()
    a = await start_gateway(gateway_config(xmpp_server, tmp_path / "a"), pw)
    b: RunningGateway | None = None
    try:
        # A cloned SD card: the same JID and resource. B's login makes the server drop A (<conflict/>).
        b = await start_gateway(gateway_config(xmpp_server, tmp_path / "b"), pw)
        await until(lambda: len(a.session.link.waits) == 1, "A pushed off", 10)
        assert a.session.offline_reason == "XMPP offline: another gateway is using gateway@localhost/gateway"
        assert status_line("Test GW: 1/1 devices OK", False, a.session.offline_reason) == (
            "Test GW: 1/1 devices OK (XMPP offline: another gateway is using gateway@localhost/gateway)"
        )
        assert a.gateway.hub.problems["xmpp"].describe() == "xmpp: another gateway is using gateway@localhost/gateway"

        # They take turns, and each waits longer every time: a successful login does not start the backoff over.
        await until(lambda: len(a.session.link.waits) >= 2 and len(b.session.link.waits) >= 1, "two rounds", 20)
        first, second = list(a.session.link.waits)[:2]
        assert 0.75 <= first <= 1.25 and second >= 1.5, a.session.link.waits
        # Said once per gateway in the log, not once per login.
        said = xmpp_messages(caplog, "another gateway is using gateway@localhost/gateway: the server closed this session")
        assert len(said) == 2, said
        assert "give each gateway its own account or [xmpp] resource" in said[0]
        # The admins hear of it (queued while offline, stamped with when it happened).
        msg = await alice.message_from(GW, timeout=20)
        assert msg["body"] == "xmpp: another gateway is using gateway@localhost/gateway"
        assert msg["delay"]["stamp"] is not None
    finally:
        if b is not None:
            await b.stop()
        await a.stop()
        await alice.stop()
    assert not [r for r in caplog.records if any(t in r.getMessage() for t in TROUBLE)]


# ---------------------------------------------------------------- backoff


async def test_backoff_starts_over_only_after_a_session_stayed_up(
    xmpp_server: XmppServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link, "STABLE_AFTER", 1.0)  # 60 s in real life
    proxy = await Proxy(xmpp_server.prosody.port).start()
    gw = await start_gateway(
        gateway_config(xmpp_server, tmp_path, xmpp={"server": proxy.address}), xmpp_server.passwords["gateway"]
    )
    try:
        for n in (1, 2):  # dropped right after every login
            proxy.cut()
            await until(lambda: len(gw.session.link.waits) == n, "the drop noticed")
            await until(gw.session.online.is_set, "back online", 15)
        w1, w2 = gw.session.link.waits
        assert 0.75 <= w1 <= 1.25 and 1.5 <= w2 <= 2.5, (w1, w2)
        await asyncio.sleep(1.5)  # up for longer than STABLE_AFTER
        proxy.cut()
        await until(lambda: len(gw.session.link.waits) == 3, "the third drop")
        assert 0.75 <= gw.session.link.waits[2] <= 1.25
        await until(gw.session.online.is_set, "back online", 15)
    finally:
        await gw.stop()
        await proxy.stop()


# ---------------------------------------------------------------- a dead link


@pytest.fixture
async def own_prosody(tmp_path: Path) -> AsyncIterator[XmppServer]:
    """A Prosody of this test's own (the stall test stops it with SIGSTOP)."""
    prosody = Prosody(tmp_path / "prosody")
    pw = {u: secrets.token_urlsafe(9) for u in USERS}
    for user, p in pw.items():
        prosody.register(user, p)
    prosody.start()
    try:
        yield XmppServer(prosody, pw)
    finally:
        if prosody.proc is not None:
            os.kill(prosody.proc.pid, signal.SIGCONT)
        prosody.stop()


@pytest.mark.parametrize("fault", ["partition", "stall"])
async def test_a_dead_link_is_noticed_resumed_and_nothing_is_late_unstamped_or_out_of_order(
    fault: str, own_prosody: XmppServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = own_prosody
    proxy = await Proxy(server.prosody.port).start()
    config = gateway_config(server, tmp_path, xmpp={"server": proxy.address, "keepalive": 0.5, "ping_timeout": 1})
    gw = await start_gateway(config, server.passwords["gateway"])
    starts, resumed = [], []
    gw.session.client.add_event_handler("session_start", lambda _e: starts.append(1))
    gw.session.client.add_event_handler("session_resumed", lambda _e: resumed.append(1))
    # The device takes a moment to switch, so a `read` right after a `set` would overtake it if it could.
    driver = gw.gateway.drivers["sim"]
    plain_write = driver.write

    async def slow_write(field: str, value: object) -> None:
        await asyncio.sleep(0.3)
        await plain_write(field, value)

    driver.write = slow_write  # type: ignore[method-assign]
    gw.gateway.hub.set_writer("sim", slow_write)
    alice = await server.peer("alice").start()
    try:
        if fault == "partition":
            proxy.hold()
        else:
            os.kill(server.prosody.proc.pid, signal.SIGSTOP)
        raised = time.time()
        gw.gateway.hub.set_health("sim", Health.OFFLINE, "test fault")  # an alert raised during the stall
        alice.client.send_message(mto=gw.jid, mbody="set sim.relay on", mtype="chat")
        alice.client.send_message(mto=gw.jid, mbody="read sim.relay", mtype="chat")
        await until(lambda: not gw.session.online.is_set(), "the dead link noticed", 10)
        await asyncio.sleep(DELAY + 0.5)
        if fault == "partition":
            proxy.release()
        else:
            os.kill(server.prosody.proc.pid, signal.SIGCONT)
        await until(gw.session.online.is_set, "back online", 30)

        got = [await alice.message_from(GW, timeout=15) for _ in range(3)]
        bodies = [m["body"] for m in got]
        alert = next(m for m in got if m["body"] == "sim: offline: test fault")
        stamp = alert["delay"]["stamp"]
        assert stamp is not None and abs(stamp.timestamp() - raised) < 1.5, stamp
        replies = [b for b in bodies if b.startswith("sim.relay")]
        assert replies[0] == "sim.relay: off → on"
        assert re.fullmatch(r"sim\.relay = on \(\d+ s ago\).*", replies[1], re.S), replies
        # The session was resumed (XEP-0198), by one reconnect, not started anew.
        assert (starts, resumed) == ([], [1])
        assert len(gw.session.link.waits) == 1
        if fault == "partition":
            assert proxy.connections == 2
        assert xmpp_messages(caplog, "did not answer a ping within 1 s", logging.WARNING)
    finally:
        await alice.stop()
        await gw.stop()
        await proxy.stop()
    assert not [r for r in caplog.records if any(t in r.getMessage() for t in TROUBLE) or r.exc_info]


DELAY = 1.0  # seconds the link stays dead after it was noticed


def test_a_dead_link_is_noticed_within_30_s_by_default(tmp_path: Path) -> None:
    from gateway.config import parse

    x = parse({"xmpp": {"jid": "gw@example.org", "password": "x"}}).xmpp
    assert x is not None and x.keepalive + x.ping_timeout <= 30


# ---------------------------------------------------------------- a refused password


async def test_a_refused_password_is_said_once_with_the_fix_and_retried_until_it_works(
    xmpp_server: XmppServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(link, "AUTH_FIRST", 0.5)  # a minute in real life
    monkeypatch.setattr(link, "AUTH_MAX", 1.0)
    caplog.set_level(logging.INFO, logger="iot_gateway")
    caplog.set_level(logging.WARNING, logger="slixmpp")
    user = "pw" + secrets.token_hex(4)
    jid = xmpp_server.prosody.register(user, "the-old-password")
    config = gateway_config(xmpp_server, tmp_path, xmpp={"jid": jid, "password": "the-new-password"}, contacts=[])
    gw = Gateway(config)
    await gw.start()
    session = Session(config, gw.hub, Commands(gw.hub), "the-new-password")
    session.connect()
    try:
        await until(lambda: len(session.link.waits) >= 3, "three refused logins", 20)
        assert session.offline_reason == f"XMPP login refused: wrong password for {jid}"
        assert status_line("GW: 1/1 devices OK", False, session.offline_reason) == (
            f"GW: 1/1 devices OK (XMPP login refused: wrong password for {jid})"
        )
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [
            f"XMPP login refused: wrong password for {jid}: fix [xmpp] password, password_file or "
            "$IOT_GATEWAY_XMPP_PASSWORD, or the account's password on the server. Retrying every few minutes; "
            "no restart needed once it is fixed"
        ]
        w = session.link.waits
        assert w[0] <= 0.625 and w[1] >= 0.75  # slower after each refusal
        # The password is changed on the server to what the gateway has: it gets in by itself.
        xmpp_server.prosody.register(user, "the-new-password")
        await until(session.online.is_set, "the login with the fixed password", 20)
        assert session.offline_reason is None
        assert "XMPP session up again" in caplog.text
    finally:
        await session.stop()
        await gw.stop()


async def test_systemd_status_carries_why_the_login_is_refused(xmpp_server: XmppServer, tmp_path: Path) -> None:
    from tests.test_systemd import FakeSystemd, gateway_env, start_gateway as spawn, stop_gateway, write_config
    from gateway.systemd import notify_address

    cfg = write_config(tmp_path, xmpp_server)
    cfg.chmod(0o600)
    path = f"@iot-gateway-links-{secrets.token_hex(6)}"
    fake = FakeSystemd(notify_address(path))
    proc = spawn(cfg, gateway_env(NOTIFY_SOCKET=path, IOT_GATEWAY_XMPP_PASSWORD="not-the-password"))
    want = "STATUS=Notify GW: 1/1 devices OK (XMPP login refused: wrong password for gateway@localhost)"
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 15
        while want not in seen and time.monotonic() < deadline:
            if (msg := await fake.recv(0.5)) is not None:
                seen.append(msg)
    finally:
        code, err = stop_gateway(proc)
        fake.close()
    assert want in seen, seen
    assert code == 0, err
    assert err.count("XMPP login refused: wrong password for gateway@localhost") == 1, err
    assert "No appropriate login method" not in err


# ---------------------------------------------------------------- a clean stop


def test_sigterm_right_after_login_stops_without_tracebacks(xmpp_server: XmppServer, tmp_path: Path) -> None:
    from tests.test_systemd import gateway_env, start_gateway as spawn, write_config

    cfg = write_config(tmp_path, xmpp_server)
    cfg.chmod(0o600)
    env = gateway_env(IOT_GATEWAY_XMPP_PASSWORD=xmpp_server.passwords["gateway"])
    for _ in range(4):  # the race needs stanzas still queued at the signal: tried a few times
        proc = spawn(cfg, env)
        lines = []
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if "online as" in line:
                    proc.send_signal(signal.SIGTERM)
                    break
            rest = proc.stderr.read()
            code = proc.wait(10)
        finally:
            proc.kill()
        err = "".join(lines) + rest
        assert code == 0, err
        assert not [t for t in TROUBLE if t in err], err


# ---------------------------------------------------------------- the state folder


async def test_a_state_folder_that_cannot_be_written_is_a_gateway_problem(
    xmpp_server: XmppServer, tiny_fs: Path  # noqa: F811
) -> None:
    gw = await start_gateway(gateway_config(xmpp_server, tiny_fs.parent), xmpp_server.passwords["gateway"])
    alice = await xmpp_server.peer("alice").start()
    try:
        alice.client.send_presence_subscription(pto=gw.jid)
        await alice.presence_from(gw.jid, lambda p: p["type"] == "available")
        filler = fill(tiny_fs)
        alice.client.send_message(mto=gw.jid, mbody="watch sim.temp > 1000", mtype="chat")
        full = "state: not saved: state folder full (No space left on device)"
        got = sorted([await alice.reply_from(gw.jid), await alice.reply_from(gw.jid)])
        assert got[1] == full and "NOT saved" in got[0], got
        pres = await alice.presence_from(gw.jid, lambda p: full in p["status"])
        assert pres["show"] == "away"
        status = await alice.ask_for(gw.jid, "status", "Test GW")
        assert "NOT saving state: state folder full (No space left on device)" in status
        assert full not in status  # said once
        filler.unlink()
        gw.gateway.state.retry()  # what the 30 s timer calls
        assert await alice.reply_matching(gw.jid, "state: ") == "state: back to ok"
        assert "state" not in gw.gateway.hub.problems
    finally:
        await alice.stop()
        await gw.stop()


# ---------------------------------------------------------------- a serial link re-pointed


async def test_a_serial_by_id_link_re_pointed_is_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sd, "CHECK_EVERY", 0.1)
    monkeypatch.setattr(sd, "RETRY_FIRST", 0.05)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    old, new = Wire(tmp_path / "one"), Wire(tmp_path / "two")
    await old.plug()
    await new.plug()
    by_id = tmp_path / "usb-FTDI_FT232R-if00-port0"
    by_id.symlink_to(old.a)
    from gateway.config import parse

    config = parse({
        "gateway": {"state_dir": str(tmp_path / "state")},
        "devices": [{"id": "dev", "driver": "serial", "port": str(by_id), "stale_after": 1,
                     "fields": [{"name": "t"}]}],
    })
    gw = Gateway(config)
    await gw.start()
    try:
        await until(lambda: gw.drivers["dev"].connected, "the port open")
        await old.send(b"t=1\n")
        await until(lambda: gw.hub.nodes["dev"].health.healthy, "the first line")
        # udev re-points the link to the adapter's new node; the old node still exists.
        tmp = tmp_path / "link.tmp"
        tmp.symlink_to(new.a)
        os.replace(tmp, by_id)
        for _ in range(50):
            await new.send(b"t=2\n")
            await asyncio.sleep(0.1)
            latest = gw.hub.field("dev.t").latest
            if latest is not None and latest.value == 2:
                break
        assert gw.hub.field("dev.t").latest.value == 2
        assert gw.hub.nodes["dev"].health.healthy
    finally:
        await gw.stop()
        await old.unplug()
        await new.unplug()
