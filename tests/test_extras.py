"""The optional features (`pip install 'iot-gateway[plot,omemo]'`) missing: the gateway runs and says so.

Each test runs the real CLI in a process where `import matplotlib` / `import slixmpp_omemo`
fail as they do when the package is not installed (a `None` in `sys.modules`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import XmppServer
from tests.helpers import answering
from tests.test_systemd import write_config

ROOT = Path(__file__).resolve().parent.parent
# argv[1]: the modules to hide, comma-separated; the rest goes to `iot-gateway`.
WITHOUT = """
import sys
for name in filter(None, sys.argv.pop(1).split(",")):
    sys.modules[name] = None  # `import name` raises ImportError, as for a package not installed
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
"""
OMEMO_HINT = "pip install 'iot-gateway[omemo]'"
PLOT_HINT = "pip install 'iot-gateway[plot]'"


def cli(hidden: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT, hidden, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )


def test_check_fails_when_omemo_is_asked_for_but_not_installed(xmpp_server: XmppServer, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, xmpp_server, omemo="require")
    out = cli("slixmpp_omemo", "check", "--config", str(cfg))
    assert out.returncode == 2, out
    assert "xmpp.omemo: 'require' needs the OMEMO packages, which are not installed" in out.stderr
    assert OMEMO_HINT in out.stderr and "Traceback" not in out.stderr


def test_check_without_the_extras_is_ok_and_says_what_is_off(xmpp_server: XmppServer, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, xmpp_server, omemo=None)
    out = cli("slixmpp_omemo,matplotlib", "check", "--config", str(cfg))
    assert out.returncode == 0, out
    assert f"OMEMO: OMEMO off: its packages are not installed ({OMEMO_HINT} to turn it on)" in out.stdout
    assert f"Plots: text sparklines only, the plotting library is not installed ({PLOT_HINT} for pictures)" in out.stdout
    # With the packages: OMEMO on by default, pictures.
    full = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "  OMEMO: accept" in full.stdout and "Plots:" not in full.stdout, full


async def test_gateway_without_the_extras_runs_and_says_what_is_missing(xmpp_server: XmppServer, tmp_path: Path) -> None:
    """OMEMO left unset and its packages missing: off, said once in the log and in `status`;
    no matplotlib: `plot` answers with sparklines and how to get pictures."""
    cfg = write_config(tmp_path, xmpp_server, omemo=None)
    env = dict(os.environ, IOT_GATEWAY_XMPP_PASSWORD=xmpp_server.passwords["gateway"])
    proc = subprocess.Popen(
        [sys.executable, "-c", WITHOUT, "slixmpp_omemo,matplotlib", "run", "--config", str(cfg)],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    alice = await xmpp_server.peer("alice").start()
    try:
        gw = xmpp_server.jid("gateway")
        status = await answering(alice, gw, "Notify GW: 1/1", alive=lambda: proc.poll() is None)
        assert f"OMEMO off: its packages are not installed ({OMEMO_HINT} to turn it on)" in status.splitlines(), status
        reply = await alice.ask(gw, "plot sim.temp 15m")
        first = reply.splitlines()[0]
        assert first.startswith(f"No picture: the plotting library is not installed (matplotlib); for pictures: {PLOT_HINT}")
        assert "sim.temp" in reply.splitlines()[1], reply
    finally:
        await alice.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(10)
        finally:
            proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
    assert code == 0, err
    assert err.count("OMEMO off: its packages are not installed") == 1, err
    assert "Traceback" not in err, err


GPIO_CONFIG = """
[gateway]
name = "Pins GW"
state_dir = "{state}"
[[devices]]
id = "relays"
driver = "gpio"
{factory}
  [[devices.fields]]
  name = "led"
  kind = "led"
  pin = "GPIO17"
"""


def test_check_and_status_name_the_pin_factory(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(GPIO_CONFIG.format(state=tmp_path / "state", factory='pin_factory = "mock"'))
    out = cli("", "check", "--config", str(cfg))
    assert "GPIO pin factory: mock" in out.stdout.splitlines(), out
    # The running gateway (its console, the same `status`) names the one it loaded.
    r = subprocess.run([sys.executable, "-m", "gateway", "console", "--config", str(cfg)],
                       input="status\n", capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "relays: GPIO pin factory mock" in r.stdout.splitlines(), r.stdout + r.stderr
    # Left to $GPIOZERO_PIN_FACTORY, as the unit sets it: a library that is missing is said so, with the fix.
    cfg.write_text(GPIO_CONFIG.format(state=tmp_path / "state", factory=""))
    out = cli("lgpio", "check", "--config", str(cfg), env=dict(os.environ, GPIOZERO_PIN_FACTORY="lgpio"))
    assert out.returncode == 0, out
    assert ("GPIO pin factory: lgpio, NOT installed (Raspberry Pi OS: sudo apt install python3-lgpio;"
            " elsewhere GPIOZERO_PIN_FACTORY=native, which `make install` sets when it has to)") in out.stdout, out
