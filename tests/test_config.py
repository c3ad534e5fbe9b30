"""`iot-gateway check` and config validation: good configs pass, every mistake is named."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from devices import driver_names
from gateway.config import ConfigError, load, parse, redact_url

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


def test_check_validates_every_driver_without_importing_hardware_libraries(tmp_path: Path) -> None:
    """`iot-gateway check` on a Pi without gpiozero, pyserial or paho still validates every driver."""
    code = (
        "import sys\n"
        "from gateway.cli import main\n"
        "code = main(['check', '--config', sys.argv[1]])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('gpiozero', 'serial', 'paho', 'lgpio'))\n"
        "print('LOADED', loaded)\n"
        "sys.exit(code)\n"
    )
    path = tmp_path / "gateway.toml"
    path.write_text(FULL)
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout, r.stdout
    assert "  weather [serial /dev/ttyUSB0]" in r.stdout  # the serial, gpio and mqtt devices were all validated


def test_every_driver_module_declares_its_config_model() -> None:
    """The registry finds each driver's config model by the module's name (devices/<name>[_config].py)."""
    from devices import device_models

    models = {m.model_fields["driver"].annotation.__args__[0]: m for m in device_models()}
    assert sorted(models) == list(driver_names())
    assert {"simulated", "serial", "gpio", "mqtt"} <= set(models)


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ('  unit = "°C"', '  unti = "°C"', "devices.0.fields.0.unti: unknown key (check the spelling)"),
        ('driver = "gpio"', 'driver = "zigbee"', "devices.1: unknown driver 'zigbee'; expected one of: " + ", ".join(driver_names())),
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
        ('history_size = 1000', 'history_size = 1000\nrate_limit = 10\ndomain_rate_limit = 5',
         "gateway: domain_rate_limit (5) is below rate_limit (10)"),
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


def test_config_from_env_and_password_from_env_at_run_time(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(FULL.replace('password = "secret"\n', ""))
    env = {"IOT_GATEWAY_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}

    def gateway(cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", cmd], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)

    # The service may set the variable only when it runs: check does not need it, and says where it comes from.
    r = gateway("check")
    assert r.returncode == 0, r.stderr
    assert "  password: from $IOT_GATEWAY_XMPP_PASSWORD at run time (not set in this environment)" in r.stdout
    # run does need it, and stops before starting anything.
    r = gateway("run")
    assert r.returncode == 2
    assert "xmpp.password: missing (set password, password_file or $IOT_GATEWAY_XMPP_PASSWORD)" in r.stderr
    env["IOT_GATEWAY_XMPP_PASSWORD"] = "from-env"
    r = gateway("check")
    assert r.returncode == 0, r.stderr
    assert "  password: from $IOT_GATEWAY_XMPP_PASSWORD at run time (set in this environment)" in r.stdout
    assert "from-env" not in r.stdout + r.stderr


def test_missing_or_empty_password_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "xmpp.pass"
    r = check(tmp_path, FULL.replace('password = "secret"', f'password_file = "{missing}"'))
    assert r.returncode == 2
    assert f"xmpp.password_file: cannot read {missing}: No such file or directory" in r.stderr, r.stderr
    empty = tmp_path / "empty.pass"
    empty.write_text("\n")
    broker = tmp_path / "mqtt.pass"
    text = FULL.replace('password = "secret"', f'password_file = "{empty}"').replace(
        'url = "mqtt://127.0.0.1:1883"', f'url = "mqtt://127.0.0.1:1883"\nusername = "gw"\npassword_file = "{broker}"'
    )
    r = check(tmp_path, text)
    assert r.returncode == 2
    assert f"xmpp.password_file: {empty} is empty (put the password on its first line)" in r.stderr, r.stderr
    assert f"mqtt.password_file: cannot read {broker}: No such file or directory" in r.stderr, r.stderr
    broker.write_text("pw\n")
    empty.write_text("s3cret\n")
    r = check(tmp_path, text)
    assert r.returncode == 0, r.stderr
    assert f"  password: from {empty}" in r.stdout


# Each of these passed `check` and then misbehaved in `run` (issue 10, item 9).
ACCEPTED_BEFORE = [
    ('url = "mqtt://127.0.0.1:1883"', 'url = "mqtt://127.0.0.1:0"', "mqtt.url: port 0 is out of range: use 1 to 65535"),
    ('url = "mqtt://127.0.0.1:1883"', 'url = "mqtt://127.0.0.1:99999"', "mqtt.url: port 99999 is out of range: use 1 to 65535"),
    ('  unit = "°C"', '  unit = "°C"\n  min = nan\n  max = inf', "devices.0.fields.0.min: must be a finite number, got nan"),
    ('  unit = "°C"', '  unit = "°C"\n  max = inf', "devices.0.fields.0.max: must be a finite number, got inf"),
    ("stale_after = 30", "stale_after = inf", "devices.0.stale_after: must be a finite number, got inf"),
    ("stale_after = 30", "stale_after = 1e300", "devices.0.stale_after: Input should be less than or equal to 2592000"),
    ('server = "127.0.0.1:5222"', 'server = "127.0.0.1:5222"\nresource = ""', "xmpp.resource: must not be blank"),
    ('server = "127.0.0.1:5222"', 'server = "127.0.0.1:5222"\nnick = "  "', "xmpp.nick: must not be blank"),
    ('server = "127.0.0.1:5222"', 'server = "127.0.0.1:5222"\nnick = " gw"', "xmpp.nick: ' gw' has spaces around it; write 'gw'"),
    ('server = "127.0.0.1:5222"', 'server = "127.0.0.1:5222"\nkeepalive = nan', "xmpp.keepalive: must be a finite number"),
    ('server = "127.0.0.1:5222"', 'server = "127.0.0.1:5222"\nrooms = ["ops@conference.example.org."]', "xmpp.rooms: 'ops@conference.example.org.': the domain ends with '.'"),
    ('jid = "alice@example.org"', 'jid = "bob@localhost."', "contacts.0.jid: 'bob@localhost.': the domain ends with '.': write bob@localhost"),
    ('jid = "alice@example.org"', 'jid = "bob@example..org"', "contacts.0.jid: 'bob@example..org': the domain has an empty label"),
    ('jid = "alice@example.org"', 'jid = "bob<x>@example.org"', "contacts.0.jid: 'bob<x>@example.org': the part before @ cannot contain '<>'"),
    ("  pin = 27", '  pin = "twenty-seven"', 'devices.1.fields.0.pin: must be a GPIO number like 17 or a name like "GPIO17", "BCM17", "BOARD11", "J8:11" or "WPI0", got \'twenty-seven\''),
    ("  pin = 27", '  pin = "GPIO"', "devices.1.fields.0.pin: must be a GPIO number like 17"),
    ("  pin = 27", '  pin = "J8:"', "devices.1.fields.0.pin: must be a GPIO number like 17"),
    ("history_size = 1000", "history_size = 1000\nrate_window = nan", "gateway.rate_window: must be a finite number, got nan"),
]


@pytest.mark.parametrize(("old", "new", "expected"), ACCEPTED_BEFORE)
def test_values_that_passed_check_but_broke_run(old: str, new: str, expected: str) -> None:
    assert old in FULL
    with pytest.raises(ConfigError) as e:
        parse(tomllib.loads(FULL.replace(old, new, 1)))
    assert any(line.startswith(expected) for line in e.value.errors), e.value.errors


def test_check_lists_each_bad_value_as_a_dotted_path(tmp_path: Path) -> None:
    # The issue's list in one file: port 0, min = nan / max = inf, stale_after = inf, an empty
    # resource, a blank nick, bob@localhost. and pin = "twenty-seven".
    cases = [ACCEPTED_BEFORE[i] for i in (0, 2, 4, 6, 7, 11, 14)]
    text = FULL
    for old, new, _ in cases:
        assert old in text
        text = text.replace(old, new, 1)
    r = check(tmp_path, text)
    assert r.returncode == 2
    for expected in [e for _, _, e in cases] + [ACCEPTED_BEFORE[3][2]]:
        assert f"  {expected}" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 + 8  # the header line, then one line per problem
    assert "Traceback" not in r.stderr


def test_non_finite_numbers_are_refused_in_every_driver() -> None:
    nan, inf = float("nan"), float("inf")
    devices = [
        {"id": "sim", "driver": "simulated", "interval": inf, "fields": [
            {"name": "a", "base": nan, "amplitude": inf, "period": inf, "noise": nan, "initial": nan},
        ]},
        {"id": "ser", "driver": "serial", "port": "/dev/ttyUSB0", "fields": [
            {"name": "b", "type": "boolean", "writable": True, "command": "B {value}", "ack_pattern": "ok", "ack_timeout": nan},
        ]},
        {"id": "pins", "driver": "gpio", "fields": [
            {"name": "c", "kind": "pwm_output", "pin": 18, "frequency": inf, "initial_value": nan, "safe_value": -inf},
            {"name": "d", "kind": "mcp3008", "scale": nan, "interval": inf},
            {"name": "e", "kind": "button", "pin": 17, "bounce_time": nan},
        ]},
    ]
    with pytest.raises(ConfigError) as e:
        parse({"mqtt": {"url": "mqtt://h", "command_timeout": nan}, "devices": devices})
    finite = {line.split(":")[0] for line in e.value.errors if "must be a finite number" in line}
    assert finite == {
        "mqtt.command_timeout",
        "devices.0.interval", "devices.0.fields.0.base", "devices.0.fields.0.amplitude",
        "devices.0.fields.0.period", "devices.0.fields.0.noise", "devices.0.fields.0.initial",
        "devices.1.fields.0.ack_timeout",
        "devices.2.fields.0.frequency", "devices.2.fields.0.initial_value", "devices.2.fields.0.safe_value",
        "devices.2.fields.1.scale", "devices.2.fields.1.interval", "devices.2.fields.2.bounce_time",
    }, e.value.errors


@pytest.mark.parametrize(
    ("pin", "expected"),
    [(17, 17), ("17", "17"), ("GPIO17", "GPIO17"), ("gpio17", "GPIO17"), ("BCM17", "BCM17"),
     ("BOARD11", "BOARD11"), ("J8:11", "J8:11"), ("WPI0", "WPI0"), (0, 0)],
)
def test_gpio_pin_names_gpiozero_accepts(pin: int | str, expected: int | str) -> None:
    config = parse({"devices": [{"id": "g", "driver": "gpio", "fields": [{"name": "led", "kind": "led", "pin": pin}]}]})
    assert config.devices[0].fields[0].pin == expected


def test_mqtt_url_with_credentials_is_refused_without_echoing_the_password(tmp_path: Path) -> None:
    r = check(tmp_path, FULL.replace('url = "mqtt://127.0.0.1:1883"', 'url = "mqtt://gw:hunter2@127.0.0.1:1883"'))
    assert r.returncode == 2
    assert "mqtt.url: credentials do not go in the url (got 'mqtt://gw:***@127.0.0.1:1883'): use mqtt://host[:port] with `username` and `password_file`" in r.stderr, r.stderr
    assert "hunter2" not in r.stdout + r.stderr
    assert redact_url("mqtts://u:p@w:rd@broker:8883") == "mqtts://u:***@broker:8883"
    assert redact_url("mqtt://broker") == "mqtt://broker"


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
