"""The gateway's TOML configuration, validated by pydantic.

This module is the user-facing contract: every key a user may write is a
field of one of these models, and unknown keys are errors so that typos do
not pass silently. `load()` reads a file and returns a `Config`, or raises
`ConfigError` listing every problem as ``dotted.path: what is wrong``.
"""

from __future__ import annotations

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

ID_PATTERN = r"^[a-z0-9_-]+$"
NAME_PATTERN = r"^[A-Za-z0-9_-]+$"
PASSWORD_ENV = "IOT_GATEWAY_XMPP_PASSWORD"

FieldType = Literal["numeric", "boolean", "integer", "string"]
Role = Literal["viewer", "operator", "admin"]


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
    nick: str | None = None
    room_password: str | None = None

    @field_validator("jid")
    @classmethod
    def _bare_jid(cls, v: str) -> str:
        if not re.fullmatch(r"[^@/\s]+@[^@/\s]+", v):
            raise ValueError(f"must be a bare JID like name@example.org, got {v!r}")
        return v

    @field_validator("server")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port, like 127.0.0.1:5222, got {v!r}")
        return v

    @field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"file not found: {v}")
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
            try:
                return self.password_file.read_text().strip()
            except OSError as e:
                raise ConfigError([f"xmpp.password_file: cannot read: {e.strerror}"]) from e
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
    alerts: Literal["all", "health", "none"] = "health"

    @field_validator("jid")
    @classmethod
    def _bare_jid(cls, v: str) -> str:
        if not re.fullmatch(r"[^@/\s]+@[^@/\s]+", v):
            raise ValueError(f"must be a bare JID like name@example.org, got {v!r}")
        return v.lower()


class MqttSection(Strict):
    """`[mqtt]`: the broker shared by every mqtt device."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    client_id: str | None = None
    keepalive: int = Field(60, ge=5, le=3600)
    ca_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.fullmatch(r"mqtts?://[^/:\s]+(:\d{1,5})?/?", v):
            raise ValueError(f"must be mqtt://host[:port] or mqtts://host[:port], got {v!r}")
        return v

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
    """A field of a `serial` device."""

    key: str | None = None
    json_path: str | None = None
    command: str | None = None
    payload_on: str | None = None
    payload_off: str | None = None
    ack_pattern: str | None = None
    ack_timeout: float = Field(2.0, gt=0, le=60)

    @field_validator("ack_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from e
        return v

    @model_validator(mode="after")
    def _command_for_writable(self) -> "SerialField":
        if self.writable and not self.command:
            raise ValueError("a writable serial field needs a `command` template")
        if self.command and not self.writable:
            raise ValueError("`command` is set but the field is not writable = true")
        return self


class MqttField(FieldBase):
    """A field of an `mqtt` device."""

    topic: str | None = None
    json_path: str | None = None
    payload_on: str | None = None
    payload_off: str | None = None
    command_topic: str | None = None
    command_template: str | None = None
    retain: bool = False

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
GPIO_POLLED = {"mcp3008", "cpu_temperature", "load_average", "disk_usage"}
GPIO_NEEDS_PIN = GPIO_INPUTS | GPIO_OUTPUTS | GPIO_ANALOG_OUT


class GpioField(Strict):
    """A field of a `gpio` device; its type and writability follow from `kind`."""

    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    kind: GpioKind
    pin: int | str | None = None
    unit: str = ""
    decimals: int | None = Field(None, ge=0, le=12)
    description: str = ""
    pull_up: bool | None = True
    active_state: bool | None = None
    bounce_time: float | None = Field(None, gt=0, le=10)
    active_high: bool = True
    initial_value: bool | float | None = None
    safe_value: bool | float | None = None
    frequency: float = Field(100.0, gt=0, le=100_000)
    channel: int = Field(0, ge=0, le=7)
    interval: float = Field(5.0, gt=0, le=86_400)
    path: str = "/"

    @model_validator(mode="after")
    def _pin(self) -> "GpioField":
        if self.kind in GPIO_NEEDS_PIN and self.pin is None:
            raise ValueError(f"kind {self.kind!r} needs a `pin`")
        return self

    @property
    def type(self) -> FieldType:
        """The value type the kind produces."""
        return "boolean" if self.kind in GPIO_INPUTS | GPIO_OUTPUTS else "numeric"

    @property
    def writable(self) -> bool:
        """Outputs, LEDs, PWM outputs and servos can be set."""
        return self.kind in GPIO_OUTPUTS | GPIO_ANALOG_OUT

    @property
    def min(self) -> float | None:
        """Lower bound of a settable analog value."""
        return {"pwm_output": 0.0, "servo": -1.0}.get(self.kind)

    @property
    def max(self) -> float | None:
        """Upper bound of a settable analog value."""
        return {"pwm_output": 1.0, "servo": 1.0}.get(self.kind)


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
    format: Literal["keyvalue", "json", "regex"] = "keyvalue"
    pattern: str | None = None
    encoding: str = "utf-8"
    fields: list[SerialField] = Field(min_length=1)

    _unique = field_validator("fields")(_unique_field_names)

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
    payload_available: str = "Online"
    payload_not_available: str = "Offline"
    fields: list[MqttField] = Field(min_length=1)

    _unique = field_validator("fields")(_unique_field_names)


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
