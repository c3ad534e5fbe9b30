"""The old name of gateway.demo.localservers, kept because ../shared/tools/pi-userland.sh
(the QEMU install check for arm64 and armhf) imports `make_certs` from here."""

from .demo.localservers import make_certs

__all__ = ["make_certs"]
