"""Plots of field history: a PNG line chart for the chat, and text sparklines.

`render` draws with matplotlib (Agg) in a child process (gateway.plotworker),
started on the first plot and ended after WORKER_IDLE seconds without one: the
gateway never imports matplotlib, so neither its start-up time nor its memory
after a plot change (drawing in the gateway itself kept ~45 MB for good).
Sparklines (`▁▂▃▄▅▆▇█`) need nothing beyond the standard library: they answer
when there is no picture, and top `history` replies.

The hub's history keeps readings, not device health, so an offline or stale
stretch shows as a gap between readings: the line is broken wherever two
consecutive readings are further apart than max(3 × the median interval, the
device's `stale_after`).

A window longer than the readings in memory is drawn from history.db's rollups
(gateway/history.py): per bucket the mean as the line and the min–max as a band
around it, so a spike shows however long the window; a missing bucket (the device
was offline) breaks both.
"""

from __future__ import annotations

import bisect
import datetime as dt
import importlib.util
import io
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .auth import Actor
from .hub import Field
from .values import clean, fmt
from .worker import Worker, WorkerFailed, WorkFailed, python_module

if TYPE_CHECKING:
    from .watches import Watches

log = logging.getLogger("iot_gateway.plot")

# The picture is drawn for a thumbnail THUMB px wide (Converse and Conversations show it so
# inline) at twice that: the full view fills a phone's width at 2 device pixels per CSS pixel.
THUMB = 320
SIZE = (640, 400)
FONT = 12  # points, which are thumbnail pixels: tick labels, notes, legend
PAD = 4  # points around the figure
TITLE_FONT = 15
NOTE_COLOR = "#444444"
MAX_TICKS = 5  # per axis
MAX_LABEL = 200  # characters of a name kept before measuring it
MAX_FIELDS = 4
MAX_WAITING = 4  # plots being drawn or waiting for the drawing process; more are told to try again
DRAW_DEADLINE = 60.0  # seconds for one picture, the drawing process's start (matplotlib's import) included
WORKER_IDLE = 20.0  # seconds without a plot after which the drawing process ends
SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 32
# Line colours, one per field (matplotlib's tab10); tests look for the first one's pixels.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")
THRESHOLD_COLOR = "#d62728"
PLOT_INSTALL = "pip install 'iot-gateway[plot]'"


class PlotError(Exception):
    """A plot that cannot be made from what was asked; the message says why."""


class NoPicture(Exception):
    """Why a plot cannot go out as a picture (no upload service, upload refused, no plotting
    library); the reply falls back to sparklines and says this."""


class Picture(str):
    """A reply that is the HTTPS GET URL of an uploaded picture: sent as the message body with
    an XEP-0066 OOB element carrying the same URL, so clients show the picture inline."""


@dataclass(frozen=True)
class Series:
    """One field's readings in the plotted window, oldest first (booleans as 0/1)."""

    ref: str
    unit: str
    times: list[float]
    values: list[float]
    boolean: bool = False
    decimals: int | None = None
    stale_after: float | None = None
    # Rollup buckets instead of readings: each one's min and max (the band), and the spacing
    # beyond which two buckets have a gap between them.
    lows: list[float] | None = None
    highs: list[float] | None = None
    gap: float | None = None

    @property
    def lo(self) -> float:
        """The lowest value (of the band, when there is one)."""
        return min(self.lows) if self.lows else min(self.values)

    @property
    def hi(self) -> float:
        """The highest value (of the band, when there is one)."""
        return max(self.highs) if self.highs else max(self.values)

    def fmt(self, value: float) -> str:
        """A value as the field shows it, without unit."""
        if self.boolean:
            return "on" if value >= 0.5 else "off"
        return fmt(value, self.decimals)


@dataclass(frozen=True)
class Threshold:
    """A watch's threshold, drawn as a dashed line."""

    value: float
    label: str


@dataclass(frozen=True)
class Chart:
    """Everything `render` needs: the series, the window and the thresholds."""

    series: list[Series]
    start: float
    end: float
    window: str  # as the user typed it: `1h`, `24h`
    thresholds: list[Threshold] = field(default_factory=list)
    size: tuple[int, int] = SIZE

    @property
    def unit(self) -> str:
        """The unit all series share."""
        return self.series[0].unit if self.series else ""


