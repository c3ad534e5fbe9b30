"""Replies that read well in every client (issue 27): plain text without XEP-0393 fences,
no blank line first or last, `help` within a phone's width with the details under
`help COMMAND`. Through the real stack (Prosody, a Peer) where it matters, and unit tests."""

from __future__ import annotations

import dataclasses
import re

import pytest

from gateway import help as helps
from gateway.auth import Actor
from gateway.commands import COMMANDS, HISTORY_DEFAULT, HISTORY_MAX, MAX_TIMED, PLOT_DEFAULT, Commands
from gateway.hub import FieldSpec, Hub
from gateway.plot import MAX_FIELDS
from gateway.rows import LINE, WIDTH
from gateway.xmpp.edge import tidy
from gateway.xmpp.fleet import Member, overview
from tests.conftest import RunningGateway
from tests.peer import Peer

ADMIN_SEES = ["help", "status", "list", "read", "set", "history", "plot", "export",
              "watch", "watches", "unwatch", "ack", "log"]
VIEWER_SEES = [c for c in ADMIN_SEES if c not in ("set", "export")]

# Each command, and how its answer starts (alerts that come meanwhile are not taken for it).
ASKED = [
    ("help", "Test GW commands"), ("help set", "set — "), ("help history", "history — "),
    ("help frob", "No command 'frob'"), ("frob", "Unknown command"),
    ("status", "Test GW: "), ("list", "1 device:"), ("read", "3 values:"), ("read sim", "sim: "),
    ("read sim.temp", "sim.temp = "), ("set sim.relay on", "sim.relay: "), ("set sim.speed 400", "Error: "),
    ("history sim.temp", "sim.temp: last"), ("history sim.temp 1h", "sim.temp"), ("history sim.temp 0", "The count"),
    ("watch sim.temp > -100", "Watch #1 set"), ("watches", "1 watches:"), ("log", "Last 2 actuator changes"),
]


def lines_of(reply: str) -> list[str]:
    return reply.split("\n")


async def test_replies_are_plain_text_without_fences_or_blank_ends(
    running_gateway: RunningGateway, peers: dict[str, Peer]
) -> None:
    alice, gw = peers["alice"], running_gateway
    for command, start in ASKED:
        reply = await alice.ask_for(gw.jid, command, start)
        assert "```" not in reply, f"{command}:\n{reply}"
        assert reply == reply.strip() and "\n\n" not in reply, f"{command}: {reply!r}"
        assert all(line == line.rstrip() for line in lines_of(reply)), f"{command}: {reply!r}"
    # The rows of a multi-row reply, aligned with spaces, right under their heading.
    read = lines_of(await alice.ask_for(gw.jid, "read sim", "sim: "))
    assert read[0] == "sim: ok" and re.fullmatch(r"relay +on  \d+ s ago", read[2]), read
    assert len({line.index(" s ago") for line in read[1:]}) == 1, read


async def test_help_fits_a_phone_and_gives_details_per_command(
    running_gateway: RunningGateway, peers: dict[str, Peer]
) -> None:
    alice, victor, gw = peers["alice"], peers["victor"], running_gateway
    for peer, role, sees in ((alice, "admin", ADMIN_SEES), (victor, "viewer", VIEWER_SEES)):
        reply = await peer.ask_for(gw.jid, "help", "Test GW commands")
        lines = lines_of(reply)
        assert all(len(line) <= LINE for line in lines), reply
        assert lines[0] == f"Test GW commands (you are {role}):"
        # One line per command the role may use, where the ad-hoc commands are (docs/webchat.md),
        # and how to get the details.
        assert [line.split()[0] for line in lines[1:-2]] == sees, reply
        assert lines[-2] == f"Ad-hoc commands (forms): {gw.session.client.boundjid.full}", reply
        assert lines[-1] == "Details and examples: help COMMAND, e.g. help read"

    page = lines_of(await alice.ask_for(gw.jid, "help set", "set — "))
    assert all(len(line) <= LINE for line in page), page
    assert page[:3] == ["set — set a writable field", "Role: operator or admin.", "Usage:"], page
    assert "  set device.field value for 10m then value" in page and "  set plug.relay on for 10m" in page, page
    assert any("7 days at most" in line for line in page), page
    assert (await alice.ask_for(gw.jid, "HELP History", "history — ")).split("\n")[1] == "Role: viewer, operator or admin."

    # Role-aware: a viewer is told set's role, as running it would, not its details.
    assert await victor.ask_for(gw.jid, "help set", "Refused") == "Refused: set needs the operator role, you are viewer."
    # A command that does not exist, or not on this gateway (OMEMO is off): the commands to use instead.
    unknown = await victor.ask_for(gw.jid, "help devices", "No command")
    assert unknown == ("No command 'devices'. Commands: help, status, list, read,\n"
                       "history, plot, watch, watches, unwatch, ack, log."), unknown
    hostile = await victor.ask_for(gw.jid, "help " + "<x>" * 300, "No command")
    assert hostile.startswith("No command '" + ("<x>" * 10) + "…'.") and all(len(line) <= LINE for line in lines_of(hostile))
    assert await victor.ask_for(gw.jid, "help read now", "Give") == (
        "Give one command. Usage: help [COMMAND] (more: help help)")


