#!/bin/bash
# `sudo make install` / `sudo make uninstall`: iot-gateway as a systemd service, in one command
# (docs/raspberry-pi.md, steps 2 to 6). Run from the project's folder, as root:
#   sudo systemd/install.sh            install or update; running it again changes nothing
#   sudo systemd/install.sh uninstall  remove code, venv and unit; keep config, state and user
# Variables (environment):
#   DESTDIR   install into this folder as if it were / (for packaging and tests): no user, groups,
#             apt or chown; the unit is enabled with `systemctl --root`, never started.
#   PREFIX    code and venv (/opt/iot-gateway); CONFDIR (/etc/iot-gateway); UNITDIR (/etc/systemd/system)
#   PYTHON    the interpreter for the venv (python3); PIP_OPTS extra options for every pip call.
#   EXTRAS    the optional features (plot,omemo; plot on 32-bit ARM, where OMEMO needs a compiler).
set -euo pipefail

ACTION=${1:-install}
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/iot-gateway}
CONFDIR=${CONFDIR:-/etc/iot-gateway}
UNITDIR=${UNITDIR:-/etc/systemd/system}
STATEDIR=/var/lib/iot-gateway
PYTHON=${PYTHON:-python3}
PIP_OPTS=${PIP_OPTS:-}
USER_NAME=iot-gateway
DEVICE_GROUPS="gpio dialout spi i2c"
UNIT=iot-gateway.service
SRC=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$DESTDIR
VENV=$PREFIX/.venv

say() { echo "iot-gateway install: $*"; }
die() { echo "iot-gateway install: error: $*" >&2; exit 1; }

if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
  die "run it as root: sudo make $ACTION (or DESTDIR=/some/folder to try it without root)"
fi
ARCH=$(dpkg --print-architecture 2>/dev/null || uname -m)
systemd_running() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }
systemctl_() {  # systemctl on the machine, or on the files under DESTDIR
  command -v systemctl >/dev/null || return 0
  if [ -n "$DESTDIR" ]; then systemctl --root="$DESTDIR" "$@"; else systemctl "$@"; fi
}

if [ "$ACTION" = uninstall ]; then
  if systemd_running; then
    systemctl disable --now "$UNIT" 2>/dev/null || true
  else
    systemctl_ disable "$UNIT" >/dev/null 2>&1 || true
  fi
  rm -f "$ROOT$UNITDIR/$UNIT"
  rm -rf "$ROOT$UNITDIR/$UNIT.d/install.conf"
  rmdir "$ROOT$UNITDIR/$UNIT.d" 2>/dev/null || true
  rm -rf "${ROOT:?}$PREFIX"
  systemd_running && systemctl daemon-reload
  say "removed $PREFIX and $UNITDIR/$UNIT; kept $CONFDIR, $STATEDIR and the user $USER_NAME"
  exit 0
fi
[ "$ACTION" = install ] || die "unknown action '$ACTION' (install or uninstall)"

# 32-bit ARM (Pi Zero 2, Pi 3 and older with 32-bit Raspberry Pi OS): PyPI has no armv7 wheels of
# matplotlib, numpy, pycares, cffi and XEdDSA, and building them needs a compiler. Debian has the
# first four; the venv sees them (--system-site-packages), pip keeps them (constraints) and takes
# an aiodns that works with Debian's pycares. OMEMO is left out.
case "$ARCH" in
  armhf|armel|armv6l|armv7l) NO_COMPILER=1; EXTRAS=${EXTRAS:-plot}
    APT_PACKAGES="python3-venv python3-pycares python3-cffi python3-matplotlib" ;;
  *) NO_COMPILER=0; EXTRAS=${EXTRAS:-plot,omemo}; APT_PACKAGES="python3-venv" ;;
esac

# 1. Debian packages
if [ -z "$DESTDIR" ]; then
  missing=""
  for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    say "installing Debian packages:$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
  fi
fi

# 2. The service's user and the device groups (plain Debian has no gpio, spi or i2c group)
OWNER=()
if [ -z "$DESTDIR" ]; then
  for g in $DEVICE_GROUPS; do
    getent group "$g" >/dev/null || { groupadd --system "$g"; say "created the group $g"; }
  done
  if ! id "$USER_NAME" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir "$STATEDIR" --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
    say "created the user $USER_NAME"
  fi
  usermod -aG "${DEVICE_GROUPS// /,}" "$USER_NAME"
  OWNER=(-o root -g "$USER_NAME")
  install -d -m 0750 -o "$USER_NAME" -g "$USER_NAME" "$STATEDIR"
else
  say "DESTDIR=$DESTDIR: no user, groups or packages; files keep your ownership"
fi

# 3. Code (what is in this folder, without checkouts, venvs and test state) and its venv
changed=0
install -d -m 0755 "$ROOT$PREFIX"
if [ "$SRC" != "$ROOT$PREFIX" ]; then
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./.demo --exclude=./build \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache --exclude='.lgd-nfy*' -cf - . \
      | tar -C "$stage" -xf -
  if ! diff -rq --exclude=.venv --exclude=build --exclude='*.egg-info' --exclude=__pycache__ --exclude='.lgd-nfy*' \
       "$stage" "$ROOT$PREFIX" >/dev/null 2>&1; then
    find "$ROOT$PREFIX" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
    cp -R "$stage/." "$ROOT$PREFIX/"
    chmod -R u+rwX,go+rX,go-w "$ROOT$PREFIX"
    changed=1
    say "code copied to $PREFIX"
  fi
