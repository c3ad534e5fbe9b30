"""Rollups of a field's readings at 1 minute, 1 hour and 1 day, and the windows that read them.

Every reading the hub gets (not only the ones thinned to `history_per_second` for the
disk) goes into the field's open 1-minute bucket; when a minute closes, its bucket is
merged into the open hour, an hour into the open day. A closed bucket becomes one row
for history.db, written with the next batch of readings. So extremes are exact at
every resolution: a bucket's min and max are those of every reading in it.

Buckets are aligned to UTC (a day is 00:00–24:00 UTC). A bucket never opens before
the end of the last one closed at its resolution (`floor`): a reading stamped earlier
(the clock stepped back, or a device's late stamp) counts in the open bucket, at the
bucket's start, so buckets are never reordered or rewritten; and a bucket never opens
before the end of a coarser one closed, so every minute lies inside its hour and day.

`plan` splits any window into whole buckets of the coarsest resolution that fits and
edges of finer ones, down to raw readings, so a window's min, max and count are those
of the readings in it.
"""

from __future__ import annotations

import calendar
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from .values import BadValue, Value

RES = (60, 3600, 86400)  # seconds per bucket, finest first
NAMES = {0: "raw", 60: "1-minute", 3600: "1-hour", 86400: "1-day"}
BY = {"minute": 60, "hour": 3600, "day": 86400}
HOLD = 86400.0  # longest a reading is taken to hold when no other follows (time in a state, time-weighted mean)
STATES_MAX = 16  # distinct states whose time is counted; more is a string field, not a state


