"""Backend `yubikey:NAME`: keys generated on, or adopted from, a YubiKey's PIV slots.

One card per backend, chosen by serial (device.py). The catalog records where each
key lives (serial, slot), the slot's PIN and touch policies, and what the card's
attestation proved (attestation.py). The PIN is verified as the slot's policy asks:
before every signature (ALWAYS) or once per opening of the card (ONCE). A refused PIN
disarms the backend until the operator re-arms it (reload(): SIGHUP), so keyd can
never use up the PIN's attempts by itself.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from yubikit.core import BadResponseError, NotSupportedError
from yubikit.core.smartcard import SW, ApduError
from yubikit.piv import KEY_TYPE, PIN_POLICY, SLOT, TOUCH_POLICY, PivSession

from keyd.backends.base import Backend, BackendHealth, DeviceKeyRef, GeneratedKey
from keyd.backends.yubikey import attestation, piv
from keyd.backends.yubikey.device import DeviceBusy, YubiKeyDevice
from keyd.config import PivPinPolicy, PivTouchPolicy, YubiKeyConfig, parse_piv_slot
from keyd.core import notice
from keyd.core.keys import PublicKey
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.model import KeyRecord
from keyd.core.signing import SignInput
from keyd.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    KeydError,
    SecretError,
    Unavailable,
)
from keyd.secretfile import find_secret, read_pin, read_private_file

log = logging.getLogger("keyd.yubikey")
T = TypeVar("T")

FAMILY = "yubikey"
_MIN_PIN_CHARS, _MAX_PIN_BYTES = 6, 8  # PIV PINs
_MGMT_KEY_LENGTHS = (16, 24, 32)  # AES-128, 3DES or AES-192, AES-256
_HEALTH_WAIT = 0.5  # seconds: health reports "busy" rather than wait behind a touch
_KEY_TYPES = {piv_type: key_type for key_type, piv_type in piv.PIV_TYPES.items()}
_PIN_POLICIES = {
    PivPinPolicy.NEVER: PIN_POLICY.NEVER,
    PivPinPolicy.ONCE: PIN_POLICY.ONCE,
    PivPinPolicy.ALWAYS: PIN_POLICY.ALWAYS,
}
_TOUCH_POLICIES = {
    PivTouchPolicy.NEVER: TOUCH_POLICY.NEVER,
    PivTouchPolicy.ALWAYS: TOUCH_POLICY.ALWAYS,
    PivTouchPolicy.CACHED: TOUCH_POLICY.CACHED,
}
# The card's defaults when a slot says DEFAULT (Yubico: 9C always asks for the PIN).
_DEFAULT_PIN = {SLOT.SIGNATURE: "always", SLOT.CARD_AUTH: "never"}


def backend_name(name: str) -> str:
    return f"{FAMILY}:{name}"


def load_secrets(name: str, config: YubiKeyConfig) -> piv.Secrets:
    """The PIN and the management key (None: PIN-protected on the card)."""
    pin_path = find_secret(config.credential(name, "pin"), config.pin_file)
    if pin_path is None:
        raise SecretError(
            f"no PIN for YubiKey {name!r}: set [yubikey.{name}] pin_file, or run under "
            f"systemd with LoadCredential={config.credential(name, 'pin')}:FILE"
        )
    pin = read_pin(pin_path, f"PIN file of YubiKey {name!r}", _MAX_PIN_BYTES)
    # A PIV PIN is 6 to 8 printable ASCII characters: anything else would only spend
    # one of the card's few attempts.
    if not (_MIN_PIN_CHARS <= len(pin) <= _MAX_PIN_BYTES and pin.isascii() and pin.isprintable()):
        raise SecretError(f"{pin_path}: a PIV PIN is 6 to 8 printable ASCII characters")
    key_path = find_secret(config.credential(name, "management-key"), config.management_key_file)
    if key_path is None:
        return piv.Secrets(pin=pin)
    what = f"management key file of YubiKey {name!r}"
    text = read_private_file(key_path, what, 2 * max(_MGMT_KEY_LENGTHS) + 2).strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise SecretError(f"{key_path}: the management key must be hex") from None
    if len(key) not in _MGMT_KEY_LENGTHS:
        raise SecretError(f"{key_path}: the management key must be 16, 24 or 32 bytes")
    return piv.Secrets(pin=pin, management_key=key)


def load_trust(config: YubiKeyConfig) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """Attestation roots and intermediates: configured, or Yubico's bundled ones."""
    configured = [c for path in config.attestation_intermediates for c in _read_pems(path)]
    if config.attestation_roots:
        return [c for path in config.attestation_roots for c in _read_pems(path)], configured
    bundled = resources.files("keyd.backends.yubikey") / "roots"
    roots: list[x509.Certificate] = []
    intermediates: list[x509.Certificate] = []
    for entry in sorted(bundled.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".pem"):
            for cert in x509.load_pem_x509_certificates(entry.read_bytes()):
                (roots if cert.subject == cert.issuer else intermediates).append(cert)
    return roots, [*intermediates, *configured]


