"""The gateway's presence: one line on the devices' health and the gateway's own problems.

Shown as the session's presence status (gateway/xmpp/session.py), in rooms, and by
`iot-gateway run` in its systemd status.
"""

from __future__ import annotations

from ..hub import Hub


def health_summary(name: str, hub: Hub) -> tuple[str | None, str]:
    """(show, status) for the gateway's presence from the devices' health and the gateway's own problems."""
    nodes = list(hub.nodes.values())
    bad = [n for n in nodes if not n.health.healthy]
    ok = len(nodes) - len(bad)
    problems = [p.describe() for p in hub.problems.values()]  # `history: not saved: …`
    if not bad:
        text = f"{name}: {ok}/{len(nodes)} devices OK"
        return ("away", " · ".join([text, *problems])) if problems else (None, text)
    details = " · ".join([*(f"{n.id}: {n.health.describe()}" for n in bad), *problems])
    show = "xa" if ok == 0 else "away"
    return show, f"{name}: {ok}/{len(nodes)} OK · {details}"
