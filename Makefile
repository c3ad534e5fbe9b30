# The two commands of the README: `make demo` and `make test`. Both install
# what they need on a fresh Debian / Raspberry Pi OS machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APT    := prosody mosquitto mosquitto-clients socat openssl
# Only the tests need these: systemd-analyze for the unit, Profanity under tmux as an XMPP
# client not built on slixmpp, Debian's python3 with venv and wheel for `make install` into a folder,
# Prosody's unbound resolver (only recommended by prosody) for the federated servers' own DNS,
# and Chromium with NSS's certutil for the web chat in a browser (tests/test_webchat.py).
APT_TEST := systemd profanity tmux python3-venv python3-wheel lua-unbound chromium libnss3-tools
# npm installs the web chat (Converse.js) for the demo and the tests; from Debian only when no npm
# is on the PATH: a Node.js installed another way (NodeSource's nodejs carries its own npm) stays.
NODE   := nodejs npm
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps test-deps venv test test-system demo bench clean install uninstall

all: test

# Debian packages: the XMPP and MQTT servers the demo and tests start, socat for serial ptys.
deps test-deps: PACKAGES = $(APT)
test-deps: PACKAGES += $(APT_TEST)
deps test-deps:
	@missing=""; \
	for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing $(NODE)"; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# The project and its test tools in .venv, rebuilt when pyproject.toml changes.
venv: $(BIN)/.installed
$(BIN)/.installed: pyproject.toml | deps
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[plot,omemo,test]'
	@touch $@

# Two workers, each test file whole on one (its module fixtures started once): most tests wait on
# timers and servers, so two halve the time even on 2 cores; checked with the CPU taken by
# `stress-ng --cpu 2`. A single file or test: `$(BIN)/python -m pytest tests/test_x.py` (one process).
test: test-deps venv
	$(BIN)/python -m pytest -n 2 --dist loadfile

# Opt-in, as root: `make install` booted under a real systemd (systemd-nspawn of a debootstrapped
# bookworm): active, READY, a chat `status`, a watchdog restart, a clean stop (tests/system.py).
test-system: test-deps venv
	@command -v systemd-nspawn >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq systemd-container debootstrap; }
	$(SUDO) $(BIN)/python -m tests.system

# `make demo SECOND_SERVER=1`: you on another server than the gateway (docs/federation.md).
demo: deps venv
	$(BIN)/python -m gateway.demo $(if $(SECOND_SERVER),--second-server)

bench: deps venv
	$(BIN)/python -m bench

# The systemd service on this machine (docs/raspberry-pi.md): `sudo make install`, again to update.
# DESTDIR=folder installs into a folder as if it were / (no user, groups, apt; nothing started).
install uninstall:
	DESTDIR="$(DESTDIR)" PYTHON="$(PYTHON)" systemd/install.sh $@

clean:
	rm -rf $(VENV) .demo .cache *.egg-info