def numeric(value: Value) -> bool:
    """True for numbers (not on/off)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Bucket:
    """What a field did in one bucket: count, extremes with their times, sums for the plain
    and the time-weighted mean, first/last, and for states the seconds in each and the changes."""

    __slots__ = ("t", "res", "n", "lo", "hi", "t_lo", "t_hi", "sum", "tw", "dur",
                 "first", "last", "t_first", "t_last", "changes", "states")

    def __init__(self, t: float, res: int):
        self.t = t
        self.res = res
        self.n = 0
        self.lo = math.inf
        self.hi = -math.inf
        self.t_lo = self.t_hi = t
        self.sum = 0.0
        self.tw = 0.0  # value × seconds, for the time-weighted mean
        self.dur = 0.0  # seconds covered by readings (from each to the next, or the bucket's end)
        self.first: Value = None
        self.last: Value = None
        self.t_first = self.t_last = t
        self.changes = 0
        self.states: dict[str, float] | None = None  # json(value) -> seconds

    @property
    def end(self) -> float:
        """Where the bucket ends."""
        return self.t + self.res

    @property
    def mean(self) -> float | None:
        """The plain mean of the numeric readings."""
        return self.sum / self.n if self.n and self.hi >= self.lo else None

    @property
    def level(self) -> float | None:
        """The time-weighted mean (each reading counted for as long as it held)."""
        return self.tw / self.dur if self.dur > 0 and self.hi >= self.lo else self.mean

    def _hold(self, until: float) -> None:
        """Count the last value as held from its time until `until`."""
        dt = until - self.t_last
        if dt <= 0 or self.n == 0:
            return
        self.dur += dt
        last = self.last
        if numeric(last):
            self.tw += float(last) * dt  # type: ignore[arg-type]
        elif self.states is not None:
            key = json.dumps(last)
            self.states[key] = self.states.get(key, 0.0) + dt

    def add(self, value: Value, t: float) -> None:
        """Count one reading (its time clamped into the bucket)."""
        last = self.last
        if (type(value) is float and type(last) is float and value - value == 0.0 and last - last == 0.0
                and self.t_last <= t < self.t + self.res):
            # The common case (a finite number after another, in order, in the bucket), on every
            # reading the hub gets: the same as below, without the calls.
            dt = t - self.t_last
            self.dur += dt
            self.tw += last * dt  # type: ignore[operator]
            if value != last:
                self.changes += 1
            self.n += 1
            self.last, self.t_last = value, t
            self.sum += value
            if value < self.lo:
                self.lo, self.t_lo = value, t
            if value > self.hi:
                self.hi, self.t_hi = value, t
            return
        t = min(max(t, self.t), self.end)
        if self.n:
            if t < self.t_last:
                t = self.t_last  # out of order within the bucket: held for no time
            self._hold(t)
            if value != self.last:
                self.changes += 1
        else:
            self.first, self.t_first = value, t
            if not numeric(value) and isinstance(value, (bool, str)):
                self.states = {}
        self.n += 1
        self.last, self.t_last = value, t
        if numeric(value):
            v = float(value)  # type: ignore[arg-type]
            self.sum += v
            if v < self.lo:
                self.lo, self.t_lo = v, t
            if v > self.hi:
                self.hi, self.t_hi = v, t
        if self.states is not None and len(self.states) > STATES_MAX:
            self.states = None

    def close(self) -> None:
        """The last value holds until the bucket's end."""
        self._hold(self.end)
        self.t_last = self.end

    def merge(self, b: "Bucket") -> None:
        """Fold a later bucket (already closed) into this one."""
        if b.n == 0:  # only the time a value held, between readings
            self.dur += b.dur
            self.tw += b.tw
            if self.states is not None and b.states is not None:
                for k, s in b.states.items():
                    self.states[k] = self.states.get(k, 0.0) + s
            return
        if self.n == 0:
            self.first, self.t_first = b.first, b.t_first
            self.states = None if b.states is None else {}
        elif b.first != self.last:
            self.changes += 1
        self.n += b.n
        self.changes += b.changes
        if b.lo < self.lo:
            self.lo, self.t_lo = b.lo, b.t_lo
        if b.hi > self.hi:
            self.hi, self.t_hi = b.hi, b.t_hi
        self.sum += b.sum
        self.tw += b.tw
        self.dur += b.dur
        self.last, self.t_last = b.last, b.t_last
        if self.states is not None and b.states is not None:
            for k, s in b.states.items():
                self.states[k] = self.states.get(k, 0.0) + s
        else:
            self.states = None

    def row(self, ref: str) -> tuple[Any, ...]:
        """The row for the `rollups` table."""
        has = self.hi >= self.lo
        return (ref, self.res, self.t, self.n, self.lo if has else None, self.hi if has else None,
                self.t_lo, self.t_hi, self.sum, self.tw, self.dur, json.dumps(self.first), json.dumps(self.last),
                self.t_first, self.t_last, self.changes, None if self.states is None else json.dumps(self.states))

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> "Bucket":
        """A bucket from a `rollups` row (without its ref)."""
        (res, t, n, lo, hi, t_lo, t_hi, s, tw, dur, first, last, t_first, t_last, changes, states) = row
        b = cls(t, res)
        b.n, b.t_lo, b.t_hi, b.sum, b.tw, b.dur = n, t_lo, t_hi, s, tw, dur
        if lo is not None:
            b.lo, b.hi = lo, hi
        b.first, b.last = json.loads(first), json.loads(last)
        b.t_first, b.t_last, b.changes = t_first, t_last, changes
        b.states = None if states is None else json.loads(states)
        return b

    def copy(self) -> "Bucket":
        """An independent copy (an open bucket as of now, for a query)."""
        b = Bucket(self.t, self.res)
        for name in Bucket.__slots__:
            setattr(b, name, getattr(self, name))
        if self.states is not None:
            b.states = dict(self.states)
        return b


COLUMNS = "res, t, n, lo, hi, t_lo, t_hi, sum, tw, dur, first, last, t_first, t_last, changes, states"
SCHEMA = """
CREATE TABLE IF NOT EXISTS rollups (
    ref TEXT NOT NULL, res INTEGER NOT NULL, t REAL NOT NULL,
    n INTEGER NOT NULL, lo REAL, hi REAL, t_lo REAL, t_hi REAL, sum REAL, tw REAL, dur REAL,
    first TEXT, last TEXT, t_first REAL, t_last REAL, changes INTEGER, states TEXT,
    PRIMARY KEY (ref, res, t)
) WITHOUT ROWID;
"""
UPSERT = f"INSERT OR REPLACE INTO rollups (ref, {COLUMNS}) VALUES ({', '.join('?' * 17)})"


