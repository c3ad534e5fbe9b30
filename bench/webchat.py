"""The web chat in a real browser: how long from opening the page to the gateway's first answer,
and from sending `plot` to the picture shown, p50 of TRIES each, against the same commands from a
bare slixmpp client in the same run (what the browser, Converse and the page add).

The page is `make demo`'s (gateway/demo/webchat.py) on a Prosody of its own; the browser is
Debian's Chromium under Playwright, trusting the Prosody's CA through an NSS database in a HOME of
its own (no certificate error is ignored). tests/test_webchat.py launches it the same way.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from gateway.demo import webchat
from gateway.demo.localservers import Prosody

from .clients import BenchError, Client
from .lab import RESOURCE, GatewayProcess, Lab, fill_history
from .results import Result

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "converse"  # gitignored; npm installs Converse here once (tests too)
CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright never downloads a browser here
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TRIES = 20
WAIT = 30_000  # ms for anything to show in the page
NAME = "Bench GW"


def missing() -> str | None:
    """What the browser benchmark and test lack on this machine (None: nothing)."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    for tool, package in ((CHROMIUM, "chromium"), ("certutil", "libnss3-tools"), ("npm", "npm")):
        if shutil.which(tool) is None:
            return f"{tool} not found: install the Debian package {package} (make test does)"
    return None


def trusting_home(home: Path, ca_file: Path) -> Path:
    """A HOME whose NSS database (~/.pki/nssdb, where Chromium on Linux looks) trusts `ca_file` as a CA."""
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True, exist_ok=True)
    cmds = [["certutil", "-A", "-d", f"sql:{db}", "-n", "iot-gateway CA", "-t", "C,,", "-i", str(ca_file)]]
    if not (db / "cert9.db").exists():  # `-N` on an existing database asks for its password, forever
        cmds.insert(0, ["certutil", "-N", "-d", f"sql:{db}", "--empty-password"])
    for cmd in cmds:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(cmd[:2])} did not finish in 30 s (waiting for a password?)") from None
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed: {r.stderr.strip() or r.stdout.strip()}")
    return home


async def launch(pw: Any, home: Path) -> Any:
    """Debian's Chromium, headless, with `home` (see `trusting_home`) as its HOME."""
    return await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, env={**os.environ, "HOME": str(home)})


def site_server(
    root: Path, users: list[str], name: str = NAME, nagle: bool = False
) -> tuple[Prosody, dict[str, str]]:
    """A Prosody serving the demo's page (its page, websocket and uploads on one HTTPS port) for a
    gateway called `name`, with `users` registered (random passwords) and alice filled in the
    login form; not started yet. `nagle` as in localservers.Prosody."""
    dist = webchat.install_converse(CACHE)
    prosody = Prosody(root / "prosody", web=root / "site", nagle=nagle)
    webchat.write_site(root / "site", dist, prosody.ca_file, f"gateway@{prosody.domain}", RESOURCE,
                       f"alice@{prosody.domain}", name)
    passwords = {user: secrets.token_urlsafe(12) for user in users}
    for user, password in passwords.items():
        prosody.register(user, password)
    return prosody, passwords


class Page:
    """One logged-in Converse page with the gateway's chat open."""

    def __init__(self, page: Any, gateway: str):
        self.page = page
        self.chat = page.locator(f'converse-chat[jid="{gateway}"]')
        self.gateway = gateway

    async def login(self, url: str, password: str) -> None:
        """Open the page, log in (the login form comes filled with alice), open the gateway's chat."""
        from playwright.async_api import expect

        await self.page.goto(url)
        await self.page.fill("#converse-login-password", password, timeout=WAIT)
        await self.page.locator("#converse-login button[type=submit]").first.click()
        link = self.page.locator(f'converse-roster-contact a.open-chat[data-jid="{self.gateway}"]')
        await link.click(timeout=WAIT)
        await expect(self.chat.locator("textarea.chat-textarea")).to_be_visible(timeout=WAIT)

    async def say(self, text: str) -> None:
        box = self.chat.locator("textarea.chat-textarea")
        await box.fill(text)
        await box.press("Enter")

    async def answered(self, text: str, count: int) -> None:
        """Wait until `count` messages in the chat contain `text`."""
        from playwright.async_api import expect

        await expect(self.chat.locator(".chat-msg__text").filter(has_text=text)).to_have_count(count, timeout=WAIT)

    async def pictures(self, count: int) -> None:
        """Wait until the chat shows `count` pictures, the last one loaded."""
        from playwright.async_api import expect

        images = self.chat.locator("img.chat-image")
        await expect(images).to_have_count(count, timeout=WAIT)
        await expect(images.last).to_have_js_property("complete", True, timeout=WAIT)
        if await images.last.evaluate("img => img.naturalWidth") == 0:
            raise BenchError("the plot did not load in the page")


