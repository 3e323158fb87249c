"""The emulated PIV card, driven through an unmodified yubikit PivSession (and ykman helpers).

Everything here runs in-process against `tests.piv.emulator.EmulatedCard`: no YubiKey, no pcscd.
Firmware 5.7.2 (AES-192 default management key, Ed25519, move/delete) and 5.4.3 (3DES default,
neither) are both covered where they differ.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from ykman.piv import (
    generate_chuid,
    generate_self_signed_certificate,
    get_piv_info,
    get_pivman_data,
    get_pivman_protected_data,
    pivman_set_mgm_key,
)
from yubikit.core import InvalidPinError, NotSupportedError
from yubikit.core.smartcard import SW, ApduError
from yubikit.management import ManagementSession
from yubikit.piv import (
    DEFAULT_MANAGEMENT_KEY,
    KEY_TYPE,
    MANAGEMENT_KEY_TYPE,
    OBJECT_ID,
    PIN_POLICY,
    SLOT,
    TOUCH_POLICY,
    PivSession,
)

from tests.piv.connection import EmulatedConnection
from tests.piv.emulator import YUBIKEY5_USB_ATR, EmulatedCard

FW57 = (5, 7, 2)
FW54 = (5, 4, 3)
SERIAL = 31415926
# An ATR whose T0 high nibble is not F: yubikit then treats the transport as NFC and keeps to
# short APDUs, so command chaining (CLA 10) and GET RESPONSE (61xx) are exercised.
NFC_ATR = bytes.fromhex("3B8C800150") + b"YubiKey" + b"\x00"
Pubkey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@pytest.fixture(params=[FW57, FW54], ids=["fw5.7.2", "fw5.4.3"])
def card(request: pytest.FixtureRequest) -> EmulatedCard:
    version: tuple[int, int, int] = request.param
    return EmulatedCard(version=version, serial=SERIAL, touch_timeout=0.2)


@pytest.fixture
def card57() -> EmulatedCard:
    return EmulatedCard(version=FW57, serial=SERIAL, touch_timeout=0.2)


@pytest.fixture
def card54() -> EmulatedCard:
    return EmulatedCard(version=FW54, serial=SERIAL, touch_timeout=0.2)


@pytest.fixture
def connect() -> Iterator[Callable[[EmulatedCard], PivSession]]:
    """Open PIV sessions (each on a new connection) and close their connections afterwards."""
    opened: list[EmulatedConnection] = []

    def open_session(card: EmulatedCard) -> PivSession:
        opened.append(EmulatedConnection(card))
        return PivSession(opened[-1])

    yield open_session
    for conn in opened:
        conn.close()


def admin(session: PivSession, pin: str | None = "123456") -> PivSession:
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    if pin is not None:
        session.verify_pin(pin)
    return session


def sw_of(excinfo: pytest.ExceptionInfo[ApduError]) -> int:
    return excinfo.value.sw


def raw(session: PivSession, ins: int, p1: int, p2: int, data: bytes = b"") -> bytes:
    """Send one APDU through the session's own protocol (chaining and 61xx handled)."""
    return session.protocol.send_apdu(0, ins, p1, p2, data)


def as_public(key: object) -> Pubkey:
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    return key


