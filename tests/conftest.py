"""Shared fixtures: a real Prosody and Mosquitto on loopback for the whole run."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import Config, parse
from gateway.demo.localservers import Mosquitto, Prosody
from gateway.xmpp.session import Session
from tests import schema
from tests.peer import Peer

USERS = {
    "gateway": None,
    "alice": "admin",
    "olive": "operator",
    "victor": "viewer",
    "mallory": None,  # a stranger: has an account, is not a contact
}


@dataclass
class XmppServer:
    """The suite's Prosody and the passwords of its accounts."""

    prosody: Prosody
    passwords: dict[str, str]

    def jid(self, user: str) -> str:
        return f"{user}@{self.prosody.domain}"

    def contacts_toml(self) -> str:
        """The suite's contacts and roles as `[[contacts]]` tables, for a gateway run from a config file
        (so the roster sync leaves the shared account as other tests expect it)."""
        return "".join(
            f'[[contacts]]\njid = "{self.jid(user)}"\nrole = "{role}"\n' for user, role in USERS.items() if role
        )

    def peer(self, user: str) -> Peer:
        return Peer(
            self.jid(user), self.passwords[user], self.prosody.address, self.prosody.ca_file, gateway=self.jid("gateway")
        )


@pytest.fixture(scope="session")
def xmpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XmppServer]:
    prosody = Prosody(tmp_path_factory.mktemp("prosody"))
    passwords = {}
    for user in USERS:
        passwords[user] = secrets.token_urlsafe(12)
        prosody.register(user, passwords[user])
    prosody.start()
    yield XmppServer(prosody, passwords)
    prosody.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(autouse=True)
def schema_valid() -> Iterator[None]:
    """Fail the test if the gateway sent a test peer a payload its XEP's schema rejects (tests/schema.py)."""
    schema.failures.clear()
    yield
    schema.raise_failures()


def gateway_config(
    server: XmppServer,
    tmp_path: Path,
    devices: list[dict[str, Any]] | None = None,
    xmpp: dict[str, Any] | None = None,
    **extra: Any,
) -> Config:
    """A config for the suite's Prosody with alice/olive/victor as admin/operator/viewer."""
    data: dict[str, Any] = {
        # Health alerts at once (no debounce): tests of other things count them; test_flapping.py debounces.
        "gateway": {"name": "Test GW", "state_dir": str(tmp_path / "state"), "health_debounce": 0},
        "xmpp": {
            "jid": server.jid("gateway"),
            "password": server.passwords["gateway"],
            "server": server.prosody.address,
            "ca_file": str(server.prosody.ca_file),
            "omemo": "off",  # tests/test_omemo.py turns it on; the other tests' gateways stay light
            **(xmpp or {}),
        },
        "contacts": [
            {"jid": server.jid(u), "role": r} for u, r in USERS.items() if r is not None
        ],
        "devices": devices
        if devices is not None
        else [
            {
                "id": "sim",
                "driver": "simulated",
                "interval": 0.2,
                "fields": [
                    {"name": "temp", "unit": "°C", "decimals": 1, "noise": 0},
                    {"name": "relay", "type": "boolean", "writable": True},
                    {"name": "speed", "type": "integer", "writable": True, "min": 0, "max": 100},
                ],
            }
        ],
    }
    data.update(extra)
    return parse(data)


@dataclass
class RunningGateway:
    gateway: Gateway
    session: Session
    jid: str

    async def stop(self) -> None:
        await self.session.stop()
        await self.gateway.stop()


@pytest.fixture
async def running_gateway(xmpp_server: XmppServer, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    """The gateway with one simulated device, online on the suite's Prosody."""
    running = await start_gateway(gateway_config(xmpp_server, tmp_path), xmpp_server.passwords["gateway"])
    yield running
    await running.stop()


async def start_gateway(config: Config, password: str) -> RunningGateway:
    """Start a gateway and its XMPP session as `iot-gateway run` does, and wait until it is online."""
    gw = Gateway(config)
    await gw.start()
    session = Session(config, gw.hub, gw.commands, password, (gw.watches, gw.reverts))
    session.connect()
    await asyncio.wait_for(session.online.wait(), 10)
    return RunningGateway(gw, session, config.xmpp.jid)


@pytest.fixture
async def peers(xmpp_server: XmppServer) -> AsyncIterator[dict[str, Peer]]:
    """Connected clients for alice (admin), olive (operator), victor (viewer), mallory (stranger)."""
    started: dict[str, Peer] = {}
    for user in ("alice", "olive", "victor", "mallory"):
        started[user] = await xmpp_server.peer(user).start()
    yield started
    for p in started.values():
        await p.stop()