def _read_pems(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable PEM certificate file ({exc})") from None


@dataclass(frozen=True)
class _Slot:
    """Where a catalog key lives, and how the card guards it."""

    slot: SLOT
    pin_policy: str  # never, once, always
    touch_policy: str  # never, always, cached; "unknown" counts as needing a touch

    @classmethod
    def of(cls, record: KeyRecord) -> _Slot:
        location = record.location
        return cls(
            SLOT(int(location["slot"], 16)),
            location.get("pin_policy", "always"),
            location.get("touch_policy", "unknown"),
        )

    @property
    def touch(self) -> bool:
        return self.touch_policy != "never"


@dataclass(frozen=True)
class _Found:
    """An occupied slot as the card describes it (adoption)."""

    slot: _Slot
    origin: str  # generated, imported, unknown (before firmware 5.3)
    public_key: PublicKeyTypes


class YubiKeyBackend(Backend):
    always_verify = True
    slotted = True

    def __init__(self, name: str, config: YubiKeyConfig) -> None:
        self.name = backend_name(name)
        self.max_in_flight = config.max_requests
        self._key_name = name
        self._config = config
        self._serial = config.serial
        self._who = piv.device_name(config.serial)
        # Read now, so that a missing or unsafe secret file stops the start.
        self._secrets = load_secrets(name, config)
        self._roots, self._intermediates = load_trust(config)
        self._device = YubiKeyDevice(config.serial, config.reader)
        self._state_lock = threading.Lock()
        self._disarmed = ""  # why keyd stopped using the PIN; "" while armed
        self._refused_pin = b""  # digest of the PIN the card refused, if it did
        self._arming = 0  # counts re-armings: a refusal seen under an older one is stale
        self._pin_epoch = -1  # the device epoch in which the PIN was last verified

    # -- PIN -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _pin_use(self) -> Iterator[None]:
        """Around anything that may verify the PIN: refuse while disarmed; disarm when
        the card refuses the PIN or has too few attempts left."""
        with self._state_lock:
            if self._disarmed:
                raise piv.PinLocked(self._disarmed)
            arming, pin = self._arming, self._secrets.pin
        try:
            yield
        except piv.PinLocked as exc:
            refused = isinstance(exc, piv.PinRefused)
            with self._state_lock:
                if self._arming == arming:  # not re-armed meanwhile
                    self._disarmed = (
                        f"{exc.message}. keyd stopped using the PIN; after fixing the PIN "
                        "file, re-arm with `systemctl reload keyd` (SIGHUP)"
                        if refused
                        else exc.message
                    )
                    self._refused_pin = _digest(pin) if refused else b""
                message = self._disarmed or exc.message
            log.error(
                "YubiKey PIN not used any more; backend disarmed",
                extra={"backend": self.name, "serial": self._serial, "reason": exc.message},
            )
            raise piv.PinLocked(message) from None

    def _verify_pin(self, session: PivSession) -> None:
        with self._pin_use():
            piv.verify_pin(
                session,
                self._secrets.pin,
                min_attempts=self._config.min_pin_attempts,
                serial=self._serial,
            )
        self._pin_epoch = self._device.epoch

    def _pin_before_use(self, session: PivSession, where: _Slot) -> None:
        """Verify the PIN as the slot's policy asks before one private-key use: ALWAYS
        every time, ONCE after each (re)opening of the card, NEVER not at all."""
        if where.pin_policy == "always" or (
            where.pin_policy == "once" and self._pin_epoch != self._device.epoch
        ):
            self._verify_pin(session)

    def reload(self) -> None:
        """Re-read the PIN and management key, and re-arm, unless the PIN is still the
        one the card refused (under systemd, credentials are read only at start)."""
        fresh = load_secrets(self._key_name, self._config)
        with self._state_lock:
            if self._refused_pin and _digest(fresh.pin) == self._refused_pin:
                log.error(
                    "YubiKey stays disarmed: the PIN is still the one the card refused "
                    "(a systemd credential is read at start: restart keyd to read a new one)",
                    extra={"backend": self.name},
                )
                return
            self._secrets = fresh
            was = self._disarmed
            self._disarmed = ""
            self._refused_pin = b""
            self._arming += 1
            self._pin_epoch = -1
        if was:
            log.info("YubiKey PIN re-armed", extra={"backend": self.name})

    # -- running things on the card --------------------------------------------------------

    def _run(self, operation: Callable[[PivSession], T], action: str) -> T:
        """device.run, with the card's own refusals as keyd errors (FAILED_PRECONDITION)
        rather than INTERNAL."""
        try:
            return self._device.run(operation)
        except ApduError as exc:
            raise FailedPrecondition(
                f"{self._who} refused to {action} (status {exc.sw:04x})"
            ) from None
        except BadResponseError as exc:
            raise Unavailable(f"{self._who} gave a malformed answer ({exc}); retry") from None

    def _touch_notice(self, where: _Slot) -> Callable[[], None] | None:
        if not where.touch:
            return None
        return functools.partial(notice.touch_needed, self._who)

    # -- keys ------------------------------------------------------------------------

    def _slot_named(self, text: str) -> SLOT:
        value = parse_piv_slot(text)
        if value is None:
            raise InvalidArgument(
                f"{text!r} is not a PIV key slot; use 9a, 9c, 9d, 9e or a retired slot 82-95"
            )
        return SLOT(value)

    def generate(self, key_type: KeyType, *, role: str = "", slot: str = "") -> GeneratedKey:
        where = self._slot_named(slot or self._config.slot_for(role))
        asked = _Slot(where, self._config.pin_policy.value, self._config.touch_policy.value)

        def create(session: PivSession) -> tuple[GeneratedKey, attestation.Attestation]:
            with self._pin_use():
                public = piv.generate(
                    session,
                    where,
                    key_type,
                    pin_policy=_PIN_POLICIES[self._config.pin_policy],
                    touch_policy=_TOUCH_POLICIES[self._config.touch_policy],
                    secrets=self._secrets,
                    min_attempts=self._config.min_pin_attempts,
                    serial=self._serial,
                    before_touch=self._touch_notice(asked),
                )
            self._pin_epoch = self._device.epoch
            facts = self._attest(session, asked, public)
            # The card's own account of the policies where it gives one (5.3+).
            applied = self._policies(session, where) or asked
            location = self._location(applied, origin="generated", facts=facts)
            return GeneratedKey(PublicKey.from_crypto(public), location=location), facts

        generated, facts = self._run(create, f"make a key in slot {where:02x}")
        (log.info if facts.verified else log.warning)(
            "key generated on YubiKey",
            extra={"backend": self.name, "slot": f"{where:02x}", "attestation": facts.detail},
        )
        if self._config.require_attestation and not facts.verified:
            self._wipe(where, generated.public_key)
            raise FailedPrecondition(
                f"the key made in slot {where:02x} of {self._who} failed attestation "
                f"({facts.detail}); it was destroyed. Check attestation_roots, or the device"
            )
        return generated

    def _policies(self, session: PivSession, where: SLOT) -> _Slot | None:
        try:
            meta = session.get_slot_metadata(where)
        except NotSupportedError:
            return None
        return _Slot(where, *_named_policies(where, meta.pin_policy, meta.touch_policy))

    def _attest(
        self, session: PivSession, where: _Slot, public: PublicKeyTypes
    ) -> attestation.Attestation:
        """Verify the card's attestation of the key, which must show the slot's policies."""
        try:
            statement = session.attest_key(where.slot)
            device = session.get_certificate(SLOT.ATTESTATION)
        except (ApduError, NotSupportedError) as exc:
            why = f"status {exc.sw:04x}" if isinstance(exc, ApduError) else str(exc)
            return attestation.Attestation(
                False, f"the card did not attest this key ({why}); imported keys cannot be"
            )
        return attestation.verify(
            statement,
            device,
            public,
            roots=self._roots,
            intermediates=self._intermediates,
            serial=self._serial,
            pin_policy=where.pin_policy,
            touch_policy=where.touch_policy,
        )

    def _location(
        self, where: _Slot, *, origin: str, facts: attestation.Attestation
    ) -> dict[str, str]:
        return {
            "serial": str(self._serial),
            "slot": f"{where.slot:02x}",
            "pin_policy": where.pin_policy,
            "touch_policy": where.touch_policy,
            "origin": origin,
            **facts.as_location(),
        }

    def adopt(self, ref: DeviceKeyRef) -> GeneratedKey:
        """Record the key already in a slot (`ref.id`, such as "9c"): its public key comes
        from the slot's metadata (firmware 5.3+) or certificate, and is proven with a
        signature before keyd believes it."""
        if ref.label or not ref.id:
            raise InvalidArgument("name the YubiKey key to adopt by its PIV slot (--id 9c)")
        where = self._slot_named(ref.id)

        def read(session: PivSession) -> tuple[GeneratedKey, bool]:
            found = self._found(session, where)
            key_type = _KEY_TYPES.get(KEY_TYPE.from_public_key(found.public_key))
            if key_type is None:
                raise FailedPrecondition(
                    f"slot {where:02x} of {self._who} holds a key type keyd does not use"
                )
            challenge = SignInput.of_message(secrets.token_bytes(32))
            self._pin_before_use(session, found.slot)
            signature = piv.sign(
                session,
                where,
                key_type,
                challenge.payload,
                prehashed=False,
                serial=self._serial,
                before_touch=self._touch_notice(found.slot),
            )
            key = PublicKey.from_crypto(found.public_key)
            proven = key.verify(signature, challenge, SignatureEncoding.DER)
            facts = (
                self._attest(session, found.slot, found.public_key)
                if found.origin != "imported"
                else attestation.Attestation(False, "imported into the card: not attestable")
            )
            location = self._location(found.slot, origin=found.origin, facts=facts)
            return GeneratedKey(key, location=location), proven

        generated, proven = self._run(read, f"read the key in slot {where:02x}")
        if not proven:
            raise FailedPrecondition(
                f"the certificate in slot {where:02x} of {self._who} does not belong to the "
                "slot's key; keyd does not adopt it"
            )
        return generated

    def _found(self, session: PivSession, where: SLOT) -> _Found:
        """An occupied slot's key and policies. Before firmware 5.3 the public key comes
        from the certificate, and the policies from the attestation statement if the
        card gives one; otherwise keyd assumes the strictest (PIN always, a touch)."""
        try:
            meta = session.get_slot_metadata(where)
        except ApduError as exc:
            if exc.sw == SW.REFERENCE_DATA_NOT_FOUND:
                raise InvalidArgument(f"slot {where:02x} of {self._who} is empty") from None
            raise
        except NotSupportedError:
            try:
                public = session.get_certificate(where).public_key()
            except ApduError:
                raise InvalidArgument(
                    f"slot {where:02x} of {self._who} has no certificate, and this firmware "
                    "cannot report its public key otherwise"
                ) from None
            try:
                stated = attestation.statement_facts(session.attest_key(where))
            except ApduError:
                return _Found(_Slot(where, "always", "unknown"), "unknown", public)
            pin, touch = stated.pin_policy or "always", stated.touch_policy or "unknown"
            return _Found(_Slot(where, pin, touch), "generated", public)
        pin, touch = _named_policies(where, meta.pin_policy, meta.touch_policy)
        origin = "generated" if meta.generated else "imported"
        return _Found(_Slot(where, pin, touch), origin, meta.public_key)

    def _where(self, record: KeyRecord) -> _Slot:
        serial = record.location.get("serial", "")
        if serial != str(self._serial):
            raise FailedPrecondition(
                f"key {record.key_id} is on YubiKey {serial or '?'}, but backend "
                f"{self.name!r} is YubiKey {self._serial}"
            )
        return _Slot.of(record)

    def sign(self, record: KeyRecord, payloads: Sequence[bytes], *, prehashed: bool) -> list[bytes]:
        where = self._where(record)
        before_touch = self._touch_notice(where)

        def sign(session: PivSession) -> list[bytes]:
            signatures = []
            for payload in payloads:
                self._pin_before_use(session, where)
                signatures.append(
                    piv.sign(
                        session,
                        where.slot,
                        record.key_type,
                        payload,
                        prehashed=prehashed,
                        serial=self._serial,
                        before_touch=before_touch,
                    )
                )
            return signatures

        try:
            return self._run(sign, f"sign with the key in slot {where.slot:02x}")
        except piv.PinStateLost:
            self._pin_epoch = -1  # verify again next time
            raise

    def describe(self, record: KeyRecord) -> Mapping[str, str]:
        """What the card says now: is the key still there, PIN attempts left."""
        try:
            where = self._where(record)

            def read(session: PivSession) -> dict[str, str]:
                facts = {"pin_attempts_left": str(session.get_pin_attempts())}
                try:
                    meta = session.get_slot_metadata(where.slot)
                except NotSupportedError:
                    return facts
                except ApduError:
                    return {**facts, "device_status": "the slot is empty"}
                same = PublicKey.from_crypto(meta.public_key) == record.public_key
                facts["device_status"] = "present" if same else "the slot holds another key"
                return facts

            return self._device.run(read, wait=_HEALTH_WAIT)
        except KeydError as exc:
            return {"device_status": exc.message}
        except ApduError as exc:
            return {"device_status": f"the card refused to describe the key ({exc.sw:04x})"}

    def delete(self, record: KeyRecord) -> None:
        # Forgotten, not destroyed: a root key destroyed by mistake cannot come back.
        log.warning(
            "YubiKey key forgotten; it remains in its slot",
            extra={"key_id": record.key_id, "slot": record.location.get("slot", "")},
        )

    def destroy(self, record: KeyRecord) -> None:
        self._wipe(self._where(record).slot, record.public_key)
        log.warning(
            "YubiKey key destroyed",
            extra={"backend": self.name, "key_id": record.key_id},
        )

    def _wipe(self, where: SLOT, expected: PublicKey) -> None:
        """Remove the key in `where` and its certificate, if it is still `expected`:
        whatever else the slot holds now is refused, never destroyed. Before firmware 5.7
        a card cannot delete a key: a fresh key is generated over it and never recorded."""

        def wipe(session: PivSession) -> None:
            present = self._found(session, where).public_key
            if PublicKey.from_crypto(present) != expected:
                raise FailedPrecondition(
                    f"slot {where:02x} of {self._who} holds another key than the one keyd "
                    "recorded; nothing was destroyed"
                )
            with self._pin_use():
                piv.authenticate(
                    session,
                    self._secrets,
                    min_attempts=self._config.min_pin_attempts,
                    serial=self._serial,
                )
            if tuple(session.version) >= (5, 7, 0):
                session.delete_key(where)
            else:
                session.generate_key(where, KEY_TYPE.ECCP256)
            with contextlib.suppress(ApduError):  # no certificate: nothing to delete
                session.delete_certificate(where)

        self._run(wipe, f"destroy the key in slot {where:02x}")

    # -- state ---------------------------------------------------------------------------

    def health(self) -> BackendHealth:
        with self._state_lock:
            disarmed = self._disarmed
        if disarmed:
            return BackendHealth(self.name, False, disarmed, "locked")

        def probe(session: PivSession) -> str:
            version = ".".join(map(str, session.version))
            attempts = session.get_pin_attempts()
            return (
                f"{self._who}, firmware {version}, in reader {self._device.reader_name!r}; "
                f"{attempts} PIN attempts left"
            )

        try:
            detail = self._device.run(probe, wait=_HEALTH_WAIT)
        except DeviceBusy as exc:
            return BackendHealth(self.name, True, exc.message, "busy")
        except Unavailable as exc:
            return BackendHealth(self.name, False, exc.message, "absent")
        except ApduError as exc:
            return BackendHealth(self.name, False, f"card error {exc.sw:04x}", "error")
        return BackendHealth(self.name, True, detail, "connected")

    def warm_up(self) -> None:
        """Find the card before the first request needs it."""
        self.health()

    def close(self) -> None:
        self._device.close()


def _digest(pin: str) -> bytes:
    return hashlib.sha256(pin.encode()).digest()


def _named_policies(where: SLOT, pin: PIN_POLICY, touch: TOUCH_POLICY) -> tuple[str, str]:
    """The card's policies as keyd names them; DEFAULT resolved as the card does."""
    pin_name = _DEFAULT_PIN.get(where, "once") if pin is PIN_POLICY.DEFAULT else pin.name.lower()
    touch_name = "never" if touch is TOUCH_POLICY.DEFAULT else touch.name.lower()
    return pin_name, touch_name
