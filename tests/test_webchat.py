"""The web chat of `make demo`, in a real browser: Converse.js (the pinned version, installed from
npm once into .cache/converse) in Debian's headless Chromium, driven by Playwright, on a Prosody
set up by the same code as the demo's (gateway/demo/webchat.py, `Prosody(web=...)`).

The browser trusts the suite's CA through an NSS database made with `certutil` in a HOME of its
own: nothing ignores certificate errors, so a page, websocket or picture from a server the CA did
not sign would fail. One browser, one page: log in as alice (admin), see the gateway online with
its health under its name, `read`, `set`, `plot` with the picture inline, and an ad-hoc command
from Converse's own form. A screenshot of each step goes to the folder the test prints
(WEBCHAT_SHOTS=folder keeps them elsewhere).
"""

from __future__ import annotations

import asyncio
import http.client
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.webchat import Page, launch, missing, site_server, trusting_home
from tests.conftest import RunningGateway, XmppServer, gateway_config, start_gateway

USERS = {"gateway": None, "alice": "admin"}
WAIT = 20_000  # ms for anything to show in the page (Chromium's first start on a loaded 2-core machine)


pytestmark = [
    pytest.mark.skipif(missing() is not None, reason=missing() or ""),
    pytest.mark.timeout(180),
]


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XmppServer]:
    """A Prosody serving the demo's page (websocket, page, uploads on one HTTPS port) with its own accounts."""
    prosody, passwords = site_server(tmp_path_factory.mktemp("webchat"), list(USERS), "Test GW")
    prosody.start()
    yield XmppServer(prosody, passwords)
    prosody.stop()


