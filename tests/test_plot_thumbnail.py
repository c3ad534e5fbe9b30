"""Plots legible as the thumbnails clients show inline (issue 27, item 4): every text at least
11 px tall once the picture is scaled to 320 px wide, at most 5 ticks per axis with short labels,
a title `FIELD · WINDOW` that survives control characters and long names."""

from __future__ import annotations

import io
import math
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from PIL import Image
from matplotlib.text import Text

from gateway import plot
from gateway.plot import Chart, Series, Threshold

THUMB = 320  # what Converse and Conversations show inline
MIN_TEXT = 11  # px: the smallest text's height in the thumbnail
TITLE_ROWS = 12  # px rows from the top of `l` to the bottom of `p` in the title, in the thumbnail
MAX_TICKS = 5
BERLIN = ZoneInfo("Europe/Berlin")
END = 1_765_000_000.0  # 2025-12-06 06:46 in Berlin


def temp(ref: str, span: float, step: float, base: float = 20.0) -> Series:
    """A temperature around `base` °C over the `span` seconds before END, a reading every `step`."""
    times = [END - span + i * step for i in range(int(span // step) + 1)]
    return Series(ref, "°C", times, [base + 3 * math.sin(3 * math.pi * (END - t) / span + base) for t in times], decimals=1)


def charts() -> dict[str, Chart]:
    """One chart of each kind `plot` draws."""
    day, hour = 86400.0, 3600.0
    band = temp("sim.temp", 30 * day, hour)
    band = Series(band.ref, band.unit, band.times, band.values, decimals=1, gap=1.5 * hour,
                  lows=[v - 1 for v in band.values], highs=[v + 1 + 40 * (i == 400) for i, v in enumerate(band.values)])
    relay = Series("plug.relay", "", [END - hour + i * 60 for i in range(61)],
                   [float((i // 10) % 2) for i in range(61)], boolean=True)
    # A greenhouse's day, offline for two hours, with a watch: docs/img/plot-320.png.
    times = [END - day + i * 60 for i in range(1441) if not 600 <= i < 720]
    greenhouse = Series("greenhouse.temp", "°C", times, [
        18 + 6 * math.sin((t - END) / day * 2 * math.pi + 1.2) + 0.4 * math.sin(t / 500) for t in times], decimals=1)
    return {
        "greenhouse": Chart([greenhouse], END - day, END, "24h", [Threshold(22.0, "#3 greenhouse.temp > 22")]),
        "1m": Chart([temp("sim.temp", 60, 1)], END - 60, END, "1m"),
        "1h, a threshold": Chart([temp("sim.temp", hour, 10)], END - hour, END, "1h",
                                 [Threshold(21.0, "#1 sim.temp > 21")]),
        "24h at 1/s": Chart([temp("greenhouse.temperature", day, 1)], END - day, END, "24h"),
        "30d of buckets": Chart([band], END - 30 * day, END, "30d"),
        "on/off": Chart([relay], END - hour, END, "1h"),
        "4 fields": Chart([temp(f"room{k}.temperature", 6 * hour, 30, base=18 + k) for k in range(4)],
                          END - 6 * hour, END, "6h"),
        "since": Chart([temp("sim.temp", 400 * day, day)], END - 400 * day, END, "since 2024-11-01"),
        "kW": Chart([Series("meter.power", "W", [END - hour, END], [1500.0, 250_000.0])], END - hour, END, "1h"),
    }


def texts(fig):  # type: ignore[no-untyped-def]
    """Every text the figure shows: titles, labels, legend, notes, and the tick labels in view."""
    ax = fig.axes[0]
    hidden = set()
    for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        lo, hi = sorted(lim)
        ticks = zip(axis.get_major_ticks(), axis.get_majorticklocs())
        hidden |= {id(t.label1) for t, at in ticks if not lo <= at <= hi}
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in hidden]


def title(fig):  # type: ignore[no-untyped-def]
    """The figure's title, as a Text."""
    return next(t for t in fig.findobj(Text) if t.get_text() == fig.get_suptitle())


def ticks_in_view(axis, lo: float, hi: float) -> list[float]:  # type: ignore[no-untyped-def]
    lo, hi = min(lo, hi), max(lo, hi)
    return [t for t in axis.get_majorticklocs() if lo <= t <= hi]


@pytest.mark.parametrize("name", list(charts()))
def test_every_text_is_legible_at_320_px_and_the_axes_have_few_ticks(name: str) -> None:
    chart = charts()[name]
    fig = plot.figure(chart)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    scale = THUMB / fig.bbox.width
    assert (fig.bbox.width, fig.bbox.height) == plot.SIZE
    shown = texts(fig)
    boxes = [t.get_window_extent(renderer) for t in shown]
    for t, box in zip(shown, boxes):
        assert box.height * scale >= MIN_TEXT, f"{t.get_text()!r} is {box.height * scale:.1f} px tall at {THUMB} px"
        assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1, f"{t.get_text()!r} is cut off"
        assert fig.bbox.y0 - 1 <= box.y0 and box.y1 <= fig.bbox.y1 + 1, f"{t.get_text()!r} is cut off"
    for i, (a, box) in enumerate(zip(shown, boxes)):
        for b, other in zip(shown[i + 1:], boxes[i + 1:]):
            assert not box.overlaps(other), f"{a.get_text()!r} overlaps {b.get_text()!r}"
    assert title(fig).get_window_extent(renderer).height * scale >= 14, "the title is smaller than 14 px at 320 px"
    assert fig.get_suptitle().startswith(chart.series[0].ref) and " · " in fig.get_suptitle()
    ax = fig.axes[0]
    xs = ticks_in_view(ax.xaxis, *ax.get_xlim())
    ys = ticks_in_view(ax.yaxis, *ax.get_ylim())
    assert 2 <= len(xs) <= MAX_TICKS and 2 <= len(ys) <= MAX_TICKS, (len(xs), len(ys))
    labels = [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
    assert all(len(label) <= 6 for label in labels), labels
    if chart.unit:
        assert ax.get_ylabel() == chart.unit
    fig.clear()


def test_the_title_shows_field_and_window_and_stays_tall_after_scaling_to_320_px(tmp_path: Path) -> None:
    """The PNG as a client shows it: scaled to 320 px wide, the title's dark rows are at least
    as tall as its capitals and descenders at 15 px (a 14 px row band at least)."""
    chart = charts()["1h, a threshold"]
    png = plot.render(chart)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == plot.SIZE
    thumb = img.convert("L").resize((THUMB, round(img.size[1] * THUMB / img.size[0])), Image.LANCZOS)
    (tmp_path / "plot.png").write_bytes(png)
    thumb.save(tmp_path / "plot-320.png")
    print(f"the picture: {tmp_path / 'plot.png'}, as a thumbnail: {tmp_path / 'plot-320.png'}")
    w, h = thumb.size
    pixels = thumb.load()
    dark = [y for y in range(h // 4) if any(pixels[x, y] < 60 for x in range(w))]  # black on white
    assert dark and dark[0] < 10, f"no black title at the top of the thumbnail: {dark}"
    rows = next(i for i, y in enumerate(dark + [-1]) if y != dark[0] + i)  # the title's rows, from its top
    assert rows >= TITLE_ROWS, dark
    fig = plot.figure(chart)
    assert fig.get_suptitle() == "sim.temp · last 1h"
    fig.clear()


def test_numbers_too_long_for_the_note_drop_the_average() -> None:
    fig = plot.figure(charts()["kW"])
    assert fig.axes[0].get_title(loc="left") == "min 1500 · max 250000 W"
    fig.clear()


@pytest.mark.parametrize(
    ("window", "title"),
    [
        ("24h", "sim.temp · last 24h"),
        ("since 2025-11-01", "sim.temp · since 2025-11-01"),
        ("2025-11-01..2025-11-07", "sim.temp · 2025-11-01 – 2025-11-07"),
    ],
)
def test_the_title_names_the_window_as_typed(window: str, title: str) -> None:
    fig = plot.figure(Chart([temp("sim.temp", 3600, 60)], END - 3600, END, window))
    assert fig.get_suptitle() == title
    fig.clear()


def test_forged_names_in_the_picture_are_cleaned_and_cut_to_fit() -> None:
    """A field, unit and watch label from outside with a newline, a bidi override, NUL and
    mathtext (`$…$` that matplotlib would parse, and fail on): drawn as plain text on one
    line, U+FFFD for each control character, a long name cut in the middle with `…`."""
    forged = "evil\n\u202e$\\frac{a}$\x00" + "x" * 300 + ".temp"
    s = temp(forged, 3600, 60)
    s = Series(s.ref, "°C\r\n$^$", s.times, s.values, decimals=1)
    chart = Chart([s], END - 3600, END, "1h", [Threshold(21.0, "#7 " + forged + " > 21")])
    png = plot.render(chart)  # no mathtext error
    assert Image.open(io.BytesIO(png)).size == plot.SIZE
    fig = plot.figure(chart)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    shown = texts(fig)
    named = fig.get_suptitle()
    assert named.startswith("evil\ufffd\ufffd$\\frac") and "…" in named and named.endswith("x.temp · last 1h"), named
    for t in shown:
        text = t.get_text()
        assert text.isprintable(), repr(text)
        assert "$" not in text or not t.get_parse_math(), repr(text)
        box = t.get_window_extent(renderer)
        assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1, f"{text!r} is cut off"
    assert fig.axes[0].get_ylabel() == "°C\ufffd\ufffd$^$"
    fig.clear()


def test_more_fields_than_fit_are_named_first_and_counted() -> None:
    chart = charts()["4 fields"]
    fig = plot.figure(chart)
    assert fig.get_suptitle() == "room0.temperature +3 · last 6h"
    # The legend above the axes, in two columns: names cut in the middle, each still told apart.
    names = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(set(names)) == 4 and all(n.startswith(s.ref[:5]) and "…" in n for n, s in zip(names, chart.series))
    fig.clear()


@pytest.mark.parametrize(
    ("span", "labels"),
    [
        (60, [":45", "06:46", ":15", ":30"]),
        (900, ["06:35", "06:40", "06:45"]),
        (3600, ["06:00", "06:15", "06:30", "06:45"]),
        (86400, ["12:00", "18:00", "Dec 6", "06:00"]),
        (7 * 86400, ["Dec 1", "Dec 3", "Dec 5"]),
        (30 * 86400, ["Nov 8", "Nov 15", "Nov 22", "Dec 1"]),
        (365 * 86400, ["2025", "Apr", "Jul", "Oct"]),
        (3652 * 86400, ["2016", "2018", "2020", "2022", "2024"]),
    ],
)
def test_time_ticks_are_round_local_times_with_short_labels(span: float, labels: list[str]) -> None:
    end = END - 6  # 06:46:34 local
    assert [label for _, label in plot.time_ticks(end - span, end, BERLIN)] == labels


def test_time_ticks_from_a_minute_to_ten_years_are_at_most_five_in_order() -> None:
    """Spans 10 % apart, each ending at 14 times of day, two of them on DST changes."""
    ends = [END + 4111 * j for j in range(12)] + [1_774_746_000.0, 1_761_440_400.0]  # 2026-03-29, 2025-10-26
    span = 60.0
    while span <= 3653 * 86400:
        for end in ends:
            ticks = plot.time_ticks(end - span, end, BERLIN)
            times = [t for t, _ in ticks]
            assert 2 <= len(ticks) <= MAX_TICKS, (span, end, ticks)
            assert times == sorted(set(times)) and end - span <= times[0] and times[-1] <= end
            assert all(len(label) <= 6 for _, label in ticks), ticks
        span *= 1.1


@pytest.mark.parametrize(
    ("values", "labels"),
    [
        ([15.0, 17.5, 20.0, 22.5], ["15.0", "17.5", "20.0", "22.5"]),
        ([-10.0, -5.0, 0.0, 5.0], ["\u221210", "\u22125", "0", "5"]),
        ([20.001, 20.002, 20.003], ["20.001", "20.002", "20.003"]),
        ([0.0, 50_000.0, 100_000.0], ["0", "50k", "100k"]),
        ([1_000_000.0, 1_500_000.0, 2_000_000.0], ["1.0M", "1.5M", "2.0M"]),
    ],
)
def test_y_tick_labels_are_short_and_tell_neighbours_apart(values: list[float], labels: list[str]) -> None:
    assert plot.short_ticks(values) == labels
