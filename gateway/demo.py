"""`make demo`: a throwaway Prosody and Mosquitto under .demo/, two accounts,
a simulated Tasmota plug on the broker, a fake DS18B20 folder under .demo/sys,
and the gateway on config/demo.toml. Ctrl-C stops it all."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from .demodevices import DemoDeviceError, Plug, Thermometer
from .localservers import Mosquitto, Prosody, ServerError

ROOT = Path(".demo")
CONFIG = Path("config/demo.toml")
XMPP_PORT = 15222  # not 5222, so it never clashes with a system Prosody
MQTT_PORT = 11883  # not 1883, likewise for a system Mosquitto
ACCOUNTS = ("gateway", "you", "viewer")
# config/demo.toml's kernel device reads this folder instead of /sys/bus/w1/devices.
W1_ROOT = ROOT / "sys" / "bus" / "w1" / "devices"
PLUG_TOPIC = "plug"
PLUG_INTERVAL = 5.0  # seconds between the plug's reports (Tasmota's TelePeriod, 300 by default)
TICK = 1.0  # seconds between the main loop's looks at the gateway and the thermometer


def _passwords() -> dict[str, str]:
    """Passwords kept in .demo/accounts.json so they stay the same between runs."""
    path = ROOT / "accounts.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    pw = {user: saved.get(user) or secrets.token_urlsafe(9) for user in ACCOUNTS}
    path.write_text(json.dumps(pw, indent=2))
    path.chmod(0o600)
    return pw


def main() -> int:
    """Set up the servers, run the gateway in the foreground, tear down on Ctrl-C."""
    ROOT.mkdir(exist_ok=True)
    prosody = Prosody(ROOT / "prosody", port=XMPP_PORT)
    broker = Mosquitto(ROOT / "mosquitto", port=MQTT_PORT)
    pw = _passwords()
    gw: subprocess.Popen | None = None
    plug = Plug("127.0.0.1", MQTT_PORT, topic=PLUG_TOPIC, interval=PLUG_INTERVAL)
    thermometer = Thermometer(W1_ROOT)
    try:
        for user in ACCOUNTS:
            prosody.register(user, pw[user])
        prosody.start()
        broker.start()
        # Before the gateway: it finds the plug Online (retained LWT) instead of last run's
        # Offline; its persistent session also keeps the plug's first report for it.
        plug.start()
        thermometer.lay_out()
        env = dict(os.environ, IOT_GATEWAY_XMPP_PASSWORD=pw["gateway"])
        gw = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(CONFIG)], env=env
        )
        time.sleep(1.0)
        if gw.poll() is not None:
            print(f"The gateway exited with code {gw.returncode}; see the messages above.")
            return 1
        print(_instructions(prosody, broker, pw), flush=True)
        signal.signal(signal.SIGTERM, _interrupt)
        while True:
            try:
                return gw.wait(TICK)
            except subprocess.TimeoutExpired:
                thermometer.tick(time.time())
    except KeyboardInterrupt:
        print("\nStopping the demo…")
        return 0
    except (ServerError, DemoDeviceError) as e:
        print(f"Cannot start the demo: {e}", file=sys.stderr)
        if "in use" in str(e):
            print(
                f"Is another demo still running? Ports {XMPP_PORT} and {MQTT_PORT} must be free. "
                f"Logs: {ROOT}/prosody/prosody.log, {ROOT}/mosquitto/mosquitto.log",
                file=sys.stderr,
            )
        return 1
    finally:
        if gw is not None:
            _stop_gateway(gw)
        plug.stop()
        prosody.stop()
        broker.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_gateway(gw: subprocess.Popen) -> None:
    # Ctrl-C in a terminal reaches the gateway too; give it time to stop by
    # itself before a SIGTERM (a second signal makes it exit at once).
    try:
        gw.wait(3)
        return
    except subprocess.TimeoutExpired:
        gw.send_signal(signal.SIGTERM)
    try:
        gw.wait(10)
    except subprocess.TimeoutExpired:
        gw.kill()
        gw.wait()


def _instructions(prosody: Prosody, broker: Mosquitto, pw: dict[str, str]) -> str:
    gw_jid = f"gateway@{prosody.domain}"
    return f"""
================================================================================
 iot-gateway demo is running ({CONFIG})

 XMPP server   127.0.0.1 port {prosody.port} (loopback only), domain {prosody.domain}
               TLS certificate signed by {prosody.ca_file}
 Accounts      you@{prosody.domain}     password {pw['you']}   (admin)
               viewer@{prosody.domain}  password {pw['viewer']}   (viewer: read only)
               {gw_jid} password {pw['gateway']}   (the gateway itself)
 MQTT broker   {broker.url}
 Devices       greenhouse, tank   simulated
               plug               a Tasmota-style plug on the broker (tele/, stat/, cmnd/{PLUG_TOPIC}/)
               pi                 a DS18B20 read through the kernel's files, here faked
                                  in {W1_ROOT}/{Thermometer.SENSOR_ID}

 Connect any XMPP client on this machine (Gajim, Dino, Profanity) as
 you@{prosody.domain} with host 127.0.0.1 and port {prosody.port}; trust the CA above
 or accept the certificate when asked. Add {gw_jid} as a contact and chat:
     help · status · read · read greenhouse.temp · set greenhouse.heater on
     read plug · set plug.relay on · read pi · history pi.soil 5
     set tank.pump_speed 40 · watch plug.power > 40 · log
 Watch the plug's MQTT traffic:  mosquitto_sub -p {broker.port} -v -t 'tele/#' -t 'stat/#' -t 'cmnd/#'

 Without XMPP, the same commands as an admin:
     .venv/bin/iot-gateway console --config {CONFIG}

 Ctrl-C stops the gateway, Prosody and Mosquitto.
================================================================================
"""


if __name__ == "__main__":
    sys.exit(main())
