"""Device drivers, one module per driver family.

Each module exposes `DRIVER`, a `devices.base.Driver` subclass. Modules are
imported only when a config uses them, so a gateway without GPIO never
imports gpiozero.
"""

from __future__ import annotations

import importlib

from .base import Context, Driver

MODULES = {
    "simulated": "devices.simulated",
    "serial": "devices.serial",
    "gpio": "devices.gpio",
    "mqtt": "devices.mqtt",
}


def driver_class(name: str) -> type[Driver]:
    """The driver class for a config's `driver = "..."`."""
    try:
        module = importlib.import_module(MODULES[name])
    except KeyError:
        raise ValueError(f"unknown driver {name!r}") from None
    return module.DRIVER


__all__ = ["Context", "Driver", "MODULES", "driver_class"]
