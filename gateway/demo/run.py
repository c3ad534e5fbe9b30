"""`make demo`: a throwaway Prosody and Mosquitto under .demo/, two accounts,
a simulated Tasmota plug on the broker, a fake DS18B20 folder under .demo/sys,
and the gateway on config/demo.toml. Ctrl-C stops it all.

The broker is set up as docs/mqtt.md says a real one should be: no anonymous
clients, a password per client and the ACL below, which gives the gateway,
Zigbee2MQTT, Home Assistant and each Tasmota device only their own topics.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from .devices import DemoDeviceError, Plug, Thermometer
from .localservers import Mosquitto, Prosody, ServerError

ROOT = Path(".demo")
CONFIG = Path("config/demo.toml")
XMPP_PORT = 15222  # not 5222, so it never clashes with a system Prosody
MQTT_PORT = 11883  # not 1883, likewise for a system Mosquitto
ACCOUNTS = ("gateway", "you", "viewer")
MQTT_GATEWAY = "iot-gateway"  # config/demo.toml's [mqtt] username
PLUG_TOPIC = "plug"
MQTT_ACCOUNTS = (MQTT_GATEWAY, PLUG_TOPIC, "homeassistant")  # a Tasmota device logs in as its topic
GATEWAY_ID = "demo-greenhouse"  # config/demo.toml's [gateway] id: its status topic and Home Assistant base
# Mosquitto's acl_file (docs/mqtt.md shows the same): what a client has no line for, it can
# neither publish nor subscribe to. `pattern` lines apply to every client, %u being its username.
ACL = f"""\
# The gateway: reads every device, commands them, publishes its status and Home Assistant discovery.
user {MQTT_GATEWAY}
topic readwrite iot-gateway-{GATEWAY_ID}/status
topic readwrite iot-gateway/{GATEWAY_ID}/#
topic readwrite homeassistant/#
topic read tele/#
topic read stat/#
topic write cmnd/#
topic read tasmota/discovery/#
topic read zigbee2mqtt/#
topic write zigbee2mqtt/+/set

# Zigbee2MQTT: its own tree only.
user zigbee2mqtt
topic readwrite zigbee2mqtt/#

# Home Assistant: discovery, every state; commands only on the gateway's set topics and the devices' own.
user homeassistant
topic readwrite homeassistant/#
topic read iot-gateway-{GATEWAY_ID}/status
topic read iot-gateway/{GATEWAY_ID}/#
topic write iot-gateway/{GATEWAY_ID}/+/+/set
topic read zigbee2mqtt/#
topic write zigbee2mqtt/+/set
topic read tele/#
topic read stat/#
topic write cmnd/#

# Each Tasmota device logs in with its topic as username: it reports on its own topics
# and reads only its own commands.
pattern write tele/%u/#
pattern write stat/%u/#
pattern read cmnd/%u/#
"""
# config/demo.toml's kernel device reads this folder instead of /sys/bus/w1/devices.
W1_ROOT = ROOT / "sys" / "bus" / "w1" / "devices"
PLUG_INTERVAL = 5.0  # seconds between the plug's reports (Tasmota's TelePeriod, 300 by default)
TICK = 1.0  # seconds between the main loop's looks at the gateway and the thermometer


def _passwords() -> dict[str, str]:
    """Passwords kept in .demo/accounts.json so they stay the same between runs."""
    path = ROOT / "accounts.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    pw = {user: saved.get(user) or secrets.token_urlsafe(9) for user in (*ACCOUNTS, *MQTT_ACCOUNTS)}
    path.write_text(json.dumps(pw, indent=2))
    path.chmod(0o600)
    return pw


def main() -> int:
    """Set up the servers, run the gateway in the foreground, tear down on Ctrl-C."""
    ROOT.mkdir(exist_ok=True)
    prosody = Prosody(ROOT / "prosody", port=XMPP_PORT)
    pw = _passwords()
    broker = Mosquitto(ROOT / "mosquitto", port=MQTT_PORT, acl=ACL, accounts={u: pw[u] for u in MQTT_ACCOUNTS})
    # config/demo.toml's [mqtt] password_file.
    secret = ROOT / "mosquitto" / f"{MQTT_GATEWAY}.password"
    secret.touch(mode=0o600)
    secret.write_text(pw[MQTT_GATEWAY] + "\n")
    gw: subprocess.Popen | None = None
    plug = Plug("127.0.0.1", MQTT_PORT, topic=PLUG_TOPIC, interval=PLUG_INTERVAL, password=pw[PLUG_TOPIC])
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
 MQTT broker   {broker.url}   no anonymous clients; accounts {', '.join(MQTT_ACCOUNTS)}
               (passwords in {ROOT}/accounts.json), topics per account in {broker.root}/acl
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
 Watch the plug's MQTT traffic:
     mosquitto_sub -p {broker.port} -u homeassistant -P {pw['homeassistant']} -v -t 'tele/#' -t 'stat/#'

 Without XMPP, the same commands as an admin:
     .venv/bin/iot-gateway console --config {CONFIG}

 Ctrl-C stops the gateway, Prosody and Mosquitto.
================================================================================
"""


if __name__ == "__main__":
    sys.exit(main())