class Roller:
    """A field's open buckets (one per resolution); `add` returns the buckets it closed."""

    __slots__ = ("open", "floor", "carry", "since")

    def __init__(self) -> None:
        self.open: list[Bucket | None] = [None, None, None]
        self.floor: list[float] = [-math.inf, -math.inf, -math.inf]  # end of the last closed bucket
        # The last value of the last closed minute, held from `since` until the next reading (at most HOLD).
        self.carry: Value = None
        self.since = math.inf

    def add(self, value: Value, t: float, out: list[Bucket]) -> None:
        """Count a reading; buckets it closes are appended to `out`."""
        m = self.open[0]
        if m is not None and t < m.end:
            m.add(value, t)
            return
        key = max(t - t % 60, *self.floor)  # never before a bucket closed at any resolution
        if m is not None and key > m.t:
            self._close(0, out)
        self._hold(key, out)
        m = self.open[0]
        if m is None:
            m = self.open[0] = Bucket(key, 60)
        m.add(value, t)

    def feed(self, level: int, b: Bucket, out: list[Bucket]) -> None:
        """Merge a closed finer bucket into this resolution's open one, closing it first when
        `b` belongs to a later bucket."""
        res = RES[level]
        key = max(b.t - b.t % res, *self.floor[level:])
        cur = self.open[level]
        if cur is not None and key > cur.t:
            self._close(level, out)
            cur = None
        if cur is None:
            cur = self.open[level] = Bucket(key, res)
        cur.merge(b)

    def _close(self, level: int, out: list[Bucket]) -> None:
        b = self.open[level]
        assert b is not None
        if level == 0:
            b.close()  # coarser buckets hold through their minutes and the carried pieces
        self.open[level] = None
        self.floor[level] = b.end
        out.append(b)
        if level == 0:
            self.carry, self.since = b.last, b.end
        if level + 1 < len(RES):
            self.feed(level + 1, b, out)

    def _hold(self, until: float, out: list[Bucket]) -> None:
        """Count the carried value as held from `since` to `until` (at most HOLD) in the hours and
        days it spans; minutes without readings get no row."""
        until = min(until, self.since + HOLD)
        t = self.since
        while t < until:
            piece = Bucket(t, 0)
            step = min(until, t - t % 3600 + 3600) - t
            piece.dur = step
            if numeric(self.carry):
                piece.tw = float(self.carry) * step  # type: ignore[arg-type]
            elif isinstance(self.carry, (bool, str)):
                piece.states = {json.dumps(self.carry): step}
            self.feed(1, piece, out)
            t += step
        self.since = max(self.since, until)

    def snapshot(self) -> list[Bucket]:
        """Copies of the open buckets as they would be closed now: each coarser one with the finer
        open ones merged in (a query's view; nothing here changes)."""
        out: list[Bucket] = []
        finer: Bucket | None = None
        for level, res in enumerate(RES):
            b = self.open[level]
            copy = b.copy() if b is not None else None
            if finer is not None:
                key = max(finer.t - finer.t % res, *self.floor[level:])
                if copy is None or key > copy.t:
                    if copy is not None:
                        out.append(copy)
                    copy = Bucket(key, res)
                copy.merge(finer)
            if copy is not None:
                out.append(copy)
            finer = copy
        return out

    def due(self, now: float, out: list[Bucket]) -> None:
        """Close the buckets whose time was over by `now` (the store passes a time well behind the
        clock: a reading closes its field's earlier buckets itself; this is for fields gone quiet)."""
        for level in range(len(RES)):
            b = self.open[level]
            if level and b is not None:
                self._hold(min(now, b.end), out)
            if b is not None and b.end <= now:
                self._close(level, out)


# ---------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    """A span of time asked for: [start, end), how the user wrote it, and an optional `by` resolution."""

    start: float
    end: float
    label: str
    by: int | None = None


