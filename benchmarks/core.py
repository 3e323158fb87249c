"""Issue 2's benchmarks: keyd's Sign against the transport and the crypto ceilings.

Every figure is the median of several runs, and every ratio compares two things
measured in the same run on the same machine:
  unary Sign, 16 concurrent callers   vs  a trivial echo RPC (same grpcio server model)
  unary Sign, sequential p50          (target: under 0.6 ms)
  SignBatch, several streams          vs  in-process single-thread `cryptography` signing
  bare signing handlers (Sign, SignBatch with no keyd code, benchmarks.echo_server):
                                      what any Python signer on this server model reaches,
                                      so keyd's own cost and the stack's are told apart
  10,000-key store: time to READY=1, and sign latency  vs  a 10-key store
  [store] verify_signatures on        vs  off (in-process, the cost of verifying)
ECDSA P-256 keys and 1 KiB payloads throughout.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.echo_server import BARE_BATCH, BARE_SIGN, METHOD
from keyd.backends.store import StoreBackend
from keyd.config import SecretKind
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.model import KeyRecord
from keyd.core.signing import SignInput
from keyd.daemon.manager import KeyManager
from keyd.store.catalog import Catalog
from keyd.store.database import Database
from keyd.store.secret import StoreSecret, load_store_secret
from keyd.v1 import keyd_pb2 as pb
from keyd.v1 import keyd_pb2_grpc as pb_grpc
from tests.harness import Daemon

PAYLOAD = os.urandom(1024)
CALLERS = 16
# 256 items of 1 KiB per SignBatch call, 2 or 3 calls in flight: enough that the
# per-call cost is amortised and the daemon always has a batch to sign on each core.
BATCH = 256
STREAMS = (2, 3)


@dataclass
class Figure:
    name: str
    unit: str
    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


@dataclass
class Report:
    figures: dict[str, Figure] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def add(self, key: str, name: str, unit: str, value: float) -> None:
        self.figures.setdefault(key, Figure(name, unit)).runs.append(value)

    def ratio(
        self,
        label: str,
        num: str,
        den: str,
        floor: float | None = None,
        ceiling: float | None = None,
    ) -> None:
        value = self.figures[num].median / self.figures[den].median
        verdict = ""
        if floor is not None:
            verdict = f"  (floor {floor}x: {'ok' if value >= floor else 'BELOW'})"
        if ceiling is not None:
            verdict = f"  (ceiling {ceiling}x: {'ok' if value <= ceiling else 'ABOVE'})"
        self.lines.append(f"{label:<58} {value:6.2f}x{verdict}")

    def print(self) -> None:
        print(
            f"\nkeyd core benchmark: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
            f"grpcio {grpc.__version__}"
        )
        print(f"{'figure':<58} {'median':>12}  runs")
        for fig in self.figures.values():
            runs = ", ".join(f"{v:,.0f}" if v >= 100 else f"{v:.3f}" for v in fig.runs)
            value = f"{fig.median:,.0f}" if fig.median >= 100 else f"{fig.median:.3f}"
            print(f"{fig.name:<58} {value:>8} {fig.unit:<4} [{runs}]")
        print("\nratios (medians, same run)")
        for line in self.lines:
            print(line)


# -- load generators -------------------------------------------------------------


async def concurrent_rate(
    call: Callable[[], Awaitable[object]], callers: int, seconds: float
) -> float:
    count = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop_at:
            await call()
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(callers)))
    return count / (time.perf_counter() - start)


def unary_sign_rate(socket: Path, request: pb.SignRequest, seconds: float) -> float:
    """Unary Sign calls per second from CALLERS concurrent aio callers on one channel,
    after a short warm-up."""

    async def measure() -> float:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            signer = pb_grpc.SignServiceStub(channel)

            async def call() -> object:
                return await signer.Sign(request)

            await concurrent_rate(call, CALLERS, 0.5)  # warm-up
            return await concurrent_rate(call, CALLERS, seconds)

    return asyncio.run(measure())


def sequential_latency_ms(call: Callable[[], object], n: int) -> tuple[float, float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1000, times[int(len(times) * 0.99)] * 1000


def batch_rate(
    sign_batch: Callable[[pb.SignBatchRequest], pb.SignBatchResponse],
    batch: pb.SignBatchRequest,
    in_flight: int,
    seconds: float,
) -> float:
    """Signatures per second with `in_flight` SignBatch calls outstanding at any time
    (one client thread each, back to back)."""
    counts = [0] * in_flight
    stop_at = time.perf_counter() + seconds

    def caller(index: int) -> None:
        while time.perf_counter() < stop_at:
            response = sign_batch(batch)
            if response.results[0].WhichOneof("result") != "signature":
                raise RuntimeError(f"batch item failed: {response.results[0].error.message}")
            counts[index] += len(response.results)

    start = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def inprocess_rate(seconds: float) -> float:
    key = ec.generate_private_key(ec.SECP256R1())
    algorithm = ec.ECDSA(hashes.SHA256())
    count = 0
    start = time.perf_counter()
    stop_at = start + seconds
    while time.perf_counter() < stop_at:
        for _ in range(100):
            key.sign(PAYLOAD, algorithm)
        count += 100
    return count / (time.perf_counter() - start)


# -- processes --------------------------------------------------------------------


@contextmanager
def ready_process(module: str, *args: str) -> Iterator[None]:
    """`python -m module args...`, from its "ready" line on stdout until the block ends."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"{module} did not start")
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def echo_server(directory: Path) -> Iterator[Path]:
    path = directory / "echo.sock"
    with ready_process("benchmarks.echo_server", str(path)):
        yield path