def der(key: object) -> bytes:
    return as_public(key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- identity: version, serial, Management applet ------------------------------------------------


def test_version_serial_and_management_applet(
    card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = connect(card)
    assert tuple(session.version) == card.version
    assert session.get_serial() == SERIAL
    info = ManagementSession(EmulatedConnection(card)).read_device_info()
    assert info.serial == SERIAL
    assert tuple(info.version) == card.version


def test_usb_atr_gets_extended_apdus(card57: EmulatedCard, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[bytes] = []
    transmit = card57.transmit

    def record(apdu: bytes) -> bytes:
        sent.append(apdu)
        return transmit(apdu)

    monkeypatch.setattr(card57, "transmit", record)
    conn = EmulatedConnection(card57)
    assert (conn.atr, conn.transport.name) == (YUBIKEY5_USB_ATR, "USB")
    session = admin(PivSession(conn), pin=None)
    session.put_object(0x5FC10E, bytes(1000))
    assert session.get_object(0x5FC10E) == bytes(1000)
    put = sent[-2]
    assert put[:5] == bytes.fromhex("00DB3FFF00")  # one extended APDU, no chaining
    assert int.from_bytes(put[5:7], "big") == len(put) - 7


def test_framing_errors_and_select(card57: EmulatedCard) -> None:
    def sw(apdu: str) -> int:
        return int.from_bytes(card57.transmit(bytes.fromhex(apdu))[-2:], "big")

    assert sw("00FD000000") == SW.INVALID_INSTRUCTION  # nothing selected yet
    assert sw("00A4040005A000000308") == SW.OK
    assert sw("00200080" + "08" + b"123456".hex() + "FFFF") == SW.OK
    assert sw("0020008000") == SW.OK  # verified
    assert sw("00A4040003A00000") == SW.FILE_NOT_FOUND  # unknown AID: applet kept, status reset
    assert sw("0020008000") == 0x63C3
    assert sw("00200080" + "08" + b"123456".hex() + "FFFF") == SW.OK
    assert sw("0020FF8000") == SW.OK  # P1=FF: log the PIN out (SP 800-73-4 3.2.1)
    assert sw("0020008000") == 0x63C3
    assert sw("00EE000000") == SW.INVALID_INSTRUCTION
    assert sw("80FD000000") == SW.CLASS_NOT_SUPPORTED
    assert sw("00C0000000") == SW.CONDITIONS_NOT_SATISFIED  # GET RESPONSE with nothing pending
    assert sw("00FD") == SW.WRONG_LENGTH
    assert card57.transmit(bytes.fromhex("00FD000000")) == bytes.fromhex("0507029000")


# --- PIN and PUK ---------------------------------------------------------------------------------


def test_pin_verify_wrong_decrements_then_blocks(
    card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = connect(card)
    with pytest.raises(ApduError) as status:  # empty VERIFY is a status query: 63C3
        raw(session, 0x20, 0x00, 0x80)
    assert sw_of(status) == 0x63C3
    session.verify_pin("123456")
    raw(session, 0x20, 0x00, 0x80)  # now 9000: verified
    for left in (2, 1, 0):
        with pytest.raises(InvalidPinError) as wrong:
            session.verify_pin("000000")
        assert wrong.value.attempts_remaining == left
    with pytest.raises(ApduError) as blocked:
        raw(session, 0x20, 0x00, 0x80, b"123456\xff\xff")
    assert sw_of(blocked) == SW.AUTH_METHOD_BLOCKED
    with pytest.raises(InvalidPinError) as still:  # yubikit maps 6983 to 0 attempts
        session.verify_pin("123456")
    assert still.value.attempts_remaining == 0
    assert session.get_pin_attempts() == 0
    session.unblock_pin("12345678", "654321")
    session.verify_pin("654321")
    assert session.get_pin_metadata().attempts_remaining == 3


def test_change_pin_and_puk(
    card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = connect(card)
    with pytest.raises(InvalidPinError) as wrong:
        session.change_pin("999999", "24681357")
    assert wrong.value.attempts_remaining == 2
    session.change_pin("123456", "24681357")
    assert session.get_pin_metadata() == session.get_pin_metadata().__class__(False, 3, 3)
    with pytest.raises(ApduError) as short:  # new PIN shorter than 6
        session.change_pin("24681357", "123")
    assert sw_of(short) == SW.INCORRECT_PARAMETERS
    session.change_puk("12345678", "87654321")
    puk = session.get_puk_metadata()
    assert (puk.default_value, puk.attempts_remaining) == (False, 3)
    with pytest.raises(InvalidPinError):
        session.unblock_pin("12345678", "111111")
    assert session.get_puk_metadata().attempts_remaining == 2
    session.verify_pin("24681357")


def test_set_pin_retries_needs_admin_and_pin(
    card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = connect(card)
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    with pytest.raises(ApduError) as no_pin:
        session.set_pin_attempts(5, 6)
    assert sw_of(no_pin) == SW.SECURITY_CONDITION_NOT_SATISFIED
    session.verify_pin("123456")
    session.set_pin_attempts(5, 6)
    pin, puk = session.get_pin_metadata(), session.get_puk_metadata()
    assert (pin.total_attempts, pin.attempts_remaining, pin.default_value) == (5, 5, True)
    assert (puk.total_attempts, puk.attempts_remaining) == (6, 6)


# --- management key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "default_type"),
    [(FW54, MANAGEMENT_KEY_TYPE.TDES), (FW57, MANAGEMENT_KEY_TYPE.AES192)],
)
def test_default_management_key(
    version: tuple[int, int, int],
    default_type: MANAGEMENT_KEY_TYPE,
    connect: Callable[[EmulatedCard], PivSession],
) -> None:
    card = EmulatedCard(version=version)
    session = connect(card)
    meta = session.get_management_key_metadata()
    assert (meta.key_type, meta.default_value) == (default_type, True)
    assert meta.touch_policy == TOUCH_POLICY.NEVER
    with pytest.raises(ApduError) as unauthenticated:
        session.put_object(OBJECT_ID.CHUID, generate_chuid())
    assert sw_of(unauthenticated) == SW.SECURITY_CONDITION_NOT_SATISFIED
    with pytest.raises(ApduError) as wrong:
        session.authenticate(bytes(24))
    assert sw_of(wrong) == SW.SECURITY_CONDITION_NOT_SATISFIED
    other = 0x0A if default_type == MANAGEMENT_KEY_TYPE.TDES else 0x03
    with pytest.raises(ApduError) as wrong_alg:  # step 1 with the other algorithm
        raw(session, 0x87, other, 0x9B, bytes.fromhex("7C028000"))
    assert sw_of(wrong_alg) == SW.INCORRECT_PARAMETERS
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    session.put_object(OBJECT_ID.CHUID, generate_chuid())


@pytest.mark.parametrize(
    "key_type",
    [MANAGEMENT_KEY_TYPE.TDES, MANAGEMENT_KEY_TYPE.AES128, MANAGEMENT_KEY_TYPE.AES256],
)
def test_set_management_key(
    card: EmulatedCard,
    key_type: MANAGEMENT_KEY_TYPE,
    connect: Callable[[EmulatedCard], PivSession],
) -> None:
    new_key = os.urandom(key_type.key_len)
    admin(connect(card), pin=None).set_management_key(key_type, new_key)
    session = connect(card)
    assert session.management_key_type == key_type
    assert session.get_management_key_metadata().default_value is False
    with pytest.raises(ApduError):
        session.authenticate(DEFAULT_MANAGEMENT_KEY)
    session.authenticate(new_key)


def test_management_key_with_touch(
    card57: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    new_key = os.urandom(32)
    admin(connect(card57), pin=None).set_management_key(
        MANAGEMENT_KEY_TYPE.AES256, new_key, require_touch=True
    )
    session = connect(card57)
    assert session.get_management_key_metadata().touch_policy == TOUCH_POLICY.ALWAYS
    card57.on_touch = lambda slot: False
    with pytest.raises(ApduError) as untouched:
        session.authenticate(new_key)
    assert sw_of(untouched) == SW.SECURITY_CONDITION_NOT_SATISFIED
    card57.on_touch = lambda slot: True
    session.authenticate(new_key)
    assert card57.touch_requests == [0x9B, 0x9B]


# --- key generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("slot", [SLOT.SIGNATURE, SLOT.RETIRED1, SLOT.RETIRED20])
@pytest.mark.parametrize("key_type", [KEY_TYPE.ECCP256, KEY_TYPE.ECCP384, "RSA"])
def test_generate_and_sign(
    card: EmulatedCard,
    slot: SLOT,
    key_type: KEY_TYPE | str,
    connect: Callable[[EmulatedCard], PivSession],
) -> None:
    if key_type == "RSA":  # RSA-3072 needs 5.7; RSA-2048 on 5.4
        key_type = KEY_TYPE.RSA3072 if card.version >= (5, 7, 0) else KEY_TYPE.RSA2048
    assert isinstance(key_type, KEY_TYPE)
    session = admin(connect(card))
    public = as_public(session.generate_key(slot, key_type))
    meta = session.get_slot_metadata(slot)
    assert (meta.key_type, meta.generated) == (key_type, True)
    assert der(meta.public_key) == der(public)
    expected_pin = PIN_POLICY.ALWAYS if slot == SLOT.SIGNATURE else PIN_POLICY.ONCE
    assert (meta.pin_policy, meta.touch_policy) == (expected_pin, TOUCH_POLICY.NEVER)
    message = b"keyd emulated card " * 20
    if isinstance(public, rsa.RSAPublicKey):
        sig = session.sign(slot, key_type, message, hashes.SHA256(), padding.PKCS1v15())
        public.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        sig = session.sign(slot, key_type, message, hashes.SHA384())
        public.verify(sig, message, ec.ECDSA(hashes.SHA384()))


@pytest.mark.parametrize("key_type", [KEY_TYPE.ED25519, KEY_TYPE.X25519, KEY_TYPE.RSA3072])
def test_new_algorithms_refused_before_57(
    card54: EmulatedCard, key_type: KEY_TYPE, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card54))
    with pytest.raises(NotSupportedError):  # yubikit's own firmware check
        session.generate_key(SLOT.AUTHENTICATION, key_type)
    # The card itself answers 6A80, as a YubiKey does for an algorithm its firmware lacks.
    template = bytes([0xAC, 0x03, 0x80, 0x01, key_type])
    with pytest.raises(ApduError) as refused:
        raw(session, 0x47, 0x00, SLOT.AUTHENTICATION, template)
    assert sw_of(refused) == SW.INCORRECT_PARAMETERS
    with pytest.raises(ApduError) as empty:
        session.get_slot_metadata(SLOT.AUTHENTICATION)
    assert sw_of(empty) == SW.REFERENCE_DATA_NOT_FOUND


def test_ed25519_on_57_signs_whole_message(
    card57: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card57))
    public = session.generate_key(SLOT.RETIRED5, KEY_TYPE.ED25519)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    message = os.urandom(700)  # longer than a short APDU: the whole message goes to the card
    signature = session.sign(SLOT.RETIRED5, KEY_TYPE.ED25519, message, None)
    public.verify(signature, message)
    assert session.get_slot_metadata(SLOT.RETIRED5).key_type == KEY_TYPE.ED25519


def test_rsa_pss_pkcs1_and_decrypt(
    card57: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    private = rsa.generate_private_key(65537, 2048)
    session = admin(connect(card57))
    session.put_key(SLOT.KEY_MANAGEMENT, private)
    public = private.public_key()
    message = b"tuf root metadata"
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    for pad in (pss, padding.PKCS1v15()):
        sig = session.sign(SLOT.KEY_MANAGEMENT, KEY_TYPE.RSA2048, message, hashes.SHA256(), pad)
        public.verify(sig, message, pad, hashes.SHA256())
    secret = public.encrypt(b"wrapped key", padding.PKCS1v15())
    assert session.decrypt(SLOT.KEY_MANAGEMENT, secret, padding.PKCS1v15()) == b"wrapped key"
    meta = session.get_slot_metadata(SLOT.KEY_MANAGEMENT)
    assert (meta.generated, meta.pin_policy) == (False, PIN_POLICY.ONCE)


def test_x25519_on_57_agrees(
    card57: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card57))
    public = session.generate_key(SLOT.KEY_MANAGEMENT, KEY_TYPE.X25519)
    assert isinstance(public, x25519.X25519PublicKey)
    peer = x25519.X25519PrivateKey.generate()
    assert session.calculate_secret(SLOT.KEY_MANAGEMENT, peer.public_key()) == peer.exchange(public)
    with pytest.raises(ApduError) as no_signing:
        raw(session, 0x87, KEY_TYPE.X25519, SLOT.KEY_MANAGEMENT, bytes.fromhex("7C058200810100"))
    assert sw_of(no_signing) == SW.INCORRECT_PARAMETERS


def test_import_ec_and_ed25519_and_ecdh(
    card57: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card57))
    ec_key = ec.generate_private_key(ec.SECP384R1())
    session.put_key(SLOT.RETIRED2, ec_key, PIN_POLICY.NEVER)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    session.put_key(SLOT.RETIRED3, ed_key)
    sig = session.sign(SLOT.RETIRED2, KEY_TYPE.ECCP384, b"m", hashes.SHA256())  # short hash
    ec_key.public_key().verify(sig, b"m", ec.ECDSA(hashes.SHA256()))
    ed_key.public_key().verify(session.sign(SLOT.RETIRED3, KEY_TYPE.ED25519, b"m", None), b"m")
    peer = ec.generate_private_key(ec.SECP384R1())
    shared = session.calculate_secret(SLOT.RETIRED2, peer.public_key())
    assert shared == peer.exchange(ec.ECDH(), ec_key.public_key())


# --- PIN and touch policies ----------------------------------------------------------------------


def test_pin_policy_always_needs_verify_before_each_use(
    card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card))
    session.generate_key(SLOT.SIGNATURE, KEY_TYPE.ECCP256)  # 9C defaults to PIN ALWAYS
    session.sign(SLOT.SIGNATURE, KEY_TYPE.ECCP256, b"one", hashes.SHA256())
    with pytest.raises(ApduError) as again:
        session.sign(SLOT.SIGNATURE, KEY_TYPE.ECCP256, b"two", hashes.SHA256())
    assert sw_of(again) == SW.SECURITY_CONDITION_NOT_SATISFIED
    session.verify_pin("123456")
    session.sign(SLOT.SIGNATURE, KEY_TYPE.ECCP256, b"two", hashes.SHA256())


def test_pin_policy_once_and_never(
    card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card))
    session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256)  # ONCE
    session.generate_key(SLOT.CARD_AUTH, KEY_TYPE.ECCP256)  # 9E defaults to NEVER
    for _ in range(3):
        session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    fresh = connect(card)  # its SELECT resets the security status: PIN status is gone
    with pytest.raises(ApduError) as no_pin:
        fresh.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert sw_of(no_pin) == SW.SECURITY_CONDITION_NOT_SATISFIED
    fresh.sign(SLOT.CARD_AUTH, KEY_TYPE.ECCP256, b"m", hashes.SHA256())


