"""A slow backend never stalls keys on other backends.

The daemon's gRPC server and KeyManager run here in-process on a real Unix
socket, with one extra backend written for this test: it signs with a real
Ed25519 key, but only once the test lets it, like a YubiKey waiting for a
touch. (Issue 4's emulated YubiKey will exercise the same path end to end.)
No timing is asserted: store signing that waited for the device would never
finish before the device is released, and the test would fail at its join.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyd.backends.base import Backend, BackendHealth, GeneratedKey
from keyd.client import Client
from keyd.config import AccessConfig, AccessMode, Config, ServerConfig, StoreConfig
from keyd.core.keys import PublicKey
from keyd.core.keytypes import KeyType
from keyd.core.model import KeyRecord
from keyd.daemon.server import open_manager, start_service
from keyd.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from keyd.store.database import Database
from keyd.store.secret import StoreSecret, create_secret_file

WAIT = 60.0  # generous bound on anything that should not hang


class SlowBackend(Backend):
    name = "slow"
    always_verify = True
    max_in_flight = 1

    def __init__(self) -> None:
        self._keys: dict[str, ed25519.Ed25519PrivateKey] = {}
        self.started = threading.Event()
        self.release = threading.Event()

    def generate(self, key_type: KeyType, *, role: str = "", slot: str = "") -> GeneratedKey:
        if key_type is not KeyType.ED25519:
            raise InvalidArgument("the slow test backend makes ed25519 keys only")
        key = ed25519.Ed25519PrivateKey.generate()
        public = PublicKey.from_crypto(key.public_key())
        self._keys[public.notary_key_id] = key
        return GeneratedKey(public, location={"slot": "test"})

    def sign(self, record: KeyRecord, payloads: Sequence[bytes], *, prehashed: bool) -> list[bytes]:
        self.started.set()
        self.release.wait(WAIT)
        return [self._keys[record.key_id].sign(p) for p in payloads]

    def delete(self, record: KeyRecord) -> None:
        self._keys.pop(record.key_id, None)

    def health(self) -> BackendHealth:
        return BackendHealth(self.name, True, "test backend")


@pytest.fixture
def server(short_tmp: Path) -> Iterator[tuple[Client, SlowBackend]]:
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    secret = StoreSecret.generate()
    create_secret_file(short_tmp / "store.key", secret)
    Database.create(state / "keyd.db", secret).close()
    config = Config(
        server=ServerConfig(socket=short_tmp / "run" / "keyd.sock", workers=2),
        store=StoreConfig(path=state / "keyd.db", secret_file=short_tmp / "store.key"),
        # Backend isolation, not access control, is tested here.
        access=AccessConfig(mode=AccessMode.OPEN),
    )
    slow = SlowBackend()
    db, manager = open_manager(config, {"slow": slow})
    running = start_service(manager, config)
    try:
        with Client(config.server.socket, timeout=30) as client:
            yield client, slow
    finally:
        slow.release.set()
        running.stop(grace=WAIT)
        db.close()


def test_slow_backend_does_not_stall_store_keys(server: tuple[Client, SlowBackend]) -> None:
    client, slow = server
    slow_key = client.create_key(KeyType.ED25519, backend="slow")
    store_key = client.create_key(KeyType.ECDSA_P256)

    slow_result: list[object] = []
    waiter = threading.Thread(target=lambda: slow_result.append(client.sign(slow_key.key_id, b"m")))
    waiter.start()
    assert slow.started.wait(10)

    # While the device is busy: store keys sign from many callers ...
    errors: list[BaseException] = []

    def store_signer() -> None:
        try:
            for _ in range(20):
                client.sign(store_key.key_id, b"payload")
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    signers = [threading.Thread(target=store_signer) for _ in range(8)]
    for t in signers:
        t.start()
    for t in signers:
        t.join(WAIT)
    assert not any(t.is_alive() for t in signers), "store signing waited for the slow device"
    assert errors == []
    assert waiter.is_alive()  # the device is still busy: nothing above waited for it

    # ... and a second request for the busy device is refused at once, not queued.
    with pytest.raises(ResourceExhausted, match="backend 'slow' already has 1 requests"):
        client.sign(slow_key.key_id, b"m")

    slow.release.set()
    waiter.join(WAIT)
    assert len(slow_result) == 1  # the slow signature completed and was verified


def test_a_signature_finished_after_its_key_was_deleted_is_discarded(
    server: tuple[Client, SlowBackend],
) -> None:
    client, slow = server
    key = client.create_key(KeyType.ED25519, backend="slow")
    outcome: list[object] = []

    def sign() -> None:
        try:
            outcome.append(client.sign(key.key_id, b"m"))
        except FailedPrecondition as exc:
            outcome.append(exc)

    signer = threading.Thread(target=sign)
    signer.start()
    assert slow.started.wait(10)  # the device is making the signature ...
    client.delete_key(key.key_id)  # ... when the key is deleted
    slow.release.set()
    signer.join(WAIT)
    (result,) = outcome
    assert isinstance(result, FailedPrecondition)
    assert "deleted while signing" in result.message
