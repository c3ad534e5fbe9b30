"""Typed field values: parsing what a user or a device sent, and showing it back."""

from __future__ import annotations

import math
import re
from typing import Any

Value = bool | int | float | str

TRUE_WORDS = {"on", "true", "1", "yes", "high", "open"}
FALSE_WORDS = {"off", "false", "0", "no", "low", "closed"}
MAX_STRING = 1024
# Characters XML 1.0 cannot carry at all (a server closes the stream on them), and lone
# surrogates, which UTF-8 cannot encode.
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class BadValue(ValueError):
    """A value that does not fit a field's type or bounds; the message says why."""


def coerce(ftype: str, raw: Any) -> Value:
    """Turn `raw` (text from a user or a device, or a Python value) into a value of `ftype`.

    Raises BadValue with a message a user can act on.
    """
    if ftype == "boolean":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, (int, float)) and raw in (0, 1):
            return bool(raw)
        word = str(raw).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise BadValue(f"expects on/off (or true/false, 1/0), got {_show(raw)}")
    if ftype == "integer":
        if isinstance(raw, bool):
            raise BadValue(f"expects a whole number, got {_show(raw)}")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float):
            if raw.is_integer():
                return int(raw)
            raise BadValue(f"expects a whole number, got {_show(raw)}")
        text = str(raw).strip()
        try:
            return int(text)
        except ValueError:
            raise BadValue(f"expects a whole number, got {_show(raw)}") from None
    if ftype == "numeric":
        if isinstance(raw, bool):
            raise BadValue(f"expects a number, got {_show(raw)}")
        if isinstance(raw, (int, float)):
            val = float(raw)
        else:
            text = str(raw).strip()
            try:
                val = float(text)
            except ValueError:
                raise BadValue(f"expects a number, got {_show(raw)}") from None
        if not math.isfinite(val):
            raise BadValue(f"expects a finite number, got {_show(raw)}")
        return val
    if ftype == "string":
        text = raw if isinstance(raw, str) else str(raw)
        if len(text) > MAX_STRING:
            raise BadValue(f"text longer than {MAX_STRING} characters")
        return text
    raise BadValue(f"unknown field type {ftype!r}")


def clean(text: str) -> str:
    """`text` with every character XML 1.0 forbids (and every lone surrogate) shown as U+FFFD."""
    return NOT_XML.sub("\ufffd", text) if NOT_XML.search(text) else text


def check_bounds(value: Value, lo: float | None, hi: float | None) -> None:
    """Raise BadValue when a numeric value lies outside [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if lo is not None and value < lo:
        raise BadValue(f"{fmt(value)} is below the minimum {fmt(lo)}")
    if hi is not None and value > hi:
        raise BadValue(f"{fmt(value)} is above the maximum {fmt(hi)}")


def fmt(value: Value | None, decimals: int | None = None) -> str:
    """Show a value the way a person reads it: on/off, trimmed numbers."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if decimals is not None:
            return f"{value:.{decimals}f}"
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.6e}"
    return str(value)


def clip(text: str, n: int) -> str:
    """`text` cut to at most `n` characters, the last one `…` when something was cut
    (to quote what someone sent back to them, or into a log line)."""
    return text if len(text) <= n else text[: n - 1] + "…"


def quoted(text: str, n: int = 80) -> str:
    """`text` clipped to `n` characters and quoted (repr), for a payload in a warning."""
    return repr(clip(text, n))


def same(asked: Value, got: Value, decimals: int | None) -> bool:
    """Whether a reported state is the value a set asked for (numbers to the field's decimals)."""
    if isinstance(asked, bool) or isinstance(got, bool) or isinstance(asked, str) or isinstance(got, str):
        return asked == got
    tolerance = 0.5 * 10 ** -decimals if decimals is not None else 1e-9 * max(1.0, abs(float(asked)))
    return abs(float(asked) - float(got)) <= tolerance


def shown(value: Value) -> str:
    """A reported value as a log line shows it: on/off, else as it came."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def age(seconds: float) -> str:
    """A short human age: 3 s, 5 min, 2 h, 4 d."""
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _show(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "...'"


DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in a duration like `90s`, `15m`, `6h`, `2d`, `1w` (a bare number is seconds)."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):] or "s"
    if unit not in DURATION_UNITS or not num:
        raise BadValue(f"{text!r} is not a duration (use 30s, 15m, 6h, 2d)")
    try:
        n = float(num)
    except ValueError:
        raise BadValue(f"{text!r} is not a duration (use 30s, 15m, 6h, 2d)") from None
    if not math.isfinite(n) or n <= 0:
        raise BadValue(f"{text!r} must be a positive duration")
    return n * DURATION_UNITS[unit]
