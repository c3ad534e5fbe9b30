"""`iot-gateway`: run, check and console subcommands."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import importlib.util
import logging
import os
import signal
import stat
import sys
import threading
from pathlib import Path

from .compact import CompactError, compact
from .config import MQTT_PASSWORD_ENV, PASSWORD_ENV, Config, ConfigError, MqttSection, XmppSection, load
from .plot import PLOT_INSTALL
from .historydb import disk_use
from .state import StateDir, StateLocked
from .xmpp.redact import SaslRedactor

DEFAULT_CONFIG = "/etc/iot-gateway/gateway.toml"
CONFIG_ENV = "IOT_GATEWAY_CONFIG"
EXIT_CONFIG = 2
EXIT_LOCKED = 3  # another process holds the state folder; under systemd, Restart= tries again

log = logging.getLogger("iot_gateway")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `iot-gateway` console script."""
    parser = argparse.ArgumentParser(
        prog="iot-gateway",
        description="Serial, GPIO and MQTT devices over XMPP.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, about in (
        ("run", "run the gateway"),
        ("check", "validate a config file and summarise it"),
        ("console", "run the devices without XMPP and type chat commands as an admin"),
        ("compact", "rewrite history.db with the small pages new ones get (the gateway stopped)"),
    ):
        p = sub.add_parser(name, help=about, description=about)
        p.add_argument(
            "--config",
            "-c",
            default=None,
            help=f"config file (default: ${CONFIG_ENV}, then {DEFAULT_CONFIG})",
        )
        p.add_argument("--debug", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        # A hang killed by systemd's watchdog (SIGABRT), or a crash in C code, leaves every
        # thread's Python traceback on stderr, which is the journal under systemd.
        faulthandler.enable()

    path = Path(args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        config = load(path)
        if args.cmd == "run" and config.xmpp is not None:
            config.xmpp.resolve_password()
        if args.cmd == "check":
            check_secrets(config)
    except ConfigError as e:
        print(f"{path}: invalid configuration", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG

    if args.cmd == "check":
        print(summary(path, config))
        for warning in loose_permissions(path, config):
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    setup_logging("debug" if args.debug else config.gateway.log_level)
    for warning in loose_permissions(path, config):
        log.warning("%s", warning)
    if args.cmd == "run":
        if config.xmpp is None:
            print(f"{path}: invalid configuration\n  xmpp: missing (required to run)", file=sys.stderr)
            return EXIT_CONFIG
    state = StateDir(config.gateway.state_dir)
    if args.cmd == "compact":
        return _compact(state)
    try:
        state.lock()
    except StateLocked as e:
        if args.cmd == "run":
            print(f"error: {e}: stop it, or give this gateway its own [gateway] state_dir", file=sys.stderr)
            return EXIT_LOCKED
        # The console next to a running gateway: it may look, but the gateway's state is the gateway's.
        state.use_readonly(e)
        print(
            f"note: {e}; this console uses it read-only: watches, acks and timed sets made here are not saved,"
            " and history.db is not read or written",
            file=sys.stderr,
            flush=True,
        )
    except OSError as e:
        log.error("state folder %s unusable (%s): nothing will be saved", state.path, e)
    try:
        if args.cmd == "run":
            return asyncio.run(_run(config, state))
        return asyncio.run(_console(config, state))
    finally:
        state.unlock()


def _compact(state: StateDir) -> int:
    if not state.path.is_dir():
        print(f"error: no state folder {state.path} (nothing to compact)", file=sys.stderr)
        return 1
    try:
        state.lock()
    except StateLocked as e:
        print(f"error: {e}: stop it first (systemctl stop iot-gateway); nothing changed", file=sys.stderr)
        return EXIT_LOCKED
    except OSError as e:
        print(f"error: state folder {state.path}: {e.strerror or e}; nothing changed", file=sys.stderr)
        return 1
    try:
        print(compact(state.path / "history.db"))
    except CompactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        state.unlock()
    return 0


def setup_logging(level: str) -> None:
    """Log to stderr; to the journal without timestamps and with `<N>` priority prefixes."""
    handler = logging.StreamHandler(sys.stderr)
    # On the handler, so it sees records of every slixmpp logger, propagated ones included.
    handler.addFilter(SaslRedactor())
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if level != "debug":
        logging.getLogger("slixmpp").setLevel(logging.WARNING)


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd announced in $JOURNAL_STREAM (device:inode)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    # Compared, as systemd.exec(5) advises, so `2>file` under a unit still gets timestamps.
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """Prefixes every line with its syslog priority (`<3>` error … `<7>` debug), which journald reads."""

    PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

    def format(self, record: logging.LogRecord) -> str:
        prio = next((p for lvl, p in self.PRIORITIES.items() if record.levelno >= lvl), 7)
        # journald reads each line as its own entry: a traceback keeps the priority on every line.
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def check_secrets(config: Config) -> None:
    """Read every password file the config names; ConfigError listing each one that cannot be used.

    A password left to $IOT_GATEWAY_XMPP_PASSWORD is not required here: the
    service may set it only at run time (`summary` says so instead).
    """
    errors: list[str] = []
    for section in (config.xmpp, config.mqtt):
        if section is not None and section.password_file is not None:
            try:
                section.resolve_password()
            except ConfigError as e:
                errors += e.errors
    if errors:
        raise ConfigError(errors)


def password_source(section: XmppSection | MqttSection, env: str, unset: str = "") -> str:
    """Where an account's password will come from, for the `check` summary: `password`,
    `password_file`, else the environment variable `env` (`unset` follows "not set")."""
    if section.password is not None:
        return "in the config file"
    if section.password_file is not None:
        return f"from {section.password_file}"
    if os.environ.get(env):
        return f"from ${env} at run time (set in this environment)"
    return f"from ${env} at run time (not set in this environment{unset})"


def loose_permissions(path: Path, config: Config) -> list[str]:
    """A warning for the config file and each password_file that every user on the machine may read or write."""
    files = [path]
    for section in (config.xmpp, config.mqtt):
        if section is not None and section.password_file is not None:
            files.append(section.password_file)
    warnings = []
    for f in files:
        try:
            mode = f.stat().st_mode
        except OSError:
            continue
        what = [w for w, bit in (("readable", stat.S_IROTH), ("writable", stat.S_IWOTH)) if mode & bit]
        if what:
            warnings.append(
                f"{f} is {' and '.join(what)} by every user (mode {stat.S_IMODE(mode):04o}) and may hold a password: "
                f"run `chmod 640 {f}`"
            )
    return warnings


def summary(path: Path, config: Config) -> str:
    """The one-screen summary `check` prints."""
    g = config.gateway
    lines = [f"{path}: OK", f'Gateway "{g.name}": {g.history_size} readings kept per field, state in {g.state_dir}']
    rates = [1.0 / d.interval if getattr(d, "interval", 0) else 1.0 for d in config.devices for _ in d.fields]
    lines.append(disk_use(g.history_keep, max(g.history_raw_rows, g.history_size), g.history_per_second, rates))
    if config.xmpp:
        x = config.xmpp
        where = x.server or "its domain (SRV)"
        ca = f", CA {x.ca_file}" if x.ca_file else ""
        lines.append(f"XMPP: {x.jid} via {where}{ca}")
        lines.append(f"  password: {password_source(x, PASSWORD_ENV)}")
        lines.append(f"  OMEMO: {x.omemo_unavailable or x.omemo}")
    else:
        lines.append("XMPP: not configured (console only)")
    lines += [f"GPIO pin factory: {f}" for f in pin_factories(config)]
    if importlib.util.find_spec("matplotlib") is None:
        lines.append(f"Plots: text sparklines only, the plotting library is not installed ({PLOT_INSTALL} for pictures)")
    if config.mqtt:
        lines.append(f"MQTT: {config.mqtt.url}")
        m = config.mqtt
        who = password_source(m, MQTT_PASSWORD_ENV, ": without it, none is sent") if m.username else "none (anonymous)"
        lines.append(f"  password: {who}")
    lines.append(f"Devices ({len(config.devices)}):")
    for d in config.devices:
        where = getattr(d, "port", "") or ""
        lines.append(f"  {d.id} [{d.driver}{' ' + where if where else ''}]")
        for f in d.fields:
            bits = [f.type]
            if f.unit:
                bits.append(f.unit)
            if f.writable:
                bits.append("writable")
            lines.append(f"    {f.name}: {', '.join(bits)}")
    lines.append(f"Contacts ({len(config.contacts)}):")
    for c in config.contacts:
        lines.append(f"  {c.jid}: {c.role}")
    if not config.contacts:
        lines.append("  none: nobody can talk to the gateway")
    return "\n".join(lines)


# The gpiozero pin factories that need a library of their own: its module and Raspberry Pi OS package.
PIN_LIBRARIES = {
    "lgpio": ("lgpio", "python3-lgpio"),
    "rpigpio": ("RPi", "python3-rpi.gpio"),
    "pigpio": ("pigpio", "python3-pigpio"),
}


def pin_factories(config: Config) -> list[str]:
    """Which pin factory the GPIO devices will use (their `pin_factory`, else $GPIOZERO_PIN_FACTORY),
    each with whether its library is installed, for the `check` summary."""
    env = os.environ.get("GPIOZERO_PIN_FACTORY", "").lower()
    names = dict.fromkeys(getattr(d, "pin_factory", None) or env for d in config.devices if d.driver == "gpio")
    out = []
    for name in names:
        if not name:
            out.append("gpiozero's default, the first of lgpio, rpigpio, pigpio, native that loads"
                       " (GPIOZERO_PIN_FACTORY or pin_factory choose one)")
        elif name in PIN_LIBRARIES and importlib.util.find_spec(PIN_LIBRARIES[name][0]) is None:
            out.append(f"{name}, NOT installed (Raspberry Pi OS: sudo apt install {PIN_LIBRARIES[name][1]};"
                       " elsewhere GPIOZERO_PIN_FACTORY=native, which `make install` sets when it has to)")
        else:
            out.append(name)
    return out


class _Stopper:
    """SIGTERM/SIGINT set `event`; a second signal exits at once."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signal, sig)

    def _signal(self, sig: int) -> None:
        if self.event.is_set():
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("received %s, stopping", signal.Signals(sig).name)
        self.event.set()


async def _run(config: Config, state: StateDir) -> int:
    from .app import Gateway
    from .systemd import Notifier, status_line
    from .xmpp.presence import health_summary
    from .xmpp.session import Session

    assert config.xmpp is not None
    stopper = _Stopper()
    notifier = Notifier()
    notifier.start_watchdog()
    notifier.status("Starting devices")
    gw = Gateway(config, state)
    await gw.start()
    session = Session(config, gw.hub, gw.commands, config.xmpp.resolve_password(), (gw.watches, gw.reverts))

    def status() -> str:
        text = health_summary(config.gateway.name, gw.hub)[1]
        return status_line(text, session.online.is_set(), session.offline_reason)

    async def report() -> None:
        while not session.online.is_set():  # a refused login or a twin: the status says why, while it lasts
            notifier.status(status())
            try:
                await asyncio.wait_for(session.online.wait(), 1)
            except asyncio.TimeoutError:
                pass
        notifier.ready(status())
        while True:  # the session going off or online has no event of its own
            await asyncio.sleep(5)
            notifier.status(status())

    def on_health(_node: object, _old: object) -> None:
        notifier.status(status())

    gw.hub.subscribe(health=on_health)
    notifier.status(status())
    session.connect()
    reporter = asyncio.create_task(report(), name="systemd-status")
    try:
        await stopper.event.wait()
    finally:
        notifier.stopping()
        reporter.cancel()
        gw.hub.unsubscribe(on_health)
        await session.stop()
        await gw.stop()
        await notifier.close()
    return 0


async def _console(config: Config, state: StateDir) -> int:
    from .app import Gateway
    from .auth import Actor

    stopper = _Stopper()
    gw = Gateway(config, state)
    await gw.start()
    commands = gw.commands
    actor = Actor("console", "admin", "console")
    lines = _stdin_lines()
    tty = sys.stdin.isatty()
    print(f"{config.gateway.name} console: type help, Ctrl-D to quit.", flush=True)
    try:
        while True:
            if tty:
                print("> ", end="", flush=True)
            get = asyncio.ensure_future(lines.get())
            stop = asyncio.ensure_future(stopper.event.wait())
            done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop in done:
                get.cancel()
                break
            stop.cancel()
            line = get.result()
            if line is None:
                break
            if line.strip():
                print(await commands.run(line.strip(), actor, progress=_say), flush=True)
    finally:
        await gw.stop()
    return 0


async def _say(text: str) -> None:
    """An interim console message (a `set` waiting for its device)."""
    print(text, flush=True)


def _stdin_lines() -> asyncio.Queue[str | None]:
    """Lines of stdin read by a daemon thread (works for ttys, pipes and files); None at EOF."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    return queue
