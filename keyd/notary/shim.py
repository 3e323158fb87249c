"""`keyd notary-signer`: Notary's signer API, served in front of keyd.

A stock notary-server talks to this process exactly as to Notary's own
notary-signer (gRPC package `proto`, mutual TLS over TCP). It holds no keys: it
forwards to keyd's notary socket, where the daemon lets it reach only online keys
(timestamp, snapshot) of collections.

Sign requests that arrive while others are on their way to keyd are sent together
as one SignBatch (Coalescer): under load keyd signs in batches, its fast path,
while a lone request costs one call. grpcio's threaded server is used because it
serves mutual-TLS calls about twice as fast as grpc.aio here (docs/notary.md).

Two behaviours matter to notary-server (../shared/reference/notary-signer.md):
- any GetKeyInfo error for an existing key makes it mint a new key, so a call
  that finds keyd unreachable waits (up to [keyd] wait_seconds) for it to return;
- it checks the health of "grpc.health.v1.Health.KeyManagement" and
  "...Signer" every 10 s: they follow keyd's reachability, checked every second.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from types import FrameType
from typing import NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from keyd import wire
from keyd.client import Client, Signature, SignItem
from keyd.core.keytypes import KeyType
from keyd.core.signing import der_to_raw
from keyd.daemon import logs
from keyd.daemon.notify import notify
from keyd.errors import (
    Internal,
    KeydError,
    NotFound,
    StartupError,
    Unreachable,
)
from keyd.notary.config import ShimConfig
from keyd.notary.wire import signer_pb2 as pb
from keyd.notary.wire import signer_pb2_grpc as pb_grpc

log = logging.getLogger("keyd.notary")

T = TypeVar("T")

# Notary's algorithm names for CreateKey; RSA is refused, as notary-signer does.
ALGORITHMS = {"ecdsa": KeyType.ECDSA_P256, "ed25519": KeyType.ED25519}
HEALTH_NAMES = ("", "grpc.health.v1.Health.KeyManagement", "grpc.health.v1.Health.Signer")
# Coalescing: at most this many Sign requests per SignBatch, this many batches at once.
MAX_BATCH = 64
BATCHES_IN_FLIGHT = 2
# Handler threads: requests mostly wait on keyd, so more threads than cores is fine.
THREADS = 32
# A request to keyd may take this long (the shim's health checks use a short deadline).
REQUEST_TIMEOUT = 30.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _key_info(key_id: str, key_type: KeyType) -> pb.KeyInfo:
    return pb.KeyInfo(
        keyID=pb.KeyID(ID=key_id), algorithm=pb.Algorithm(algorithm=key_type.notary_keytype)
    )


class _Slot:
    """One Sign request in the KeydGateway's coalescing queue."""

    __slots__ = ("done", "event", "item", "lead", "outcome")

    def __init__(self, item: SignItem) -> None:
        self.item = item
        self.event = threading.Event()
        self.lead = False  # set (under the lock) when this request is to send the next batch
        self.done = False
        self.outcome: Signature | KeydError | None = None


class KeydGateway:
    """keyd, as the shim uses it: every call waits a bounded time for an unreachable
    daemon instead of failing at once, and concurrent signs share SignBatch calls.

    Coalescing without a dispatcher thread: a request that finds fewer than
    BATCHES_IN_FLIGHT batches on their way leads: it sends itself and whatever is
    queued as one batch. When the batch returns, the leader hands the lead to the
    oldest queued request, taking it off the queue so that no other batch can
    include it; with nothing queued, the slot is given back."""

    def __init__(self, client: Client, wait_seconds: float) -> None:
        self.client = client
        self._wait = wait_seconds
        self._lock = threading.Lock()
        self._queue: collections.deque[_Slot] = collections.deque()
        self._in_flight = 0

    def sign(self, key_id: str, content: bytes) -> Signature:
        slot = _Slot(SignItem(key_id, message=content))
        with self._lock:
            if self._in_flight < BATCHES_IN_FLIGHT:
                self._in_flight += 1
                slot.lead = True
            else:
                self._queue.append(slot)
        while not slot.done:
            if slot.lead:
                slot.lead = False
                self._send_batch(slot)
            else:
                slot.event.wait()
                slot.event.clear()
        if isinstance(slot.outcome, KeydError):
            raise slot.outcome
        assert slot.outcome is not None  # noqa: S101 - done implies an outcome
        return slot.outcome

    def _send_batch(self, leader: _Slot) -> None:
        with self._lock:
            rest = min(MAX_BATCH - 1, len(self._queue))
            batch = [leader, *(self._queue.popleft() for _ in range(rest))]
        items = [slot.item for slot in batch]
        outcomes: list[Signature | KeydError]
        try:
            outcomes = self.call(
                lambda: list(self.client.sign_batch(items, batch_size=MAX_BATCH, in_flight=1))
            )
        except KeydError as exc:
            outcomes = [exc] * len(batch)
        except Exception:  # a bug here must not leave the followers waiting forever
            log.exception("signing a batch failed")
            outcomes = []
        if len(outcomes) != len(batch):
            outcomes = [Internal("the shim could not sign; see its log")] * len(batch)
        for slot, outcome in zip(batch, outcomes, strict=True):
            slot.outcome = outcome
            slot.done = True
            slot.event.set()
        with self._lock:
            if self._queue:
                successor = self._queue.popleft()
                successor.lead = True
                successor.event.set()
            else:
                self._in_flight -= 1

    def call(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self._wait
        delay = 0.05
        while True:
            try:
                return fn()
            except Unreachable:
                # Only when keyd was not reached at all: a call that timed out may have
                # been done (a second CreateKey would leave an orphan key).
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)


