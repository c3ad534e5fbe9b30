"""The benchmark harness's bookkeeping on made-up numbers: targets, table, results.json, the
TOML it writes gateway configs in. Nothing here is timed; `make bench` does the measuring."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from bench.footprint import devices_200
from bench.lab import toml
from bench.results import Result, Target, percentile, table, write
from gateway.config import parse

RESULTS = [
    Result(
        "mqtt_ingest", 20_000.0, "readings/s", "bare paho-mqtt subscriber", 50_000.0, Target("ratio>=", 0.8)
    ),
    Result("readout_latency.p50", 3.0, "ms", "XEP-0199 ping", 1.5, Target("ratio<=", 2)),
    Result("readout_latency.p99", 9.0, "ms", "XEP-0199 ping", 3.0),
    Result("rss_200_fields", 62.5, "MB", "bare imports", 40.0, Target("over<=", 25)),
    Result("startup", 1.3, "s", "bare imports", 0.2, Target("over<=", 1.0)),
    Result("scale_10k_fields.readout", 0.5, "s", target=Target("<", 2.0)),
]
KEYS = {"name", "value", "unit", "baseline", "baseline_value", "ratio", "target", "met"}


def test_targets_and_ratios() -> None:
    assert [r.ratio for r in RESULTS] == [0.4, 2.0, 3.0, 1.5625, 6.5, None]
    assert [r.met for r in RESULTS] == [False, True, None, True, False, True]
    assert Target("over<=", 25).met(65.0, 40.0) and not Target("over<=", 25).met(65.1, 40.0)
    assert Target("<", 2.0).met(1.99, None) and not Target("<", 2.0).met(2.0, None)
    with pytest.raises(ValueError, match="needs a baseline"):
        Target("ratio>=", 0.8).met(1.0, None)


def test_results_json(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write(RESULTS, path)
    data = json.loads(path.read_text())
    assert [set(d) for d in data] == [KEYS] * len(RESULTS)
    assert data[0] == {
        "name": "mqtt_ingest",
        "value": 20000.0,
        "unit": "readings/s",
        "baseline": "bare paho-mqtt subscriber",
        "baseline_value": 50000.0,
        "ratio": 0.4,
        "target": "ratio >= 0.8",
        "met": False,
    }
    assert data[3]["target"] == "<= baseline + 25 MB" and data[3]["met"] is True
    assert data[5] == {
        "name": "scale_10k_fields.readout",
        "value": 0.5,
        "unit": "s",
        "baseline": None,
        "baseline_value": None,
        "ratio": None,
        "target": "< 2 s",
        "met": True,
    }
    assert not path.with_name("results.json.tmp").exists()


def test_table() -> None:
    lines = table(RESULTS).splitlines()
    assert len(lines) == 2 + len(RESULTS)
    assert len({len(line) for line in lines}) == 1  # columns line up
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["benchmark", "value", "baseline (same run)", "ratio", "target", "met"]
    assert cells[2] == [
        "mqtt_ingest",
        "20,000 readings/s",
        "50,000 readings/s: bare paho-mqtt subscriber",
        "0.40",
        "ratio >= 0.8",
        "**no**",
    ]
    assert cells[4][1:] == ["9.00 ms", "3.00 ms: XEP-0199 ping", "3.00", "—", ""]
    assert cells[7][1:] == ["0.50 s", "—", "—", "< 2 s", "yes"]


def test_percentile() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert percentile(samples, 50) == 50.5
    assert percentile(samples, 99) == pytest.approx(99.01)
    with pytest.raises(ValueError):
        percentile([1.0], 50)


def test_toml_writes_a_config_the_gateway_reads() -> None:
    data = {
        "gateway": {"name": 'bench "g200"', "history_size": 1000, "rate_window": 1.5},
        "contacts": [{"jid": "alice@localhost", "role": "admin"}],
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
        "devices": devices_200(),
    }
    text = toml(data)
    assert tomllib.loads(text) == data
    config = parse(tomllib.loads(text))
    assert len(config.devices) == 40 and sum(len(d.fields) for d in config.devices) == 200
    with pytest.raises(ValueError, match="only tables"):
        toml({"name": "x"})
