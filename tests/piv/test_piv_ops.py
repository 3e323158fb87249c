"""keyd's PIV operations (keyd/backends/yubikey/piv.py) on the emulated card, in-process
through yubikit's PivSession: no pcscd, no YubiKey. Signatures are checked with
`cryptography` against the public key the card returned."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from ykman.piv import pivman_set_mgm_key
from yubikit.piv import (
    KEY_TYPE,
    MANAGEMENT_KEY_TYPE,
    PIN_POLICY,
    SLOT,
    TOUCH_POLICY,
    PivSession,
    PublicKey,
)

from keyd.backends.yubikey import attestation
from keyd.backends.yubikey.piv import (
    PinLocked,
    PinStateLost,
    Secrets,
    authenticate,
    generate,
    occupied,
    sign,
)
from keyd.core.keytypes import KeyType
from keyd.errors import FailedPrecondition, InvalidArgument, Unavailable
from tests.piv.connection import EmulatedConnection
from tests.piv.emulator import EmulatedCard

DEFAULT_KEY = bytes.fromhex("010203040506070801020304050607080102030405060708")
PIN = "123456"
SECRETS = Secrets(pin=PIN, management_key=DEFAULT_KEY)


def session_for(card: EmulatedCard) -> PivSession:
    return PivSession(EmulatedConnection(card))


def make(
    card: EmulatedCard,
    slot: SLOT,
    key_type: KeyType,
    *,
    pin_policy: PIN_POLICY = PIN_POLICY.DEFAULT,
    touch_policy: TOUCH_POLICY = TOUCH_POLICY.NEVER,
    secrets: Secrets = SECRETS,
    min_attempts: int = 2,
) -> PublicKey:
    return generate(
        session_for(card),
        slot,
        key_type,
        pin_policy=pin_policy,
        touch_policy=touch_policy,
        secrets=secrets,
        min_attempts=min_attempts,
        serial=card.serial,
    )


@pytest.mark.parametrize("version", [(5, 7, 2), (5, 4, 3)])
@pytest.mark.parametrize("slot", [SLOT.SIGNATURE, SLOT.RETIRED5])
def test_generate_and_sign_p256(version: tuple[int, int, int], slot: SLOT) -> None:
    card = EmulatedCard(version=version, serial=1234)
    public = make(card, slot, KeyType.ECDSA_P256)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    session = session_for(card)
    assert session.get_certificate(slot).public_key() == public  # other tools see it
    # 9C: PIN policy ALWAYS by default; retired slots ONCE (once per session). The backend
    # verifies as the slot needs; here, before each signature.
    session.verify_pin(PIN)
    signature = sign(session, slot, KeyType.ECDSA_P256, b"release", prehashed=False, serial=1234)
    public.verify(signature, b"release", ec.ECDSA(hashes.SHA256()))
    digest = hashlib.sha256(b"release").digest()
    session.verify_pin(PIN)
    signature = sign(session, slot, KeyType.ECDSA_P256, digest, prehashed=True, serial=1234)
    public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_ed25519_needs_firmware_5_7() -> None:
    new = EmulatedCard(version=(5, 7, 2), serial=1)
    public = make(new, SLOT.RETIRED1, KeyType.ED25519)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    session = session_for(new)
    session.verify_pin(PIN)
    signature = sign(session, SLOT.RETIRED1, KeyType.ED25519, b"m", prehashed=False, serial=1)
    public.verify(signature, b"m")
    old = EmulatedCard(version=(5, 4, 3), serial=2)
    with pytest.raises(InvalidArgument, match=r"firmware 5\.4\.3"):
        make(old, SLOT.RETIRED1, KeyType.ED25519)


def test_an_occupied_slot_is_never_overwritten() -> None:
    card = EmulatedCard(serial=3)
    make(card, SLOT.RETIRED2, KeyType.ECDSA_P256)
    with pytest.raises(FailedPrecondition, match="already holds a key"):
        make(card, SLOT.RETIRED2, KeyType.ECDSA_P256)


def test_a_wrong_pin_is_tried_once_and_never_again() -> None:
    card = EmulatedCard(serial=4)
    wrong = Secrets(pin="654321", management_key=DEFAULT_KEY)
    with pytest.raises(PinLocked, match="2 attempts left"):
        make(card, SLOT.RETIRED3, KeyType.ECDSA_P256, secrets=wrong)
    session = session_for(card)
    assert session.get_pin_attempts() == 2
    # Below the threshold keyd does not even try, the right PIN included.
    with pytest.raises(PinLocked, match="only 2 PIN attempts left"):
        make(card, SLOT.RETIRED4, KeyType.ECDSA_P256, min_attempts=3)
    assert session_for(card).get_pin_attempts() == 2


def test_a_blocked_pin_is_reported() -> None:
    card = EmulatedCard(serial=5)
    session = session_for(card)
    for _ in range(3):
        with pytest.raises(Exception):  # noqa: B017, PT011 - yubikit's InvalidPinError
            session.verify_pin("000000")
    with pytest.raises(PinLocked, match="blocked"):
        make(card, SLOT.RETIRED3, KeyType.ECDSA_P256)


def test_a_wrong_management_key_is_refused() -> None:
    card = EmulatedCard(serial=6)
    with pytest.raises(FailedPrecondition, match="refused the management key"):
        make(card, SLOT.RETIRED3, KeyType.ECDSA_P256, secrets=Secrets(PIN, b"\0" * 24))


def test_a_pin_protected_management_key_works() -> None:
    card = EmulatedCard(version=(5, 7, 2), serial=7)
    session = session_for(card)
    session.authenticate(DEFAULT_KEY)
    session.verify_pin(PIN)
    pivman_set_mgm_key(session, bytes(range(24)), MANAGEMENT_KEY_TYPE.AES192, store_on_device=True)
    public = make(card, SLOT.RETIRED6, KeyType.ECDSA_P256, secrets=Secrets(PIN))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    authenticate(session_for(card), Secrets(PIN), min_attempts=2, serial=7)


def test_no_touch_is_a_clear_error_not_a_hang() -> None:
    card = EmulatedCard(serial=8, touch_timeout=0.2, on_touch=lambda slot: True)
    # The self-signed certificate is made with the new key: the operator touches once.
    make(card, SLOT.RETIRED7, KeyType.ECDSA_P256, touch_policy=TOUCH_POLICY.ALWAYS)
    card.on_touch = None  # from now on nobody touches it
    session = session_for(card)
    session.verify_pin(PIN)
    asked: list[bool] = []
    with pytest.raises(Unavailable, match="touch the YubiKey with serial 8"):
        sign(
            session, SLOT.RETIRED7, KeyType.ECDSA_P256, b"m", prehashed=False, serial=8,
            before_touch=lambda: asked.append(True),
        )  # fmt: skip
    assert asked == [True]  # keyd said so, right before the card waited
    assert card.touch_requests  # the card did ask


def test_a_lost_pin_state_is_not_mistaken_for_a_touch() -> None:
    card = EmulatedCard(serial=12)
    make(card, SLOT.RETIRED10, KeyType.ECDSA_P256, pin_policy=PIN_POLICY.ONCE)
    with pytest.raises(PinStateLost, match="wanted its PIN again"):
        sign(session_for(card), SLOT.RETIRED10, KeyType.ECDSA_P256, b"m", prehashed=False,
             serial=12)  # fmt: skip


def test_a_key_whose_certificate_fails_is_taken_out_again() -> None:
    """No touch for the new key's certificate: the key does not stay behind (5.7+)."""
    card = EmulatedCard(version=(5, 7, 2), serial=13, touch_timeout=0.1)
    with pytest.raises(Unavailable, match="needs a touch"):
        make(card, SLOT.RETIRED11, KeyType.ECDSA_P256, touch_policy=TOUCH_POLICY.ALWAYS)
    assert not occupied(session_for(card), SLOT.RETIRED11)


