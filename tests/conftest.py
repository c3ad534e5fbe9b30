"""Shared fixtures: a real Prosody and Mosquitto on loopback for the whole run, and (for the
tests that ask) two federated Prosody servers: the gateway's and a public provider's."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import Config, parse
from gateway.demo.localservers import Federation, Mosquitto, Prosody
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


# Federated servers: the gateway's server at home and a public provider where the owner has an
# account (each its own loopback address; not .test, which libunbound answers NXDOMAIN itself).
HOME, PROVIDER = "home.example", "provider.example"
ROGUE = "rogue.example"  # started by the tests that need it, with a certificate from the wrong CA
ROOMS = "rooms.example"  # a third server, where a team room lives (`rooms_server`)
FEDERATION = {HOME: "127.0.0.2", PROVIDER: "127.0.0.3", ROGUE: "127.0.0.4", ROOMS: "127.0.0.5"}
ROOMS_USERS = {"rob": "viewer"}
# hana: an admin on the gateway's own server who gets every alert (to compare with alice's).
HOME_USERS = {"gateway": None, "hana": "admin"}
# mallory: a stranger; gateway: a second gateway, on the provider (a fleet across servers)
PROVIDER_USERS = {"alice": "admin", "victor": "viewer", "mallory": None, "gateway": None}


@dataclass
class XmppServer:
    """The suite's Prosody (or one of the federated ones) and the passwords of its accounts."""

    prosody: Prosody
    passwords: dict[str, str]
    gateway: str | None = None  # the gateway's JID, when it lives on another server

    def jid(self, user: str) -> str:
        return f"{user}@{self.prosody.domain}"

    def contacts_toml(self) -> str:
        """The suite's contacts and roles as `[[contacts]]` tables, for a gateway run from a config file
        (so the roster sync leaves the shared account as other tests expect it)."""
        return "".join(
            f'[[contacts]]\njid = "{self.jid(user)}"\nrole = "{role}"\n' for user, role in USERS.items() if role
        )

    def peer(self, user: str) -> Peer:
        gateway = self.gateway or self.jid("gateway")
        return Peer(self.jid(user), self.passwords[user], self.prosody.address, self.prosody.ca_file, gateway=gateway)


def _server(prosody: Prosody, users: Iterable[str], gateway: str | None = None) -> XmppServer:
    """Register `users` with random passwords on `prosody` and start it."""
    passwords = {}
    for user in users:
        passwords[user] = secrets.token_urlsafe(12)
        prosody.register(user, passwords[user])
    prosody.start()
    return XmppServer(prosody, passwords, gateway)


@pytest.fixture(scope="session")
def xmpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XmppServer]:
    server = _server(Prosody(tmp_path_factory.mktemp("prosody")), USERS)
    yield server
    server.prosody.stop()


@dataclass
class Federated:
    """Two Prosody servers talking s2s (certificates from one CA, `s2s_secure_auth`): `home`, where
    the gateway has its account, and `provider`, where its owner alice has hers."""

    federation: Federation
    home: XmppServer
    provider: XmppServer
    root: Path

    def contacts(self) -> list[dict[str, str]]:
        """The gateway's contacts on both servers, as the config's `contacts` list."""
        return [
            {"jid": server.jid(user), "role": role, **({"alerts": "all"} if user == "hana" else {})}
            for server, users in ((self.home, HOME_USERS), (self.provider, PROVIDER_USERS))
            for user, role in users.items()
            if role is not None
        ]

    def config(self, tmp_path: Path, **extra: Any) -> Config:
        """A gateway config for the account on `home`, with the contacts of both servers."""
        return gateway_config(self.home, tmp_path, **{"contacts": self.contacts(), **extra})


@pytest.fixture(scope="session")
def federated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federated]:
    """The gateway's server and a provider's, federated; started once for the run."""
    root = tmp_path_factory.mktemp("federation")
    federation = Federation(root, FEDERATION)
    federation.start()
    servers: list[XmppServer] = []
    try:
        gateway = f"gateway@{HOME}"
        for domain, users in ((HOME, HOME_USERS), (PROVIDER, PROVIDER_USERS)):
            prosody = Prosody(root / domain, domain=domain, uploads=False, federation=federation)
            servers.append(_server(prosody, users, gateway))
        yield Federated(federation, *servers, root)
    finally:
        for server in servers:
            server.prosody.stop()
        federation.stop()


@pytest.fixture(scope="session")
def rooms_server(federated: Federated) -> Iterator[XmppServer]:
    """A third federated server, rooms.example, with its MUC service and rob, a contact (viewer)."""
    prosody = Prosody(federated.root / ROOMS, domain=ROOMS, uploads=False, federation=federated.federation)
    server = _server(prosody, ROOMS_USERS, federated.home.jid("gateway"))
    yield server
    prosody.stop()


@pytest.fixture
async def remote_contact(federated: Federated) -> AsyncIterator[Peer]:
    """A contact on another server than the gateway's: alice (admin) on the provider, online."""
    peer = await federated.provider.peer("alice").start()
    yield peer
    await peer.stop()


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
