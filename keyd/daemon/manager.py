"""KeyManager: what the daemon does, independent of gRPC.

It routes each key to its backend, enforces limits, and makes sure a request
either completes or leaves nothing behind (no catalog row without its key).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from keyd.backends.base import Backend, BackendHealth
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.model import (
    KeyRecord,
    KeySelector,
    KeyState,
    check_collection,
    check_key_id,
    check_labels,
    check_role,
)
from keyd.core.signing import SignInput, der_to_raw
from keyd.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    KeydError,
    PayloadTooLarge,
    ResourceExhausted,
    Unavailable,
)
from keyd.store.catalog import Catalog

log = logging.getLogger("keyd.manager")


@dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes
    key_type: KeyType
    encoding: SignatureEncoding


class _InFlight:
    """A non-blocking counter: refuse rather than queue when a backend is saturated."""

    def __init__(self, backend: str, limit: int) -> None:
        self._backend = backend
        self._slots = threading.BoundedSemaphore(limit)
        self._limit = limit

    def __enter__(self) -> None:
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"backend {self._backend!r} already has {self._limit} requests in flight; "
                "retry shortly"
            )

    def __exit__(self, *exc: object) -> None:
        self._slots.release()


class _NoLimit:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class KeyManager:
    def __init__(
        self,
        catalog: Catalog,
        backends: Mapping[str, Backend],
        *,
        verify_store_signatures: bool,
        max_payload_bytes: int,
    ) -> None:
        self._catalog = catalog
        self._backends = dict(backends)
        self._verify_store = verify_store_signatures
        self._max_payload = max_payload_bytes
        self._limits: dict[str, _InFlight | _NoLimit] = {
            name: _InFlight(name, b.max_in_flight) if b.max_in_flight else _NoLimit()
            for name, b in self._backends.items()
        }

    # -- key management -------------------------------------------------------

    def _backend(self, name: str) -> Backend:
        backend = self._backends.get(name)
        if backend is None:
            known = ", ".join(sorted(self._backends))
            raise InvalidArgument(f"unknown backend {name!r}; this daemon has: {known}")
        return backend

    def create(
        self,
        key_type: KeyType,
        *,
        backend: str = "store",
        role: str = "",
        collection: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> KeyRecord:
        check_role(role)
        check_collection(collection)
        checked_labels = check_labels(labels or {})
        chosen = self._backend(backend)
        generated = chosen.generate(key_type)
        record = KeyRecord(
            public_key=generated.public_key,
            backend=chosen.name,
            location=generated.location,
            role=role,
            collection=collection,
            labels=checked_labels,
        )
        try:
            record = self._catalog.add(record, generated.private_pkcs8)
        except BaseException:
            # The catalog never learnt of it: take it off the device too.
            if generated.private_pkcs8 is None:
                _best_effort_delete(chosen, record)
            raise
        log.info(
            "key created",
            extra={"key_id": record.key_id, "key_type": key_type.value, "backend": chosen.name},
        )
        return record

    def get(self, key_id: str) -> KeyRecord:
        return self._catalog.get(check_key_id(key_id))

    def select(self, selector: KeySelector) -> list[KeyRecord]:
        return self._catalog.select(selector)

    def delete(self, key_id: str) -> None:
        record = self._catalog.remove(check_key_id(key_id))
        # Catalog first: a failure after this leaves an orphan on a device, never a
        # catalog row that points at nothing.
        self._backends[record.backend].delete(record)
        log.info("key deleted", extra={"key_id": key_id, "backend": record.backend})

    # -- signing ----------------------------------------------------------------

    def sign(self, key_id: str, data: SignInput, encoding: SignatureEncoding) -> Signature:
        if data.size > self._max_payload:
            raise PayloadTooLarge(
                f"payload is {data.size} bytes; the limit is {self._max_payload} "
                "([server] max_payload_bytes). Send a digest instead of the message"
            )
        record = self._catalog.get(check_key_id(key_id))
        if record.state is not KeyState.ACTIVE:
            raise FailedPrecondition(f"key {key_id} is {record.state.value}; it cannot sign")
        key_type = record.key_type
        resolved = encoding.resolve(key_type)
        data.check_for(key_type)
        backend = self._backends.get(record.backend)
        if backend is None:
            raise Unavailable(f"key {key_id} lives on backend {record.backend!r}, not configured")
        with self._limits[backend.name]:
            signature = backend.sign(record, data)
        if (backend.always_verify or self._verify_store) and not record.public_key.verify(
            signature, data, SignatureEncoding.DER if key_type.is_ecdsa else resolved
        ):
            log.error("signature failed verification", extra={"key_id": key_id})
            raise Internal(
                f"backend {backend.name!r} returned a signature that does not verify "
                f"with key {key_id}; nothing was returned. Check the device"
            )
        if resolved is SignatureEncoding.RAW:
            signature = der_to_raw(signature, key_type)
        return Signature(key_id, signature, key_type, resolved)

    # -- status -----------------------------------------------------------------

    def key_count(self) -> int:
        return len(self._catalog)

    def health(self) -> list[tuple[BackendHealth, int]]:
        result = []
        for name, backend in sorted(self._backends.items()):
            try:
                health = backend.health()
            except KeydError as exc:
                health = BackendHealth(name, False, exc.message)
            result.append((health, self._catalog.count(name)))
        return result


def _best_effort_delete(backend: Backend, record: KeyRecord) -> None:
    try:
        backend.delete(record)
    except KeydError as exc:
        log.error(
            "could not remove a key that was never recorded",
            extra={"key_id": record.key_id, "backend": backend.name, "error": exc.message},
        )
