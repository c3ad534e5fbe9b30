"""The gateway's TOML configuration, validated by pydantic.

This module is the user-facing contract: every key a user may write is a
field of one of these models, and unknown keys are errors so that typos do
not pass silently. `load()` reads a file and returns a `Config`, or raises
`ConfigError` listing every problem as ``dotted.path: what is wrong``.
"""

from __future__ import annotations

import codecs
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .values import parse_duration

ID_PATTERN = r"^[a-z0-9_-]+$"
NAME_PATTERN = r"^[A-Za-z0-9_-]+$"
PASSWORD_ENV = "IOT_GATEWAY_XMPP_PASSWORD"

FieldType = Literal["numeric", "boolean", "integer", "string"]
Role = Literal["viewer", "operator", "admin"]


BARE_JID = re.compile(r"[^@/\s]+@[^@/\s]+")


def _bare_jid(v: str) -> str:
    if not BARE_JID.fullmatch(v):
        raise ValueError(f"must be a bare JID like name@example.org, got {v!r}")
    return v


def _existing_file(v: Path | None) -> Path | None:
    if v is not None and not v.is_file():
        raise ValueError(f"file not found: {v}")
    return v


def _read_secret(section: str, path: Path) -> str:
    """The first line of a password file; ConfigError naming the key if unreadable."""
    try:
        return path.read_text().strip()
    except OSError as e:
        raise ConfigError([f"{section}.password_file: cannot read: {e.strerror}"]) from e


class ConfigError(Exception):
    """A configuration that cannot be used; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


# ---------------------------------------------------------------- top level


class GatewaySection(Strict):
    """`[gateway]`: identity and housekeeping."""

    name: str = Field("IoT gateway", min_length=1, max_length=100)
    history_size: int = Field(1000, ge=1, le=1_000_000)
    state_dir: Path = Path("/var/lib/iot-gateway")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    retention: str | None = None
    rate_limit: int = Field(20, ge=1, le=10_000)
    rate_window: float = Field(10.0, gt=0, le=3600)

    @field_validator("retention")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_duration(v)
            except ValueError as e:
                raise ValueError(str(e)) from None
        return v

    @property
    def retention_seconds(self) -> float | None:
        """`retention` in seconds, or None to keep readings up to `history_size` only."""
        return parse_duration(self.retention) if self.retention else None


class XmppSection(Strict):
    """`[xmpp]`: the gateway's own account and how to reach its server."""

    jid: str
    password: str | None = None
    password_file: Path | None = None
    server: str | None = None
    direct_tls: bool = False
    ca_file: Path | None = None
    tls_verify: bool = True
    resource: str = "gateway"
    keepalive: int = Field(60, ge=5, le=3600)
    rooms: list[str] = []
    nick: str = Field("gw", min_length=1, max_length=64)
    room_password: str | None = None

    @field_validator("rooms")
    @classmethod
    def _room_jids(cls, v: list[str]) -> list[str]:
        for room in v:
            if not BARE_JID.fullmatch(room):
                raise ValueError(f"must be room JIDs like ops@conference.example.org, got {room!r}")
        return v

    _jid = field_validator("jid")(_bare_jid)
    _ca = field_validator("ca_file")(_existing_file)

    @field_validator("server")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port, like 127.0.0.1:5222, got {v!r}")
        return v

    @model_validator(mode="after")
    def _verify_only_off_on_loopback(self) -> "XmppSection":
        if not self.tls_verify:
            host = self.address[0] if self.address else ""
            if not is_loopback(host):
                raise ValueError(
                    "tls_verify = false is only allowed with a loopback `server`; "
                    "use ca_file to trust a private CA instead"
                )
        return self

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) from `server`, or None to use the JID's domain."""
        if self.server is None:
            return None
        host, _, port = self.server.rpartition(":")
        return host.strip("[]"), int(port)

    def resolve_password(self) -> str:
        """The account password: `password`, else `password_file`, else the env var."""
        if self.password is not None:
            return self.password
        if self.password_file is not None:
            return _read_secret("xmpp", self.password_file)
        env = os.environ.get(PASSWORD_ENV)
        if env:
            return env
        raise ConfigError(
            [f"xmpp.password: missing (set password, password_file or ${PASSWORD_ENV})"]
        )


