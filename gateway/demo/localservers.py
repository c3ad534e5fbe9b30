"""Throwaway Prosody and Mosquitto servers on loopback, for `make demo`, the
tests and the benchmarks.

Each server lives in a folder of its own, listens on 127.0.0.1 only, and can
be stopped and started again on the same port (the fault tests need that).
Prosody gets a private CA and a certificate for its domain, so clients verify
TLS through `ca_file` instead of switching verification off.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT = 15.0


class ServerError(RuntimeError):
    """A local server could not be set up or started; the message says why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = START_TIMEOUT, proc: subprocess.Popen | None = None) -> None:
    """Block until 127.0.0.1:port accepts connections, or raise ServerError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"server exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerError(f"nothing listening on 127.0.0.1:{port} after {timeout:g} s")


def _check_free(port: int) -> None:
    with socket.socket() as s:
        # Like the servers themselves: a restart must not trip over the stopped
        # server's connections in TIME_WAIT; a listening socket still counts as in use.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ServerError(f"port {port} on 127.0.0.1 is already in use") from None


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise ServerError(f"{tool} not found: install the {package} package (make test does)")
    return path


def _run(*cmd: str, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ServerError(f"{' '.join(cmd[:3])} failed: {r.stderr.strip() or r.stdout.strip()}")


def make_certs(folder: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for `names`; returns (ca, cert, key) paths."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key, csr = folder / "server.pem", folder / "server.key", folder / "server.csr"
    if ca.exists() and cert.exists() and key.exists():
        return ca, cert, key
    openssl = _need("openssl", "openssl")
    _run(
        openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
        "-keyout", str(ca_key), "-out", str(ca), "-subj", "/CN=iot-gateway test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )
    _run(
        openssl, "req", "-new", "-newkey", "rsa:2048", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}",
    )
    ext = folder / "server.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n"
    )
    _run(
        openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "3650", "-out", str(cert), "-extfile", str(ext),
    )
    return ca, cert, key


class Prosody:
    """A Prosody XMPP server for one domain (plus a MUC component) in `root`.

    With `uploads`, also an XEP-0363 upload service (`http_file_share` as
    `upload.DOMAIN`) over HTTPS on `https_port`, with the same certificate.
    PEP is on, as on any real server (OMEMO keeps its keys there); with `mam`,
    every account's messages are archived too (XEP-0313), so a test can read
    what the server stored.
    """

    def __init__(
        self, root: Path, port: int | None = None, domain: str = "localhost", uploads: bool = True, mam: bool = False
    ):
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.domain = domain
        self.muc = f"conference.{domain}"
        self.https_port = free_port() if uploads else None
        self.mam = mam
        self.config = self.root / "prosody.cfg.lua"
        self.proc: subprocess.Popen | None = None
        self.ca_file, self.cert, self.key = make_certs(self.root, [domain, self.muc])
        self._write_config()

    def _write_config(self) -> None:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        https_ports, upload = "", ""
        if self.https_port is not None:
            https_ports = f"{self.https_port} "
            # Served as https://DOMAIN:PORT/ so the URLs match the certificate's name.
            upload = f"""
Component "upload.{self.domain}" "http_file_share"
  http_host = "{self.domain}"
  http_external_url = "https://{self.domain}:{self.https_port}/"
"""
        self.config.write_text(
            f"""-- written by gateway.localservers: a throwaway server on loopback
run_as_root = true
pidfile = "{self.root}/prosody.pid"
data_path = "{data}"
log = {{ info = "{self.root}/prosody.log" }}
modules_enabled = {{
  "roster", "saslauth", "tls", "disco", "ping", "presence", "version",
  "blocklist", "carbons", "smacks", "posix", "offline", "pep"{', "mam"' if self.mam else ""}
}}
modules_disabled = {{ "s2s" }}
c2s_ports = {{ {self.port} }}
c2s_interfaces = {{ "127.0.0.1" }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ {https_ports}}}
https_interfaces = {{ "127.0.0.1" }}
c2s_require_encryption = true
allow_registration = false
authentication = "internal_hashed"
ssl = {{ key = "{self.key}", certificate = "{self.cert}" }}
smacks_hibernation_time = 60

VirtualHost "{self.domain}"

Component "{self.muc}" "muc"
  restrict_room_creation = false
{upload}"""
        )

    def register(self, user: str, password: str) -> str:
        """Create an account (or reset its password); returns the bare JID."""
        _run(_need("prosodyctl", "prosody"), "--config", str(self.config), "register", user, self.domain, password)
        return f"{user}@{self.domain}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        _check_free(self.port)
        log = open(self.root / "prosody.out", "ab")
        self.proc = subprocess.Popen(
            [_need("prosody", "prosody"), "--config", str(self.config), "-F"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        wait_port(self.port, proc=self.proc)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        stop_process(self.proc)
        self.proc = None

    @property
    def address(self) -> str:
        """`127.0.0.1:port`, as the config's `server` wants it."""
        return f"127.0.0.1:{self.port}"


class Mosquitto:
    """A Mosquitto MQTT broker in `root`, with persistence so sessions survive restarts; anonymous
    unless given `accounts`."""

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        acl: str | None = None,
        accounts: dict[str, str] | None = None,
        anonymous: bool | None = None,
    ):
        """`acl`: the text of an `acl_file` (Mosquitto's topic rules), e.g. to deny publishing to cmnd/#.
        `accounts`: user → password, written to a `password_file` (hashed by mosquitto_passwd).
        `anonymous`: whether clients without a username get in; default: only without `accounts`."""
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config = self.root / "mosquitto.conf"
        self.proc: subprocess.Popen | None = None
        if anonymous is None:
            anonymous = not accounts
        self.config.write_text(
            f"""# written by gateway.localservers: a throwaway broker on loopback
listener {self.port} 127.0.0.1
user {_user()}
allow_anonymous {str(anonymous).lower()}
persistence true
persistence_location {self.root}/
autosave_interval 1
log_dest file {self.root}/mosquitto.log
max_queued_messages 100000
"""
        )
        if acl is not None:
            (self.root / "acl").write_text(acl)
            with self.config.open("a") as f:
                f.write(f"acl_file {self.root}/acl\n")
        if accounts:
            self.password_file = self.root / "passwords"
            self.password_file.unlink(missing_ok=True)
            self.password_file.touch(mode=0o600)
            tool = _need("mosquitto_passwd", "mosquitto")
            for user, password in accounts.items():
                _run(tool, "-b", str(self.password_file), user, password)
            with self.config.open("a") as f:
                f.write(f"password_file {self.password_file}\n")

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        _check_free(self.port)
        self.proc = subprocess.Popen(
            [_need("mosquitto", "mosquitto"), "-c", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "mosquitto.err", "ab"),
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        wait_port(self.port, proc=self.proc)

    def stop(self) -> None:
        """Stop the broker (it saves its persistent sessions on SIGTERM)."""
        stop_process(self.proc)
        self.proc = None

    @property
    def url(self) -> str:
        """`mqtt://127.0.0.1:port`, as the config's `[mqtt] url` wants it."""
        return f"mqtt://127.0.0.1:{self.port}"


def _user() -> str:
    """Who runs the servers: a broker started as root would otherwise drop to the
    `mosquitto` user and could no longer write its log and sessions into our folder."""
    return pwd.getpwuid(os.getuid()).pw_name


def stop_process(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM a child process, SIGKILL it if it has not exited after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
