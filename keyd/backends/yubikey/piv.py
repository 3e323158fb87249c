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
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from smartcard.Exceptions import CardConnectionException, NoCardException
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
from keyd.errors import FailedPrecondition, InvalidArgument, KeydError, Unavailable

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
    if h_len != hashlib.sha256().digest_size:
        raise ValueError("PSS here pads SHA-256 digests only")
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


class PinRefused(PinLocked):
    """The card refused the PIN keyd holds (one attempt spent)."""


class PinStateLost(Unavailable):
    """The card wanted a PIN keyd believed verified (the card was reset by someone)."""


_STOP_KEYD = "stop keyd (it holds the card)"
_CARD_GONE: tuple[type[Exception], ...] = (CardConnectionException, NoCardException)


def device_name(serial: int) -> str:
    return f"YubiKey with serial {serial}"


def verify_pin(session: PivSession, pin: str, *, min_attempts: int, serial: int) -> None:
    """Verify the PIN, unless that could bring the card close to blocking it."""
    who = device_name(serial)
    left = session.get_pin_attempts()
    if left == 0:
        raise PinLocked(
            f"the PIN of {who} is blocked; {_STOP_KEYD}, unblock it with the PUK "
            "(ykman piv access unblock-pin), then start keyd"
        )
    if left < min_attempts:
        raise PinLocked(
            f"{who} has only {left} PIN attempts left; keyd will not try (it needs "
            f"{min_attempts}). Check the PIN; {_STOP_KEYD} and use the PIN once yourself "
            "(any successful use resets the counter), then start keyd"
        )
    try:
        session.verify_pin(pin)
    except InvalidPinError as exc:
        raise PinRefused(
            f"{who} refused keyd's PIN ({exc.attempts_remaining} attempts left); keyd will "
            "not try it again"
        ) from None


def authenticate(session: PivSession, secrets: Secrets, *, min_attempts: int, serial: int) -> None:
    """Management-key authentication; its type comes from the card's metadata (3DES or
    AES). A PIN-protected key is read from the card after the PIN."""
    key = secrets.management_key
    who = device_name(serial)
    if key is None:
        if not get_pivman_data(session).has_protected_key:
            raise FailedPrecondition(
                f"{who}: no management key configured, and the card does not keep a "
                "PIN-protected one (ykman piv access change-management-key --protect)"
            )
        verify_pin(session, secrets.pin, min_attempts=min_attempts, serial=serial)
        key = get_pivman_protected_data(session).key
        if key is None:
            raise FailedPrecondition(f"{who}: the PIN-protected management key is missing")
    try:
        session.authenticate(key)
    except ApduError as exc:
        if exc.sw == SW.SECURITY_CONDITION_NOT_SATISFIED:
            # keyd's own setup, not the caller's rights: FAILED_PRECONDITION.
            raise FailedPrecondition(
                f"{who} refused the management key; check the management key file"
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
    before_touch: Callable[[], None] | None = None,
) -> PublicKey:
    """Make a key in `slot` and store a self-signed certificate beside it, so other
    tools see it. An occupied slot is refused: keyd never overwrites a key. If anything
    fails once the key exists, the key is deleted again (firmware 5.7+), or the error
    says the slot now holds a key nobody recorded."""
    piv_type = PIV_TYPES[key_type]
    who = device_name(serial)
    try:
        session.check_key_support(piv_type, pin_policy, touch_policy, generate=True)
    except NotSupportedError as exc:
        version = ".".join(map(str, session.version))
        raise InvalidArgument(f"YubiKey {serial} (firmware {version}): {exc}") from None
    if occupied(session, slot):
        raise FailedPrecondition(
            f"slot {slot:02x} of {who} already holds a key; choose another slot or adopt that key"
        )
    # The PIN first: a wrong one must stop us before a key exists, not after.
    verify_pin(session, secrets.pin, min_attempts=min_attempts, serial=serial)
    authenticate(session, secrets, min_attempts=min_attempts, serial=serial)
    public_key = session.generate_key(slot, piv_type, pin_policy, touch_policy)
    try:
        # Again for the certificate's signature: a PIN policy ALWAYS key wants it now.
        verify_pin(session, secrets.pin, min_attempts=min_attempts, serial=serial)
        now = datetime.datetime.now(datetime.UTC)
        if before_touch is not None:
            before_touch()
        certificate = generate_self_signed_certificate(
            session,
            slot,
            public_key,
            f"CN=keyd {key_type.value} on YubiKey {serial}",
            now,
            now + datetime.timedelta(days=_CERT_DAYS),
        )
        session.put_certificate(slot, certificate)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the new key must not stay unrecorded
        raise _undo_generate(session, slot, who, exc) from None
    return public_key


