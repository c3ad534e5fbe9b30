"""The chat command engine, shared by XMPP chat, rooms and the console.

`Commands.run(text, actor)` returns the reply text. Every command has a
minimum role; a refusal says which role it needs. Replies are plain text with
rows aligned by spaces and no XEP-0393 markup around them (gateway/rows.py,
docs/replies.md): they read the same in every client and aloud.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .audit import Entry
from .auth import ROLE_NEEDED, Actor, Forbidden, Permission, allowed, require
from . import help as helps
from .hub import Field, Hub, HubError, Node, Written
from .export import buckets as csv_buckets, readings as csv_readings
from .plot import MAX_FIELDS, SPARK_WIDTH, NoPicture, PlotError, Plots, Series, check_fields, history_spark, spark
from .reverts import Reverts
from .rollups import NAMES, BadWindow, Bucket, Window, is_window, parse_window
from .rows import WIDTH, ago, fit, wrap
from .values import BadValue, Value, age, clip, coerce, fmt, parse_duration
from .watches import Watches, WatchError

if TYPE_CHECKING:
    from .history import HistoryStore

MAX_COMMAND = 1024
QUOTED = 31  # characters of an unknown word or a bad value quoted back
HISTORY_DEFAULT = 10
HISTORY_MAX = 100
HISTORY_SHOWN = 5  # readings listed under a windowed history summary
LOG_DEFAULT = 10
MAX_TIMED = 7 * 86400.0  # longest `set ... for D`
PLOT_DEFAULT = "24h"
PLOT_MAX = 10 * 365 * 86400.0  # longest `plot` window
HISTORY_ROWS = 100  # rows a `by` history lists at most
STORE_ROWS = 2000  # rows a history summary reads at most (the summary itself is exact whatever the rows)
PLOT_ROWS = 720  # buckets a long plot draws (about one per pixel column)
EXPORT_ROWS = 50_000  # rows an export holds at most (about 2.5 MB of CSV)
EXPORT_INLINE = 20  # CSV rows shown in the chat when no file can be sent
PROGRESS_AFTER = 1.0  # seconds a set may take before the contact hears "sent, waiting for the device"

audit_log = logging.getLogger("iot_gateway.audit")
log = logging.getLogger("iot_gateway.commands")

# An interim message to whoever ran the command (chat, a room, the console), before its reply.
Progress = Callable[[str], Awaitable[None]]
_progress: ContextVar[Progress | None] = ContextVar("progress", default=None)
# Called by a command whose rest (a plot's upload) may run beside the contact's next commands.
Aside = Callable[[], None]
_aside: ContextVar[Aside | None] = ContextVar("aside", default=None)


@dataclass(frozen=True)
class Command:
    """One chat command: its handler, the permission it needs, and its help line (`usage — about`,
    60 characters at most; the details are its page in gateway/help.py)."""

    name: str
    perm: Permission
    usage: str  # the short form, also quoted by a usage error
    about: str
    handler: Callable[["Commands", list[str], Actor], Awaitable[str]]
    # False where the hub authorizes (and audits) the action itself, as for writes.
    precheck: bool = True
    # Only reads, so an XEP-0308 correction may run it again (gateway/xmpp/phone.py).
    # Off unless said: a new command is not re-run by an edit by default.
    repeatable: bool = False
    # Its first argument names a device (or device.field): in a room, a gateway without it stays quiet.
    device: bool = False
    # The optional part it needs (an attribute of Commands: "watches", "fleet", "omemo"): without it,
    # the command does not exist (unknown, and not in help).
    needs: str | None = None


class UsageError(Exception):
    """A command given the wrong arguments."""


class Commands:
    """Parses one line of chat and answers it from the hub."""

    def __init__(
        self,
        hub: Hub,
        name: str = "IoT gateway",
        watches: Watches | None = None,
        reverts: Reverts | None = None,
    ):
        self.hub = hub
        self.name = name
        self.watches = watches
        self.reverts = reverts
        self.plots = Plots()  # the XMPP session gives it an uploader
        self.fleet: Callable[[], str] | None = None  # the rooms' fleet overview (gateway/xmpp/fleet.py)
        self.omemo: OmemoAdmin | None = None  # OMEMO devices and trust (gateway/xmpp/omemo.py), when on
        # Contacts the XMPP session cannot reach (their server down, …), one line each: for admins.
        self.unreachable: Callable[[], list[str]] | None = None
        self.notes: list[str] = []  # `status` ends with these: the GPIO pin factory, features off for want of a package
        # The address of the ad-hoc commands (the XMPP session's full JID), named by `help`.
        self.adhoc: Callable[[], str] | None = None
        self.store: "HistoryStore | None" = None  # history.db's readings and rollups, for long windows

    async def run(
        self, text: str, actor: Actor, progress: Progress | None = None, aside: Aside | None = None
    ) -> str:
        """Answer one command line on behalf of `actor`.

        `progress` sends an interim message: a `set` still waiting for its device after PROGRESS_AFTER
        seconds says so through it before the final reply. `aside` is called by a command
        that has read all it needs and goes on with slow work of its own (a plot's upload):
        from then on the caller may run the contact's next command beside it.
        """
        if len(text) > MAX_COMMAND:
            return f"Command too long (over {MAX_COMMAND} characters)."
        words = text.split()
        if not words:
            return "Type help for the list of commands."
        cmd = COMMANDS.get(words[0].lower())
        if cmd is None or not self.offers(cmd):
            return f"Unknown command {clip(words[0], QUOTED)!r}. Type help for the list of commands."
        try:
            if cmd.precheck:
                require(actor, cmd.perm)
            token, beside = _progress.set(progress), _aside.set(aside)
            try:
                reply = await cmd.handler(self, words[1:], actor)
            finally:
                _progress.reset(token)
                _aside.reset(beside)
        except Forbidden as e:
            return f"Refused: {e}."
        except (HubError, BadValue, WatchError, PlotError) as e:
            return f"Error: {str(e).rstrip('.')}."
        except UsageError as e:
            return f"{e}. Usage: {cmd.usage} (more: help {cmd.name})"
        return reply  # a Picture is the bare URL, so clients show the picture inline

    def offers(self, cmd: Command) -> bool:
        """Whether this gateway has the part `cmd` needs (watches, a fleet, OMEMO), if any."""
        return cmd.needs is None or getattr(self, cmd.needs) is not None

    # ------------------------------------------------------------ commands

    async def help(self, args: list[str], actor: Actor) -> str:
        if len(args) > 1:
            raise UsageError("Give one command")
        mine = [c for c in COMMANDS.values() if allowed(actor.role, c.perm) and self.offers(c)]
        if not args:
            title = f"{self.name} commands (you are {actor.role}):"
            adhoc = self.adhoc() if self.adhoc is not None else None
            return helps.listing(title, [(c.usage, c.about) for c in mine], "read", adhoc)
        cmd = COMMANDS.get(args[0].lower())
        if cmd is None or not self.offers(cmd):
            return helps.unknown(clip(args[0], QUOTED), [c.name for c in mine])
        require(actor, cmd.perm)  # a viewer learns set's role, as running it would say, not its details
        return helps.page(cmd.name, cmd.about, ROLE_NEEDED[cmd.perm])

    async def status(self, args: list[str], actor: Actor) -> str:
        nodes = list(self.hub.nodes.values())
        ok = sum(1 for n in nodes if n.health.healthy)
        lines = [f"{self.name}: {ok}/{len(nodes)} devices OK"]
        now = time.time()
        # One row per device (state, when data last came), the reason wrapped under it.
        rows = [(n.id, n.health.state.value, f"data {ago(n.silent_for())}" if n.seen_at is not None else "no data yet") for n in nodes]
        lines += fit(rows, notes=[n.health.reason for n in nodes])
        if self.reverts and self.reverts.pending:
            for r in self.reverts.pending.values():
                lines.append(r.describe(now))
        unsaved = [e for e in (self.watches and self.watches.unsaved, self.reverts and self.reverts.unsaved) if e]
        for reason in dict.fromkeys(e.reason for e in unsaved):
            lines.append(f"NOT saving state: {reason}")
        # `history: not saved: …`; the state folder's trouble is the NOT saving line above.
        lines.extend(p.describe() for p in self.hub.problems.values() if p.component != "state" or not unsaved)
        lines.extend(self.hub.noise.lines())
        if self.unreachable is not None and actor.role == "admin":
            lines.extend(self.unreachable())
        lines.extend(self.notes)
        if self.store is not None and actor.role == "admin":
            lines.append(self.store.disk())
        return "\n".join(lines)

    async def list(self, args: list[str], actor: Actor) -> str:
        if not self.hub.nodes:
            return "No devices configured."
        count = len(self.hub.nodes)
        lines = [f"{count} device{'' if count == 1 else 's'}:"]
        for n in self.hub.nodes.values():
            lines += wrap(f"{n.id} ({n.driver}{', ' + n.name if n.name != n.id else ''})", "  ")
            lines += fit([(f.name, _describe(f), "") for f in n.fields.values()], indent="  ")
        return "\n".join(lines)

    async def read(self, args: list[str], actor: Actor) -> str:
        if len(args) > 1:
            raise UsageError("Too many arguments")
        now = time.time()
        if not args:
            fields = [f for n in self.hub.nodes.values() for f in n.fields.values()]
            if not fields:
                return "No devices configured."
            lines = [f"{len(fields)} values:"]
            for n in self.hub.nodes.values():
                if n.fields:  # a heading with its health, so an unhealthy device's values stand flagged
                    lines += wrap(f"{n.id}: {n.health.describe()}", "  ")
                    lines += fit(_readings(list(n.fields.values()), now), indent="  ", right=True)
            return "\n".join(lines)
        target = args[0]
        if "." in target:
            return _reading_line(self.hub.field(target), now)
        node = self.hub.node(target)
        rows = fit(_readings(list(node.fields.values()), now), right=True)
        return f"{node.id}: {node.health.describe()}\n" + "\n".join(rows)

    async def set(self, args: list[str], actor: Actor) -> str:
        seconds = None
        typed = ""  # the duration as given
        then: str | None = None
        lower = [a.lower() for a in args]
        if "then" in lower[4:]:  # `set REF VALUE for D then VALUE`: a value may hold spaces, so the last `then`
            i = len(lower) - 1 - lower[::-1].index("then")
            if lower[i - 2] == "for":
                then, args = " ".join(args[i + 1:]), args[:i]
                if not then:
                    raise UsageError("Say which value to go back to after `then`")
        if len(args) >= 4 and args[-2].lower() == "for":
            if self.reverts is None:
                raise UsageError("Timed sets need the gateway's state folder")
            typed = args[-1]
            seconds = parse_duration(typed)
            if seconds > MAX_TIMED:
                raise BadValue(f"{args[-1]} is longer than the 7 days a timed set may last")
            args = args[:-2]
        if len(args) < 2:
            raise UsageError("Say which field and which value")
        ref, raw = args[0], " ".join(args[1:])
        back: Value | None = None
        if seconds is not None and self.reverts is not None:
            # Where it goes back to is known before anything switches, or nothing does.
            self.hub.authorize(actor, [(ref, raw)])
            value = self.hub.value(ref, raw, actor)
            back = self.hub.value(ref, then, actor) if then is not None else self.reverts.origin(ref, value)
            if back is None:
                self.hub.refuse(actor, [(ref, raw)], "timed set with no earlier value to go back to")
                raise BadValue(
                    f"no earlier value of {ref} to go back to: give one, e.g. "
                    f"`set {ref} {clip(raw, QUOTED)} for {typed} then {_example(self.hub.field(ref))}`"
                )
        written = await self._write(ref, raw, actor)
        old, value = written
        f = self.hub.field(ref)
        unit = f" {f.spec.unit}" if f.spec.unit else ""
        if written.sent:  # nothing reports the device's state: say what was sent, claim no change
            text = f"{ref}: {fmt(value, f.spec.decimals)}{unit} sent"
        else:
            text = f"{ref}: {fmt(old, f.spec.decimals)} → {fmt(value, f.spec.decimals)}{unit}"
        # The hub's write already cancelled a pending revert of the field (as for every entry point).
        replaced = self.reverts.taken(f.ref, actor) if self.reverts is not None else None
        if seconds is not None and self.reverts is not None:
            self.reverts.add(ref, back, seconds, actor)
            text += f", back to {fmt(back, f.spec.decimals)} in {age(seconds)}"
            if self.reverts.unsaved:
                text += ", but " + self.reverts.unsaved.note("a restart before then would forget to go back")
        elif self.reverts is not None and replaced is not None:
            text += " (the pending timed revert is cancelled"
            if self.reverts.unsaved:
                text += ", but " + self.reverts.unsaved.note("after a restart it would still run")
            text += ")"
        return text

    async def _write(self, ref: str, raw: str, actor: Actor) -> Written:
        """The hub's write; one still under way after PROGRESS_AFTER seconds (the command went
        out, the device has yet to report its new state) is told through the progress callback."""
        progress = _progress.get()
        if progress is None:
            return await self.hub.write(ref, raw, actor)
        write = asyncio.ensure_future(self.hub.write(ref, raw, actor))
        try:
            done, _pending = await asyncio.wait({write}, timeout=PROGRESS_AFTER)
            if not done:
                await _tell(progress, f"{_sent(self.hub.field(ref), raw)} sent, waiting for the device…")
            return await write
        except asyncio.CancelledError:
            write.cancel()
            raise

    async def history(self, args: list[str], actor: Actor) -> str:
        if not args or len(args) > 4:
            raise UsageError("Say which field")
        f = self.hub.field(args[0])
        now = time.time()
        unit = f" {f.spec.unit}" if f.spec.unit else ""
        d = f.spec.decimals
        if len(args) >= 2 and not args[1].isdigit():
            w = parse_window(args[1:], now)
            plain = len(args) == 2 and ".." not in args[1]  # the last 15m, 6h, …: memory may hold it all
            if self.store is not None and not (plain and await self._from_memory(f, w)):
                return await self._history_stored(f, w, now)
            if not plain:
                raise UsageError(f"{' '.join(args[1:])[:40]} needs history.db (a gateway with a state folder)")
            window = w.end - w.start
            readings = [r for r in f.history if r.time >= now - window]
            if not readings:
                return f"{f.ref}: no readings in the last {args[1]}."
            title = f"{f.ref} over the last {args[1]}: {len(readings)} readings"
            shown = readings[-HISTORY_SHOWN:]
            start, end = now - window, now
        else:
            n = HISTORY_DEFAULT
            if len(args) == 2:
                if not 1 <= int(args[1]) <= HISTORY_MAX:
                    raise UsageError(f"The count must be a whole number from 1 to {HISTORY_MAX}")
                n = int(args[1])
            readings = list(f.history)[-n:]
            if not readings:
                return f"{f.ref}: no readings yet."
            title = f"{f.ref}: last {len(readings)} of {len(f.history)} readings"
            shown = readings
            start, end = readings[0].time, readings[-1].time
        lines = [title]
        line = history_spark(f, start, end)
        if line:  # a sparkline on top
            lines.append(line)
        nums = [r.value for r in readings if isinstance(r.value, (int, float)) and not isinstance(r.value, bool)]
        if nums:
            lines.append(
                f"min {fmt(min(nums), d)}, avg {fmt(statistics.fmean(nums), d)},"
                f" max {fmt(max(nums), d)}, last {fmt(readings[-1].value, d)}{unit}"
            )
        for r in reversed(shown):
            lines.append(f"{fmt(r.value, d):>10}{unit}  {age(now - r.time)} ago")
        return "\n".join(lines)

    async def _history_stored(self, f: Field, w: Window, now: float) -> str:
        """A window answered from history.db: which resolution, the real span, the exact summary, rows."""
        assert self.store is not None
        ans = await self.store.answer(f, w, HISTORY_ROWS if w.by else STORE_ROWS)
        s = ans.summary
        d = f.spec.decimals
        unit = f" {f.spec.unit}" if f.spec.unit else ""
        if s.n == 0:
            return f"{f.ref}: no readings in {w.label}" + (f"; data since {_day(ans.since)}." if ans.since < now else ".")
        lines = [f"{f.ref}: {w.label} at {NAMES[ans.res]} resolution, {len(ans.rows)} rows;"
                 f" data since {_day(max(ans.since, s.t_first))}"]
        kept = self.store.kept_from(now)
        if w.start < kept:
            lines.append(f"(nothing is kept from before {_day(kept)})")
        means = [(b.t, b.mean) for b in ans.rows if b.mean is not None]
        if len(means) >= 2:
            line = spark([t for t, _ in means], [m for _, m in means], ans.rows[0].t, w.end,
                         min(SPARK_WIDTH, len(means)), gap=ans.res * 1.5)
            lines.append(line)
        if s.mean is not None:
            lines.append(f"min {fmt(s.lo, d)} at {_when(s.t_lo)}")
            lines.append(f"max {fmt(s.hi, d)} at {_when(s.t_hi)}")
            lines.append(f"mean {fmt(s.mean, d)}, last {fmt(s.last, d)}{unit}; {s.n} readings")
        else:
            lines.append(f"{s.n} readings, {s.changes} changes, last {fmt(s.last, d)}{_share(s)}")
        shown = ans.rows if w.by else ans.rows[-HISTORY_SHOWN:]
        if w.by and len(shown) > HISTORY_ROWS:
            lines.append(f"the last {HISTORY_ROWS} of {len(shown)} rows:")
            shown = shown[-HISTORY_ROWS:]
        if shown and s.mean is not None:
            lines.append(f"{'UTC':<11}{'min':>9}{'mean':>9}{'max':>9}")
            for b in reversed(shown):
                lines.append(f"{_stamp(b.t, ans.res):<11}{fmt(b.lo, d):>9}{fmt(b.mean, d):>9}{fmt(b.hi, d):>9}")
        else:
            for b in reversed(shown):
                lines.append(f"{_stamp(b.t, ans.res):<11} {b.n:>5} read, last {fmt(b.last, d)}"[:WIDTH])
        return "\n".join(lines)

    async def plot(self, args: list[str], actor: Actor) -> str:
        words = [PLOT_DEFAULT]
        if len(args) >= 2 and args[-2].lower() == "since":
            words, args = args[-2:], args[:-2]
        elif args and (".." in args[-1] or args[-1][:1].isdigit() and not _is_field(args[-1])):
            if args[-1].replace(".", "").isdigit():
                raise UsageError("Give the window with its unit, like 15m, 6h or 2d")
            words, args = args[-1:], args[:-1]
        now = time.time()
        w = parse_window(words, now)
        label = w.label
        window = w.end - w.start
        if not 60 <= window <= PLOT_MAX and w.end == now:
            raise UsageError("The window must be from 1m to 10y")
        if not args:
            raise UsageError("Say which field")
        refs = list(dict.fromkeys(args))
        if len(refs) > MAX_FIELDS:
            raise UsageError(f"At most {MAX_FIELDS} fields in one plot")
        fields = [self.hub.field(ref) for ref in refs]
        check_fields(fields)
        series = None
        if self.store is not None and (w.end < now or not all([await self._from_memory(f, w) for f in fields])):
            series = [await self._buckets(f, w) for f in fields]
        return await self.plots.answer(fields, window, label, actor, self.watches, _aside.get(), series, w.end)

    async def _from_memory(self, f: Field, w: Window) -> bool:
        """Memory answers a window it reaches back to, or when history.db holds nothing older than it:
        a young gateway's readings in memory are all there is."""
        first = f.history[0].time if f.history else math.inf
        return _in_memory(f, w) or (self.store is not None and await self.store.oldest(f) >= first)

    async def _buckets(self, f: Field, w: Window) -> Series:
        """A field's rollups over a window, as a plot's mean line and min–max band."""
        assert self.store is not None
        ans = await self.store.answer(f, w, PLOT_ROWS)
        rows = [b for b in ans.rows if b.n]
        boolean = f.spec.type == "boolean"
        if boolean:
            rows = [b for b in rows if b.states]
            on = [b.states.get("true", 0.0) / (sum(b.states.values()) or 1.0) for b in rows]  # type: ignore[union-attr]
            return Series(f.ref, f.spec.unit, [b.t for b in rows], on, True, f.spec.decimals, gap=ans.res * 1.5)
        rows = [b for b in rows if b.mean is not None]
        return Series(f.ref, f.spec.unit, [b.t + ans.res / 2 for b in rows], [b.level for b in rows],  # type: ignore[misc]
                      False, f.spec.decimals, lows=[b.lo for b in rows], highs=[b.hi for b in rows],
                      gap=ans.res * 1.5)

    async def export(self, args: list[str], actor: Actor) -> str:
        """A field's readings (or buckets) over a window as a CSV file, through the plot's upload path."""
        if len(args) < 2:
            raise UsageError("Say which field and which window")
        f = self.hub.field(args[0])
        now = time.time()
        w = parse_window(args[1:], now)
        if self.store is None or (await self._from_memory(f, w) and w.by is None):
            head, rows = csv_readings(*f.history.since(w.start), w.end)
            rows, what = rows[-EXPORT_ROWS:], "readings"
        else:
            ans = await self.store.answer(f, w, EXPORT_ROWS)
            head, rows = csv_buckets([b for b in ans.rows if b.n][-EXPORT_ROWS:])
            what = f"{NAMES[ans.res]} rows"
        if not rows:
            return f"{f.ref}: no readings in {w.label}."
        aside = _aside.get()
        if aside is not None:
            aside()
        data = "\n".join([head, *rows, ""]).encode()
        try:
            if self.plots.uploads is None:
                raise NoPicture(self.plots.no_uploads)
            await self.plots.uploads.ready()
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
            return await self.plots.uploads.upload(data, f"{f.ref}-{stamp}.csv", "text/csv")
        except NoPicture as e:
            shown = rows[-EXPORT_INLINE:]
            more = f", the last {len(shown)} of {len(rows)}" if len(rows) > len(shown) else ""
            return "\n".join([f"No file: {str(e).rstrip('.')}. {f.ref}, {w.label}, {what}{more}:", head, *shown])

    async def watch(self, args: list[str], actor: Actor) -> str:
        assert self.watches is not None
        w = self.watches.add(self.watches.parse(actor.jid, args))
        state = " (firing now)" if w.firing else ""
        if self.watches.unsaved:
            state += ", but " + self.watches.unsaved.note("it will be lost on restart")
        return f"Watch #{w.id} set: {w.describe()}{state}. Remove it with: unwatch {w.id}"

    async def watches_(self, args: list[str], actor: Actor) -> str:
        assert self.watches is not None
        ws = self.watches.visible(actor.jid, actor.role == "admin")
        if not ws:
            return "No watches. Add one like: watch device.field > 30"
        states = []  # under each watch's row: a phone's line holds the condition, not its state too
        for w in ws:
            state = "FIRING" + (" (acked)" if w.acked else "") if w.firing else "ok"
            if self.watches.missing(w.id):  # its device or field went away (a Zigbee device removed)
                state = "waiting: the device or field is gone"
            states.append(state + (f", of {w.owner}" if w.owner != actor.jid else ""))
        rows = [(f"#{w.id}", w.describe(), "") for w in ws]
        return "\n".join([f"{len(ws)} watches:", *fit(rows, notes=states)])

    async def unwatch(self, args: list[str], actor: Actor) -> str:
        assert self.watches is not None
        w = self.watches.remove(_watch_id(args), actor.jid, actor.role == "admin")
        if self.watches.unsaved:
            return f"Watch #{w.id} removed: {w.describe()}, but " + self.watches.unsaved.note("it will be back after a restart")
        return f"Watch #{w.id} removed: {w.describe()}"

    async def ack(self, args: list[str], actor: Actor) -> str:
        assert self.watches is not None
        w = self.watches.ack(_watch_id(args), actor.jid, actor.role == "admin")
        if self.watches.unsaved:
            return f"Watch #{w.id} acknowledged: silent until it clears, but " + self.watches.unsaved.note(
                "it will alert again after a restart"
            )
        return f"Watch #{w.id} acknowledged: silent until it clears."

    async def log(self, args: list[str], actor: Actor) -> str:
        if len(args) > 1:
            raise UsageError("Too many arguments")
        entries = list(self.hub.audit.entries)
        if args:
            target = args[0]
            if "." in target:
                self.hub.field(target)
                entries = [e for e in entries if e.ref == target]
            else:
                self.hub.node(target)
                entries = [e for e in entries if e.ref.split(".", 1)[0] == target]
        entries = entries[-LOG_DEFAULT:]
        if not entries:
            return "No actuator changes recorded" + (f" for {args[0]}." if args else ".")
        now = time.time()
        entries.reverse()
        # The change on the row, who asked (and why a set was refused or failed) under it.
        rows = [(e.ref, _change(e), ago(now - e.time)) for e in entries]
        notes = [f"by {e.actor.jid} via {e.actor.via}" + (f": {e.reason}" if e.reason else "") for e in entries]
        return "\n".join([f"Last {len(entries)} actuator changes and attempts:", *fit(rows, notes=notes)])


    async def fleet_(self, args: list[str], actor: Actor) -> str:
        assert self.fleet is not None
        return self.fleet()

    async def devices(self, args: list[str], actor: Actor) -> str:
        assert self.omemo is not None
        try:
            return await self.omemo.devices(args[:1])
        except (ValueError, RuntimeError) as e:  # omemo.TrustError, omemo.OmemoUnavailable
            return f"Error: {str(e).rstrip('.')}."

    async def trust(self, args: list[str], actor: Actor) -> str:
        return await self._trust(args, actor, True)

    async def distrust(self, args: list[str], actor: Actor) -> str:
        return await self._trust(args, actor, False)

    async def _trust(self, args: list[str], actor: Actor, trusted: bool) -> str:
        assert self.omemo is not None
        what = "trust" if trusted else "distrust"
        try:
            reply = await self.omemo.trust(args, trusted)
        except (ValueError, RuntimeError) as e:
            return f"Error: {str(e).rstrip('.')}."
        # Who may read the gateway's answers is a security decision: say who made it.
        audit_log.info("%s via %s: OMEMO %s %s", actor.jid, actor.via, what, " ".join(args))
        return reply




