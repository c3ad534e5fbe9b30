"""The gateway's TOML configuration, validated by pydantic.

This module is the user-facing contract: every key a user may write is a
field of one of these models, and unknown keys are errors so that typos do
not pass silently. `load()` reads a file and returns a `Config`, or raises
`ConfigError` listing every problem as ``dotted.path: what is wrong``.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from devices.registry import device_models, driver_names

from .configbase import Strict
from .values import parse_duration
from .rollups import duration

OMEMO_INSTALL = "pip install 'iot-gateway[omemo]'"


def omemo_installed() -> bool:
    """Whether the OMEMO packages (the `omemo` extra) are installed."""
    return importlib.util.find_spec("slixmpp_omemo") is not None


PASSWORD_ENV = "IOT_GATEWAY_XMPP_PASSWORD"
MQTT_PASSWORD_ENV = "IOT_GATEWAY_MQTT_PASSWORD"

Role = Literal["viewer", "operator", "admin"]


BARE_JID = re.compile(r"[^@/\s]+@[^@/\s]+")
# Characters RFC 7622 forbids in the part before the @.
LOCAL_FORBIDDEN = "\"&'/:<>@"


def _bare_jid(v: str) -> str:
    if not BARE_JID.fullmatch(v):
        raise ValueError(f"must be a bare JID like name@example.org, got {v!r}")
    local, _, domain = v.partition("@")
    bad = "".join(sorted(set(local) & set(LOCAL_FORBIDDEN)))
    if bad:
        raise ValueError(f"{v!r}: the part before @ cannot contain {bad!r}")
    if domain.endswith("."):
        # Servers strip the dot (RFC 7622 3.2), so no address the gateway sees would ever match.
        raise ValueError(f"{v!r}: the domain ends with '.': write {local}@{domain.rstrip('.')}")
    if not (domain.startswith("[") and domain.endswith("]")):
        if any(not label for label in domain.split(".")):
            raise ValueError(f"{v!r}: the domain has an empty label ('..' or a leading '.')")
        bad = "".join(sorted({c for c in domain if c in LOCAL_FORBIDDEN or not c.isprintable()}))
        if bad:
            raise ValueError(f"{v!r}: the domain cannot contain {bad!r}")
    return v


def _xmpp_text(what: str, v: str) -> str:
    """A resource or nick: not blank, no spaces around it, no control characters."""
    if not v.strip():
        raise ValueError(f"must not be blank: give the {what} a name")
    if v != v.strip():
        raise ValueError(f"{v!r} has spaces around it; write {v.strip()!r}")
    if not v.isprintable():
        raise ValueError(f"{v!r} contains control characters")
    return v


def redact_url(url: str) -> str:
    """`url` with the password of a user:password@ part replaced by ***, to show it in errors."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    auth, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = auth.partition(":")
    return f"{scheme}{sep}{user}{':***' if colon else ''}@{host}"


def slug(text: str) -> str:
    """A topic- and id-safe form of a name: `Shed #2` → `shed-2`; `gateway` when nothing is left."""
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:64].rstrip("-_") or "gateway"


def _existing_file(v: Path | None) -> Path | None:
    if v is not None and not v.is_file():
        raise ValueError(f"file not found: {v}")
    return v


def _read_secret(section: str, path: Path) -> str:
    """The first line of a password file; ConfigError naming the key and the path if unreadable or empty."""
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise ConfigError([f"{section}.password_file: cannot read {path}: {e.strerror}"]) from e
    except UnicodeDecodeError:
        raise ConfigError([f"{section}.password_file: {path} is not UTF-8 text"]) from None
    if not text:
        raise ConfigError([f"{section}.password_file: {path} is empty (put the password on its first line)"])
    return text


