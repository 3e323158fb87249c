"""Issue 6's benchmark: signing with caller identity, policy and audit on vs off.

Two daemons, measured in turn in the same run (only one is busy at a time):
  on:  [access] mode = "policy": every connection relayed and tagged with the
       caller's SO_PEERCRED identity, every request checked against a 20-rule
       policy (the caller's rule last) and appended to the hash-chained audit log
  off: [access] mode = "open": gRPC straight on the socket, nothing checked
Same client, ECDSA P-256 store keys, 1 KiB payloads. Floor: on >= 0.8x off.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from benchmarks.core import (
    BATCH,
    PAYLOAD,
    Report,
    batch_rate,
    sequential_latency_ms,
    unary_sign_rate,
)
from keyd.core.keytypes import KeyType
from keyd.v1 import keyd_pb2 as pb
from keyd.v1 import keyd_pb2_grpc as pb_grpc
from tests.harness import Daemon, allow_everything

# Nineteen rules for other callers, then the one that matches: the policy's
# per-caller and per-key caches are what is measured, not a one-rule shortcut.
_OTHER_RULES = "".join(
    f'[[allow]]\nusers = [{50000 + n}]\noperations = ["sign"]\nroles = ["r{n}"]\n\n'
    for n in range(19)
)


def _daemon(home: Path, *, enforcing: bool) -> Daemon:
    if enforcing:
        return Daemon(home, policy=_OTHER_RULES + allow_everything(os.getuid()))
    return Daemon(home, access_extra='mode = "open"')


def _measure(report: Report, d: Daemon, tag: str, runs: int, seconds: float) -> None:
    with d.client() as client:
        key_id = client.create_key(KeyType.ECDSA_P256, role="timestamp").key_id
    request = pb.SignRequest(key_id=key_id, message=PAYLOAD)
    batch = pb.SignBatchRequest(requests=[request] * BATCH)

    name = "on" if tag == "on" else "off"
    for _ in range(runs):
        report.add(
            f"sign16_{tag}",
            f"Sign, 16 callers, access {name}",
            "/s",
            unary_sign_rate(d.socket, request, seconds),
        )
    with grpc.insecure_channel(f"unix:{d.socket}") as channel:
        signer = pb_grpc.SignServiceStub(channel)
        batch_rate(signer.SignBatch, batch, 2, 0.5)  # warm-up
        sequential_latency_ms(lambda: signer.Sign(request), 300)
        for _ in range(runs):
            report.add(
                f"batch_{tag}",
                f"SignBatch, 2 calls x {BATCH}, access {name}",
                "/s",
                batch_rate(signer.SignBatch, batch, 2, seconds),
            )
            p50, _ = sequential_latency_ms(lambda: signer.Sign(request), 1000)
            report.add(f"p50_{tag}", f"Sign sequential p50, access {name}", "ms", p50)


def access_on_off(report: Report, work: Path, runs: int, seconds: float) -> None:
    on = _daemon(work / "on", enforcing=True)
    off = _daemon(work / "off", enforcing=False)
    for d in (on, off):
        d.init()
        d.start()
    try:
        # Interleaved, one run at a time, so drift on a shared machine hits both.
        for _ in range(runs):
            _measure(report, off, "off", 1, seconds)
            _measure(report, on, "on", 1, seconds)
    finally:
        on.stop()
        off.stop()
    report.ratio("Sign 16 callers: access on / off", "sign16_on", "sign16_off", floor=0.8)
    report.ratio("SignBatch: access on / off", "batch_on", "batch_off", floor=0.8)
    report.ratio("Sign sequential p50: access on / off", "p50_on", "p50_off")