@contextmanager
def daemon(home: Path, *, keys: int = 0) -> Iterator[Daemon]:
    d = Daemon(home)
    d.init()
    if keys:
        fill_store(d, keys)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def fill_store(d: Daemon, count: int) -> None:
    """Add `count` P-256 store keys through keyd's own catalog (one durable commit each)."""
    db = Database.open(d.store, load_store_secret(SecretKind.RAW_KEY, d.secret))
    try:
        catalog = Catalog(db)
        backend = StoreBackend(catalog)
        for i in range(count):
            generated = backend.generate(KeyType.ECDSA_P256)
            record = KeyRecord(
                public_key=generated.public_key,
                backend="store",
                role="timestamp",
                collection=f"bench.example/{i}",
            )
            catalog.add(record, generated.private_pkcs8)
    finally:
        db.close()


# -- the suite -------------------------------------------------------------------------


def unary_and_batch(report: Report, work: Path, runs: int, seconds: float) -> None:
    with echo_server(work) as echo_path, daemon(work / "d") as d:
        with d.client() as client:
            key_id = client.create_key(KeyType.ECDSA_P256).key_id
        request = pb.SignRequest(key_id=key_id, message=PAYLOAD)
        batch = pb.SignBatchRequest(requests=[request] * BATCH)

        async def concurrent() -> None:
            async with (
                grpc.aio.insecure_channel(f"unix:{echo_path}") as echo_ch,
                grpc.aio.insecure_channel(f"unix:{d.socket}") as keyd_ch,
            ):
                echo = echo_ch.unary_unary(METHOD, None, None)
                bare = echo_ch.unary_unary(
                    BARE_SIGN, pb.SignRequest.SerializeToString, pb.SignResponse.FromString
                )
                signer = pb_grpc.SignServiceStub(keyd_ch)

                async def call_echo() -> object:
                    return await echo(PAYLOAD)

                async def call_bare() -> object:
                    return await bare(request)

                async def call_sign() -> object:
                    return await signer.Sign(request)

                calls = (
                    ("echo16", "echo RPC, 16 concurrent callers", call_echo),
                    ("bare16", "bare signing handler, 16 concurrent callers", call_bare),
                    ("sign16", "Sign, 16 concurrent callers", call_sign),
                )
                for _, _, call in calls:
                    await concurrent_rate(call, CALLERS, 0.5)  # warm-up
                for _ in range(runs):
                    for key, name, call in calls:
                        report.add(key, name, "/s", await concurrent_rate(call, CALLERS, seconds))

        with (
            grpc.insecure_channel(f"unix:{echo_path}") as echo_ch,
            grpc.insecure_channel(f"unix:{d.socket}") as keyd_ch,
        ):
            echo_sync = echo_ch.unary_unary(METHOD, None, None)
            bare_sync = echo_ch.unary_unary(
                BARE_SIGN, pb.SignRequest.SerializeToString, pb.SignResponse.FromString
            )
            bare_batch = echo_ch.unary_unary(
                BARE_BATCH, pb.SignBatchRequest.SerializeToString, pb.SignBatchResponse.FromString
            )
            signer = pb_grpc.SignServiceStub(keyd_ch)
            batch_rate(bare_batch, batch, 2, 0.5)  # warm-up
            for streams in STREAMS:
                batch_rate(signer.SignBatch, batch, streams, 0.5)
            for _ in range(runs):
                report.add(
                    "inproc", "in-process cryptography, 1 thread", "/s", inprocess_rate(seconds)
                )
                report.add(
                    "bare_batch",
                    f"bare batch handler, 2 calls in flight x {BATCH}",
                    "/s",
                    batch_rate(bare_batch, batch, 2, seconds),
                )
                for streams in STREAMS:
                    report.add(
                        f"batch{streams}",
                        f"SignBatch, {streams} calls in flight x {BATCH}",
                        "/s",
                        batch_rate(signer.SignBatch, batch, streams, seconds),
                    )
            sequential_latency_ms(lambda: signer.Sign(request), 300)
            for _ in range(runs):
                p50, _p99 = sequential_latency_ms(lambda: echo_sync(PAYLOAD), 2000)
                report.add("echo_p50", "echo RPC, sequential p50", "ms", p50)
                p50, _p99 = sequential_latency_ms(lambda: bare_sync(request), 2000)
                report.add("bare_p50", "bare signing handler, sequential p50", "ms", p50)
                p50, _p99 = sequential_latency_ms(lambda: signer.Sign(request), 2000)
                report.add("sign_p50", "Sign, sequential p50", "ms", p50)

        # Last: grpc.aio keeps a poller thread busy in this process after its loop closes,
        # which would slow every measurement taken after it.
        asyncio.run(concurrent())

    report.ratio("Sign 16 callers / echo 16 callers", "sign16", "echo16", floor=0.8)
    report.ratio("  bare signing handler / echo (no keyd code)", "bare16", "echo16")
    report.ratio("  Sign / bare signing handler (keyd's own cost)", "sign16", "bare16")
    for streams in STREAMS:
        report.ratio(
            f"SignBatch {streams} streams / in-process 1 thread",
            f"batch{streams}",
            "inproc",
            floor=1.0,
        )
    report.ratio("  bare batch handler / in-process (no keyd code)", "bare_batch", "inproc")
    report.ratio("  SignBatch 2 streams / bare batch handler", "batch2", "bare_batch")
    report.ratio("Sign sequential p50 / echo sequential p50", "sign_p50", "echo_p50")
    report.ratio("  bare signing handler p50 / echo p50 (no keyd code)", "bare_p50", "echo_p50")
    p50 = report.figures["sign_p50"].median
    report.lines.append(
        f"{'Sign sequential p50':<58} {p50:6.3f}ms (target < 0.6 ms: "
        f"{'ok' if p50 < 0.6 else 'ABOVE'})"
    )


