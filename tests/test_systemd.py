"""Running under systemd: sd_notify messages, the unit file, journald logging, secrets kept out of logs."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

from gateway.cli import JournalFormatter
from gateway.demo.localservers import Prosody
from gateway.systemd import Notifier, NotifyError, notify_address, watchdog_interval
from tests.conftest import XmppServer

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "iot-gateway.service"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


class FakeSystemd:
    """A stand-in for systemd's notification socket: a bound AF_UNIX datagram socket."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def drain(self) -> list[str]:
        """Every message queued so far."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    async def recv(self, timeout: float) -> str | None:
        """The next message, or None after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        try:
            return (await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)).decode()
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    """A fake notification socket in tmp_path, and its $NOTIFY_SOCKET value."""
    path = str(tmp_path / "notify")
    if len(path) >= 100:  # AF_UNIX paths are limited to 108 bytes: fall back to an abstract name
        path = f"@iot-gateway-test-{secrets.token_hex(6)}"
    fake = FakeSystemd(notify_address(path))
    yield fake, path
    fake.close()


def gateway_env(**extra: str) -> dict[str, str]:
    """The test process's environment without anything systemd may have set for it."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")}
    env.pop("IOT_GATEWAY_XMPP_PASSWORD", None)
    env.update(extra)
    return env


def write_config(
    tmp_path: Path, server: XmppServer, *, password_file: Path | None = None, idle: bool = False,
    omemo: str | None = "off",
) -> Path:
    """A gateway config for the suite's Prosody; `idle` adds a device that goes stale after start;
    `omemo` None leaves the key out (its default)."""
    pw = f'password_file = "{password_file}"' if password_file else ""
    idle_device = """
[[devices]]
id = "idle"
driver = "simulated"
stale_after = 0.5
  [[devices.fields]]
  name = "relay"
  type = "boolean"
  writable = true
"""
    contacts = server.contacts_toml()
    # stderr is a pipe read at the end: OMEMO's first start (100 keys published) logs too much at --debug
    omemo_line = f'omemo = "{omemo}"' if omemo else ""
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f"""
[gateway]
name = "Notify GW"
state_dir = "{tmp_path}/state"
[xmpp]
jid = "{server.jid('gateway')}"
server = "{server.prosody.address}"
ca_file = "{server.prosody.ca_file}"
{omemo_line}
{pw}
{contacts}
[[devices]]
id = "sim"
driver = "simulated"
interval = 0.2
  [[devices.fields]]
  name = "temp"
  noise = 0
