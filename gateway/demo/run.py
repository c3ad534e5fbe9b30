"""`make demo`: a throwaway Prosody and Mosquitto under .demo/, two accounts,
a simulated Tasmota plug on the broker, a fake DS18B20 folder under .demo/sys,
the gateway on config/demo.toml, and a web chat (Converse.js, served by the
demo's Prosody on https://localhost:15443/: gateway/demo/webchat.py). Ctrl-C
stops it all.

The broker is set up as docs/mqtt.md says a real one should be: no anonymous
clients, a password per client and the ACL below, which gives the gateway,
Zigbee2MQTT, Home Assistant and each Tasmota device only their own topics.

`make demo SECOND_SERVER=1` (`--second-server`): the owner on another server, as
in most deployments (docs/federation.md). Two federated Prosody servers instead
of one: the gateway and `viewer` on home.example (127.0.0.2), `you` on
provider.example (127.0.0.3), s2s between them; the gateway runs on
config/demo.toml rewritten for them (.demo/second-server.toml)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from .devices import DemoDeviceError, Plug, Thermometer
from .localservers import Federation, Mosquitto, Prosody, ServerError
from .webchat import CONVERSE_VERSION, WebChatError, install_converse, write_site

ROOT = Path(".demo")
CONFIG = Path("config/demo.toml")
XMPP_PORT = 15222  # not 5222, so it never clashes with a system Prosody
MQTT_PORT = 11883  # not 1883, likewise for a system Mosquitto
WEB_PORT = 15443  # HTTPS: the web chat's page and websocket, and the uploads (plots)
WEB = ROOT / "web"  # Converse.js (npm) in WEB/converse, the page in WEB/site
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
HOME, PROVIDER = "home.example", "provider.example"  # --second-server: each on its own loopback address
SECOND = {HOME: "127.0.0.2", PROVIDER: "127.0.0.3"}
SECOND_CONFIG = ROOT / "second-server.toml"


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


def _converse() -> Path | None:
    """Converse.js's files for the web chat (installed from npm into .demo/web/converse on the first
    run), or None, said why, when npm cannot get them: the demo then runs without its web chat."""
    try:
        return install_converse(WEB / "converse")
    except WebChatError as e:
        print(f"No web chat in this demo: {e}", file=sys.stderr)
        return None


def second_server_config(text: str) -> str:
    """config/demo.toml's text for `--second-server`: the gateway and viewer on home.example,
    you on provider.example, the home server's address. ValueError if demo.toml changed
    so that a line to rewrite is gone."""
    for old, new in (
        ('"gateway@localhost"', f'"gateway@{HOME}"'),
        ('"you@localhost"', f'"you@{PROVIDER}"'),
        ('"viewer@localhost"', f'"viewer@{HOME}"'),
        (f'"127.0.0.1:{XMPP_PORT}"', f'"{SECOND[HOME]}:{XMPP_PORT}"'),
    ):
        if old not in text:
            raise ValueError(f"{CONFIG} has no {old} to rewrite for --second-server")
        text = text.replace(old, new)
    return text


def gateway_env(pw: dict[str, str], ca_file: Path) -> dict[str, str]:
    """The gateway's environment in the demo: its two passwords, and the demo's CA as the one
    TLS trusts (OpenSSL's SSL_CERT_FILE), so config/demo.toml names no file `make demo` makes
    and `iot-gateway check` passes on it in a fresh checkout."""
    return dict(
        os.environ, IOT_GATEWAY_XMPP_PASSWORD=pw["gateway"], IOT_GATEWAY_MQTT_PASSWORD=pw[MQTT_GATEWAY],
        SSL_CERT_FILE=str(ca_file),
    )


def main(argv: list[str] | None = None) -> int:
    """Set up the servers, run the gateway in the foreground, tear down on Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m gateway.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--second-server", action="store_true",
                        help="you on another server than the gateway (two federated servers)")
    second = parser.parse_args(argv).second_server
    ROOT.mkdir(exist_ok=True)
    federation = Federation(ROOT / "federation", SECOND) if second else None
    if federation is not None:
        home = Prosody(ROOT / HOME, port=XMPP_PORT, domain=HOME, federation=federation, https_port=WEB_PORT)
        servers = [home, Prosody(ROOT / PROVIDER, port=XMPP_PORT, domain=PROVIDER, uploads=False, federation=federation)]
        accounts = {"gateway": home, "viewer": home, "you": servers[1]}
        SECOND_CONFIG.write_text(second_server_config(CONFIG.read_text()))
        SECOND_CONFIG.chmod(0o640)
        config = SECOND_CONFIG
    else:
        dist = _converse()
        site = WEB / "site" if dist is not None else None
        servers = [Prosody(ROOT / "prosody", port=XMPP_PORT, https_port=WEB_PORT, web=site)]
        if dist is not None and site is not None:
            demo = tomllib.loads(CONFIG.read_text())
            write_site(site, dist, servers[0].ca_file, demo["xmpp"]["jid"], demo["xmpp"].get("resource", "gateway"),
                       f"you@{servers[0].domain}", demo["gateway"]["name"])
        accounts = dict.fromkeys(ACCOUNTS, servers[0])
        config = CONFIG
    pw = _passwords()
    broker = Mosquitto(ROOT / "mosquitto", port=MQTT_PORT, acl=ACL, accounts={u: pw[u] for u in MQTT_ACCOUNTS})
    gw: subprocess.Popen | None = None
    plug = Plug("127.0.0.1", MQTT_PORT, topic=PLUG_TOPIC, interval=PLUG_INTERVAL, password=pw[PLUG_TOPIC])
    thermometer = Thermometer(W1_ROOT)
    try:
        if federation is not None:
            federation.start()
        for user, server in accounts.items():
            server.register(user, pw[user])
        for server in servers:
            server.start()
        broker.start()
        # Before the gateway: it finds the plug Online (retained LWT) instead of last run's
        # Offline; its persistent session also keeps the plug's first report for it.
        plug.start()
        thermometer.lay_out()
        env = gateway_env(pw, servers[0].ca_file)
        gw = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config)], env=env
        )
        time.sleep(1.0)
        if gw.poll() is not None:
            print(f"The gateway exited with code {gw.returncode}; see the messages above.")
            return 1
        print(_instructions(accounts, broker, pw, config), flush=True)
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
                f"Is another demo still running? Ports {XMPP_PORT}, {WEB_PORT} and {MQTT_PORT} must be free. "
                f"Logs: {ROOT}/prosody/prosody.log, {ROOT}/mosquitto/mosquitto.log",
                file=sys.stderr,
            )
        return 1
    finally:
        if gw is not None:
            _stop_gateway(gw)
        plug.stop()
        for server in servers:
            server.stop()
        broker.stop()
        if federation is not None:
            federation.stop()


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


