"""`keyd notary-signer` behind Debian's real notary-server, driven by Debian's notary client.

Nothing is emulated: keyd, the shim, notary-server and the notary client are the
real programs on loopback; certificates come from a throwaway CA; every signature
in the published metadata is verified again in Python (tests/notary_rig.py).
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyd.client import Client
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.errors import NotFound
from keyd.notary.shim import KeydGateway
from keyd.notary.wire import signer_pb2 as pb
from keyd.notary.wire import signer_pb2_grpc as pb_grpc
from tests.harness import Daemon, NotaryShim, run_callers, run_keyd
from tests.notary_rig import (
    KeyAlgorithm,
    NotaryClient,
    NotaryCommandError,
    NotaryServer,
    Pki,
    free_port,
    make_pki,
    verify_repository,
)
from tests.verify import independent_verify

GUN = "registry.example.com/team/app"


@dataclass
class Stack:
    root: Path
    pki: Pki
    daemon: Daemon
    shim: NotaryShim

    def channel(self, *, foreign: bool = False) -> grpc.Channel:
        """A mutual-TLS channel to the shim, as notary-server opens one."""
        pki = self.pki
        cert, key = (
            (pki.foreign_client_cert, pki.foreign_client_key)
            if foreign
            else (pki.client_cert, pki.client_key)
        )
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_cert.read_bytes(),
            private_key=key.read_bytes(),
            certificate_chain=cert.read_bytes(),
        )
        return grpc.secure_channel(f"127.0.0.1:{self.shim.port}", credentials)

    def target(self, name: str) -> Path:
        path = self.root / name
        path.write_text(f"release {name}\n")
        return path


def _start_stack(root: Path, *, wait_seconds: float = 10.0) -> Stack:
    pki = make_pki(root / "pki")
    daemon = Daemon(root / "keyd")
    daemon.init()
    daemon.start()
    shim = NotaryShim(
        root / "shim",
        daemon,
        port=free_port(),
        cert=pki.signer_cert,
        key=pki.signer_key,
        client_ca=pki.ca_cert,
        wait_seconds=wait_seconds,
    )
    shim.start()
    return Stack(root, pki, daemon, shim)


@pytest.fixture
def stack() -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="keyd-n-"))
    root.chmod(0o700)
    s = _start_stack(root, wait_seconds=3.0)
    yield s
    s.shim.stop()
    s.daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _notary(
    stack: Stack, key_algorithm: KeyAlgorithm = "ecdsa"
) -> Iterator[tuple[NotaryServer, NotaryClient]]:
    """Debian's notary-server using the shim, and a notary client for it."""
    with NotaryServer(stack.pki, stack.shim.port, key_algorithm=key_algorithm) as server:
        server.start()
        with NotaryClient(server.url, stack.pki.ca_cert) as client:
            yield server, client