"""
        + (idle_device if idle else "")
    )
    return cfg


def start_gateway(cfg: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(cfg), *args],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def stop_gateway(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM, then the exit code and the whole stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(10)
    finally:
        proc.kill()
    return code, proc.stderr.read() if proc.stderr else ""


# ---------------------------------------------------------------- the notify protocol


def test_notify_address_path_abstract_and_unsupported() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@gw-notify") == "\0gw-notify"
    with pytest.raises(NotifyError, match="only /path and @abstract"):
        notify_address("vsock:2:1234")


def test_notifier_sends_to_a_path_socket(fake_systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = fake_systemd
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    n.ready("GW: 1/1 devices OK")
    n.status("GW: 1/1 devices OK")  # unchanged: not sent again
    n.status("GW: 0/1 OK · sim: stale:\nno data")
    n.stopping()
    assert fake.drain() == [
        "READY=1\nSTATUS=GW: 1/1 devices OK",
        "STATUS=GW: 0/1 OK · sim: stale: no data",  # a newline would start a new assignment
        "STOPPING=1\nSTATUS=Stopping",
    ]


def test_notifier_sends_to_an_abstract_socket() -> None:
    name = f"iot-gateway-test-{secrets.token_hex(6)}"
    fake = FakeSystemd("\0" + name)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        n.ready("up")
        assert fake.drain() == ["READY=1\nSTATUS=up"]
    finally:
        fake.close()


def test_notifier_outside_systemd_does_nothing(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({})
    assert not n.enabled
    n.ready("x")
    n.stopping()
    with caplog.at_level(logging.WARNING, "iot_gateway.systemd"):
        n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert [r.getMessage() for r in caplog.records] == [
        "NOTIFY_SOCKET='vsock:2:1234': only /path and @abstract unix sockets are supported; not notifying systemd"
    ]


def test_notifier_with_nobody_listening_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.DEBUG, "iot_gateway.systemd"):
        for _ in range(3):
            n.send("WATCHDOG=1")  # must not raise
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "No such file or directory" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


async def test_watchdog_pings_stop_while_the_loop_hangs(fake_systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = fake_systemd
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    assert n.interval == 0.05
    n.start_watchdog()
    await asyncio.sleep(0.22)
    assert 3 <= len(fake.drain()) <= 6
    time.sleep(0.3)  # a hung event loop: systemd must see no pings
    assert fake.drain() == []
    await asyncio.sleep(0.12)
    assert "WATCHDOG=1" in fake.drain()
    await n.close()
    await asyncio.sleep(0.12)
    assert fake.drain() == []


# ---------------------------------------------------------------- the real process


async def test_run_notifies_ready_status_watchdog_and_stopping(
    xmpp_server: XmppServer, tmp_path: Path, fake_systemd: tuple[FakeSystemd, str]
) -> None:
    fake, path = fake_systemd
    cfg = write_config(tmp_path, xmpp_server, idle=True)
    cfg.chmod(0o644)
    env = gateway_env(
        NOTIFY_SOCKET=path, WATCHDOG_USEC="500000", IOT_GATEWAY_XMPP_PASSWORD=xmpp_server.passwords["gateway"]
    )
    proc = start_gateway(cfg, env)
    got: list[tuple[float, str]] = []
    try:
        deadline = time.monotonic() + 20
        ready_at: float | None = None
        while time.monotonic() < deadline and proc.poll() is None:
            msg = await fake.recv(0.5)
            if msg is None:
                continue
            got.append((time.monotonic(), msg))
            if msg.startswith("READY=1") and ready_at is None:
                ready_at = time.monotonic()
            stale_seen = any("idle: stale" in m for _, m in got)
            if ready_at is not None and stale_seen and time.monotonic() - ready_at > 1.5:
                break
    finally:
        code, err = stop_gateway(proc)
    for _ in range(20):
        if msg := await fake.recv(0.1):
            got.append((time.monotonic(), msg))
    messages = [m for _, m in got]
    assert code == 0, err
    assert ready_at is not None, (messages, err)

    ready = [m for m in messages if m.startswith("READY=1")]
    assert len(ready) == 1
    assert re.fullmatch(r"READY=1\nSTATUS=Notify GW: (2/2 devices OK|1/2 OK · idle: stale: no data for 0\.5 s)", ready[0])
    statuses = [m.removeprefix("STATUS=") for m in messages if m.startswith("STATUS=")]
    assert statuses[0] == "Starting devices"
    assert "Notify GW: 2/2 devices OK (XMPP offline)" in statuses  # devices up, session not yet
    # The idle device going stale after start updates the status line.
    stale = "Notify GW: 1/2 OK · idle: stale: no data for 0.5 s"
    assert stale in statuses or stale in ready[0]

    # Watchdog pings every WATCHDOG_USEC/2 = 0.25 s: never a gap long enough for systemd to kill us.
    pings = [t for t, m in got if m == "WATCHDOG=1" and t >= ready_at]
    assert len(pings) >= 4, messages
    assert max(b - a for a, b in zip(pings, pings[1:])) < 0.5

    assert messages[-1] == "STOPPING=1\nSTATUS=Stopping" or "STOPPING=1\nSTATUS=Stopping" in messages
    assert messages.index("STOPPING=1\nSTATUS=Stopping") > messages.index(ready[0])
    assert "received SIGTERM, stopping" in err
    # A world-readable config file is named in a warning with the fix.
    assert f"{cfg} is readable by every user (mode 0644) and may hold a password: run `chmod 640 {cfg}`" in err


async def test_debug_log_never_contains_the_password(
    xmpp_server: XmppServer, tmp_path: Path, fake_systemd: tuple[FakeSystemd, str]
) -> None:
    fake, path = fake_systemd
    password = xmpp_server.passwords["gateway"]
    pw_file = tmp_path / "xmpp.pass"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o640)
    cfg = write_config(tmp_path, xmpp_server, password_file=pw_file)
    cfg.chmod(0o640)
    proc = start_gateway(cfg, gateway_env(NOTIFY_SOCKET=path), "--debug")
    try:
        deadline = time.monotonic() + 20
        ready = False
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            msg = await fake.recv(0.5)
            ready = msg is not None and msg.startswith("READY=1")
        await asyncio.sleep(0.5)  # some debug traffic after login
    finally:
        code, err = stop_gateway(proc)
    assert ready, err
    assert code == 0, err
    assert " DEBUG slixmpp" in err  # debug logging was really on, XML traffic included
    assert "online as " in err
    assert password not in err
    # Nor in the encodings a SASL exchange would use.
    for secret in (f"\0gateway\0{password}", f"\0{xmpp_server.jid('gateway')}\0{password}", password):
        assert base64.b64encode(secret.encode()).decode() not in err
    assert "chmod 640" not in err  # both files are 0640: no warning


class PlainOnlyProsody(Prosody):
    """The suite's kind of Prosody, offering SASL PLAIN only (SCRAM disabled), as some servers do."""

    def _write_config(self) -> None:
        super()._write_config()
        text = self.config.read_text()
        first_host = text.index("\nVirtualHost ")
        line = '\ndisable_sasl_mechanisms = { "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS", "DIGEST-MD5" }\n'
        self.config.write_text(text[:first_host] + line + text[first_host:])


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XmppServer]:
    prosody = PlainOnlyProsody(tmp_path_factory.mktemp("prosody-plain"))
    passwords = {"gateway": secrets.token_urlsafe(12)}
    prosody.register("gateway", passwords["gateway"])
    prosody.start()
    yield XmppServer(prosody, passwords)
    prosody.stop()


