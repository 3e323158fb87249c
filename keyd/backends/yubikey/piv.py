"""What keyd does on a YubiKey's PIV application, one PivSession at a time.

Every function takes a freshly selected session (the device layer reselects after a
reset) and the secrets it needs; none keeps state. The PIN is never tried when fewer
than `min_attempts` remain and never retried after a refusal: a blocked PIN needs the
PUK, and burning it by accident is the worst thing a signing daemon can do.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from ykman.piv import generate_self_signed_certificate, get_pivman_data, get_pivman_protected_data
from yubikit.core import InvalidPinError, NotSupportedError
from yubikit.core.smartcard import SW, ApduError
from yubikit.piv import (
    KEY_TYPE,
    PIN_POLICY,
    SLOT,
    TOUCH_POLICY,
    PivSession,
    PublicKey,
)

from keyd.core.keytypes import KeyType
from keyd.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unavailable

# keyd's key types and the card's.
PIV_TYPES: dict[KeyType, KEY_TYPE] = {
    KeyType.ECDSA_P256: KEY_TYPE.ECCP256,
    KeyType.ECDSA_P384: KEY_TYPE.ECCP384,
    KeyType.ED25519: KEY_TYPE.ED25519,
    KeyType.RSA_3072: KEY_TYPE.RSA3072,
}
_HASHES: dict[KeyType, hashes.HashAlgorithm] = {
    KeyType.ECDSA_P256: hashes.SHA256(),
    KeyType.ECDSA_P384: hashes.SHA384(),
    KeyType.RSA_3072: hashes.SHA256(),
}
_CERT_DAYS = 3650
_RSA_BITS = 3072
_PSS_SALT = 32


def pss_encode(digest: bytes, em_bits: int) -> bytes:
    """EMSA-PSS-ENCODE (RFC 8017 section 9.1.1) of a SHA-256 digest, MGF1-SHA-256, a
    32-byte random salt: the block a raw RSA operation turns into a PSS signature."""
    h_len = len(digest)
    em_len = (em_bits + 7) // 8
    salt = os.urandom(_PSS_SALT)
    h = hashlib.sha256(b"\0" * 8 + digest + salt).digest()
    db = b"\0" * (em_len - _PSS_SALT - h_len - 2) + b"\x01" + salt
    mask = b"".join(
        hashlib.sha256(h + counter.to_bytes(4, "big")).digest()
        for counter in range((len(db) + h_len - 1) // h_len)
    )
    masked = bytearray(a ^ b for a, b in zip(db, mask, strict=False))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    return bytes(masked) + h + b"\xbc"


@dataclass(frozen=True)
class Secrets:
    pin: str = field(repr=False)
    # None: the management key is PIN-protected on the card (ykman's --protect).
    management_key: bytes | None = field(default=None, repr=False)


class PinLocked(FailedPrecondition):
    """keyd will not try the PIN (refused once, or too few attempts left)."""


def verify_pin(session: PivSession, pin: str, *, min_attempts: int, serial: int) -> None:
    """Verify the PIN, unless that could bring the card close to blocking it."""
    left = session.get_pin_attempts()
    if left == 0:
        raise PinLocked(
            f"the PIN of YubiKey {serial} is blocked; unblock it with the PUK "
            "(ykman piv access unblock-pin), then re-arm keyd"
        )
    if left < min_attempts:
        raise PinLocked(
            f"YubiKey {serial} has only {left} PIN attempts left; keyd will not try "
            f"(it needs {min_attempts}). Check the PIN, verify it once yourself "
            "(ykman piv info does not; any successful PIN use resets the counter)"
        )
    try:
        session.verify_pin(pin)
    except InvalidPinError as exc:
        raise PinLocked(
            f"YubiKey {serial} refused keyd's PIN ({exc.attempts_remaining} attempts left); "
            "keyd will not try it again. Fix the PIN file, then re-arm keyd"
        ) from None


def authenticate(session: PivSession, secrets: Secrets, *, min_attempts: int, serial: int) -> None:
    """Management-key authentication; its type comes from the card's metadata (3DES or
    AES). A PIN-protected key is read from the card after the PIN."""
    key = secrets.management_key
    if key is None:
        if not get_pivman_data(session).has_protected_key:
            raise FailedPrecondition(
                f"YubiKey {serial}: no management key configured, and the card does not "
                "keep a PIN-protected one (ykman piv access change-management-key --protect)"
            )
        verify_pin(session, secrets.pin, min_attempts=min_attempts, serial=serial)
        key = get_pivman_protected_data(session).key
        if key is None:
            raise FailedPrecondition(f"YubiKey {serial}: the PIN-protected key is missing")
    try:
        session.authenticate(key)
    except ApduError as exc:
        if exc.sw == SW.SECURITY_CONDITION_NOT_SATISFIED:
            raise PermissionDenied(
                f"YubiKey {serial} refused the management key; check the management key file"
            ) from None
        raise


def generate(
    session: PivSession,
    slot: SLOT,
    key_type: KeyType,
    *,
    pin_policy: PIN_POLICY,
    touch_policy: TOUCH_POLICY,
    secrets: Secrets,
    min_attempts: int,
    serial: int,
) -> PublicKey:
    """Make a key in `slot` and store a self-signed certificate beside it, so other
    tools see it. An occupied slot is refused: keyd never overwrites a key."""
    piv_type = PIV_TYPES[key_type]
    try:
        session.check_key_support(piv_type, pin_policy, touch_policy, generate=True)
    except NotSupportedError as exc:
        version = ".".join(map(str, session.version))
        raise InvalidArgument(f"YubiKey {serial} (firmware {version}): {exc}") from None
    if _occupied(session, slot):
        raise FailedPrecondition(
            f"slot {slot.name} ({slot:02X}) of YubiKey {serial} already holds a key; "
            "choose another slot or adopt that key"
        )
    # The PIN first: a wrong one must stop us before a key exists, not after.
    verify_pin(session, secrets.pin, min_attempts=min_attempts, serial=serial)
    authenticate(session, secrets, min_attempts=min_attempts, serial=serial)
    public_key = session.generate_key(slot, piv_type, pin_policy, touch_policy)
    try:
        # Again for the certificate's signature: a PIN policy ALWAYS key wants it now.
        verify_pin(session, secrets.pin, min_attempts=min_attempts, serial=serial)
        now = datetime.datetime.now(datetime.UTC)
        certificate = generate_self_signed_certificate(
            session,
            slot,
            public_key,
            f"CN=keyd {key_type.value} on YubiKey {serial}",
            now,
            now + datetime.timedelta(days=_CERT_DAYS),
        )
        session.put_certificate(slot, certificate)
    except ApduError as exc:
        # No touch for the certificate, say: the key must not stay behind unrecorded.
        if tuple(session.version) >= (5, 7, 0):
            with contextlib.suppress(ApduError):
                session.delete_key(slot)
        if exc.sw == SW.SECURITY_CONDITION_NOT_SATISFIED:
            raise Unavailable(
                f"YubiKey {serial} did not sign the new key's certificate: touch the "
                f"YubiKey with serial {serial} when asked and retry"
            ) from None
        raise
    return public_key


def _occupied(session: PivSession, slot: SLOT) -> bool:
    try:
        session.get_slot_metadata(slot)
    except ApduError as exc:
        if exc.sw == SW.REFERENCE_DATA_NOT_FOUND:
            return False
        raise
    except NotSupportedError:  # before 5.3: no metadata; a certificate is the only sign
        try:
            session.get_certificate(slot)
        except ApduError:
            return False
    return True


def sign(
    session: PivSession,
    slot: SLOT,
    key_type: KeyType,
    payload: bytes,
    *,
    prehashed: bool,
    pin: str | None,
    min_attempts: int,
    serial: int,
) -> bytes:
    """One signature: ECDSA as DER, Ed25519 over the message, RSA-PSS (SHA-256, salt 32).
    `pin` is given when the slot's PIN policy needs it for this operation (ALWAYS:
    right before each use)."""
    if pin is not None:
        verify_pin(session, pin, min_attempts=min_attempts, serial=serial)
    try:
        if key_type is KeyType.RSA_3072:
            digest = payload if prehashed else hashlib.sha256(payload).digest()
            # The card does raw RSA; keyd pads. (yubikit would pad by making a
            # throwaway 3072-bit RSA key per signature, which takes about a second.)
            block = pss_encode(digest, _RSA_BITS - 1)
            return session._use_private_key(slot, KEY_TYPE.RSA3072, block, False)  # type: ignore[no-untyped-call,no-any-return]
        algorithm: hashes.HashAlgorithm | Prehashed | None = None
        if key_type.is_ecdsa:
            hash_algorithm = _HASHES[key_type]
            algorithm = Prehashed(hash_algorithm) if prehashed else hash_algorithm
        return session.sign(slot, PIV_TYPES[key_type], payload, algorithm)  # type: ignore[arg-type]
    except ApduError as exc:
        if exc.sw == SW.SECURITY_CONDITION_NOT_SATISFIED:
            # A touch that did not come, or a PIN the slot wants and did not get.
            raise Unavailable(
                f"YubiKey {serial} did not sign: it needs a touch (or its PIN) for slot "
                f"{slot.name}; touch the YubiKey with serial {serial} when asked and retry"
            ) from None
        raise