def _instructions(accounts: dict[str, Prosody], broker: Mosquitto, pw: dict[str, str], config: Path) -> str:
    you, home = accounts["you"], accounts["gateway"]
    gw_jid = f"gateway@{home.domain}"
    if you is home:
        servers = f"""XMPP server   127.0.0.1 port {home.port} (loopback only), domain {home.domain}
               TLS certificate signed by {home.ca_file}"""
    else:
        servers = f"""XMPP servers  {home.domain} at {home.address}: the gateway's
               {you.domain} at {you.address}: yours (s2s between them)
               TLS certificates signed by {home.ca_file}
               (plots link to https://upload.{home.domain}/…: add {home.domain} and
               upload.{home.domain} as {home.interface} to /etc/hosts to open them)"""
    web = ""
    if home.web is not None:
        web = f"""
 Web chat      https://{home.domain}:{home.https_port}/   in a browser on this machine, as you@{you.domain}
               with the password below (Converse.js {CONVERSE_VERSION}; plots come inline from
               the same port). The browser does not know the demo's CA: trust
               {home.ca_file} (the page links it) or accept its warning once.
               Chromium: certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n iot-gateway-demo -i {home.ca_file}
               Firefox: Settings, Certificates, View Certificates, Authorities, Import.
               From a phone: docs/webchat.md (the demo listens on loopback only).
"""
    elif you is home:
        web = """
 Web chat      none this time: Converse.js could not be installed (see above)
"""
    else:
        web = """
 Web chat      only in the one-server demo (make demo): https://localhost:15443/
"""
    return f"""
================================================================================
 iot-gateway demo is running ({config})

 {servers}{web}
 Accounts      you@{you.domain}     password {pw['you']}   (admin)
               viewer@{home.domain}  password {pw['viewer']}   (viewer: read only)
               {gw_jid} password {pw['gateway']}   (the gateway itself)
 MQTT broker   {broker.url}   no anonymous clients; accounts {', '.join(MQTT_ACCOUNTS)}
               (passwords in {ROOT}/accounts.json), topics per account in {broker.root}/acl
 Devices       greenhouse, tank   simulated
               plug               a Tasmota-style plug on the broker (tele/, stat/, cmnd/{PLUG_TOPIC}/)
               pi                 a DS18B20 read through the kernel's files, here faked
                                  in {W1_ROOT}/{Thermometer.SENSOR_ID}

 Connect any XMPP client on this machine (Gajim, Dino, Profanity) as
 you@{you.domain} with host {you.interface} and port {you.port}; trust the CA above
 or accept the certificate when asked. Add {gw_jid} as a contact and chat:
     help · status · read · read greenhouse.temp · set greenhouse.heater on
     read plug · set plug.relay on · read pi · history pi.soil 5
     set tank.pump_speed 40 · watch plug.power > 40 · log
 Watch the plug's MQTT traffic:
     mosquitto_sub -p {broker.port} -u homeassistant -P {pw['homeassistant']} -v -t 'tele/#' -t 'stat/#'

 Without XMPP, the same commands as an admin:
     IOT_GATEWAY_MQTT_PASSWORD={pw[MQTT_GATEWAY]} .venv/bin/iot-gateway console --config {config}

 Ctrl-C stops the gateway, Prosody and Mosquitto.
================================================================================
"""


if __name__ == "__main__":
    sys.exit(main())