def secrets_in(text: str, password: str) -> list[str]:
    """Every place `text` shows `password`: as is, or inside anything that decodes as base64."""
    found = [password] if password in text else []
    for token in re.findall(r"[A-Za-z0-9+/]{8,}={0,2}", text):
        for pad in ("", "=", "=="):
            try:
                decoded = base64.b64decode(token + pad, validate=True)
            except ValueError:
                continue
            if password.encode() in decoded:
                found.append(token)
    return found


async def test_debug_log_of_a_plain_login_hides_the_password(
    plain_server: XmppServer, tmp_path: Path, fake_systemd: tuple[FakeSystemd, str]
) -> None:
    fake, path = fake_systemd
    password = plain_server.passwords["gateway"]
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'[gateway]\nstate_dir = "{tmp_path}/state"\n'
        f'[xmpp]\njid = "{plain_server.jid("gateway")}"\nserver = "{plain_server.prosody.address}"\n'
        f'ca_file = "{plain_server.prosody.ca_file}"\n'
        '[[devices]]\nid = "sim"\ndriver = "simulated"\n  [[devices.fields]]\n  name = "temp"\n'
    )
    cfg.chmod(0o600)
    proc = start_gateway(cfg, gateway_env(NOTIFY_SOCKET=path, IOT_GATEWAY_XMPP_PASSWORD=password), "--debug")
    try:
        deadline = time.monotonic() + 20
        ready = False
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            msg = await fake.recv(0.5)
            ready = msg is not None and msg.startswith("READY=1")
    finally:
        code, err = stop_gateway(proc)
    assert ready and code == 0, err
    # The server offered PLAIN only, and the client used it: the password went over the wire in base64.
    assert "<mechanism>SCRAM" not in err and "<mechanism>PLAIN</mechanism>" in err, err
    assert re.search(r'SEND: <auth [^>]*mechanism="PLAIN"[^>]*>\[redacted\]</auth>', err), err
    assert re.search(r"RECV: <success [^>]*/>|RECV: <success [^>]*>\[redacted\]</success>", err), err
    assert secrets_in(err, password) == []


