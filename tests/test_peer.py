"""The test client's shortcuts (tests/peer.py) change nothing a test sees."""

from __future__ import annotations

import pytest
from slixmpp.util import hash as hash_named
from slixmpp.util.sasl.mechanisms import SCRAM

from tests import peer


@pytest.mark.parametrize("name", ["SHA-1", "SHA-256", "SHA-512"])
@pytest.mark.parametrize("password", ["pässwörd", b"\x00raw", ""])
def test_scram_hi_in_c_gives_slixmpps_bytes(name: str, password: str | bytes) -> None:
    mech = SCRAM.__new__(SCRAM)  # Hi needs only the hash: no SASL exchange to set up
    mech.hash = hash_named(name)
    salt = b"\x01salt\xff"
    assert SCRAM.Hi is peer.pbkdf2_hi  # what every login of the suite uses
    assert peer.pbkdf2_hi(mech, password, salt, 4096) == peer.slow_hi(mech, password, salt, 4096)
