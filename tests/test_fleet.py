"""A fleet of gateways in one team room (issue 16), through the real Prosody: three
gateway processes answer `all: status` once each in nick order, stay quiet about
devices they do not have, answer only their own contacts, name their site in
alerts; nick clashes get a suffix; `fleet` shows the others' health from their
room presence."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import ConfigError, parse
from gateway.xmpp.fleet import addressed, concerns, delay, nick_for
from gateway.hub import FieldSpec, Health, Hub
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.peer import Peer
from tests.test_rooms import new_room

ROOT = Path(__file__).resolve().parent.parent
SITES = {"gw-a": ("Greenhouse", "greenhouse"), "gw-b": ("Boiler room", "boiler"), "gw-c": ("Rack", "rack")}


@pytest.fixture(scope="module")
def accounts(xmpp_server: XmppServer) -> dict[str, str]:
    """Accounts of their own for the fleet's gateways (gw-a … gw-e), registered on the suite's Prosody."""
    passwords = {}
    for user in ("gw-a", "gw-b", "gw-c", "gw-d", "gw-e"):
        passwords[user] = secrets.token_urlsafe(12)
        xmpp_server.prosody.register(user, passwords[user])
    return passwords


def test_nick_from_the_gateway_name() -> None:
    assert nick_for("Boiler room") == "boiler-room"
    assert nick_for("Greenhouse #2") == "greenhouse-2"
    assert nick_for("Rack: A/B") == "rack-a-b"
    assert nick_for("  ") == "gw"
    assert nick_for("All", ["all", "*"]) == "all-gw"  # never one of the fleet's own addresses
    assert len(nick_for("x" * 100)) == 32


def test_addressed_to_one_or_to_all() -> None:
    aliases = ["all", "*"]
    assert addressed("greenhouse: read x", "greenhouse", aliases).text == "read x"
    assert not addressed("Greenhouse, status", "greenhouse", aliases).everyone
    assert addressed("all: status", "greenhouse", aliases).everyone
    assert addressed("*, read", "greenhouse", aliases).text == "read"
    assert addressed("alice: 1/1 devices OK", "greenhouse", aliases) is None
    assert addressed("all: status", "greenhouse", []) is None
    hub = Hub(10)
    hub.add_node("boiler", "boiler", "simulated", [FieldSpec("temp")])
    assert concerns(hub, "read boiler.temp") and concerns(hub, "status") and concerns(hub, "read")
    assert not concerns(hub, "read rack.temp") and not concerns(hub, "set rack.fan on")
    # Turns in nick order, within the window.
    assert [delay(n, ["a", "b", "c"]) < (i + 1) / 3 for i, n in enumerate("abc")] == [True] * 3
    assert delay("b", ["a", "b", "c"]) >= 1 / 3


def test_fleet_options_are_checked() -> None:
    base = {"jid": "gw@example.org", "password": "x"}
    ok = parse({"xmpp": {**base, "peers": ["GH@Example.org", "gh@example.org", "rack@other.net"]}})
    assert ok.xmpp.peers == ["gh@example.org", "rack@other.net"]
    with pytest.raises(ConfigError, match="xmpp.peers"):
        parse({"xmpp": {**base, "peers": ["not a jid"]}})
    with pytest.raises(ConfigError, match="alias is one word"):
        parse({"xmpp": {**base, "all_aliases": ["every one"]}})
    with pytest.raises(ConfigError, match="nick 'all' is also in all_aliases"):
        parse({"xmpp": {**base, "nick": "all"}})


async def said(peer: Peer, room: str, quiet: float = 2.0) -> list[tuple[str, str]]:
    """(nick, body) of every gateway's room message until none comes for `quiet` seconds (at most 50)."""
    out: list[tuple[str, str]] = []
    for _ in range(50):
        try:
            msg = await asyncio.wait_for(peer.room_messages.get(), quiet)
        except TimeoutError:
            break
        if msg["from"].bare == room and msg["from"].resource not in ("alice", "victor"):
            out.append((msg["from"].resource, msg["body"]))
    return out


async def ask(peer: Peer, room: str, body: str) -> list[tuple[str, str]]:
    """Say `body` in `room` and return what the gateways said there afterwards."""
    while not peer.room_messages.empty():
        peer.room_messages.get_nowait()
    peer.client.send_message(mto=room, mbody=body, mtype="groupchat")
    return await said(peer, room)


async def wait_private(peer: Peer, room: str) -> None:
    """Wait (bounded) until a gateway has created `room` and made it members-only."""
    for _ in range(150):
        try:
            info = await peer.client.plugin["xep_0030"].get_info(jid=room, timeout=5)
            if "muc_membersonly" in info["disco_info"]["features"]:
                return
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"nobody created {room}")


def site_config(server: XmppServer, tmp_path: Path, user: str, room: str, contacts: str) -> Path:
    name, device = SITES[user]
    peers = ", ".join(f'"{server.jid(u)}"' for u in SITES)
    path = tmp_path / user / "gw.toml"
    path.parent.mkdir()
    path.write_text(
        f"""
[gateway]
name = "{name}"
state_dir = "{tmp_path / user / 'state'}"
[xmpp]
jid = "{server.jid(user)}"
server = "{server.prosody.address}"
ca_file = "{server.prosody.ca_file}"
rooms = ["{room}"]
peers = [{peers}]
{contacts}
[[devices]]
id = "{device}"
driver = "simulated"
interval = 0.5
  [[devices.fields]]
  name = "temp"
  unit = "°C"
  noise = 0
  amplitude = 0
"""
    )
    return path


