"""XML Schema datatypes as XEP-0323 and XEP-0325 carry them: xs:dateTime, xs:date,
xs:time, xs:duration, booleans, 32/64-bit integers, doubles and colours, parsed
(ValueError with what is expected) and written.

Apart from the front-ends that use them (sensordata, control): values, not stanzas.
"""

from __future__ import annotations

import datetime as dt
import re

from ..hub import FieldSpec

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)

_TZ = r"(Z|[+-]\d{2}:\d{2})?"
_DATE = re.compile(r"(-?\d{4,})-(\d{2})-(\d{2})" + _TZ)
_TIME = re.compile(r"(\d{2}):(\d{2}):(\d{2})(\.\d+)?" + _TZ)
_DATETIME = re.compile(r"(-?\d{4,})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d+)?" + _TZ)
_DURATION = re.compile(
    r"-?P(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?"
)
_INTEGER = re.compile(r"[+-]?\d+")
_DOUBLE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?INF|NaN")
_COLOR = re.compile(r"[0-9a-fA-F]{6}([0-9a-fA-F]{2})?")


def _tz(text: str | None) -> dt.timezone:
    if not text or text == "Z":
        return dt.UTC
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 14 or minutes > 59 or (hours == 14 and minutes):
        raise ValueError(f"time zone offset {text} out of range")
    sign = -1 if text[0] == "-" else 1
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))


def _clock(h: str, m: str, s: str) -> tuple[int, int, int, bool]:
    """Check hh:mm:ss; (hour, minute, second, end_of_day) where 24:00:00 is the end of the day."""
    hour, minute, second = int(h), int(m), int(s)
    if hour == 24 and minute == 0 and second == 0:
        return 0, 0, 0, True
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError("time out of range")
    return hour, minute, second, False


def parse_datetime(text: str) -> float:
    """An xs:dateTime as Unix seconds; without a time zone it is taken as UTC. ValueError if invalid."""
    m = _DATETIME.fullmatch(text.strip())
    if m is None:
        raise ValueError("not an xs:dateTime (like 2013-03-07T16:24:30Z)")
    year, month, day = int(m[1]), int(m[2]), int(m[3])
    hour, minute, second, end = _clock(m[4], m[5], m[6])
    frac = float(m[7]) if m[7] else 0.0
    try:
        when = dt.datetime(year, month, day, hour, minute, second, tzinfo=_tz(m[8]))
    except (ValueError, OverflowError) as e:
        raise ValueError(f"not a valid date and time: {e}") from None
    return when.timestamp() + frac + (86400 if end else 0)


def check_date(text: str) -> str:
    """Validate an xs:date; returns it stripped."""
    t = text.strip()
    m = _DATE.fullmatch(t)
    if m is None:
        raise ValueError("not an xs:date (like 2013-05-01)")
    try:
        dt.date(int(m[1]), int(m[2]), int(m[3]))
        _tz(m[4])
    except ValueError as e:
        raise ValueError(f"not a valid date: {e}") from None
    return t


def check_time(text: str) -> str:
    """Validate an xs:time; returns it stripped."""
    t = text.strip()
    m = _TIME.fullmatch(t)
    if m is None:
        raise ValueError("not an xs:time (like 08:00:00)")
    _clock(m[1], m[2], m[3])
    _tz(m[5])
    return t


def check_datetime(text: str) -> str:
    """Validate an xs:dateTime; returns it stripped."""
    parse_datetime(text)
    return text.strip()


def check_duration(text: str) -> str:
    """Validate an xs:duration (like PT3M30S); returns it stripped."""
    t = text.strip()
    m = _DURATION.fullmatch(t)
    if m is None or not any(m.groups()) or t.endswith("T"):
        raise ValueError("not an xs:duration (like PT3M30S)")
    return t


def check_color(text: str) -> str:
    """Validate an XEP-0325 color, RRGGBB or RRGGBBAA in hexadecimal; returns it stripped."""
    t = text.strip()
    if _COLOR.fullmatch(t) is None:
        raise ValueError("not a color (RRGGBB or RRGGBBAA in hexadecimal)")
    return t


def parse_boolean(text: str) -> bool:
    """An xs:boolean: true, false, 1 or 0."""
    t = text.strip()
    if t in ("true", "1"):
        return True
    if t in ("false", "0"):
        return False
    raise ValueError("not an xs:boolean (true, false, 1 or 0)")


def parse_integer(text: str, bits: int) -> int:
    """An xs:int (bits=32) or xs:long (bits=64)."""
    t = text.strip()
    if _INTEGER.fullmatch(t) is None:
        raise ValueError(f"not an xs:{'int' if bits == 32 else 'long'} (a whole number)")
    n = int(t)
    lo, hi = INT32 if bits == 32 else INT64
    if not lo <= n <= hi:
        raise ValueError(f"{n} does not fit in {bits} bits")
    return n


def parse_double(text: str) -> float:
    """An xs:double (INF and NaN included; the hub refuses those for fields)."""
    t = text.strip()
    if _DOUBLE.fullmatch(t) is None:
        raise ValueError("not an xs:double (a number like 8.192 or 1e-3)")
    return float(t.replace("INF", "inf"))


def format_datetime(t: float) -> str:
    """Unix seconds as an xs:dateTime in UTC with milliseconds: 2013-03-07T16:24:30.000Z."""
    d = dt.datetime.fromtimestamp(t, dt.UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S") + f".{d.microsecond // 1000:03d}Z"


def format_duration(seconds: float) -> str:
    """Seconds as an xs:duration: PT12.5S, PT1H2M3S, P2DT3H."""
    s = max(0.0, seconds)
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    out = "P" + (f"{int(days)}D" if days else "")
    clock = (f"{int(hours)}H" if hours else "") + (f"{int(minutes)}M" if minutes else "")
    secs = round(secs, 3)
    if secs or not (days or clock):
        clock += (f"{secs:.3f}".rstrip("0").rstrip(".") or "0") + "S"
    return out + ("T" + clock if clock else "")


def format_number(value: float, decimals: int | None) -> str:
    """A numeric value with the field's decimals kept (10 °C is not 10.00 °C)."""
    if decimals is not None:
        return f"{value:.{decimals}f}"
    return repr(float(value))


def integer_kind(spec: FieldSpec) -> str:
    """`int` when the field's bounds fit 32 bits, else `long` (XEP-0323 and XEP-0325 alike)."""
    if spec.min is not None and spec.max is not None and INT32[0] <= spec.min and spec.max <= INT32[1]:
        return "int"
    return "long"
