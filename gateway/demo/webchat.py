"""The demo's web chat: Converse.js served by the demo's own Prosody, nothing to install.

Converse.js (a pinned version, from the npm registry, installed once into a folder of ours:
no CDN at run time) talks to Prosody over its websocket (`mod_websocket`); Prosody's
`mod_http_files` serves the page from the same HTTPS port as the upload service
(`http_file_share`), with the demo's certificate. So the page, the chat and the plots share
one origin and one CA, and the page links the CA for download.

`make demo` and tests/test_webchat.py build the page with the same `write_site`; the page's
own script (`web/gateway.js`) puts the gateway in the roster, subscribed both ways, shows
its presence status (its health) under its name and in the chat's header, and pre-fills the
gateway's full JID in Converse's ad-hoc commands form (docs/webchat.md says why).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CONVERSE_VERSION = "14.0.0"  # pinned: the page's settings and gateway.js are checked against it
PACKAGE = "converse.js"
NPM_TIMEOUT = 300.0  # seconds for `npm install` (a slow mirror; about 7 s on a good line)
WEBSOCKET_PATH = "/xmpp-websocket"  # Prosody's default for mod_websocket
STATIC = Path(__file__).with_name("web")  # index.html's script and style, copied next to it


class WebChatError(RuntimeError):
    """The web chat could not be set up (no npm, the registry unreachable); the message says what to do."""


def dist_of(prefix: Path) -> Path:
    """Where Converse's built files are under an npm `--prefix` folder."""
    return prefix / "node_modules" / PACKAGE / "dist"


def installed_version(prefix: Path) -> str | None:
    """The Converse.js version installed under `prefix`, None when there is none."""
    try:
        meta = json.loads((prefix / "node_modules" / PACKAGE / "package.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("version") if isinstance(meta, dict) else None


def install_converse(prefix: Path, version: str = CONVERSE_VERSION) -> Path:
    """Converse.js `version` under `prefix` (npm install from the registry, once); returns its
    `dist` folder. Installed into a temporary folder first, so an interrupted install leaves
    nothing half-done behind."""
    prefix = Path(prefix).resolve()
    if installed_version(prefix) == version and (dist_of(prefix) / "converse.min.js").is_file():
        return dist_of(prefix)
    npm = shutil.which("npm")
    if npm is None:
        raise WebChatError(
            "npm not found: install Node.js and npm (Debian: apt install nodejs npm; make demo and make test do)"
        )
    prefix.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix.name}-", dir=prefix.parent))
    try:
        cmd = [npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund", "--ignore-scripts",
               "--loglevel=error", f"{PACKAGE}@{version}"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=NPM_TIMEOUT,
                               env=dict(os.environ, npm_config_update_notifier="false"))
        except subprocess.TimeoutExpired:
            raise WebChatError(f"npm install {PACKAGE}@{version} took over {NPM_TIMEOUT:g} s: is the npm registry reachable?") from None
        if r.returncode != 0 or installed_version(staging) != version:
            tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-5:]
            raise WebChatError(f"npm install {PACKAGE}@{version} failed: " + " / ".join(tail))
        if prefix.exists():
            shutil.rmtree(prefix)
        staging.rename(prefix)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dist_of(prefix)


def write_site(
    site: Path,
    dist: Path,
    ca_file: Path,
    gateway: str,
    resource: str,
    user: str,
    name: str = "iot-gateway",
) -> Path:
    """The page's folder, as Prosody serves it (`Prosody(web=site)`): index.html with the page's
    settings, its script and style, Converse's `dist` (a link) and the CA to download. `gateway`
    is the gateway's bare JID, `resource` its resource (the ad-hoc commands' address), `user`
    the JID the login form is filled with."""
    site = Path(site)
    site.mkdir(parents=True, exist_ok=True)
    for f in ("gateway.js", "gateway.css"):
        shutil.copyfile(STATIC / f, site / f)
    shutil.copyfile(ca_file, site / "ca.pem")
    link = site / "dist"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(dist).resolve(), target_is_directory=True)
    settings = {
        "gateway": gateway,
        "adhoc": f"{gateway}/{resource}",
        "user": user,
        "domain": user.partition("@")[2],
        "name": name,
        "websocket_path": WEBSOCKET_PATH,
        "converse": installed_version(Path(dist).resolve().parent.parent.parent) or "",
    }
    page = (STATIC / "index.html").read_text()
    # `</` cannot end the script element early: JSON escapes it.
    page = page.replace("{{settings}}", json.dumps(settings).replace("</", "<\\/"))
    (site / "index.html").write_text(page)
    return site