async def test_the_door_sends_no_blank_line_first_or_last(
    running_gateway: RunningGateway, peers: dict[str, Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever made the text (a command, a driver's note), the XMPP door trims it."""
    alice, gw = peers["alice"], running_gateway

    async def padded(commands: Commands, args: list[str], actor: Actor) -> str:
        return "\n  \nsim rows:\nrow one   \n\n  row two\n\n \n"

    monkeypatch.setitem(COMMANDS, "list", dataclasses.replace(COMMANDS["list"], handler=padded))
    assert await alice.ask_for(gw.jid, "list", "sim rows") == "sim rows:\nrow one\n\n  row two"


# ------------------------------------------------------------ unit tests


def test_every_command_has_one_help_line_and_a_page() -> None:
    assert list(helps.PAGES) == list(COMMANDS)
    for c in COMMANDS.values():
        assert len(f"{c.usage} — {c.about}") <= LINE, c.name
        page = helps.page(c.name, c.about, "viewer")
        assert all(len(line) <= LINE for line in lines_of(page)), page
        assert "```" not in page and "`" not in page, page  # examples are typed as shown
        assert all(f.split()[0] == c.name for f in helps.PAGES[c.name].forms), c.name


def test_help_pages_say_the_limits_the_code_applies() -> None:
    assert f"{HISTORY_DEFAULT} unless said, {HISTORY_MAX} at most" in helps.PAGES["history"].text
    assert f"last {PLOT_DEFAULT[:-1]} {PLOT_DEFAULT[-1]}" in helps.PAGES["plot"].text
    assert f"up to {MAX_FIELDS} fields" in helps.PAGES["plot"].text
    assert f"{MAX_TIMED / 86400:g} days at most" in helps.PAGES["set"].text


async def test_help_with_every_part_on_fits_a_phone() -> None:
    """Fleet and OMEMO commands too (an admin with rooms and OMEMO on), and a long gateway name."""
    hub = Hub(10)
    hub.add_node("dev", "Device", "simulated", [FieldSpec("temp", unit="°C")])
    commands = Commands(hub, "The greenhouse at the far end of the allotment garden")
    commands.fleet = lambda: ""
    commands.omemo = object()  # type: ignore[assignment]  # only its presence counts for help
    reply = await commands.run("help", Actor("a@x", "admin", "chat"))
    lines = lines_of(reply)
    assert all(len(line) <= LINE for line in lines), reply
    assert lines[:2] == ["The greenhouse at the far end of the allotment garden", "commands (you are admin):"]
    no_watches = [c for c in ADMIN_SEES if c not in ("watch", "watches", "unwatch", "ack")]  # no state folder
    assert [line.split()[0] for line in lines[2:-1]] == [*no_watches, "fleet", "devices", "trust", "distrust"], reply


def test_tidy_drops_blank_lines_at_the_ends_only() -> None:
    assert tidy("\n \nA  \n\n B\n\t\n") == "A\n\n B"
    assert tidy("one line") == "one line"
    assert tidy("https://files.example/p.png") == "https://files.example/p.png"
    assert tidy("\n") == "\n"  # nothing else left: unchanged, not an empty body


def test_fleet_rows_fit_a_phone() -> None:
    members = [
        Member("greenhouse", "gw1@example.org", "ok", "Greenhouse: 2/2 devices OK", me=True),
        Member("boiler-room", "gw2@example.org", "down", "Boiler room: 0/1 OK · boiler: offline: serial port gone"),
        Member("", "fleet03@example.org", "absent", "not in the room"),
    ]
    text = overview("ops@conference.example.org", members)
    assert text.split("\n") == [
        "Fleet in ops@conference.example.org: 2/3 gateways here, 1 OK",
        "boiler-room          down",
        "  Boiler room: 0/1 OK · boiler: offline:",
        "  serial port gone",
        "greenhouse",  # too wide for the columns the others set: the rest of its row under it
        "  ok  (this gateway)",
        "  Greenhouse: 2/2 devices OK",
        "fleet03@example.org  absent",
        "  not in the room",
    ], text
    assert all(len(line) <= WIDTH for line in text.split("\n")[1:])
