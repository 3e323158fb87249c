"""Issue 3's benchmarks: signing with SoftHSM2 token keys through the daemon.

Ratios, each measured in one run on one SoftHSM2 token, 1 KiB payloads:
  SignBatch through the daemon        vs  in-process python-pkcs11, 2 threads with
                                          their own sessions (floor 0.5x)
  unary Sign, 16 concurrent callers   vs  the same with a store key (floor 0.8x)
  unary Sign, sequential p50          (target: under 1 ms)
for ECDSA P-256 and Ed25519; RSA-3072 is reported alongside.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import threading
import time
from pathlib import Path

import grpc
import pkcs11
from pkcs11 import Mechanism, ObjectClass

from benchmarks.core import (
    CALLERS,
    PAYLOAD,
    Report,
    batch_rate,
    concurrent_rate,
    sequential_latency_ms,
)
from keyd.backends.pkcs11.module import Module
from keyd.core.keytypes import KeyType
from keyd.core.model import KeyRecord
from keyd.v1 import keyd_pb2 as pb
from keyd.v1 import keyd_pb2_grpc as pb_grpc
from tests.harness import Daemon
from tests.softhsm import USER_PIN, SoftHSM

LABEL = "bench"
KEY_TYPES = (KeyType.ECDSA_P256, KeyType.ED25519, KeyType.RSA_3072)
FLOORED = (KeyType.ECDSA_P256, KeyType.ED25519)
# Batches small enough that RSA-3072 (~400 signatures/s on one session) finishes a call quickly.
BATCH = {KeyType.ECDSA_P256: 256, KeyType.ED25519: 256, KeyType.RSA_3072: 32}
THREADS = 2


def _sign_function(key_type: KeyType) -> tuple[Mechanism, object, bool]:
    """Mechanism, parameter, and whether the host hashes first: as keyd signs."""
    if key_type is KeyType.ECDSA_P256:
        return Mechanism.ECDSA, None, True
    if key_type is KeyType.ED25519:
        return Mechanism.EDDSA, None, False
    return Mechanism.SHA256_RSA_PKCS_PSS, (Mechanism.SHA256, pkcs11.MGF.SHA256, 32), False


def inprocess_rate(hsm: SoftHSM, cka_id: bytes, key_type: KeyType, seconds: float) -> float:
    """python-pkcs11 in this process: THREADS threads, each with its own session.
    The module is initialised with OS locking (keyd's Module), without which two
    threads crash SoftHSM2."""
    os.environ.update(hsm.env)
    module = Module.get(hsm.module)
    token = module.lib.get_token(token_label=LABEL)
    login = token.open(user_pin=USER_PIN)
    mechanism, param, prehash = _sign_function(key_type)
    counts = [0] * THREADS
    stop_at = time.perf_counter() + seconds

    def worker(index: int) -> None:
        with token.open() as session:
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=cka_id)
            while time.perf_counter() < stop_at:
                data = hashlib.sha256(PAYLOAD).digest() if prehash else PAYLOAD
                key.sign(data, mechanism=mechanism, mechanism_param=param)  # type: ignore[attr-defined]
                counts[index] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    login.close()
    return sum(counts) / elapsed


def token_signing(report: Report, work: Path, runs: int, seconds: float) -> None:
    hsm = SoftHSM(work / "hsm")
    hsm.init_token(LABEL)
    pin_file = work / "token.pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    daemon = Daemon(
        work / "d-pkcs11",
        extra=(
            f'[pkcs11.hsm]\nmodule = "{hsm.module}"\ntoken_label = "{LABEL}"\n'
            f'pin_file = "{pin_file}"\n'
        ),
        env=hsm.env,
    )
    daemon.init()
    daemon.start()
    try:
        with daemon.client() as client:
            store_key = client.create_key(KeyType.ECDSA_P256).key_id
            records = {t: client.create_key(t, backend="pkcs11") for t in KEY_TYPES}
        _measure(
            report,
            daemon=daemon,
            hsm=hsm,
            store_key=store_key,
            records=records,
            runs=runs,
            seconds=seconds,
        )
    finally:
        daemon.stop()
    for key_type in KEY_TYPES:
        name = key_type.value
        floor = 0.5 if key_type in FLOORED else None
        report.ratio(
            f"{name}: SignBatch / in-process {THREADS} threads",
            f"{name}_batch",
            f"{name}_inproc",
            floor=floor,
        )
        report.ratio(
            f"{name}: Sign 16 callers / store key 16 callers",
            f"{name}_sign16",
            "store_sign16",
            floor=0.8 if key_type in FLOORED else None,
        )
        p50 = report.figures[f"{name}_p50"].median
        added = p50 - report.figures["store_p50"].median
        verdict = f" (target < 1 ms: {'ok' if p50 < 1 else 'ABOVE'})" if floor else ""
        report.lines.append(
            f"{f'{name}: Sign sequential p50 (+{added:.3f} over store)':<58} {p50:6.3f}ms{verdict}"
        )


def _request(key_id: str) -> pb.SignRequest:
    return pb.SignRequest(key_id=key_id, message=PAYLOAD)


def _measure(
    report: Report,
    *,
    daemon: Daemon,
    hsm: SoftHSM,
    store_key: str,
    records: dict[KeyType, KeyRecord],
    runs: int,
    seconds: float,
) -> None:
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        stub = pb_grpc.SignServiceStub(channel)
        for key_type, record in records.items():
            name = key_type.value
            batch = pb.SignBatchRequest(requests=[_request(record.key_id)] * BATCH[key_type])
            cka_id = bytes.fromhex(record.location["cka_id"])
            batch_rate(stub.SignBatch, batch, THREADS, 0.5)  # warm-up: sessions open, handles found
            for _ in range(runs):
                report.add(
                    f"{name}_inproc",
                    f"{name}: in-process python-pkcs11, {THREADS} threads",
                    "/s",
                    inprocess_rate(hsm, cka_id, key_type, seconds),
                )
                report.add(
                    f"{name}_batch",
                    f"{name}: SignBatch, {THREADS} calls x {BATCH[key_type]}",
                    "/s",
                    batch_rate(stub.SignBatch, batch, THREADS, seconds),
                )
        # Sequential latency, interleaved with a store key's as the transport's share.
        sequential = {"store": functools.partial(stub.Sign, _request(store_key))}
        for key_type, record in records.items():
            sequential[key_type.value] = functools.partial(stub.Sign, _request(record.key_id))
        for sign_once in sequential.values():
            sequential_latency_ms(sign_once, 100)
        for _ in range(runs):
            for name, sign_once in sequential.items():
                p50, _ = sequential_latency_ms(sign_once, 500)
                report.add(f"{name}_p50", f"{name}: Sign sequential p50", "ms", p50)

    async def concurrent() -> None:
        async with grpc.aio.insecure_channel(f"unix:{daemon.socket}") as channel:
            stub = pb_grpc.SignServiceStub(channel)
            store_request = pb.SignRequest(key_id=store_key, message=PAYLOAD)
            token_requests = {
                t: pb.SignRequest(key_id=r.key_id, message=PAYLOAD) for t, r in records.items()
            }
            await concurrent_rate(lambda: stub.Sign(store_request), CALLERS, 0.5)
            for _ in range(runs):
                report.add(
                    "store_sign16",
                    "store key: Sign, 16 concurrent callers",
                    "/s",
                    await concurrent_rate(lambda: stub.Sign(store_request), CALLERS, seconds),
                )
                for key_type, token_request in token_requests.items():
                    report.add(
                        f"{key_type.value}_sign16",
                        f"{key_type.value}: Sign, 16 concurrent callers",
                        "/s",
                        await concurrent_rate(
                            functools.partial(stub.Sign, token_request), CALLERS, seconds
                        ),
                    )

    # Last: grpc.aio leaves a busy poller thread behind in this process.
    asyncio.run(concurrent())
