"""`sudo make test-system`: `make install` booted under a real systemd (opt-in; not part of `make test`).

A Debian bookworm root made by debootstrap (kept in ROOTFS for the next run, ~400 MB) is copied,
the project is installed into the copy with `make install` (systemd-nspawn, not booted: the unit
is enabled, not started), its config is pointed at a Prosody started here on loopback (the
container shares this machine's network), and the copy is booted with `systemd-nspawn -b`. Then:
the service becomes active (Type=notify: READY=1) with a STATUS= line, answers `status` in a
chat, is restarted by the watchdog after SIGSTOP (leaving a Python traceback in the journal),
and stops cleanly. Needs root, systemd-nspawn (`apt-get install systemd-container`) and
debootstrap. Prints the times: boot to active, SIGSTOP to active again, stop.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.lab import Lab, children
from tests.helpers import answering
from tests.peer import Peer

ROOT = Path(__file__).resolve().parent.parent
ROOTFS = Path(os.environ.get("ROOTFS", "/var/tmp/iot-gateway-system/bookworm"))
MIRROR = os.environ.get("MIRROR", "http://deb.debian.org/debian")
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,python3-wheel,ca-certificates,make,procps"
UNIT = "iot-gateway.service"


class Failed(Exception):
    """A check of the booted install did not hold; the message says which."""


def run(*cmd: str | Path, timeout: float = 900, check: bool = True) -> str:
    """Run a command on this machine; its stdout (stderr joins it)."""
    out = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=timeout)
    if check and out.returncode != 0:
        raise Failed(f"{' '.join(map(str, cmd))} exited with {out.returncode}:\n{out.stdout[-3000:]}")
    return out.stdout


def say(t0: float, text: str) -> None:
    print(f"[{time.monotonic() - t0:6.1f} s] {text}", flush=True)


def base_rootfs(t0: float) -> None:
    """Debootstrap the bookworm root once."""
    if (ROOTFS / "usr/lib/systemd/systemd").exists():
        return
    say(t0, f"debootstrap bookworm into {ROOTFS} (a few minutes, once)")
    partial = ROOTFS.with_name(ROOTFS.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    run("debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", partial, MIRROR, timeout=1800)
    partial.rename(ROOTFS)


def prepare(root: Path) -> None:
    """This machine's CAs (a proxy in front of PyPI may sign with its own), pip settings, /etc/hosts."""
    local = root / "usr/local/share/ca-certificates"
    local.mkdir(parents=True, exist_ok=True)
    for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy(crt, local)
    # debootstrap writes no /etc/hosts: `localhost` (the Prosody's domain, in the upload URLs) would not resolve.
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
    if Path("/etc/pip.conf").exists():
        shutil.copy("/etc/pip.conf", root / "etc/pip.conf")
    nspawn(root, "update-ca-certificates")


def nspawn(root: Path, *cmd: str, timeout: float = 1800) -> str:
    """Run a command in the root without booting it."""
    return run("systemd-nspawn", "-q", "-D", root, "--register=no", "--keep-unit", "--pipe",
               f"--bind-ro={ROOT}:/opt/src", *cmd, timeout=timeout)


def configure(root: Path, lab: Lab) -> None:
    """The installed config, rewritten for the Prosody here (mode and owner as the install left them)."""
    etc = root / "etc/iot-gateway"
    prosody = lab.prosody
    shutil.copy(prosody.ca_file, etc / "ca.pem")
    (etc / "ca.pem").chmod(0o644)
    (etc / "gateway.toml").write_text(f"""
[gateway]
name = "System GW"
[xmpp]
jid = "{lab.jid('gateway')}"
server = "{prosody.address}"
ca_file = "/etc/iot-gateway/ca.pem"
password_file = "/etc/iot-gateway/xmpp.pass"
[[contacts]]
jid = "{lab.jid('alice')}"
role = "admin"
[[devices]]
id = "sim"
driver = "simulated"
interval = 5
  [[devices.fields]]
  name = "temp"
  unit = "°C"
""")
    (etc / "xmpp.pass").write_text(lab.passwords["gateway"] + "\n")


def container_init(nspawn_pid: int) -> int:
    """The container's PID 1 (as this machine numbers it): the `systemd` under the nspawn process."""
    todo = [nspawn_pid]
    while todo:
        pid = todo.pop()
        for kid in children(pid):
            try:
                if Path(f"/proc/{kid}/comm").read_text().strip() == "systemd":
                    return kid
            except OSError:
                continue
            todo.append(kid)
    raise LookupError("no systemd in the container yet")


