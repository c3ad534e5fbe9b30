"""What the benchmarks run against: Prosody and Mosquitto on loopback in a temp
dir, accounts, gateway configs written as TOML, and gateway processes."""

from __future__ import annotations

import json
import secrets
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gateway.config import load
from gateway.history import SCHEMA
from gateway.demo.localservers import Mosquitto, Prosody, stop_process

from .clients import Client

ROOT = Path(__file__).resolve().parent.parent
USERS = ("gateway", "alice", "bob", "carol")  # alice is the gateway's admin; bob and carol are strangers
RESOURCE = "gateway"
MB = 1_000_000
# Prosody keeps Nagle's algorithm on by default: a stanza that follows another to the same
# client within a round trip then waits for the client's delayed ACK, 40 ms on Linux. A
# read-out (IQ result, then <fields/>) always does, and 40 ms of TCP timer would hide all
# else; so the benchmarks keep it off (localservers' default) unless asked (`python -m bench --nagle`).


class Lab:
    """Prosody (accounts above) and Mosquitto in `root`, each on a free loopback port."""

    def __init__(self, root: Path, nagle: bool = False):
        self.root = root
        self.nagle = nagle
        self.prosody = Prosody(root / "prosody", nagle=nagle)
        self.mosquitto = Mosquitto(root / "mosquitto")
        self.passwords: dict[str, str] = {}

    def start(self) -> None:
        """Create the accounts and start both servers."""
        for user in USERS:
            self.passwords[user] = secrets.token_urlsafe(12)
            self.prosody.register(user, self.passwords[user])
        self.prosody.start()
        self.mosquitto.start()

    def stop(self) -> None:
        """Stop both servers."""
        self.prosody.stop()
        self.mosquitto.stop()

    def jid(self, user: str) -> str:
        """The bare JID of an account."""
        return f"{user}@{self.prosody.domain}"

    @property
    def gateway_jid(self) -> str:
        """The full JID gateways of the benchmarks log in as."""
        return f"{self.jid('gateway')}/{RESOURCE}"

    def client(self, user: str) -> Client:
        """An XMPP client for one of the accounts."""
        return Client(self.jid(user), self.passwords[user], self.prosody.address, self.prosody.ca_file)

    def config(self, name: str, devices: list[dict[str, Any]], **gateway: Any) -> dict[str, Any]:
        """Config data for a gateway kept in `root/name`, with alice as its admin."""
        return {
            "gateway": {
                "name": f"bench {name}",
                "state_dir": str(self.root / name / "state"),
                # Benchmarks send commands back to back: no rate limit in the way.
                "rate_limit": 10_000,
                "rate_window": 1,
                **gateway,
            },
            "xmpp": {
                "jid": self.jid("gateway"),
                "password": self.passwords["gateway"],
                "server": self.prosody.address,
                "ca_file": str(self.prosody.ca_file),
                "resource": RESOURCE,
                # The figures of the other benchmarks are the gateway's own; what OMEMO adds
                # (its crypto stack) is measured on its own by bench/omemo.py.
                "omemo": "off",
            },
            "contacts": [{"jid": self.jid("alice"), "role": "admin"}],
            "mqtt": {"url": self.mosquitto.url, "client_id": f"bench-{name}"},
            "devices": devices,
        }


class GatewayProcess:
    """`python -m gateway run` on a config written to `folder`; its log goes there too."""

    def __init__(self, folder: Path, data: dict[str, Any], python: str = sys.executable):
        self.python = python  # the interpreter (and so the venv) the gateway runs with
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "gateway.toml"
        self.config.write_text(toml(data))
        self.config.chmod(0o600)
        load(self.config)  # a config mistake of the benchmark shows here, not as a silent gateway
        compile_sources(python)
        self.log = folder / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the process; returns the time just before it was spawned."""
        with open(self.log, "ab") as log:
            started = time.perf_counter()
            self.proc = subprocess.Popen(
                [self.python, "-m", "gateway", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        return started

    def rss(self) -> float:
        """Resident memory in MB (10^6 bytes), from /proc/PID/status."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {self.proc.returncode}; see {self.log}")
        return rss(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM, as systemd stops it; SIGKILL after 10 s."""
        proc, self.proc = self.proc, None
        stop_process(proc, grace=10)


def compile_sources(python: str) -> None:
    """Byte-compile the project's own modules, as `make install` (pip) does: a gateway run from
    the source tree otherwise compiles them at every start when PYTHONDONTWRITEBYTECODE is set
    (as on some build machines), about 0.2 s and some memory a real install never spends."""
    subprocess.run(
        [python, "-m", "compileall", "-q", "gateway", "devices"], check=True, cwd=ROOT, capture_output=True
    )


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the gateway's drawing process)."""
    kids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"\nPPid:\t{pid}\n" in status.read_text():
                kids.append(int(status.parent.name))
        except OSError:
            pass  # ended meanwhile
    return kids


def tree_rss(pid: int) -> float:
    """VmRSS of process `pid` and its children, in MB: what the service costs the machine."""
    total = rss(pid)
    for kid in children(pid):
        try:
            total += rss(kid)
        except (OSError, RuntimeError):
            pass  # ended meanwhile
    return total


def rss(pid: int) -> float:
    """VmRSS of process `pid` in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"no VmRSS for process {pid}")


def fill_history(state_dir: Path, refs: list[str], size: int, every: float = 2.0) -> None:
    """Write `size` readings per field into `state_dir/history.db`, one each `every` seconds up to
    now: what a gateway leaves after running long enough to fill its history."""
    state_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    db = sqlite3.connect(state_dir / "history.db")
    try:
        db.executescript(SCHEMA)
        with db:
            db.execute("DELETE FROM readings")
            db.executemany(
                "INSERT INTO readings (ref, t, v) VALUES (?, ?, ?)",
                (
                    (ref, now - (size - i) * every, repr(20 + (i % 100) / 10))
                    for ref in refs
                    for i in range(size)
                ),
            )
    finally:
        db.close()


def toml(data: dict[str, Any]) -> str:
    """TOML text for config data: tables, arrays of tables (and arrays of tables inside them,
    as `devices.fields`), strings, numbers, booleans and lists of those."""
    out: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            out += [f"[{key}]", *_pairs(value), ""]
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            for item in value:
                out += [f"[[{key}]]", *_pairs(item)]
                for sub, inner in item.items():
                    if _tables(inner):
                        for table in inner:
                            out += [f"[[{key}.{sub}]]", *_pairs(table)]
                out.append("")
        else:
            raise ValueError(f"top-level {key!r}: only tables and arrays of tables are written")
    return "\n".join(out)


def _tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _pairs(table: dict[str, Any]) -> list[str]:
    return [f"{k} = {_value(v)}" for k, v in table.items() if not _tables(v)]


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {v!r} as TOML")


def spawn_rss(code: str, python: str = sys.executable) -> float:
    """RSS in MB of `python -c code` once it has run (it is then stopped)."""
    proc = subprocess.Popen(
        [python, "-c", code + "\nimport sys\nprint('ready', flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"python -c {code!r} failed")
        return rss(proc.pid)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(10)


def spawn_time(code: str, python: str = sys.executable) -> float:
    """Seconds from spawning `python -c code` until it has exited."""
    start = time.perf_counter()
    subprocess.run([python, "-c", code], check=True, cwd=ROOT)
    return time.perf_counter() - start