def gap_after(times: Sequence[float], stale_after: float | None) -> float:
    """The spacing beyond which two consecutive readings have a gap between them."""
    steps = [b - a for a, b in zip(times, times[1:])]
    typical = statistics.median(steps) if steps else 0.0
    return max(3 * typical, stale_after or 0.0) or math.inf


class Uploads(Protocol):
    """Where pictures go (gateway.xmpp.upload.Uploader on the XMPP session); both raise NoPicture."""

    async def ready(self) -> object:
        """Check that uploads can work, before a picture is drawn for nothing."""

    async def upload(self, data: bytes, filename: str, content_type: str) -> Picture:
        """Upload a file; its GET URL."""


class Plots:
    """Answers `plot`: a picture when uploads work, sparklines (and why) when not."""

    def __init__(self) -> None:
        self.uploads: Uploads | None = None
        self.no_uploads = "this interface shows text only"  # why, while `uploads` is None
        # matplotlib's font cache; its default (~/.cache) is read-only under systemd's ProtectHome,
        # and a cache rebuilt on each restart would make every first plot slow.
        self.cache_dir: Path | None = None
        # One process draws, one plot at a time: a Pi has few cores and little memory.
        self.worker = Worker("the drawing process", python_module("gateway.plotworker"),
                             deadline=DRAW_DEADLINE, idle=WORKER_IDLE, env=self._worker_env)
        self._waiting = 0

    async def answer(self, fields: list[Field], window: float, label: str, actor: Actor,
                     watches: "Watches | None", aside: Callable[[], None] | None = None,
                     series: list[Series] | None = None, end: float | None = None) -> str:
        """The reply to `plot` for these fields over the `window` seconds before `end` (now), from
        `series` when given (rollups), else the readings in memory. Once the readings are taken,
        `aside` is called: drawing and uploading may run beside the contact's next commands."""
        end = time.time() if end is None else end
        if series is None:
            series = [_series(f, end - window) for f in fields]
        chart = Chart(series, end - window, end, label, _thresholds(watches, actor, fields))
        if not any(s.values for s in chart.series):
            return f"{', '.join(f.ref for f in fields)}: no readings in {_title(label)}."
        if aside is not None:
            aside()
        try:
            if self.uploads is None:
                raise NoPicture(self.no_uploads)
            await self.uploads.ready()
            png = await self._render(chart)
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(end))
            return await self.uploads.upload(png, f"plot-{stamp}.png", "image/png")
        except NoPicture as e:
            over = _title(label)
            over = f"Over {over}" if over.startswith("the") else over[:1].upper() + over[1:]
            title = f"No picture: {str(e).rstrip('.')}. {over}:"
            return "\n".join([title, *sparklines(chart)])

    async def close(self) -> None:
        """End the drawing process, if one runs."""
        await self.worker.close()

    async def _render(self, chart: Chart) -> bytes:
        if self._waiting >= MAX_WAITING:
            raise PlotError("busy drawing other plots; try again in a moment")
        if importlib.util.find_spec("matplotlib") is None:  # no process started to learn that
            raise _not_installed("matplotlib")
        self._waiting += 1
        refs = ", ".join(s.ref for s in chart.series)
        try:
            return await self.worker.ask(chart)
        except WorkFailed as e:
            if e.missing:
                raise _not_installed(e.missing) from None
            log.error("rendering a plot of %s failed: %s: %s", refs, e.kind, e)
            raise PlotError(f"could not draw the plot ({e.kind}: {e})") from None
        except WorkerFailed as e:
            log.warning("no picture for a plot of %s: %s", refs, e)
            raise NoPicture(str(e)) from None
        finally:
            self._waiting -= 1

    def _worker_env(self) -> dict[str, str]:
        """The drawing process's environment: the gateway's, with matplotlib's cache in the state folder."""
        env = dict(os.environ)
        if self.cache_dir is not None and "MPLCONFIGDIR" not in env:
            try:
                self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                env["MPLCONFIGDIR"] = str(self.cache_dir)
            except OSError as e:
                log.warning("cannot use %s for matplotlib's cache: %s", self.cache_dir, e)
        return env


def _not_installed(module: str) -> NoPicture:
    return NoPicture(f"the plotting library is not installed ({module}); for pictures: {PLOT_INSTALL}")


