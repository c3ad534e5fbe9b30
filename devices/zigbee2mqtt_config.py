"""Config model of the `zigbee2mqtt` driver (kept apart so `iot-gateway check` needs no paho)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from .discoverybase import DiscoveringDevice, topic_part


class Zigbee2MqttDevice(DiscoveringDevice):
    """`driver = "zigbee2mqtt"`: every device a Zigbee2MQTT bridge lists on `<base_topic>/bridge/devices`."""

    driver: Literal["zigbee2mqtt"]
    base_topic: str = "zigbee2mqtt"

    @field_validator("base_topic")
    @classmethod
    def _base(cls, v: str) -> str:
        return topic_part(v, "base_topic")


CONFIG = Zigbee2MqttDevice
