"""What `help` says: one short line per command, and `help COMMAND` for the details.

Every line fits a phone (rows.LINE characters). The one-line list comes from the command
registry in gateway/commands.py (each entry's usage and about); the details of each
command are its page here, under the same name (tests/test_replies.py checks both match).
"""

from __future__ import annotations

from dataclasses import dataclass

from .rows import LINE, wrap


@dataclass(frozen=True)
class Page:
    """The details of one command: its forms, what it does, and examples to copy."""

    forms: tuple[str, ...]
    text: str
    examples: tuple[str, ...] = ()


WINDOWS = "A window is 30m, 6h, 7d, 3w, 6mo, 1y, since 2026-03-01 or 2026-11-01..2026-11-07 (dates in UTC)."

ADHOC = "Ad-hoc commands (forms): "  # then the full JID they are at (docs/webchat.md)

ROLES = {"viewer": "viewer, operator or admin", "operator": "operator or admin", "admin": "admin"}

PAGES: dict[str, Page] = {
    "help": Page(("help", "help COMMAND"), "The commands you may use, or the details of one.", ("help read",)),
    "status": Page(
        ("status",),
        "How many devices are OK, each device's health and when its data last came (the reason on"
        " the line below), pending timed sets, and the gateway's own problems.",
    ),
    "list": Page(
        ("list",),
        "Each device and, under it, its fields: type and unit, and for a writable field its bounds.",
    ),
    "read": Page(
        ("read", "read device", "read device.field"),
        "The latest values with unit and age, under each device's health.",
        ("read", "read plug", "read greenhouse.temp"),
    ),
    "set": Page(
        ("set device.field value", "set device.field value for 10m", "set device.field value for 10m then value"),
        "Sets a writable field: on/off (or true/false, 1/0), a number within its bounds, or text."
        " With for, the field goes back when the time is up (7 days at most): to the value after then,"
        " else to its last reading.",
        ("set plug.relay on", "set plug.relay on for 10m", "set plug.level 30 for 8s then 0"),
    ),
    "history": Page(
        ("history device.field", "history device.field n", "history device.field window",
         "history device.field window by day|hour|minute"),
        "The last n readings (10 unless said, 100 at most), or over a window: exact min, mean and max"
        " with their times; by day lists one row per day. " + WINDOWS,
        ("history greenhouse.temp", "history greenhouse.temp 24h", "history greenhouse.temp 30d by day"),
    ),
    "plot": Page(
        ("plot device.field [window]", "plot device.field device.field [window]"),
        "A chart of the last 24 h (or the window, 1m to 10y) as a picture; up to 4 fields of one unit"
        " together. Text instead where no picture can be sent. " + WINDOWS,
        ("plot greenhouse.temp", "plot greenhouse.temp 7d", "plot plug.power since 2026-03-01"),
    ),
    "export": Page(
        ("export device.field window", "export device.field window by day|hour|minute"),
        "The readings (or min, mean and max per day, hour or minute) as a CSV file, times in UTC;"
        " without an upload service, the last rows in the chat. " + WINDOWS,
        ("export greenhouse.temp 7d", "export plug.power 1y by day"),
    ),
    "watch": Page(
        ("watch device.field > 30", "watch device.field > 30 hysteresis 0.5 interval 5m",
         "watch device.field change", "watch device offline"),
        "A message when it happens and when it clears. Also >=, <, <=, == and !=. With hysteresis,"
        " > 30 clears only below 29.5; interval is the least time between two messages (60 s unless said).",
        ("watch greenhouse.temp > 30", "watch plug.relay change", "watch plug offline"),
    ),
    "watches": Page(("watches",), "Your watches (an admin sees everyone's) and whether they fire."),
    "unwatch": Page(("unwatch ID",), "Removes one of your watches; ID is its number in watches.", ("unwatch 3",)),
    "ack": Page(("ack ID",), "Silences a firing watch until it clears.", ("ack 3",)),
    "log": Page(
        ("log", "log device", "log device.field"),
        "The last actuator changes and refused attempts: what changed, when, who asked and how.",
        ("log", "log plug.relay"),
    ),
    "fleet": Page(("fleet",), "The gateways sharing this gateway's rooms, each with its health."),
    "devices": Page(
        ("devices", "devices JID"),
        "The OMEMO devices of this gateway and of the contacts (or one contact), with fingerprint and trust.",
    ),
    "trust": Page(
        ("trust JID FINGERPRINT",),
        "Trusts a contact's OMEMO device once you have checked its fingerprint (as devices shows it).",
    ),
    "distrust": Page(
        ("distrust JID FINGERPRINT",),
        "Distrusts a contact's OMEMO device: nothing is encrypted for it, its messages are refused.",
    ),
}


def listing(title: str, entries: list[tuple[str, str]], example: str, adhoc: str | None = None) -> str:
    """The `help` reply: a title, then `usage — about` for each command the reader may use, and
    where the ad-hoc commands are (`adhoc`, a full JID: the server answers for the bare one)."""
    lines = wrap(title, "", LINE)
    for usage, about in entries:
        lines += wrap(f"{usage} — {about}", "  ", LINE)
    if adhoc is not None:
        lines += wrap(f"{ADHOC}{adhoc}", "  ", LINE)
    lines += wrap(f"Details and examples: help COMMAND, e.g. help {example}", "", LINE)
    return "\n".join(lines)


def page(name: str, about: str, role: str) -> str:
    """The `help COMMAND` reply: what it is, the role it needs, its forms, what it does, examples."""
    p = PAGES[name]
    lines = wrap(f"{name} — {about}", "  ", LINE)
    lines.append(f"Role: {ROLES[role]}.")
    lines.append("Usage:")
    for form in p.forms:
        lines += wrap(f"  {form}", "    ", LINE)
    lines += wrap(p.text, "", LINE)
    if p.examples:
        lines.append("Examples:")
        for example in p.examples:
            lines += wrap(f"  {example}", "    ", LINE)
    return "\n".join(lines)


def unknown(word: str, names: list[str]) -> str:
    """The answer to `help` of a command that does not exist (or is not offered here)."""
    return "\n".join(wrap(f"No command {word!r}. Commands: {', '.join(names)}.", "", LINE))
