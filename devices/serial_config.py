"""Config models of the `serial` driver (kept apart so `iot-gateway check` needs no pyserial)."""

from __future__ import annotations

import codecs
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.configbase import DeviceBase, FieldBase, unique_names


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

    _unique = field_validator("fields")(unique_names)

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


CONFIG = SerialDevice
