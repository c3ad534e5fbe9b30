"""The gateway assembled: hub, drivers and (optionally) the XMPP session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from devices import Context, Driver, driver_class

from .commands import Commands
from .config import Config
from .history import HistoryStore
from .hub import FieldSpec, Health, Hub
from .reverts import Reverts
from .state import StateDir
from .watches import Watches

if TYPE_CHECKING:
    from .mqtt.homeassistant import HomeAssistant

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
                safe=getattr(f, "safe_value", None),  # only gpio outputs have one
            )
            for f in d.fields
        ]
        hub.add_node(d.id, d.title, d.driver, specs, d.stale_after)
    return hub


class Gateway:
    """Runs the devices of a config and feeds their readings into one hub."""

    def __init__(self, config: Config, state: StateDir | None = None):
        """`state`: the state folder, already locked (or read-only) by the caller; else an unlocked one."""
        self.config = config
        self.hub = build_hub(config)
        self.state = state if state is not None else StateDir(config.gateway.state_dir)
        self.ctx = Context(self.hub, config, guest=self.state.readonly is not None, state=self.state)
        self.state.on_problem = lambda message: self.hub.set_problem("state", message)
        self.watches = Watches(self.hub, config, self.state)
        self.reverts = Reverts(self.hub, self.state)
        g = config.gateway
        self.history = HistoryStore(
            self.hub,
            self.state.path / "history.db",
            g.retention_seconds,
            flush_every=g.history_flush,
            sync=g.history_sync,
            per_second=g.history_per_second,
            keep=g.history_keep,
            raw_rows=max(g.history_raw_rows, g.history_size),  # memory's readings come back after a restart
        )
        self.commands = Commands(self.hub, config.gateway.name, self.watches, self.reverts)
        self.commands.plots.cache_dir = self.state.path / "matplotlib"
        self.commands.store = self.history
        self.drivers: dict[str, Driver] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.homeassistant: HomeAssistant | None = None  # [homeassistant]: MQTT discovery out, commands in

    async def start(self) -> None:
        """Load state, then start every driver; one failing device does not stop the rest."""
        self.hub.bind(asyncio.get_running_loop())
        try:
            self.state.ensure()
        except OSError as e:
            log.error("state folder %s unusable (%s): nothing will be saved", self.state.path, e)
        if self.state.readonly is None:  # else the owning process writes history.db
            # Never fails: without a usable database, history stays in memory and the hub's problems say why.
            await self.history.start()
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
        self.commands.notes += [f"{d.id}: {d.about}" for d in self.drivers.values() if d.about]
        await self._start_homeassistant()
        self.reverts.start()
        self._tasks.append(asyncio.create_task(self.hub.watch_stale(), name="stale-check"))

    async def _start_homeassistant(self) -> None:
        """Publish the devices to Home Assistant, unless another process owns the state (a console)."""
        if self.config.homeassistant is None:
            return
        if self.state.readonly is not None:
            log.info("homeassistant: not published from this process: %s", self.state.readonly)
            return
        from .mqtt.homeassistant import HomeAssistant  # imports paho: only when asked for

        try:
            bridge = HomeAssistant(self.hub, self.config, self.ctx, self.state)
            await bridge.start()
        except Exception:
            log.exception("homeassistant: failed to start; the devices run without it")
            return
        self.homeassistant = bridge

    async def stop(self) -> None:
        """Stop every driver (outputs go to their safe values) and background tasks."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.homeassistant is not None:
            await self.homeassistant.stop()
            self.homeassistant = None
        await self.reverts.stop()
        for dev_id, driver in reversed(list(self.drivers.items())):
            try:
                await asyncio.wait_for(driver.stop(), 5)
            except Exception:
                log.exception("%s: error while stopping", dev_id)
        self.drivers.clear()
        self.watches.stop()  # after the drivers: their going down at stop is not news
        await self.commands.plots.close()
        self.state.stop()
        if self.state.readonly is None:
            try:
                await self.history.stop()
            except Exception:
                log.exception("could not flush history")