def big_store(report: Report, work: Path, runs: int) -> None:
    def latency(d: Daemon, key_ids: list[str], prefix: str, label: str) -> None:
        with grpc.insecure_channel(f"unix:{d.socket}") as channel:
            sign = pb_grpc.SignServiceStub(channel).Sign
            hot = pb.SignRequest(key_id=key_ids[0], message=PAYLOAD)
            rng = random.Random(1)  # noqa: S311 - picks keys to sign with, not secrets
            sequential_latency_ms(lambda: sign(hot), 300)
            for _ in range(runs):
                p50, _ = sequential_latency_ms(lambda: sign(hot), 1500)
                report.add(f"{prefix}_hot", f"{label}: Sign p50, one key", "ms", p50)
                requests = iter(
                    [
                        pb.SignRequest(key_id=k, message=PAYLOAD)
                        for k in rng.choices(key_ids, k=1500)
                    ]
                )

                def sign_next(it: Iterator[pb.SignRequest] = requests) -> object:
                    return sign(next(it))

                p50, _ = sequential_latency_ms(sign_next, 1500)
                report.add(f"{prefix}_rand", f"{label}: Sign p50, random keys", "ms", p50)

    for count, prefix in ((10, "k10"), (10_000, "k10000")):
        with daemon(work / prefix, keys=count) as d:
            with d.client() as client:
                key_ids = [k.key_id for k in client.list_keys()]
            assert len(key_ids) == count
            for _ in range(3):
                d.stop()
                start = time.perf_counter()
                d.start()  # returns at READY=1
                report.add(
                    f"{prefix}_ready",
                    f"{count:,}-key store: start to READY=1",
                    "s",
                    time.perf_counter() - start,
                )
            latency(d, key_ids, prefix, f"{count:,}-key store")
    report.ratio("10,000-key / 10-key Sign p50, one key", "k10000_hot", "k10_hot", ceiling=1.2)
    report.ratio(
        "10,000-key / 10-key Sign p50, random keys", "k10000_rand", "k10_rand", ceiling=1.2
    )
    ready = report.figures["k10000_ready"].median
    report.lines.append(
        f"{'10,000-key store ready (median)':<58} {ready:6.2f}s  "
        f"(target < 1 s: {'ok' if ready < 1 else 'ABOVE'})"
    )


