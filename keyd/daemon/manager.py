"""KeyManager: what the daemon does, independent of gRPC.

It routes each key to its backend, enforces limits, and makes sure a request
either completes or leaves nothing behind (no catalog row without its key).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

from keyd.backends.base import Backend, BackendHealth, DeviceKeyRef, GeneratedKey
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
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from keyd.store.catalog import Catalog

log = logging.getLogger("keyd.manager")

_NO_PLANS: dict[SignatureEncoding, _SigningPlan] = {}


class Signature(NamedTuple):
    # A NamedTuple, not a dataclass: one is built per signature on the batch path.
    key_id: str
    signature: bytes
    key_type: KeyType
    encoding: SignatureEncoding


class SignItem(NamedTuple):
    key_id: str
    data: SignInput
    encoding: SignatureEncoding


SignOutcome = Signature | KeydError


class _InFlight:
    """A non-blocking counter: refuse rather than queue when a backend is saturated."""

    def __init__(self, backend: str, limit: int) -> None:
        self._backend = backend
        self._slots = threading.BoundedSemaphore(limit)
        self.size = limit

    def __enter__(self) -> None:
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"backend {self._backend!r} already has {self.size} requests in flight; "
                "retry shortly"
            )

    def __exit__(self, *exc: object) -> None:
        self._slots.release()


class _SigningPlan:
    """Signs with one key in one encoding. Built once per key and encoding, so the
    per-request work is a length check, the signature, and (when configured) its
    verification and conversion to r||s."""

    __slots__ = ("_backend", "_digest_size", "_limit", "_raw", "_verify", "encoding", "record")

    def __init__(
        self,
        record: KeyRecord,
        backend: Backend,
        encoding: SignatureEncoding,
        *,
        verify: bool,
        limit: _InFlight | None,
    ) -> None:
        self.record = record
        self.encoding = encoding
        self._backend = backend
        self._verify = verify
        self._limit = limit
        self._raw = encoding is SignatureEncoding.RAW
        self._digest_size = record.key_type.digest_size

    def sign(self, inputs: Sequence[SignInput], *, prehashed: bool) -> list[SignOutcome]:
        """Sign inputs that are all messages, or all digests (prehashed)."""
        outcomes: list[SignOutcome | None] = [None] * len(inputs)
        todo: list[int] = []
        for i, data in enumerate(inputs):
            try:
                self._check(data)
            except KeydError as exc:
                outcomes[i] = exc
                continue
            todo.append(i)
        if todo:
            signatures = self._backend_sign([inputs[i].payload for i in todo], prehashed)
            for i, signature in zip(todo, signatures, strict=True):
                outcomes[i] = self._finish(inputs[i], signature)
        return outcomes  # type: ignore[return-value]  # every slot is filled above

    def sign_one(self, data: SignInput) -> Signature:
        """The unary path: the same steps as sign(), without the batch bookkeeping."""
        self._check(data)
        (signature,) = self._backend_sign((data.payload,), data.prehashed)
        outcome = self._finish(data, signature)
        if isinstance(outcome, KeydError):
            raise outcome
        return outcome

    def _check(self, data: SignInput) -> None:
        # The common case costs one comparison; check_for explains anything else.
        if (len(data.payload) != self._digest_size) if data.prehashed else not data.payload:
            data.check_for(self.record.key_type)

    def _backend_sign(self, payloads: Sequence[bytes], prehashed: bool) -> list[bytes]:
        if self._limit is None:
            return self._backend.sign(self.record, payloads, prehashed=prehashed)
        with self._limit:
            return self._backend.sign(self.record, payloads, prehashed=prehashed)

    def _finish(self, data: SignInput, signature: bytes) -> SignOutcome:
        record = self.record
        key_type = record.key_type
        if self._verify and not record.public_key.verify(
            signature, data, SignatureEncoding.DER if key_type.is_ecdsa else self.encoding
        ):
            log.error("signature failed verification", extra={"key_id": record.key_id})
            return Internal(
                f"backend {self._backend.name!r} returned a signature that does not verify "
                f"with key {record.key_id}; nothing was returned. Check the device"
            )
        if self._raw:
            signature = der_to_raw(signature, key_type)
        return Signature(record.key_id, signature, key_type, self.encoding)


@dataclass(frozen=True)
class Scope:
    """What callers on a restricted socket may reach. Keys outside it do not exist
    for them (NOT_FOUND, as for an unknown ID); creating one is PERMISSION_DENIED."""

    name: str
    backends: frozenset[str]
    roles: frozenset[str]
    need_collection: bool

    def allows(self, record: KeyRecord) -> bool:
        # A key pending deletion is gone for a restricted caller (Notary's DeleteKey
        # is then idempotent); restoring it is for the main socket.
        return (
            record.state is KeyState.ACTIVE
            and record.backend in self.backends
            and record.role in self.roles
            and (bool(record.collection) or not self.need_collection)
        )

    def check_create(self, backend: str, role: str, collection: str) -> None:
        if backend not in self.backends or role not in self.roles:
            raise PermissionDenied(
                f"the {self.name} socket may only create {' or '.join(sorted(self.roles))} keys "
                f"on backend {' or '.join(sorted(self.backends))}"
            )
        if self.need_collection and not collection:
            raise PermissionDenied(f"the {self.name} socket needs a collection for every key")


# The Notary shim's reach: online keys of Notary collections, never root, targets
# or anything on hardware.
NOTARY_SCOPE = Scope(
    name="notary",
    backends=frozenset({"store"}),
    roles=frozenset({"timestamp", "snapshot"}),
    need_collection=True,
)


class KeyManager:
    def __init__(
        self,
        catalog: Catalog,
        backends: Mapping[str, Backend],
        *,
        verify_store_signatures: bool,
        max_payload_bytes: int,
        deletion_window_seconds: float = 7 * 86400,
    ) -> None:
        self._catalog = catalog
        self._backends = dict(backends)
        self._verify_store = verify_store_signatures
        self._max_payload = max_payload_bytes
        self._deletion_window = deletion_window_seconds
        self._limits: dict[str, _InFlight | None] = {
            name: _InFlight(name, b.max_in_flight) if b.max_in_flight else None
            for name, b in self._backends.items()
        }
        # Signing plans per key ID and requested encoding (see _plan).
        self._plans: dict[str, dict[SignatureEncoding, _SigningPlan]] = {}
        self._plans_lock = threading.Lock()
        # Deletion, restoration and purging of a key happen one at a time, each on the
        # key's current state (a restore and a purge never both win).
        self._lifecycle = threading.Lock()
        self._scope: Scope | None = None

    def scoped(self, scope: Scope) -> KeyManager:
        """A view of this manager (same keys, backends, limits) restricted to `scope`."""
        view = copy.copy(self)
        view._scope = scope
        return view

    def _visible(self, record: KeyRecord) -> KeyRecord:
        if self._scope is not None and not self._scope.allows(record):
            raise NotFound(
                f"no key with ID {record.key_id}; `keyd keys list` shows the keys keyd has"
            )
        return record

    # -- key management -------------------------------------------------------

    def backend_name(self, name: str) -> str:
        """The full name a request's backend stands for ("pkcs11" -> "pkcs11:hsm"), for
        the policy; a name that resolves to nothing is returned as given (create()
        explains the problem, after the caller's scope is checked)."""
        try:
            return self._backend(name).name
        except InvalidArgument:
            return name

    def _backend(self, name: str) -> Backend:
        backend = self._backends.get(name)
        if backend is not None:
            return backend
        # A family name ("pkcs11") stands for its only member ("pkcs11:hsm").
        family = [b for n, b in self._backends.items() if n.startswith(name + ":")]
        if len(family) == 1:
            return family[0]
        known = ", ".join(sorted(self._backends))
        if family:
            raise InvalidArgument(f"backend {name!r} is ambiguous; choose one of: {known}")
        raise InvalidArgument(f"unknown backend {name!r}; this daemon has: {known}")

    def create(
        self,
        key_type: KeyType,
        *,
        backend: str = "store",
        role: str = "",
        collection: str = "",
        labels: Mapping[str, str] | None = None,
        slot: str = "",
    ) -> KeyRecord:
        check_role(role)
        check_collection(collection)
        checked_labels = check_labels(labels or {})
        if self._scope is not None:
            # Before resolving the name: an unknown-backend error lists every backend.
            self._scope.check_create(backend, role, collection)
        chosen = self._backend(backend)
        if slot and not chosen.slotted:
            raise InvalidArgument(f"backend {chosen.name!r} has no slots to choose; leave slot out")
        with self._limited(chosen):
            generated = chosen.generate(key_type, role=role, slot=slot)
        record = self._record(chosen, generated, role, collection, checked_labels)
        log.info(
            "key created",
            extra={"key_id": record.key_id, "key_type": key_type.value, "backend": chosen.name},
        )
        return record

    def adopt(
        self,
        ref: DeviceKeyRef,
        *,
        backend: str,
        role: str = "",
        collection: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> KeyRecord:
        """Record a key that already exists on a device (made in a ceremony elsewhere)."""
        if self._scope is not None:
            raise PermissionDenied(f"the {self._scope.name} socket may not adopt keys")
        check_role(role)
        check_collection(collection)
        checked_labels = check_labels(labels or {})
        chosen = self._backend(backend)
        with self._limited(chosen):
            generated = chosen.adopt(ref)
        record = self._record(chosen, generated, role, collection, checked_labels, adopted=True)
        log.info("key adopted", extra={"key_id": record.key_id, "backend": chosen.name})
        return record

    def _record(
        self,
        chosen: Backend,
        generated: GeneratedKey,
        role: str,
        collection: str,
        labels: Mapping[str, str],
        *,
        adopted: bool = False,
    ) -> KeyRecord:
        record = KeyRecord(
            public_key=generated.public_key,
            backend=chosen.name,
            location=generated.location,
            role=role,
            collection=collection,
            labels=labels,
        )
        try:
            return self._catalog.add(record, generated.private_pkcs8)
        except BaseException:
            # The catalog never learnt of a new key: take it off the device too.
            # An adopted key was there before keyd and stays.
            if generated.private_pkcs8 is None and not adopted:
                _best_effort_discard(chosen, record)
            raise

    def _limited(self, backend: Backend) -> AbstractContextManager[None]:
        """A device's in-flight limit, for management calls as for signing."""
        return self._limits.get(backend.name) or contextlib.nullcontext()

    def get(self, key_id: str) -> KeyRecord:
        return self._visible(self._catalog.get(check_key_id(key_id)))

    def describe(self, key_id: str) -> tuple[KeyRecord, Mapping[str, str]]:
        """The record and what its device says about the key now."""
        record = self.get(key_id)
        backend = self._backends.get(record.backend)
        if backend is None:
            return record, {"device_status": f"backend {record.backend!r} is not configured"}
        with self._limited(backend):
            return record, backend.describe(record)

    def select(self, selector: KeySelector) -> list[KeyRecord]:
        records = self._catalog.select(selector)
        if self._scope is not None:
            records = [r for r in records if self._scope.allows(r)]
        return records

    def delete(self, key_id: str, *, destroy_on_device: bool = False) -> KeyRecord:
        """Move a key to pending deletion: it stops signing at once and can be restored
        until its window ends, when purge_due() removes it."""
        with self._lifecycle:
            return self._delete(key_id, destroy_on_device)

    def _delete(self, key_id: str, destroy_on_device: bool) -> KeyRecord:
        record = self.get(key_id)  # NOT_FOUND for keys outside this view's scope
        if record.state is KeyState.PENDING_DELETION:
            raise FailedPrecondition(
                f"key {key_id} is already pending deletion; `keyd keys restore` brings it "
                "back, `keyd keys purge` removes it now"
            )
        if destroy_on_device and record.backend == "store":
            raise InvalidArgument("store keys are always destroyed at purge; drop the flag")
        purge_after = int(time.time() * 1000) + int(self._deletion_window * 1000)
        with self._plans_lock:
            # Under the plans lock: a plan built concurrently is not kept (see _plan).
            record = self._catalog.set_state(
                key_id,
                KeyState.PENDING_DELETION,
                purge_after_unix_ms=purge_after,
                destroy_on_purge=destroy_on_device,
            )
            self._plans.pop(key_id, None)
        log.info(
            "key pending deletion",
            extra={"key_id": key_id, "purge_after_ms": purge_after, "destroy": destroy_on_device},
        )
        return record

    def restore(self, key_id: str) -> KeyRecord:
        self.get(key_id)  # NOT_FOUND for keys outside this view's scope
        with self._lifecycle:
            if self._catalog.get(key_id).state is not KeyState.PENDING_DELETION:
                raise FailedPrecondition(f"key {key_id} is not pending deletion")
            record = self._catalog.set_state(key_id, KeyState.ACTIVE)
        log.info("key restored", extra={"key_id": key_id})
        return record

    def purge(self, key_id: str) -> None:
        """Remove a key pending deletion now, without waiting for its window."""
        self.get(key_id)
        with self._lifecycle:
            record = self._catalog.get(key_id)  # now, under the lock
            if record.state is not KeyState.PENDING_DELETION:
                raise FailedPrecondition(
                    f"key {key_id} is not pending deletion; delete it first (`keyd keys delete`)"
                )
            self._purge(record)

    def purge_due(
        self,
        now_ms: int | None = None,
        *,
        record: Callable[[KeyRecord, str], None] | None = None,
    ) -> list[str]:
        """Purge every key whose deletion window has ended; returns their IDs.
        `record(key, "started")` runs first for each key (the audit record; if it
        raises, the key stays pending until the next round), then `record(key,
        outcome)` with "ok" or the error kind."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        due = [
            r
            for r in self._catalog.select(KeySelector())
            if r.state is KeyState.PENDING_DELETION and r.purge_after_unix_ms <= now_ms
        ]
        purged = []
        for candidate in due:
            with self._lifecycle:
                # Again, now: it may have been restored or purged since the list was made.
                key = self._catalog.find(candidate.key_id)
                if key is None or key.state is not KeyState.PENDING_DELETION:
                    continue
                try:
                    if record is not None:
                        record(key, "started")
                    self._purge(key)
                except KeydError as exc:
                    log.error("purge failed", extra={"key_id": key.key_id, "error": exc.message})
                    _best_effort(record, key, type(exc).__name__)
                    continue
                _best_effort(record, key, "ok")
            purged.append(key.key_id)
        return purged

    def _purge(self, record: KeyRecord) -> None:
        backend = self._backends.get(record.backend)
        if record.destroy_on_purge:
            if backend is None:
                raise Unavailable(
                    f"key {record.key_id} must be destroyed on backend {record.backend!r}, "
                    "which is not configured; it stays pending"
                )
            # Device first: if destroying fails, the key stays pending and is retried.
            with self._limited(backend):
                backend.destroy(record)
        self._catalog.remove(record.key_id)
        # Catalog first for a plain forget: a failure after this leaves an orphan on a
        # device, never a catalog row that points at nothing.
        if backend is not None and not record.destroy_on_purge:
            backend.delete(record)
        log.info(
            "key purged",
            extra={
                "key_id": record.key_id,
                "backend": record.backend,
                "destroyed": record.destroy_on_purge or record.backend == "store",
            },
        )

    # -- signing ----------------------------------------------------------------

    def sign(self, key_id: str, data: SignInput, encoding: SignatureEncoding) -> Signature:
        self._check_size(data)
        if self._scope is not None:
            self.get(key_id)  # first: a hidden key's state or backend must not show
        signature = self._get_plan(key_id, encoding).sign_one(data)
        self._check_still_active(key_id)
        return signature

    def _check_still_active(self, key_id: str) -> None:
        """After signing: a key deleted while its signature was being made gives no
        signature (deletion takes effect for every request that has not finished)."""
        if not self._catalog.is_active(key_id):
            raise FailedPrecondition(
                f"key {key_id} was deleted while signing; the signature was discarded"
            )

    def _check_size(self, data: SignInput) -> None:
        size = len(data.payload)
        if size > self._max_payload:
            raise PayloadTooLarge(
                f"payload is {size} bytes; the limit is {self._max_payload} "
                "([server] max_payload_bytes). Send a digest instead of the message"
            )

    def _get_plan(self, key_id: str, encoding: SignatureEncoding) -> _SigningPlan:
        plan = self._plans.get(key_id, _NO_PLANS).get(encoding)
        return plan if plan is not None else self._plan(key_id, encoding)

    def sign_batch(self, items: Sequence[SignItem]) -> list[SignOutcome]:
        """Sign many items; one outcome (a Signature or the error) per item, in order.
        Items for the same key, encoding and input kind are signed in one backend call."""
        outcomes: list[SignOutcome | None] = [None] * len(items)
        groups: dict[tuple[str, SignatureEncoding, bool], list[int]] = {}
        for i, item in enumerate(items):
            try:
                self._check_size(item.data)
            except PayloadTooLarge as exc:
                outcomes[i] = exc
                continue
            groups.setdefault((item.key_id, item.encoding, item.data.prehashed), []).append(i)
        for (key_id, encoding, prehashed), indices in groups.items():
            try:
                if self._scope is not None:
                    self.get(key_id)
                plan = self._get_plan(key_id, encoding)
                results = plan.sign([items[i].data for i in indices], prehashed=prehashed)
                self._check_still_active(key_id)
            except KeydError as exc:
                results = [exc] * len(indices)
            for i, outcome in zip(indices, results, strict=True):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]  # every slot is filled above

    def _plan(self, key_id: str, encoding: SignatureEncoding) -> _SigningPlan:
        """Everything about signing with this key that does not change per request,
        checked once and kept until the key is deleted."""
        record = self._catalog.get(check_key_id(key_id))
        if record.state is not KeyState.ACTIVE:
            raise FailedPrecondition(
                f"key {key_id} is {record.state.value.replace('_', ' ')}; it cannot sign "
                "(`keyd keys restore` brings it back)"
            )
        resolved = encoding.resolve(record.key_type)
        backend = self._backends.get(record.backend)
        if backend is None:
            raise Unavailable(f"key {key_id} lives on backend {record.backend!r}, not configured")
        limit = self._limits[backend.name]
        plan = _SigningPlan(
            record,
            backend,
            resolved,
            verify=backend.always_verify or self._verify_store,
            limit=limit if isinstance(limit, _InFlight) else None,
        )
        with self._plans_lock:
            current = self._catalog.get(key_id) if key_id in self._catalog else None
            if current is not None and current.state is KeyState.ACTIVE:  # not deleted meanwhile
                self._plans.setdefault(key_id, {})[encoding] = plan
        return plan

    # -- status -----------------------------------------------------------------

    def warm_up(self) -> None:
        for name, backend in self._backends.items():
            try:
                backend.warm_up()
            except KeydError as exc:
                log.error("warm-up failed", extra={"backend": name, "error": exc.message})
            except Exception:
                log.exception("warm-up failed", extra={"backend": name})

    def reload_backends(self) -> None:
        for name, backend in self._backends.items():
            try:
                backend.reload()
            except KeydError as exc:
                log.error("reload failed", extra={"backend": name, "error": exc.message})

    def blocking_threads(self) -> int:
        """Threads that backends may hold while they wait on a device: the server
        adds these to its CPU workers so a slow device never takes the store's."""
        return sum(limit.size for limit in self._limits.values() if limit is not None)

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()

    def key_count(self) -> int:
        if self._scope is not None:
            return len(self.select(KeySelector()))
        return len(self._catalog)

    def health(self) -> list[tuple[BackendHealth, int]]:
        """Each backend's health and key count; a scoped view sees its backends only
        (a token's label and serial are none of the notary socket's business)."""
        result = []
        for name, backend in sorted(self._backends.items()):
            if self._scope is not None and name not in self._scope.backends:
                continue
            try:
                health = backend.health()
            except KeydError as exc:
                health = BackendHealth(name, False, exc.message, "error")
            except Exception:
                # One backend's bug must not hide the others' status.
                log.exception("health check failed", extra={"backend": name})
                health = BackendHealth(name, False, "health check failed; see the log", "error")
            if self._scope is None:
                count = self._catalog.count(name)
            else:
                count = len(self.select(KeySelector(backend=name)))
            result.append((health, count))
        return result


def _best_effort(
    record: Callable[[KeyRecord, str], None] | None, key: KeyRecord, result: str
) -> None:
    """An outcome record after the act: the act stands whether or not it is written."""
    if record is None:
        return
    try:
        record(key, result)
    except KeydError as exc:
        log.error("purge outcome not recorded", extra={"key_id": key.key_id, "error": exc.message})


def _best_effort_discard(backend: Backend, record: KeyRecord) -> None:
    try:
        backend.destroy(record)
    except KeydError as exc:
        log.error(
            "could not remove a key that was never recorded",
            extra={"key_id": record.key_id, "backend": backend.name, "error": exc.message},
        )