fi
if [ ! -x "$ROOT$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$ROOT$VENV"
  changed=1
fi
pip() { local cmd=$1; shift; "$ROOT$VENV/bin/python" -m pip "$cmd" --disable-pip-version-check -q $PIP_OPTS "$@"; }
# What the venv was made from: the extras and the code (also when the code was unpacked in $PREFIX itself).
stamp="$ROOT$VENV/.iot-gateway-installed"
made_from="$EXTRAS $(cd "$ROOT$PREFIX" && find . \( -name .venv -o -name build -o -name '*.egg-info' -o -name __pycache__ -o -name '.lgd-nfy*' \) -prune \
  -o -type f -print | LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$made_from" ]; then
  constraints=()
  if [ "$NO_COMPILER" = 1 ]; then
    # Debian's builds as they are (pip would otherwise build newer ones from source), and an aiodns
    # that works with Debian's pycares 4.3 (aiodns 3.3+ wants pycares 4.9, 4.x wants 5).
    { echo "aiodns<4"
      for m in pycares cffi matplotlib numpy; do
        if v=$("$ROOT$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$m'))" 2>/dev/null); then
          echo "$m==$v"
        fi
      done
    } > "$ROOT$VENV/constraints.txt"
    constraints=(-c "$ROOT$VENV/constraints.txt")
    say "$ARCH: no-compiler route (Debian's pycares, cffi, matplotlib; aiodns<4; no OMEMO)"
  fi
  say "pip install $PREFIX${EXTRAS:+[$EXTRAS]} (a few minutes on a Pi)"
  pip install "${constraints[@]}" "$ROOT$PREFIX${EXTRAS:+[$EXTRAS]}"
  rm -rf "$ROOT$PREFIX/build" "$ROOT$PREFIX"/*.egg-info
  echo "$made_from" > "$stamp"
  changed=1
fi

# 4. GPIO: lgpio (Raspberry Pi OS's python3-lgpio, else a wheel from PyPI) or gpiozero's native pins
dropin="$ROOT$UNITDIR/$UNIT.d/install.conf"
# Importing lgpio makes a notification pipe (.lgd-nfy*) in the working directory: in a scratch one.
scratch=$(mktemp -d)
has_lgpio() { (cd "$scratch" && "$ROOT$VENV/bin/python" -c 'import lgpio' 2>/dev/null); }
has_lgpio || pip install --only-binary=:all: 'lgpio>=0.2' 2>/dev/null || true
if has_lgpio; then
  PINS=lgpio
  rm -f "$dropin"; rmdir "$(dirname "$dropin")" 2>/dev/null || true
else
  PINS=native
  install -d -m 0755 "$(dirname "$dropin")"
  new=$(cat <<EOF
# Written by \`make install\`: lgpio is not installed here (no python3-lgpio, which only Raspberry Pi OS
# has, and no wheel on PyPI for $ARCH), so gpiozero's native pins are used; they need /dev/gpiomem.
[Service]
Environment=GPIOZERO_PIN_FACTORY=native
DeviceAllow=/dev/gpiomem rw
EOF
)
  [ "$(cat "$dropin" 2>/dev/null)" = "$new" ] || printf '%s\n' "$new" > "$dropin"
fi
rm -rf "$scratch"
say "GPIO pin factory: $PINS"

# 5. Config and password file, unless there are some already
install -d -m 0755 "$ROOT$CONFDIR"
if [ ! -e "$ROOT$CONFDIR/gateway.toml" ]; then
  install -m 0640 "${OWNER[@]}" "$SRC/config/example.toml" "$ROOT$CONFDIR/gateway.toml"
  say "wrote $CONFDIR/gateway.toml from config/example.toml: put your JID, contacts and devices in it"
fi
if [ ! -e "$ROOT$CONFDIR/xmpp.pass" ]; then
  # Read by the service only: its user owns it, nobody else may read it.
  if [ -z "$DESTDIR" ]; then
    install -m 0600 -o "$USER_NAME" -g "$USER_NAME" /dev/null "$ROOT$CONFDIR/xmpp.pass"
  else
    install -m 0600 /dev/null "$ROOT$CONFDIR/xmpp.pass"
  fi
  say "wrote an empty $CONFDIR/xmpp.pass: sudoedit it, one line, the gateway account's password"
fi

# 6. The unit
if ! cmp -s "$SRC/systemd/$UNIT" "$ROOT$UNITDIR/$UNIT"; then
  install -D -m 0644 "$SRC/systemd/$UNIT" "$ROOT$UNITDIR/$UNIT"
  changed=1
fi
systemd_running && systemctl daemon-reload
if ! command -v systemctl >/dev/null; then
  say "warning: no systemctl here (systemd is not installed): $UNIT is in place, not enabled"
elif ! systemctl_ enable "$UNIT" >/dev/null 2>&1; then
  say "warning: could not enable $UNIT"
fi

# 7. Check the config as the service will read it, then start (or restart after a change)
check=("$ROOT$VENV/bin/iot-gateway" check --config "$ROOT$CONFDIR/gateway.toml")
if [ -n "$DESTDIR" ]; then
  say "DESTDIR: not checked or started"
  exit 0
fi
echo "--- iot-gateway check"
if runuser -u "$USER_NAME" -- env GPIOZERO_PIN_FACTORY=$PINS "${check[@]}"; then
  ok=1
else
  ok=0
fi
echo "---"
if ! systemd_running; then
  say "systemd is not running here: $UNIT is not started now"
elif [ "$ok" = 0 ]; then
  say "not started: fix $CONFDIR/gateway.toml (and xmpp.pass) as above, then: sudo systemctl restart iot-gateway"
elif [ "$changed" = 1 ] || ! systemctl is-active -q "$UNIT"; then
  say "starting $UNIT (returns once the gateway is online)"
  systemctl restart "$UNIT" || true
fi
systemd_running && { systemctl --no-pager status "$UNIT" || true; }
exit 0