class Contact(Strict):
    """`[[contacts]]`: an XMPP account allowed to use the gateway."""

    jid: str
    role: Role = "viewer"
    alerts: Literal["all", "health", "none"] | None = None

    @property
    def alert_level(self) -> str:
        """`alerts`, defaulting to health changes for admins and nothing for others."""
        if self.alerts is not None:
            return self.alerts
        return "health" if self.role == "admin" else "none"

    @field_validator("jid")
    @classmethod
    def _lower_bare_jid(cls, v: str) -> str:
        return _bare_jid(v).lower()


class MqttSection(Strict):
    """`[mqtt]`: the broker shared by every mqtt device."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    client_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", max_length=128)
    keepalive: int = Field(60, ge=5, le=3600)
    ca_file: Path | None = None
    command_timeout: float = Field(5.0, gt=0, le=9)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.fullmatch(r"mqtts?://[^/:\s]+(:\d{1,5})?/?", v):
            raise ValueError(f"must be mqtt://host[:port] or mqtts://host[:port], got {v!r}")
        return v

    _ca = field_validator("ca_file")(_existing_file)

    @model_validator(mode="after")
    def _credentials(self) -> "MqttSection":
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either `password` or `password_file`, not both")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("a broker password needs a `username`")
        if self.ca_file is not None and not self.tls:
            raise ValueError("`ca_file` only applies to an mqtts:// url")
        return self

    @property
    def tls(self) -> bool:
        """Whether the URL asks for TLS."""
        return self.url.startswith("mqtts://")

    @property
    def host(self) -> str:
        """The broker's host name or address."""
        return self.url.split("://", 1)[1].rstrip("/").rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        """The broker's port (1883, or 8883 for mqtts, unless given)."""
        rest = self.url.split("://", 1)[1].rstrip("/")
        if ":" in rest:
            return int(rest.rsplit(":", 1)[1])
        return 8883 if self.tls else 1883

    def resolve_password(self) -> str | None:
        """The broker password: `password`, else the first line of `password_file`, else None."""
        if self.password is not None:
            return self.password
        if self.password_file is not None:
            return _read_secret("mqtt", self.password_file)
        return None


# ---------------------------------------------------------------- fields


class FieldBase(Strict):
    """What every field has, whatever its driver."""

    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    type: FieldType = "numeric"
    unit: str = ""
    decimals: int | None = Field(None, ge=0, le=12)
    writable: bool = False
    min: float | None = None
    max: float | None = None
    description: str = ""

    @model_validator(mode="after")
    def _bounds(self) -> "FieldBase":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if (self.min is not None or self.max is not None) and self.type not in (
            "numeric",
            "integer",
        ):
            raise ValueError("min/max only apply to numeric and integer fields")
        return self


class SimulatedField(FieldBase):
    """A field of the `simulated` driver: a wave plus noise, or an echoed writable value."""

    base: float = 20.0
    amplitude: float = 5.0
    period: float = Field(300.0, gt=0)
    noise: float = Field(0.2, ge=0)
    initial: bool | float | int | str | None = None


