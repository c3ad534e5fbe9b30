"""`plot` (issue 15): a PNG through XEP-0363 on the real Prosody (http_file_share over HTTPS
with the suite's CA), delivered with an XEP-0066 OOB URL in chats and rooms; sparklines when
there is no picture; the drawing itself (gaps, decimation, thresholds) on its own."""

from __future__ import annotations

import asyncio
import io
import math
import os
import re
import secrets
import ssl
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import slixmpp
from PIL import Image
from slixmpp.xmlstream import ET
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from gateway import plot
from gateway.xmpp import upload
from gateway.auth import Actor
from gateway.commands import Commands
from gateway.hub import FieldSpec, History, Hub, Reading
from gateway.demo.localservers import Prosody, free_port
from gateway.plot import COLORS, SPARK, THRESHOLD_COLOR, Chart, Picture, Series
from gateway.xmpp.session import STRANGER_REPLY
from gateway.worker import Worker
from bench.lab import children
from tests.conftest import RunningGateway, XmppServer, gateway_config, start_gateway
from tests.peer import Peer
from tests.test_systemd import MDWE_WRAPPER, FakeSystemd, fake_systemd, gateway_env, stop_gateway, wait_ready, write_config

OOB = "jabber:x:oob"
UPLOAD = "urn:xmpp:http:upload:0"
ROOT = Path(__file__).resolve().parent.parent
DEVICES: list[dict[str, Any]] = [
    {
        "id": "sim",
        "driver": "simulated",
        "interval": 3600,  # one reading at start, then none: the test's series stays as set
        "fields": [
            {"name": "temp", "unit": "°C", "decimals": 1, "base": 20, "amplitude": 0, "noise": 0},
            {"name": "relay", "type": "boolean", "writable": True},
        ],
    }
]


def known_series(gw: RunningGateway) -> None:
    """sim.temp over the last hour: 10 for the first 30 min, then 20, one reading every 10 s."""
    f = gw.gateway.hub.field("sim.temp")
    now = time.time()
    f.history = History(f.history.maxlen, numeric=True)
    for i in range(361):
        t = now - 3600 + i * 10
        f.history.append(Reading(10.0 if t < now - 1800 else 20.0, t))
    f.latest = f.history[-1]


def levels(line: str) -> list[int]:
    """The heights (0-7) of a sparkline's characters, gaps left out."""
    return [SPARK.index(c) for c in line if c in SPARK]


def rising(reply: str, ref: str = "sim.temp") -> None:
    """The reply has `ref`'s sparkline, low in its first half and high in its second."""
    line = next(line for line in reply.splitlines() if line.startswith(ref))
    heights = levels(line)
    half = len(heights) // 2
    assert len(heights) >= 16, line
    assert max(heights[: half - 1]) < min(heights[half + 1:]), line
    assert "min 10.0, max 20.0 °C" in line


