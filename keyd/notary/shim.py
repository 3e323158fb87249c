"""`keyd notary-signer`: Notary's signer API, served in front of keyd.

A stock notary-server talks to this process exactly as to Notary's own
notary-signer (gRPC package `proto`, mutual TLS over TCP). It holds no keys: it
forwards to keyd's notary socket, where the daemon lets it reach only online keys
(timestamp, snapshot) of collections.

It runs on one asyncio loop (grpc.aio): it only waits on the network, and a
thread per request would pass the GIL around. Sign requests that arrive while
others are on their way to keyd are sent together as one SignBatch, so under load
keyd signs in batches (its fast path) while a lone request costs one call.

Two behaviours matter to notary-server (../shared/reference/notary-signer.md):
- any GetKeyInfo error for an existing key makes it mint a new key, so a call
  that finds keyd unreachable waits (up to [keyd] wait_seconds) for it to return;
- it checks the health of "grpc.health.v1.Health.KeyManagement" and
  "...Signer" every 10 s: they follow keyd's reachability, checked every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # the asyncio servicer (health.aio)

from keyd import wire
from keyd.client import CHANNEL_OPTIONS, translate_error
from keyd.core.keytypes import KeyType
from keyd.core.signing import der_to_raw
from keyd.daemon import logs
from keyd.daemon.notify import notify
from keyd.errors import (
    InvalidArgument,
    KeydError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    StartupError,
    Unavailable,
)
from keyd.notary.config import ShimConfig
from keyd.notary.wire import signer_pb2 as pb
from keyd.notary.wire import signer_pb2_grpc as pb_grpc
from keyd.v1 import keyd_pb2 as kpb
from keyd.v1 import keyd_pb2_grpc as kpb_grpc

log = logging.getLogger("keyd.notary")

T = TypeVar("T")

# Notary's algorithm names for CreateKey; RSA is refused, as notary-signer does.
ALGORITHMS = {"ecdsa": KeyType.ECDSA_P256, "ed25519": KeyType.ED25519}
HEALTH_NAMES = ("", "grpc.health.v1.Health.KeyManagement", "grpc.health.v1.Health.Signer")
# Coalescing: at most this many Sign requests per SignBatch, this many batches at once.
MAX_BATCH = 64
BATCHES_IN_FLIGHT = 2
# keyd's errors as notary-signer would answer them.
_STATUS = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (PayloadTooLarge, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_Pending = tuple[kpb.SignRequest, "asyncio.Future[kpb.SignResult]"]


def _key_info(key_id: str, key_type: KeyType) -> pb.KeyInfo:
    return pb.KeyInfo(
        keyID=pb.KeyID(ID=key_id), algorithm=pb.Algorithm(algorithm=key_type.notary_keytype)
    )


class Keyd:
    """keyd's notary socket, asynchronously. A call that finds keyd unreachable
    waits (up to `wait_seconds`) for it to come back before failing."""

    def __init__(self, socket: Path, wait_seconds: float) -> None:
        self.socket = socket
        self._wait = wait_seconds
        self._channel = grpc.aio.insecure_channel(f"unix:{socket}", options=list(CHANNEL_OPTIONS))
        self.keys = kpb_grpc.KeyServiceStub(self._channel)
        self.status = kpb_grpc.StatusServiceStub(self._channel)
        self._signer = kpb_grpc.SignServiceStub(self._channel)
        self._queue: list[_Pending] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self._wait
        delay = 0.05
        while True:
            try:
                return await fn()
            except grpc.aio.AioRpcError as error:
                exc = translate_error(error, self.socket)
            if not isinstance(exc, Unavailable) or time.monotonic() + delay > deadline:
                raise exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def sign(self, key_id: str, content: bytes) -> kpb.SignResponse:
        """Sign through the next SignBatch; raises the item's KeydError."""
        future: asyncio.Future[kpb.SignResult] = asyncio.get_running_loop().create_future()
        self._queue.append((kpb.SignRequest(key_id=key_id, message=content), future))
        self._dispatch()
        result = await future
        if result.WhichOneof("result") == "error":
            error = result.error
            raise wire.error_for(wire.code_from_number(error.code), error.message, error.kind)
        return result.signature

    def _dispatch(self) -> None:
        while self._queue and self._in_flight < BATCHES_IN_FLIGHT:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        request = kpb.SignBatchRequest(requests=[r for r, _ in batch])
        try:
            response = await self.call(lambda: self._signer.SignBatch(request))
        except KeydError as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, response.results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._dispatch()

    async def close(self) -> None:
        await self._channel.close(None)


async def _abort(context: grpc.aio.ServicerContext[object, object], exc: KeydError) -> NoReturn:
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            await context.abort(code, exc.message)
    log.error("keyd failed a request", extra={"error": exc.message})
    await context.abort(grpc.StatusCode.INTERNAL, exc.message)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


Context = grpc.aio.ServicerContext[object, object]