class SerialField(FieldBase):
    """A field of a `serial` device.

    `key` (default: the field's name) is the key of a `keyvalue` line, the
    top-level key of a `json` line, or the group name of a `regex` pattern.
    `json_path` (json only) reaches into nested objects and lists instead.
    """

    key: str | None = Field(None, min_length=1)
    json_path: str | None = None
    command: str | None = None
    payload_on: str | None = None
    payload_off: str | None = None
    ack_pattern: str | None = None
    # Below the hub's 10 s limit for any write, so a missing reply is reported as ours.
    ack_timeout: float = Field(2.0, gt=0, le=9)

    @field_validator("ack_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from e
        return v

    @field_validator("json_path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(not part for part in v.split("."))):
            raise ValueError(f"must be dotted keys like sensors.0.value, got {v!r}")
        return v

    @model_validator(mode="after")
    def _command_for_writable(self) -> "SerialField":
        if self.writable and not self.command:
            raise ValueError("a writable serial field needs a `command` template")
        if self.command and not self.writable:
            raise ValueError("`command` is set but the field is not writable = true")
        if self.ack_pattern is not None and not self.writable:
            raise ValueError("`ack_pattern` is set but the field is not writable = true")
        if (self.payload_on is None) != (self.payload_off is None):
            raise ValueError("give both `payload_on` and `payload_off`, or neither")
        if self.payload_on is not None and self.type != "boolean":
            raise ValueError("`payload_on`/`payload_off` only apply to boolean fields")
        if self.payload_on is not None and self.payload_on == self.payload_off:
            raise ValueError("`payload_on` and `payload_off` must differ")
        return self

    @property
    def source(self) -> str:
        """Where the value is found in a line: `json_path`, else `key`, else the name."""
        return self.json_path or self.key or self.name


def _check_filter(t: str, name: str) -> None:
    """Raise if `t` is not a usable MQTT topic filter (wildcards only as whole levels)."""
    if not t or "\x00" in t:
        raise ValueError(f"`{name}` must be a non-empty topic")
    levels = t.split("/")
    for i, level in enumerate(levels):
        if ("+" in level or "#" in level) and level not in ("+", "#"):
            raise ValueError(f"`{name}`: a wildcard must be a whole topic level, got {t!r}")
        if level == "#" and i != len(levels) - 1:
            raise ValueError(f"`{name}`: '#' must be the last topic level, got {t!r}")


def _json_path(v: str | None) -> str | None:
    if v is not None and (not v or any(not part for part in v.split("."))):
        raise ValueError(f"must be dotted keys like ENERGY.Power or sensors.0.value, got {v!r}")
    return v


class MqttField(FieldBase):
    """A field of an `mqtt` device."""

    topic: str | None = None
    json_path: str | None = None
    payload_on: str | None = None
    payload_off: str | None = None
    command_topic: str | None = None
    command_template: str | None = None
    retain: bool = False

    _path = field_validator("json_path")(_json_path)

    @model_validator(mode="after")
    def _topics(self) -> "MqttField":
        if self.topic is None and self.command_topic is None:
            raise ValueError("needs a `topic` to read, a `command_topic` to write, or both")
        if self.writable and not self.command_topic:
            raise ValueError("a writable mqtt field needs a `command_topic`")
        if self.command_topic and not self.writable:
            raise ValueError("`command_topic` is set but the field is not writable = true")
        for name in ("topic", "command_topic"):
            t = getattr(self, name)
            if t is not None and (not t or "\x00" in t):
                raise ValueError(f"`{name}` must be a non-empty topic")
            if name == "command_topic" and t and ("+" in t or "#" in t):
                raise ValueError("`command_topic` cannot contain wildcards")
        if self.topic is not None:
            _check_filter(self.topic, "topic")
        if self.json_path is not None and self.topic is None:
            raise ValueError("`json_path` needs a `topic` to read")
        if (self.payload_on is None) != (self.payload_off is None):
            raise ValueError("give both `payload_on` and `payload_off`, or neither")
        if self.payload_on is not None:
            if self.type != "boolean":
                raise ValueError('`payload_on`/`payload_off` only apply to type = "boolean"')
            if self.payload_on.strip().lower() == (self.payload_off or "").strip().lower():
                raise ValueError("`payload_on` and `payload_off` must differ")
        if self.command_template is not None:
            if not self.command_topic:
                raise ValueError("`command_template` needs a `command_topic`")
            if "{value}" not in self.command_template:
                raise ValueError("`command_template` must contain {value}")
        if self.retain and not self.command_topic:
            raise ValueError("`retain` only applies to a `command_topic`")
        return self


GpioKind = Literal[
    "button",
    "motion_sensor",
    "line_sensor",
    "digital_input",
    "output",
    "led",
    "pwm_output",
    "servo",
    "mcp3008",
    "cpu_temperature",
    "load_average",
    "disk_usage",
]
GPIO_INPUTS = {"button", "motion_sensor", "line_sensor", "digital_input"}
GPIO_OUTPUTS = {"output", "led"}
GPIO_ANALOG_OUT = {"pwm_output", "servo"}
GPIO_PI_SENSORS = {"cpu_temperature", "load_average", "disk_usage"}
GPIO_POLLED = {"mcp3008"} | GPIO_PI_SENSORS
GPIO_NEEDS_PIN = GPIO_INPUTS | GPIO_OUTPUTS | GPIO_ANALOG_OUT
GPIO_SETTABLE = GPIO_OUTPUTS | GPIO_ANALOG_OUT

# Which kinds each kind-specific option applies to; setting it on another kind is an error.
GPIO_OPTIONS: dict[str, set[str]] = {
    "pin": GPIO_NEEDS_PIN,
    "pull_up": GPIO_INPUTS,
    "active_state": GPIO_INPUTS,
    "bounce_time": {"button", "digital_input"},
    "active_high": {"output", "led", "pwm_output"},
    "initial_value": GPIO_SETTABLE,
    "safe_value": GPIO_SETTABLE,
    "frequency": {"pwm_output"},
    "min_pulse_width": {"servo"},
    "max_pulse_width": {"servo"},
    "channel": {"mcp3008"},
    "spi_device": {"mcp3008"},
    "scale": {"mcp3008"},
    "interval": GPIO_POLLED,
    "path": GPIO_PI_SENSORS,
    "minutes": {"load_average"},
}
GPIO_DEFAULT_PATHS = {
    "cpu_temperature": "/sys/class/thermal/thermal_zone0/temp",
    "load_average": "/proc/loadavg",
    "disk_usage": "/",
}
GPIO_UNITS = {"cpu_temperature": "°C", "disk_usage": "%"}
GPIO_DECIMALS = {"cpu_temperature": 1, "disk_usage": 1, "load_average": 2, "mcp3008": 3}
GPIO_RANGES = {"pwm_output": (0.0, 1.0), "servo": (-1.0, 1.0)}


class GpioField(Strict):
    """A field of a `gpio` device; its type, writability and bounds follow from `kind`."""

    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    kind: GpioKind
    pin: int | str | None = None
    unit: str = ""
    decimals: int | None = Field(None, ge=0, le=12)
    description: str = ""
    pull_up: bool | None = None
    active_state: bool | None = None
    bounce_time: float | None = Field(None, gt=0, le=10)
    active_high: bool = True
    initial_value: bool | float | None = None
    safe_value: bool | float | None = None
    frequency: float = Field(100.0, gt=0, le=100_000)
    min_pulse_width: float = Field(0.001, gt=0, le=0.02)
    max_pulse_width: float = Field(0.002, gt=0, le=0.02)
    channel: int = Field(0, ge=0, le=7)
    spi_device: int = Field(0, ge=0, le=1)
    scale: float = 1.0
    interval: float = Field(5.0, gt=0, le=86_400)
    path: str | None = Field(None, min_length=1)
    minutes: Literal[1, 5, 15] = 5

    @field_validator("pin", mode="before")
    @classmethod
    def _pin_name(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, str)) or v == "" or (
            isinstance(v, int) and v < 0
        ):
            raise ValueError(f'must be a GPIO number like 17 or a name like "GPIO17" or "BOARD11", got {v!r}')
        return v

    @field_validator("initial_value", "safe_value", mode="before")
    @classmethod
    def _plain_value(cls, v: Any) -> Any:
        # Only TOML booleans and numbers: "on" or "0.5" as text are likely mistakes.
        if v is not None and not isinstance(v, (bool, int, float)):
            raise ValueError(f"must be true/false or a number, got {v!r}")
        return v

    @model_validator(mode="after")
    def _by_kind(self) -> "GpioField":
        misplaced = [k for k in self.model_fields_set if self.kind not in GPIO_OPTIONS.get(k, {self.kind})]
        if misplaced:
            k = min(misplaced)
            raise ValueError(
                f"`{k}` does not apply to kind {self.kind!r} (only to: {', '.join(sorted(GPIO_OPTIONS[k]))})"
            )
        if self.kind in GPIO_NEEDS_PIN and self.pin is None:
            raise ValueError(f"kind {self.kind!r} needs a `pin`")
        if self.pull_up is not None and self.active_state is not None:
            raise ValueError(
                "`active_state` is only for floating inputs (no internal pull resistor): "
                "remove `pull_up`, or remove `active_state`"
            )
        if self.min_pulse_width >= self.max_pulse_width:
            raise ValueError("`min_pulse_width` must be less than `max_pulse_width`")
        for key in ("initial_value", "safe_value"):
            if getattr(self, key) is not None:
                setattr(self, key, self._check_value(key, getattr(self, key)))
        if "unit" not in self.model_fields_set:
            self.unit = GPIO_UNITS.get(self.kind, "")
        if "decimals" not in self.model_fields_set:
            self.decimals = GPIO_DECIMALS.get(self.kind)
        return self

    def _check_value(self, key: str, v: bool | float) -> bool | float:
        if self.type == "boolean":
            if isinstance(v, bool):
                return v
            if v in (0, 1):
                return bool(v)
            raise ValueError(f"`{key}` for kind {self.kind!r} must be true or false, got {v!r}")
        lo, hi = GPIO_RANGES[self.kind]
        if isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(
                f"`{key}` for kind {self.kind!r} must be a number from {lo:g} to {hi:g}, got {v!r}"
            )
        return float(v)

    @property
    def type(self) -> FieldType:
        """The value type the kind produces."""
        return "boolean" if self.kind in GPIO_INPUTS | GPIO_OUTPUTS else "numeric"

    @property
    def writable(self) -> bool:
        """Outputs, LEDs, PWM outputs and servos can be set."""
        return self.kind in GPIO_SETTABLE

    @property
    def min(self) -> float | None:
        """Lower bound of a settable analog value."""
        return GPIO_RANGES.get(self.kind, (None, None))[0]

    @property
    def max(self) -> float | None:
        """Upper bound of a settable analog value."""
        return GPIO_RANGES.get(self.kind, (None, None))[1]

    @property
    def pull(self) -> bool | None:
        """gpiozero's `pull_up`: None (floating) when `active_state` is given, else
        `pull_up`, defaulting to True for buttons and False for other inputs."""
        if self.active_state is not None:
            return None
        return self.pull_up if self.pull_up is not None else self.kind == "button"

    @property
    def safe(self) -> bool | float:
        """The value an output takes at start (unless `initial_value`) and at every stop."""
        if self.safe_value is not None:
            return self.safe_value
        return False if self.type == "boolean" else 0.0

    @property
    def start_value(self) -> bool | float:
        """The value an output is given when the gateway starts."""
        return self.initial_value if self.initial_value is not None else self.safe

    @property
    def source(self) -> str:
        """The file or filesystem a Pi sensor reads (`path` or the kind's default)."""
        return self.path or GPIO_DEFAULT_PATHS.get(self.kind, "")


# ---------------------------------------------------------------- devices


def _unique_field_names(fields: list[Any]) -> list[Any]:
    seen: set[str] = set()
    for f in fields:
        if f.name in seen:
            raise ValueError(f"field name {f.name!r} is used twice")
        seen.add(f.name)
    return fields


class DeviceBase(Strict):
    """What every device has, whatever its driver."""

    id: str = Field(pattern=ID_PATTERN, max_length=64)
    name: str | None = None
    stale_after: float | None = Field(None, gt=0)

    @property
    def title(self) -> str:
        """A human name for the device."""
        return self.name or self.id


class SimulatedDevice(DeviceBase):
    """`driver = "simulated"`: made-up readings, for demos and tests."""

    driver: Literal["simulated"]
    interval: float = Field(2.0, gt=0, le=3600)
    fields: list[SimulatedField] = Field(min_length=1)

    _unique = field_validator("fields")(_unique_field_names)


class SerialDevice(DeviceBase):
    """`driver = "serial"`: lines from a serial port."""

    driver: Literal["serial"]
    port: str = Field(min_length=1)
    baudrate: int = Field(9600, gt=0, le=4_000_000)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: Literal[1, 1.5, 2] = 1
    format: Literal["keyvalue", "json", "regex"] = "keyvalue"
    pattern: str | None = None
    separators: str = Field(" ,;", min_length=1)
    encoding: str = "utf-8"
    fields: list[SerialField] = Field(min_length=1)

    _unique = field_validator("fields")(_unique_field_names)

    @field_validator("port")
    @classmethod
    def _device_path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must be a device path like /dev/serial/by-id/usb-..., got {v!r}")
        return v

    @field_validator("encoding")
    @classmethod
    def _codec(cls, v: str) -> str:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r} (try utf-8, latin-1 or ascii)") from None
        return v

    @field_validator("separators")
    @classmethod
    def _separators(cls, v: str) -> str:
        if "=" in v or "\n" in v or "\r" in v:
            raise ValueError("separators cannot contain '=' or line breaks")
        return v

    @model_validator(mode="after")
    def _format_options(self) -> "SerialDevice":
        if "separators" in self.model_fields_set and self.format != "keyvalue":
            raise ValueError('`separators` only applies to format = "keyvalue"')
        for f in self.fields:
            if f.json_path is not None and self.format != "json":
                raise ValueError(f'field {f.name!r}: `json_path` only applies to format = "json"')
        sources = [f.source for f in self.fields]
        dup = sorted({s for s in sources if sources.count(s) > 1})
        if dup:
            raise ValueError(f"two fields read the same key: {', '.join(dup)}")
        return self

    @model_validator(mode="after")
    def _pattern(self) -> "SerialDevice":
        if self.format == "regex":
            if not self.pattern:
                raise ValueError('format = "regex" needs a `pattern` with named groups')
            try:
                rx = re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern: not a valid regular expression: {e}") from e
            for f in self.fields:
                key = f.key or f.name
                if not f.writable and key not in rx.groupindex:
                    raise ValueError(f"pattern has no group named {key!r} for field {f.name!r}")
        elif self.pattern is not None:
            raise ValueError('`pattern` only applies to format = "regex"')
        return self