class OmemoAdmin(Protocol):
    """What the OMEMO commands ask of gateway/xmpp/omemo.py (not imported here: it loads the crypto stack)."""

    async def devices(self, args: list[str]) -> str: ...

    async def trust(self, args: list[str], trusted: bool) -> str: ...


def _in_memory(f: Field, w: Window) -> bool:
    """Whether the readings in memory reach back to the window's start (then they answer it, every one)."""
    return bool(f.history) and f.history[0].time <= w.start


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def _stamp(t: float, res: int) -> str:
    """A bucket's start as short as its resolution allows (UTC): `2026-11-05`, `11-05 14:03`."""
    return time.strftime("%Y-%m-%d" if res >= 86400 else "%m-%d %H:%M", time.gmtime(t))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def _share(b: Bucket) -> str:
    """For on/off fields: the share of the time spent on."""
    if not b.states:
        return ""
    total = sum(b.states.values())
    on = b.states.get("true", 0.0)
    return f"; on {on / total:.0%} of the time" if total and set(b.states) <= {"true", "false"} else ""


def _is_field(word: str) -> bool:
    """Whether a word is a `device.field` rather than a window (device ids may start with a digit)."""
    try:
        parse_duration(word)
    except BadValue:
        return "." in word
    return False


def _watch_id(args: list[str]) -> int:
    if len(args) != 1 or not args[0].lstrip("#").isdigit():
        raise UsageError("Give the watch number, as listed by watches")
    return int(args[0].lstrip("#"))


