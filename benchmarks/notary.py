"""Issue 5's benchmarks: `keyd notary-signer` against Debian's notary-signer.

Both signers run side by side with the same throwaway PKI; the same Python gRPC
client (mutual TLS, one channel) measures each, interleaved run by run:
  Sign, sequential (rate and p50) and with 16 concurrent callers, P-256, 1 KiB,
  also for a bare Python signer (benchmarks.bare_notary_signer: the shim's server
  model signing in-process, no keyd): the ceiling of a shim written on grpcio
  `notary publish` of one target (server-managed snapshot), each signer behind
  its own notary-server
Floors: the shim's concurrent rate at least 0.5x notary-signer's; publish within 1.2x.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc

from benchmarks.core import (
    CALLERS,
    PAYLOAD,
    Report,
    concurrent_rate,
    ready_process,
    sequential_latency_ms,
)
from keyd.notary.wire import signer_pb2 as pb
from keyd.notary.wire import signer_pb2_grpc as pb_grpc
from tests.harness import Daemon, NotaryShim
from tests.notary_rig import NotaryClient, NotaryServer, NotarySigner, Pki, free_port, make_pki

GUN = "bench.example.com/app"
BARE = "bare Python signer"
PUBLISHES = 9


def _credentials(pki: Pki) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )


def _new_key(channel: grpc.Channel) -> pb.SignatureRequest:
    keys = pb_grpc.KeyManagementStub(channel)
    created = keys.CreateKey(pb.CreateKeyRequest(algorithm="ecdsa", gun=GUN, role="timestamp"))
    return pb.SignatureRequest(keyID=created.keyInfo.keyID, content=PAYLOAD)


@contextmanager
def _signers(work: Path) -> Iterator[tuple[Pki, dict[str, int]]]:
    """Debian's notary-signer and keyd with its shim; yields the PKI and each one's port."""
    pki = make_pki(work / "pki")
    with ExitStack() as stack:
        real = stack.enter_context(NotarySigner(pki))
        real.start()
        daemon = Daemon(work / "keyd")
        daemon.init()
        daemon.start()
        stack.callback(daemon.stop)
        shim = NotaryShim(
            work / "shim",
            daemon,
            port=free_port(),
            cert=pki.signer_cert,
            key=pki.signer_key,
            client_ca=pki.ca_cert,
        )
        shim.start()
        stack.callback(shim.stop)
        bare = stack.enter_context(_bare_signer(pki))
        yield pki, {"notary-signer": real.port, "keyd shim": shim.port, BARE: bare}


@contextmanager
def _bare_signer(pki: Pki) -> Iterator[int]:
    """benchmarks.bare_notary_signer on a free port; yields the port."""
    port = free_port()
    files = (pki.signer_cert, pki.signer_key, pki.ca_cert)
    with ready_process("benchmarks.bare_notary_signer", str(port), *map(str, files)):
        yield port


def sign_rates(report: Report, pki: Pki, ports: dict[str, int], runs: int, seconds: float) -> None:
    creds = _credentials(pki)
    channels = {n: grpc.secure_channel(f"127.0.0.1:{p}", creds) for n, p in ports.items()}
    try:
        requests = {n: _new_key(ch) for n, ch in channels.items()}
        sign = {
            n: functools.partial(pb_grpc.SignerStub(ch).Sign, requests[n])
            for n, ch in channels.items()
        }
        for call in sign.values():
            sequential_latency_ms(call, 200)
        for _ in range(runs):
            for name, call in sign.items():
                start = time.perf_counter()
                p50, _ = sequential_latency_ms(call, 1000)
                rate = 1000 / (time.perf_counter() - start)
                report.add(f"{name}_p50", f"{name}: Sign sequential p50", "ms", p50)
                report.add(f"{name}_seq", f"{name}: Sign sequential", "/s", rate)
    finally:
        for ch in channels.values():
            ch.close()

    async def concurrent() -> None:
        aio_creds = _credentials(pki)
        for _ in range(runs):
            for name, port in ports.items():
                async with grpc.aio.secure_channel(f"127.0.0.1:{port}", aio_creds) as channel:
                    stub = pb_grpc.SignerStub(channel)
                    call = functools.partial(stub.Sign, requests[name])
                    await concurrent_rate(call, CALLERS, 0.3)
                    report.add(
                        f"{name}_c16",
                        f"{name}: Sign, {CALLERS} concurrent callers",
                        "/s",
                        await concurrent_rate(call, CALLERS, seconds),
                    )

    asyncio.run(concurrent())


def publish_times(report: Report, work: Path, pki: Pki, ports: dict[str, int]) -> None:
    """Median wall time of `notary publish` of one target, per signer."""
    target = work / "target.txt"
    target.write_text("one target\n")
    with ExitStack() as stack:
        clients = {}
        for name, port in ports.items():
            if name == BARE:
                continue  # it keeps one key: not a signer notary-server can publish with
            server = stack.enter_context(NotaryServer(pki, port))
            server.start()
            client = stack.enter_context(NotaryClient(server.url, pki.ca_cert))
            client.init(GUN)
            client.run("key", "rotate", GUN, "snapshot", "-r")  # server-managed snapshot
            client.add(GUN, "warm-up", target)
            client.publish(GUN)
            clients[name] = client
        times: dict[str, list[float]] = {name: [] for name in clients}
        for i in range(PUBLISHES):
            for name, client in clients.items():
                client.add(GUN, f"v{i}", target)
                start = time.perf_counter()
                client.publish(GUN)
                times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            for value in values:
                report.add(
                    f"{name}_publish", f"{name}: notary publish, one target", "ms", value * 1000
                )


def notary_vs_shim(report: Report, work: Path, runs: int, seconds: float) -> None:
    with _signers(work) as (pki, ports):
        sign_rates(report, pki, ports, runs, seconds)
        publish_times(report, work, pki, ports)
    report.ratio(
        "shim / notary-signer, Sign 16 callers", "keyd shim_c16", "notary-signer_c16", floor=0.5
    )
    report.ratio(
        "  bare Python signer / notary-signer (ceiling in Python)",
        f"{BARE}_c16",
        "notary-signer_c16",
    )
    report.ratio("shim / notary-signer, Sign sequential", "keyd shim_seq", "notary-signer_seq")
    report.ratio(
        "shim / notary-signer, notary publish time",
        "keyd shim_publish",
        "notary-signer_publish",
        ceiling=1.2,
    )
