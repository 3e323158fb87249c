"""The yubikey backend through a real keyd daemon, on emulated YubiKeys behind a real pcscd.

The YubiKeys are emulated (tests/piv/emulator.py: firmware 5.7.2 and 5.4.3); everything
else is real: pcscd with vpcd in private namespaces, keyd's daemon on a Unix socket,
its client and CLI, and `ykman`. Signatures are checked with `cryptography` alone.
Needs root (namespaces); skipped elsewhere with the reason.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator

import pytest

from keyd.client import Client
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.errors import FailedPrecondition, InvalidArgument, Unavailable
from tests.harness import keyd_command, wait_for_backend
from tests.piv.rig import Card, missing
from tests.piv.yubikey_daemon import YubiKeyRig, running_rig
from tests.verify import independent_verify

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "rig available")

NEW, OLD = 33000001, 33000002  # firmware 5.7.2 and 5.4.3
MESSAGE = b"targets.json canonical bytes " * 40


@pytest.fixture(scope="module")
def rig() -> Iterator[YubiKeyRig]:
    yield from running_rig([Card("5.7.2", NEW), Card("5.4.3", OLD)])


@pytest.fixture(scope="module")
def client(rig: YubiKeyRig) -> Iterator[Client]:
    # "new" is chosen by serial and reader; "old" by serial alone (discovery).
    tables = rig.table("new", 0, extra='[yubikey.new.slots]\ntargets = "8a"\n') + rig.table(
        "old", 1, reader=False, extra='pin_policy = "once"'
    )
    daemon = rig.daemon(tables)
    with daemon.client() as c:
        wait_for_backend(c, "yubikey:new", "connected")
        wait_for_backend(c, "yubikey:old", "connected")
        yield c


def sign_and_verify(client: Client, key_id: str) -> None:
    record = client.get_key(key_id)
    for encoding in (SignatureEncoding.NATIVE, SignatureEncoding.RAW, SignatureEncoding.DER):
        if encoding is not SignatureEncoding.NATIVE and not record.key_type.is_ecdsa:
            continue
        sig = client.sign(key_id, MESSAGE, encoding=encoding)
        independent_verify(record, sig.signature, MESSAGE, sig.encoding)
    if record.key_type is not KeyType.ED25519:
        digest = hashlib.new(record.key_type.hash_algorithm().name, MESSAGE).digest()
        sig = client.sign(key_id, digest=digest)
        independent_verify(record, sig.signature, MESSAGE, sig.encoding)


@pytest.mark.parametrize(
    ("backend", "slot", "key_type"),
    [
        ("yubikey:new", "9c", KeyType.ECDSA_P256),
        ("yubikey:new", "82", KeyType.ECDSA_P384),
        ("yubikey:new", "83", KeyType.ED25519),
        ("yubikey:new", "84", KeyType.RSA_3072),
        ("yubikey:old", "9c", KeyType.ECDSA_P256),
        ("yubikey:old", "82", KeyType.ECDSA_P384),
    ],
)
def test_generate_in_a_slot_and_sign(
    client: Client, backend: str, slot: str, key_type: KeyType
) -> None:
    record = client.create_key(key_type, backend=backend, role="root", slot=slot)
    assert record.backend == backend
    assert record.location["slot"] == slot
    assert record.location["origin"] == "generated"
    sign_and_verify(client, record.key_id)


def test_the_role_chooses_the_slot(client: Client) -> None:
    record = client.create_key(KeyType.ECDSA_P256, backend="yubikey:new", role="targets")
    assert record.location["slot"] == "8a"
    sign_and_verify(client, record.key_id)


def test_attestation_is_verified_and_recorded(client: Client) -> None:
    record = client.create_key(KeyType.ECDSA_P256, backend="yubikey:new", slot="85")
    location = record.location
    assert location["attestation"] == "verified", location
    assert location["attestation_detail"] == (
        f"chains to CN=Emulated PIV Attestation Root (test only) {NEW}"
    )
    assert location["attested_serial"] == str(NEW)
    assert location["attested_firmware"] == "5.7.2"
    assert location["attested_pin_policy"] == "always"  # the default
    assert location["attested_touch_policy"] == "never"


def test_keys_show_prints_the_attestation(client: Client, rig: YubiKeyRig) -> None:
    record = client.create_key(KeyType.ECDSA_P256, backend="yubikey:old", slot="86")
    shown = subprocess.run(
        keyd_command("keys", "show", record.key_id, "--socket", str(rig.daemons[0].socket)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "attestation=verified" in shown
    assert f"attested_serial={OLD}" in shown
    assert "attested_firmware=5.4.3" in shown
    assert "attested_pin_policy=once" in shown
    assert "device_status=present" in shown
    assert "pin_attempts_left=3" in shown


def test_an_occupied_slot_is_refused(client: Client) -> None:
    client.create_key(KeyType.ECDSA_P256, backend="yubikey:new", slot="87")
    with pytest.raises(FailedPrecondition, match=r"already holds a key"):
        client.create_key(KeyType.ECDSA_P256, backend="yubikey:new", slot="87")


@pytest.mark.parametrize("key_type", [KeyType.ED25519, KeyType.RSA_3072])
def test_firmware_5_4_refuses_newer_algorithms_clearly(client: Client, key_type: KeyType) -> None:
    with pytest.raises(InvalidArgument, match=r"YubiKey 33000002 \(firmware 5\.4\.3\)"):
        client.create_key(key_type, backend="yubikey:old", slot="88")


@pytest.mark.parametrize("slot", ["9b", "f9", "zz", "96"])
def test_a_slot_that_is_not_a_key_slot_is_refused(client: Client, slot: str) -> None:
    with pytest.raises(InvalidArgument, match="not a PIV key slot"):
        client.create_key(KeyType.ECDSA_P256, backend="yubikey:new", slot=slot)


def test_a_slot_on_a_backend_without_slots_is_refused(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="has no slots"):
        client.create_key(KeyType.ECDSA_P256, backend="store", slot="9c")


def test_a_removed_card_is_reported_and_found_again(client: Client, rig: YubiKeyRig) -> None:
    """The card is pulled mid-session and put back (the emulator restarts: its PIN state
    is gone). keyd reports it absent, then finds it again and, because the key's PIN
    policy is ONCE, verifies the PIN again before it signs."""
    record = client.create_key(KeyType.ECDSA_P256, backend="yubikey:old", slot="89")
    rig.pcsc.remove_card(1)
    try:
        with pytest.raises(Unavailable, match=f"YubiKey with serial {OLD} (was removed|not found)"):
            client.sign(record.key_id, MESSAGE)
        wait_for_backend(client, "yubikey:old", "absent")
        # Keys on the other card sign on.
        other = client.list_keys(backend="yubikey:new")[0]
        independent_verify(other, client.sign(other.key_id, MESSAGE).signature, MESSAGE,
                           SignatureEncoding.NATIVE)  # fmt: skip
    finally:
        rig.pcsc.start_card(1)
        rig.pcsc.wait_for_readers()
    sig = client.sign(record.key_id, MESSAGE)
    independent_verify(record, sig.signature, MESSAGE, sig.encoding)
    wait_for_backend(client, "yubikey:old", "connected")


def test_status_describes_each_card(client: Client) -> None:
    details = {b.name: b for b in client.status().backends}
    assert "firmware 5.7.2" in details["yubikey:new"].detail
    assert "firmware 5.4.3" in details["yubikey:old"].detail
    assert "3 PIN attempts left" in details["yubikey:old"].detail
