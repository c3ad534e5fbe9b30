"""Config shared by the drivers of self-describing MQTT devices (`zigbee2mqtt`, `tasmota`).

Kept apart from `devices.discovery` (which imports paho) so `iot-gateway check` needs no paho.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import Field, field_validator

from gateway.configbase import DeviceBase, FieldBase

BRIDGE_FIELDS = [
    FieldBase(name="devices", type="integer", description="devices found, each shown as its own device"),
    FieldBase(name="dropped", type="integer", description="messages of devices not listed, dropped: too many to keep"),
]


class DiscoveringDevice(DeviceBase):
    """A config entry that stands for every device a bridge or a discovery describes on the `[mqtt]` broker."""

    sections: ClassVar[tuple[str, ...]] = ("mqtt",)
    # Devices appear after start: watches on them are kept across a restart until they are back.
    discovers: ClassVar[bool] = True

    # Shell patterns (`kitchen/*`) of the names to show (empty: all) and to leave out.
    include: list[str] = Field(default_factory=list, max_length=500)
    exclude: list[str] = Field(default_factory=list, max_length=500)
    # Put before every device id made from a name: `zb-` makes `zb-hall_motion`.
    prefix: str = Field("", pattern=r"^[a-z0-9_-]*$", max_length=20)
    # Seconds a set waits for the device to report the new state (a write gets 10 s in all).
    confirm_timeout: float = Field(5.0, gt=0, le=8)
    # Which fields a set may change, of those the device's own description says are settable:
    # unset, the driver's actuators only (a light's or a switch's features, Tasmota's relays);
    # true, all of them; false, none; a list, those whose `<name>.<field>` matches a pattern.
    writable: bool | list[str] | None = Field(None, union_mode="left_to_right")

    @field_validator("include", "exclude", "writable")
    @classmethod
    def _patterns(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) > 500:
                raise ValueError("at most 500 patterns")
            for p in v:
                if not p or len(p) > 256 or not p.isprintable():
                    raise ValueError(f"{p!r} is not a usable pattern (1-256 printable characters)")
        return v

    @property
    def fields(self) -> list[FieldBase]:
        """The entry's own node: how many devices it shows (theirs come at run time)."""
        return BRIDGE_FIELDS


def topic_part(v: str, what: str) -> str:
    """A topic prefix without wildcards or empty levels (`zigbee2mqtt`, `tasmota/discovery`)."""
    if not v or "\x00" in v or "+" in v or "#" in v or v.startswith("/") or v.endswith("/") or "//" in v:
        raise ValueError(f"`{what}` must be a topic without wildcards, empty levels or a leading or trailing '/', got {v!r}")
    if not re.fullmatch(r"[^\s]{1,200}", v):
        raise ValueError(f"`{what}` must be 1-200 characters without spaces, got {v!r}")
    return v