def test_before_5_7_a_stray_key_is_reported() -> None:
    card = EmulatedCard(version=(5, 4, 3), serial=14, touch_timeout=0.1)
    with pytest.raises(Unavailable, match="now holds a key keyd did not record"):
        make(card, SLOT.RETIRED12, KeyType.ECDSA_P256, touch_policy=TOUCH_POLICY.ALWAYS)
    assert occupied(session_for(card), SLOT.RETIRED12)


def test_before_5_3_a_key_without_certificate_counts_as_there() -> None:
    """No metadata before 5.3: a generated key without certificate must not look empty."""
    card = EmulatedCard(version=(5, 2, 7), serial=15)
    session = session_for(card)
    session.authenticate(DEFAULT_KEY)
    session.generate_key(SLOT.RETIRED13, KEY_TYPE.ECCP256)  # as `ykman piv keys generate`
    assert occupied(session_for(card), SLOT.RETIRED13)
    assert not occupied(session_for(card), SLOT.RETIRED14)
    with pytest.raises(FailedPrecondition, match="already holds a key"):
        make(card, SLOT.RETIRED13, KeyType.ECDSA_P256)


def _attest(card: EmulatedCard, slot: SLOT) -> tuple[x509.Certificate, x509.Certificate]:
    session = session_for(card)
    return session.attest_key(slot), session.get_certificate(SLOT.ATTESTATION)


