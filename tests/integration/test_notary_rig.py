"""The Notary rig (tests/notary_rig.py) against Debian's real notary-signer.

These tests pin down what "works with Notary" means before keyd's notary-signer shim
exists: the same recipe, run later with notary-server pointed at the shim, must give
a repository that passes the same independent verification. Everything runs on
127.0.0.1 with a throwaway PKI; nothing is mocked.
"""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import utils
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.notary_rig import (
    KeyAlgorithm,
    NotaryClient,
    NotaryServer,
    NotarySigner,
    Pki,
    RepositoryVerificationError,
    VerifiedRepo,
    make_pki,
    verify_metadata,
    verify_repository,
)

GUN = "example.com/keyd/app"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("notary") / "pki")


@pytest.fixture
def signer(pki: Pki) -> Iterator[NotarySigner]:
    """The real notary-signer; checked to be still running (never crashed) at the end."""
    s = NotarySigner(pki)
    try:
        s.start()
        yield s
        # Notary's daemons do not trap SIGTERM: dying of it means it was still up.
        assert s.stop() == -signal.SIGTERM, s.logs()
    finally:
        s.close()


@pytest.fixture(params=["ecdsa", "ed25519"])
def server(
    request: pytest.FixtureRequest, pki: Pki, signer: NotarySigner
) -> Iterator[NotaryServer]:
    algorithm: KeyAlgorithm = request.param
    s = NotaryServer(pki, signer.port, key_algorithm=algorithm)
    try:
        s.start()
        yield s
        assert s.stop() == -signal.SIGTERM, s.logs()
    finally:
        s.close()


@pytest.fixture
def client(pki: Pki, server: NotaryServer) -> Iterator[NotaryClient]:
    c = NotaryClient(server.url, pki.ca_cert)
    try:
        yield c
    finally:
        c.close()


def test_publish_and_rotate_server_keys_with_the_real_signer(
    server: NotaryServer, client: NotaryClient, tmp_path: Path
) -> None:
    payload = tmp_path / "payload.txt"
    payload.write_text("release artefact\n")
    client.init(GUN)
    client.add(GUN, "v1", payload)
    client.publish(GUN)
    assert client.list(GUN) == ["v1"]
    first = verify_repository(server, GUN)
    assert first.key_types_of("root") == {"ecdsa-x509"}
    assert first.key_types_of("targets") == {"ecdsa"}
    assert first.key_types_of("snapshot") == {"ecdsa"}  # still held by the client
    assert first.key_types_of("timestamp") == {server.key_algorithm}

    client.rotate(GUN, "snapshot", remote=True)
    client.add(GUN, "v2", payload)
    client.publish(GUN)  # snapshot and timestamp both signed by the signer now
    client.rotate(GUN, "timestamp", remote=True)

    with client.fresh() as newcomer:
        assert newcomer.list(GUN) == ["v1", "v2"]
    assert server.health() == 200
    repo = verify_repository(server, GUN)
    assert repo.target_names() == ["v1", "v2"]
    assert repo.key_types_of("snapshot") == {server.key_algorithm}
    assert repo.key_types_of("timestamp") == {server.key_algorithm}
    for role in ("snapshot", "timestamp"):
        assert repo.signed_by(role) != first.signed_by(role), role
    for role in ("root", "targets"):
        assert repo.signed_by(role) == first.signed_by(role), role
    assert repo.roles["timestamp"].version > first.roles["timestamp"].version
    _verifier_catches_tampering(repo)


def _with(repo: VerifiedRepo, role: str, document: dict[str, Any]) -> dict[str, bytes]:
    return {**repo.raw, role: json.dumps(document).encode()}


def _verifier_catches_tampering(repo: VerifiedRepo) -> None:
    """verify_metadata() must fail on broken input, or passing it would mean nothing."""
    assert verify_metadata(repo.gun, repo.raw).signed_by("timestamp") == repo.signed_by("timestamp")
    timestamp = json.loads(repo.raw["timestamp"])
    sig = base64.b64decode(timestamp["signatures"][0]["sig"])

    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    timestamp["signatures"][0]["sig"] = base64.b64encode(flipped).decode()
    with pytest.raises(RepositoryVerificationError, match=r"timestamp\.json: the signature"):
        verify_metadata(repo.gun, _with(repo, "timestamp", timestamp))

    if repo.key_types_of("timestamp") == {"ecdsa"}:
        # The same valid signature, DER-encoded: what a careless signer would return.
        der = utils.encode_dss_signature(
            int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        )
        timestamp["signatures"][0]["sig"] = base64.b64encode(der).decode()
        with pytest.raises(RepositoryVerificationError, match=r"timestamp\.json: the signature"):
            verify_metadata(repo.gun, _with(repo, "timestamp", timestamp))

    timestamp["signatures"] = []
    with pytest.raises(RepositoryVerificationError, match="threshold"):
        verify_metadata(repo.gun, _with(repo, "timestamp", timestamp))

    targets = json.loads(repo.raw["targets"])
    targets["signed"]["targets"]["v1"]["length"] += 1
    with pytest.raises(RepositoryVerificationError, match=r"targets\.json: the signature"):
        verify_metadata(repo.gun, _with(repo, "targets", targets))

    # Same signed content, other bytes: signatures still verify, timestamp's hashes not.
    snapshot = json.loads(repo.raw["snapshot"])
    with pytest.raises(RepositoryVerificationError, match=r"timestamp\.json has the wrong"):
        verify_metadata(repo.gun, {**repo.raw, "snapshot": json.dumps(snapshot).encode()})


def _health_check(address: str, pki: Pki, cert: Path | None, key: Path | None) -> Any:
    """Status of the signer's overall health, or the gRPC error code of the call."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    options = [("grpc.enable_http_proxy", 0)]  # loopback only, whatever the environment says
    with grpc.secure_channel(address, credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        except grpc.RpcError as e:
            return e.code()


def test_signer_rejects_client_certificates_from_another_ca(pki: Pki, signer: NotarySigner) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    # The control: the same call with the right client certificate gets through.
    assert _health_check(signer.address, pki, pki.client_cert, pki.client_key) == serving
    # Same subject name, other issuer: refused during the TLS handshake.
    foreign = _health_check(signer.address, pki, pki.foreign_client_cert, pki.foreign_client_key)
    assert foreign == grpc.StatusCode.UNAVAILABLE
    assert _health_check(signer.address, pki, None, None) == grpc.StatusCode.UNAVAILABLE