def check_fields(fields: list[Field]) -> None:
    """PlotError unless the fields can share one chart: numbers of one unit, or on/off fields."""
    for f in fields:
        if f.spec.type not in ("numeric", "integer", "boolean"):
            raise PlotError(f"{f.ref} holds {f.spec.type} values; only numbers and on/off fields can be plotted")
    first = fields[0]
    for f in fields[1:]:
        if (f.spec.type == "boolean") != (first.spec.type == "boolean"):
            raise PlotError(f"{first.ref} and {f.ref} are not both on/off fields: plot them separately")
        if f.spec.unit != first.spec.unit:
            raise PlotError(
                f"{first.ref} is in {first.spec.unit or 'no unit'} and {f.ref} in {f.spec.unit or 'no unit'}:"
                " plot fields of one unit together"
            )


def _series(f: Field, start: float) -> Series:
    """A field's readings since `start`; this runs on the event loop, so a day of readings
    goes through C-level copies and maps, with a slow path only for odd values."""
    times, raw = f.history.since(start)
    try:
        values = list(map(float, raw))
        clean = all(map(math.isfinite, values))
    except (TypeError, ValueError):
        clean = False
    if not clean:
        pairs = [(t, float(v)) for t, v in zip(times, raw)
                 if isinstance(v, (int, float)) and math.isfinite(v)]
        times, values = [t for t, _ in pairs], [v for _, v in pairs]
    return Series(f.ref, f.spec.unit, times, values, f.spec.type == "boolean", f.spec.decimals, f.node.stale_after)


def _thresholds(watches: "Watches | None", actor: Actor, fields: list[Field]) -> list[Threshold]:
    """The requesting contact's own comparison watches on these fields."""
    if watches is None or any(f.spec.type == "boolean" for f in fields):
        return []
    refs = {f.ref for f in fields}
    out = []
    for w in watches.visible(actor.jid, False):
        v = w.threshold
        if w.kind == "compare" and w.target in refs and isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(Threshold(float(v), f"#{w.id} {w.describe()}"))
    return out


def history_spark(f: Field, start: float, end: float) -> str | None:
    """The sparkline on top of a `history` reply, over the readings from `start` on; None for
    text fields or fewer than 2 readings."""
    if f.spec.type not in ("numeric", "integer", "boolean"):
        return None
    s = _series(f, start)
    if len(s.values) < 2:
        return None
    return series_spark(s, start, end, min(SPARK_WIDTH, len(s.values)))


# ---------------------------------------------------------------- sparklines


def spark(times: Sequence[float], values: Sequence[float], start: float, end: float,
          width: int = SPARK_WIDTH, gap: float | None = None, lo: float | None = None,
          hi: float | None = None) -> str:
    """A sparkline of `width` characters over [start, end]: each one the mean of the readings
    in its slice of time; a slice without readings repeats the previous value unless that is
    older than `gap` (then, as before the first reading, a space)."""
    if not times or end <= start or width < 1:
        return ""
    gap = gap_after(times, None) if gap is None else gap
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    step = (end - start) / width
    n = len(times)
    out = []
    for k in range(width):
        a, b = start + k * step, start + (k + 1) * step
        i = bisect.bisect_left(times, a)
        j = bisect.bisect_left(times, b) if k < width - 1 else n
        if j > i:
            v = math.fsum(values[i:j]) / (j - i)
        elif i > 0 and (times[i] if i < n else a) - times[i - 1] <= gap:
            v = values[i - 1]  # between two readings close enough: the line goes on
        else:
            out.append(" ")
            continue
        level = 0.5 if hi <= lo else (v - lo) / (hi - lo)
        out.append(SPARK[min(len(SPARK) - 1, max(0, round(level * (len(SPARK) - 1))))])
    return "".join(out)


def series_spark(s: Series, start: float, end: float, width: int = SPARK_WIDTH) -> str:
    """A series' sparkline, breaking at its gaps; booleans run from off (▁) to on (█)."""
    lo, hi = (0.0, 1.0) if s.boolean else (None, None)
    gap = s.gap if s.gap is not None else gap_after(s.times, s.stale_after)
    return spark(s.times, s.values, start, end, width, gap, lo, hi)


def _title(label: str) -> str:
    """`the last 7d` for a duration, the words as typed for dates."""
    if label[:1].isdigit() and ".." not in label:
        return f"the last {label}"
    return label if label.startswith("since") else f"from {label.replace('..', ' to ')}"


