"""Throwaway Prosody and Mosquitto servers on loopback, for `make demo`, the
tests and the benchmarks.

Each server lives in a folder of its own, listens on one loopback address
(127.0.0.1 unless told), and can be stopped and started again on the same port
(the fault tests need that). Prosody gets a private CA and a certificate for
its domain, so clients verify TLS through `ca_file` instead of switching
verification off.

Several Prosody servers can federate (`Federation`): each has its own domain
and loopback address, one CA signs all their certificates, s2s runs with
`s2s_secure_auth`, and each finds the others through a tiny DNS server of the
federation's own (A and `_xmpp-server._tcp` SRV records) that only their
resolvers are told about, so nothing on the machine changes. Not a hosts
file: it cannot carry ports, and the fixed port 5269 it would need is taken
by any system Prosody listening on 0.0.0.0.
"""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

START_TIMEOUT = 15.0
S2S_TIMEOUT = 10  # seconds a federated server here (tests, demo, bench) waits for a new s2s link to come up
# EC P-256 keys for the CA and the servers: made in milliseconds, where RSA 2048 took most of a second a server.
NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


class ServerError(RuntimeError):
    """A local server could not be set up or started; the message says why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(
    port: int, timeout: float = START_TIMEOUT, proc: subprocess.Popen | None = None, host: str = "127.0.0.1"
) -> None:
    """Block until host:port accepts connections, or raise ServerError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"server exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerError(f"nothing listening on {host}:{port} after {timeout:g} s")


def _check_free(port: int, host: str = "127.0.0.1") -> None:
    with socket.socket() as s:
        # Like the servers themselves: a restart must not trip over the stopped
        # server's connections in TIME_WAIT; a listening socket still counts as in use.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise ServerError(f"port {port} on {host} is already in use") from None


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


def make_certs(folder: Path, names: list[str], ca_dir: Path | None = None) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for `names`; returns (ca, cert, key) paths.
    The CA lives in `ca_dir` (default `folder`): servers that share it trust each other."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_dir = ca_dir or folder
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca, ca_key = ca_dir / "ca.pem", ca_dir / "ca.key"
    cert, key, csr = folder / "server.pem", folder / "server.key", folder / "server.csr"
    if ca.exists() and cert.exists() and key.exists():
        return ca, cert, key
    openssl = _need("openssl", "openssl")
    if not (ca.exists() and ca_key.exists()):
        _run(
            openssl, "req", "-x509", *NEW_KEY, "-nodes", "-days", "3650",
            "-keyout", str(ca_key), "-out", str(ca), "-subj", "/CN=iot-gateway test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )
    _run(
        openssl, "req", "-new", *NEW_KEY, "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}",
    )
    ext = folder / "server.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"  # an EC key signs; it encrypts no session keys
        "extendedKeyUsage=serverAuth,clientAuth\n"  # clientAuth: a server opening s2s shows it too
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n"
    )
    _run(
        openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-CAserial", str(folder / "ca.srl"),
        "-days", "3650", "-out", str(cert), "-extfile", str(ext),
    )
    return ca, cert, key