class GpioDevice(DeviceBase):
    """`driver = "gpio"`: pins and the Pi's own sensors through gpiozero."""

    driver: Literal["gpio"]
    pin_factory: Literal["lgpio", "rpigpio", "pigpio", "native", "mock"] | None = None
    fields: list[GpioField] = Field(min_length=1)

    _unique = field_validator("fields")(_unique_field_names)


class MqttDevice(DeviceBase):
    """`driver = "mqtt"`: topics on the `[mqtt]` broker."""

    driver: Literal["mqtt"]
    availability_topic: str | None = None
    availability_json_path: str | None = None
    payload_available: str = Field("Online", min_length=1)
    payload_not_available: str = Field("Offline", min_length=1)
    fields: list[MqttField] = Field(min_length=1)

    _unique = field_validator("fields")(_unique_field_names)
    _path = field_validator("availability_json_path")(_json_path)

    @model_validator(mode="after")
    def _availability(self) -> "MqttDevice":
        if self.availability_topic is not None:
            _check_filter(self.availability_topic, "availability_topic")
        if self.availability_json_path is not None and self.availability_topic is None:
            raise ValueError("`availability_json_path` needs an `availability_topic`")
        if self.payload_available.strip().lower() == self.payload_not_available.strip().lower():
            raise ValueError("`payload_available` and `payload_not_available` must differ")
        return self