def touch_key(card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]) -> PivSession:
    session = admin(connect(card))
    session.generate_key(SLOT.RETIRED7, KEY_TYPE.ECCP256, PIN_POLICY.NEVER, TOUCH_POLICY.ALWAYS)
    return session


def test_touch_always_with_callback(
    card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = touch_key(card, connect)
    assert session.get_slot_metadata(SLOT.RETIRED7).touch_policy == TOUCH_POLICY.ALWAYS
    card.on_touch = lambda slot: True
    session.sign(SLOT.RETIRED7, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    session.sign(SLOT.RETIRED7, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert card.touch_requests == [SLOT.RETIRED7, SLOT.RETIRED7]


def test_touch_from_another_thread(
    card57: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    card57.touch_timeout = 5.0
    session = touch_key(card57, connect)

    def user() -> None:
        assert card57.waiting_for_touch.wait(5.0)
        card57.touch()

    finger = threading.Thread(target=user)
    finger.start()
    session.sign(SLOT.RETIRED7, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    finger.join()


def test_touch_timeout_returns_6982(
    card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = touch_key(card, connect)
    card.on_touch = lambda slot: False  # the user never touches: the card blinks, then gives up
    start = time.monotonic()
    with pytest.raises(ApduError) as timeout:
        session.sign(SLOT.RETIRED7, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert sw_of(timeout) == SW.SECURITY_CONDITION_NOT_SATISFIED
    assert time.monotonic() - start >= card.touch_timeout
    card.on_touch = None  # no callback and no touch(): waits touch_timeout for touch()
    with pytest.raises(ApduError) as nobody:
        session.sign(SLOT.RETIRED7, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert sw_of(nobody) == SW.SECURITY_CONDITION_NOT_SATISFIED


def test_touch_cached(card57: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]) -> None:
    session = admin(connect(card57))
    session.generate_key(SLOT.RETIRED8, KEY_TYPE.ECCP256, PIN_POLICY.NEVER, TOUCH_POLICY.CACHED)
    card57.on_touch = lambda slot: True
    for _ in range(3):
        session.sign(SLOT.RETIRED8, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert card57.touch_requests == [SLOT.RETIRED8]
    card57.touch_cache_seconds = 0.0
    session.sign(SLOT.RETIRED8, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert card57.touch_requests == [SLOT.RETIRED8, SLOT.RETIRED8]


# --- attestation ---------------------------------------------------------------------------------


def yubico_extension(cert: x509.Certificate, arc: int) -> bytes:
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(f"1.3.6.1.4.1.41482.3.{arc}"))
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    return ext.value.value


@pytest.mark.parametrize("key_type", [KEY_TYPE.ECCP256, KEY_TYPE.RSA2048])
def test_attestation_chains_to_emulator_root(
    card: EmulatedCard, key_type: KEY_TYPE, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card))
    public = session.generate_key(SLOT.RETIRED9, key_type, PIN_POLICY.ALWAYS, TOUCH_POLICY.CACHED)
    statement = session.attest_key(SLOT.RETIRED9)
    intermediate = session.get_certificate(SLOT.ATTESTATION)  # object 5FFF01
    root = card.attestation_root
    intermediate.verify_directly_issued_by(root)
    statement.verify_directly_issued_by(intermediate)
    assert der(statement.public_key()) == der(public)
    assert yubico_extension(statement, 3) == bytes(card.version)
    assert yubico_extension(statement, 7) == bytes([0x02, 0x04]) + SERIAL.to_bytes(4, "big")
    assert yubico_extension(statement, 8) == bytes([PIN_POLICY.ALWAYS, TOUCH_POLICY.CACHED])
    name = statement.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert name == "YubiKey PIV Attestation 8a"


def test_imported_key_cannot_be_attested(
    card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card))
    session.put_key(SLOT.AUTHENTICATION, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ApduError) as imported:
        session.attest_key(SLOT.AUTHENTICATION)
    assert sw_of(imported) == SW.INCORRECT_PARAMETERS
    with pytest.raises(ApduError) as empty:
        session.attest_key(SLOT.SIGNATURE)
    assert sw_of(empty) == SW.REFERENCE_DATA_NOT_FOUND


# --- certificates and data objects ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Deprecated. use x509.Name.from_rfc4514_string")
@pytest.mark.parametrize("compress", [False, True])
def test_put_get_delete_certificate(
    card: EmulatedCard, compress: bool, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card))
    public = session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256)
    now = datetime.now(UTC)
    cert = generate_self_signed_certificate(
        session, SLOT.AUTHENTICATION, public, "CN=keyd test", now, now + timedelta(days=1)
    )  # signed on the card
    cert.verify_directly_issued_by(cert)
    session.put_certificate(SLOT.AUTHENTICATION, cert, compress=compress)
    assert connect(card).get_certificate(SLOT.AUTHENTICATION) == cert
    session = admin(connect(card), pin=None)  # the new session's SELECT reset the old one
    session.delete_certificate(SLOT.AUTHENTICATION)
    with pytest.raises(ApduError) as gone:
        session.get_certificate(SLOT.AUTHENTICATION)
    assert sw_of(gone) == SW.FILE_NOT_FOUND


def test_objects_chuid_key_history_discovery(
    card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card), pin=None)
    chuid = generate_chuid()
    session.put_object(OBJECT_ID.CHUID, chuid)
    history = bytes.fromhex("C10100C20100FE00")  # key history: no on-card / off-card certs
    session.put_object(OBJECT_ID.KEY_HISTORY, history)
    session.put_object(OBJECT_ID.PRINTED, b"\x88\x00")
    reader = connect(card)
    assert reader.get_object(OBJECT_ID.CHUID) == chuid
    assert reader.get_object(OBJECT_ID.KEY_HISTORY) == history
    assert reader.get_object(OBJECT_ID.DISCOVERY).startswith(bytes.fromhex("4F0BA000000308"))
    with pytest.raises(ApduError) as protected:  # printed information needs the PIN to read
        reader.get_object(OBJECT_ID.PRINTED)
    assert sw_of(protected) == SW.SECURITY_CONDITION_NOT_SATISFIED
    reader.verify_pin("123456")
    assert reader.get_object(OBJECT_ID.PRINTED) == b"\x88\x00"


def test_short_apdus_chaining_and_get_response(
    connect: Callable[[EmulatedCard], PivSession],
) -> None:
    card = EmulatedCard(atr=NFC_ATR)
    session = admin(connect(card), pin=None)
    assert session.protocol.connection.transport.name == "NFC"
    big = os.urandom(2000)  # 8 chained commands in, 8 GET RESPONSEs out
    session.put_object(0x5FC10D, big)
    assert connect(card).get_object(0x5FC10D) == big
    # The same by hand: a short GET DATA returns 256 bytes and 61xx, then 00 C0 00 00 00.
    card.transmit(bytes.fromhex("00A4040005A000000308"))
    first = card.transmit(bytes.fromhex("00CB3FFF055C035FC10D00"))
    assert len(first) == 258
    assert first[-2] == 0x61
    rest = card.transmit(bytes.fromhex("00C0000000"))
    assert rest[:-2] == tlv_value_tail(big, 256)


def tlv_value_tail(value: bytes, already: int) -> bytes:
    """Bytes 256.. of the GET DATA response `53 82 LL LL value`, up to the next 256."""
    response = bytes([0x53, 0x82]) + len(value).to_bytes(2, "big") + value
    return response[already : already + 256]


# --- metadata, move/delete, reset, persistence ---------------------------------------------------


def test_metadata_fields(card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]) -> None:
    session = connect(card)
    pin, puk = session.get_pin_metadata(), session.get_puk_metadata()
    assert (pin.default_value, pin.total_attempts, pin.attempts_remaining) == (True, 3, 3)
    assert (puk.default_value, puk.total_attempts, puk.attempts_remaining) == (True, 3, 3)
    admin(session)
    session.generate_key(SLOT.RETIRED4, KEY_TYPE.ECCP384, PIN_POLICY.NEVER, TOUCH_POLICY.NEVER)
    meta = session.get_slot_metadata(SLOT.RETIRED4)
    assert (meta.key_type, meta.pin_policy, meta.generated) == (
        KEY_TYPE.ECCP384,
        PIN_POLICY.NEVER,
        True,
    )
    with pytest.raises(ApduError) as empty:
        session.get_slot_metadata(SLOT.RETIRED6)
    assert sw_of(empty) == SW.REFERENCE_DATA_NOT_FOUND


def test_metadata_absent_before_53(connect: Callable[[EmulatedCard], PivSession]) -> None:
    card = EmulatedCard(version=(5, 2, 7))
    session = connect(card)  # yubikit falls back to 3DES without metadata
    assert session.management_key_type == MANAGEMENT_KEY_TYPE.TDES
    with pytest.raises(ApduError) as absent:
        raw(session, 0xF7, 0x00, 0x80)
    assert sw_of(absent) == SW.INVALID_INSTRUCTION
    session.authenticate(DEFAULT_MANAGEMENT_KEY)


def test_move_and_delete_key_on_57(
    card57: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card57))
    public = session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256)
    session.generate_key(SLOT.RETIRED2, KEY_TYPE.ECCP256)
    with pytest.raises(ApduError) as occupied:
        session.move_key(SLOT.AUTHENTICATION, SLOT.RETIRED2)
    assert sw_of(occupied) == SW.INCORRECT_PARAMETERS
    session.move_key(SLOT.AUTHENTICATION, SLOT.RETIRED1)
    assert der(session.get_slot_metadata(SLOT.RETIRED1).public_key) == der(public)
    with pytest.raises(ApduError) as moved:
        session.get_slot_metadata(SLOT.AUTHENTICATION)
    assert sw_of(moved) == SW.REFERENCE_DATA_NOT_FOUND
    session.sign(SLOT.RETIRED1, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    session.delete_key(SLOT.RETIRED1)
    with pytest.raises(ApduError) as deleted:
        session.delete_key(SLOT.RETIRED1)
    assert sw_of(deleted) == SW.REFERENCE_DATA_NOT_FOUND


def test_move_key_absent_on_54(
    card54: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card54))
    with pytest.raises(NotSupportedError):
        session.delete_key(SLOT.RETIRED1)
    with pytest.raises(ApduError) as absent:
        raw(session, 0xF6, 0xFF, SLOT.RETIRED1)
    assert sw_of(absent) == SW.INVALID_INSTRUCTION


