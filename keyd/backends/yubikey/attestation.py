"""PIV attestation: proof that a key was generated on a YubiKey, and with which policies.

The card signs a certificate for the slot's key (ATTEST) with its attestation key,
whose certificate (slot F9) is issued by Yubico. Firmware before 5.7.4 chains F9
directly to "Yubico PIV Root CA Serial 263751"; later firmware goes through
intermediates the card does not carry, which the configuration supplies with the
roots. The statement carries Yubico's extensions (OID 1.3.6.1.4.1.41482.3): .3
firmware, .7 serial, .8 PIN and touch policy. Keys imported into a card cannot be
attested; the card refuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ObjectIdentifier

_FIRMWARE = ObjectIdentifier("1.3.6.1.4.1.41482.3.3")
_SERIAL = ObjectIdentifier("1.3.6.1.4.1.41482.3.7")
_POLICY = ObjectIdentifier("1.3.6.1.4.1.41482.3.8")
_PIN_POLICIES = {1: "never", 2: "once", 3: "always"}
_TOUCH_POLICIES = {1: "never", 2: "always", 3: "cached"}
_MAX_CHAIN = 4  # links above F9: at most 3 intermediates, then a root


@dataclass(frozen=True)
class Attestation:
    """What keyd records in the catalog for a generated key."""

    verified: bool
    detail: str  # why not, or which root
    serial: int | None = None
    firmware: str = ""
    pin_policy: str = ""
    touch_policy: str = ""

    def as_location(self) -> dict[str, str]:
        """As catalog location fields (strings), shown by `keyd keys show`."""
        return {
            "attestation": "verified" if self.verified else "NOT verified",
            "attestation_detail": self.detail,
            "attested_serial": "" if self.serial is None else str(self.serial),
            "attested_firmware": self.firmware,
            "attested_pin_policy": self.pin_policy,
            "attested_touch_policy": self.touch_policy,
        }


def verify(
    statement: x509.Certificate,
    device: x509.Certificate,
    public_key: PublicKeyTypes,
    *,
    roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    serial: int,
    pin_policy: str = "",
    touch_policy: str = "",
) -> Attestation:
    """Check the statement for `public_key` on the card with `serial` up to one of
    `roots`, and read its extensions; with `pin_policy`/`touch_policy`, the card must
    have applied exactly those. Never raises for a bad attestation: the result says
    what was wrong, and carries the statement's facts only once they are vouched for."""
    facts = statement_facts(statement)  # what the statement says, not yet vouched for

    def refused(why: str) -> Attestation:
        return Attestation(False, why)

    if statement.public_key() != public_key:
        return refused("the attestation is for another key")
    if facts.serial != serial:
        return refused(f"the attestation names serial {facts.serial}, not {serial}")
    for name, wanted, applied in (
        ("PIN", pin_policy, facts.pin_policy),
        ("touch", touch_policy, facts.touch_policy),
    ):
        if wanted and applied != wanted:
            return refused(f"the card applied {name} policy {applied or '?'}, not {wanted}")
    if not _issued_by(statement, device):
        return refused("the attestation is not signed by the card's F9 key")
    chain = device
    for _ in range(_MAX_CHAIN):
        for root in roots:
            if _is_ca(root) and _issued_by(chain, root):
                return replace(
                    facts, verified=True, detail=f"chains to {root.subject.rfc4514_string()}"
                )
        parent = next((c for c in intermediates if _is_ca(c) and _issued_by(chain, c)), None)
        if parent is None:
            break
        chain = parent
    return refused(
        f"the card's certificate ({device.issuer.rfc4514_string()}) does not chain to a "
        "trusted attestation root"
    )


def _is_ca(certificate: x509.Certificate) -> bool:
    """Roots and intermediates must be CAs. (The card's F9 certificate is not checked:
    older YubiKeys' F9 certificates carry no CA flag.)"""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def statement_facts(statement: x509.Certificate) -> Attestation:
    """What a statement says (serial, firmware, policies), not yet vouched for."""

    def value(oid: ObjectIdentifier) -> bytes:
        try:
            ext = statement.extensions.get_extension_for_oid(oid).value
        except x509.ExtensionNotFound:
            return b""
        return ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""

    firmware = value(_FIRMWARE)
    serial_der = value(_SERIAL)
    policy = value(_POLICY)
    serial = None
    # DER INTEGER: 02 len bytes.
    if len(serial_der) >= 3 and serial_der[0] == 0x02 and serial_der[1] == len(serial_der) - 2:
        serial = int.from_bytes(serial_der[2:], "big")
    return Attestation(
        verified=False,
        detail="",
        serial=serial,
        firmware=".".join(str(b) for b in firmware) if len(firmware) == 3 else "",
        pin_policy=_PIN_POLICIES.get(policy[0], "") if len(policy) == 2 else "",
        touch_policy=_TOUCH_POLICIES.get(policy[1], "") if len(policy) == 2 else "",
    )