Device = Annotated[
    Union[SimulatedDevice, SerialDevice, GpioDevice, MqttDevice],
    Field(discriminator="driver"),
]
DRIVER_NAMES = ("simulated", "serial", "gpio", "mqtt")


class Config(Strict):
    """The whole configuration file."""

    gateway: GatewaySection = GatewaySection()
    xmpp: XmppSection | None = None
    contacts: list[Contact] = []
    mqtt: MqttSection | None = None
    devices: list[Device] = []

    @field_validator("contacts")
    @classmethod
    def _unique_contacts(cls, contacts: list[Contact]) -> list[Contact]:
        jids = [c.jid for c in contacts]
        dup = sorted({j for j in jids if jids.count(j) > 1})
        if dup:
            raise ValueError(f"contact listed twice: {', '.join(dup)}")
        return contacts

    @field_validator("devices")
    @classmethod
    def _devices(cls, devices: list[Any], info: ValidationInfo) -> list[Any]:
        ids = [d.id for d in devices]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"device id used twice: {', '.join(dup)}")
        mqtt = [d.id for d in devices if d.driver == "mqtt"]
        # `mqtt` is declared before `devices`, so it is in info.data unless it was invalid.
        if mqtt and "mqtt" in info.data and info.data["mqtt"] is None:
            raise ValueError(
                f"mqtt devices ({', '.join(mqtt)}) need an [mqtt] section with the broker url"
            )
        return devices

    def contact(self, jid: str) -> Contact | None:
        """The contact entry for a bare JID, or None for a stranger."""
        jid = jid.lower()
        for c in self.contacts:
            if c.jid == jid:
                return c
        return None


