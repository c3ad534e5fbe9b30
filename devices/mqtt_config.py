"""Config models of the `mqtt` driver's devices (kept apart so `iot-gateway check` needs no paho).

The broker itself is the top-level `[mqtt]` section, in `gateway.config`."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from gateway.configbase import DeviceBase, FieldBase, unique_names


def check_filter(t: str, name: str) -> None:
    """Raise if `t` is not a usable MQTT topic filter (wildcards only as whole levels)."""
    if not t or "\x00" in t:
        raise ValueError(f"`{name}` must be a non-empty topic")
    levels = t.split("/")
    for i, level in enumerate(levels):
        if ("+" in level or "#" in level) and level not in ("+", "#"):
            raise ValueError(f"`{name}`: a wildcard must be a whole topic level, got {t!r}")
        if level == "#" and i != len(levels) - 1:
            raise ValueError(f"`{name}`: '#' must be the last topic level, got {t!r}")


def json_path_check(v: str | None) -> str | None:
    """Validate a dotted JSON path such as ENERGY.Power."""
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

    _path = field_validator("json_path")(json_path_check)

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
            check_filter(self.topic, "topic")
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


class MqttDevice(DeviceBase):
    """`driver = "mqtt"`: topics on the `[mqtt]` broker."""

    sections: ClassVar[tuple[str, ...]] = ("mqtt",)

    driver: Literal["mqtt"]
    availability_topic: str | None = None
    availability_json_path: str | None = None
    payload_available: str = Field("Online", min_length=1)
    payload_not_available: str = Field("Offline", min_length=1)
    # Seconds a set of a field with a state `topic` waits for the device to report the new state.
    confirm_timeout: float = Field(5.0, gt=0, le=8)  # a write gets 10 s in all (the hub)
    fields: list[MqttField] = Field(min_length=1)

    _unique = field_validator("fields")(unique_names)
    _path = field_validator("availability_json_path")(json_path_check)

    @model_validator(mode="after")
    def _availability(self) -> "MqttDevice":
        if self.availability_topic is not None:
            check_filter(self.availability_topic, "availability_topic")
        if self.availability_json_path is not None and self.availability_topic is None:
            raise ValueError("`availability_json_path` needs an `availability_topic`")
        if self.payload_available.strip().lower() == self.payload_not_available.strip().lower():
            raise ValueError("`payload_available` and `payload_not_available` must differ")
        return self


CONFIG = MqttDevice
