"""CSV for `export`: a field's readings, or its buckets, one row each, times in ISO 8601 UTC.

A device's text ends up in a spreadsheet here, so a cell that would start a formula
gets a `'` in front, and cells are quoted as RFC 4180 says.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from .rollups import Bucket
from .values import Value


def iso(t: float) -> str:
    """ISO 8601 UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def cell(v: Value) -> str:
    """A value in a CSV cell: numbers as they are, text quoted when it needs to be."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if isinstance(v, float) else str(v)
    text = "" if v is None else str(v)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text  # a device's text is not a spreadsheet formula
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


def readings(times: Iterable[float], values: Iterable[Value], end: float) -> tuple[str, list[str]]:
    """The header and one row per reading before `end`."""
    return "time,value", [f"{iso(t)},{cell(v)}" for t, v in zip(times, values) if t < end]


def buckets(rows: list[Bucket]) -> tuple[str, list[str]]:
    """The header and one row per bucket: count, min, mean and max for numbers, else the
    number of changes and the last value."""
    if any(b.mean is not None for b in rows):
        return "time,count,min,mean,max", [
            f"{iso(b.t)},{b.n},{cell(b.lo)},{cell(b.mean)},{cell(b.hi)}" for b in rows if b.mean is not None
        ]
    return "time,count,changes,last", [f"{iso(b.t)},{b.n},{b.changes},{cell(b.last)}" for b in rows]