@pytest.fixture
def fleet_procs() -> Iterator[dict[str, subprocess.Popen[str]]]:
    procs: dict[str, subprocess.Popen[str]] = {}
    yield procs
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(10)
        finally:
            proc.kill()


async def test_three_gateway_processes_answer_all_status_once_each_in_order(
    xmpp_server: XmppServer, tmp_path: Path, accounts: dict[str, str],
    fleet_procs: dict[str, subprocess.Popen[str]], peers: dict[str, Peer],
) -> None:
    room = new_room("fleet")
    alice, victor = peers["alice"], peers["victor"]
    admin = f'[[contacts]]\njid = "{xmpp_server.jid("alice")}"\nrole = "admin"\n'
    viewer = f'[[contacts]]\njid = "{xmpp_server.jid("victor")}"\nrole = "viewer"\n'

    def spawn(user: str, contacts: str) -> None:
        cfg = site_config(xmpp_server, tmp_path, user, room, contacts)
        env = dict(os.environ, IOT_GATEWAY_XMPP_PASSWORD=accounts[user])
        fleet_procs[user] = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(cfg)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / user / "log").open("w"), text=True,
        )

    spawn("gw-a", admin + viewer)  # the greenhouse creates the room; the others become members
    await wait_private(alice, room)
    for _ in range(150):  # and has made alice, victor and the peers members
        if f"joined room {room} as greenhouse" in (tmp_path / "gw-a" / "log").read_text():
            break
        await asyncio.sleep(0.1)
    spawn("gw-b", admin + viewer)
    spawn("gw-c", admin)  # the rack does not know victor
    await alice.join(room, "alice")
    await victor.join(room, "victor")
    nicks = {"greenhouse", "boiler-room", "rack"}
    for _ in range(300):
        if nicks <= set(alice.client.plugin["xep_0045"].get_roster(room)):
            break
        await asyncio.sleep(0.1)
    await said(alice, room, 0.5)

    assert await ask(alice, room, "all: status") == [
        ("boiler-room", "alice: Boiler room: 1/1 devices OK"),
        ("greenhouse", "alice: Greenhouse: 1/1 devices OK"),
        ("rack", "alice: Rack: 1/1 devices OK"),
    ]
    # Each gateway answers its own contacts only.
    assert [nick for nick, _ in await ask(victor, room, "*: status")] == ["boiler-room", "greenhouse"]
    # Only the gateway with the device speaks.
    answers = await ask(alice, room, "all: read rack.temp")
    assert [nick for nick, _ in answers] == ["rack"] and answers[0][1].startswith("alice: rack.temp = 20")

    (nick, overview), = await ask(alice, room, "boiler-room: fleet")
    assert nick == "boiler-room" and overview.startswith(f"alice: Fleet in {room}: 3/3 gateways here, 3 OK"), overview
    for row in ("\ngreenhouse   ok\n  Greenhouse: 1/1 devices OK",
                "\nrack         ok\n  Rack: 1/1 devices OK",
                "\nboiler-room  ok  (this gateway)\n  Boiler room: 1/1 devices OK"):
        assert row in overview, overview

    lines = await ask(alice, room, "rack: watch rack.temp > -100")
    assert ("rack", "alice: Watch #1 set: rack.temp > -100 (firing now). Remove it with: unwatch 1") in lines, lines
    assert [b for n, b in lines if "ALERT" in b] == ["[Rack] ALERT #1 rack.temp > -100: now 20 °C"], lines
    for proc in fleet_procs.values():
        assert proc.poll() is None


async def test_nick_clash_gets_a_suffix_and_fleet_sees_presence_updates(
    xmpp_server: XmppServer, tmp_path: Path, accounts: dict[str, str], peers: dict[str, Peer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="iot_gateway")
    room = new_room("twins")
    fleet = [xmpp_server.jid("gw-d"), xmpp_server.jid("gw-e")]
    started = []
    try:
        for user in ("gw-d", "gw-e"):
            config = gateway_config(
                xmpp_server, tmp_path / user,
                xmpp={"jid": xmpp_server.jid(user), "password": accounts[user], "rooms": [room], "peers": fleet},
                gateway={"name": "Twin", "state_dir": str(tmp_path / user / "state")},
            )
            gw = await start_gateway(config, accounts[user])
            started.append(gw)
            for _ in range(300):
                if room in gw.session.rooms.joined:
                    break
                await asyncio.sleep(0.1)
        first, second = started
        assert (first.session.rooms.nicks[room], second.session.rooms.nicks[room]) == ("twin", "twin-2")
        assert f"room {room}: the nick twin is taken by another occupant; joined as twin-2" in caplog.messages

        alice = peers["alice"]
        await alice.join(room, "alice")
        answers = await ask(alice, room, "twin: read sim.temp")
        assert [n for n, _ in answers] == ["twin"], answers  # never two gateways answering as one

        # The second twin's health reaches the first one's `fleet` through its room presence.
        second.gateway.hub.set_health("sim", Health.ERROR, "driver crashed")
        deadline = time.monotonic() + 10
        while "error: driver" not in first.session.rooms.overview() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        view = first.session.rooms.overview()
        # A row within a phone's width, the status under it (wrapped there too).
        assert "\ntwin-2  down\n  Twin: 0/1 OK · sim: error: driver\n  crashed" in view, view
        assert "\ntwin    ok    (this gateway)\n  Twin: 1/1 devices OK" in view, view
    finally:
        for gw in started:
            await gw.stop()