def test_sasl_payloads_are_redacted_whatever_the_mechanism() -> None:
    from gateway.xmpp.redact import redact_sasl

    ns = 'xmlns="urn:ietf:params:xml:ns:xmpp-sasl"'
    plain = base64.b64encode(b"\0gw\0hunter2").decode()
    lines = [
        f'SEND: <auth {ns} mechanism="PLAIN">{plain}</auth>',
        f'SEND: <auth {ns} mechanism="SCRAM-SHA-1">biwsbj1ndyxyPWFiYw==</auth>',
        f"RECV: <challenge {ns}>cj1hYmMsUz1zYWx0LGk9NDA5Ng==</challenge>",
        f"SEND: <response {ns}>Yz1iaXdzLHI9YWJjLHA9cHJvb2Y=</response>",
        f"RECV: <success {ns}>dj1zaWduYXR1cmU=</success>",
        f'SEND: <authenticate xmlns="urn:xmpp:sasl:2" mechanism="PLAIN"><initial-response>{plain}</initial-response></authenticate>',
    ]
    for line in lines:
        out = redact_sasl(line)
        assert "[redacted]" in out and secrets_in(out, "hunter2") == [] and not re.search(r">[A-Za-z0-9+/]{8,}=*<", out), out
    other = "RECV: <message><body>biwsbj1ndyxyPWFiYw==</body></message>"
    assert redact_sasl(other) == other


def test_world_readable_config_and_password_file_get_a_warning(tmp_path: Path) -> None:
    pw_file = tmp_path / "xmpp.pass"
    pw_file.write_text("s3cret\n")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[xmpp]\njid = "gw@example.org"\npassword_file = "{pw_file}"\n')

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "check", "--config", str(cfg)],
            capture_output=True, text=True, cwd=ROOT, env=gateway_env(), timeout=60,
        )

    pw_file.chmod(0o644)
    cfg.chmod(0o666)
    r = check()
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        f"warning: {cfg} is readable and writable by every user (mode 0666) and may hold a password: run `chmod 640 {cfg}`",
        f"warning: {pw_file} is readable by every user (mode 0644) and may hold a password: run `chmod 640 {pw_file}`",
    ]
    pw_file.chmod(0o640)
    cfg.chmod(0o640)
    r = check()
    assert r.returncode == 0 and r.stderr == "", r.stderr


# ---------------------------------------------------------------- journald


def run_console_logging(tmp_path: Path, journal_stream: str | None) -> str:
    """`iot-gateway console` with stdin at EOF; its whole stderr. `journal_stream="match"` announces stderr itself."""
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'[gateway]\nstate_dir = "{tmp_path}/state"\n'
        '[[devices]]\nid = "sim"\ndriver = "simulated"\n  [[devices.fields]]\n  name = "temp"\n'
    )
    cfg.chmod(0o644)
    r, w = os.pipe()
    st = os.fstat(w)
    env = gateway_env()
    if journal_stream == "match":
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    elif journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "console", "--config", str(cfg)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w,
        )
    finally:
        os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    assert proc.wait(30) == 0, err
    return err


def test_journal_stream_gets_priority_prefixes_and_no_timestamps(tmp_path: Path) -> None:
    err = run_console_logging(tmp_path, "match")
    lines = err.splitlines()
    assert lines, "nothing logged"
    assert all(re.match(r"<[0-7]>", line) for line in lines), err
    assert not TIMESTAMP.search(err), err
    assert "<6>iot_gateway.hub: sim: ok" in lines
    assert any(line.startswith("<4>iot_gateway: ") and "chmod 640" in line for line in lines), err


def test_other_stderr_keeps_timestamps(tmp_path: Path) -> None:
    # JOURNAL_STREAM inherited, but stderr is not that stream (e.g. redirected to a file).
    err = run_console_logging(tmp_path, "1:1")
    assert TIMESTAMP.match(err), err
    assert " INFO iot_gateway.hub: sim: ok" in err
    assert not re.search(r"^<\d>", err, re.M), err


