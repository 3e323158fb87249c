"""Opt-in, for what the emulator cannot vouch for: a real YubiKey, chosen by serial, through
the machine's own pcscd. It never runs unless asked for:

    KEYD_TEST_YUBIKEY_SERIAL=12345678 KEYD_TEST_YUBIKEY_SLOT=95 \\
    KEYD_TEST_YUBIKEY_PIN_FILE=/path/pin KEYD_TEST_YUBIKEY_MANAGEMENT_KEY_FILE=/path/mgmt \\
        .venv/bin/pytest -m real_yubikey tests/piv/test_real_yubikey.py

The slot must be empty and is emptied again at the end (firmware 5.7+ deletes the key;
older firmware overwrites it with a key nobody records). Checks: the card's attestation
chains to Yubico's published roots (bundled), and its signatures verify.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyd.client import Client
from keyd.core.keytypes import KeyType
from tests.harness import Daemon
from tests.piv.yubikey_daemon import private_file
from tests.verify import independent_verify

_ENV = ("SERIAL", "SLOT", "PIN_FILE", "MANAGEMENT_KEY_FILE")
_SETTINGS = {name: os.environ.get(f"KEYD_TEST_YUBIKEY_{name}", "") for name in _ENV}

pytestmark = [
    pytest.mark.real_yubikey,
    pytest.mark.skipif(
        not all(_SETTINGS.values()),
        reason="opt-in: set KEYD_TEST_YUBIKEY_SERIAL, _SLOT, _PIN_FILE, _MANAGEMENT_KEY_FILE",
    ),
]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    tmp_path.chmod(0o700)
    pin = private_file(tmp_path / "secrets" / "pin", Path(_SETTINGS["PIN_FILE"]).read_text())
    mgmt = private_file(
        tmp_path / "secrets" / "mgmt", Path(_SETTINGS["MANAGEMENT_KEY_FILE"]).read_text()
    )
    table = (
        f"[yubikey.real]\nserial = {_SETTINGS['SERIAL']}\n"
        f'pin_file = "{pin}"\nmanagement_key_file = "{mgmt}"\nrequire_attestation = true\n'
    )
    daemon = Daemon(tmp_path / "d", extra=table)
    daemon.init()
    daemon.start()
    try:
        with daemon.client() as c:
            yield c
    finally:
        daemon.stop()
        shutil.rmtree(tmp_path / "secrets", ignore_errors=True)


def test_a_real_yubikey_attests_signs_and_forgets(client: Client) -> None:
    slot = _SETTINGS["SLOT"]
    record = client.create_key(KeyType.ECDSA_P256, backend="yubikey:real", slot=slot)
    try:
        assert record.location["attestation"] == "verified"
        assert "Yubico" in record.location["attestation_detail"]
        assert record.location["attested_serial"] == _SETTINGS["SERIAL"]
        message = b"real YubiKey"
        sig = client.sign(record.key_id, message)
        independent_verify(record, sig.signature, message, sig.encoding)
    finally:
        client.delete_key(record.key_id, destroy_on_device_confirmed=record.key_id)
        client.purge_key(record.key_id)