class ConfigError(Exception):
    """A configuration that cannot be used; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


# ---------------------------------------------------------------- top level


class GatewaySection(Strict):
    """`[gateway]`: identity and housekeeping."""

    name: str = Field("IoT gateway", min_length=1, max_length=100)
    # The gateway's id in MQTT topics and client ids (never its JID); default: `name` made topic-safe.
    id: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)
    history_size: int = Field(1000, ge=1, le=1_000_000)
    state_dir: Path = Path("/var/lib/iot-gateway")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    retention: str | None = None
    rate_limit: int = Field(20, ge=1, le=10_000)
    rate_window: float = Field(10.0, gt=0, le=3600)
    # Commands the contacts on one remote server may send together per rate_window, and refusals
    # its strangers may get (gateway/xmpp/floods.py); default: 5 × rate_limit.
    domain_rate_limit: int | None = Field(None, ge=1, le=100_000)
    # history.db writes (docs/faults.md): seconds between batches (default 60; a power cut loses at
    # most that much), SQLite's `synchronous`, and readings per field per second that reach the
    # disk (the first ones and the last of each second; 0: every reading).
    history_flush: float | None = Field(None, ge=1, le=3600)
    history_sync: Literal["normal", "full"] = "full"
    history_per_second: int = Field(2, ge=0, le=1000)
    # history.db's keep times (docs/history.md): readings for `history_raw` (and at most
    # `history_raw_rows` per field), then 1-minute, 1-hour and 1-day rollups.
    history_raw: str = "2d"
    history_raw_rows: int = Field(20_000, ge=1, le=10_000_000)
    history_minutes: str = "7d"
    history_hours: str = "1y"
    history_days: str = "10y"
    # Seconds a device's new health must last before contacts are told (0: at once, no flap summaries).
    health_debounce: float = Field(10.0, ge=0, le=3600)
    # Watches one contact may have (admins: watches_per_admin); the gateway holds MAX_WATCHES in all.
    watches_per_contact: int = Field(20, ge=0, le=200)
    watches_per_admin: int = Field(100, ge=0, le=200)

    @field_validator("retention")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_duration(v)
            except ValueError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("history_raw", "history_minutes", "history_hours", "history_days")
    @classmethod
    def _keep(cls, v: str) -> str:
        try:
            duration(v)
        except ValueError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _keeps_grow(self) -> "GatewaySection":
        keep = self.history_keep
        names = {0: "history_raw", 60: "history_minutes", 3600: "history_hours", 86400: "history_days"}
        order = sorted(keep)
        for finer, coarser in zip(order, order[1:]):
            if keep[coarser] < keep[finer]:
                raise ValueError(f"{names[coarser]} ({getattr(self, names[coarser])}) is shorter than"
                                 f" {names[finer]} ({getattr(self, names[finer])}): keep coarser rollups at least as long")
        return self

    @property
    def history_keep(self) -> dict[int, float]:
        """Seconds kept per resolution (0: readings, 60, 3600, 86400: rollups)."""
        return {0: duration(self.history_raw), 60: duration(self.history_minutes),
                3600: duration(self.history_hours), 86400: duration(self.history_days)}

    @model_validator(mode="after")
    def _default_id(self) -> "GatewaySection":
        if self.id is None:
            self.id = slug(self.name)
        return self

    @model_validator(mode="after")
    def _domain_rate(self) -> "GatewaySection":
        if self.domain_rate_limit is not None and self.domain_rate_limit < self.rate_limit:
            raise ValueError(
                f"domain_rate_limit ({self.domain_rate_limit}) is below rate_limit ({self.rate_limit}): "
                "one contact could not use its own budget; raise it or leave it out (5 × rate_limit)"
            )
        return self

    @property
    def domain_limit(self) -> int:
        """Commands per window for all contacts on one remote domain together (`domain_rate_limit`)."""
        return self.domain_rate_limit if self.domain_rate_limit is not None else 5 * self.rate_limit

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
    resource: str = Field("gateway", max_length=1023)
    # A dead link (stalled server, silent partition) is noticed within keepalive + ping_timeout seconds.
    keepalive: float = Field(20, ge=0.5, le=3600)
    ping_timeout: float = Field(10, ge=0.5, le=600)
    rooms: list[str] = []
    nick: str = Field("gw", max_length=64)
    room_password: str | None = None
    uploads: bool = True  # plots as pictures via XEP-0363; false: text sparklines only
    # OMEMO (docs/omemo.md): "accept" answers encrypted messages encrypted, plain ones plain; "require" refuses plain commands.
    omemo: Literal["off", "accept", "require"] = "accept"
    # A fleet (docs/fleet.md): fellow gateways' JIDs, made members of rooms this gateway
    # owns and shown by `fleet`; never given command rights. The same list fits every site.
    peers: list[str] = []
    # Addresses that reach every gateway in a room at once: `all: status`.
    all_aliases: list[str] = ["all", "*"]

    _omemo_missing: bool = PrivateAttr(False)

    @field_validator("omemo")
    @classmethod
    def _omemo_installed(cls, v: str) -> str:
        if v != "off" and not omemo_installed():
            raise ValueError(
                f"{v!r} needs the OMEMO packages, which are not installed: {OMEMO_INSTALL}, or set omemo = \"off\""
            )
        return v

    @model_validator(mode="after")
    def _omemo_default(self) -> "XmppSection":
        # Not set in the file: "accept" where the [omemo] extra is installed, else off (and said so).
        if "omemo" not in self.model_fields_set and self.omemo != "off" and not omemo_installed():
            self.omemo = "off"
            self._omemo_missing = True
        return self

    @property
    def omemo_unavailable(self) -> str | None:
        """Why OMEMO is off though the file did not turn it off (its packages are missing); else None."""
        if not self._omemo_missing:
            return None
        return f"OMEMO off: its packages are not installed ({OMEMO_INSTALL} to turn it on)"

    @field_validator("peers")
    @classmethod
    def _peer_jids(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(_bare_jid(p).lower() for p in v))

    @field_validator("all_aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        for alias in v:
            if not alias or any(c.isspace() or c in ":," for c in alias) or not alias.isprintable():
                raise ValueError(f"{alias!r}: an alias is one word without ':' or ',', like all or *")
        return v

    @model_validator(mode="after")
    def _nick_not_alias(self) -> "XmppSection":
        if self.nick.lower() in {a.lower() for a in self.all_aliases}:
            raise ValueError(f"nick {self.nick!r} is also in all_aliases: every fleet command would look addressed to it")
        return self

    @field_validator("rooms")
    @classmethod
    def _room_jids(cls, v: list[str]) -> list[str]:
        for room in v:
            if not BARE_JID.fullmatch(room):
                raise ValueError(f"must be room JIDs like ops@conference.example.org, got {room!r}")
            _bare_jid(room)
        return v

    _jid = field_validator("jid")(_bare_jid)
    _ca = field_validator("ca_file")(_existing_file)

    @field_validator("resource", "nick")
    @classmethod
    def _names(cls, v: str, info: ValidationInfo) -> str:
        return _xmpp_text(str(info.field_name), v)

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
        if "@" in v:
            raise ValueError(
                f"credentials do not go in the url (got {redact_url(v)!r}): "
                "use mqtt://host[:port] with `username` and `password_file`"
            )
        m = re.fullmatch(r"mqtts?://[^/:\s]+(?::(\d{1,5}))?/?", v)
        if not m:
            raise ValueError(f"must be mqtt://host[:port] or mqtts://host[:port], got {v!r}")
        if m[1] is not None and not 0 < int(m[1]) < 65536:
            raise ValueError(f"port {int(m[1])} is out of range: use 1 to 65535 (1883 for mqtt, 8883 for mqtts)")
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
        """The broker password: `password`, else the first line of `password_file`, else
        `$IOT_GATEWAY_MQTT_PASSWORD` when a `username` is set, else None."""
        if self.password is not None:
            return self.password
        if self.password_file is not None:
            return _read_secret("mqtt", self.password_file)
        if self.username:
            return os.environ.get(MQTT_PASSWORD_ENV) or None
        return None


class HomeAssistantSection(Strict):
    """`[homeassistant]`: the gateway's own devices in Home Assistant (MQTT discovery on the `[mqtt]` broker)."""

    # false: publish nothing, and remove what an earlier run published.
    enabled: bool = True
    discovery_prefix: str = Field("homeassistant", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$", max_length=128)
    # This gateway in Home Assistant: its device identifier, and the level under which its topics go.
    node_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$", max_length=64)
    # Where states and commands go; default `iot-gateway/<node_id>`.
    base_topic: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$", max_length=128)
    # Home Assistant may set writable fields (through the hub, with `role`); off: every entity is read-only.
    commands: bool = False
    role: Role = "operator"  # what commands from Home Assistant may do
    exclude: list[str] = []  # `device` or `device.field` not to publish

    @field_validator("exclude")
    @classmethod
    def _refs(cls, v: list[str]) -> list[str]:
        for ref in v:
            if not re.fullmatch(r"[a-z0-9_-]+(\.[A-Za-z0-9_-]+)?", ref):
                raise ValueError(f"{ref!r}: name a device (greenhouse) or a field (greenhouse.temp)")
        return v


if TYPE_CHECKING:
    Device = Any  # `Config.devices` items: device_union(), filled in by the first parse()


def device_union() -> Any:
    """`Device`: every driver's device model (found in devices/, see devices.registry), one
    chosen by `driver`. Built when a config is first parsed, not when this module is imported."""
    return Annotated[Union[tuple(device_models())], Field(discriminator="driver")]


class Config(Strict):
    """The whole configuration file."""

    gateway: GatewaySection = GatewaySection()
    xmpp: XmppSection | None = None
    contacts: list[Contact] = []
    mqtt: MqttSection | None = None
    homeassistant: HomeAssistantSection | None = None
    devices: list[Device] = []

    @field_validator("contacts")
    @classmethod
    def _unique_contacts(cls, contacts: list[Contact]) -> list[Contact]:
        jids = [c.jid for c in contacts]
        dup = sorted({j for j in jids if jids.count(j) > 1})
        if dup:
            raise ValueError(f"contact listed twice: {', '.join(dup)}")
        return contacts

    @field_validator("homeassistant")
    @classmethod
    def _needs_broker(cls, v: HomeAssistantSection | None, info: ValidationInfo) -> HomeAssistantSection | None:
        if v is not None and "mqtt" in info.data and info.data["mqtt"] is None:
            raise ValueError("Home Assistant discovery needs an [mqtt] section with the broker url")
        return v

    @field_validator("devices")
    @classmethod
    def _devices(cls, devices: list[Any], info: ValidationInfo) -> list[Any]:
        ids = [d.id for d in devices]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"device id used twice: {', '.join(dup)}")
        # Sections are declared before `devices`, so each is in info.data unless it was invalid.
        for section in sorted({s for d in devices for s in d.sections}):
            users = [d.id for d in devices if section in d.sections]
            if section in info.data and info.data[section] is None:
                raise ValueError(
                    f"{section} devices ({', '.join(users)}) need an [{section}] section with the broker url"
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
        if isinstance(prev, int) and p in driver_names():
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
            driver_names()
        )
    if kind == "union_tag_not_found":
        return "missing `driver` (one of: " + ", ".join(driver_names()) + ")"
    if kind == "finite_number":
        return f"must be a finite number, got {err.get('input')!r}"
    if kind == "literal_error":
        return f"{msg}, got {err.get('input')!r}"
    if kind == "string_pattern_mismatch":
        return f"{err.get('input')!r} is not allowed: use letters, digits, '_' and '-' only"
    return msg.removeprefix("Value error, ")


