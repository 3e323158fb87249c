"""Typed Python client for a running keyd.

    from keyd.client import Client
    from keyd.core import KeyType
    with Client() as keyd:                 # $KEYD_SOCKET or /run/keyd/keyd.sock
        key = keyd.create_key(KeyType.ECDSA_P256, role="timestamp")
        sig = keyd.sign(key.key_id, b"payload")
        assert key.public_key.verify(sig.signature, SignInput.of_message(b"payload"),
                                     sig.encoding)

Errors arrive as the keyd.errors types the daemon raised (NotFound,
InvalidArgument, ...); an unreachable daemon is Unavailable.
"""

from __future__ import annotations

import collections
import os
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyd import wire
from keyd.config import DEFAULT_SOCKET
from keyd.core import notice
from keyd.core.identity import Caller
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.model import KeyRecord
from keyd.errors import (
    Internal,
    InvalidArgument,
    KeydError,
    PermissionDenied,
    Unavailable,
    Unreachable,
)
from keyd.v1 import keyd_pb2 as pb
from keyd.v1 import keyd_pb2_grpc as pb_grpc

T = TypeVar("T")
M = TypeVar("M", bound=Message)

# Large enough for a 4 MiB payload plus framing (the daemon's default limit).
_MAX_MESSAGE = 64 * 1024 * 1024
_BATCH_BYTES = 512 * 1024


def default_socket() -> Path:
    return Path(os.environ.get("KEYD_SOCKET") or DEFAULT_SOCKET)


@dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes
    key_type: KeyType
    encoding: SignatureEncoding


@dataclass(frozen=True)
class SignItem:
    """One request of a batch: a message or a digest, for one key."""

    key_id: str
    message: bytes | None = None
    digest: bytes | None = None
    encoding: SignatureEncoding = SignatureEncoding.NATIVE


@dataclass(frozen=True)
class KeyDetails:
    record: KeyRecord
    # Read from the device at the time of the call (token keys: extractable...).
    device: Mapping[str, str]


@dataclass(frozen=True)
class BackendStatus:
    name: str
    healthy: bool
    detail: str
    keys: int
    state: str


@dataclass(frozen=True)
class DaemonStatus:
    version: str
    started_unix_ms: int
    keys: int
    backends: tuple[BackendStatus, ...]
    socket: str
    access_mode: str = ""
    audit_public_key: str = ""


def _request(item: SignItem) -> pb.SignRequest:
    if (item.message is None) == (item.digest is None):
        raise InvalidArgument("sign either a message or a digest, not both or neither")
    request = pb.SignRequest(key_id=item.key_id, encoding=wire.encoding_to_pb(item.encoding))
    if item.message is not None:
        request.message = item.message
    if item.digest is not None:
        request.digest = item.digest
    return request


def _signature(response: pb.SignResponse) -> Signature:
    return Signature(
        key_id=response.key_id,
        signature=response.signature,
        key_type=wire.key_type_from_pb(response.key_type),
        encoding=wire.encoding_from_pb(response.encoding),
    )


def translate_error(call: grpc.Call | grpc.aio.AioRpcError, socket: Path) -> KeydError:
    """The KeydError for a failed call to keyd: the daemon's own error class when it
    answered, Unavailable or PermissionDenied when it could not be reached."""
    code = call.code()
    details = call.details() or code.name
    # grpcio's stubs type sync and aio metadata differently; both are (key, value) pairs.
    metadata = typing.cast(tuple[tuple[str, str | bytes], ...], call.trailing_metadata() or ())
    kind = next((str(v) for k, v in metadata if k == wire.ERROR_KIND_KEY), "")
    if code is grpc.StatusCode.UNAVAILABLE and not kind and "Permission denied" in details:
        return PermissionDenied(
            f"permission denied on {socket}: your user must be in the socket's group "
            "(keyd by default)"
        )
    if code is grpc.StatusCode.UNAVAILABLE and not kind:
        return Unreachable(
            f"cannot reach keyd at {socket}: is the daemon running? "
            f"(set --socket or KEYD_SOCKET) [{details}]"
        )
    return wire.error_for(code, details, kind)