def _publish_after_reconnect(client: NotaryClient, timeout: float = 40) -> None:
    """notary-server's gRPC client backs off (1 s, growing) after its signer went
    away; a publish during the backoff fails fast and cleanly, a later one works."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.publish(GUN)
        except NotaryCommandError as exc:
            if time.monotonic() > deadline or "Unavailable" not in str(exc):
                raise
            time.sleep(1)
        else:
            return


def _wait_health(server: NotaryServer, status: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.health() == status:
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"notary-server health never became {status}")


@pytest.mark.parametrize("algorithm", ["ecdsa", "ed25519"])
def test_notary_publishes_and_rotates_through_keyd(stack: Stack, algorithm: KeyAlgorithm) -> None:
    with _notary(stack, key_algorithm=algorithm) as (server, client):
        client.init(GUN)
        client.add(GUN, "v1", stack.target("v1"))
        client.publish(GUN)
        assert client.list(GUN) == ["v1"]
        client.rotate(GUN, "snapshot")
        client.add(GUN, "v2", stack.target("v2"))
        client.publish(GUN)
        client.rotate(GUN, "timestamp")
        with client.fresh() as fresh:
            assert sorted(fresh.list(GUN)) == ["v1", "v2"]
        assert server.health() == 200
        repo = verify_repository(server, GUN, stack.pki.ca_cert)

    # The server-managed keys are keyd's, in the collection, with the right roles.
    with stack.daemon.client() as keyd:
        keys = {k.key_id: k for k in keyd.list_keys(collection=GUN)}
    for role in ("snapshot", "timestamp"):
        (signer,) = repo.roles[role].signed_by
        assert keys[signer].role == role
        assert keys[signer].key_type.notary_keytype == algorithm
        assert keys[signer].backend == "store"
    # Two timestamp keys (one rotated away) and one snapshot key.
    assert sorted(k.role for k in keys.values()) == ["snapshot", "timestamp", "timestamp"]


def test_keys_survive_restarts_of_keyd_and_the_shim(stack: Stack) -> None:
    with _notary(stack) as (server, client):
        client.init(GUN)
        client.add(GUN, "v1", stack.target("v1"))
        client.publish(GUN)
        stack.shim.stop()
        assert stack.daemon.stop() == 0
        stack.daemon.start()
        stack.shim.start()
        client.add(GUN, "v2", stack.target("v2"))
        _publish_after_reconnect(client)
        assert sorted(client.list(GUN)) == ["v1", "v2"]
        verify_repository(server, GUN, stack.pki.ca_cert)


def test_keyd_down_then_back(stack: Stack) -> None:
    with _notary(stack) as (server, client):
        client.init(GUN)
        client.add(GUN, "v1", stack.target("v1"))
        client.publish(GUN)
        assert stack.daemon.stop() == 0
        # notary-server checks the signer every 10 s; the shim notices within 0.5 s.
        waited = _wait_health(server, 503, timeout=25)
        assert waited < 22
        client.add(GUN, "v2", stack.target("v2"))
        with pytest.raises(NotaryCommandError):
            client.publish(GUN)  # fails cleanly after the shim's bounded wait
        stack.daemon.start()
        _wait_health(server, 200, timeout=25)
        client.publish(GUN)
        assert sorted(client.list(GUN)) == ["v1", "v2"]
        verify_repository(server, GUN, stack.pki.ca_cert)


def test_a_brief_keyd_restart_is_not_an_error(stack: Stack) -> None:
    """GetKeyInfo waits for keyd rather than answering with a transient error
    (notary-server would mint a new key)."""
    with stack.daemon.client() as keyd:
        key = keyd.create_key(KeyType.ECDSA_P256, role="timestamp", collection=GUN)
    with stack.channel() as channel:
        keys = pb_grpc.KeyManagementStub(channel)
        assert keys.GetKeyInfo(pb.KeyID(ID=key.key_id)).role == "timestamp"
        assert stack.daemon.stop() == 0
        restarter = threading.Timer(1.0, stack.daemon.start)
        restarter.start()
        try:
            info = keys.GetKeyInfo(pb.KeyID(ID=key.key_id), timeout=30)
        finally:
            restarter.join()
        assert info.publicKey == key.public_key.notary_bytes


def test_wire_behaviour_matches_notary_signer(stack: Stack) -> None:
    with stack.daemon.client() as keyd:
        root = keyd.create_key(KeyType.ECDSA_P256, role="root", collection=GUN)
    with stack.channel() as channel:
        keys = pb_grpc.KeyManagementStub(channel)
        signer = pb_grpc.SignerStub(channel)
        created = keys.CreateKey(pb.CreateKeyRequest(algorithm="ecdsa", gun=GUN, role="snapshot"))
        key_id = created.keyInfo.keyID.ID
        assert created.keyInfo.algorithm.algorithm == "ecdsa"
        assert len(created.publicKey) == 91  # DER SubjectPublicKeyInfo of a P-256 key
        info = keys.GetKeyInfo(pb.KeyID(ID=key_id))
        assert (info.publicKey, info.role) == (created.publicKey, "snapshot")
        sig = signer.Sign(pb.SignatureRequest(keyID=pb.KeyID(ID=key_id), content=b"{}"))
        assert sig.algorithm.algorithm == "ecdsa"
        assert key_id == sig.keyInfo.keyID.ID
        assert len(sig.content) == 64  # raw r||s

        with pytest.raises(grpc.RpcError) as rsa:
            keys.CreateKey(pb.CreateKeyRequest(algorithm="rsa", gun=GUN, role="snapshot"))
        assert rsa.value.code() is grpc.StatusCode.UNKNOWN
        unknown = pb.KeyID(ID="ab" * 32)
        for call in (
            lambda: keys.GetKeyInfo(unknown),
            lambda: signer.Sign(pb.SignatureRequest(keyID=unknown, content=b"{}")),
            # Root keys are out of the shim's reach: keyd says they do not exist.
            lambda: keys.GetKeyInfo(pb.KeyID(ID=root.key_id)),
            lambda: signer.Sign(pb.SignatureRequest(keyID=pb.KeyID(ID=root.key_id), content=b"x")),
        ):
            with pytest.raises(grpc.RpcError) as missing:
                call()
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as denied:
            keys.CreateKey(pb.CreateKeyRequest(algorithm="ecdsa", gun=GUN, role="root"))
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        keys.DeleteKey(unknown)  # idempotent
        keys.DeleteKey(pb.KeyID(ID=key_id))
        keys.DeleteKey(pb.KeyID(ID=key_id))

        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "grpc.health.v1.Health.KeyManagement", "grpc.health.v1.Health.Signer"):
            response = health.Check(health_pb2.HealthCheckRequest(service=name))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as other:
            health.Check(health_pb2.HealthCheckRequest(service="proto.Other"))
        assert other.value.code() is grpc.StatusCode.NOT_FOUND
    with stack.daemon.client() as keyd:
        keyd.get_key(root.key_id)  # untouched


def test_concurrent_signs_share_batches_and_keep_their_own_results(stack: Stack) -> None:
    """16 callers through the shim's coalescing: every caller gets its own signature
    (verified here) or its own error, never another caller's."""
    with stack.daemon.client() as keyd:
        records = [
            keyd.create_key(t, role="timestamp", collection=GUN)
            for t in (KeyType.ECDSA_P256, KeyType.ED25519)
        ]

    def caller(n: int) -> None:
        record = records[n % 2]
        with stack.channel() as channel:
            signer = pb_grpc.SignerStub(channel)
            for i in range(30):
                content = f"caller {n} item {i}".encode()
                if i % 7 == 3:  # an unknown key in the middle of the traffic
                    unknown = pb.KeyID(ID=f"{n:02x}" * 32)
                    with pytest.raises(grpc.RpcError) as missing:
                        signer.Sign(pb.SignatureRequest(keyID=unknown, content=content))
                    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
                    continue
                request = pb.SignatureRequest(keyID=pb.KeyID(ID=record.key_id), content=content)
                sig = signer.Sign(request).content
                raw = (
                    SignatureEncoding.RAW if record.key_type.is_ecdsa else SignatureEncoding.NATIVE
                )
                independent_verify(record, sig, content, raw)

    run_callers(caller, 16)


