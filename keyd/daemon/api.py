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
from keyd.backends.base import DeviceKeyRef
from keyd.core.model import KeySelector
from keyd.daemon.manager import KeyManager, Signature, SignItem, SignOutcome
from keyd.errors import InvalidArgument, KeydError
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
        try:
            return method(self, request, context)
        except KeydError as exc:
            _abort(context, exc)
        except Exception:  # noqa: BLE001 - last resort: log it, tell the caller INTERNAL
            _internal(context, method.__name__)

    return handler


def _fill_signature(message: pb.SignResponse, sig: Signature) -> None:
    # Filled in place: building a message and copying it into a batch costs twice.
    message.key_id = sig.key_id
    message.signature = sig.signature
    message.key_type = wire.key_type_to_pb(sig.key_type)
    message.encoding = wire.encoding_to_pb(sig.encoding)


class KeyServicer(pb_grpc.KeyServiceServicer):
    def __init__(self, manager: KeyManager) -> None:
        self._manager = manager

    @_rpc
    def CreateKey(self, request: pb.CreateKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        record = self._manager.create(
            wire.key_type_from_pb(request.key_type),
            backend=request.backend or "store",
            role=request.role,
            collection=request.collection,
            labels=dict(request.labels),
        )
        return wire.key_to_pb(record)

    @_rpc
    def AdoptKey(self, request: pb.AdoptKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        record = self._manager.adopt(
            DeviceKeyRef(id=request.device_key_id, label=request.device_label),
            backend=request.backend,
            role=request.role,
            collection=request.collection,
            labels=dict(request.labels),
        )
        return wire.key_to_pb(record)

    @_rpc
    def GetKey(self, request: pb.GetKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        record, device = self._manager.describe(request.key_id)
        return wire.key_to_pb(record, device)

    @_rpc
    def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.ServicerContext
    ) -> pb.ListKeysResponse:
        selector = KeySelector(
            role=request.role,
            collection=request.collection,
            backend=request.backend,
            labels=dict(request.labels),
        )
        keys = [wire.key_to_pb(r) for r in self._manager.select(selector)]
        return pb.ListKeysResponse(keys=keys)

    @_rpc
    def DeleteKey(
        self, request: pb.DeleteKeyRequest, context: grpc.ServicerContext
    ) -> pb.DeleteKeyResponse:
        self._manager.delete(request.key_id)
        return pb.DeleteKeyResponse()


class SignServicer(pb_grpc.SignServiceServicer):
    def __init__(self, manager: KeyManager, *, max_batch_items: int) -> None:
        self._manager = manager
        self._max_batch = max_batch_items

    @_rpc
    def Sign(self, request: pb.SignRequest, context: grpc.ServicerContext) -> pb.SignResponse:
        sig = self._manager.sign(
            request.key_id,
            wire.sign_input_from_pb(request),
            wire.encoding_from_pb(request.encoding),
        )
        response = pb.SignResponse()
        _fill_signature(response, sig)
        return response

    @_rpc
    def SignBatch(
        self, request: pb.SignBatchRequest, context: grpc.ServicerContext
    ) -> pb.SignBatchResponse:
        return self._batch(request)

    def _batch(self, batch: pb.SignBatchRequest) -> pb.SignBatchResponse:
        requests = batch.requests
        if len(requests) > self._max_batch:
            raise InvalidArgument(
                f"batch of {len(requests)} requests; the limit is "
                f"{self._max_batch} ([server] max_batch_items)"
            )
        outcomes: list[SignOutcome | None] = [None] * len(requests)
        items: list[SignItem] = []
        positions: list[int] = []
        for i, request in enumerate(requests):
            try:
                data = wire.sign_input_from_pb(request)
                encoding = wire.encoding_from_pb(request.encoding)
            except KeydError as exc:
                outcomes[i] = exc
                continue
            items.append(SignItem(request.key_id, data, encoding))
            positions.append(i)
        for i, signed in zip(positions, self._manager.sign_batch(items), strict=True):
            outcomes[i] = signed
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


class StatusServicer(pb_grpc.StatusServiceServicer):
    def __init__(self, manager: KeyManager, *, socket: str) -> None:
        self._manager = manager
        self._socket = socket
        self._started_ms = int(time.time() * 1000)

    @_rpc
    def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetStatusResponse:
        backends = [
            pb.BackendStatus(
                name=h.name, healthy=h.healthy, detail=h.detail, keys=count, state=h.state
            )
            for h, count in self._manager.health()
        ]
        return pb.GetStatusResponse(
            version=__version__,
            started_unix_ms=self._started_ms,
            keys=self._manager.key_count(),
            backends=backends,
            socket=self._socket,
        )


SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("KeyService", "SignService", "StatusService")
)


def add_servicers(
    server: grpc.Server, manager: KeyManager, *, socket: str, max_batch_items: int
) -> None:
    pb_grpc.add_KeyServiceServicer_to_server(KeyServicer(manager), server)
    pb_grpc.add_SignServiceServicer_to_server(
        SignServicer(manager, max_batch_items=max_batch_items), server
    )
    pb_grpc.add_StatusServiceServicer_to_server(StatusServicer(manager, socket=socket), server)