async def webchat_latency(lab: Lab, work: Path) -> list[Result]:
    """Page load → first answer and `plot` → picture in the browser, against a slixmpp client doing the same."""
    from playwright.async_api import async_playwright

    root = work / "webchat"
    prosody, passwords = site_server(root, ["gateway", "alice"], nagle=lab.nagle)
    prosody.start()
    data = lab.config("webchat", [{"id": "sim", "driver": "simulated", "interval": 1,
                                   "fields": [{"name": "temp", "unit": "°C", "decimals": 1}]}])
    data["gateway"]["name"] = NAME
    data["xmpp"].update(jid=f"gateway@{prosody.domain}", password=passwords["gateway"], server=prosody.address,
                        ca_file=str(prosody.ca_file))
    data["contacts"] = [{"jid": f"alice@{prosody.domain}", "role": "admin"}]
    fill_history(Path(data["gateway"]["state_dir"]), ["sim.temp"], 3600, every=1.0)
    gw = GatewayProcess(root / "gateway", data)
    url = f"https://localhost:{prosody.https_port}/"
    jid = f"gateway@{prosody.domain}"
    alice = Client(f"alice@{prosody.domain}", passwords["alice"], prosody.address, prosody.ca_file)
    try:
        await alice.start()
        await alice.presence_after(jid, gw.start(), timeout=60)
        bare_login = [await _login_and_read(prosody, passwords["alice"], jid) for _ in range(TRIES)]
        bare_plot = [await _plot(alice, jid) for _ in range(TRIES)]
        await alice.stop()
        home = trusting_home(root / "home", prosody.ca_file)
        async with async_playwright() as pw:
            browser = await launch(pw, home)
            try:
                loads = []
                for i in range(TRIES + 1):  # the first warms the browser's cache, as a returning user's
                    context = await browser.new_context()
                    page = Page(await context.new_page(), jid)
                    start = time.perf_counter()
                    await page.login(url, passwords["alice"])
                    await page.say("read sim")
                    await page.answered("temp", 1)
                    if i:
                        loads.append(time.perf_counter() - start)
                    await context.close()
                context = await browser.new_context()
                page = Page(await context.new_page(), jid)
                await page.login(url, passwords["alice"])
                plots = []
                for i in range(TRIES):
                    start = time.perf_counter()
                    await page.say("plot sim.temp 1h")
                    await page.pictures(i + 1)
                    plots.append(time.perf_counter() - start)
                await context.close()
            finally:
                await browser.close()
    finally:
        gw.stop()
        prosody.stop()
    print(f"webchat: page load to first answer {_ms(loads)}; plot to picture {_ms(plots)} (p50, min-max, {TRIES} tries)")
    return [
        Result("webchat.page_to_answer", statistics.median(loads) * 1000, "ms",
               "a slixmpp client: connect, log in, `read sim` answered", statistics.median(bare_login) * 1000),
        Result("webchat.plot_to_picture", statistics.median(plots) * 1000, "ms",
               "`plot sim.temp 1h` from a slixmpp client until the picture's URL arrives", statistics.median(bare_plot) * 1000),
    ]


async def _login_and_read(prosody: Prosody, password: str, jid: str) -> float:
    """Seconds for a new slixmpp client to connect, log in and get `read sim` answered."""
    start = time.perf_counter()
    client = Client(f"alice@{prosody.domain}", password, prosody.address, prosody.ca_file)
    try:
        await client.start()
        await client.ask(jid, "read sim")
        return time.perf_counter() - start
    finally:
        await client.stop()


async def _plot(alice: Client, jid: str) -> float:
    seconds, reply = await alice.ask(jid, "plot sim.temp 1h")
    if not reply.startswith("https://"):
        raise BenchError(f"`plot` gave no picture: {reply[:200]}")
    return seconds


def _ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.0f} ms ({min(samples) * 1000:.0f}-{max(samples) * 1000:.0f})"