def sparklines(chart: Chart) -> list[str]:
    """One line per series: `sim.temp  ▁▁▂▅▇█  min 10.0, max 20.0 °C`."""
    width = max(len(s.ref) for s in chart.series)
    lines = []
    for s in chart.series:
        if not s.values:
            lines.append(f"{s.ref:<{width}}  no readings")
            continue
        unit = f" {s.unit}" if s.unit else ""
        line = series_spark(s, chart.start, chart.end)
        lines.append(f"{s.ref:<{width}}  {line}  min {s.fmt(s.lo)}, max {s.fmt(s.hi)}{unit}")
    return lines


# ---------------------------------------------------------------- the picture


def render(chart: Chart) -> bytes:
    """The chart as a PNG of `chart.size` pixels. Blocking (a good part of a second on a Pi)
    and heavy: the gateway runs it in the drawing process (gateway.plotworker). Raises
    ImportError without matplotlib."""
    import numpy as np
    from matplotlib.backend_bases import FigureCanvasBase
    from PIL import Image

    fig = figure(chart)
    fig.canvas.draw()
    rgb = np.array(fig.canvas.buffer_rgba())[..., :3]  # a copy: the drawing's buffer goes below
    # A figure is a web of cycles: cut them, so it goes now rather than at the next full gc; the
    # drawing canvas (its renderer holds megabytes of native memory) is let go with it.
    fig.clear()
    FigureCanvasBase(fig)
    # 256 colours are plenty for a chart with its anti-aliasing: a third of the bytes, and faster to write.
    buf = io.BytesIO()
    Image.fromarray(rgb).quantize(256, Image.Quantize.FASTOCTREE).save(buf, format="png")
    return buf.getvalue()


def figure(chart: Chart):  # type: ignore[no-untyped-def]
    """The chart as a matplotlib Figure, laid out for a THUMB px wide thumbnail: at that width
    a point of font size or line width is one pixel."""
    import numpy as np
    from dateutil import tz
    from matplotlib import ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    local = tz.tzlocal()
    w, h = chart.size
    dpi = 72 * w / THUMB
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi, layout="constrained")
    fig.get_layout_engine().set(w_pad=PAD / 72, h_pad=PAD / 72)
    measure = _measure(FigureCanvasAgg(fig).get_renderer(), dpi)
    ax = fig.add_subplot()
    columns = max(1, int(w * 0.9))
    boolean = any(s.boolean for s in chart.series)
    handles = []
    for n, s in enumerate(chart.series):
        if not s.values:
            continue
        x, y = _points(np, s, chart.start, chart.end, columns)
        days = x / 86400.0  # matplotlib's dates: days since 1970-01-01 UTC
        color = COLORS[n % len(COLORS)]
        few = len(s.values) <= 60
        if s.lows is not None and s.highs is not None:
            lo, hi = _band(np, s)
            ax.fill_between(days, lo, hi, color=color, alpha=0.3, linewidth=0)
            ax.plot(days, hi, color=color, linewidth=0.6, alpha=0.7)  # a one-bucket spike is a line, not a sliver
            line, = ax.plot(days, y, color=color, linewidth=1.5)
        elif s.boolean:
            line, = ax.step(days, y, where="post", color=color, linewidth=2)
        else:
            lw = 2 if len(x) < columns else 1.5  # a dense line drawn thick would be a solid band
            line, = ax.plot(days, y, color=color, linewidth=lw, marker="o" if few else None, markersize=3)
        handles.append((line, s.ref))
    width = THUMB - 2 * PAD  # points inside the figure's pads
    small = measure(FONT)
    for t in chart.thresholds:
        ax.axhline(t.value, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.5)
        ax.annotate(fit(_text(t.label), width * 0.6, small), (1, t.value), xycoords=("axes fraction", "data"),
                    xytext=(-3, 2), textcoords="offset points", ha="right", va="bottom", fontsize=FONT,
                    color=THRESHOLD_COLOR, parse_math=False,
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})  # over a line, readable

    ax.set_xlim(chart.start / 86400.0, chart.end / 86400.0)
    ticks = time_ticks(chart.start, chart.end, local)
    ax.set_xticks([t / 86400.0 for t, _ in ticks], [label for _, label in ticks])
    if boolean:
        ax.set_ylim(-0.1, 1.1)
        ax.set_yticks([0, 1], ["off", "on"])
    else:
        ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=MAX_TICKS - 1, steps=[1, 2, 2.5, 5, 10]))
        ax.yaxis.set_major_formatter(_short_formatter(ticker))
        if chart.unit:
            ax.set_ylabel(fit(_text(chart.unit), 0.6 * h * 72 / dpi, small), fontsize=FONT, parse_math=False)
    ax.tick_params(labelsize=FONT, length=3, pad=2)
    ax.grid(True, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    title = chart_title([s.ref for s in chart.series], chart.window, width, measure(TITLE_FONT, bold=True))
    fig.suptitle(title, x=PAD / THUMB, ha="left", fontsize=TITLE_FONT, fontweight="bold", parse_math=False)
    # Under the title, over the axes: the numbers of a single field, or which field is which
    # colour; the time zone on the right.
    zone = _zone_name(local, chart.end)
    room = width - small(zone) - FONT - _axes_margins(ax, small)
    ways = _stats(chart.series[0]) if len(chart.series) == 1 else [""]
    note = next((way for way in ways if small(way) <= room), fit(ways[-1], room, small))
    ax.set_title(note, loc="left", fontsize=FONT, color=NOTE_COLOR, parse_math=False, pad=4)
    ax.set_title(zone, loc="right", fontsize=FONT, color=NOTE_COLOR, parse_math=False, pad=4)
    if len(handles) > 1:
        cols = min(2, len(handles))
        room = room / cols - 2.2 * FONT  # a column less its line and spacing
        legend = ax.legend([hd for hd, _ in handles], [fit(_text(r), room, small) for _, r in handles],
                           loc="lower left", bbox_to_anchor=(0, 1), ncols=cols, fontsize=FONT, frameon=False,
                           borderaxespad=0.1, borderpad=0, handlelength=1.0, handletextpad=0.4, columnspacing=0.8,
                           labelspacing=0.2)
        for text in legend.get_texts():
            text.set_parse_math(False)
    return fig


# Steps between time ticks, finest first: (unit, count); s/m/h steps divide the unit above.
TIME_STEPS = [("s", n) for n in (1, 2, 5, 10, 15, 30)] + [("m", n) for n in (1, 2, 5, 10, 15, 30)] + [
    ("h", n) for n in (1, 2, 3, 6, 12)] + [("d", n) for n in (1, 2, 4, 7, 14)] + [
    ("M", n) for n in (1, 2, 3, 6)] + [("Y", n) for n in (1, 2, 5, 10, 20, 50, 100)]
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "M": 30 * 86400, "Y": 365 * 86400}