async def _tell(progress: Progress, text: str) -> None:
    """Send an interim message; one that cannot go out only costs the contact the notice."""
    try:
        await progress(text)
    except Exception:
        log.exception("could not send the interim message %r", text)


def _sent(f: Field, raw: str) -> str:
    """`plug.relay: on`: the value a set sent, as the reply will show it (validated by the hub by now)."""
    try:
        value = fmt(coerce(f.spec.type, raw), f.spec.decimals)
    except BadValue:
        value = raw
    return f"{f.ref}: {value}" + (f" {f.spec.unit}" if f.spec.unit else "")


def _change(e: Entry) -> str:
    """`off → on`, `on sent`, or `refused (on)` (its reason goes under it, with who asked)."""
    if e.outcome == "applied":
        return f"{fmt(e.old)} → {fmt(e.new)}"
    if e.outcome == "sent":
        return f"{fmt(e.new)} sent"
    return f"{e.outcome} ({fmt(e.new)})"


TYPE_WORDS = {"numeric": "number", "integer": "integer", "boolean": "on/off", "string": "text"}


def _example(f: Field) -> str:
    """A value `f` may take, to show in a hint."""
    if f.spec.choices:
        return f.spec.choices[0]
    if f.spec.type == "string":
        return "VALUE"
    if f.spec.type == "boolean":
        return "off"
    return fmt(f.spec.min if f.spec.min is not None else 0)


