"""keyd's gRPC API against a real daemon process on a real Unix socket.

Every signature is checked with an independent verifier (cryptography, or
securesystemslib for the DER form).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from securesystemslib.signer import Signature as SslibSignature
from securesystemslib.signer import SSlibKey

from keyd.client import Client, SignItem
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.model import KeyRecord
from keyd.errors import FailedPrecondition, InvalidArgument, KeydError, NotFound, PayloadTooLarge
from keyd.v1 import keyd_pb2 as pb
from keyd.v1 import keyd_pb2_grpc as pb_grpc
from tests.harness import Daemon, run_callers
from tests.verify import independent_verify

MESSAGE = b"\x00payload\xff" * 100


@pytest.fixture(scope="module")
def client(shared_daemon: Daemon) -> Iterator[Client]:
    with shared_daemon.client() as c:
        yield c


@pytest.fixture(scope="module")
def stubs(
    shared_daemon: Daemon,
) -> Iterator[tuple[pb_grpc.KeyServiceStub, pb_grpc.SignServiceStub]]:
    with grpc.insecure_channel(f"unix:{shared_daemon.socket}") as channel:
        yield pb_grpc.KeyServiceStub(channel), pb_grpc.SignServiceStub(channel)


@pytest.fixture(scope="module")
def keys(client: Client) -> dict[KeyType, KeyRecord]:
    return {
        t: client.create_key(t, role="timestamp", collection="example.com/app") for t in KeyType
    }


@pytest.mark.parametrize("key_type", list(KeyType), ids=lambda t: t.value)
def test_sign_each_key_type_and_verify_independently(
    client: Client, keys: dict[KeyType, KeyRecord], key_type: KeyType
) -> None:
    record = keys[key_type]
    sig = client.sign(record.key_id, MESSAGE)
    assert sig.key_id == record.key_id
    assert sig.key_type is key_type
    independent_verify(record, sig.signature, MESSAGE, sig.encoding)
    with pytest.raises(InvalidSignature):
        independent_verify(record, sig.signature, MESSAGE + b"x", sig.encoding)
    # securesystemslib accepts the default (DER for ECDSA) form with the TUF key ID.
    sslib = SSlibKey.from_crypto(record.public_key.key)
    assert sslib.keyid == record.public_key.tuf_key_id
    sslib.verify_signature(SslibSignature(sslib.keyid, sig.signature.hex()), MESSAGE)


@pytest.mark.parametrize(
    ("key_type", "width"), [(KeyType.ECDSA_P256, 64), (KeyType.ECDSA_P384, 96)]
)
def test_ecdsa_raw_encoding_for_notary(
    client: Client, keys: dict[KeyType, KeyRecord], key_type: KeyType, width: int
) -> None:
    record = keys[key_type]
    for _ in range(20):
        sig = client.sign(record.key_id, MESSAGE, encoding=SignatureEncoding.RAW)
        assert sig.encoding is SignatureEncoding.RAW
        assert len(sig.signature) == width
        independent_verify(record, sig.signature, MESSAGE, SignatureEncoding.RAW)


@pytest.mark.parametrize("key_type", [KeyType.ECDSA_P256, KeyType.ECDSA_P384, KeyType.RSA_3072])
def test_sign_precomputed_digest(
    client: Client, keys: dict[KeyType, KeyRecord], key_type: KeyType
) -> None:
    record = keys[key_type]
    digest = hashlib.new(key_type.hash_algorithm().name, MESSAGE).digest()
    sig = client.sign(record.key_id, digest=digest)
    independent_verify(record, sig.signature, MESSAGE, sig.encoding)


def test_key_metadata_and_ids(client: Client, keys: dict[KeyType, KeyRecord]) -> None:
    record = keys[KeyType.ECDSA_P256]
    got = client.get_key(record.key_id)
    assert got.key_id == record.key_id == got.public_key.notary_key_id
    assert got.backend == "store"
    assert got.role == "timestamp"
    assert got.collection == "example.com/app"
    assert got.created_unix_ms > 0
    assert len(got.key_id) == 64


def test_list_filters(client: Client) -> None:
    a = client.create_key(
        KeyType.ED25519, role="snapshot", collection="list.test/a", labels={"team": "red"}
    )
    b = client.create_key(KeyType.ED25519, role="timestamp", collection="list.test/a")
    c = client.create_key(
        KeyType.ECDSA_P256,
        role="snapshot",
        collection="list.test/b",
        labels={"team": "red", "env": "prod"},
    )

    def ids(records: list[KeyRecord]) -> set[str]:
        return {r.key_id for r in records}

    assert ids(client.list_keys(collection="list.test/a")) == {a.key_id, b.key_id}
    assert ids(client.list_keys(role="snapshot", collection="list.test/b")) == {c.key_id}
    assert ids(client.list_keys(labels={"team": "red"})) == {a.key_id, c.key_id}
    assert ids(client.list_keys(labels={"team": "red", "env": "prod"})) == {c.key_id}
    assert {a.key_id, b.key_id, c.key_id} <= ids(client.list_keys(backend="store"))
    assert client.list_keys(backend="pkcs11") == []


def test_delete_then_purge_and_the_key_is_gone(client: Client) -> None:
    record = client.create_key(KeyType.ECDSA_P256)
    client.delete_key(record.key_id)
    with pytest.raises(FailedPrecondition, match="pending deletion"):
        client.sign(record.key_id, MESSAGE)
    client.purge_key(record.key_id)
    with pytest.raises(NotFound, match="no key with ID"):
        client.sign(record.key_id, MESSAGE)
    with pytest.raises(NotFound):
        client.delete_key(record.key_id)


@pytest.mark.parametrize("in_flight", [1, 2], ids=["blocking", "futures"])
def test_sign_batch_mixed_results_in_order(
    client: Client, keys: dict[KeyType, KeyRecord], in_flight: int
) -> None:
    p256 = keys[KeyType.ECDSA_P256]
    ed = keys[KeyType.ED25519]
    items = [
        SignItem(p256.key_id, message=b"one"),
        SignItem("0" * 64, message=b"two"),  # unknown key
        SignItem(ed.key_id, message=b"three"),
        SignItem(ed.key_id, digest=b"\0" * 32),  # Ed25519 cannot sign a digest
        SignItem(p256.key_id, message=b"five", encoding=SignatureEncoding.RAW),
    ] * 30
    results = list(client.sign_batch(items, batch_size=7, in_flight=in_flight))
    assert len(results) == len(items)
    for item, result in zip(items, results, strict=True):
        if item.key_id == "0" * 64:
            assert isinstance(result, NotFound)
        elif item.digest is not None:
            assert isinstance(result, InvalidArgument)
            assert "send the message, not a digest" in result.message
        else:
            assert not isinstance(result, KeydError), result
            record = p256 if item.key_id == p256.key_id else ed
            assert item.message is not None
            independent_verify(record, result.signature, item.message, result.encoding)


def test_concurrent_signing_from_many_threads(
    client: Client, keys: dict[KeyType, KeyRecord]
) -> None:
    record = keys[KeyType.ECDSA_P256]

    def worker(n: int) -> None:
        for i in range(25):
            message = f"{n}-{i}".encode()
            sig = client.sign(record.key_id, message)
            independent_verify(record, sig.signature, message, sig.encoding)

    run_callers(worker, 16)


# -- bad input ---------------------------------------------------------------


def _code(call: object, request: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)  # type: ignore[operator]
    error = info.value
    return error.code(), str(error.details())


def test_unknown_key(stubs: tuple[pb_grpc.KeyServiceStub, pb_grpc.SignServiceStub]) -> None:
    _, signer = stubs
    code, details = _code(signer.Sign, pb.SignRequest(key_id="a" * 64, message=b"m"))
    assert code is grpc.StatusCode.NOT_FOUND
    assert "no key with ID" in details


@pytest.mark.parametrize("key_id", ["", "abc", "A" * 64, "g" * 64, "a" * 65, "x" * 100000])
def test_malformed_key_id(
    stubs: tuple[pb_grpc.KeyServiceStub, pb_grpc.SignServiceStub], key_id: str
) -> None:
    keys_stub, signer = stubs
    code, details = _code(signer.Sign, pb.SignRequest(key_id=key_id, message=b"m"))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed key ID" in details
    assert len(details) < 300  # a huge bad ID is not echoed back whole
    code, _ = _code(keys_stub.GetKey, pb.GetKeyRequest(key_id=key_id))
    assert code is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("key_type", [0, 99])
def test_unsupported_key_type(
    stubs: tuple[pb_grpc.KeyServiceStub, pb_grpc.SignServiceStub], key_type: int
) -> None:
    keys_stub, _ = stubs
    code, details = _code(keys_stub.CreateKey, pb.CreateKeyRequest(key_type=key_type))  # type: ignore[arg-type]
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "unsupported or missing key type" in details


def test_unsupported_encoding(
    stubs: tuple[pb_grpc.KeyServiceStub, pb_grpc.SignServiceStub], keys: dict[KeyType, KeyRecord]
) -> None:
    _, signer = stubs
    ed = keys[KeyType.ED25519].key_id
    code, details = _code(
        signer.Sign, pb.SignRequest(key_id=ed, message=b"m", encoding=pb.SIGNATURE_ENCODING_RAW)
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "applies to ECDSA keys only" in details
    code, details = _code(signer.Sign, pb.SignRequest(key_id=ed, message=b"m", encoding=42))  # type: ignore[arg-type]
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "unsupported signature encoding" in details


@pytest.mark.parametrize(
    ("key_type", "length"),
    [(KeyType.ECDSA_P256, 20), (KeyType.ECDSA_P384, 32), (KeyType.RSA_3072, 0)],
)
def test_digest_of_wrong_length(
    stubs: tuple[pb_grpc.KeyServiceStub, pb_grpc.SignServiceStub],
    keys: dict[KeyType, KeyRecord],
    key_type: KeyType,
    length: int,
) -> None:
    _, signer = stubs
    code, details = _code(
        signer.Sign, pb.SignRequest(key_id=keys[key_type].key_id, digest=b"\1" * length)
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert f"digest is {length} bytes" in details


def test_empty_and_missing_payload(
    stubs: tuple[pb_grpc.KeyServiceStub, pb_grpc.SignServiceStub], keys: dict[KeyType, KeyRecord]
) -> None:
    _, signer = stubs
    key_id = keys[KeyType.ECDSA_P256].key_id
    code, details = _code(signer.Sign, pb.SignRequest(key_id=key_id, message=b""))
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "nothing to sign: the message is empty",
    )
    code, details = _code(signer.Sign, pb.SignRequest(key_id=key_id))
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "nothing to sign: set message or digest",
    )


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("role", "bad role!", "invalid role"),
        ("collection", "/leading/slash", "invalid collection"),
        ("labels", {"Bad Name": "x"}, "invalid label name"),
        ("labels", {"ok": "bad\nvalue"}, "invalid value for label"),
        ("backend", "nosuch", "unknown backend 'nosuch'; this daemon has: store"),
    ],
)
def test_invalid_key_metadata(
    stubs: tuple[pb_grpc.KeyServiceStub, pb_grpc.SignServiceStub],
    client: Client,
    field: str,
    value: object,
    expected: str,
) -> None:
    keys_stub, _ = stubs
    before = len(client.list_keys())
    request = pb.CreateKeyRequest(key_type=pb.KEY_TYPE_ED25519, **{field: value})  # type: ignore[arg-type]
    code, details = _code(keys_stub.CreateKey, request)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in details
    assert len(client.list_keys()) == before  # nothing half-created


def test_client_side_payload_type_errors(client: Client, keys: dict[KeyType, KeyRecord]) -> None:
    with pytest.raises(InvalidArgument):
        client.sign(keys[KeyType.ECDSA_P256].key_id, b"m", digest=b"\0" * 32)


def test_health_check_but_no_streams_outside_the_policy(shared_daemon: Daemon) -> None:
    with grpc.insecure_channel(f"unix:{shared_daemon.socket}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "keyd.v1.KeyService", "keyd.v1.SignService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND

        # Streams that would hold a worker thread for anyone who can open the socket,
        # unchecked by the policy, are not served.
        with pytest.raises(grpc.RpcError) as info:
            next(iter(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)))
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(
                stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                )
            )
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_reflection_in_open_mode(short_tmp: Path) -> None:
    d = Daemon(short_tmp / "d", access_extra='mode = "open"')
    d.init()
    d.start()
    try:
        with grpc.insecure_channel(f"unix:{d.socket}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            names = {s.name for r in replies for s in r.list_services_response.service}
        assert {"keyd.v1.KeyService", "keyd.v1.SignService", "keyd.v1.StatusService"} <= names
        assert "callers are not identified" in d.logs()
    finally:
        assert d.stop() == 0


def test_status(client: Client, shared_daemon: Daemon) -> None:
    status = client.status()
    assert status.socket == str(shared_daemon.socket)
    assert status.keys == len(client.list_keys())
    assert [(b.name, b.healthy) for b in status.backends] == [("store", True)]


def test_payload_limit_error_type_is_preserved(daemon: Daemon) -> None:
    # The default limit is 4 MiB; one byte over is refused with keyd's own message.
    with daemon.client() as c:
        key = c.create_key(KeyType.ECDSA_P256)
        with pytest.raises(PayloadTooLarge, match="limit is 4194304"):
            c.sign(key.key_id, b"x" * (4 * 1024 * 1024 + 1))
        assert c.sign(key.key_id, b"x" * (4 * 1024 * 1024)).signature
