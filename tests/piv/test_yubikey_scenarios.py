"""YubiKey backend scenarios that change a card for good (PIN counters, touch, keys made
outside keyd), each on a fresh rig: emulated YubiKeys behind a real pcscd, a real
keyd daemon, the real `ykman`. Needs root; skipped elsewhere with the reason.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyd.client import Client
from keyd.core.keytypes import KeyType
from keyd.errors import FailedPrecondition, InvalidArgument, Unavailable
from tests.harness import keyd_command, wait_for_backend
from tests.piv.rig import Card, missing
from tests.piv.yubikey_daemon import (
    MANAGEMENT_KEY,
    PIN,
    YubiKeyRig,
    private_file,
    running_rig,
)
from tests.verify import independent_verify

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "rig available")

SERIAL, OTHER = 34000001, 34000002
MESSAGE = b"root.json canonical bytes " * 40


@pytest.fixture
def rig() -> Iterator[YubiKeyRig]:
    yield from running_rig([Card("5.7.2", SERIAL)])


@pytest.fixture
def two_cards() -> Iterator[YubiKeyRig]:
    yield from running_rig([Card("5.7.2", SERIAL), Card("5.4.3", OTHER)])


@pytest.fixture
def untouched() -> Iterator[YubiKeyRig]:
    """A card that waits for a real touch (the test's SIGUSR1), for up to 2 s."""
    yield from running_rig([Card("5.7.2", SERIAL, auto_touch=False, touch_timeout=2.0)])


def pin_tries(rig: YubiKeyRig, index: int = 0) -> str:
    """ "N/M" as ykman reports the PIN counter (reading it spends no attempt)."""
    info = rig.ykman(index, "piv", "info")
    match = re.search(r"PIN tries remaining:\s*(\d+/\d+)", info)
    assert match, info
    return match.group(1)


def wrong_pin_once(rig: YubiKeyRig, index: int = 0) -> None:
    change = ("piv", "access", "change-pin", "--pin", "999999", "--new-pin", "654321")
    out = rig.ykman(index, *change, check=False)
    assert re.search(r"tries|wrong|incorrect|blocked", out, re.IGNORECASE), out


# -- PIN -------------------------------------------------------------------------------


def test_a_wrong_pin_is_tried_once_and_never_again(rig: YubiKeyRig) -> None:
    wrong = private_file(rig.root / "secrets" / "wrong-pin", "999999\n")
    daemon = rig.daemon(rig.table("yk", 0, pin_file=wrong))
    with daemon.client() as client:
        with pytest.raises(FailedPrecondition, match=r"refused keyd's PIN \(2 attempts left\)"):
            client.create_key(KeyType.ECDSA_P256, backend="yubikey:yk")
        for _ in range(3):
            with pytest.raises(FailedPrecondition, match="keyd stopped using the PIN"):
                client.create_key(KeyType.ECDSA_P256, backend="yubikey:yk")
        wait_for_backend(client, "yubikey:yk", "locked")
        # A reload with the PIN unchanged does not re-arm: the same PIN would be refused.
        daemon.signal(signal.SIGHUP)
        time.sleep(2.5)  # the daemon's main loop handles SIGHUP within a second
        assert "PIN is still the one the card refused" in daemon.logs()
        wait_for_backend(client, "yubikey:yk", "locked")
        # The operator fixes the PIN file and re-arms keyd with SIGHUP.
        private_file(wrong, PIN + "\n")
        daemon.signal(signal.SIGHUP)
        wait_for_backend(client, "yubikey:yk", "connected")
        record = client.create_key(KeyType.ECDSA_P256, backend="yubikey:yk")
        sig = client.sign(record.key_id, MESSAGE)
        independent_verify(record, sig.signature, MESSAGE, sig.encoding)
    assert daemon.stop() == 0
    # One refusal only, and the right PIN reset the counter; the one key is keyd's.
    assert pin_tries(rig) == "3/3"
    assert re.search(r"Algorithm:\s+ECCP256", rig.ykman(0, "piv", "keys", "info", "9c"))


def test_keyd_does_not_try_a_pin_with_few_attempts_left(rig: YubiKeyRig) -> None:
    wrong_pin_once(rig)
    assert pin_tries(rig) == "2/3"
    daemon = rig.daemon(rig.table("yk", 0, extra="min_pin_attempts = 3"))
    with (
        daemon.client() as client,
        pytest.raises(FailedPrecondition, match=r"only 2 PIN attempts left; keyd will not try"),
    ):
        client.create_key(KeyType.ECDSA_P256, backend="yubikey:yk")
    assert daemon.stop() == 0
    assert pin_tries(rig) == "2/3"  # keyd spent nothing


def test_a_blocked_pin_is_reported(rig: YubiKeyRig) -> None:
    for _ in range(3):
        wrong_pin_once(rig)
    assert pin_tries(rig) == "0/3"
    daemon = rig.daemon(rig.table("yk", 0))
    with daemon.client() as client:
        with pytest.raises(
            FailedPrecondition,
            match=r"PIN of YubiKey with serial 34000001 is blocked; stop keyd \(it holds the "
            r"card\), unblock it with the PUK",
        ):
            client.create_key(KeyType.ECDSA_P256, backend="yubikey:yk")
        status = {b.name: b for b in client.status().backends}["yubikey:yk"]
        assert status.state == "locked"
        assert "blocked" in status.detail


# -- touch -----------------------------------------------------------------------------


def test_the_caller_is_asked_for_a_touch_and_the_touch_signs(untouched: YubiKeyRig) -> None:
    rig = untouched
    daemon = rig.daemon(rig.table("yk", 0, extra='touch_policy = "always"'))
    asked: list[str] = []

    def touch(device: str) -> None:
        asked.append(device)
        rig.touch(0)

    with daemon.client() as client:
        record = client.create_key(KeyType.ECDSA_P256, backend="yubikey:yk", on_touch=touch)
        assert record.location["attested_touch_policy"] == "always"
        sig = client.sign(record.key_id, MESSAGE, on_touch=touch)
        independent_verify(record, sig.signature, MESSAGE, sig.encoding)
    assert asked == [f"YubiKey with serial {SERIAL}"] * 2


def test_no_touch_is_a_clear_error_not_a_hang(untouched: YubiKeyRig) -> None:
    rig = untouched
    daemon = rig.daemon(rig.table("yk", 0, extra='touch_policy = "always"'))
    with daemon.client() as client:
        fingers: list[threading.Thread] = []
        record = client.create_key(
            KeyType.ECDSA_P256,
            backend="yubikey:yk",
            on_touch=lambda device: fingers.append(rig.touch(0)),
        )
        fingers[0].join()  # the finger is off the key
        started = time.monotonic()
        with pytest.raises(Unavailable, match=f"touch the YubiKey with serial {SERIAL}"):
            client.sign(record.key_id, MESSAGE, on_touch=lambda device: None)
        assert time.monotonic() - started < 20  # the card's 2 s, not a hang
        # The CLI says what to do while it waits, then fails with one clear line.
        result = subprocess.run(
            keyd_command("sign", record.key_id, "--socket", str(daemon.socket)),
            input=b"payload",
            capture_output=True,
            timeout=60,
            check=False,
        )
        stderr = result.stderr.decode()
        assert result.returncode != 0
        assert f"touch the YubiKey with serial {SERIAL}" in stderr.splitlines()[0]
        assert "Traceback" not in stderr
        # Touched a little late, within the card's time: it signs.
        sig = client.sign(
            record.key_id, MESSAGE, on_touch=lambda device: fingers.append(rig.touch(0))
        )
        independent_verify(record, sig.signature, MESSAGE, sig.encoding)


# -- devices and daemons ---------------------------------------------------------------


def test_two_daemons_and_two_cards_never_cross(two_cards: YubiKeyRig) -> None:
    rig = two_cards
    # Both find their card by serial alone: each opens the readers and lets go of
    # the card that is not its own.
    first = rig.daemon(rig.table("yk", 0, reader=False))
    second = rig.daemon(rig.table("yk", 1, reader=False))
    made: dict[int, str] = {}
    with first.client() as a, second.client() as b:
        for index, client in ((0, a), (1, b)):
            made[index] = client.create_key(KeyType.ECDSA_P256, backend="yubikey:yk").key_id

        def sign_many(client: Client, key_id: str) -> None:
            record = client.get_key(key_id)
            for _ in range(20):
                sig = client.sign(key_id, MESSAGE)
                independent_verify(record, sig.signature, MESSAGE, sig.encoding)

        threads = [
            threading.Thread(target=sign_many, args=(a, made[0])),
            threading.Thread(target=sign_many, args=(b, made[1])),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [k.key_id for k in a.list_keys()] == [made[0]]
        assert [k.key_id for k in b.list_keys()] == [made[1]]
        assert a.get_key(made[0]).location["serial"] == str(SERIAL)
        assert b.get_key(made[1]).location["serial"] == str(OTHER)
        # A third daemon for a card another keyd holds is told so; it takes nothing.
        third = rig.daemon(rig.table("yk", 0, reader=False))
        with third.client() as c:
            detail = wait_for_backend(c, "yubikey:yk", "absent")
            assert "busy (held by another program)" in detail
            with pytest.raises(Unavailable, match=f"YubiKey with serial {SERIAL} not found"):
                c.create_key(KeyType.ECDSA_P256, backend="yubikey:yk")
    for daemon in rig.daemons:
        assert daemon.stop() == 0
    # Each card holds the key its own daemon made, and only that one.
    for index in (0, 1):
        assert f"on YubiKey {rig.serial(index)}" in rig.ykman(index, "piv", "info")


def test_ykman_sees_adopts_and_destroys(two_cards: YubiKeyRig, tmp_path: Path) -> None:
    """Keys keyd made are what ykman sees; keys ykman made or imported, keyd adopts
    (imported ones marked unattestable); a purge with --destroy-on-device empties the slot."""
    rig = two_cards
    made_by_ykman = tmp_path / "9d.pem"
    rig.ykman(
        1, "piv", "keys", "generate", "--algorithm", "ECCP256", "--management-key",
        MANAGEMENT_KEY, "--pin-policy", "ONCE", "9d", str(made_by_ykman),
    )  # fmt: skip
    imported = tmp_path / "imported.pem"
    imported.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    rig.ykman(1, "piv", "keys", "import", "--management-key", MANAGEMENT_KEY, "9e", str(imported))
    daemon = rig.daemon(rig.table("a", 0) + rig.table("b", 1))
    with daemon.client() as client:
        mine = client.create_key(KeyType.ECDSA_P256, backend="yubikey:a", slot="9c")
        retired = client.create_key(KeyType.ECDSA_P384, backend="yubikey:a", slot="95")
        adopted = client.adopt_key(backend="yubikey:b", device_key_id="9d", role="targets")
        assert adopted.location["origin"] == "generated"
        assert adopted.location["attestation"] == "verified"
        assert adopted.location["pin_policy"] == "once"
        assert adopted.public_key.pem == made_by_ykman.read_text()
        foreign = client.adopt_key(backend="yubikey:b", device_key_id="9e")
        assert foreign.location["origin"] == "imported"
        assert foreign.location["attestation"] == "NOT verified"
        assert "not attestable" in foreign.location["attestation_detail"]
        for record in (mine, retired, adopted, foreign):
            sig = client.sign(record.key_id, MESSAGE)
            independent_verify(record, sig.signature, MESSAGE, sig.encoding)
        with pytest.raises(InvalidArgument, match="is empty"):
            client.adopt_key(backend="yubikey:b", device_key_id="9a")
        # Destroy on purge: the slot is emptied on the card.
        client.delete_key(retired.key_id, destroy_on_device_confirmed=retired.key_id)
        client.purge_key(retired.key_id)
    assert daemon.stop() == 0
    info = rig.ykman(0, "piv", "info")
    assert "keyd ecdsa-p256 on YubiKey 34000001" in info  # 9c's certificate, keyd's subject
    assert "ECCP256" in rig.ykman(0, "piv", "keys", "info", "9c")
    gone = rig.ykman(0, "piv", "keys", "info", "95", check=False)
    assert "No key stored in slot 95" in gone


def test_attestation_against_yubicos_roots_is_not_verified(rig: YubiKeyRig) -> None:
    """The emulator's attestation does not chain to Yubico's real roots (bundled, the
    default): recorded as not verified, or refused and wiped when required."""
    daemon = rig.daemon(rig.table("lax", 0, trust_emulator=False))
    with daemon.client() as client:
        record = client.create_key(KeyType.ECDSA_P256, backend="yubikey:lax", slot="82")
        assert record.location["attestation"] == "NOT verified"
        assert (
            "does not chain to a trusted attestation root" in record.location["attestation_detail"]
        )
    assert daemon.stop() == 0
    strict_table = rig.table("strict", 0, trust_emulator=False, extra="require_attestation = true")
    strict = rig.daemon(strict_table)
    with strict.client() as client:
        with pytest.raises(FailedPrecondition, match=r"failed attestation .* it was destroyed"):
            client.create_key(KeyType.ECDSA_P256, backend="yubikey:strict", slot="83")
        assert client.list_keys() == []
    assert strict.stop() == 0
    assert "No key stored in slot 83" in rig.ykman(0, "piv", "keys", "info", "83", check=False)


def test_a_purge_never_destroys_a_key_that_replaced_the_recorded_one(
    rig: YubiKeyRig, tmp_path: Path
) -> None:
    """Between the delete and the purge someone put another key in the slot (with ykman,
    keyd stopped): the purge refuses, and the new key stays."""
    daemon = rig.daemon(rig.table("yk", 0))
    with daemon.client() as client:
        record = client.create_key(KeyType.ECDSA_P256, backend="yubikey:yk", slot="86")
        client.delete_key(record.key_id, destroy_on_device_confirmed=record.key_id)
    assert daemon.stop() == 0
    replacement = tmp_path / "replacement.pem"
    rig.ykman(0, "piv", "keys", "delete", "--management-key", MANAGEMENT_KEY, "86")
    rig.ykman(
        0, "piv", "keys", "generate", "--algorithm", "ECCP384", "--management-key",
        MANAGEMENT_KEY, "86", str(replacement),
    )  # fmt: skip
    daemon.start()
    refused = pytest.raises(FailedPrecondition, match=r"holds another key .* nothing was destroyed")
    with daemon.client() as client, refused:
        client.purge_key(record.key_id)
    assert daemon.stop() == 0
    assert re.search(r"Algorithm:\s+ECCP384", rig.ykman(0, "piv", "keys", "info", "86"))