def time_ticks(start: float, end: float, zone: dt.tzinfo) -> list[tuple[float, str]]:
    """At most MAX_TICKS (time, label) for an axis from `start` to `end` (epoch seconds), at
    round local times of the finest step that allows: `06:15` (`Dec 6` at midnight), `:30`
    between minutes, `Dec 6` for days, `Mar` for months (`2026` for January), `2026` for years."""
    ticks: list[tuple[float, str]] = []
    for unit, n in TIME_STEPS:
        if (end - start) / (SECONDS[unit] * n) > MAX_TICKS + 1:
            continue  # too many: skip without listing them
        ticks = [(t.timestamp(), _tick_label(t, unit)) for t in _round_times(start, end, zone, unit, n)]
        if len(ticks) <= MAX_TICKS:
            return ticks
    return ticks[:: -(-len(ticks) // MAX_TICKS)]


def _round_times(start: float, end: float, zone: dt.tzinfo, unit: str, n: int) -> list[dt.datetime]:
    """The local times from `start` to `end` that are round for a step of `n` `unit`s, in order."""
    first = dt.datetime.fromtimestamp(start, zone).replace(tzinfo=None)  # wall-clock time
    if unit in "smh":
        step = dt.timedelta(seconds=SECONDS[unit] * n)
        midnight = first.replace(hour=0, minute=0, second=0, microsecond=0)
        at = midnight + step * math.ceil((first - midnight) / step)
        walls = []
        while (at - first).total_seconds() <= end - start + 7200:  # a DST change moves wall time an hour
            walls.append(at)
            at += step
    elif unit == "d":
        day = first.replace(hour=0, minute=0, second=0, microsecond=0)
        walls = []
        while (day - first).total_seconds() <= end - start + 7200:
            if (day.day - 1) % n == 0 and day.day <= 31 - n // 2:  # no 29th right before the 1st
                walls.append(day)
            day += dt.timedelta(days=1)
    else:  # on the 1st of a month
        year, month = first.year, first.month
        walls = []
        while (dt.datetime(year, month, 1) - first).total_seconds() <= end - start:
            if (month - 1) % n == 0 if unit == "M" else month == 1 and year % n == 0:
                walls.append(dt.datetime(year, month, 1))
            year, month = year + month // 12, month % 12 + 1
    seen: dict[float, dt.datetime] = {}
    for wall in walls:
        t = wall.replace(tzinfo=zone)
        if start <= t.timestamp() <= end:
            seen.setdefault(t.timestamp(), t)  # a wall time skipped by DST lands on the next one
    return list(seen.values())


def _tick_label(t: dt.datetime, unit: str) -> str:
    if unit == "s":
        return t.strftime(":%S" if t.second else "%H:%M")
    if unit in "mh":
        return t.strftime("%H:%M" if t.hour or t.minute else "%b %-d")
    if unit == "d":
        return t.strftime("%b %-d")
    if unit == "M":
        return t.strftime("%b" if t.month > 1 else "%Y")
    return t.strftime("%Y")


def _axes_margins(ax, measure: Callable[[str], float]) -> float:  # type: ignore[no-untyped-def]
    """How much of the width between the figure's pads the axes will not span, before the
    layout places them: on the left the y axis label, the widest y tick label and the ticks;
    on the right at most half the widest x tick label, centred on a tick at the end."""
    lo, hi = sorted(ax.get_ylim())
    locs = [t for t in ax.yaxis.get_majorticklocs() if lo <= t <= hi]
    widest = max((measure(label) for label in ax.yaxis.get_major_formatter().format_ticks(locs)), default=0.0)
    last = max((measure(label.get_text()) for label in ax.get_xticklabels()), default=0.0)
    return (FONT + 4 if ax.get_ylabel() else 0) + widest + 2 + 3 + 1 + last / 2


def _short_formatter(ticker):  # type: ignore[no-untyped-def]
    """A matplotlib Formatter that labels ticks with `short_ticks`."""

    class Short(ticker.Formatter):  # type: ignore[misc]
        def format_ticks(self, values):  # type: ignore[no-untyped-def]
            return short_ticks(list(values))

        def __call__(self, x, pos=None):  # type: ignore[no-untyped-def]
            return short_ticks([x])[0]

    return Short()


def chart_title(refs: Sequence[str], window: str, width: float, measure: Callable[[str], float]) -> str:
    """`FIELD · WINDOW` in at most `width` (as `measure` tells): several fields joined by commas
    or, when that is too long, `FIRST +2`; a name cut in the middle when it is too long alone;
    control characters shown as U+FFFD."""
    when = f" · {_text(_window_title(window))}"
    room = width - measure(when)
    names = _text(", ".join(refs))
    if len(refs) > 1 and measure(names) > room:
        more = f" +{len(refs) - 1}"
        names = fit(_text(refs[0]), room - measure(more), measure) + more
    return fit(names, room, measure) + when


def _window_title(label: str) -> str:
    """`last 24h` for a duration, `since …` as typed, `A – B` for a range."""
    if label[:1].isdigit() and ".." not in label:
        return f"last {label}"
    return label.replace("..", " – ")


def fit(text: str, width: float, measure: Callable[[str], float]) -> str:
    """`text` if it is at most `width` wide, else its start and end around `…`, as long as fits."""
    if len(text) > MAX_LABEL:
        text = text[: MAX_LABEL // 2] + "…" + text[-(MAX_LABEL // 2):]
    if measure(text) <= width:
        return text
    lo, hi = 0, len(text) - 1  # how many characters to keep: lo fits (the bare ellipsis at worst)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if measure(_cut(text, mid)) <= width:
            lo = mid
        else:
            hi = mid - 1
    return _cut(text, lo)


def _cut(text: str, keep: int) -> str:
    head = (keep + 1) // 2
    return text[:head] + "…" + text[len(text) - (keep - head):]


def _text(text: str) -> str:
    """Text from outside as the picture may show it: every control or format character (a
    newline, a bidi override, what XML forbids) as U+FFFD."""
    text = clean(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else "\ufffd" for c in text)


def _measure(renderer, dpi: float):  # type: ignore[no-untyped-def]
    """measure(size, bold)(text): the text's width in points at that font size."""
    from matplotlib.font_manager import FontProperties

    def at(size: float, bold: bool = False) -> Callable[[str], float]:
        prop = FontProperties(size=size, weight="bold" if bold else "normal")
        return lambda text: renderer.get_text_width_height_descent(text, prop, ismath=False)[0] * 72 / dpi

    return at


def short_ticks(values: Sequence[float]) -> list[str]:
    """Tick labels of a few characters: `17.5`, `−3`, `12k`, `1.5M`; as many decimals as the
    step between ticks needs, so neighbours never read alike."""
    big = max((abs(v) for v in values), default=0.0)
    scale, suffix = (1e9, "G") if big >= 1e9 else (1e6, "M") if big >= 1e6 else (1e3, "k") if big >= 1e4 else (1.0, "")
    ordered = sorted(values)
    step = min((b - a for a, b in zip(ordered, ordered[1:]) if b > a), default=1.0) / scale
    decimals = next((d for d in range(9) if abs(step * 10**d - round(step * 10**d)) < 1e-6 * step * 10**d), 9)
    out = []
    for v in values:
        text = f"{abs(v) / scale:.{decimals}f}"
        out.append(("\u2212" + text + suffix if v < 0 else text + suffix) if text.strip("0.") else "0")
    return out


def _points(np, s: Series, start: float, end: float, columns: int):  # type: ignore[no-untyped-def]
    """The series as arrays to draw: NaN where the line breaks at a gap, and decimated when it
    has more readings than pixels (per pixel column and stretch without gaps, the first, last,
    lowest and highest reading, so peaks stay as drawn in full)."""
    x = np.asarray(s.times, dtype=float)
    y = np.asarray(s.values, dtype=float)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    steps = np.diff(x)
    gap = s.gap if s.gap is not None else (
        max(3 * float(np.median(steps)) if len(steps) else 0.0, s.stale_after or 0.0) or math.inf)
    segment = np.concatenate(([0], np.cumsum(steps > gap)))
    if len(x) > 4 * columns:
        col = np.clip(((x - start) / max(end - start, 1e-9) * columns).astype(np.int64), 0, columns - 1)
        key = segment * columns + col  # non-decreasing along x
        bounds = np.flatnonzero(np.diff(key)) + 1
        first = np.concatenate(([0], bounds))
        last = np.concatenate((bounds - 1, [len(x) - 1]))
        by_value = np.lexsort((y, key))  # within each group, lowest value first
        lowest = by_value[first]
        highest = by_value[last]
        keep = np.unique(np.concatenate((first, last, lowest, highest)))
        x, y, segment = x[keep], y[keep], segment[keep]
    breaks = np.flatnonzero(np.diff(segment)) + 1
    if len(breaks):
        x = np.insert(x, breaks, np.nan)
        y = np.insert(y, breaks, np.nan)
    return x, y


def _band(np, s: Series):  # type: ignore[no-untyped-def]
    """A rollup series' min and max, broken (NaN) where `_points` breaks the line."""
    x = np.asarray(s.times, dtype=float)
    lo = np.asarray(s.lows, dtype=float)
    hi = np.asarray(s.highs, dtype=float)
    breaks = np.flatnonzero(np.diff(x) > (s.gap or math.inf)) + 1
    return np.insert(lo, breaks, np.nan), np.insert(hi, breaks, np.nan)


def _stats(s: Series) -> list[str]:
    """A series' numbers in words, the longest first and then shorter ways to say them."""
    unit = _text(f" {s.unit}") if s.unit else ""
    if s.boolean:
        on = math.fsum(s.values) / len(s.values)
        return [f"on {on:.0%} of {'the time' if s.gap else 'readings'}, now {s.fmt(s.values[-1])}", f"on {on:.0%}"]
    avg = math.fsum(s.values) / len(s.values)
    lo, hi = s.fmt(s.lo), s.fmt(s.hi)
    return [f"min {lo} · avg {s.fmt(avg)} · max {hi}{unit}", f"min {lo} · max {hi}{unit}", f"{lo} – {hi}{unit}"]


def _zone_name(zone: object, at: float) -> str:
    return dt.datetime.fromtimestamp(at, zone).strftime("%Z")  # type: ignore[arg-type]