GRAMMAR = "30m, 6h, 7d, 3w, 6mo, 1y, since 2026-03-01, or 2026-11-01..2026-11-07 (dates UTC), optionally followed by: by minute|hour|day"
UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(s|m|min|h|d|w|mo|y)")
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")


class BadWindow(BadValue):
    """A window that cannot be read, or is in the future or reversed."""


def duration(text: str) -> float:
    """Seconds in `30m`, `7d`, `6mo`, `1y`; BadWindow otherwise."""
    m = _DURATION.fullmatch(text.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise BadWindow(f"{text[:30]!r} is not a duration; use 30m, 6h, 7d, 3w, 6mo or 1y")
    return float(m.group(1)) * UNITS[m.group(2)]


def _date(text: str) -> float:
    m = _DATE.fullmatch(text)
    if not m:
        raise BadWindow(f"{text[:30]!r} is not a window; use {GRAMMAR}")
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%d")))
    except ValueError:
        raise BadWindow(f"{text[:30]!r} is not a date; use {GRAMMAR}") from None


def is_window(word: str) -> bool:
    """Whether a word starts a window rather than naming a field."""
    w = word.lower()
    return w == "since" or bool(_DURATION.fullmatch(w)) or ".." in w or bool(_DATE.fullmatch(w))


def parse_window(words: list[str], now: float | None = None) -> Window:
    """A window from the words after the field: `7d`, `since 2026-03-01`,
    `2026-11-01..2026-11-07` (both days included), each optionally with `by day|hour|minute`."""
    now = time.time() if now is None else now
    words = [w.lower() for w in words]
    by = None
    if len(words) >= 2 and words[-2] == "by":
        if words[-1] not in BY:
            raise BadWindow(f"by {words[-1][:10]!r}: say by minute, by hour or by day")
        by = BY[words[-1]]
        words = words[:-2]
    label = " ".join(words)
    if len(words) == 2 and words[0] == "since":
        start, end = _date(words[1]), now
    elif len(words) == 1 and ".." in words[0]:
        a, _, b = words[0].partition("..")
        start, end = _date(a), _date(b) + 86400
    elif len(words) == 1 and _DURATION.fullmatch(words[0]):
        start, end = now - duration(words[0]), now
    else:
        raise BadWindow(f"{label[:30]!r} is not a window; use {GRAMMAR}")
    if start >= now:
        raise BadWindow(f"{label} starts in the future")
    if end <= start:
        raise BadWindow(f"{label} ends before it starts")
    return Window(start, min(end, now), label, by)


# ---------------------------------------------------------------- which rows answer a window


def plan(start: float, end: float, avail: dict[int, float]) -> list[tuple[int, float, float]]:
    """Pieces (res, a, b) covering [start, end): whole buckets of the coarsest resolution in the
    middle, finer ones at the edges, raw readings (res 0) at the very edges. `avail[res]` is the
    earliest time a resolution holds everything from; an edge older than its finer resolution
    keeps is answered by the whole bucket around it (so it may count readings just outside)."""
    levels = (86400, 3600, 60, 0)

    def cover(a: float, b: float, i: int) -> list[tuple[int, float, float]]:
        r = levels[i]
        if a >= b:
            return []
        if r == 0:
            return [(0, a, b)]
        finer = levels[i + 1]
        lo = math.ceil(a / r) * r
        hi = math.floor(b / r) * r
        if a < avail.get(finer, -math.inf):
            lo = math.floor(a / r) * r  # the finer one no longer has this edge: the bucket around it
        if lo >= hi:
            return cover(a, b, i + 1)
        return cover(a, lo, i + 1) + [(r, lo, hi)] + cover(hi, b, i + 1)

    return cover(start, end, 0)


def choose(start: float, end: float, kept: dict[int, float], rows: int, by: int | None = None) -> int:
    """The finest resolution with at most about `rows` rows for the window and kept (`kept[res]`:
    the oldest time the config keeps it from) back to its start."""
    if by is not None:
        return by
    span = end - start
    for r in (60, 3600, 86400):
        if span / r <= rows and start >= kept.get(r, -math.inf):
            return r
    return 86400
