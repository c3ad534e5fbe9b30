"""`make install` / `make uninstall` (systemd/install.sh) into a scratch root (DESTDIR): files, modes, the
unit, and a second run that changes nothing. The user, groups, apt and starting the service need a real
machine: `../shared/tools/pi-userland.sh` with INSTALL="make install" (docs/raspberry-pi.md)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from gateway.demo.localservers import Prosody
from tests.conftest import USERS, XmppServer, gateway_config, start_gateway

ROOT = Path(__file__).resolve().parent.parent
# Offline: the project only (its dependencies are not needed to look at the files), built with the
# venv's own setuptools and wheel: Debian's python3 has them (python3-wheel, which make test-deps
# installs) and the venv sees them. lgpio cannot be fetched either: the install takes the native-pins route.
PIP_OPTS = "--no-index --no-deps --no-build-isolation"
PYTHON = "/usr/bin/python3"


def make(target: str, dest: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PIP_OPTS=PIP_OPTS)
    env.pop("MAKEFLAGS", None)
    return subprocess.run(
        ["make", "--no-print-directory", target, f"DESTDIR={dest}", f"PYTHON={PYTHON}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def snapshot(dest: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under `dest` (byte-code caches aside): its mode and content or link target."""
    out = {}
    for path in sorted(dest.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        st = path.lstat()
        if path.is_symlink():
            what = os.readlink(path)
        elif path.is_file():
            what = path.read_bytes().hex() if st.st_size < 100_000 else str(st.st_size)
        else:
            what = ""
        out[str(path.relative_to(dest))] = (stat.S_IMODE(st.st_mode), what)
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_into_a_folder_twice_then_uninstall(tmp_path: Path) -> None:
    if shutil.which("systemctl") is None:
        pytest.fail("systemctl is missing: install the Debian package systemd (make test does)")
    dest = tmp_path / "root"
    first = make("install", dest)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "code copied to /opt/iot-gateway" in first.stdout

    opt, etc = dest / "opt/iot-gateway", dest / "etc/iot-gateway"
    unit = dest / "etc/systemd/system/iot-gateway.service"
    assert (opt / "gateway/cli.py").read_text() == (ROOT / "gateway/cli.py").read_text()
    assert not (opt / ".git").exists() and not (opt / ".venv/bin/pytest").exists()
    assert os.access(opt / ".venv/bin/iot-gateway", os.X_OK)
    assert "include-system-site-packages = true" in (opt / ".venv/pyvenv.cfg").read_text()
    # Config from the example, readable by the service's group only; the password file by its owner only.
    assert (etc / "gateway.toml").read_text() == (ROOT / "config/example.toml").read_text()
    assert mode(etc / "gateway.toml") == 0o640
    assert (etc / "xmpp.pass").read_text() == "" and mode(etc / "xmpp.pass") == 0o600
    # The unit as shipped, enabled (`systemctl --root` makes the link), and the pin factory this machine has.
    assert unit.read_text() == (ROOT / "systemd/iot-gateway.service").read_text() and mode(unit) == 0o644
    wants = dest / "etc/systemd/system/multi-user.target.wants/iot-gateway.service"
    assert os.readlink(wants) == "/etc/systemd/system/iot-gateway.service"
    dropin = (dest / "etc/systemd/system/iot-gateway.service.d/install.conf").read_text()
    assert "Environment=GPIOZERO_PIN_FACTORY=native\nDeviceAllow=/dev/gpiomem rw" in dropin
    assert "GPIO pin factory: native" in first.stdout
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--recursive-errors=no", f"--root={dest}", "iot-gateway.service"],
        capture_output=True, text=True, timeout=60,
    )
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    # A config of one's own is kept; otherwise a second run changes nothing.
    (etc / "gateway.toml").write_text("# mine\n")
    before = snapshot(dest)
    second = make("install", dest)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "copied" not in second.stdout and "pip install" not in second.stdout and "wrote" not in second.stdout
    assert snapshot(dest) == before

    gone = make("uninstall", dest)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not opt.exists() and not unit.exists() and not wants.is_symlink()
    assert not (dest / "etc/systemd/system/iot-gateway.service.d").exists()
    assert (etc / "gateway.toml").read_text() == "# mine\n" and (etc / "xmpp.pass").exists()



def doc_block(marker: str) -> str:
    """The first ```sh block after the line of docs/raspberry-pi.md holding `marker`."""
    text = (ROOT / "docs/raspberry-pi.md").read_text()
    m = re.search(re.escape(marker) + r".*?\n```sh\n(.*?)\n```", text, re.S)
    assert m, f"no sh block after {marker!r} in docs/raspberry-pi.md"
    return m[1]


def tls_handshake(port: int, ca: Path, name: str) -> str:
    """The TLS version of a handshake with 127.0.0.1:port verifying `name` against `ca`."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=name) as tls:
        return tls.version() or ""


async def test_the_docs_local_ca_recipe_serves_the_gateway_rooms_and_uploads(tmp_path: Path) -> None:
    """docs/raspberry-pi.md's local-CA commands, run as written (for DOMAIN=localhost, without sudo):
    a Prosody with that certificate is verified by the gateway, a contact's client and an HTTPS client."""
    ca_dir = tmp_path / "ca"
    script = doc_block("tests/test_install.py runs this block")
    assert "DOMAIN=example.org\nCA=/etc/prosody/local-ca\n" in script
    script = script.replace("DOMAIN=example.org", "DOMAIN=localhost").replace("CA=/etc/prosody/local-ca", f"CA={ca_dir}")
    script = re.sub(r"\bsudo ", "", script)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("localhost", "conference.localhost", "upload.localhost"):
        v = subprocess.run(["openssl", "verify", "-CAfile", "ca.pem", "-verify_hostname", name, "server.pem"],
                           cwd=ca_dir, capture_output=True, text=True, timeout=30)
        assert v.stdout.strip() == "server.pem: OK", v.stdout + v.stderr
    # Prosody in that folder takes the files there (ca.pem, server.pem, server.key) instead of making its own.
    prosody = Prosody(ca_dir, uploads=True)
    assert prosody.ca_file == ca_dir / "ca.pem"
    passwords = {u: secrets.token_urlsafe(12) for u in USERS}
    for user, pw in passwords.items():
        prosody.register(user, pw)
    prosody.start()
    try:
        server = XmppServer(prosody, passwords)
        gw = await start_gateway(gateway_config(server, tmp_path), passwords["gateway"])
        alice = await server.peer("alice").start()
        try:
            assert (await alice.ask(gw.jid, "status")).startswith("Test GW: ")
        finally:
            await alice.stop()
            await gw.stop()
        assert prosody.https_port is not None
        assert (await asyncio.to_thread(tls_handshake, prosody.https_port, ca_dir / "ca.pem", "localhost")).startswith("TLS")
    finally:
        prosody.stop()
