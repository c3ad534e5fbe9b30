"""Config model of the `tasmota` driver (kept apart so `iot-gateway check` needs no paho)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from .discoverybase import DiscoveringDevice, topic_part

LEVEL = re.compile(r"[^/+#\s]{1,64}")  # one topic level: a Tasmota prefix or topic


class TasmotaDevice(DiscoveringDevice):
    """`driver = "tasmota"`: every Tasmota device announcing itself on `<discovery_prefix>/<MAC>/config`."""

    driver: Literal["tasmota"]
    discovery_prefix: str = "tasmota/discovery"
    # The only full topic and prefixes a device may announce: its topics are made from these and
    # its own `t`, never taken from what it says (a forged `ft` must not point our commands elsewhere).
    full_topic: str = "%prefix%/%topic%/"
    prefixes: list[str] = Field(default_factory=lambda: ["cmnd", "stat", "tele"], min_length=3, max_length=3)

    @field_validator("discovery_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return topic_part(v, "discovery_prefix")

    @field_validator("full_topic")
    @classmethod
    def _full_topic(cls, v: str) -> str:
        levels = v.rstrip("/").split("/")
        if levels.count("%prefix%") != 1 or levels.count("%topic%") != 1:
            raise ValueError(f"`full_topic` must have the levels %prefix% and %topic% once each, got {v!r}")
        for level in levels:
            if level not in ("%prefix%", "%topic%") and ("%" in level or not LEVEL.fullmatch(level)):
                raise ValueError(f"`full_topic` levels are %prefix%, %topic% or plain words without wildcards, got {level!r}")
        return "/".join(levels) + "/"

    @field_validator("prefixes")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        for p in v:
            if not LEVEL.fullmatch(p):
                raise ValueError(f"`prefixes` are single topic levels without wildcards, got {p!r}")
        if len(set(v)) != 3:
            raise ValueError("`prefixes` must be three different words (command, status, telemetry)")
        return v


CONFIG = TasmotaDevice
