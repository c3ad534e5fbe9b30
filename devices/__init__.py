"""Device drivers, one module per driver family.

A driver family is one module, `devices/<name>.py`, that exposes `DRIVER` (a
`devices.base.Driver` subclass) and `CONFIG` (its pydantic device model, whose
`driver` is `Literal["<name>"]`). A driver that imports a hardware library
keeps `CONFIG` in `devices/<name>_config.py` beside it instead, so that
validating a config (`iot-gateway check`) never imports gpiozero, pyserial or
paho. Adding a driver is adding its module: the registry below finds it.

Driver modules are imported only when a config uses them, so a gateway
without GPIO never imports gpiozero.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path
from typing import Any, get_args

from .base import Context, Driver

NOT_DRIVERS = {"base", "discovery", "discoverybase"}  # helpers, not driver families


def driver_names() -> tuple[str, ...]:
    """The names of every driver family in this package, sorted."""
    found = {m.name.removesuffix("_config") for m in pkgutil.iter_modules([str(Path(__file__).parent)])}
    return tuple(sorted(n for n in found if n not in NOT_DRIVERS and not n.startswith("_")))


def _config_module(name: str) -> str:
    light = f"{__name__}.{name}_config"
    return light if importlib.util.find_spec(light) is not None else f"{__name__}.{name}"


def device_models() -> list[type[Any]]:
    """Every driver's device config model, for the config's `[[devices]]` union."""
    models = []
    for name in driver_names():
        model = importlib.import_module(_config_module(name)).CONFIG
        if get_args(model.model_fields["driver"].annotation) != (name,):
            raise TypeError(f"{model.__name__}.driver must be Literal[{name!r}] in devices/{name}")
        models.append(model)
    return models


def driver_class(name: str) -> type[Driver[Any]]:
    """The driver class for a config's `driver = "..."`."""
    if name not in driver_names():
        raise ValueError(f"unknown driver {name!r}")
    return importlib.import_module(f"{__name__}.{name}").DRIVER


__all__ = ["Context", "Driver", "device_models", "driver_class", "driver_names"]
