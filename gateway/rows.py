"""Replies laid out for a phone, in plain text that reads well in every client.

No XEP-0393 preformatted block (```): most clients show its fences (docs/replies.md).
Columns are aligned with spaces, so they line up where the font is monospace
(Profanity, a terminal) and still read row by row where it is not (Conversations,
Gajim, Dino, Converse.js) or aloud (a screen reader skips the runs of spaces).
"""

from __future__ import annotations

import textwrap

WIDTH = 40  # characters of a table row (status, read, list, log, fleet): a phone's line, so no row wraps
LINE = 60  # characters of a line of help: a phone's width in the larger fonts


def ago(seconds: float) -> str:
    """How long ago, as a phone says it: `5 s ago`, `2 min ago`, `3 h ago`, `2 d ago` (rounded down)."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 2 * 86400:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


def wrap(text: str, indent: str = "", width: int = WIDTH) -> list[str]:
    """`text` in lines of at most `width` characters, the later ones indented by `indent`
    (a word longer than that stays whole)."""
    return textwrap.wrap(
        text, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    ) or [text]


def fit(
    rows: list[tuple[str, str, str]],
    indent: str = "",
    right: bool = False,
    notes: list[str] | None = None,
) -> list[str]:
    """Rows of (name, value, more) in aligned columns no wider than WIDTH, for a phone.

    The columns are sized on the rows that fit; a row too wide for them goes on
    two lines: its name, then the rest indented. `notes[i]` (a reason) goes
    under row i, wrapped. `right` aligns the middle column right (numbers).
    """

    def line(row: tuple[str, str, str], w0: int, w1: int) -> str:
        mid = row[1].rjust(w1) if right else row[1].ljust(w1)
        return f"{indent}{row[0].ljust(w0)}  {mid}  {row[2]}".rstrip()

    fits = list(range(len(rows)))
    w0 = w1 = 0
    while fits:  # drop the longest row until the rest fit: at most len(rows) rounds
        w0 = max(len(rows[i][0]) for i in fits)
        w1 = max(len(rows[i][1]) for i in fits)
        if max(len(line(rows[i], w0, w1)) for i in fits) <= WIDTH:
            break
        fits.remove(max(fits, key=lambda i: sum(len(c) for c in rows[i])))
    out = []
    fitting = set(fits)  # a set: `read` of a device with 50,000 fields took 19 s with the list
    for i, row in enumerate(rows):
        if i in fitting:
            out.append(line(row, w0, w1))
        else:
            out.append(f"{indent}{row[0]}")
            out += wrap(f"{indent}  {row[1]}  {row[2]}".rstrip(), indent + "  ")
        if notes and notes[i]:
            out += wrap(f"{indent}  {notes[i]}", indent + "  ")
    return out
