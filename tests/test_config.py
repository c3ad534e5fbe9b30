"""`iot-gateway check` and config validation: good configs pass, every mistake is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load

ROOT = Path(__file__).resolve().parent.parent

FULL = """
[gateway]
name = "Greenhouse"
history_size = 1000

[xmpp]
jid = "greenhouse@example.org"
password = "secret"
server = "127.0.0.1:5222"

[[contacts]]
jid = "alice@example.org"
role = "admin"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
id = "weather"
driver = "serial"
port = "/dev/ttyUSB0"
baudrate = 9600
format = "keyvalue"
stale_after = 30
  [[devices.fields]]
  name = "temp"
  unit = "°C"
  [[devices.fields]]
  name = "heater"
  type = "boolean"
  writable = true
  command = "HEATER {value}\\n"

[[devices]]
id = "shed"
driver = "gpio"
  [[devices.fields]]
  name = "fan"
  kind = "output"
  pin = 27
  [[devices.fields]]
  name = "door"
  kind = "button"
  pin = 17

[[devices]]
id = "plug"
driver = "mqtt"
availability_topic = "tele/plug/LWT"
  [[devices.fields]]
  name = "power"
  topic = "tele/plug/SENSOR"
  json_path = "ENERGY.Power"
  unit = "W"
  [[devices.fields]]
  name = "relay"
  type = "boolean"
  writable = true
  topic = "stat/plug/POWER"
  command_topic = "cmnd/plug/POWER"
  payload_on = "ON"
  payload_off = "OFF"
"""


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(cfg)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )


def test_issue_example_config_passes_with_summary(tmp_path: Path) -> None:
    r = check(tmp_path, FULL)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Devices (3):" in out
    assert "  weather [serial /dev/ttyUSB0]" in out
    assert "    heater: boolean, writable" in out
    assert "    door: boolean" in out
    assert "  alice@example.org: admin" in out
    assert "MQTT: mqtt://127.0.0.1:1883" in out


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ('  unit = "°C"', '  unti = "°C"', "devices.0.fields.0.unti: unknown key (check the spelling)"),
        ('driver = "gpio"', 'driver = "zigbee"', "devices.1: unknown driver 'zigbee'; expected one of: simulated, serial, gpio, mqtt"),
        ('port = "/dev/ttyUSB0"\n', "", "devices.0.port: missing (required)"),
        ('id = "plug"', 'id = "weather"', "devices: device id used twice: weather"),
        ('id = "plug"', 'id = "My Plug"', "devices.2.id: 'My Plug' is not allowed"),
        ('role = "admin"', 'role = "root"', "contacts.0.role: Input should be 'viewer', 'operator' or 'admin', got 'root'"),
        ('  kind = "button"', '  kind = "buton"', "devices.1.fields.1.kind: Input should be"),
        ('  command = "HEATER {value}\\n"\n', "", "devices.0.fields.1: a writable serial field needs a `command` template"),
        ('  command_topic = "cmnd/plug/POWER"\n', "", "devices.2.fields.1: a writable mqtt field needs a `command_topic`"),
        ('baudrate = 9600', 'baudrate = "fast"', "devices.0.baudrate: Input should be a valid integer"),
        ('jid = "greenhouse@example.org"', 'jid = "greenhouse"', "xmpp.jid: must be a bare JID"),
        ('server = "127.0.0.1:5222"', 'server = "127.0.0.1"', "xmpp.server: must be host:port"),
        ('[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n', "", "devices: mqtt devices (plug) need an [mqtt] section"),
        ('history_size = 1000', 'history_size = 0', "gateway.history_size: Input should be greater than or equal to 1"),
    ],
)
def test_broken_config_names_the_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in FULL
    r = check(tmp_path, FULL.replace(old, new, 1))
    assert r.returncode == 2
    assert expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_every_error_is_listed(tmp_path: Path) -> None:
    text = FULL.replace('  unit = "°C"', '  unti = "°C"').replace('role = "admin"', 'role = "boss"')
    r = check(tmp_path, text)
    assert r.returncode == 2
    assert "devices.0.fields.0.unti" in r.stderr and "contacts.0.role" in r.stderr


def test_toml_syntax_error_is_reported(tmp_path: Path) -> None:
    r = check(tmp_path, FULL + "\n[broken\n")
    assert r.returncode == 2
    assert "TOML syntax error" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_file_is_reported(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(tmp_path / "nope.toml")],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert r.returncode == 2
    assert "cannot read: No such file or directory" in r.stderr


def test_config_from_env_and_missing_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(FULL.replace('password = "secret"\n', ""))
    env = {"IOT_GATEWAY_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "gateway", "check"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 2
    assert "xmpp.password: missing (set password, password_file or $IOT_GATEWAY_XMPP_PASSWORD)" in r.stderr
    env["IOT_GATEWAY_XMPP_PASSWORD"] = "from-env"
    r = subprocess.run([sys.executable, "-m", "gateway", "check"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 0, r.stderr


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(FULL.replace('password = "secret"', 'password_file = "pw"\nca_file = "ca.pem"'))
    config = load(cfg)
    assert config.xmpp.ca_file == tmp_path / "ca.pem"
    assert config.xmpp.resolve_password() == "s3cret"


def test_tls_verify_off_only_for_loopback(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(FULL.replace('server = "127.0.0.1:5222"', 'server = "xmpp.example.org:5222"\ntls_verify = false'))
    with pytest.raises(ConfigError) as e:
        load(cfg)
    assert "tls_verify = false is only allowed with a loopback `server`" in str(e.value)


def test_shipped_configs_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for path in sorted((ROOT / "config").glob("*.toml")):
        text = path.read_text()
        if "ca_file" in text and not (ROOT / ".demo/prosody/ca.pem").exists():
            continue  # the demo's CA exists only once `make demo` has run
        load(path)
