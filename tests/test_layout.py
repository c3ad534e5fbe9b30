"""The layout's rules, read from the imports with `ast` (tests/layout.py): which folder may
use slixmpp and paho, that drivers and doors do not import each other, no import circles
(type-only and function-level imports included), no other module's underscore names, no
module over 800 lines. README "How it fits together" explains them."""

from __future__ import annotations

from tests.layout import MAX_LINES, broken_rules, circles, graph, modules, sizes


def test_the_layout_rules_hold() -> None:
    assert broken_rules() == []


def test_no_import_circles() -> None:
    assert circles(graph()) == []


def test_every_module_is_seen_and_none_is_too_long() -> None:
    found = modules()
    # The folders of the layout, each with its modules: nothing slipped past the reader.
    assert {"gateway.hub", "gateway.xmpp.session", "gateway.mqtt.broker", "gateway.demo.run", "devices.mqtt"} <= set(found)
    assert max(sizes().values()) <= MAX_LINES


def test_the_doors_stay_apart() -> None:
    """The flow runs driver -> hub -> listeners: no driver imports a door, the XMPP door imports no driver."""
    edges = graph()
    for name, used in edges.items():
        if name.startswith("devices"):
            assert not {u for u in used if u.startswith(("gateway.xmpp", "gateway.mqtt.homeassistant"))}, name
        if name.startswith("gateway.xmpp"):
            assert not {u for u in used if u.startswith("devices")}, name
