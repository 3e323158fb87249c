"""gRPC servicers for keyd.v1: translate messages, call the KeyManager, map errors.

Every handler goes through _rpc, the one place where KeydError becomes a status
code (via keyd.wire.STATUS_CODES) and anything unexpected becomes INTERNAL with
the details kept in the daemon's log.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc

from keyd import __version__, wire
from keyd.audit import digest_payload
from keyd.backends.base import DeviceKeyRef
from keyd.core import notice
from keyd.core.identity import Operation
from keyd.core.model import KeySelector
from keyd.daemon.access import Gate, Request, item_result
from keyd.daemon.manager import Signature, SignItem, SignOutcome
from keyd.errors import FailedPrecondition, InvalidArgument, KeydError, Unavailable
from keyd.v1 import keyd_pb2 as pb
from keyd.v1 import keyd_pb2_grpc as pb_grpc

log = logging.getLogger("keyd.api")

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _abort(context: grpc.ServicerContext, exc: KeydError) -> NoReturn:
    context.set_trailing_metadata(((wire.ERROR_KIND_KEY, type(exc).__name__),))
    context.abort(wire.status_code(exc), exc.message)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


def _internal(context: grpc.ServicerContext, method: str) -> NoReturn:
    log.exception("unexpected error", extra={"method": method})
    context.abort(grpc.StatusCode.INTERNAL, "internal error in keyd; see the daemon's log")
    raise AssertionError("unreachable")  # pragma: no cover


def _rpc(
    method: Callable[[Any, Req, grpc.ServicerContext], Resp],
) -> Callable[[Any, Req, grpc.ServicerContext], Resp]:
    @functools.wraps(method)
    def handler(self: Any, request: Req, context: grpc.ServicerContext) -> Resp:
        listening = notice.listen(_TouchNotice(context))
        try:
            return method(self, request, context)
        except KeydError as exc:
            _abort(context, exc)
        except Exception:  # noqa: BLE001 - last resort: log it, tell the caller INTERNAL
            _internal(context, method.__name__)
        finally:
            notice.stop(listening)

    return handler


class _TouchNotice:
    """Sends "touch needed" to the caller as initial metadata, at most once per call
    (gRPC sends initial metadata once)."""

    __slots__ = ("_context", "_sent")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self._sent = False

    def __call__(self, device: str) -> None:
        if self._sent:
            return
        self._sent = True
        if not self._context.is_active():
            # The caller is gone: nobody to touch the key for. Stop before the card waits.
            raise Unavailable("the caller cancelled the request")
        try:
            self._context.send_initial_metadata(((notice.TOUCH_KEY, device),))
        except (grpc.RpcError, ValueError):
            raise Unavailable("the caller cancelled the request") from None


def _fill_signature(message: pb.SignResponse, sig: Signature) -> None:
    # Filled in place: building a message and copying it into a batch costs twice.
    message.key_id = sig.key_id
    message.signature = sig.signature
    message.key_type = wire.key_type_to_pb(sig.key_type)
    message.encoding = wire.encoding_to_pb(sig.encoding)


class KeyServicer(pb_grpc.KeyServiceServicer):
    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    @_rpc
    def CreateKey(self, request: pb.CreateKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        with self._gate.begin(context, "CreateKey", Operation.CREATE) as call:
            backend = request.backend or "store"
            call.authorize_new(
                backend=backend,
                role=request.role,
                collection=request.collection,
                labels=request.labels,
            )
            call.announce()
            record = call.manager.create(
                wire.key_type_from_pb(request.key_type),
                backend=backend,
                role=request.role,
                collection=request.collection,
                labels=dict(request.labels),
                slot=request.slot,
            )
            call.key_id = record.key_id
            return wire.key_to_pb(record)

    @_rpc
    def AdoptKey(self, request: pb.AdoptKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        with self._gate.begin(context, "AdoptKey", Operation.CREATE) as call:
            call.authorize_new(
                backend=request.backend,
                role=request.role,
                collection=request.collection,
                labels=request.labels,
            )
            call.announce()
            record = call.manager.adopt(
                DeviceKeyRef(id=request.device_key_id, label=request.device_label),
                backend=request.backend,
                role=request.role,
                collection=request.collection,
                labels=dict(request.labels),
            )
            call.key_id = record.key_id
            return wire.key_to_pb(record)

    @_rpc
    def GetKey(self, request: pb.GetKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        with self._gate.begin(context, "GetKey", Operation.LIST) as call:
            call.key_id = request.key_id
            call.authorize(call.manager.get(request.key_id))
            record, device = call.manager.describe(request.key_id)
            return wire.key_to_pb(record, device)

    @_rpc
    def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.ServicerContext
    ) -> pb.ListKeysResponse:
        with self._gate.begin(context, "ListKeys", Operation.LIST) as call:
            call.authorize_any()
            selector = KeySelector(
                role=request.role,
                collection=request.collection,
                backend=request.backend,
                labels=dict(request.labels),
            )
            # Only the keys the caller may list; others do not show.
            keys = [wire.key_to_pb(r) for r in call.manager.select(selector) if call.allowed(r)]
            return pb.ListKeysResponse(keys=keys)

    @_rpc
    def DeleteKey(
        self, request: pb.DeleteKeyRequest, context: grpc.ServicerContext
    ) -> pb.DeleteKeyResponse:
        with self._gate.begin(context, "DeleteKey", Operation.DELETE) as call:
            call.key_id = request.key_id
            record = call.manager.get(request.key_id)
            call.authorize(record)
            if request.destroy_on_device:
                # Destroying a hardware key cannot be undone: admins only, and confirmed.
                call.authorize(record, Operation.ADMIN)
                if request.confirm_key_id != request.key_id:
                    raise InvalidArgument(
                        "destroying a key on its device needs confirm_key_id equal to the "
                        "key ID (`keyd keys delete KEY --destroy-on-device --confirm KEY`)"
                    )
            call.announce()
            record = call.manager.delete(
                request.key_id, destroy_on_device=request.destroy_on_device
            )
            return pb.DeleteKeyResponse(key=wire.key_to_pb(record))

    @_rpc
    def RestoreKey(self, request: pb.RestoreKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        with self._gate.begin(context, "RestoreKey", Operation.DELETE) as call:
            call.key_id = request.key_id
            call.authorize(call.manager.get(request.key_id))
            call.announce()
            return wire.key_to_pb(call.manager.restore(request.key_id))

    @_rpc
    def PurgeKey(
        self, request: pb.PurgeKeyRequest, context: grpc.ServicerContext
    ) -> pb.PurgeKeyResponse:
        with self._gate.begin(context, "PurgeKey", Operation.ADMIN) as call:
            call.key_id = request.key_id
            call.authorize(call.manager.get(request.key_id))
            call.announce()
            call.manager.purge(request.key_id)
            return pb.PurgeKeyResponse()


class SignServicer(pb_grpc.SignServiceServicer):
    def __init__(self, gate: Gate, *, max_batch_items: int) -> None:
        self._gate = gate
        self._max_batch = max_batch_items

    @_rpc
    def Sign(self, request: pb.SignRequest, context: grpc.ServicerContext) -> pb.SignResponse:
        with self._gate.begin(context, "Sign", Operation.SIGN) as call:
            data = wire.sign_input_from_pb(request)
            if self._gate.enforcing:
                call.key_id = request.key_id
                call.payload_sha256 = digest_payload(data.payload)
                call.authorize(call.manager.get(request.key_id))
            sig = call.manager.sign(request.key_id, data, wire.encoding_from_pb(request.encoding))
            response = pb.SignResponse()
            _fill_signature(response, sig)
            return response

    @_rpc
    def SignBatch(
        self, request: pb.SignBatchRequest, context: grpc.ServicerContext
    ) -> pb.SignBatchResponse:
        with self._gate.begin(context, "SignBatch", Operation.SIGN) as call:
            return self._batch(call, request)

    def _batch(self, call: Request, batch: pb.SignBatchRequest) -> pb.SignBatchResponse:
        requests = batch.requests
        if len(requests) > self._max_batch:
            raise InvalidArgument(
                f"batch of {len(requests)} requests; the limit is "
                f"{self._max_batch} ([server] max_batch_items)"
            )
        enforcing = self._gate.enforcing
        outcomes: list[SignOutcome | None] = [None] * len(requests)
        digests = [""] * len(requests)
        items: list[SignItem] = []
        positions: list[int] = []
        # Each key is authorised once per batch: batches usually repeat a few keys.
        refusals: dict[str, KeydError | None] = {}
        for i, request in enumerate(requests):
            try:
                data = wire.sign_input_from_pb(request)
                encoding = wire.encoding_from_pb(request.encoding)
                if enforcing:
                    digests[i] = digest_payload(data.payload)
                    key_id = request.key_id
                    if key_id not in refusals:
                        refusals[key_id] = _refusal(call, key_id)
                    refusal = refusals[key_id]
                    if refusal is not None:
                        raise refusal
            except KeydError as exc:
                outcomes[i] = exc
                continue
            items.append(SignItem(request.key_id, data, encoding))
            positions.append(i)
        for i, signed in zip(positions, call.manager.sign_batch(items), strict=True):
            outcomes[i] = signed
        if enforcing:
            call.items = [
                (r.key_id, digest, item_result(outcome))
                for r, digest, outcome in zip(requests, digests, outcomes, strict=True)
            ]
        response = pb.SignBatchResponse()
        for outcome in outcomes:
            result = response.results.add()
            if isinstance(outcome, Signature):
                _fill_signature(result.signature, outcome)
            else:
                assert outcome is not None  # noqa: S101 - every slot is filled above
                error = result.error
                error.code = wire.code_number(wire.status_code(outcome))
                error.message = outcome.message
                error.kind = type(outcome).__name__
        return response


def _refusal(call: Request, key_id: str) -> KeydError | None:
    """Why the caller may not sign with this key (unknown, not permitted), or None."""
    try:
        call.authorize(call.manager.get(key_id))
    except KeydError as exc:
        return exc
    return None


class StatusServicer(pb_grpc.StatusServiceServicer):
    def __init__(self, gate: Gate, *, socket: str, audit_public_key: str) -> None:
        self._gate = gate
        self._socket = socket
        self._audit_public_key = audit_public_key
        self._started_ms = int(time.time() * 1000)

    @_rpc
    def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetStatusResponse:
        with self._gate.begin(context, "GetStatus", Operation.LIST) as call:
            call.authorize_any()
            manager = call.manager
            backends = [
                pb.BackendStatus(
                    name=h.name, healthy=h.healthy, detail=h.detail, keys=count, state=h.state
                )
                for h, count in manager.health()
            ]
            return pb.GetStatusResponse(
                version=__version__,
                started_unix_ms=self._started_ms,
                keys=manager.key_count(),
                backends=backends,
                socket=self._socket,
                access_mode="policy" if self._gate.enforcing else "open",
                audit_public_key=self._audit_public_key,
            )

    @_rpc
    def WhoAmI(self, request: pb.WhoAmIRequest, context: grpc.ServicerContext) -> pb.WhoAmIResponse:
        with self._gate.begin(context, "WhoAmI", None) as call:
            caller = call.caller
            if caller is None:
                raise FailedPrecondition('keyd does not identify callers ([access] mode = "open")')
            return wire.caller_to_pb(caller)


SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("KeyService", "SignService", "StatusService")
)


def add_servicers(
    server: grpc.Server,
    gate: Gate,
    *,
    socket: str,
    max_batch_items: int,
    audit_public_key: str = "",
) -> None:
    pb_grpc.add_KeyServiceServicer_to_server(KeyServicer(gate), server)
    pb_grpc.add_SignServiceServicer_to_server(
        SignServicer(gate, max_batch_items=max_batch_items), server
    )
    pb_grpc.add_StatusServiceServicer_to_server(
        StatusServicer(gate, socket=socket, audit_public_key=audit_public_key), server
    )