@pytest.fixture
async def gateway(web_server: XmppServer, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    contacts = [{"jid": web_server.jid("alice"), "role": "admin"}]
    running = await start_gateway(gateway_config(web_server, tmp_path, contacts=contacts), web_server.passwords["gateway"])
    yield running
    await running.stop()


def shots_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """Where the screenshots go, said on the terminal even when pytest captures the output."""
    folder = Path(os.environ.get("WEBCHAT_SHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    with capsys.disabled():
        print(f"\nwebchat screenshots: {folder}")
    return folder


async def test_chat_in_the_browser(
    web_server: XmppServer, gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Log in, the gateway online with its health, read, set, plot (the picture loaded), an ad-hoc command."""
    from playwright.async_api import async_playwright, expect

    shots = shots_folder(tmp_path, capsys)
    home = trusting_home(tmp_path / "home", web_server.prosody.ca_file)
    url = f"https://localhost:{web_server.prosody.https_port}/"
    gw = gateway.jid
    async with async_playwright() as pw:
        browser = await launch(pw, home)
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 700})
            logged: list[str] = []
            page.on("console", lambda m: logged.append(f"console {m.type}: {m.text}"))
            page.on("pageerror", lambda e: logged.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: logged.append(f"request failed: {r.url} {r.failure}"))
            step = iter(range(1, 100))

            async def shot(name: str) -> None:
                await page.screenshot(path=str(shots / f"{next(step):02d}-{name}.png"), animations="disabled")

            await page.goto(url)
            login = page.locator("#converse-login-jid")
            await expect(login).to_have_value(web_server.jid("alice"), timeout=WAIT)
            await shot("login")
            await page.fill("#converse-login-password", web_server.passwords["alice"])
            await page.locator("#converse-login button[type=submit]").first.click()

            contact = page.locator("converse-roster-contact", has=page.locator(f'a.open-chat[data-jid="{gw}"]'))
            await expect(contact.locator(".iot-gateway-status")).to_have_text("Test GW: 1/1 devices OK", timeout=WAIT)
            await expect(contact.locator("converse-icon.chat-status")).to_have_attribute("title", "This contact is online", timeout=WAIT)
            await shot("roster")

            await contact.locator("a.open-chat").click()
            chat = page.locator(f'converse-chat[jid="{gw}"]')
            await expect(chat.locator(".chat-head__desc")).to_have_text("Test GW: 1/1 devices OK", timeout=WAIT)
            textarea = chat.locator("textarea.chat-textarea")

            async def say(text: str) -> None:
                await textarea.fill(text)
                await textarea.press("Enter")

            answers = chat.locator(".chat-msg__text")
            await say("read")
            await expect(answers.filter(has_text="temp")).to_have_count(1, timeout=WAIT)
            # Its rows are aligned with spaces: the page shows the gateway's text in a fixed-width font.
            font = await answers.filter(has_text="temp").evaluate("el => getComputedStyle(el).fontFamily")
            assert "mono" in font.lower(), font
            await shot("read")
            await say("set sim.relay on")
            await expect(answers.filter(has_text="sim.relay: off → on")).to_have_count(1, timeout=WAIT)
            await shot("set")
            await say("plot sim.temp 1h")
            picture = chat.locator("img.chat-image")
            await expect(picture).to_have_count(1, timeout=WAIT * 2)
            await expect(picture).to_have_js_property("complete", True, timeout=WAIT)
            assert await picture.evaluate("img => img.naturalWidth") > 0, "the plot did not load in the page"
            await shot("plot")

            await page.locator("converse-controlbox-buttons .show-client-info").click()
            adhoc = page.locator("converse-adhoc-commands")
            jid_input = adhoc.locator('input[name="jid"]')
            await expect(jid_input).to_have_value(f"{gw}/gateway", timeout=WAIT)
            await adhoc.locator('input[type="submit"]').click()
            await expect(adhoc.locator(".list-group-item", has_text="Status")).to_have_count(1, timeout=WAIT)
            await shot("adhoc-list")
            await adhoc.locator(".list-group-item", has_text="Status").locator("a").first.click()
            await expect(adhoc).to_contain_text("1/1", timeout=WAIT)
            await shot("adhoc-status")
        finally:
            if logged:  # the page's console, for a failure's report
                print("\n".join(logged[-40:]))
            await browser.close()


def test_the_page_serves_its_folder_only(web_server: XmppServer) -> None:
    """An intruder on the page's port: paths out of the site folder (the server's config, its data
    with the accounts) are not served, nor is a listing of the folder."""
    prosody = web_server.prosody
    ctx = ssl.create_default_context(cafile=str(prosody.ca_file))

    def get(path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("localhost", prosody.https_port, context=ctx, timeout=10)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    status, body = get("/")
    assert status == 200 and b"converse" in body
    assert web_server.passwords["alice"].encode() not in body
    for path in ("/../prosody.cfg.lua", "/%2e%2e/prosody.cfg.lua", "/dist/../../prosody.cfg.lua",
                 "/..%2fprosody.cfg.lua", "/../data/localhost/accounts/alice.dat", "/dist/"):
        status, body = get(path)
        assert status >= 400, (path, status, body[:200])
        assert b"data_path" not in body and b"password" not in body, path


OMEMO2 = "urn:xmpp:omemo:2"
LEGACY = "eu.siacs.conversations.axolotl"


class Wire:
    """Message stanzas between the gateway and one contact, as the gateway's client read and wrote them."""

    def __init__(self, gw: RunningGateway, contact: str) -> None:
        self.contact = contact
        self.incoming: list[str] = []
        self.outgoing: list[str] = []
        gw.session.client.add_filter("in", lambda s: self._keep(s, "from", self.incoming))
        gw.session.client.add_filter("out", lambda s: self._keep(s, "to", self.outgoing))

    def _keep(self, stanza: Any, side: str, into: list[str]) -> Any:
        if stanza.xml.tag.endswith("}message") and stanza[side].bare.lower() == self.contact:
            into.append(str(stanza))
        return stanza

    @staticmethod
    def encrypted(stanzas: list[str]) -> list[str]:
        return [s for s in stanzas if f'xmlns="{OMEMO2}"' in s or f'xmlns="{LEGACY}"' in s]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # slixmpp-omemo 2.2 on slixmpp 1.17
async def test_omemo_in_the_browser(
    web_server: XmppServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Converse with OMEMO turned on (the chat's lock): `read` reaches the gateway encrypted and its
    answer comes back encrypted, shown decrypted in the page (docs/omemo.md)."""
    from playwright.async_api import async_playwright, expect

    config = gateway_config(web_server, tmp_path, contacts=[{"jid": web_server.jid("alice"), "role": "admin"}],
                            xmpp={"omemo": "accept"})
    gw = await start_gateway(config, web_server.passwords["gateway"])
    try:
        await asyncio.wait_for(gw.session.omemo.ready.wait(), 15)  # device list and bundles published
        wire = Wire(gw, web_server.jid("alice"))
        shots = shots_folder(tmp_path, capsys)
        home = trusting_home(tmp_path / "home", web_server.prosody.ca_file)
        async with async_playwright() as pw:
            browser = await launch(pw, home)
            try:
                page = Page(await browser.new_page(viewport={"width": 1000, "height": 700}), gw.jid)
                await page.login(f"https://localhost:{web_server.prosody.https_port}/", web_server.passwords["alice"])
                lock = page.chat.locator("button.toggle-omemo")
                await expect(lock).to_have_attribute("data-disabled", "false", timeout=WAIT)
                await lock.click()
                await expect(lock).to_have_attribute("title", "Messages are sent encrypted", timeout=WAIT)
                await page.say("read")
                await page.answered("temp", 1)
                await page.page.screenshot(path=str(shots / "omemo-read.png"), animations="disabled")
            finally:
                await browser.close()
    finally:
        await gw.stop()
    commands = [s for s in wire.incoming if "<body" in s or "encrypted" in s]
    assert wire.encrypted(wire.incoming), commands
    assert not any("<body>read</body>" in s for s in wire.incoming), commands
    answers = wire.encrypted(wire.outgoing)
    assert answers, wire.outgoing
    assert not any("temp" in s for s in wire.outgoing), wire.outgoing
    with capsys.disabled():
        versions = {v for v in (OMEMO2, LEGACY) for s in wire.incoming + wire.outgoing if f'xmlns="{v}"' in s}
        print(f"OMEMO between Converse and the gateway: {', '.join(sorted(versions))}")