def test_attestation_verifies_against_the_emulator_s_root_only() -> None:
    card = EmulatedCard(version=(5, 4, 3), serial=9)
    public = make(card, SLOT.RETIRED8, KeyType.ECDSA_P256, pin_policy=PIN_POLICY.ONCE)
    statement, device = _attest(card, SLOT.RETIRED8)
    result = attestation.verify(
        statement,
        device,
        public,
        roots=[card.attestation_root],
        serial=9,
    )
    assert result.verified, result.detail
    assert (result.serial, result.firmware) == (9, "5.4.3")
    assert (result.pin_policy, result.touch_policy) == ("once", "never")

    # Not against a root that did not issue the card's certificate (as Yubico's would not).
    other = EmulatedCard(serial=10).attestation_root
    result = attestation.verify(statement, device, public, roots=[other], serial=9)
    assert not result.verified
    assert "does not chain" in result.detail

    # Not for another card's serial, nor for another key, nor for other policies.
    root = [card.attestation_root]
    result = attestation.verify(statement, device, public, roots=root, serial=99)
    assert (result.verified, result.detail) == (False, "the attestation names serial 9, not 99")
    assert result.serial is None  # unverified facts are not recorded
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    result = attestation.verify(statement, device, stranger, roots=root, serial=9)
    assert (result.verified, result.detail) == (False, "the attestation is for another key")
    result = attestation.verify(
        statement, device, public, roots=root, serial=9, pin_policy="always"
    )
    assert (result.verified, result.detail) == (
        False,
        "the card applied PIN policy once, not always",
    )
    assert attestation.verify(
        statement, device, public, roots=root, serial=9, pin_policy="once", touch_policy="never"
    ).verified


def test_a_tampered_attestation_is_rejected() -> None:
    card = EmulatedCard(serial=11)
    public = make(card, SLOT.RETIRED9, KeyType.ECDSA_P256)
    statement, device = _attest(card, SLOT.RETIRED9)
    der = bytearray(statement.public_bytes(serialization.Encoding.DER))
    der[-10] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_certificate(bytes(der))
    result = attestation.verify(
        tampered,
        device,
        public,
        roots=[card.attestation_root],
        serial=11,
    )
    assert not result.verified
    assert "not signed by the card" in result.detail
