"""`make install` / `make uninstall` (systemd/install.sh) into a scratch root (DESTDIR): files, modes, the
unit, and a second run that changes nothing. The user, groups, apt and starting the service need a real
machine: `../shared/tools/pi-userland.sh` with INSTALL="make install" (docs/raspberry-pi.md)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

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

