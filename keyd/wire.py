"""Conversions between keyd's core types and its protobuf messages, and the one
table that maps error kinds to gRPC status codes (used by server and client)."""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from keyd import errors
from keyd.core.identity import Caller
from keyd.core.keys import PublicKey
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.model import KeyRecord, KeyState
from keyd.core.signing import SignInput
from keyd.errors import InvalidArgument, KeydError
from keyd.v1 import keyd_pb2 as pb

# The one mapping of error kinds to status codes. Order matters: the first
# entry the exception is an instance of wins (subclasses before their bases).
STATUS_CODES: tuple[tuple[type[KeydError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.KeydError, grpc.StatusCode.INTERNAL),
)

_ERROR_FOR_CODE: dict[grpc.StatusCode, type[KeydError]] = {
    code: kind for kind, code in reversed(STATUS_CODES)
}
_ERROR_FOR_CODE[grpc.StatusCode.INTERNAL] = errors.Internal
_ERROR_FOR_CODE[grpc.StatusCode.DEADLINE_EXCEEDED] = errors.Unavailable
_ERROR_FOR_CODE[grpc.StatusCode.CANCELLED] = errors.Unavailable

_CODE_NUMBER = {code: int(code.value[0]) for code in grpc.StatusCode}
_CODE_BY_NUMBER = {number: code for code, number in _CODE_NUMBER.items()}


# Trailing metadata naming the exact error class, so the client can raise the
# same subclass (PayloadTooLarge, not just InvalidArgument) and can tell the
# daemon's own UNAVAILABLE from a transport failure (no metadata).
ERROR_KIND_KEY = "keyd-error-kind"
_KINDS: dict[str, type[KeydError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, KeydError)
}


def status_code(exc: KeydError) -> grpc.StatusCode:
    for kind, code in STATUS_CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL  # pragma: no cover - KeydError is the last entry


def error_for(code: grpc.StatusCode, message: str, kind: str = "") -> KeydError:
    """The KeydError for a status; `kind` (from trailing metadata) picks the exact class."""
    cls = _KINDS.get(kind)
    if cls is not None and status_code(cls(message)) is code:
        return cls(message)
    return _ERROR_FOR_CODE.get(code, errors.Internal)(message)


def code_number(code: grpc.StatusCode) -> int:
    return _CODE_NUMBER[code]


def code_from_number(number: int) -> grpc.StatusCode:
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


_KEY_TYPES = {
    KeyType.ECDSA_P256: pb.KEY_TYPE_ECDSA_P256,
    KeyType.ED25519: pb.KEY_TYPE_ED25519,
    KeyType.ECDSA_P384: pb.KEY_TYPE_ECDSA_P384,
    KeyType.RSA_3072: pb.KEY_TYPE_RSA_3072,
}
_KEY_TYPES_BACK = {v: k for k, v in _KEY_TYPES.items()}

_ENCODINGS = {
    SignatureEncoding.NATIVE: pb.SIGNATURE_ENCODING_UNSPECIFIED,
    SignatureEncoding.DER: pb.SIGNATURE_ENCODING_DER,
    SignatureEncoding.RAW: pb.SIGNATURE_ENCODING_RAW,
}
_ENCODINGS_BACK = {v: k for k, v in _ENCODINGS.items()}

_STATES = {
    KeyState.ACTIVE: pb.KEY_STATE_ACTIVE,
    KeyState.PENDING_DELETION: pb.KEY_STATE_PENDING_DELETION,
}
_STATES_BACK = {v: k for k, v in _STATES.items()}


def key_type_to_pb(key_type: KeyType) -> pb.KeyType.ValueType:
    return _KEY_TYPES[key_type]


def key_type_from_pb(value: int) -> KeyType:
    try:
        return _KEY_TYPES_BACK[value]  # type: ignore[index]
    except KeyError:
        choices = ", ".join(t.value for t in KeyType)
        raise InvalidArgument(f"unsupported or missing key type ({value}); use {choices}") from None


def encoding_to_pb(encoding: SignatureEncoding) -> pb.SignatureEncoding.ValueType:
    return _ENCODINGS[encoding]


def encoding_from_pb(value: int) -> SignatureEncoding:
    try:
        return _ENCODINGS_BACK[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(f"unsupported signature encoding ({value}); use DER or RAW") from None


def key_to_pb(record: KeyRecord, device: Mapping[str, str] | None = None) -> pb.Key:
    public = record.public_key
    return pb.Key(
        device=dict(device or {}),
        key_id=record.key_id,
        tuf_key_id=public.tuf_key_id,
        key_type=key_type_to_pb(record.key_type),
        public_key=public.notary_bytes,
        public_key_pem=public.pem,
        backend=record.backend,
        location=dict(record.location),
        role=record.role,
        collection=record.collection,
        labels=dict(record.labels),
        created_unix_ms=record.created_unix_ms,
        state=_STATES[record.state],
        tuf_keytype=record.key_type.tuf_keytype,
        tuf_scheme=record.key_type.tuf_scheme,
        purge_after_unix_ms=record.purge_after_unix_ms,
        destroy_on_purge=record.destroy_on_purge,
    )


def key_from_pb(message: pb.Key) -> KeyRecord:
    """Rebuild a record from the wire; the key ID is recomputed and must agree."""
    key_type = key_type_from_pb(message.key_type)
    record = KeyRecord(
        public_key=PublicKey.from_notary_bytes(key_type, message.public_key),
        backend=message.backend,
        location=dict(message.location),
        role=message.role,
        collection=message.collection,
        labels=dict(message.labels),
        created_unix_ms=message.created_unix_ms,
        # An unknown (newer) state is never taken for active.
        state=_STATES_BACK.get(message.state, KeyState.PENDING_DELETION),
        purge_after_unix_ms=message.purge_after_unix_ms,
        destroy_on_purge=message.destroy_on_purge,
    )
    if record.key_id != message.key_id:
        raise errors.Internal(f"daemon sent key {message.key_id} with another key's public key")
    return record


def sign_input_from_pb(request: pb.SignRequest) -> SignInput:
    which = request.WhichOneof("input")
    if which == "message":
        return SignInput(request.message, False)
    if which == "digest":
        return SignInput(request.digest, True)
    raise InvalidArgument("nothing to sign: set message or digest")


def caller_to_pb(caller: Caller) -> pb.WhoAmIResponse:
    return pb.WhoAmIResponse(
        uid=caller.uid,
        gid=caller.gid,
        pid=caller.pid,
        groups=sorted(caller.groups),
        user=caller.user,
        executable=caller.exe,
        socket=caller.socket,
    )


def caller_from_pb(message: pb.WhoAmIResponse) -> Caller:
    return Caller(
        uid=message.uid,
        gid=message.gid,
        pid=message.pid,
        groups=frozenset(message.groups),
        user=message.user,
        exe=message.executable,
        socket=message.socket,
    )