def test_reset_only_when_pin_and_puk_blocked(
    card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card))
    session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256)
    session.change_pin("123456", "99999999")
    with pytest.raises(ApduError) as refused:
        raw(session, 0xFB, 0x00, 0x00)
    assert sw_of(refused) == SW.CONDITIONS_NOT_SATISFIED
    session.reset()  # yubikit blocks PIN and PUK first
    with pytest.raises(ApduError):
        session.get_slot_metadata(SLOT.AUTHENTICATION)
    admin(session)  # factory PIN and management key again
    session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256)
    session.attest_key(SLOT.AUTHENTICATION)  # the F9 key survives a reset


def test_state_survives_restart(
    tmp_path: Path, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    path = tmp_path / "card.json"
    card = EmulatedCard(version=FW57, serial=SERIAL, state_path=path)
    session = admin(connect(card))
    public = session.generate_key(SLOT.RETIRED3, KEY_TYPE.ECCP256)
    with pytest.raises(InvalidPinError):
        session.verify_pin("000000")
    assert path.stat().st_mode & 0o077 == 0
    reborn = EmulatedCard(version=FW57, serial=SERIAL, state_path=path)  # "removed and reinserted"
    again = connect(reborn)
    assert der(again.get_slot_metadata(SLOT.RETIRED3).public_key) == der(public)
    assert again.get_pin_attempts() == 2  # retry counters are persistent, PIN status is not
    with pytest.raises(ApduError):
        again.sign(SLOT.RETIRED3, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    again.verify_pin("123456")
    sig = again.sign(SLOT.RETIRED3, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    as_public(public)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(sig, b"m", ec.ECDSA(hashes.SHA256()))
    assert reborn.attestation_root == card.attestation_root


# --- ykman's PIN-protected management key (ykman piv access change-management-key --protect) -----


def test_pivman_protected_management_key(
    card: EmulatedCard, connect: Callable[[EmulatedCard], PivSession]
) -> None:
    session = admin(connect(card))
    new_key = os.urandom(24)
    pivman_set_mgm_key(session, new_key, MANAGEMENT_KEY_TYPE.AES192, store_on_device=True)
    user = connect(card)
    pivman = get_pivman_data(user)  # object 5FFF00: readable without PIN
    assert (pivman.has_stored_key, pivman.has_derived_key) == (True, False)
    with pytest.raises(ApduError) as locked:  # object 5FC109: needs the PIN
        get_pivman_protected_data(user)
    assert sw_of(locked) == SW.SECURITY_CONDITION_NOT_SATISFIED
    user.verify_pin("123456")
    stored = get_pivman_protected_data(user).key
    assert stored == new_key
    user.authenticate(stored)
    lines = [line for line in get_piv_info(user) if isinstance(line, str)]
    assert "Management key is stored on the YubiKey, protected by PIN." in lines