def fetch(url: str, ca_file: Path) -> bytes:
    """GET over HTTPS, trusting the suite's CA (and verifying the name)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "image/png"
        return resp.read()


def oob_url(msg: Any) -> str | None:
    return msg.xml.findtext(f"{{{OOB}}}x/{{{OOB}}}url")


def rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def pixels(img: Image.Image, color: str, tolerance: int = 40) -> list[tuple[int, int]]:
    """(x, y) of the pixels within `tolerance` of `color` (anti-aliasing blurs the edges)."""
    want = rgb(color)
    w, h = img.size
    data = img.convert("RGB").load()
    return [
        (x, y)
        for y in range(h)
        for x in range(w)
        if sum(abs(a - b) for a, b in zip(data[x, y], want)) <= tolerance
    ]


async def gateway_on(server: XmppServer, tmp_path: Path, **xmpp: Any) -> RunningGateway:
    gw = await start_gateway(
        gateway_config(server, tmp_path, devices=DEVICES, xmpp=xmpp), server.passwords["gateway"]
    )
    known_series(gw)
    return gw


# ---------------------------------------------------------------- through the real stack


async def test_viewer_gets_the_plot_as_an_inline_picture(
    xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]
) -> None:
    gw = await gateway_on(xmpp_server, tmp_path)
    victor = peers["victor"]
    try:
        assert (await victor.ask(gw.jid, "watch sim.temp > 15")).startswith("Watch #")
        # The condition holds already: its alert follows the reply; wait for it, so it is not the answer below.
        assert (await victor.reply_from(gw.jid)).startswith("ALERT #")
        victor.drain()
        victor.client.send_message(mto=gw.jid, mbody="plot sim.temp 1h", mtype="chat")
        msg = await victor.message_from(gw.jid, timeout=30)
    finally:
        await gw.stop()
    url = oob_url(msg)
    assert url and url.startswith("https://") and msg["body"] == url, msg
    png = await asyncio.to_thread(fetch, url, xmpp_server.prosody.ca_file)
    sample = tmp_path / "plot.png"
    sample.write_bytes(png)
    print(f"sample plot: {sample}")
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == plot.SIZE
    line = pixels(img, COLORS[0])
    w = img.size[0]
    left = [y for x, y in line if x < 0.4 * w]
    right = [y for x, y in line if x > 0.6 * w]
    assert len(left) > 100 and len(right) > 100
    # Image rows grow downwards: the first half of the hour (10 °C) is drawn lower.
    assert sum(left) / len(left) > sum(right) / len(right) + 100
    # victor's watch threshold (15) as a dashed line between the two levels.
    dashed = sorted(y for _x, y in pixels(img, THRESHOLD_COLOR, tolerance=90))
    assert len(dashed) > 100
    assert sum(right) / len(right) < dashed[len(dashed) // 2] < sum(left) / len(left)


def mapped(pid: int, name: str) -> bool:
    """Whether process `pid` has a file with `name` in its path mapped (a library it imported)."""
    return name in Path(f"/proc/{pid}/maps").read_text()


async def test_the_gateway_draws_in_a_child_process_and_keeps_no_matplotlib(
    xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer], fake_systemd: tuple[FakeSystemd, str]
) -> None:
    """`python -m gateway run` under PR_SET_MDWE (the unit's MemoryDenyWriteExecute, which the
    drawing process inherits): the picture arrives, drawn by a child that has matplotlib loaded,
    while the gateway process never maps it (so its memory after a plot stays as it was)."""
    fake, path = fake_systemd
    cfg = write_config(tmp_path, xmpp_server)
    cfg.chmod(0o600)
    env = gateway_env(NOTIFY_SOCKET=path, IOT_GATEWAY_XMPP_PASSWORD=xmpp_server.passwords["gateway"])
    proc = subprocess.Popen(
        [sys.executable, "-c", MDWE_WRAPPER, "run", "--config", str(cfg)],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        ready = await wait_ready(fake, proc)
        if proc.poll() == 77:
            pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
        assert ready and proc.poll() is None
        url = await peers["victor"].ask_for(
            xmpp_server.jid("gateway"), "plot sim.temp 1m", lambda body: body.startswith(("https://", "No picture")), timeout=60
        )
        assert url.startswith("https://"), url
        assert not mapped(proc.pid, "matplotlib")
        drawers = [pid for pid in children(proc.pid) if mapped(pid, "matplotlib")]  # ended WORKER_IDLE s after the plot
        assert len(drawers) == 1
    finally:
        code, err = stop_gateway(proc) if proc.poll() is None else (proc.returncode, proc.stderr.read() if proc.stderr else "")
    assert code == 0 and "Traceback" not in err, err
    img = Image.open(io.BytesIO(await asyncio.to_thread(fetch, url, xmpp_server.prosody.ca_file)))
    assert img.format == "PNG" and img.size == plot.SIZE
    # The seconds of readings since the start: a short line or a dot at the right edge.
    drawn = pixels(img, COLORS[0])
    assert drawn and all(x > 0.9 * img.size[0] for x, _y in drawn), drawn


async def test_plot_in_a_team_room_is_the_bare_url_with_oob(
    xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]
) -> None:
    room = f"plots-{secrets.token_hex(4)}@conference.localhost"
    gw = await gateway_on(xmpp_server, tmp_path, rooms=[room])
    victor = peers["victor"]
    try:
        for _ in range(100):
            if room in gw.session.rooms.joined:
                break
            await asyncio.sleep(0.1)
        await victor.join(room, "victor")
        victor.client.send_message(mto=room, mbody="gw: plot sim.temp 1h", mtype="groupchat")
        async with asyncio.timeout(30):
            while True:
                msg = await victor.room_messages.get()
                if msg["from"].resource == "gw":
                    break
    finally:
        await gw.stop()
    url = oob_url(msg)
    assert url and msg["body"] == url, msg["body"]
    png = await asyncio.to_thread(fetch, url, xmpp_server.prosody.ca_file)
    assert Image.open(io.BytesIO(png)).size == plot.SIZE


async def test_uploads_off_gives_a_sparkline_that_rises(
    xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]
) -> None:
    gw = await gateway_on(xmpp_server, tmp_path, uploads=False)
    victor = peers["victor"]
    try:
        victor.drain()
        victor.client.send_message(mto=gw.jid, mbody="plot sim.temp 1h", mtype="chat")
        msg = await victor.message_from(gw.jid)
    finally:
        await gw.stop()
    assert oob_url(msg) is None
    reply = msg["body"]
    assert reply.startswith("No picture: picture uploads are off in this gateway ([xmpp] uploads = false)")
    rising(reply)


async def test_stranger_gets_only_the_fixed_refusal(
    xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]
) -> None:
    gw = await gateway_on(xmpp_server, tmp_path)
    mallory = peers["mallory"]
    try:
        mallory.drain()
        mallory.client.send_message(mto=gw.jid, mbody="plot sim.temp 1h", mtype="chat")
        msg = await mallory.message_from(gw.jid)
        assert msg["body"] == STRANGER_REPLY and oob_url(msg) is None
        # Only that one line: nothing else follows (the first refusal is the last word).
        with pytest.raises(TimeoutError):
            await mallory.message_from(gw.jid, timeout=1.0)
    finally:
        await gw.stop()


@pytest.fixture(scope="module")
def other_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, XmppServer]]:
    """Two more Prosodys: one without any upload service, one whose service has a daily quota
    smaller than any plot. Started on first use."""
    servers: dict[str, XmppServer] = {}
    for name, extra in (("absent", None), ("quota", "  http_file_share_daily_quota = 100\n")):
        prosody = Prosody(tmp_path_factory.mktemp(f"prosody-{name}"), uploads=extra is not None)
        if extra:
            prosody.config.write_text(prosody.config.read_text() + extra)  # into the upload component
        passwords = {u: secrets.token_urlsafe(12) for u in ("gateway", "victor")}
        for user, password in passwords.items():
            prosody.register(user, password)
        prosody.start()
        servers[name] = XmppServer(prosody, passwords)
    yield servers
    for s in servers.values():
        s.prosody.stop()


@pytest.mark.parametrize(
    ("server", "why"),
    [
        ("absent", "No picture: the server localhost offers no file upload (XEP-0363)"),
        ("quota", "No picture: the server refused the upload: quota reached (Daily quota reached)"),
    ],
)
async def test_without_an_upload_service_or_when_refused_a_sparkline_says_why(
    server: str, why: str, other_servers: dict[str, XmppServer], tmp_path: Path
) -> None:
    xs = other_servers[server]
    gw = await gateway_on(xs, tmp_path)
    victor = await xs.peer("victor").start()
    try:
        msg = await victor_asks(victor, gw.jid, "plot sim.temp 1h")
    finally:
        await victor.stop()
        await gw.stop()
    assert oob_url(msg) is None
    assert msg["body"].startswith(why + ". Over the last 1h:"), msg["body"]
    rising(msg["body"])


class SlowPut:
    """An HTTPS upload target on loopback (the suite's certificate for `localhost`) that takes
    a PUT's body one byte every 5 s and answers only once it has all of it."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.started = asyncio.Event()  # a PUT's head has arrived
        self.answered = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"PUT /slot/"), head[:40]
            self.started.set()
            length = int(re.search(rb"content-length: *(\d+)", head, re.I)[1])  # type: ignore[index]
            for _ in range(length):  # ended by stop() long before
                if not await reader.read(1):
                    return
                await asyncio.sleep(5)
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
            self.answered += 1
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class UploadComponent:
    """An XEP-0114 component of the server that offers XEP-0363 and gives slots on `put_port`."""

    def __init__(self, prosody: Prosody, port: int, secret: str, put_port: int) -> None:
        self.jid = f"files.{prosody.domain}"
        self.put = f"https://{prosody.domain}:{put_port}/slot"
        c = slixmpp.ComponentXMPP(self.jid, secret, "127.0.0.1", port)
        c.register_plugin("xep_0030")
        c.plugin["xep_0030"].add_feature(UPLOAD)
        c.register_handler(Callback("slot", MatchXPath(f"{{{c.default_ns}}}iq/{{{UPLOAD}}}request"), self._slot))
        self.client = c
        self.online = asyncio.Event()
        c.add_event_handler("session_start", lambda _e: self.online.set())

    def _slot(self, iq: Any) -> None:
        name = iq.xml.find(f"{{{UPLOAD}}}request").get("filename")
        reply = iq.reply(clear=True)
        slot = ET.SubElement(reply.xml, f"{{{UPLOAD}}}slot")
        ET.SubElement(slot, f"{{{UPLOAD}}}put", {"url": f"{self.put}/{name}"})
        ET.SubElement(slot, f"{{{UPLOAD}}}get", {"url": f"{self.put}/{name}"})
        reply.send()

    async def start(self) -> None:
        self.client.connect()
        await asyncio.wait_for(self.online.wait(), 10)

    async def stop(self) -> None:
        try:
            await asyncio.wait_for(self.client.disconnect(wait=0.5), 3)
        except Exception:
            self.client.abort()


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[XmppServer, int, str]]:
    """A Prosody without an upload service of its own, that takes an external component
    `files.localhost` (the test's, with a slow PUT target): (server, component port, secret)."""
    prosody = Prosody(tmp_path_factory.mktemp("prosody-slow"), uploads=False)
    port, secret = free_port(), secrets.token_urlsafe(12)
    prosody.config.write_text(
        f'component_ports = {{ {port} }}\ncomponent_interfaces = {{ "127.0.0.1" }}\n'
        + prosody.config.read_text()
        + f'\nComponent "files.{prosody.domain}"\n  component_secret = "{secret}"\n'
    )
    passwords = {u: secrets.token_urlsafe(12) for u in ("gateway", "victor")}
    for user, password in passwords.items():
        prosody.register(user, password)
    prosody.start()
    yield XmppServer(prosody, passwords), port, secret
    prosody.stop()