# ---------------------------------------------------------------- loading


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    prev: Any = None
    for p in loc:
        # Discriminated unions put the tag into the location; users never wrote it.
        if isinstance(prev, int) and p in DRIVER_NAMES:
            prev = p
            continue
        if isinstance(p, str) and p.startswith(("function-", "model-")):
            continue
        parts.append(str(p))
        prev = p
    return ".".join(parts) or "(top level)"


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        return "unknown key (check the spelling)"
    if kind == "missing":
        return "missing (required)"
    if kind == "union_tag_invalid":
        return f"unknown driver {err.get('input', {}).get('driver')!r}; expected one of: " + ", ".join(
            DRIVER_NAMES
        )
    if kind == "union_tag_not_found":
        return "missing `driver` (one of: " + ", ".join(DRIVER_NAMES) + ")"
    if kind == "literal_error":
        return f"{msg}, got {err.get('input')!r}"
    if kind == "string_pattern_mismatch":
        return f"{err.get('input')!r} is not allowed: use letters, digits, '_' and '-' only"
    return msg.removeprefix("Value error, ")


def parse(data: dict[str, Any]) -> Config:
    """Validate already-parsed TOML data; raise ConfigError listing every problem."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError([f"{_path(err['loc'])}: {_message(err)}" for err in e.errors()]) from None


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{p}: TOML syntax error: {e}"]) from None
    return parse(_resolve_paths(data, p.resolve().parent))


PATH_KEYS = {
    "gateway": ("state_dir",),
    "xmpp": ("ca_file", "password_file"),
    "mqtt": ("ca_file", "password_file"),
}


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative paths in the file relative to the file's own folder."""
    for section, keys in PATH_KEYS.items():
        sec = data.get(section)
        if not isinstance(sec, dict):
            continue
        for key in keys:
            val = sec.get(key)
            if isinstance(val, str) and val and not Path(val).is_absolute():
                sec[key] = str(base / val)
    return data
