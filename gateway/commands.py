"""The chat command engine, shared by XMPP chat and the console.

`Commands.run(text, actor)` returns the reply text. Every command has a
minimum role; a refusal says which role it needs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .auth import Actor, Forbidden, Permission, allowed, require
from .hub import Field, Hub, HubError, Node
from .values import BadValue, age, fmt

MAX_COMMAND = 1024
HISTORY_DEFAULT = 10
HISTORY_MAX = 100


@dataclass(frozen=True)
class Command:
    """One chat command: its handler, the permission it needs, and its help line."""

    name: str
    perm: Permission
    usage: str
    about: str
    handler: Callable[["Commands", list[str], Actor], Awaitable[str]]
    # False where the hub authorizes (and audits) the action itself, as for writes.
    precheck: bool = True


class Commands:
    """Parses one line of chat and answers it from the hub."""

    def __init__(self, hub: Hub, name: str = "IoT gateway"):
        self.hub = hub
        self.name = name

    async def run(self, text: str, actor: Actor) -> str:
        """Answer one command line on behalf of `actor`."""
        if len(text) > MAX_COMMAND:
            return f"Command too long (over {MAX_COMMAND} characters)."
        words = text.split()
        if not words:
            return "Type help for the list of commands."
        cmd = COMMANDS.get(words[0].lower())
        if cmd is None:
            return f"Unknown command {_clip(words[0])!r}. Type help for the list of commands."
        try:
            if cmd.precheck:
                require(actor, cmd.perm)
            return await cmd.handler(self, words[1:], actor)
        except Forbidden as e:
            return f"Refused: {e}."
        except (HubError, BadValue) as e:
            return f"Error: {e}."
        except UsageError as e:
            return f"{e}. Usage: {cmd.usage}"

    # ------------------------------------------------------------ commands

    async def help(self, args: list[str], actor: Actor) -> str:
        lines = [f"{self.name} commands (you are {actor.role}):"]
        for c in COMMANDS.values():
            if allowed(actor.role, c.perm):
                lines.append(f"  {c.usage} — {c.about}")
        return "\n".join(lines)

    async def status(self, args: list[str], actor: Actor) -> str:
        nodes = list(self.hub.nodes.values())
        ok = sum(1 for n in nodes if n.health.healthy)
        lines = [f"{self.name}: {ok}/{len(nodes)} devices OK"]
        now = time.time()
        for n in nodes:
            seen = f", last data {age(now - n.last_seen)} ago" if n.last_seen else ""
            lines.append(f"  {n.id}: {n.health.describe()}{seen}")
        return "\n".join(lines)

    async def list(self, args: list[str], actor: Actor) -> str:
        if not self.hub.nodes:
            return "No devices configured."
        lines = []
        for n in self.hub.nodes.values():
            lines.append(f"{n.id} ({n.driver}{', ' + n.name if n.name != n.id else ''}):")
            for f in n.fields.values():
                lines.append(f"  {f.ref} — {_describe(f)}")
        return "\n".join(lines)

    async def read(self, args: list[str], actor: Actor) -> str:
        if len(args) > 1:
            raise UsageError("Too many arguments")
        now = time.time()
        if not args:
            fields = [f for n in self.hub.nodes.values() for f in n.fields.values()]
            if not fields:
                return "No devices configured."
            return "\n".join(_reading_line(f, now) for f in fields)
        target = args[0]
        if "." in target:
            return _reading_line(self.hub.field(target), now)
        node = self.hub.node(target)
        return "\n".join(_reading_line(f, now) for f in node.fields.values())

    async def set(self, args: list[str], actor: Actor) -> str:
        if len(args) < 2:
            raise UsageError("Say which field and which value")
        ref, raw = args[0], " ".join(args[1:])
        old, value = await self.hub.write(ref, raw, actor)
        f = self.hub.field(ref)
        unit = f" {f.spec.unit}" if f.spec.unit else ""
        return f"{ref}: {fmt(old, f.spec.decimals)} → {fmt(value, f.spec.decimals)}{unit}"

    async def history(self, args: list[str], actor: Actor) -> str:
        if not args or len(args) > 2:
            raise UsageError("Say which field")
        f = self.hub.field(args[0])
        n = HISTORY_DEFAULT
        if len(args) == 2:
            if not args[1].isdigit() or not 1 <= int(args[1]) <= HISTORY_MAX:
                raise UsageError(f"The count must be a whole number from 1 to {HISTORY_MAX}")
            n = int(args[1])
        readings = list(f.history)[-n:]
        if not readings:
            return f"{f.ref}: no readings yet."
        unit = f" {f.spec.unit}" if f.spec.unit else ""
        now = time.time()
        lines = [f"{f.ref}: last {len(readings)} of {len(f.history)} readings"]
        nums = [r.value for r in readings if isinstance(r.value, (int, float)) and not isinstance(r.value, bool)]
        if nums:
            d = f.spec.decimals
            lines.append(
                f"  min {fmt(min(nums), d)}, avg {fmt(statistics.fmean(nums), d)},"
                f" max {fmt(max(nums), d)}{unit}"
            )
        for r in reversed(readings):
            lines.append(f"  {fmt(r.value, f.spec.decimals)}{unit}  ({age(now - r.time)} ago)")
        return "\n".join(lines)


class UsageError(Exception):
    """A command given the wrong arguments."""


def _clip(text: str, n: int = 30) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _describe(f: Field) -> str:
    s = f.spec
    parts = [s.type]
    if s.unit:
        parts.append(s.unit)
    if s.writable:
        rng = ""
        if s.min is not None or s.max is not None:
            rng = f" {fmt(s.min) if s.min is not None else ''}..{fmt(s.max) if s.max is not None else ''}"
        parts.append("writable" + rng)
    return ", ".join(parts)


def _reading_line(f: Field, now: float) -> str:
    node: Node = f.node
    flag = "" if node.health.healthy else f" [{node.health.describe()}]"
    if f.latest is None:
        return f"{f.ref}: no reading yet{flag}"
    unit = f" {f.spec.unit}" if f.spec.unit else ""
    value = fmt(f.latest.value, f.spec.decimals)
    return f"{f.ref} = {value}{unit} ({age(now - f.latest.time)} ago){flag}"


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command("help", Permission.READ, "help", "this list", Commands.help),
        Command("status", Permission.READ, "status", "device health", Commands.status),
        Command("list", Permission.READ, "list", "devices and their fields", Commands.list),
        Command(
            "read", Permission.READ, "read [device[.field]]", "latest values", Commands.read
        ),
        Command(
            "set",
            Permission.SET,
            "set device.field value",
            "switch or set a writable field (on/off, a number, text)",
            Commands.set,
            precheck=False,
        ),
        Command(
            "history",
            Permission.READ,
            "history device.field [n]",
            f"the last n readings (default {HISTORY_DEFAULT}) with min/avg/max",
            Commands.history,
        ),
    ]
}
