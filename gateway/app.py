"""The gateway assembled: hub, drivers and (optionally) the XMPP session."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from devices import Context, Driver, driver_class

from .config import Config
from .hub import FieldSpec, Health, Hub

log = logging.getLogger("iot_gateway")


def build_hub(config: Config) -> Hub:
    """A hub with one node per configured device; no driver is started."""
    hub = Hub(config.gateway.history_size)
    for d in config.devices:
        specs = [
            FieldSpec(
                name=f.name,
                type=f.type,
                unit=f.unit,
                decimals=f.decimals,
                writable=f.writable,
                min=f.min,
                max=f.max,
                description=f.description,
            )
            for f in d.fields
        ]
        hub.add_node(d.id, d.title, d.driver, specs, d.stale_after)
    return hub


class Gateway:
    """Runs the devices of a config and feeds their readings into one hub."""

    def __init__(self, config: Config):
        self.config = config
        self.hub = build_hub(config)
        self.ctx = Context(self.hub, config)
        self.drivers: dict[str, Driver] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Bind the hub to this loop and start every driver; one failing device does not stop the rest."""
        self.hub.bind(asyncio.get_running_loop())
        for d in self.config.devices:
            try:
                driver = driver_class(d.driver)(d, self.ctx)
                self.drivers[d.id] = driver
                await driver.start()
            except Exception as e:
                log.exception("%s: failed to start", d.id)
                self.hub.set_health(d.id, Health.ERROR, f"failed to start: {e}")
                continue
            if any(f.writable for f in d.fields):
                self.hub.set_writer(d.id, driver.write)
        self._tasks.append(asyncio.create_task(self.hub.watch_stale(), name="stale-check"))

    async def stop(self) -> None:
        """Stop every driver (outputs go to their safe values) and background tasks."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for dev_id, driver in reversed(list(self.drivers.items())):
            try:
                await asyncio.wait_for(driver.stop(), 5)
            except Exception:
                log.exception("%s: error while stopping", dev_id)
        self.drivers.clear()
