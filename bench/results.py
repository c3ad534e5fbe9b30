"""Benchmark results: targets, the printed table and `bench/results.json`."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

RESULTS = Path(__file__).resolve().parent / "results.json"


def cpu_model() -> str:
    """The CPU model, as /proc/cpuinfo names it (the machine's architecture without one)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()

Kind = Literal["ratio>=", "ratio<=", "over<=", "<"]


@dataclass(frozen=True)
class Target:
    """What a result must reach.

    `ratio>=` and `ratio<=` bound value / baseline; `over<=` bounds value -
    baseline (in the result's unit); `<` bounds the value itself.
    """

    kind: Kind
    limit: float

    def text(self, unit: str) -> str:
        """The target as the table shows it: `ratio >= 0.8`, `<= baseline + 25 MB`, `< 2 s`."""
        if self.kind == "ratio>=":
            return f"ratio >= {self.limit:g}"
        if self.kind == "ratio<=":
            return f"ratio <= {self.limit:g}"
        if self.kind == "over<=":
            return f"<= baseline + {self.limit:g} {unit}"
        return f"< {self.limit:g} {unit}"

    def met(self, value: float, baseline: float | None) -> bool:
        """Whether `value` (with `baseline`, for the relative kinds) reaches the target."""
        if self.kind == "<":
            return value < self.limit
        if baseline is None:
            raise ValueError(f"a {self.kind} target needs a baseline value")
        if self.kind == "over<=":
            return value - baseline <= self.limit
        ratio = value / baseline
        return ratio >= self.limit if self.kind == "ratio>=" else ratio <= self.limit


@dataclass(frozen=True)
class Result:
    """One measured number, its baseline from the same run, and its target (if the issue sets one)."""

    name: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        """value / baseline_value, or None without a baseline."""
        if self.baseline_value is None or self.baseline_value == 0:
            return None
        return self.value / self.baseline_value

    @property
    def met(self) -> bool | None:
        """Whether the target is reached; None when there is no target."""
        return None if self.target is None else self.target.met(self.value, self.baseline_value)

    def to_json(self) -> dict[str, Any]:
        """The record written to results.json."""
        ratio = self.ratio
        return {
            "name": self.name,
            "value": _round(self.value),
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_value": None if self.baseline_value is None else _round(self.baseline_value),
            "ratio": None if ratio is None else round(ratio, 3),
            "target": None if self.target is None else self.target.text(self.unit),
            "met": self.met,
        }


def _round(x: float) -> float:
    return round(x, 3) if abs(x) < 1000 else round(x, 1)


def num(x: float) -> str:
    """A number with as many digits as a benchmark can tell apart: 51,234 · 412 · 23.4 · 1.84."""
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


HEADER = ("benchmark", "value", "baseline (same run)", "ratio", "target", "met")


def rows(results: Iterable[Result]) -> list[tuple[str, ...]]:
    """The table's cells, one tuple per result."""
    out = []
    for r in results:
        base = "—"
        if r.baseline is not None:
            base = (
                r.baseline if r.baseline_value is None else f"{num(r.baseline_value)} {r.unit}: {r.baseline}"
            )
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}"
        target = "—" if r.target is None else r.target.text(r.unit)
        met = {None: "", True: "yes", False: "**no**"}[r.met]
        out.append((r.name, f"{num(r.value)} {r.unit}", base, ratio, target, met))
    return out


def table(results: Sequence[Result]) -> str:
    """A Markdown table of the results, aligned for the terminal and ready for the README."""
    cells = [HEADER, *rows(results)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(HEADER), rule, *(line(r) for r in cells[1:])])


def write(results: Sequence[Result], path: Path = RESULTS) -> None:
    """Write the results as a JSON list, replacing the file in one step."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([r.to_json() for r in results], indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def percentile(samples: Sequence[float], p: int) -> float:
    """The p-th percentile (1 <= p <= 99) of `samples`, interpolated between the closest ranks."""
    if len(samples) < 2:
        raise ValueError("a percentile needs at least two samples")
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1]
