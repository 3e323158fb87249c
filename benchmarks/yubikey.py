"""Issue 4's benchmark: signing with a YubiKey through the daemon, on emulated cards.

What is emulated: the YubiKey (tests/piv/emulator.py behind vpcd). pcscd, pyscard,
yubikit and keyd are real, so the latencies are keyd's own overhead plus the PC/SC
round trips; a real YubiKey adds its ~20-100 ms of on-card work per signature.

Figures, one daemon, 1 KiB payloads:
  Sign sequential p50/p99 with a YubiKey key (P-256, Ed25519; PIN policy ALWAYS: each
  signature is a VERIFY and a GENERAL AUTHENTICATE) vs a store key (baseline)
  store-key Sign, 16 callers: idle, vs while a YubiKey signature is in progress (the
  card waits for a touch), floor 0.9x; and vs YubiKey signatures back to back (the
  emulator and pcscd then take CPU a real key does not), reported.
Needs root (the PC/SC rig's namespaces); without it the part says why and is skipped.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from pathlib import Path

from benchmarks.core import PAYLOAD, Report, sequential_latency_ms, unary_sign_rate
from keyd.client import Client
from keyd.core.keytypes import KeyType
from keyd.v1 import keyd_pb2 as pb
from tests.harness import Daemon
from tests.piv.rig import Card, missing
from tests.piv.yubikey_daemon import YubiKeyRig

_LATENCY_SIGNS = 200
_TOUCH_WAIT = 600.0  # the pending signature's card waits this long unless touched


@contextlib.contextmanager
def _pending_yubikey_sign(rig: YubiKeyRig, daemon: Daemon, key_id: str) -> Iterator[None]:
    """A YubiKey signature in progress for as long as the block runs: its card waits
    for a touch, which comes at the end."""
    asked = threading.Event()
    failures: list[BaseException] = []

    def sign() -> None:
        try:
            with daemon.client(timeout=_TOUCH_WAIT) as client:
                client.sign(key_id, PAYLOAD, on_touch=lambda device: asked.set())
        except BaseException as exc:  # noqa: BLE001 - reported after the block
            failures.append(exc)

    thread = threading.Thread(target=sign)
    thread.start()
    try:
        if not asked.wait(30):
            raise RuntimeError(f"the YubiKey signature did not start waiting: {failures}")
        yield
    finally:
        rig.touch(1, seconds=2.0)
        thread.join()
    if failures:
        raise RuntimeError(f"the pending YubiKey signature failed: {failures}")


@contextlib.contextmanager
def _busy_yubikey(daemon: Daemon, key_id: str) -> Iterator[None]:
    """YubiKey signatures back to back for as long as the block runs."""
    stop = threading.Event()
    signed: list[int] = [0]
    failures: list[BaseException] = []

    def loop() -> None:
        try:
            with daemon.client() as client:
                while not stop.is_set():
                    client.sign(key_id, PAYLOAD)
                    signed[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported after the block
            failures.append(exc)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if failures or not signed[0]:
        raise RuntimeError(f"the YubiKey was not signing during the measurement: {failures}")


def yubikey_signing(report: Report, work: Path, runs: int, seconds: float) -> None:
    reason = missing()
    if reason:
        report.lines.append(f"yubikey: skipped: {reason}")
        return
    # Card 0 signs without a touch; card 1 waits for one (the pending signature).
    waits = Card("5.7.2", 35000002, auto_touch=False, touch_timeout=_TOUCH_WAIT)
    rig = YubiKeyRig([Card("5.7.2", 35000001), waits])
    rig.start()
    try:
        tables = rig.table("yk", 0) + rig.table("touch", 1, extra='touch_policy = "always"')
        daemon = rig.daemon(tables)
        with daemon.client() as client:
            keys = {
                key_type: client.create_key(key_type, backend="yubikey:yk", slot=slot).key_id
                for key_type, slot in ((KeyType.ECDSA_P256, "9c"), (KeyType.ED25519, "82"))
            }
            touch_key = client.create_key(
                KeyType.ECDSA_P256, backend="yubikey:touch", on_touch=rig.finger(1)
            ).key_id
            store_key = client.create_key(KeyType.ECDSA_P256, role="timestamp").key_id
            _latencies(report, client, keys, store_key, runs)
        request = pb.SignRequest(key_id=store_key, message=PAYLOAD)
        for _ in range(runs):  # interleaved, so drift hits every condition alike
            idle = unary_sign_rate(daemon.socket, request, seconds)
            report.add("yk_idle", "store Sign, 16 callers, YubiKey idle", "/s", idle)
            with _pending_yubikey_sign(rig, daemon, touch_key):
                report.add(
                    "yk_pending",
                    "store Sign, 16 callers, a YubiKey sign in progress",
                    "/s",
                    unary_sign_rate(daemon.socket, request, seconds),
                )
            with _busy_yubikey(daemon, keys[KeyType.ECDSA_P256]):
                report.add(
                    "yk_busy",
                    "store Sign, 16 callers, YubiKey signing back to back",
                    "/s",
                    unary_sign_rate(daemon.socket, request, seconds),
                )
    finally:
        rig.stop()
    for key_type in (KeyType.ECDSA_P256, KeyType.ED25519):
        name = key_type.value
        report.ratio(f"YubiKey {name} Sign p50 / store Sign p50", f"yk_{name}_p50", "yk_store_p50")
    report.ratio(
        "store Sign 16 callers: YubiKey sign in progress / idle", "yk_pending", "yk_idle", floor=0.9
    )
    report.ratio("store Sign 16 callers: YubiKey back to back / idle", "yk_busy", "yk_idle")


def _latencies(
    report: Report, client: Client, keys: dict[KeyType, str], store_key: str, runs: int
) -> None:
    for key_id in (*keys.values(), store_key):
        client.sign(key_id, PAYLOAD)  # warm: the card found, the plan built
    for _ in range(runs):
        for key_type, key_id in keys.items():
            name = key_type.value
            p50, p99 = sequential_latency_ms(
                functools.partial(client.sign, key_id, PAYLOAD), _LATENCY_SIGNS
            )
            report.add(f"yk_{name}_p50", f"YubiKey {name}: Sign sequential p50", "ms", p50)
            report.add(f"yk_{name}_p99", f"YubiKey {name}: Sign sequential p99", "ms", p99)
        p50, _ = sequential_latency_ms(lambda: client.sign(store_key, PAYLOAD), _LATENCY_SIGNS)
        report.add("yk_store_p50", "store key: Sign sequential p50", "ms", p50)