def _describe(f: Field) -> str:
    """`number °C, writable 5..30`: the type as a user types values, the unit next to it."""
    s = f.spec
    parts = [TYPE_WORDS.get(s.type, s.type) + (f" {s.unit}" if s.unit else "")]
    if s.writable:
        rng = ""
        if s.min is not None or s.max is not None:
            rng = f" {fmt(s.min) if s.min is not None else ''}..{fmt(s.max) if s.max is not None else ''}"
        parts.append("writable" + rng)
    if s.choices:  # an enum (Zigbee2MQTT): the values a `set` takes
        parts.append("one of: " + " · ".join(s.choices))  # spaces, so a phone-width wrap can break it
    return ", ".join(parts)


def _value(f: Field) -> str:
    if f.latest is None:
        return "no reading yet"
    unit = f" {f.spec.unit}" if f.spec.unit else ""
    return f"{fmt(f.latest.value, f.spec.decimals)}{unit}"


def _flag(node: Node) -> str:
    return "" if node.health.healthy else f" [{node.health.describe()}]"


def _reading_line(f: Field, now: float) -> str:
    if f.latest is None:
        return f"{f.ref}: no reading yet{_flag(f.node)}"
    return f"{f.ref} = {_value(f)} ({ago(now - f.latest.time)}){_flag(f.node)}"


