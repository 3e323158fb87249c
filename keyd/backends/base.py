"""The one abstraction every backend implements."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from keyd.core.keys import PublicKey
from keyd.core.keytypes import KeyType
from keyd.core.model import KeyRecord
from keyd.errors import FailedPrecondition


@dataclass(frozen=True)
class GeneratedKey:
    public_key: PublicKey
    # Where the key lives on the backend (token and CKA_ID, serial and slot...).
    location: Mapping[str, str] = field(default_factory=dict)
    # Store keys only: the private key, kept in the encrypted database with its
    # catalog row, in the same transaction. Hardware backends leave it None.
    private_pkcs8: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class BackendHealth:
    name: str
    healthy: bool
    detail: str = ""
    # A short machine-readable word: ready, connected, absent, locked...
    state: str = "ready"


@dataclass(frozen=True)
class DeviceKeyRef:
    """A key that already exists on a device, named the device's way: `id` is the
    CKA_ID in hex on a PKCS#11 token; `label` its CKA_LABEL."""

    id: str = ""
    label: str = ""


class Backend(abc.ABC):
    """Generates keys, signs with them, deletes them, reports health.

    Contract: sign() returns ECDSA signatures DER-encoded and other signatures in
    their only form, one per payload; it raises keyd.errors types (Unavailable for a missing
    device, FailedPrecondition for a locked one). Hardware backends set
    `always_verify`: the daemon then checks every signature before returning it.
    """

    name: str
    always_verify: bool = True
    # At most this many sign calls in flight on this backend; more are refused so
    # that a slow device cannot take every worker thread from the other backends.
    max_in_flight: int | None = 8
    # The backend keeps keys in slots a request may choose (a YubiKey's PIV slots).
    slotted: bool = False

    @abc.abstractmethod
    def generate(self, key_type: KeyType, *, role: str = "", slot: str = "") -> GeneratedKey:
        """Make a key. `slot` (only where `slotted`) names the place on the device;
        `role` lets a backend choose one by role."""

    @abc.abstractmethod
    def sign(self, record: KeyRecord, payloads: Sequence[bytes], *, prehashed: bool) -> list[bytes]:
        """Sign each payload with one key, in order.

        Payloads are messages, or (prehashed) digests of the key type's hash whose
        length the caller has checked. One call per batch lets a backend pay its
        per-call setup (a session, a PIN check, a lock) once.
        """

    @abc.abstractmethod
    def delete(self, record: KeyRecord) -> None:
        """Called after the catalog row is gone: remove or forget the private key."""

    @abc.abstractmethod
    def health(self) -> BackendHealth: ...

    def destroy(self, record: KeyRecord) -> None:
        """Remove the private key from its device for good: a key the catalog failed to
        record, or a purge the operator confirmed. Hardware backends, whose delete()
        only forgets, destroy here."""
        self.delete(record)

    def adopt(self, ref: DeviceKeyRef) -> GeneratedKey:
        """Read a key that already exists on the device, to be recorded in the catalog."""
        raise FailedPrecondition(f"backend {self.name!r} cannot adopt existing keys")

    def describe(self, record: KeyRecord) -> Mapping[str, str]:
        """Facts read from the device now (for example: is the key extractable)."""
        return {}

    def reload(self) -> None:  # noqa: B027 - optional hook
        """SIGHUP: re-read secrets from their files and lift refusals an operator
        must clear (a YubiKey whose PIN keyd stopped trying)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release devices and sessions at shutdown."""

    def warm_up(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Prepare for fast signing (load keys, open sessions). Called once in the
        background after the daemon is ready; requests do not wait for it."""