def _undo_generate(session: PivSession, slot: SLOT, who: str, exc: Exception) -> Exception:
    """Take a half-made key out of its slot; the error to raise instead of `exc`."""
    if isinstance(exc, _CARD_GONE):
        return exc  # the card is gone: nothing can be undone now; the device layer says so
    removed = False
    if tuple(session.version) >= (5, 7, 0):
        with contextlib.suppress(ApduError):
            session.delete_key(slot)
            removed = True
    if isinstance(exc, ApduError) and exc.sw == SW.SECURITY_CONDITION_NOT_SATISFIED:
        exc = Unavailable(
            f"{who} did not sign the new key's certificate: it needs a touch; touch the "
            f"{who} when asked and retry"
        )
    if removed:
        return exc
    stray = (
        f"; slot {slot:02x} now holds a key keyd did not record: adopt it (keyd keys adopt "
        f"--id {slot:02x}) or remove it with ykman"
    )
    if isinstance(exc, KeydError):
        same_kind: KeydError = type(exc)(exc.message + stray)
        return same_kind
    return FailedPrecondition(f"{who} failed after making a key ({type(exc).__name__}){stray}")


def occupied(session: PivSession, slot: SLOT) -> bool:
    """Whether the slot holds a key. Before firmware 5.3 there is no metadata: a key
    the card can attest (generated) or refuses to attest as imported (6A80) is there;
    only "not found" (6A88) and no certificate mean empty."""
    try:
        session.get_slot_metadata(slot)
    except ApduError as exc:
        if exc.sw == SW.REFERENCE_DATA_NOT_FOUND:
            return False
        raise
    except NotSupportedError:
        try:
            session.attest_key(slot)
        except ApduError as exc:
            if exc.sw != SW.REFERENCE_DATA_NOT_FOUND:
                return True
        except NotSupportedError:
            pass
        else:
            return True
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
    serial: int,
    before_touch: Callable[[], None] | None = None,
) -> bytes:
    """One signature: ECDSA as DER, Ed25519 over the message, RSA-PSS (SHA-256, salt 32).
    The caller has verified the PIN as the slot needs; `before_touch` is called right
    before the card starts waiting for a touch (slots with a touch policy)."""
    try:
        if key_type is KeyType.RSA_3072:
            digest = payload if prehashed else hashlib.sha256(payload).digest()
            # The card does raw RSA; keyd pads. (yubikit would pad by making a
            # throwaway 3072-bit RSA key per signature, which takes about a second.)
            block = pss_encode(digest, _RSA_BITS - 1)
            if before_touch is not None:
                before_touch()
            return session._use_private_key(slot, KEY_TYPE.RSA3072, block, False)  # type: ignore[no-untyped-call,no-any-return]
        algorithm: hashes.HashAlgorithm | Prehashed | None = None
        if key_type.is_ecdsa:
            hash_algorithm = _HASHES[key_type]
            algorithm = Prehashed(hash_algorithm) if prehashed else hash_algorithm
        if before_touch is not None:
            before_touch()
        return session.sign(slot, PIV_TYPES[key_type], payload, algorithm)  # type: ignore[arg-type]
    except ApduError as exc:
        if exc.sw != SW.SECURITY_CONDITION_NOT_SATISFIED:
            raise
        who = device_name(serial)
        if before_touch is not None:
            raise Unavailable(
                f"{who} did not sign: no touch came in time; touch the {who} when asked and retry"
            ) from None
        raise PinStateLost(
            f"{who} wanted its PIN again for slot {slot:02x} (was the card reset by another "
            "program?); retry"
        ) from None