def _readings(fields: list[Field], now: float) -> list[tuple[str, str, str]]:
    """(field name, value with its unit, age) rows for `read`, under a heading naming the device."""
    return [(f.name, _value(f), ago(now - f.latest.time) if f.latest else "") for f in fields]


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command("help", Permission.READ, "help [COMMAND]", "this list, or a command's details", Commands.help, repeatable=True),
        Command("status", Permission.READ, "status", "device health, pending timed sets", Commands.status, repeatable=True),
        Command("list", Permission.READ, "list", "devices and their fields", Commands.list, repeatable=True),
        Command("read", Permission.READ, "read [device[.field]]", "latest values", Commands.read, repeatable=True, device=True),
        Command("set", Permission.SET, "set device.field value", "set a writable field", Commands.set,
                precheck=False, device=True),
        Command("history", Permission.READ, "history device.field [n | window]", "past readings, min/max",
                Commands.history, repeatable=True, device=True),
        Command("plot", Permission.READ, "plot device.field [window]", "a chart of readings", Commands.plot,
                repeatable=True, device=True),
        Command("export", Permission.SET, "export device.field window", "readings as a CSV file", Commands.export, device=True),
        Command("watch", Permission.READ, "watch device.field > 30", "a message when it happens", Commands.watch,
                device=True, needs="watches"),
        Command("watches", Permission.READ, "watches", "your watches and whether they fire", Commands.watches_, needs="watches"),
        Command("unwatch", Permission.READ, "unwatch ID", "remove a watch", Commands.unwatch, needs="watches"),
        Command("ack", Permission.READ, "ack ID", "silence a firing watch until it clears", Commands.ack, needs="watches"),
        Command("log", Permission.READ, "log [device[.field]]", "recent actuator changes", Commands.log, device=True),
        Command("fleet", Permission.READ, "fleet", "the gateways in this gateway's rooms", Commands.fleet_, needs="fleet"),
        Command("devices", Permission.ADMIN, "devices [JID]", "OMEMO devices and their trust", Commands.devices, needs="omemo"),
        Command("trust", Permission.ADMIN, "trust JID FINGERPRINT", "trust a contact's OMEMO device", Commands.trust,
                needs="omemo"),
        Command("distrust", Permission.ADMIN, "distrust JID FINGERPRINT", "distrust an OMEMO device", Commands.distrust,
                needs="omemo"),
    ]
}

# Derived from the entries above, for the doors: which commands an edit may re-run, which name a device.
REPEATABLE = frozenset(c.name for c in COMMANDS.values() if c.repeatable)
DEVICE_COMMANDS = frozenset(c.name for c in COMMANDS.values() if c.device)
