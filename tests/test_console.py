"""`iot-gateway console`: the same command engine on stdin, as an admin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
[gateway]
name = "Console GW"
state_dir = "state"
[[devices]]
id = "sim"
driver = "simulated"
  [[devices.fields]]
  name = "temp"
  unit = "°C"
  decimals = 1
  [[devices.fields]]
  name = "relay"
  type = "boolean"
  writable = true
"""


def test_console_answers_the_chat_commands(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(CONFIG)
    commands = "help\nread sim.temp\nset sim.relay on\nread sim.relay\nset sim.relay maybe\nfrobnicate\nstatus\n"
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "console", "--config", str(cfg)],
        input=commands, capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "Console GW console: type help, Ctrl-D to quit."
    assert "Console GW commands (you are admin):" in out
    assert any(line.startswith("sim.temp = ") and "°C" in line for line in out)
    assert "sim.relay: off → on" in out
    assert "sim.relay = on (0 s ago)" in out
    assert "Error: sim.relay expects on/off (or true/false, 1/0), got 'maybe'." in out
    assert "Unknown command 'frobnicate'. Type help for the list of commands." in out
    assert "Console GW: 1/1 devices OK" in out
    assert "Traceback" not in r.stderr
