"""An emulated YubiKey PIV card, for tests only: no YubiKey is needed to exercise a PIV backend.

The card answers command APDUs the way a YubiKey 5 does, as far as `yubikit.piv.PivSession`
(yubikey-manager 5.9) and ykman's device discovery use them. It implements the PIV card
application of NIST SP 800-73-4 Part 2 (section numbers below refer to it) plus Yubico's
extensions (INS F6..FF), and the Management applet's SELECT and READ CONFIG.

What it is not: a secure element. Keys live in Python objects and, with `state_path`, in a
plain JSON file. Status words follow the real card where a public source says what it returns
(see `SW`); where none does, the choice is marked "assumed".

Touch: the card asks `on_touch(slot)` if set (True = touched), otherwise waits up to
`touch_timeout` seconds for `touch()` from another thread (`waiting_for_touch` is set while it
waits). Without a touch it returns 6982, as a YubiKey does after its 15 s of blinking
(Yubico/yubico-piv-tool#185: "Failed sign command with code 6982" = "User did not touch the
yubikey within 15 seconds").

Assumed where no public source was found: PIN policy ALWAYS lets one VERIFY buy exactly one
private-key operation (other commands in between do not cancel it); ATTEST of an imported key
gives 6A80, of an empty slot 6A88; RESET with PIN or PUK not blocked gives 6985; an ECDSA input
longer than the field size gives 6A80 (yubikit truncates, so it never sends one); a VERIFY
without a prior SELECT after power-on gives 6D00 (no default applet).

Only `cryptography` and the standard library are used; keyd is never imported.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.constant_time import bytes_eq
from cryptography.x509.oid import NameOID

PrivateKey: TypeAlias = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | x25519.X25519PrivateKey
)
Version: TypeAlias = tuple[int, int, int]

# The YubiKey 5 (USB) ATR; atr[1] & 0xF0 == 0xF0 is how yubikit tells USB from NFC.
YUBIKEY5_USB_ATR = bytes.fromhex("3BFD1300008131FE158073C021C057597562694B657940")
PIV_AID = bytes.fromhex("A000000308")
MANAGEMENT_AID = bytes.fromhex("A000000527471117")
DEFAULT_PIN = b"123456"
DEFAULT_PUK = b"12345678"
DEFAULT_MGMT_KEY = bytes.fromhex("010203040506070801020304050607080102030405060708")


class SW(IntEnum):
    """Status words (SP 800-73-4 Part 2 section 3 tables; ISO 7816-4 section 5.1.3)."""

    OK = 0x9000
    VERIFY_FAIL = 0x63C0  # | tries left (capped at 15)
    WRONG_LENGTH = 0x6700
    SECURITY_STATUS = 0x6982  # no PIN / no mgmt auth / bad mgmt response / no touch
    AUTH_BLOCKED = 0x6983
    CONDITIONS = 0x6985  # RESET while PIN or PUK still usable (assumed)
    INCORRECT_DATA = 0x6A80  # bad data field, wrong algorithm (sbctl#471: RSA4096 on 5.2.7)
    NOT_FOUND = 0x6A82  # data object or applet missing
    INCORRECT_P1P2 = 0x6A86
    REF_NOT_FOUND = 0x6A88  # empty key slot (ykman: "No key stored in slot")
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00


class KeyType(IntEnum):
    """Algorithm references (SP 800-78-4 table 6-2; E0/E1 are Yubico's, firmware 5.7)."""

    RSA1024 = 0x06
    RSA2048 = 0x07
    RSA3072 = 0x05
    RSA4096 = 0x16
    ECCP256 = 0x11
    ECCP384 = 0x14
    ED25519 = 0xE0
    X25519 = 0xE1


class MgmtKeyType(IntEnum):
    TDES = 0x03
    AES128 = 0x08
    AES192 = 0x0A
    AES256 = 0x0C


MGMT_KEY_LEN = {MgmtKeyType.TDES: 24, MgmtKeyType.AES128: 16, MgmtKeyType.AES192: 24}
MGMT_KEY_LEN[MgmtKeyType.AES256] = 32
RSA_BITS = {KeyType.RSA1024: 1024, KeyType.RSA2048: 2048, KeyType.RSA3072: 3072}
RSA_BITS[KeyType.RSA4096] = 4096
EC_CURVES: dict[KeyType, tuple[ec.EllipticCurve, hashes.HashAlgorithm]] = {
    KeyType.ECCP256: (ec.SECP256R1(), hashes.SHA256()),
    KeyType.ECCP384: (ec.SECP384R1(), hashes.SHA384()),
}
KEY_TYPE_SINCE: dict[KeyType, Version] = {
    KeyType.ECCP384: (4, 0, 0),
    KeyType.RSA3072: (5, 7, 0),
    KeyType.RSA4096: (5, 7, 0),
    KeyType.ED25519: (5, 7, 0),
    KeyType.X25519: (5, 7, 0),
}
# Firmware that introduced an instruction: MOVE KEY, GET METADATA, GET SERIAL, ATTEST.
INS_SINCE: dict[int, Version] = {0xF6: (5, 7, 0), 0xF7: (5, 3, 0), 0xF8: (5, 0, 0), 0xF9: (4, 3, 0)}
# Yubico policies: PIN 1 NEVER, 2 ONCE, 3 ALWAYS; touch 1 NEVER, 2 ALWAYS, 3 CACHED; 0 default
PIN_NEVER, PIN_ONCE, PIN_ALWAYS = 1, 2, 3
TOUCH_NEVER, TOUCH_ALWAYS, TOUCH_CACHED = 1, 2, 3
KEY_SLOTS = frozenset([0x9A, 0x9C, 0x9D, 0x9E, 0xF9, *range(0x82, 0x96)])
# Read only after VERIFY (SP 800-73-4 Part 1 table 3): fingerprints, facial image, printed, iris.
PIN_PROTECTED_OBJECTS = frozenset([0x5FC103, 0x5FC108, 0x5FC109, 0x5FC121])
ATTESTATION_OBJECT = 0x5FFF01
# Discovery object (Part 1 section 3.3.2): PIV AID, PIN usage policy "PIV PIN only".
DISCOVERY = bytes.fromhex("7E124F0BA0000003080000100001005F2F024000")
YUBICO_OID = "1.3.6.1.4.1.41482.3"


class CardError(Exception):
    """A command ends with this status word and no data."""

    def __init__(self, sw: int) -> None:
        super().__init__(f"SW {sw:04X}")
        self.sw = sw


# --- BER-TLV (SP 800-73-4 Part 2 section 3; lengths as in ISO 7816-4 5.2.2)


def tlv(tag: int, value: bytes = b"") -> bytes:
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    else:
        ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(ln)]) + ln
    return tag.to_bytes((tag.bit_length() + 7) // 8 or 1, "big") + length + value


def parse_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """Split concatenated BER-TLVs; raises CardError(6A80) when malformed."""
    out: list[tuple[int, bytes]] = []
    i = 0
    try:
        while i < len(data):
            tag = data[i]
            i += 1
            if tag & 0x1F == 0x1F:  # multi-byte tag, e.g. 7F49
                while True:
                    tag = tag << 8 | data[i]
                    i += 1
                    if not data[i - 1] & 0x80:
                        break
            n = data[i]
            i += 1
            if n & 0x80:
                width = n & 0x7F
                n = int.from_bytes(data[i : i + width], "big")
                i += width
            if i + n > len(data):
                raise CardError(SW.INCORRECT_DATA)
            out.append((tag, data[i : i + n]))
            i += n
    except IndexError:
        raise CardError(SW.INCORRECT_DATA) from None
    return out


def tlv_dict(data: bytes) -> dict[int, bytes]:
    return dict(parse_tlvs(data))


def _int_bytes(n: int, length: int = 0) -> bytes:
    return n.to_bytes(max(length, (n.bit_length() + 7) // 8 or 1), "big")


def _der_integer(n: int) -> bytes:
    return tlv(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


# --- APDU framing (ISO 7816-4 section 5.1: short and extended cases 1-4)


@dataclass(frozen=True)
class Apdu:
    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes
    ne: int  # maximum response length: 256 (short) or 65536 (extended) when Le is absent or 0

    @classmethod
    def parse(cls, raw: bytes) -> Apdu:
        if len(raw) < 4:
            raise CardError(SW.WRONG_LENGTH)
        head, body = raw[:4], raw[4:]
        extended = len(body) >= 3 and body[0] == 0
        data, le, limit = b"", -1, 256
        if extended:
            limit = 65536
            if len(body) == 3:  # case 2E
                le = int.from_bytes(body[1:3], "big")
            else:  # case 3E / 4E
                lc = int.from_bytes(body[1:3], "big")
                data, rest = body[3 : 3 + lc], body[3 + lc :]
                if len(data) != lc or len(rest) not in (0, 2):
                    raise CardError(SW.WRONG_LENGTH)
                le = int.from_bytes(rest, "big") if rest else -1
        elif len(body) == 1:  # case 2S
            le = body[0]
        elif body:  # case 3S / 4S
            lc = body[0]
            data, rest = body[1 : 1 + lc], body[1 + lc :]
            if len(data) != lc or len(rest) > 1:
                raise CardError(SW.WRONG_LENGTH)
            le = rest[0] if rest else -1
        ne = limit if le <= 0 else le
        return cls(head[0], head[1], head[2], head[3], data, ne)


# --- Persistent card state


@dataclass
class SlotKey:
    """A private key in a slot with its Yubico policies (stored resolved, never 0)."""

    key_type: KeyType
    pin_policy: int
    touch_policy: int
    generated: bool
    private_der: bytes  # PKCS#8 DER

    def to_json(self) -> dict[str, Any]:
        return {
            "key_type": int(self.key_type),
            "pin_policy": self.pin_policy,
            "touch_policy": self.touch_policy,
            "generated": self.generated,
            "private_der": self.private_der.hex(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SlotKey:
        return cls(
            KeyType(d["key_type"]),
            d["pin_policy"],
            d["touch_policy"],
            d["generated"],
            bytes.fromhex(d["private_der"]),
        )


@dataclass
class CardState:
    """Everything a YubiKey keeps across power cycles (what `state_path` persists)."""

    mgmt_key_type: MgmtKeyType
    mgmt_key: bytes = DEFAULT_MGMT_KEY
    mgmt_touch: bool = False
    pin: bytes = DEFAULT_PIN
    puk: bytes = DEFAULT_PUK
    pin_total: int = 3
    pin_left: int = 3
    puk_total: int = 3
    puk_left: int = 3
    keys: dict[int, SlotKey] = field(default_factory=dict)
    objects: dict[int, bytes] = field(default_factory=dict)
    attestation_root_der: bytes = b""  # the emulator's own CA, trust anchor for F9

    def to_json(self) -> str:
        return json.dumps(
            {
                "mgmt_key_type": int(self.mgmt_key_type),
                "mgmt_key": self.mgmt_key.hex(),
                "mgmt_touch": self.mgmt_touch,
                "pin": self.pin.hex(),
                "puk": self.puk.hex(),
                "retries": [self.pin_total, self.pin_left, self.puk_total, self.puk_left],
                "keys": {f"{s:02x}": k.to_json() for s, k in self.keys.items()},
                "objects": {f"{o:x}": v.hex() for o, v in self.objects.items()},
                "attestation_root_der": self.attestation_root_der.hex(),
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> CardState:
        d = json.loads(text)
        state = cls(MgmtKeyType(d["mgmt_key_type"]), bytes.fromhex(d["mgmt_key"]), d["mgmt_touch"])
        state.pin, state.puk = bytes.fromhex(d["pin"]), bytes.fromhex(d["puk"])
        state.pin_total, state.pin_left, state.puk_total, state.puk_left = d["retries"]
        state.keys = {int(s, 16): SlotKey.from_json(k) for s, k in d["keys"].items()}
        state.objects = {int(o, 16): bytes.fromhex(v) for o, v in d["objects"].items()}
        state.attestation_root_der = bytes.fromhex(d["attestation_root_der"])
        return state


@dataclass
class _Session:
    """Volatile security status: lost on power-off and on any SELECT (see `_select`)."""

    applet: bytes | None = None
    pin_verified: bool = False
    pin_fresh: bool = False  # VERIFY succeeded and no private-key use since (PIN policy ALWAYS)
    mgmt_authenticated: bool = False
    witness: bytes | None = None  # management key mutual auth, between step 1 and step 2
    last_touch: float = float("-inf")
    chain_head: tuple[int, int, int] | None = None
    chain_data: bytes = b""
    pending: bytes = b""  # response bytes not yet fetched with GET RESPONSE


def _private_der(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_private(der: bytes) -> PrivateKey:
    key = serialization.load_der_private_key(der, None, unsafe_skip_rsa_key_validation=True)
    kinds = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)
    if isinstance(key, (*kinds, ed25519.Ed25519PrivateKey, x25519.X25519PrivateKey)):
        return key
    raise TypeError(f"unexpected key type {type(key).__name__}")


def _new_private_key(key_type: KeyType) -> PrivateKey:
    if key_type in RSA_BITS:
        return rsa.generate_private_key(65537, RSA_BITS[key_type])
    if key_type in EC_CURVES:
        return ec.generate_private_key(EC_CURVES[key_type][0])
    if key_type == KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    return x25519.X25519PrivateKey.generate()


def encode_public_key(key: PrivateKey) -> bytes:
    """The public key TLVs inside 7F49 (Part 2 section 3.3.2, table 14) and metadata tag 04."""
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        numbers = pub.public_numbers()
        return tlv(0x81, _int_bytes(numbers.n)) + tlv(0x82, _int_bytes(numbers.e))
    if isinstance(pub, ec.EllipticCurvePublicKey):
        point = pub.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return tlv(0x86, point)
    return tlv(0x86, pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_attestation_ca(serial: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bytes]:
    """The emulator's own root CA and the F9 attestation key + certificate it issues."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    f9_key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.now(UTC) - timedelta(days=1)
    end = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)  # RFC 5280 4.1.2.5: no expiry
    root_name = _name(f"Emulated PIV Attestation Root (test only) {serial}")
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    f9_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Yubico PIV Attestation"))
        .issuer_name(root_name)
        .public_key(f9_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    return root, f9_key, f9_cert.public_bytes(serialization.Encoding.DER)


def cert_object(der: bytes) -> bytes:
    """A certificate data object as PIV stores it (Part 1 appendix A: 70 cert, 71 info, FE LRC)."""
    return tlv(0x70, der) + tlv(0x71, b"\x00") + tlv(0xFE)


def _mgmt_cipher(key_type: MgmtKeyType, key: bytes) -> Cipher[modes.ECB]:
    algorithm = TripleDES(key) if key_type == MgmtKeyType.TDES else algorithms.AES(key)
    return Cipher(algorithm, modes.ECB())  # noqa: S305 - the PIV protocol encrypts single blocks


def _ecb(key_type: MgmtKeyType, key: bytes, block: bytes) -> bytes:
    enc = _mgmt_cipher(key_type, key).encryptor()
    return enc.update(block) + enc.finalize()


def _unpad_pin(data: bytes) -> bytes:
    return data.rstrip(b"\xff")


# --- The card


class EmulatedCard:
    """A YubiKey-like card: feed it command APDUs with `transmit`, get response APDUs back."""

    def __init__(
        self,
        *,
        version: Version = (5, 7, 2),
        serial: int = 12345678,
        atr: bytes = YUBIKEY5_USB_ATR,
        form_factor: int = 0x01,  # USB-A keychain
        state_path: Path | None = None,
        touch_timeout: float = 15.0,
        touch_cache_seconds: float = 15.0,
        on_touch: Callable[[int], bool] | None = None,
    ) -> None:
        self.version = version
        self.serial = serial
        self.atr = atr
        self.form_factor = form_factor
        self.state_path = state_path
        self.touch_timeout = touch_timeout
        self.touch_cache_seconds = touch_cache_seconds
        self.on_touch = on_touch
        self.touch_requests: list[int] = []  # slots (0x9B for the mgmt key) that asked for a touch
        self.waiting_for_touch = threading.Event()
        self._touched = threading.Event()
        self._lock = threading.RLock()
        self._key_cache: dict[bytes, PrivateKey] = {}
        self._session = _Session()
        if state_path is not None and state_path.exists():
            self.state = CardState.from_json(state_path.read_text())
        else:
            self.state = self._factory_state()
        self._saved = ""
        self._persist()

    # Test-facing controls

    @property
    def attestation_root(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.state.attestation_root_der)

    def touch(self) -> None:
        """The user touches the key; counts only while the card waits (see `waiting_for_touch`)."""
        self._touched.set()

    def power_on(self) -> bytes:
        """Cold reset: forget all security status (PIN, management key, pending data)."""
        with self._lock:
            self._session = _Session()
            return self.atr

    def power_off(self) -> None:
        self.power_on()

    def transmit(self, apdu: bytes) -> bytes:
        """Process one command APDU and return the response APDU (data || SW1 SW2)."""
        with self._lock:
            try:
                data, sw = self._transmit(apdu)
            except CardError as e:
                data, sw = b"", e.sw
            self._persist()
            return data + sw.to_bytes(2, "big")

    # Framing: chaining (ISO 7816-4 5.1.1.1, CLA b5) and GET RESPONSE (7816-4 7.6.1)

    def _transmit(self, raw: bytes) -> tuple[bytes, int]:
        s = self._session
        apdu = Apdu.parse(raw)
        if apdu.ins == 0xC0 and apdu.cla == 0x00:  # GET RESPONSE
            if not s.pending:
                raise CardError(SW.CONDITIONS)
            return self._respond(s.pending, apdu.ne)
        s.pending = b""
        if apdu.cla not in (0x00, 0x10):
            raise CardError(SW.CLA_NOT_SUPPORTED)
        head = (apdu.ins, apdu.p1, apdu.p2)
        data = apdu.data
        if s.chain_head is not None:
            if s.chain_head == head:
                data = s.chain_data + data
            s.chain_head, s.chain_data = None, b""
        if apdu.cla & 0x10:
            s.chain_head, s.chain_data = head, data
            return b"", SW.OK
        return self._respond(self._dispatch(apdu.ins, apdu.p1, apdu.p2, data), apdu.ne)

    def _respond(self, data: bytes, ne: int) -> tuple[bytes, int]:
        chunk, self._session.pending = data[:ne], data[ne:]
        left = len(self._session.pending)
        if not left:
            return chunk, SW.OK
        return chunk, 0x6100 | (left if left < 256 else 0)  # 61xx: xx more bytes (00: 256+)

    def _dispatch(self, ins: int, p1: int, p2: int, data: bytes) -> bytes:
        if ins == 0xA4:
            return self._select(p1, data)
        if self._session.applet == MANAGEMENT_AID:
            if ins == 0x1D:
                return self._read_config(p1)
            raise CardError(SW.INS_NOT_SUPPORTED)
        if self._session.applet != PIV_AID:
            raise CardError(SW.INS_NOT_SUPPORTED)
        handler = self._piv_commands.get(ins)
        if handler is None or self.version < INS_SINCE.get(ins, (0, 0, 0)):
            raise CardError(SW.INS_NOT_SUPPORTED)
        return handler(self, p1, p2, data)

    # SELECT (Part 2 3.1.1) and the Management applet

    def _select(self, p1: int, aid: bytes) -> bytes:
        """Any SELECT resets the PIV security status on a YubiKey, even of the PIV AID itself or
        of an AID it lacks (OpenSC#624, OpenSC#1243); SP 800-73-4 would keep it."""
        if p1 != 0x04:
            raise CardError(SW.INCORRECT_P1P2)
        self._session = _Session(applet=self._session.applet, last_touch=self._session.last_touch)
        if aid.startswith(PIV_AID):
            self._session.applet = PIV_AID
            # Application property template: PIX of the PIV app, coexistent tag allocation authority
            return tlv(
                0x61, tlv(0x4F, bytes.fromhex("000010000100")) + tlv(0x79, tlv(0x4F, PIV_AID))
            )
        if aid == MANAGEMENT_AID:
            self._session.applet = MANAGEMENT_AID
            return ".".join(map(str, self.version)).encode()
        raise CardError(SW.NOT_FOUND)

    def _read_config(self, page: int) -> bytes:
        """Management READ CONFIG (Yubico, INS 1D): length byte + TLVs, as yubikit's DeviceInfo."""
        if page:
            return b"\x00"
        capabilities = (0x023B).to_bytes(2, "big")  # OTP U2F OPENPGP PIV OATH FIDO2
        body = (
            tlv(0x01, capabilities)
            + tlv(0x02, self.serial.to_bytes(4, "big"))
            + tlv(0x03, capabilities)
            + tlv(0x04, bytes([self.form_factor]))
            + tlv(0x05, bytes(self.version))
            + tlv(0x0A, b"\x00")
        )
        return bytes([len(body)]) + body

    # PIV: small Yubico commands

    def _get_version(self, p1: int, p2: int, data: bytes) -> bytes:  # Yubico FD
        return bytes(self.version)

    def _get_serial(self, p1: int, p2: int, data: bytes) -> bytes:  # Yubico F8
        return self.serial.to_bytes(4, "big")

    def _metadata(self, p1: int, p2: int, data: bytes) -> bytes:
        """GET METADATA (Yubico F7, 5.3): 01 algorithm, 02 policy, 03 origin, 04 public key,
        05 is-default, 06 {total, remaining} retries."""
        st = self.state
        if p2 in (0x80, 0x81):
            is_pin = p2 == 0x80
            value, default = (st.pin, DEFAULT_PIN) if is_pin else (st.puk, DEFAULT_PUK)
            total, left = (st.pin_total, st.pin_left) if is_pin else (st.puk_total, st.puk_left)
            return (
                tlv(0x01, b"\xff")
                + tlv(0x05, bytes([value == default]))
                + tlv(0x06, bytes([total, left]))
            )
        if p2 == 0x9B:
            touch = TOUCH_ALWAYS if st.mgmt_touch else TOUCH_NEVER
            return (
                tlv(0x01, bytes([st.mgmt_key_type]))
                + tlv(0x02, bytes([PIN_NEVER, touch]))
                + tlv(0x05, bytes([st.mgmt_key == DEFAULT_MGMT_KEY]))
            )
        key = self._slot_key(p2)
        return (
            tlv(0x01, bytes([key.key_type]))
            + tlv(0x02, bytes([key.pin_policy, key.touch_policy]))
            + tlv(0x03, b"\x01" if key.generated else b"\x02")
            + tlv(0x04, encode_public_key(self._private(key)))
        )

    # PIN and PUK (Part 2 3.2.1 VERIFY, 3.2.2 CHANGE REFERENCE DATA, 3.2.3 RESET RETRY COUNTER)

    def _verify(self, p1: int, p2: int, data: bytes) -> bytes:
        st, s = self.state, self._session
        if p2 != 0x80:
            raise CardError(SW.REF_NOT_FOUND)
        if p1 == 0xFF:  # reset the security status of the PIN
            s.pin_verified = s.pin_fresh = False
            return b""
        if p1 != 0x00:
            raise CardError(SW.INCORRECT_P1P2)
        if st.pin_left == 0:
            raise CardError(SW.AUTH_BLOCKED)
        if not data:  # status query
            if s.pin_verified:
                return b""
            raise CardError(SW.VERIFY_FAIL | min(st.pin_left, 15))
        if len(data) != 8:
            raise CardError(SW.INCORRECT_DATA)
        if not bytes_eq(_unpad_pin(data), st.pin):
            s.pin_verified = s.pin_fresh = False
            st.pin_left -= 1
            raise CardError(SW.VERIFY_FAIL | min(st.pin_left, 15))
        st.pin_left = st.pin_total
        s.pin_verified = s.pin_fresh = True
        return b""

    def _check_reference(self, which: int, value: bytes) -> None:
        """Compare PIN (80) or PUK (81), counting a failure; 6983 once blocked."""
        st = self.state
        left = st.pin_left if which == 0x80 else st.puk_left
        if left == 0:
            raise CardError(SW.AUTH_BLOCKED)
        if bytes_eq(_unpad_pin(value), st.pin if which == 0x80 else st.puk):
            return
        if which == 0x80:
            st.pin_left -= 1
            self._session.pin_verified = self._session.pin_fresh = False
        else:
            st.puk_left -= 1
        raise CardError(SW.VERIFY_FAIL | min(left - 1, 15))

    @staticmethod
    def _new_reference(data: bytes) -> bytes:
        new = _unpad_pin(data[8:])
        if len(data) != 16 or not 6 <= len(new) <= 8:
            raise CardError(SW.INCORRECT_DATA)
        return new

    def _change_reference(self, p1: int, p2: int, data: bytes) -> bytes:
        if p2 not in (0x80, 0x81):
            raise CardError(SW.REF_NOT_FOUND)
        self._check_reference(p2, data[:8])
        new = self._new_reference(data)
        st = self.state
        if p2 == 0x80:
            st.pin, st.pin_left = new, st.pin_total
        else:
            st.puk, st.puk_left = new, st.puk_total
        return b""

    def _reset_retry(self, p1: int, p2: int, data: bytes) -> bytes:
        if p2 != 0x80:
            raise CardError(SW.REF_NOT_FOUND)
        self._check_reference(0x81, data[:8])
        st = self.state
        st.pin, st.pin_left, st.puk_left = self._new_reference(data), st.pin_total, st.puk_total
        return b""

    def _set_retries(self, p1: int, p2: int, data: bytes) -> bytes:
        """SET PIN RETRIES (Yubico FA): needs mgmt auth and PIN; resets PIN and PUK to defaults."""
        self._require_admin()
        if not self._session.pin_verified:
            raise CardError(SW.SECURITY_STATUS)
        if not (p1 and p2):
            raise CardError(SW.INCORRECT_P1P2)
        st = self.state
        st.pin, st.puk = DEFAULT_PIN, DEFAULT_PUK
        st.pin_total = st.pin_left = p1
        st.puk_total = st.puk_left = p2
        self._session.pin_verified = self._session.pin_fresh = False
        return b""

    def _reset(self, p1: int, p2: int, data: bytes) -> bytes:
        """RESET (Yubico FB): only with PIN and PUK blocked; keeps the F9 attestation key."""
        st = self.state
        if st.pin_left or st.puk_left:
            raise CardError(SW.CONDITIONS)
        fresh = CardState(self._default_mgmt_type(), attestation_root_der=st.attestation_root_der)
        if 0xF9 in st.keys:
            fresh.keys[0xF9] = st.keys[0xF9]
        if ATTESTATION_OBJECT in st.objects:
            fresh.objects[ATTESTATION_OBJECT] = st.objects[ATTESTATION_OBJECT]
        self.state = fresh
        self._session = _Session(applet=PIV_AID)
        return b""

    # Management key (Part 2 3.2.4 GENERAL AUTHENTICATE, key reference 9B; Yubico FF to set it)

    def _require_admin(self) -> None:
        if not self._session.mgmt_authenticated:
            raise CardError(SW.SECURITY_STATUS)

    def _mgmt_authenticate(self, p1: int, fields: dict[int, bytes]) -> bytes:
        st, s = self.state, self._session
        if p1 != st.mgmt_key_type:
            raise CardError(SW.INCORRECT_DATA)
        size = 8 if st.mgmt_key_type == MgmtKeyType.TDES else 16
        witness, challenge = fields.get(0x80), fields.get(0x81)
        if witness == b"" and challenge is None:  # mutual auth, step 1: card sends E(witness)
            s.mgmt_authenticated, s.witness = False, os.urandom(size)
            return tlv(0x7C, tlv(0x80, _ecb(st.mgmt_key_type, st.mgmt_key, s.witness)))
        if witness and challenge is not None:  # step 2: host proves the witness, card answers
            expected, s.witness = s.witness, None
            if expected is None or not bytes_eq(witness, expected) or len(challenge) != size:
                raise CardError(SW.SECURITY_STATUS)
            self._mgmt_touch()
            s.mgmt_authenticated = True
            return tlv(0x7C, tlv(0x82, _ecb(st.mgmt_key_type, st.mgmt_key, challenge)))
        raise CardError(SW.INCORRECT_DATA)

    def _mgmt_touch(self) -> None:
        if self.state.mgmt_touch:
            self._require_touch(0x9B)

    def _set_mgmt_key(self, p1: int, p2: int, data: bytes) -> bytes:
        """SET MANAGEMENT KEY (Yubico FF, P2 FF; FE = require touch): alg || 9B len key."""
        self._require_admin()
        if p1 != 0xFF or p2 not in (0xFF, 0xFE):
            raise CardError(SW.INCORRECT_P1P2)
        try:
            key_type = MgmtKeyType(data[0])
        except (IndexError, ValueError):
            raise CardError(SW.INCORRECT_DATA) from None
        fields = parse_tlvs(data[1:])
        if key_type != MgmtKeyType.TDES and self.version < (5, 4, 0):
            raise CardError(SW.INCORRECT_DATA)
        if len(fields) != 1 or fields[0][0] != 0x9B or len(fields[0][1]) != MGMT_KEY_LEN[key_type]:
            raise CardError(SW.INCORRECT_DATA)
        st = self.state
        st.mgmt_key_type, st.mgmt_key, st.mgmt_touch = key_type, fields[0][1], p2 == 0xFE
        return b""

    # Keys: GENERATE (Part 2 3.3.2), IMPORT (Yubico FE), MOVE/DELETE (Yubico F6)

    def _slot_key(self, slot: int) -> SlotKey:
        key = self.state.keys.get(slot)
        if key is None:
            raise CardError(SW.REF_NOT_FOUND)
        return key

    def _private(self, key: SlotKey) -> PrivateKey:
        if key.private_der not in self._key_cache:
            self._key_cache[key.private_der] = _load_private(key.private_der)
        return self._key_cache[key.private_der]

    def _check_key_type(self, value: int) -> KeyType:
        try:
            key_type = KeyType(value)
        except ValueError:
            raise CardError(SW.INCORRECT_DATA) from None
        if self.version < KEY_TYPE_SINCE.get(key_type, (0, 0, 0)):
            raise CardError(SW.INCORRECT_DATA)  # the firmware does not know the algorithm
        return key_type

    def _policies(self, slot: int, fields: dict[int, bytes]) -> tuple[int, int]:
        """Resolve the optional AA (PIN) and AB (touch) policy bytes; 0 means the slot default."""
        pin = fields.get(0xAA, b"\x00")
        touch = fields.get(0xAB, b"\x00")
        if len(pin) != 1 or len(touch) != 1 or pin[0] > PIN_ALWAYS or touch[0] > TOUCH_CACHED:
            raise CardError(SW.INCORRECT_DATA)
        if (pin[0] or touch[0]) and self.version < (4, 0, 0):
            raise CardError(SW.INCORRECT_DATA)
        if touch[0] == TOUCH_CACHED and self.version < (4, 3, 0):
            raise CardError(SW.INCORRECT_DATA)
        default_pin = {0x9C: PIN_ALWAYS, 0x9E: PIN_NEVER, 0xF9: PIN_NEVER}.get(slot, PIN_ONCE)
        return pin[0] or default_pin, touch[0] or TOUCH_NEVER

    def _store_key(
        self,
        slot: int,
        key_type: KeyType,
        key: PrivateKey,
        fields: dict[int, bytes],
        generated: bool,
    ) -> None:
        pin_policy, touch_policy = self._policies(slot, fields)
        self.state.keys[slot] = SlotKey(
            key_type, pin_policy, touch_policy, generated, _private_der(key)
        )

    def _generate(self, p1: int, p2: int, data: bytes) -> bytes:
        self._require_admin()
        if p1 != 0x00 or p2 not in KEY_SLOTS:
            raise CardError(SW.INCORRECT_P1P2)
        template = tlv_dict(data).get(0xAC)
        if template is None:
            raise CardError(SW.INCORRECT_DATA)
        fields = tlv_dict(template)
        key_type = self._check_key_type(fields.get(0x80, b"\x00")[0])
        self._policies(p2, fields)  # refuse bad policies before the (slow) key generation
        key = _new_private_key(key_type)
        self._store_key(p2, key_type, key, fields, generated=True)
        return tlv(0x7F49, encode_public_key(key))

    def _import(self, p1: int, p2: int, data: bytes) -> bytes:
        self._require_admin()
        if p2 not in KEY_SLOTS:
            raise CardError(SW.INCORRECT_P1P2)
        key_type = self._check_key_type(p1)
        fields = tlv_dict(data)
        try:
            key = self._parse_private(key_type, fields)
        except (KeyError, ValueError):
            raise CardError(SW.INCORRECT_DATA) from None
        self._store_key(p2, key_type, key, fields, generated=False)
        return b""

    @staticmethod
    def _parse_private(key_type: KeyType, fields: dict[int, bytes]) -> PrivateKey:
        """RSA: 01 p, 02 q, 03 dP, 04 dQ, 05 qInv (e = 65537); EC: 06 d; 07 Ed25519; 08 X25519."""
        if key_type in RSA_BITS:
            p, q, dp, dq, qinv = (int.from_bytes(fields[t], "big") for t in range(1, 6))
            public = rsa.RSAPublicNumbers(65537, p * q)
            d = rsa.rsa_recover_private_exponent(65537, p, q)
            rsa_key = rsa.RSAPrivateNumbers(p, q, d, dp, dq, qinv, public).private_key()
            if rsa_key.key_size != RSA_BITS[key_type]:
                raise ValueError("RSA modulus size does not match the algorithm")
            return rsa_key
        if key_type in EC_CURVES:
            curve = EC_CURVES[key_type][0]
            if len(fields[0x06]) != (curve.key_size + 7) // 8:
                raise ValueError("EC private value has the wrong length")
            return ec.derive_private_key(int.from_bytes(fields[0x06], "big"), curve)
        if key_type == KeyType.ED25519:
            return ed25519.Ed25519PrivateKey.from_private_bytes(fields[0x07])
        return x25519.X25519PrivateKey.from_private_bytes(fields[0x08])

    def _move_key(self, p1: int, p2: int, data: bytes) -> bytes:
        """MOVE KEY (Yubico F6, 5.7): P1 destination (FF = delete), P2 source."""
        self._require_admin()
        keys = self.state.keys
        if (
            p2 not in KEY_SLOTS
            or p2 == 0xF9
            or (p1 != 0xFF and (p1 not in KEY_SLOTS or p1 == 0xF9))
        ):
            raise CardError(SW.INCORRECT_P1P2)
        key = self._slot_key(p2)
        if p1 != 0xFF:
            if p1 in keys:
                raise CardError(SW.INCORRECT_DATA)  # ykman: "DEST slot is not empty"
            keys[p1] = key
        del keys[p2]
        return b""

    # Private-key use (Part 2 3.2.4 GENERAL AUTHENTICATE; Yubico: E0 Ed25519, E1 X25519)

    def _general_authenticate(self, p1: int, p2: int, data: bytes) -> bytes:
        template = tlv_dict(data).get(0x7C)
        if template is None:
            raise CardError(SW.INCORRECT_DATA)
        fields = tlv_dict(template)
        if p2 == 0x9B:
            return self._mgmt_authenticate(p1, fields)
        key = self.state.keys.get(p2)
        if key is None or p1 != key.key_type or fields.get(0x82) != b"":
            raise CardError(SW.INCORRECT_DATA)  # yubikit: 6A80 is "no key?"
        challenge, exponent = fields.get(0x81), fields.get(0x85)
        if (challenge is None) == (exponent is None):
            raise CardError(SW.INCORRECT_DATA)
        self._authorize_use(p2, key)
        private = self._private(key)
        if exponent is not None:
            result = self._key_agreement(private, exponent)
        else:
            assert challenge is not None
            result = self._sign(key.key_type, private, challenge)
        return tlv(0x7C, tlv(0x82, result))

    def _authorize_use(self, slot: int, key: SlotKey) -> None:
        """PIN policy first (6982 without PIN), then touch (6982 when no touch arrives)."""
        s = self._session
        fresh, s.pin_fresh = s.pin_fresh, False  # ALWAYS: one VERIFY buys exactly one use
        if key.pin_policy == PIN_ONCE and not s.pin_verified:
            raise CardError(SW.SECURITY_STATUS)
        if key.pin_policy == PIN_ALWAYS and not (fresh and s.pin_verified):
            raise CardError(SW.SECURITY_STATUS)
        cached = time.monotonic() - s.last_touch < self.touch_cache_seconds
        if key.touch_policy == TOUCH_ALWAYS or (key.touch_policy == TOUCH_CACHED and not cached):
            self._require_touch(slot)

    def _require_touch(self, slot: int) -> None:
        self.touch_requests.append(slot)
        if self.on_touch is not None:
            touched = self.on_touch(slot)
            if not touched:
                time.sleep(self.touch_timeout)
        else:
            self._touched.clear()
            self.waiting_for_touch.set()
            try:
                touched = self._touched.wait(self.touch_timeout)
            finally:
                self.waiting_for_touch.clear()
        if not touched:
            raise CardError(SW.SECURITY_STATUS)
        self._session.last_touch = time.monotonic()

    @staticmethod
    def _sign(key_type: KeyType, private: PrivateKey, message: bytes) -> bytes:
        """RSA: raw private-key operation on a full padded block; EC: ECDSA over the given hash
        (left-padded to the field size), DER output; Ed25519: the whole message."""
        if isinstance(private, rsa.RSAPrivateKey):
            numbers = private.private_numbers()
            n = numbers.public_numbers.n
            m = int.from_bytes(message, "big")
            size = private.key_size // 8
            if len(message) != size or m >= n:
                raise CardError(SW.INCORRECT_DATA)
            return pow(m, numbers.d, n).to_bytes(size, "big")
        if isinstance(private, ec.EllipticCurvePrivateKey):
            curve, hash_algorithm = EC_CURVES[key_type]
            size = (curve.key_size + 7) // 8
            if len(message) > size:
                raise CardError(SW.INCORRECT_DATA)
            return private.sign(message.rjust(size, b"\x00"), ec.ECDSA(Prehashed(hash_algorithm)))
        if isinstance(private, ed25519.Ed25519PrivateKey):
            return private.sign(message)
        raise CardError(SW.INCORRECT_DATA)  # X25519 keys only agree

    @staticmethod
    def _key_agreement(private: PrivateKey, peer: bytes) -> bytes:
        """ECDH (tag 85): peer point in, shared secret (x coordinate / X25519 output) out."""
        try:
            if isinstance(private, ec.EllipticCurvePrivateKey):
                point = ec.EllipticCurvePublicKey.from_encoded_point(private.curve, peer)
                return private.exchange(ec.ECDH(), point)
            if isinstance(private, x25519.X25519PrivateKey):
                return private.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
        except ValueError:
            pass
        raise CardError(SW.INCORRECT_DATA)

    # Data objects (Part 2 3.1.2 GET DATA, 3.3.1 PUT DATA)

    @staticmethod
    def _object_id(fields: dict[int, bytes]) -> int:
        tag = fields.get(0x5C)
        if tag is None or not 1 <= len(tag) <= 3:
            raise CardError(SW.INCORRECT_DATA)
        return int.from_bytes(tag, "big")

    def _get_data(self, p1: int, p2: int, data: bytes) -> bytes:
        if (p1, p2) != (0x3F, 0xFF):
            raise CardError(SW.INCORRECT_P1P2)
        object_id = self._object_id(tlv_dict(data))
        if object_id == 0x7E:
            return DISCOVERY
        if object_id in PIN_PROTECTED_OBJECTS and not self._session.pin_verified:
            raise CardError(SW.SECURITY_STATUS)
        value = self.state.objects.get(object_id)
        if value is None:
            raise CardError(SW.NOT_FOUND)
        return tlv(0x53, value)

    def _put_data(self, p1: int, p2: int, data: bytes) -> bytes:
        self._require_admin()
        if (p1, p2) != (0x3F, 0xFF):
            raise CardError(SW.INCORRECT_P1P2)
        fields = tlv_dict(data)
        object_id = self._object_id(fields)
        if object_id == 0x7E or 0x53 not in fields:
            raise CardError(SW.INCORRECT_DATA)
        if fields[0x53]:
            self.state.objects[object_id] = fields[0x53]
        else:  # an empty 53 deletes the object (ykman delete_certificate)
            self.state.objects.pop(object_id, None)
        return b""

    # Attestation (Yubico F9, 4.3)

    def _attest(self, p1: int, p2: int, data: bytes) -> bytes:
        """An X.509 certificate for the key in slot P1, signed by the F9 key, issued by the F9
        certificate (object 5FFF01), with Yubico's extensions under 1.3.6.1.4.1.41482.3:
        .3 firmware (3 bytes), .7 serial (DER INTEGER), .8 {PIN, touch policy}, .9 form factor."""
        if p2 != 0x00:
            raise CardError(SW.INCORRECT_P1P2)
        key = self._slot_key(p1)
        if not key.generated or p1 == 0xF9:
            raise CardError(SW.INCORRECT_DATA)  # imported keys cannot be attested (assumed SW)
        signer = self._private(self._slot_key(0xF9))
        issuer_object = self.state.objects.get(ATTESTATION_OBJECT)
        if issuer_object is None or isinstance(signer, x25519.X25519PrivateKey):
            raise CardError(SW.CONDITIONS)
        issuer = x509.load_der_x509_certificate(tlv_dict(issuer_object)[0x70])
        public = self._private(key).public_key()

        def ext(arc: int, value: bytes) -> x509.UnrecognizedExtension:
            return x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{YUBICO_OID}.{arc}"), value)

        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"YubiKey PIV Attestation {p1:02x}"))
            .issuer_name(issuer.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(issuer.not_valid_before_utc)
            .not_valid_after(issuer.not_valid_after_utc)
            .add_extension(ext(3, bytes(self.version)), critical=False)
            .add_extension(ext(7, _der_integer(self.serial)), critical=False)
            .add_extension(ext(8, bytes([key.pin_policy, key.touch_policy])), critical=False)
            .add_extension(ext(9, bytes([self.form_factor])), critical=False)
        )
        algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        return builder.sign(signer, algorithm).public_bytes(serialization.Encoding.DER)

    # State

    def _default_mgmt_type(self) -> MgmtKeyType:
        return MgmtKeyType.AES192 if self.version >= (5, 7, 0) else MgmtKeyType.TDES

    def _factory_state(self) -> CardState:
        state = CardState(self._default_mgmt_type())
        root, f9_key, f9_der = _new_attestation_ca(self.serial)
        state.attestation_root_der = root.public_bytes(serialization.Encoding.DER)
        state.keys[0xF9] = SlotKey(
            KeyType.ECCP256, PIN_NEVER, TOUCH_NEVER, False, _private_der(f9_key)
        )
        state.objects[ATTESTATION_OBJECT] = cert_object(f9_der)
        return state

    def _persist(self) -> None:
        """Write the state file when anything persistent changed (atomically: tmp + rename)."""
        if self.state_path is None:
            return
        text = self.state.to_json()
        if text != self._saved:
            tmp = self.state_path.with_name(self.state_path.name + f".{secrets.token_hex(4)}.tmp")
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(text)
            tmp.replace(self.state_path)
            self._saved = text

    _piv_commands: ClassVar[dict[int, Callable[[EmulatedCard, int, int, bytes], bytes]]] = {
        0x20: _verify,
        0x24: _change_reference,
        0x2C: _reset_retry,
        0x47: _generate,
        0x87: _general_authenticate,
        0xCB: _get_data,
        0xDB: _put_data,
        0xF6: _move_key,
        0xF7: _metadata,
        0xF8: _get_serial,
        0xF9: _attest,
        0xFA: _set_retries,
        0xFB: _reset,
        0xFD: _get_version,
        0xFE: _import,
        0xFF: _set_mgmt_key,
    }