class Machine:
    """The booted container, reached with nsenter."""

    def __init__(self, root: Path, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-q", "-D", str(root), "-b", "--register=no", "--keep-unit",
             f"--machine=iotgw-{secrets.token_hex(3)}"],
            stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT,
        )
        self.init = 0

    def wait_init(self) -> None:
        for _ in range(100):
            if self.proc.poll() is not None:
                raise Failed(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                self.init = container_init(self.proc.pid)
                return
            except LookupError:
                time.sleep(0.2)
        raise Failed("the container's systemd did not start")

    def sh(self, command: str, check: bool = True) -> str:
        """A shell command inside the booted container."""
        return run("nsenter", "-t", str(self.init), "-m", "-u", "-i", "-n", "-p", "--",
                   "/bin/sh", "-c", command, timeout=60, check=check).strip()

    def show(self, prop: str) -> str:
        return self.sh(f"systemctl show -p {prop} --value {UNIT}")

    def poweroff(self) -> None:
        if self.proc.poll() is None and self.init:
            self.sh("systemctl poweroff", check=False)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def until(what: str, test: Callable[[], bool], seconds: float) -> float:
    """Poll `test` every 0.2 s until it holds; the time it took. Failed after `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if test():
            return time.monotonic() - start
        time.sleep(0.2)
    raise Failed(f"{what}: not within {seconds:g} s")


async def chat(lab: Lab, plot: bool = False) -> str:
    """alice's `status` (asked until the gateway is online), or with `plot`, the answer to a `plot`."""
    gateway = lab.jid("gateway")
    peer = await Peer(lab.jid("alice"), lab.passwords["alice"], lab.prosody.address, lab.prosody.ca_file).start()
    try:
        status = await answering(peer, gateway, "System GW")
        if not plot:
            return status
        return await peer.ask_for(gateway, "plot sim.temp 15m", lambda b: b.startswith(("https://", "No picture")), 90)
    finally:
        await peer.stop()


def main() -> int:
    """Boot the install and check it; 0 when every check held."""
    if os.geteuid() != 0:
        print("test-system: run as root (it debootstraps and boots a container): sudo make test-system")
        return 2
    for tool, package in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            print(f"test-system: {tool} is missing: apt-get install {package}")
            return 2
    t0 = time.monotonic()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="iotgw-system-", dir=ROOTFS.parent.parent) as tmp:
        work = Path(tmp)
        base_rootfs(t0)
        root = work / "rootfs"
        say(t0, f"copy {ROOTFS}")
        run("cp", "-a", "--reflink=auto", ROOTFS, root)
        prepare(root)
        say(t0, "make install (not booted: enabled, not started)")
        print(nspawn(root, "make", "-C", "/opt/src", "install"), flush=True)
        lab = Lab(work / "servers")  # Prosody (and Mosquitto) on loopback, shared with the container
        lab.start()
        configure(root, lab)
        machine = Machine(root, work / "boot.log")
        try:
            say(t0, "boot")
            booted = time.monotonic()
            machine.wait_init()
            until("the service active", lambda: machine.sh(f"systemctl is-active {UNIT}", check=False) == "active", 180)
            figures["boot to active"] = time.monotonic() - booted
            status = machine.show("StatusText")
            say(t0, f"active (READY=1) {figures['boot to active']:.1f} s after boot; STATUS={status!r}")
            if not status:
                raise Failed("no STATUS= from the service")
            reply = asyncio.run(chat(lab))
            say(t0, f"chat `status`: {reply.splitlines()[0]!r}")
            if not reply.startswith("System GW"):
                raise Failed(f"`status` was not answered: {reply!r}")

            pid = machine.show("MainPID")
            machine.sh(f"kill -STOP {pid}")
            stopped = time.monotonic()
            say(t0, f"SIGSTOP to the gateway (pid {pid} in the container); WatchdogSec={machine.show('WatchdogUSec')}")

            def restarted() -> bool:
                return machine.show("MainPID") not in ("0", pid) and machine.sh(
                    f"systemctl is-active {UNIT}", check=False) == "active"

            figures["SIGSTOP to active again"] = until("the watchdog restart", restarted, 180)
            journal = machine.sh(f"journalctl -u {UNIT} --no-pager -o cat", check=False)
            say(t0, f"restarted by the watchdog after {figures['SIGSTOP to active again']:.1f} s "
                    f"(NRestarts={machine.show('NRestarts')})")
            for line in ("Watchdog timeout", "Fatal Python error: Aborted"):
                if line not in journal:
                    raise Failed(f"the journal has no {line!r}:\n{journal[-3000:]}")
            # A plot under the unit's hardening (MemoryDenyWriteExecute, the system call filter):
            # drawn by a child process; the gateway's own process never maps matplotlib.
            begin = time.monotonic()
            url = asyncio.run(chat(lab, plot=True))
            figures["plot"] = time.monotonic() - begin
            pid = machine.show("MainPID")
            maps = machine.sh(f"grep -c matplotlib /proc/{pid}/maps", check=False)
            drawers = machine.sh(f"for c in $(cat /proc/{pid}/task/*/children); do grep -l matplotlib /proc/$c/maps; done",
                                 check=False)
            say(t0, f"plot: {url[:60]!r} in {figures['plot']:.1f} s; matplotlib mapped by the gateway: {maps} times, "
                    f"by its children: {drawers.count('maps')}")
            if not url.startswith("https://") or maps != "0" or drawers.count("maps") != 1:
                raise Failed(f"plot under the hardening: {url!r}, gateway maps {maps}, drawing process {drawers!r}")

            begin = time.monotonic()
            machine.sh(f"systemctl stop {UNIT}")
            figures["stop"] = time.monotonic() - begin
            result, code = machine.show("Result"), machine.show("ExecMainStatus")
            say(t0, f"stopped in {figures['stop']:.1f} s: Result={result}, ExecMainStatus={code}")
            if (result, code) != ("success", "0"):
                raise Failed(f"stop was not clean: Result={result}, ExecMainStatus={code}")
        except Failed as e:
            print(f"test-system: FAILED: {e}\n--- the container's console:\n{machine.log.read_text()[-2000:]}")
            if machine.init:
                print(machine.sh(f"journalctl -u {UNIT} --no-pager -n 60", check=False))
            return 1
        finally:
            machine.poweroff()
            lab.stop()
    print("test-system: OK; " + ", ".join(f"{k} {v:.1f} s" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