class KeyManagement(pb_grpc.KeyManagementServicer):
    def __init__(self, keyd: Keyd) -> None:
        self._keyd = keyd

    async def CreateKey(self, request: pb.CreateKeyRequest, context: Context) -> pb.PublicKey:
        key_type = ALGORITHMS.get(request.algorithm)
        if key_type is None:
            # notary-signer answers UNKNOWN for an algorithm it cannot create.
            await context.abort(
                grpc.StatusCode.UNKNOWN,
                f"algorithm {request.algorithm!r} is not supported; use ecdsa or ed25519",
            )
        create = kpb.CreateKeyRequest(
            key_type=wire.key_type_to_pb(key_type), role=request.role, collection=request.gun
        )
        try:
            key = await self._keyd.call(lambda: self._keyd.keys.CreateKey(create))
        except KeydError as exc:
            await _abort(context, exc)
        log.info(
            "key created", extra={"key_id": key.key_id, "gun": request.gun, "role": request.role}
        )
        return pb.PublicKey(keyInfo=_key_info(key.key_id, key_type), publicKey=key.public_key)

    async def GetKeyInfo(self, request: pb.KeyID, context: Context) -> pb.GetKeyInfoResponse:
        get = kpb.GetKeyRequest(key_id=request.ID)
        try:
            key = await self._keyd.call(lambda: self._keyd.keys.GetKey(get))
        except KeydError as exc:
            await _abort(context, exc)
        return pb.GetKeyInfoResponse(
            keyInfo=_key_info(key.key_id, wire.key_type_from_pb(key.key_type)),
            publicKey=key.public_key,
            role=key.role,
        )

    async def DeleteKey(self, request: pb.KeyID, context: Context) -> pb.Void:
        delete = kpb.DeleteKeyRequest(key_id=request.ID)
        try:
            await self._keyd.call(lambda: self._keyd.keys.DeleteKey(delete))
        except NotFound:
            pass  # idempotent, as in notary-signer
        except KeydError as exc:
            await _abort(context, exc)
        return pb.Void()


class Signer(pb_grpc.SignerServicer):
    def __init__(self, keyd: Keyd) -> None:
        self._keyd = keyd

    async def Sign(self, request: pb.SignatureRequest, context: Context) -> pb.Signature:
        try:
            signed = await self._keyd.sign(request.keyID.ID, request.content)
        except KeydError as exc:
            await _abort(context, exc)
        key_type = wire.key_type_from_pb(signed.key_type)
        signature = signed.signature
        if key_type.is_ecdsa:
            # Notary wants raw r||s; its clients reject DER. (Asking keyd for RAW would
            # need the key type first: Ed25519 has a single encoding.)
            signature = der_to_raw(signature, key_type)
        return pb.Signature(
            keyInfo=_key_info(signed.key_id, key_type),
            algorithm=pb.Algorithm(algorithm=key_type.notary_method),
            content=signature,
        )


async def _watch_keyd(
    keyd: Keyd, servicer: HealthServicer, interval: float, stop: asyncio.Event
) -> None:
    serving: bool | None = None
    while not stop.is_set():
        try:
            await keyd.status.GetStatus(kpb.GetStatusRequest(), timeout=max(interval, 1.0))
            now = True
        except grpc.aio.AioRpcError:
            now = False
        if now != serving:
            for name in HEALTH_NAMES:
                await servicer.set(name, _SERVING if now else _NOT_SERVING)
            log.info("keyd is reachable" if now else "keyd is unreachable; NOT_SERVING")
            serving = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def _serve(config: ShimConfig) -> int:
    tls = config.read_tls()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    keyd = Keyd(config.keyd_socket, config.wait_seconds)
    server = grpc.aio.server()
    pb_grpc.add_KeyManagementServicer_to_server(KeyManagement(keyd), server)
    pb_grpc.add_SignerServicer_to_server(Signer(keyd), server)
    health_servicer = HealthServicer()
    for name in HEALTH_NAMES:
        await health_servicer.set(name, _NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.client_ca, require_client_auth=True
    )
    try:
        server.add_secure_port(config.address, credentials)
    except RuntimeError as exc:
        await keyd.close()
        raise StartupError(f"cannot listen on {config.address}: {exc}") from None
    await server.start()
    watcher = loop.create_task(
        _watch_keyd(keyd, health_servicer, config.health_interval_seconds, stop)
    )
    log.info(
        "notary signer shim ready",
        extra={"address": config.address, "keyd": str(config.keyd_socket)},
    )
    notify(f"READY=1\nSTATUS=serving Notary's signer API on {config.address}")
    await stop.wait()
    notify("STOPPING=1")
    await server.stop(5)
    await watcher
    await keyd.close()
    log.info("notary signer shim stopped")
    return 0


def serve(config: ShimConfig) -> int:
    """Run in the foreground until SIGTERM/SIGINT."""
    logs.configure(config.log_level)
    return asyncio.run(_serve(config))
