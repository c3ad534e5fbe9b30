"""A fleet of 20 gateways in one room answering `all: status` (issue 16, docs/fleet.md).

The 20 gateways run in this process (20 hubs and XMPP sessions on one event loop):
20 gateway processes of about 60 MB each would measure the 2-core machine's
scheduler more than the fleet. Each has its own account on the benchmark's
Prosody, one simulated device, and the others as `[xmpp] peers`; the first
creates the room. A contact (alice, admin of all of them) joins and asks
`all: status`: timed from sending until the 20th answer arrives. Baseline: the
same, with the turn-taking off (`fleet.WINDOW = 0`: everyone answers at once),
which is what the stack itself needs to carry 20 answers.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from pathlib import Path
from typing import Any

from slixmpp import Message

import gateway.xmpp.fleet as fleet
from gateway.app import Gateway
from gateway.config import parse
from gateway.xmpp.session import Session

from .clients import BenchError, Client
from .lab import Lab
from .results import Result, Target

GATEWAYS = 20
ROUNDS = 7
QUIET = 1.5  # seconds without a message after the last answer, to catch a second answer


def config(lab: Lab, work: Path, n: int, passwords: dict[str, str], room: str) -> dict[str, Any]:
    """Gateway `n` of the fleet: its own account and state, the others as peers, alice as admin."""
    user = f"fleet{n:02d}"
    return {
        "gateway": {"name": f"Site {n:02d}", "state_dir": str(work / "fleet" / user), "rate_limit": 10_000, "rate_window": 1},
        "xmpp": {
            "jid": lab.jid(user),
            "password": passwords[user],
            "server": lab.prosody.address,
            "ca_file": str(lab.prosody.ca_file),
            "rooms": [room],
            "peers": [lab.jid(u) for u in passwords],
            "omemo": "off",  # 20 in-process gateways: OMEMO's cost is bench/omemo.py's to measure
        },
        "contacts": [{"jid": lab.jid("alice"), "role": "admin"}],
        "devices": [
            {"id": f"site{n:02d}", "driver": "simulated", "interval": 10, "fields": [{"name": "temp", "unit": "°C"}]}
        ],
    }


async def start(data: dict[str, Any]) -> tuple[Gateway, Session]:
    """A gateway and its session, online, as `iot-gateway run` starts them."""
    cfg = parse(data)
    gw = Gateway(cfg)
    await gw.start()
    session = Session(cfg, gw.hub, gw.commands, data["xmpp"]["password"], (gw.watches, gw.reverts))
    session.connect()
    await asyncio.wait_for(session.online.wait(), 30)
    return gw, session


async def joined(session: Session, room: str) -> None:
    """Wait (at most 60 s) until `session` has joined `room`."""
    for _ in range(600):
        if room in session.rooms.joined:
            return
        await asyncio.sleep(0.1)
    raise BenchError(f"{session.xcfg.jid} did not join {room}")


async def ask_all(alice: Client, room: str, nicks: set[str], inbox: asyncio.Queue[tuple[float, Message]]) -> tuple[float, list[str]]:
    """`all: status` in the room: (seconds until the last gateway answered, nicks in the order they answered)."""
    while not inbox.empty():
        inbox.get_nowait()
    sent = time.perf_counter()
    alice.client.send_message(mto=room, mbody="all: status", mtype="groupchat")
    order: list[str] = []
    last = sent
    deadline = sent + 10
    while True:
        timeout = QUIET if set(order) >= nicks else deadline - time.perf_counter()
        try:
            at, msg = await asyncio.wait_for(inbox.get(), max(timeout, 0.01))
        except TimeoutError:
            break
        nick = msg["from"].resource
        if nick in nicks:
            order.append(nick)
            last = at
    if set(order) != nicks:
        raise BenchError(f"`all: status` got answers from {len(set(order))} of {len(nicks)} gateways")
    return last - sent, order


async def fleet_20(lab: Lab, work: Path) -> list[Result]:
    """Time until the last of 20 gateways answered `all: status`, and messages per gateway."""
    passwords = {f"fleet{n:02d}": secrets.token_urlsafe(12) for n in range(GATEWAYS)}
    for user, password in passwords.items():
        lab.prosody.register(user, password)
    room = f"fleet-{secrets.token_hex(4)}@{lab.prosody.muc}"
    running: list[tuple[Gateway, Session]] = []
    alice = lab.client("alice")
    alice.client.register_plugin("xep_0045")
    inbox: asyncio.Queue[tuple[float, Message]] = asyncio.Queue()
    alice.client.add_event_handler("groupchat_message", lambda m: inbox.put_nowait((time.perf_counter(), m)))
    window = fleet.WINDOW
    try:
        running.append(await start(config(lab, work, 0, passwords, room)))
        await joined(running[0][1], room)  # the first one creates the room and makes the others members
        running += await asyncio.gather(*(start(config(lab, work, n, passwords, room)) for n in range(1, GATEWAYS)))
        for _, session in running:
            await joined(session, room)
        nicks = {s.rooms.nicks[room] for _, s in running}
        await alice.start()
        await alice.client.plugin["xep_0045"].join_muc_wait(room, "alice", maxstanzas=0, timeout=30)
        await ask_all(alice, room, nicks, inbox)  # warm-up
        spread, burst, in_order, answers = [], [], 0, 0
        for _ in range(ROUNDS):
            fleet.WINDOW = window
            seconds, order = await ask_all(alice, room, nicks, inbox)
            spread.append(seconds)
            in_order += order == sorted(order)
            answers = max(answers, len(order))
            fleet.WINDOW = 0.0
            burst.append((await ask_all(alice, room, nicks, inbox))[0])
    finally:
        fleet.WINDOW = window
        await alice.stop()
        for gw, session in running:
            await session.stop()
            await gw.stop()
    base = f"the same 20 answering at once (no turns), median of {ROUNDS}"
    return [
        Result("fleet_20.last_answer", statistics.median(spread), "s", base, statistics.median(burst), Target("<", 1.5)),
        Result("fleet_20.messages_per_gateway", answers / GATEWAYS, "msgs", None, None, Target("<", 1.01)),
        Result("fleet_20.in_nick_order", in_order / ROUNDS * 100, "% of rounds"),
    ]