def test_journal_formatter_prefixes_every_line_of_a_traceback() -> None:
    fmt = JournalFormatter("%(name)s: %(message)s")
    try:
        raise ValueError("bad reading")
    except ValueError:
        record = logging.LogRecord("iot_gateway", logging.ERROR, __file__, 1, "driver failed", None, sys.exc_info())
    lines = fmt.format(record).splitlines()
    assert lines[0] == "<3>iot_gateway: driver failed"
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: bad reading"
    debug = logging.LogRecord("x", logging.DEBUG, __file__, 1, "a\nb", None, None)
    warning = logging.LogRecord("x", logging.WARNING, __file__, 1, "w", None, None)
    critical = logging.LogRecord("x", logging.CRITICAL, __file__, 1, "c", None, None)
    assert fmt.format(debug) == "<7>x: a\n<7>b"
    assert fmt.format(warning) == "<4>x: w"
    assert fmt.format(critical) == "<2>x: c"


# ---------------------------------------------------------------- the unit file


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_file_settings() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30s"]
    assert s["Restart"] == ["on-failure"]
    assert s["User"] == ["iot-gateway"]
    # Device groups come from the user's membership: one missing group must not fail the start (216/GROUP).
    assert "SupplementaryGroups" not in s
    # A local Prosody and Mosquitto start first when there are some, and are not required.
    assert s["After"] == s["Wants"] == ["network-online.target prosody.service mosquitto.service"]
    assert "Requires" not in s
    assert s["StateDirectory"] == s["ConfigurationDirectory"] == ["iot-gateway"]
    assert s["WorkingDirectory"] == ["/var/lib/iot-gateway"]
    assert s["Environment"] == ["GPIOZERO_PIN_FACTORY=lgpio"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert "PrivateDevices" not in s  # it would hide /dev/gpiochip* and /dev/ttyUSB*
    assert s["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    assert {"char-gpiochip", "char-ttyUSB", "char-ttyAMA", "char-spi", "char-i2c"} <= allowed
    assert s["ExecStart"] == ["/opt/iot-gateway/.venv/bin/iot-gateway run --config /etc/iot-gateway/gateway.toml"]
    for key in HARDENING_YES:
        assert s[key] == ["yes"], key
    assert s["ProtectProc"] == ["invisible"]
    assert "ProcSubset" not in s  # gpiozero reads /proc/device-tree and /proc/cpuinfo, load_average /proc/loadavg
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert s["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert s["UMask"] == ["0077"]


# Added for issue 10, item 10, besides ProtectProc=, RestrictAddressFamilies=, SystemCallFilter= and UMask=.
HARDENING_YES = (
    "PrivateMounts", "ProtectKernelTunables", "ProtectKernelLogs", "ProtectClock", "ProtectHostname",
    "RestrictNamespaces", "RemoveIPC", "MemoryDenyWriteExecute",
)


def analyze() -> str:
    """systemd-analyze, which `make test` installs (Debian package systemd); the test fails without it."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: install the Debian package systemd (make test does)")
    return path


def exposure(unit: Path, threshold: int) -> tuple[int, float]:
    """`systemd-analyze security --offline=true --threshold=N` of a unit file: its exit code and the rating."""
    r = subprocess.run(
        [analyze(), "security", "--offline=true", f"--threshold={threshold}", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    return r.returncode, float(m[1])


def test_unit_file_security_exposure_is_ok(tmp_path: Path) -> None:
    code, level = exposure(UNIT, 25)
    assert (code, level <= 2.5) == (0, True), level
    # The check can fail: without this settings the unit is rated MEDIUM and the command exits 1.
    weaker = tmp_path / "iot-gateway.service"
    dropped = HARDENING_YES + ("ProtectProc", "RestrictAddressFamilies", "SystemCallFilter", "SystemCallArchitectures")
    weaker.write_text("".join(line for line in UNIT.read_text().splitlines(True) if not line.startswith(dropped)))
    code, level = exposure(weaker, 25)
    assert code == 1 and level > 2.5, level


def verify(unit_text: str, root: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of a unit installed in a scratch root where ExecStart exists."""
    exe = root / "opt/iot-gateway/.venv/bin/iot-gateway"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    (units / "iot-gateway.service").write_text(unit_text)
    r = subprocess.run(
        [analyze(), "verify", "--man=no", "--recursive-errors=no", f"--root={root}", "iot-gateway.service"],
        capture_output=True, text=True, timeout=60,
    )
    if "recursive-errors" in r.stderr:
        pytest.skip("systemd-analyze is older than systemd 250 (no --recursive-errors)")
    return r


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    r = verify(UNIT.read_text(), tmp_path / "root")
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    # The check can fail: a typo in a setting is reported.
    broken = UNIT.read_text().replace("DevicePolicy=closed", "DevicePolicy=clsoed")
    r = verify(broken, tmp_path / "broken")
    assert "Failed to parse device policy" in r.stdout + r.stderr


# Run as the unit's MemoryDenyWriteExecute=yes would: the kernel's PR_SET_MDWE refuses W+X mappings.
MDWE_WRAPPER = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3+)
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit(78)  # MDWE not in force: the test would prove nothing
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
"""


async def test_gateway_runs_without_write_execute_memory(
    xmpp_server: XmppServer, mosquitto: Any, tmp_path: Path, fake_systemd: tuple[FakeSystemd, str]
) -> None:
    """The run path (TLS, slixmpp, aiodns/pycares, paho, gpiozero, SQLite) needs no W+X pages."""
    fake, path = fake_systemd
    cfg = write_config(tmp_path, xmpp_server)
    cfg.chmod(0o600)
    with cfg.open("a") as f:
        f.write(
            f'\n[mqtt]\nurl = "{mosquitto.url}"\nclient_id = "mdwe-{secrets.token_hex(4)}"\n'
            '[[devices]]\nid = "plug"\ndriver = "mqtt"\n  [[devices.fields]]\n  name = "power"\n  topic = "mdwe/power"\n'
            '[[devices]]\nid = "pins"\ndriver = "gpio"\npin_factory = "mock"\n'
            '  [[devices.fields]]\n  name = "led"\n  kind = "led"\n  pin = "GPIO17"\n'
        )
    env = gateway_env(NOTIFY_SOCKET=path, IOT_GATEWAY_XMPP_PASSWORD=xmpp_server.passwords["gateway"])
    proc = subprocess.Popen(
        [sys.executable, "-c", MDWE_WRAPPER, "run", "--config", str(cfg)],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    ready = False
    try:
        deadline = time.monotonic() + 20
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            msg = await fake.recv(0.5)
            ready = msg is not None and msg.startswith("READY=1")
        if ready:
            await asyncio.sleep(2.5)  # past the first batch of the SQLite history mirror (every 2 s)
    finally:
        if proc.poll() is None:
            code, err = stop_gateway(proc)
        else:
            code, err = proc.returncode, proc.stderr.read() if proc.stderr else ""
    if code == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert code != 78, "PR_SET_MDWE did not refuse a W+X mapping"
    assert ready and code == 0, err
    assert "online as " in err and "Traceback" not in err, err


async def wait_ready(fake: FakeSystemd, proc: subprocess.Popen[str], seconds: float = 20) -> bool:
    """Wait for the gateway process's READY=1 on the fake notify socket; False if it exits or times out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        msg = await fake.recv(0.5)
        if msg is not None and msg.startswith("READY=1"):
            return True
    return False


async def test_watchdog_abort_leaves_a_python_traceback(
    xmpp_server: XmppServer, tmp_path: Path, fake_systemd: tuple[FakeSystemd, str]
) -> None:
    """systemd's watchdog kills a hung gateway with SIGABRT: stderr (the journal) shows where each thread was."""
    fake, path = fake_systemd
    cfg = write_config(tmp_path, xmpp_server)
    cfg.chmod(0o600)
    proc = start_gateway(cfg, gateway_env(NOTIFY_SOCKET=path, IOT_GATEWAY_XMPP_PASSWORD=xmpp_server.passwords["gateway"]))
    try:
        ready = await wait_ready(fake, proc)
        proc.send_signal(signal.SIGABRT)
        code = proc.wait(10)
    finally:
        proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    assert ready, err
    assert code == -signal.SIGABRT, err
    assert "Fatal Python error: Aborted" in err, err
    # Every thread's stack, the main one (the event loop, run from the CLI) included.
    main = err.partition("Current thread ")[2]
    assert re.match(r"0x[0-9a-f]+ \(most recent call first\):\n  File ", main), err
    assert re.search(r'File ".*gateway/cli\.py", line \d+ in main', main), err