def _abort(context: grpc.ServicerContext, exc: KeydError) -> NoReturn:
    # keyd's one error table (keyd.wire) gives the same codes notary-signer answers.
    code = wire.status_code(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("keyd failed a request", extra={"error": exc.message})
    context.abort(code, exc.message)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


class KeyManagement(pb_grpc.KeyManagementServicer):
    def __init__(self, keyd: KeydGateway) -> None:
        self._keyd = keyd

    def CreateKey(
        self, request: pb.CreateKeyRequest, context: grpc.ServicerContext
    ) -> pb.PublicKey:
        key_type = ALGORITHMS.get(request.algorithm)
        if key_type is None:
            # notary-signer answers UNKNOWN for an algorithm it cannot create.
            context.abort(
                grpc.StatusCode.UNKNOWN,
                f"algorithm {request.algorithm!r} is not supported; use ecdsa or ed25519",
            )
        try:
            record = self._keyd.call(
                lambda: self._keyd.client.create_key(
                    key_type, role=request.role, collection=request.gun
                )
            )
        except KeydError as exc:
            _abort(context, exc)
        log.info(
            "key created",
            extra={"key_id": record.key_id, "gun": request.gun, "role": request.role},
        )
        return pb.PublicKey(
            keyInfo=_key_info(record.key_id, key_type), publicKey=record.public_key.notary_bytes
        )

    def GetKeyInfo(self, request: pb.KeyID, context: grpc.ServicerContext) -> pb.GetKeyInfoResponse:
        try:
            record = self._keyd.call(lambda: self._keyd.client.get_key(request.ID))
        except KeydError as exc:
            _abort(context, exc)
        return pb.GetKeyInfoResponse(
            keyInfo=_key_info(record.key_id, record.key_type),
            publicKey=record.public_key.notary_bytes,
            role=record.role,
        )

    def DeleteKey(self, request: pb.KeyID, context: grpc.ServicerContext) -> pb.Void:
        try:
            self._keyd.call(lambda: self._keyd.client.delete_key(request.ID))
        except NotFound:
            pass  # idempotent, as in notary-signer
        except KeydError as exc:
            _abort(context, exc)
        return pb.Void()


class Signer(pb_grpc.SignerServicer):
    def __init__(self, keyd: KeydGateway) -> None:
        self._keyd = keyd

    def Sign(self, request: pb.SignatureRequest, context: grpc.ServicerContext) -> pb.Signature:
        try:
            sig = self._keyd.sign(request.keyID.ID, request.content)
        except KeydError as exc:
            _abort(context, exc)
        signature = sig.signature
        if sig.key_type.is_ecdsa:
            # Notary wants raw r||s; its clients reject DER. (Asking keyd for RAW would
            # need the key type first: Ed25519 has a single encoding.)
            signature = der_to_raw(signature, sig.key_type)
        return pb.Signature(
            keyInfo=_key_info(sig.key_id, sig.key_type),
            algorithm=pb.Algorithm(algorithm=sig.key_type.notary_method),
            content=signature,
        )


def _watch_keyd(
    client: Client, servicer: health.HealthServicer, interval: float, stop: threading.Event
) -> None:
    serving: bool | None = None
    while True:
        try:
            client.check_serving()  # not GetStatus: no permission needed, no audit record
            now = True
        except KeydError:
            now = False
        if now != serving:
            for name in HEALTH_NAMES:
                servicer.set(name, _SERVING if now else _NOT_SERVING)
            log.info("keyd is reachable" if now else "keyd is unreachable; NOT_SERVING")
            serving = now
        if stop.wait(interval):
            return


def start(config: ShimConfig, stop: threading.Event) -> tuple[grpc.Server, list[Client]]:
    """Check the TLS files, listen, and start the health watcher."""
    tls = config.read_tls()
    client = Client(config.keyd_socket, timeout=REQUEST_TIMEOUT)
    health_client = Client(config.keyd_socket, timeout=max(config.health_interval_seconds, 1.0))
    clients = [client, health_client]
    keyd = KeydGateway(client, config.wait_seconds)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="notary")
    )
    pb_grpc.add_KeyManagementServicer_to_server(KeyManagement(keyd), server)
    pb_grpc.add_SignerServicer_to_server(Signer(keyd), server)
    health_servicer = health.HealthServicer()
    for name in HEALTH_NAMES:
        health_servicer.set(name, _NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.client_ca, require_client_auth=True
    )
    try:
        server.add_secure_port(config.address, credentials)
    except RuntimeError as exc:
        for c in clients:
            c.close()
        raise StartupError(f"cannot listen on {config.address}: {exc}") from None
    server.start()
    threading.Thread(
        target=_watch_keyd,
        args=(health_client, health_servicer, config.health_interval_seconds, stop),
        name="keyd-health",
        daemon=True,
    ).start()
    return server, clients


def serve(config: ShimConfig) -> int:
    """Run in the foreground until SIGTERM/SIGINT."""
    logs.configure(config.log_level)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server, clients = start(config, stop)
    log.info(
        "notary signer shim ready",
        extra={"address": config.address, "keyd": str(config.keyd_socket)},
    )
    notify(f"READY=1\nSTATUS=serving Notary's signer API on {config.address}")
    stop.wait()
    notify("STOPPING=1")
    server.stop(5).wait()
    for client in clients:
        client.close()
    log.info("notary signer shim stopped")
    return 0