# Channel options for every client of keyd's socket.
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    # Long-lived clients (the Notary shim) find a restarted daemon within ~1 s
    # rather than after gRPC's default backoff of up to two minutes. Not
    # min_reconnect_backoff_ms: gRPC also takes it as the connect timeout, and a
    # busy daemon (just started, warming up) may take longer than that to answer.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class Client:
    def __init__(
        self, socket: str | os.PathLike[str] | None = None, *, timeout: float = 30.0
    ) -> None:
        self.socket = Path(socket) if socket is not None else default_socket()
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            f"unix:{self.socket}",
            options=list(CHANNEL_OPTIONS),
        )
        self._keys = pb_grpc.KeyServiceStub(self._channel)
        self._signer = pb_grpc.SignServiceStub(self._channel)
        self._status = pb_grpc.StatusServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _translate(self, error: grpc.RpcError) -> KeydError:
        return translate_error(typing.cast(grpc.Call, error), self.socket)

    def _call(self, fn: Callable[..., T], request: object) -> T:
        try:
            return fn(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise self._translate(error) from None

    def _watched(
        self,
        method: str,
        request: Message,
        response_type: type[M],
        on_touch: Callable[[str], None] | None,
    ) -> M:
        """A unary call whose initial metadata is read as soon as it comes: the daemon
        sends it early only to ask for a touch. (grpcio delivers a unary call's
        metadata with its response; the same call made as unary-stream, which is the
        same on the wire, delivers it on its own.)"""
        call = self._channel.unary_stream(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )(request, timeout=self.timeout)
        try:
            for key, value in call.initial_metadata() or ():
                if key == notice.TOUCH_KEY and on_touch is not None:
                    on_touch(str(value))
            responses: list[M] = list(call)
        except grpc.RpcError as error:
            raise self._translate(error) from None
        finally:
            call.cancel()  # type: ignore[no-untyped-call]  # a no-op once the call has ended; stops it if on_touch raised
        if len(responses) != 1:
            raise Internal(f"{method} answered with {len(responses)} messages, not one")
        return responses[0]

    # -- key management -----------------------------------------------------

    def create_key(
        self,
        key_type: KeyType,
        *,
        role: str = "",
        collection: str = "",
        labels: Mapping[str, str] | None = None,
        backend: str = "store",
        slot: str = "",
        on_touch: Callable[[str], None] | None = None,
    ) -> KeyRecord:
        request = pb.CreateKeyRequest(
            key_type=wire.key_type_to_pb(key_type),
            backend=backend,
            role=role,
            collection=collection,
            labels=dict(labels or {}),
            slot=slot,
        )
        if on_touch is None:
            return wire.key_from_pb(self._call(self._keys.CreateKey, request))
        return wire.key_from_pb(
            self._watched("/keyd.v1.KeyService/CreateKey", request, pb.Key, on_touch)
        )

    def get_key(self, key_id: str) -> KeyRecord:
        return self.key_details(key_id).record

    def key_details(self, key_id: str) -> KeyDetails:
        """The key's record and what its device says about it now."""
        message: pb.Key = self._call(self._keys.GetKey, pb.GetKeyRequest(key_id=key_id))
        return KeyDetails(wire.key_from_pb(message), dict(message.device))

    def adopt_key(
        self,
        *,
        backend: str,
        device_key_id: str = "",
        device_label: str = "",
        role: str = "",
        collection: str = "",
        labels: Mapping[str, str] | None = None,
        on_touch: Callable[[str], None] | None = None,
    ) -> KeyRecord:
        """Record a key that already exists on a device (PKCS#11: by CKA_ID hex or
        label; YubiKey: by slot)."""
        request = pb.AdoptKeyRequest(
            backend=backend,
            device_key_id=device_key_id,
            device_label=device_label,
            role=role,
            collection=collection,
            labels=dict(labels or {}),
        )
        if on_touch is None:
            return wire.key_from_pb(self._call(self._keys.AdoptKey, request))
        return wire.key_from_pb(
            self._watched("/keyd.v1.KeyService/AdoptKey", request, pb.Key, on_touch)
        )

    def list_keys(
        self,
        *,
        role: str = "",
        collection: str = "",
        backend: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> list[KeyRecord]:
        request = pb.ListKeysRequest(
            role=role, collection=collection, backend=backend, labels=dict(labels or {})
        )
        response: pb.ListKeysResponse = self._call(self._keys.ListKeys, request)
        return [wire.key_from_pb(k) for k in response.keys]

    def delete_key(self, key_id: str, *, destroy_on_device_confirmed: str = "") -> KeyRecord:
        """Move a key to pending deletion. To destroy a hardware key on its device when
        it is purged, pass its key ID again as destroy_on_device_confirmed."""
        request = pb.DeleteKeyRequest(
            key_id=key_id,
            destroy_on_device=bool(destroy_on_device_confirmed),
            confirm_key_id=destroy_on_device_confirmed,
        )
        response: pb.DeleteKeyResponse = self._call(self._keys.DeleteKey, request)
        return wire.key_from_pb(response.key)

    def restore_key(self, key_id: str) -> KeyRecord:
        request = pb.RestoreKeyRequest(key_id=key_id)
        return wire.key_from_pb(self._call(self._keys.RestoreKey, request))

    def purge_key(self, key_id: str) -> None:
        """Remove a key pending deletion now (admin)."""
        self._call(self._keys.PurgeKey, pb.PurgeKeyRequest(key_id=key_id))

    # -- signing --------------------------------------------------------------

    def sign(
        self,
        key_id: str,
        message: bytes | None = None,
        *,
        digest: bytes | None = None,
        encoding: SignatureEncoding = SignatureEncoding.NATIVE,
        on_touch: Callable[[str], None] | None = None,
    ) -> Signature:
        """`on_touch(device)` is called, before the signature comes, when the key's
        device waits for a touch (a YubiKey with a touch policy)."""
        request = _request(SignItem(key_id, message, digest, encoding))
        if on_touch is None:
            return _signature(self._call(self._signer.Sign, request))
        return _signature(
            self._watched("/keyd.v1.SignService/Sign", request, pb.SignResponse, on_touch)
        )

    def sign_batch(
        self, items: Iterable[SignItem], *, batch_size: int = 256, in_flight: int = 2
    ) -> Iterator[Signature | KeydError]:
        """Sign many items; yields, in order, a Signature or the error for each item
        (one bad item does not stop the others). Items go in SignBatch calls of up to
        `batch_size` items (and 512 KiB), `in_flight` calls at a time, so the daemon
        can sign on several cores while the next batch travels."""
        if in_flight <= 1:
            # A blocking call waits on its own completion queue in this thread; a future
            # is completed by the channel's polling thread and costs a thread hand-off
            # (~0.4 ms per call in a busy process, docs/performance.md).
            for batch in self._batches(items, batch_size):
                yield from self._results(self._call(self._signer.SignBatch, batch))
            return
        pending: collections.deque[grpc.Future[pb.SignBatchResponse]] = collections.deque()
        for batch in self._batches(items, batch_size):
            pending.append(self._signer.SignBatch.future(batch, timeout=self.timeout))
            if len(pending) >= in_flight:
                yield from self._batch_results(pending.popleft())
        while pending:
            yield from self._batch_results(pending.popleft())

    @staticmethod
    def _batches(items: Iterable[SignItem], batch_size: int) -> Iterator[pb.SignBatchRequest]:
        batch: list[pb.SignRequest] = []
        size = 0
        for item in items:
            batch.append(_request(item))
            size += len(item.message or item.digest or b"")
            if len(batch) >= batch_size or size >= _BATCH_BYTES:
                yield pb.SignBatchRequest(requests=batch)
                batch, size = [], 0
        if batch:
            yield pb.SignBatchRequest(requests=batch)

    def _batch_results(
        self, future: grpc.Future[pb.SignBatchResponse]
    ) -> Iterator[Signature | KeydError]:
        try:
            response: pb.SignBatchResponse = future.result()
        except grpc.RpcError as error:
            raise self._translate(error) from None
        return self._results(response)

    @staticmethod
    def _results(response: pb.SignBatchResponse) -> Iterator[Signature | KeydError]:
        for result in response.results:
            if result.WhichOneof("result") == "signature":
                yield _signature(result.signature)
            else:
                code = wire.code_from_number(result.error.code)
                yield wire.error_for(code, result.error.message, result.error.kind)

    # -- status -----------------------------------------------------------------

    def status(self) -> DaemonStatus:
        response: pb.GetStatusResponse = self._call(self._status.GetStatus, pb.GetStatusRequest())
        return DaemonStatus(
            version=response.version,
            started_unix_ms=response.started_unix_ms,
            keys=response.keys,
            backends=tuple(
                BackendStatus(b.name, b.healthy, b.detail, b.keys, b.state)
                for b in response.backends
            ),
            socket=response.socket,
            access_mode=response.access_mode,
            audit_public_key=response.audit_public_key,
        )

    def check_serving(self) -> None:
        """Raise unless keyd answers the standard gRPC health check with SERVING. Needs
        no permission and leaves no audit record: for watchdogs that poll."""
        response: health_pb2.HealthCheckResponse = self._call(
            self._health.Check, health_pb2.HealthCheckRequest()
        )
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise Unavailable(f"keyd at {self.socket} is not serving (shutting down?)")

    def whoami(self) -> Caller:
        """The caller as the daemon identified it (kernel credentials at connect time)."""
        response: pb.WhoAmIResponse = self._call(self._status.WhoAmI, pb.WhoAmIRequest())
        return wire.caller_from_pb(response)