@pytest.mark.timeout(150)
async def test_a_slow_upload_holds_up_neither_the_next_command_nor_the_plot_past_its_deadline(
    slow_server: tuple[XmppServer, int, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload target takes a byte every 5 s. A `read` sent once the plot's PUT is under way
    is answered first, and the plot comes at the upload deadline as a sparkline saying why."""
    monkeypatch.setattr(upload, "DEADLINE", 5.0)  # not 20 s: still a byte at most, and ample for the `read`
    xs, port, secret = slow_server
    target = SlowPut(xs.prosody.cert, xs.prosody.key)
    component = UploadComponent(xs.prosody, port, secret, await target.start())
    await component.start()
    gw = await gateway_on(xs, tmp_path)
    victor = await xs.peer("victor").start()
    try:
        victor.drain()
        victor.client.send_message(mto=gw.jid, mbody="plot sim.temp 1h", mtype="chat")
        await asyncio.wait_for(target.started.wait(), 30)  # the picture is going up, slowly
        victor.client.send_message(mto=gw.jid, mbody="read sim.temp", mtype="chat")
        first = await victor.message_from(gw.jid, timeout=15)
        assert first["body"].startswith("sim.temp = 20.0 °C"), first["body"]
        plotted = await victor.message_from(gw.jid, timeout=upload.DEADLINE + 30)
    finally:
        await victor.stop()
        await gw.stop()
        await component.stop()
        await target.stop()
    assert target.answered == 0
    assert oob_url(plotted) is None
    assert plotted["body"].startswith("No picture: upload failed: timed out. Over the last 1h:"), plotted["body"]
    rising(plotted["body"])


async def victor_asks(victor: Peer, to: str, body: str) -> Any:
    victor.drain()
    victor.client.send_message(mto=to, mbody=body, mtype="chat")
    return await victor.message_from(to, timeout=30)


# ---------------------------------------------------------------- the command, in process


def hub_with_series() -> Hub:
    hub = Hub(5000)
    hub.add_node("sim", "Sim", "simulated", [
        FieldSpec("temp", unit="°C", decimals=1), FieldSpec("hum", unit="%"),
        FieldSpec("mode", type="string"), FieldSpec("relay", type="boolean"),
    ])
    now = time.time()
    for i in range(361):
        t = now - 3600 + i * 10
        hub.field("sim.temp").history.append(Reading(10.0 if t < now - 1800 else 20.0, t))
    return hub


class FakeUploads:
    """Accepts every picture, in process: for what happens before and around the upload."""

    def __init__(self) -> None:
        self.files: list[bytes] = []

    async def ready(self) -> None:
        return None

    async def upload(self, data: bytes, filename: str, content_type: str) -> Picture:
        self.files.append(data)
        return Picture(f"https://files.example/{filename}")


VIEWER = Actor("v@x", "viewer", "chat")


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("plot", "Say which field. Usage: plot device.field"),
        ("plot 6h", "Say which field. Usage:"),
        ("plot sim.temp 90", "Give the window with its unit, like 15m, 6h or 2d. Usage:"),
        ("plot sim.temp 10s", "The window must be from 1m to 10y. Usage:"),
        ("plot sim.temp 11y", "The window must be from 1m to 10y. Usage:"),
        ("plot sim.temp 7x", "Error: '7x' is not a window; use 30m, 6h, 7d, 3w, 6mo, 1y, since 2026-03-01"),
        ("plot sim.temp sim.hum", "Error: sim.temp is in °C and sim.hum in %: plot fields of one unit together."),
        ("plot sim.mode", "Error: sim.mode holds string values; only numbers and on/off fields can be plotted."),
        ("plot sim.relay sim.temp", "Error: sim.relay and sim.temp are not both on/off fields"),
        ("plot sim.temp sim.temp sim.temp sim.temp sim.temp", "No picture"),  # the same field once
        ("plot a.b c.d e.f g.h i.j", "At most 4 fields in one plot. Usage:"),
        ("plot sim.nope", "Error: sim has no field 'nope'"),
        ("plot sim.hum 1h", "sim.hum: no readings in the last 1h."),
    ],
)
async def test_bad_plot_requests_get_a_specific_answer(command: str, reply: str) -> None:
    commands = Commands(hub_with_series())
    assert (await commands.run(command, VIEWER)).startswith(reply)


async def test_history_has_a_sparkline_on_top() -> None:
    reply = await Commands(hub_with_series()).run("history sim.temp 1h", VIEWER)
    body = reply.splitlines()
    assert body[0].startswith("sim.temp over the last 1h")
    heights = levels(body[1])
    assert len(heights) == plot.SPARK_WIDTH and heights[:8] == [0] * 8 and heights[-8:] == [7] * 8


def drawing_process(commands: Commands, code: str, deadline: float = plot.DRAW_DEADLINE) -> None:
    """Make `commands` draw in a child that runs `code` first (with `plot` and `os` imported),
    as a stand-in for a broken or missing matplotlib there."""
    child = f"import os\nfrom gateway import plot, plotworker\n{code}\nplotworker.main()"
    commands.plots.worker = Worker("the drawing process", [sys.executable, "-c", child],
                                   deadline=deadline, idle=plot.WORKER_IDLE)


async def test_rendering_runs_in_a_child_process() -> None:
    commands = Commands(hub_with_series())
    commands.plots.uploads = uploads = FakeUploads()
    try:
        reply = await commands.run("plot sim.temp 1h", VIEWER)
        child = commands.plots.worker.pid
    finally:
        await commands.plots.close()
    assert isinstance(reply, Picture) and reply.startswith("https://files.example/plot-")
    assert child is not None and child != os.getpid()
    assert Image.open(io.BytesIO(uploads.files[0])).size == plot.SIZE
    assert commands.plots.worker.pid is None  # closed with the gateway


async def test_the_drawing_process_ends_when_idle_and_the_next_plot_starts_another() -> None:
    commands = Commands(hub_with_series())
    commands.plots.uploads = uploads = FakeUploads()
    commands.plots.worker.idle = 0.2
    try:
        assert isinstance(await commands.run("plot sim.temp 1h", VIEWER), Picture)
        first = commands.plots.worker.pid
        assert first is not None
        for _ in range(100):  # bounded: 10 s
            if not Path(f"/proc/{first}").exists():
                break
            await asyncio.sleep(0.1)
        assert not Path(f"/proc/{first}").exists() and commands.plots.worker.pid is None
        assert isinstance(await commands.run("plot sim.temp 1h", VIEWER), Picture)
        assert commands.plots.worker.pid not in (None, first)
    finally:
        await commands.plots.close()
    assert len(uploads.files) == 2


async def test_a_render_that_fails_answers_with_a_clear_error() -> None:
    commands = Commands(hub_with_series())
    commands.plots.uploads = FakeUploads()
    drawing_process(commands, "def broken(chart):\n    raise ValueError('no room for the axes')\nplot.render = broken")
    try:
        assert await commands.run("plot sim.temp 1h", VIEWER) == (
            "Error: could not draw the plot (ValueError: no room for the axes)."
        )
    finally:
        await commands.plots.close()


async def test_without_matplotlib_the_plot_is_a_sparkline() -> None:
    commands = Commands(hub_with_series())
    commands.plots.uploads = FakeUploads()
    drawing_process(commands, "import sys\nsys.modules['matplotlib'] = None  # as if not installed")
    try:
        reply = await commands.run("plot sim.temp 1h", VIEWER)
    finally:
        await commands.plots.close()
    assert reply.startswith("No picture: the plotting library is not installed (matplotlib")
    rising(reply)


async def test_a_killed_drawing_process_gives_a_sparkline_and_the_next_plot_a_picture(tmp_path: Path) -> None:
    """The first drawing process dies of SIGKILL while drawing (as the OOM killer would do it);
    the reply says so over sparklines, and the next plot starts a new process."""
    marker = tmp_path / "killed-once"
    commands = Commands(hub_with_series())
    commands.plots.uploads = uploads = FakeUploads()
    drawing_process(commands, (
        "real = plot.render\n"
        "def once(chart):\n"
        f"    if not os.path.exists({str(marker)!r}):\n"
        f"        open({str(marker)!r}, 'w').close()\n"
        "        os.kill(os.getpid(), 9)\n"
        "    return real(chart)\n"
        "plot.render = once"
    ))
    try:
        first = await commands.run("plot sim.temp 1h", VIEWER)
        second = await commands.run("plot sim.temp 1h", VIEWER)
    finally:
        await commands.plots.close()
    # "(killed by SIGKILL)" follows when asyncio's child watcher got the exit status (not always in a full run).
    assert first.startswith("No picture: the drawing process ended without answering"), first
    rising(first)
    assert isinstance(second, Picture) and len(uploads.files) == 1
    assert Image.open(io.BytesIO(uploads.files[0])).size == plot.SIZE


async def test_a_drawing_past_its_deadline_gives_a_sparkline() -> None:
    commands = Commands(hub_with_series())
    commands.plots.uploads = FakeUploads()
    drawing_process(commands, "import time\nplot.render = lambda chart: time.sleep(60)", deadline=1)
    try:
        reply = await commands.run("plot sim.temp 1h", VIEWER)
    finally:
        await commands.plots.close()
    assert reply.startswith("No picture: the drawing process took longer than 1 s. Over the last 1h:"), reply
    rising(reply)


def test_the_plotting_library_is_not_loaded_until_the_first_plot() -> None:
    code = (
        "import sys, gateway.app, gateway.xmpp.session, gateway.commands, gateway.plot, gateway.xmpp.upload, gateway.cli\n"
        "print(sorted(m for m in ('matplotlib', 'numpy', 'PIL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- drawing


def test_sparkline_breaks_where_readings_stop() -> None:
    times = [float(t) for t in range(0, 3600, 10) if not 1200 <= t < 2400]
    values = [1.0 if t < 1800 else 2.0 for t in times]
    line = plot.spark(times, values, 0, 3600, width=30, gap=plot.gap_after(times, None))
    assert line[:9] == "▁" * 9 and line[-9:] == "█" * 9
    assert line[11:19] == " " * 8  # 20 minutes without readings: no line across them


def test_gap_threshold_is_three_median_intervals_or_stale_after() -> None:
    times = [0.0, 10.0, 20.0, 30.0, 100.0]
    assert plot.gap_after(times, None) == 30.0
    assert plot.gap_after(times, 120.0) == 120.0


def test_a_day_at_one_reading_per_second_is_decimated_keeping_peaks_and_gaps() -> None:
    np = pytest.importorskip("numpy")
    start = 1_700_000_000.0
    times = [start + i for i in range(86_400) if not 40_000 <= i < 43_600]  # an hour offline
    values = [20 + math.sin(i / 3000) for i in range(len(times))]
    values[10_000] = 99.0  # one spike
    s = Series("sim.temp", "°C", times, values)
    x, y = plot._points(np, s, start, start + 86_400, 720)
    assert len(x) <= 4 * 720 + 8
    assert np.nanmax(y) == 99.0 and np.nanmin(y) == min(values)
    gaps = np.flatnonzero(np.isnan(y))
    assert len(gaps) == 1 and x[gaps[0] - 1] < start + 40_000 and x[gaps[0] + 1] >= start + 43_600


def test_boolean_fields_are_drawn_as_steps() -> None:
    now = 1_700_000_000.0
    times = [now - 3600 + i * 60 for i in range(61)]
    s = Series("sim.relay", "", times, [float((i // 10) % 2) for i in range(61)], boolean=True)
    img = Image.open(io.BytesIO(plot.render(Chart([s], now - 3600, now, "1h"))))
    assert img.size == plot.SIZE
    line = pixels(img, COLORS[0], tolerance=10)
    per_row = Counter(y for _x, y in line)
    # Steps: the line lies on two levels (off, on) joined by vertical edges, one per change
    # (5 here, each 4-5 px wide); a line drawn point to point would cross over in slants.
    levels = [y for y, count in per_row.items() if count > 100]
    top, bottom = min(levels), max(levels)
    assert bottom - top > 150
    assert len({x for x, y in line if top + 5 < y < bottom - 5}) <= 5 * 5
