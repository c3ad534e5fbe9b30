"""Config model of the `tasmota` driver (kept apart so `iot-gateway check` needs no paho)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from ._discoverybase import DiscoveringDevice, topic_part


class TasmotaDevice(DiscoveringDevice):
    """`driver = "tasmota"`: every Tasmota device announcing itself on `<discovery_prefix>/<MAC>/config`."""

    driver: Literal["tasmota"]
    discovery_prefix: str = "tasmota/discovery"

    @field_validator("discovery_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return topic_part(v, "discovery_prefix")


CONFIG = TasmotaDevice