def parse(data: dict[str, Any]) -> Config:
    """Validate already-parsed TOML data; raise ConfigError listing every problem."""
    if not Config.__pydantic_complete__:  # the first parse: the drivers' device models go in now
        Config.model_rebuild(_types_namespace={"Device": device_union()})
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
    _resolve_device_paths(data.get("devices"), base)
    return data


def _resolve_device_paths(devices: Any, base: Path) -> None:
    """The same for every `Path` option of a device and of its fields (a kernel
    device's `w1_root`, a field's `path`), whichever driver declares it."""
    if not isinstance(devices, list):
        return
    models = {get_args(m.model_fields["driver"].annotation)[0]: m for m in device_models()}
    for dev in devices:
        driver = dev.get("driver") if isinstance(dev, dict) else None
        model = models.get(driver) if isinstance(driver, str) else None
        if model is None:
            continue  # validation names the problem
        _resolve_keys(dev, model, base)
        item = get_args(model.model_fields["fields"].annotation) if "fields" in model.model_fields else ()
        fields = dev.get("fields")
        if len(item) == 1 and hasattr(item[0], "model_fields") and isinstance(fields, list):
            for f in fields:
                if isinstance(f, dict):
                    _resolve_keys(f, item[0], base)


def _resolve_keys(data: dict[str, Any], model: Any, base: Path) -> None:
    for key, info in model.model_fields.items():
        val = data.get(key)
        if Path in (info.annotation, *get_args(info.annotation)) and isinstance(val, str) and val:
            if not Path(val).is_absolute():
                data[key] = str(base / val)
