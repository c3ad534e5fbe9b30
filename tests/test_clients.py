"""The gateway through an XMPP client we did not write: Profanity (console client,
libstrophe, not slixmpp) under tmux, typing as a person would and reading its screen.

Profanity gets an isolated HOME and XDG folders, an account for olive (operator)
on the suite's Prosody, and trusts the suite's private CA through SSL_CERT_FILE:
TLS is required and verified (a certificate prompt fails the test). Every wait
polls `tmux capture-pane` until a deadline, so a test ends in bounded time.
Set PROFANITY_SCREEN=FILE to keep the screens of the ad-hoc test (for a note).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import RunningGateway, XmppServer

DEADLINE = 15.0  # seconds for any one thing to show on screen
POLL = 0.2
USER = "olive"  # an operator: may read and set

pytestmark = pytest.mark.skipif(
    shutil.which("profanity") is None or shutil.which("tmux") is None,
    reason="Profanity or tmux is not installed (make test installs the Debian packages profanity and tmux)",
)


class ScreenTimeout(AssertionError):
    """What a test waited for did not show on Profanity's screen in time."""


@dataclass
class Profanity:
    """A Profanity process in a private tmux server: type lines, read the screen."""

    socket: Path
    session: str = "prof"

    async def tmux(self, *args: str) -> str:
        """Run a tmux command on this server; its output."""
        proc = await asyncio.create_subprocess_exec(
            "tmux", "-S", str(self.socket), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        if proc.returncode != 0:
            raise RuntimeError(f"tmux {args[0]} failed: {err.decode().strip()}")
        return out.decode()

    async def close(self) -> None:
        """Stop Profanity and its tmux server; remove the socket's folder."""
        try:
            await self.tmux("kill-server")
        except (RuntimeError, TimeoutError):
            pass  # already gone: Profanity exited and took the server with it
        shutil.rmtree(self.socket.parent, ignore_errors=True)

    async def type(self, line: str) -> None:
        """Type `line` and Enter (literally: no tmux key names)."""
        await self.tmux("send-keys", "-t", self.session, "-l", line)
        await self.tmux("send-keys", "-t", self.session, "Enter")

    async def screen(self) -> str:
        """What the terminal shows now."""
        return await self.tmux("capture-pane", "-p", "-t", self.session)

    async def wait(self, pattern: str, deadline: float = DEADLINE, roster: bool = False) -> str:
        """The screen once `pattern` (a regex) shows on it (or on the roster panel
        alone, with `roster`); ScreenTimeout after `deadline` s."""
        end = time.monotonic() + deadline
        while True:
            text = await self.screen()
            if "/tls allow" in text:
                raise AssertionError(f"Profanity did not trust the suite's CA:\n{text}")
            if re.search(pattern, _roster(text) if roster else text, re.M):
                return _roster(text) if roster else text
            if time.monotonic() > end:
                raise ScreenTimeout(f"{pattern!r} not on Profanity's screen after {deadline:g} s:\n{text}")
            await asyncio.sleep(POLL)


def _roster(screen: str) -> str:
    """The roster panel of the console window: the screen right of its first group heading's column."""
    col = next((line.find("Available for chat") for line in screen.splitlines() if "Available for chat" in line), -1)
    return "" if col < 0 else "\n".join(line[max(0, col - 2):] for line in screen.splitlines())


def _account(server: XmppServer, user: str, data: Path) -> None:
    folder = data / "profanity"
    folder.mkdir(parents=True)
    jid = server.jid(user)
    host, port = server.prosody.address.rsplit(":", 1)
    (folder / "accounts").write_text(
        f"[{jid}]\nenabled=true\njid={jid}\nserver={host}\nport={port}\nresource=profanity\n"
        f"password={server.passwords[user]}\ntls.policy=force\n"
    )
    (folder / "accounts").chmod(0o600)


async def launch(server: XmppServer, user: str, tmp_path: Path) -> Profanity:
    """Profanity in a new tmux session, logging in as `user` with a HOME of its own under
    `tmp_path` and the suite's CA as its only trust anchor."""
    home = tmp_path / "home"
    config, data = home / ".config", home / ".local" / "share"
    config.mkdir(parents=True)
    _account(server, user, data)
    # A short socket path: tmux's must fit in a sockaddr_un (about 100 bytes).
    sockdir = Path(tempfile.mkdtemp(prefix="prof-", dir="/tmp"))
    p = Profanity(sockdir / "tmux")
    env = {
        "HOME": str(home), "XDG_CONFIG_HOME": str(config), "XDG_DATA_HOME": str(data),
        "SSL_CERT_FILE": str(server.prosody.ca_file), "TERM": "screen-256color", "LANG": "C.UTF-8",
    }
    await p.tmux(
        "-f", "/dev/null", "new-session", "-d", "-s", p.session, "-x", "200", "-y", "50",
        *[a for k, v in env.items() for a in ("-e", f"{k}={v}")],
        f"profanity -a {server.jid(user)}",
    )
    return p


@pytest.fixture
async def prof(
    xmpp_server: XmppServer, running_gateway: RunningGateway, tmp_path: Path
) -> AsyncIterator[Profanity]:
    """Profanity logged in as olive, subscribed to the gateway, on its console window."""
    p = await launch(xmpp_server, USER, tmp_path)
    try:
        await p.wait(rf"{re.escape(xmpp_server.jid(USER))}/profanity logged in successfully")
        # Approve the gateway's subscription request (if any) and ask for its presence.
        await p.type(f"/sub allow {running_gateway.jid}")
        await p.type(f"/sub request {running_gateway.jid}")
        await p.type("/roster show status")
        yield p
    finally:
        await p.close()


async def test_roster_shows_the_gateways_presence_status(prof: Profanity, running_gateway: RunningGateway) -> None:
    """The README: available, with the status `Test GW: 1/1 devices OK`, next to the contact in the roster."""
    roster = await prof.wait(r'^\s+"Test GW: 1/1 devices OK"\s*$', roster=True)
    assert re.search(rf"^\s+Online \(\d+\)\s*\n\s+{re.escape(running_gateway.jid)}\s*\n\s+\"Test GW: 1/1 devices OK\"", roster, re.M), roster


async def test_chat_help_read_and_set(prof: Profanity, running_gateway: RunningGateway) -> None:
    """help, read and set typed in Profanity's chat window, each answered; the set really happens."""
    gw = running_gateway.jid
    await prof.type(f"/msg {gw} help")
    await prof.wait(r"Test GW commands \(you are operator\):")
    screen = await prof.wait(r"set device\.field value")
    assert re.search(r"read \[device\[\.field\]\]", screen), screen
    assert "```" not in screen, screen  # Profanity shows XEP-0393 fences as typed: the gateway sends none

    await prof.type("read")
    screen = await prof.wait(r"^\s+speed\s+\d+\s+\d+ \w+ ago\s*$")
    assert re.search(r"^\s+sim: ok\s*$", screen, re.M), screen  # the device, then its fields by short name
    assert re.search(r"^\s+temp\s+-?[\d.]+ °C\s", screen, re.M), screen
    assert re.search(r"^\s+relay\s+(on|off)\s", screen, re.M), screen
    assert "```" not in screen, screen

    await prof.type("set sim.speed 42")
    await prof.wait(r"gateway@\S+: sim\.speed: \d+ → 42$")
    field = running_gateway.gateway.hub.nodes["sim"].fields["speed"]
    assert field.latest is not None and field.latest.value == 42

    await prof.type("set sim.speed 420")  # out of bounds: refused with the reason, nothing changed
    await prof.wait(r"gateway@\S+: .*sim\.speed.*100")
    assert field.latest.value == 42


async def test_adhoc_command_list(prof: Profanity, running_gateway: RunningGateway) -> None:
    """`/cmd list` on the gateway's full JID shows the operator's ad-hoc commands (Profanity shows nodes)."""
    full = running_gateway.session.client.boundjid.full
    refused = "Server does not support ad hoc commands"  # said until Profanity has its disco of the server
    for _ in range(10):
        before = (await prof.screen()).count(refused)
        await prof.type(f"/cmd list {full}")
        end = time.monotonic() + DEADLINE
        while (screen := await prof.screen()).count(refused) == before:
            if re.search(r"Ad hoc commands:|No commands found|Error retrieving command list", screen):
                break
            if time.monotonic() > end:
                raise ScreenTimeout(f"no answer to /cmd list on Profanity's screen after {DEADLINE:g} s:\n{screen}")
            await asyncio.sleep(POLL)
        else:
            await asyncio.sleep(0.5)  # refused: the login's disco has not come back yet
            continue
        break
    assert "Ad hoc commands:" in screen, screen
    listed = await prof.wait(r"!\s+status\s*$")
    nodes = re.findall(r"^\S+ !\s+(\w+)\s*$", listed, re.M)
    assert nodes == ["read", "set", "status"], listed

    if os.environ.get("PROFANITY_SCREEN"):  # keep the screens for a note: the list, then a set answered
        await prof.type(f"/msg {running_gateway.jid} set sim.relay on")
        chat = await prof.wait(r"sim\.relay: \S+ → on$")
        Path(os.environ["PROFANITY_SCREEN"]).write_text(
            "Profanity, console window (1), after /cmd list:\n" + listed + "\nchat window (2), after `set sim.relay on`:\n" + chat
        )
