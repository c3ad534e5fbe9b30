"""Device drivers, one module per driver family.

A driver family is one module, `devices/<name>.py`, that exposes `DRIVER` (a
`devices.base.Driver` subclass) and `CONFIG` (its pydantic device model, whose
`driver` is `Literal["<name>"]`). A driver that imports a hardware library
keeps `CONFIG` in `devices/<name>_config.py` beside it instead, so that
validating a config (`iot-gateway check`) never imports gpiozero, pyserial or
paho. Adding a driver is adding its module: devices/registry.py finds it.

Driver modules are imported only when a config uses them, so a gateway
without GPIO never imports gpiozero.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Context, Driver
from .registry import PACKAGE, device_models, driver_names


def driver_class(name: str) -> type[Driver[Any]]:
    """The driver class for a config's `driver = "..."`."""
    if name not in driver_names():
        raise ValueError(f"unknown driver {name!r}")
    return importlib.import_module(f"{PACKAGE}.{name}").DRIVER


__all__ = ["Context", "Driver", "device_models", "driver_class", "driver_names"]