class Prosody:
    """A Prosody XMPP server for one domain (plus a MUC component) in `root`.

    With `uploads`, also an XEP-0363 upload service (`http_file_share` as
    `upload.DOMAIN`) over HTTPS on `https_port`, with the same certificate.
    With `web` (a folder, gateway/demo/webchat.py's page), that port also serves the
    folder at `/` (`mod_http_files`) and XMPP over a websocket (`mod_websocket`).
    PEP is on, as on any real server (OMEMO keeps its keys there); with `mam`,
    every account's messages are archived too (XEP-0313), so a test can read
    what the server stored.
    """

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        domain: str = "localhost",
        uploads: bool = True,
        mam: bool = False,
        federation: Federation | None = None,
        own_ca: bool = False,
        https_port: int | None = None,
        web: Path | None = None,
        nagle: bool = False,
    ):
        """With `federation`, the server takes its domain's loopback address there and talks s2s
        with the federation's other servers; without, it is alone on 127.0.0.1 with s2s off.
        With `own_ca` too, its certificate comes from a CA the others do not trust (a wrong one).
        `https_port`: a fixed port for HTTPS (uploads, web), else a free one.
        Nagle's algorithm is off unless `nagle` (Prosody's default, on): with it on, a stanza that
        follows another to the same client within a round trip waits for the client's delayed ACK
        (40 ms on Linux), a login four times, which would dwarf all else on loopback."""
        self.root = Path(root).resolve()
        self.federation = federation
        self.interface = federation.hosts[domain] if federation is not None else "127.0.0.1"
        self.port = port or free_port()
        self.domain = domain
        self.muc = f"conference.{domain}"
        self.web = Path(web).resolve() if web is not None else None
        self.https_port = (https_port or free_port()) if uploads or web is not None else None
        self.uploads = uploads
        self.mam = mam
        self.nagle = nagle
        self.config = self.root / "prosody.cfg.lua"
        self.proc: subprocess.Popen | None = None
        self.s2s_port = federation.s2s_ports[domain] if federation is not None else None
        ca_dir = federation.root / "ca" if federation is not None and not own_ca else None
        self.ca_file, self.cert, self.key = make_certs(self.root, [domain, self.muc, f"upload.{domain}"], ca_dir)
        self._write_config()

    def _s2s(self) -> tuple[str, str]:
        """(modules_disabled, the s2s settings) for the config."""
        if self.federation is None:
            return '{ "s2s" }', "s2s_ports = { }"
        return "{ }", f"""s2s_ports = {{ {self.s2s_port} }}
s2s_interfaces = {{ "{self.interface}" }}
s2s_require_encryption = true
s2s_secure_auth = true
-- A server that takes the TCP connection but never answers (stalled) is given up after this many
-- seconds (Prosody's default: 90), and what waited for it bounces (remote-server-not-found).
s2s_timeout = {S2S_TIMEOUT}
-- Names and s2s ports from the federation's own DNS server; neither /etc/hosts nor the machine's resolver.
unbound = {{ hoststxt = false; resolvconf = false; forward = "127.0.0.1@{self.federation.dns.port}" }}"""

    def _write_config(self) -> None:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        https_ports, upload, web, web_modules = "", "", "", ""
        disabled, s2s = self._s2s()
        if self.https_port is not None:
            https_ports = f"{self.https_port} "
        if self.web is not None:
            web_modules = ', "websocket", "http_files"'
            # The page at /, the websocket at /xmpp-websocket, uploads at /file_share/: one origin.
            web = f"""http_files_dir = "{self.web}"
http_paths = {{ files = "/" }}
"""
        if self.uploads:
            # Served as https://DOMAIN:PORT/ so the URLs match the certificate's name.
            upload = f"""
Component "upload.{self.domain}" "http_file_share"
  http_host = "{self.domain}"
  http_external_url = "https://{self.domain}:{self.https_port}/"
"""
        self.config.write_text(
            f"""-- written by gateway.demo.localservers: a throwaway server on loopback
run_as_root = true
pidfile = "{self.root}/prosody.pid"
data_path = "{data}"
log = {{ info = "{self.root}/prosody.log" }}
modules_enabled = {{
  "roster", "saslauth", "tls", "disco", "ping", "presence", "version",
  "blocklist", "carbons", "smacks", "posix", "offline", "pep"{', "mam"' if self.mam else ""}{web_modules}
}}
modules_disabled = {disabled}
interfaces = {{ "{self.interface}" }}
c2s_ports = {{ {self.port} }}
c2s_interfaces = {{ "{self.interface}" }}
c2s_direct_tls_ports = {{ }}
{s2s}
http_ports = {{ }}
https_ports = {{ {https_ports}}}
https_interfaces = {{ "{self.interface}" }}
c2s_require_encryption = true
allow_registration = false
authentication = "internal_hashed"
ssl = {{ key = "{self.key}", certificate = "{self.cert}", cafile = "{self.ca_file}" }}
smacks_hibernation_time = 60
{"" if self.nagle else "network_settings = { nagle = false }"}
{web}
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
        _check_free(self.port, self.interface)
        if self.https_port is not None:
            _check_free(self.https_port, self.interface)
        if self.s2s_port is not None:
            _check_free(self.s2s_port, self.interface)
        log = open(self.root / "prosody.out", "ab")
        self.proc = subprocess.Popen(
            [_need("prosody", "prosody"), "--config", str(self.config), "-F"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        # Every listener, not only c2s: Prosody opens them one after another, and a test that
        # freezes the server right after start must find its s2s port taking connections.
        for port in (self.port, self.s2s_port, self.https_port):
            if port is not None:
                wait_port(port, proc=self.proc, host=self.interface)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        stop_process(self.proc)
        self.proc = None

    @property
    def address(self) -> str:
        """`address:port` (`127.0.0.1:port` unless federated), as the config's `server` wants it."""
        return f"{self.interface}:{self.port}"


class Federation:
    """Prosody servers on loopback that talk s2s: one CA in `root` signs all their certificates,
    and `hosts` (domain → loopback address, e.g. `home.test` → `127.0.0.2`) is how they find
    each other, through the federation's DNS server (`start()` it before the servers).
    Create each server with `Prosody(..., domain=d, federation=this)`."""

    def __init__(self, root: Path, hosts: dict[str, str]):
        self.root = Path(root).resolve()
        self.hosts = dict(hosts)
        self.s2s_ports = {domain: free_port() for domain in hosts}
        records, srv = {}, {}
        for domain, addr in hosts.items():
            # Rooms and uploads are reached over s2s too (a room on another server): same server, same port.
            for name in (domain, f"conference.{domain}", f"upload.{domain}"):
                records[name], srv[name] = addr, self.s2s_ports[domain]
        self.dns = NameServer(records, srv)

    def start(self) -> None:
        """Start answering the servers' DNS queries."""
        self.dns.start()

    def stop(self) -> None:
        """Stop the DNS server (stop the Prosody servers first)."""
        self.dns.stop()


class NameServer:
    """A DNS server on 127.0.0.1 (UDP, a free port, a thread of its own) for federated test servers:
    A records from `records` (name → address), `_xmpp-server._tcp.NAME` SRV records pointing at
    NAME on its port from `s2s` (name → port); NXDOMAIN for anything else."""

    def __init__(self, records: dict[str, str], s2s: dict[str, int]):
        self.records = {k.lower(): v for k, v in records.items()}
        self.s2s = {k.lower(): v for k, v in s2s.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve queries until `stop()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if not ready:
                continue
            data, peer = self.sock.recvfrom(4096)
            try:
                self.sock.sendto(self.answer(data), peer)
            except Exception:  # a malformed query: no answer, as a real server would drop it
                continue

    def answer(self, query: bytes) -> bytes:
        """The wire-format response to a wire-format query."""
        import dns.flags
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        q = dns.message.from_wire(query)
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        for question in q.question:
            name = question.name.to_text(omit_final_dot=True).lower()
            service, _, domain = name.partition("._tcp.")
            if name in self.records:
                if question.rdtype == dns.rdatatype.A:
                    r.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", self.records[name]))
            elif service == "_xmpp-server" and domain in self.s2s:
                if question.rdtype == dns.rdatatype.SRV:
                    target = f"0 0 {self.s2s[domain]} {domain}."
                    r.answer.append(dns.rrset.from_text(question.name, 60, "IN", "SRV", target))
            else:
                r.set_rcode(dns.rcode.NXDOMAIN)
        return r.to_wire()


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
            f"""# written by gateway.demo.localservers: a throwaway broker on loopback
listener {self.port} 127.0.0.1
user {_user()}
allow_anonymous {str(anonymous).lower()}
persistence true
persistence_location {self.root}/
autosave_interval 1
log_dest file {self.root}/mosquitto.log
max_queued_messages 100000
# As Prosody here: no 40 ms wait for a delayed ACK when a message follows another within a round trip.
set_tcp_nodelay true
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