def verify_cost(report: Report, work: Path, runs: int, seconds: float) -> None:
    store = work / "verify"
    store.mkdir(mode=0o700)
    db = Database.create(store / "keyd.db", StoreSecret.generate())
    try:
        catalog = Catalog(db)
        managers = {
            flag: KeyManager(
                catalog,
                {"store": StoreBackend(catalog)},
                verify_store_signatures=flag,
                max_payload_bytes=1 << 22,
            )
            for flag in (False, True)
        }
        key_id = managers[False].create(KeyType.ECDSA_P256).key_id
        data = SignInput.of_message(PAYLOAD)
        for _ in range(runs):
            for flag, manager in managers.items():
                count = 0
                start = time.perf_counter()
                while time.perf_counter() - start < seconds:
                    manager.sign(key_id, data, SignatureEncoding.DER)
                    count += 1
                name = "on" if flag else "off"
                report.add(
                    f"verify_{name}",
                    f"KeyManager.sign in-process, verify {name}",
                    "/s",
                    count / (time.perf_counter() - start),
                )
    finally:
        db.close()
    report.ratio("verify on / verify off (in-process sign rate)", "verify_on", "verify_off")


def run(runs: int, seconds: float, parts: list[str]) -> Report:
    report = Report()
    with tempfile.TemporaryDirectory(prefix="keyd-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o700)
        if "rpc" in parts:
            unary_and_batch(report, work, runs, seconds)
        if "store" in parts:
            big_store(report, work, runs)
        if "verify" in parts:
            verify_cost(report, work, runs, seconds)
        if "notary" in parts:
            from benchmarks.notary import notary_vs_shim  # noqa: PLC0415 - imports core

            notary_vs_shim(report, work, runs, seconds)
        if "access" in parts:
            from benchmarks.access import access_on_off  # noqa: PLC0415 - imports core

            access_on_off(report, work, runs, seconds)
        if "yubikey" in parts:
            from benchmarks.yubikey import yubikey_signing  # noqa: PLC0415 - imports core

            yubikey_signing(report, work, runs, seconds)
        if "pkcs11" in parts:
            from benchmarks.pkcs11 import token_signing  # noqa: PLC0415 - imports core

            token_signing(report, work, runs, seconds)
    return report