def test_client_certificate_from_another_ca_is_rejected(stack: Stack) -> None:
    with stack.channel(foreign=True) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def _expired_copy(cert_path: Path, pki: Pki, out: Path) -> Path:
    """The same certificate and key, re-issued by the CA with validity in the past."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now - datetime.timedelta(days=1))
    )
    out.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return out


def _shim_config(root: Path, pki: Pki, *, cert: Path, key: Path) -> Path:
    config = root / "bad.toml"
    config.write_text(
        f'[listen]\naddress = "127.0.0.1:{free_port()}"\ncert = "{cert}"\nkey = "{key}"\n'
        f'client_ca = "{pki.ca_cert}"\n'
    )
    return config


def test_bad_certificates_stop_the_start(stack: Stack) -> None:
    pki = stack.pki
    mismatch = _shim_config(stack.root, pki, cert=pki.signer_cert, key=pki.server_key)
    result = run_keyd("notary-signer", "--config", str(mismatch))
    assert result.returncode != 0
    assert f"[listen] key: {pki.server_key} is not the key of {pki.signer_cert}" in result.stderr
    expired_cert = _expired_copy(pki.signer_cert, pki, stack.root / "expired.crt")
    config = _shim_config(stack.root, pki, cert=expired_cert, key=pki.signer_key)
    result = run_keyd("notary-signer", "--config", str(config))
    assert result.returncode != 0
    assert "expired on" in result.stderr
    assert "Traceback" not in result.stderr
    missing = stack.root / "missing.toml"
    missing.write_text('[listen]\naddress = "127.0.0.1:1"\n')
    result = run_keyd("notary-signer", "--config", str(missing))
    assert "[listen] cert: is required" in result.stderr


def test_coalescing_hands_every_result_back_and_frees_its_slots(daemon: Daemon) -> None:
    """The shim's coalescer in this process, against a real daemon: 32 threads, every
    signature checked against its own content, and no batch slot lost at the end."""
    with daemon.client() as keyd:
        record = keyd.create_key(KeyType.ED25519, role="snapshot", collection=GUN)
    with Client(daemon.notary_socket) as client:
        backend = KeydGateway(client, wait_seconds=5)

        def caller(n: int) -> None:
            for i in range(40):
                content = f"{n}/{i}".encode()
                if i % 9 == 4:
                    with pytest.raises(NotFound):
                        backend.sign("cd" * 32, content)
                    continue
                sig = backend.sign(record.key_id, content)
                independent_verify(record, sig.signature, content, sig.encoding)

        run_callers(caller, 32)
        assert backend._in_flight == 0
        assert not backend._queue
