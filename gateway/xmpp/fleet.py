"""A fleet: several gateways (each its own JID, maybe on different servers) in one
team room, so a team sees them as one system without any central service.

Pure helpers the rooms use: a room nick from the gateway's name, who a room
message is addressed to (`greenhouse: read`, or everyone with `all: status`),
when a gateway answers a fleet-wide command (its own slot in a window of about
a second, in the order of the nicks, so answers neither burst nor shuffle), and
the `fleet` overview. See docs/fleet.md.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..commands import DEVICE_COMMANDS  # first argument names a device: a gateway without it stays quiet
from ..hub import Hub
from ..rows import fit

WINDOW = 1.0  # seconds within which every gateway answers a fleet-wide command
JITTER = 0.3  # share of its slot by which a gateway's answer wanders, so the order stays
NICK_MAX = 32
SHOW = {None: "ok", "chat": "ok", "away": "problems", "xa": "down", "dnd": "busy"}


@dataclass(frozen=True)
class Addressed:
    """A room message's command, and whether it went to every gateway (`all:`) or to us alone."""

    text: str
    everyone: bool


@dataclass(frozen=True)
class Member:
    """One gateway of a fleet as seen from one room."""

    nick: str  # "" when it is not in the room
    jid: str
    show: str  # ok, problems, down, busy, or absent
    status: str
    me: bool = False


def nick_for(name: str, aliases: Iterable[str] = ()) -> str:
    """A room nick from `[gateway] name`: `Boiler room` → `boiler-room`.

    Lower case, so two sites named `Greenhouse` and `greenhouse` clash at the
    room (and get a suffix) instead of both answering `greenhouse:`.
    """
    nick = re.sub(r"[^\w.-]+", "-", name.strip().lower())
    nick = re.sub(r"-{2,}", "-", nick).strip("-_.")[:NICK_MAX].rstrip("-_.") or "gw"
    if nick in {a.lower() for a in aliases}:
        nick += "-gw"
    return nick


def addressed(body: str, nick: str, aliases: Iterable[str]) -> Addressed | None:
    """The command in `nick: read x` / `nick, read x` / `all: read x`, or None when not for us."""
    low = body.lower()
    for name, everyone in [(nick, False), *((a, True) for a in aliases)]:
        n = len(name)
        if low[:n] == name.lower() and body[n:n + 1] in (":", ","):
            return Addressed(body[n + 1:].strip(), everyone)
    return None


def concerns(hub: Hub, text: str) -> bool:
    """Whether this gateway has something to say to a fleet-wide command: False when
    the command names a device it does not have (`read boiler.temp` on the greenhouse)."""
    words = text.split()
    if len(words) < 2 or words[0].lower() not in DEVICE_COMMANDS:
        return True
    device = words[1].split(".", 1)[0]
    return device in hub.nodes


def delay(nick: str, nicks: Iterable[str], window: float | None = None) -> float:
    """Seconds to wait before answering a fleet-wide command: the gateways take turns in
    the order of their nicks, each at a random point of the first part of its own slot."""
    window = WINDOW if window is None else window
    order = sorted({n.lower() for n in nicks} | {nick.lower()})
    slot = window / len(order)
    return slot * (order.index(nick.lower()) + random.uniform(0, JITTER))


def overview(room: str, members: list[Member]) -> str:
    """The `fleet` reply for one room: a title line, then per gateway a row (nick, state)
    within a phone's width and its status text under it."""
    here = [m for m in members if m.show != "absent"]
    ok = sum(1 for m in here if m.show == "ok")
    members = sorted(members, key=lambda m: (m.nick or "~" + m.jid).lower())
    rows = [(m.nick or m.jid, m.show, "(this gateway)" if m.me else "") for m in members]
    lines = fit(rows, notes=[m.status for m in members])
    return "\n".join([f"Fleet in {room}: {len(here)}/{len(members)} gateways here, {ok} OK", *lines])
