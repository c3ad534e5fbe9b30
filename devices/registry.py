"""The driver registry: finds every driver family of this package by its module name.

Apart from `devices.base`, so that the config (gateway/config.py) can ask for the
device models without importing what drivers build on: the imports run one way,
drivers -> gateway core, registry <- gateway.config.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path
from typing import Any, get_args

PACKAGE = __name__.rpartition(".")[0]
NOT_DRIVERS = {"base", "discovery", "discoverybase", "registry"}  # helpers, not driver families


def driver_names() -> tuple[str, ...]:
    """The names of every driver family in this package, sorted."""
    found = {m.name.removesuffix("_config") for m in pkgutil.iter_modules([str(Path(__file__).parent)])}
    return tuple(sorted(n for n in found if n not in NOT_DRIVERS and not n.startswith("_")))


def _config_module(name: str) -> str:
    light = f"{PACKAGE}.{name}_config"
    return light if importlib.util.find_spec(light) is not None else f"{PACKAGE}.{name}"


def device_models() -> list[type[Any]]:
    """Every driver's device config model, for the config's `[[devices]]` union."""
    models = []
    for name in driver_names():
        model = importlib.import_module(_config_module(name)).CONFIG
        if get_args(model.model_fields["driver"].annotation) != (name,):
            raise TypeError(f"{model.__name__}.driver must be Literal[{name!r}] in devices/{name}")
        models.append(model)
    return models

