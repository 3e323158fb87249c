"""Caller identity, the policy and its reload, against a real daemon and real uids.

Clients run as other uids through tests/caller.py (started as root, drops to the
uid before it connects). The uids 4001-4003 have no accounts: keyd knows them by
number, as the kernel reports them. Needs root (CI is root); skipped otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from keyd.core.keytypes import KeyType
from keyd.v1 import keyd_pb2 as pb
from keyd.v1 import keyd_pb2_grpc as pb_grpc
from tests.harness import Daemon, allow_everything, run_keyd

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs clients as other uids: needs root")

NOGROUP = 65534
SIGNER, CREATOR, STRANGER, AUDITOR = 4001, 4002, 4003, 4004
AUDITORS = 4100  # a group
POLICY = f"""
[[allow]]
name = "the test itself"
users = [0]
operations = ["create", "sign", "list", "delete", "admin"]

[[allow]]
users = [{SIGNER}]
operations = ["sign", "list"]
roles = ["targets"]
collections = ["example.com/*"]

[[allow]]
users = [{CREATOR}]
operations = ["create", "list", "delete"]
roles = ["timestamp"]

[[allow]]
groups = [{AUDITORS}]
operations = ["list"]
"""


def as_user(
    daemon: Daemon, uid: int, action: str, *args: str, gid: int = NOGROUP
) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.caller",
            "--uid",
            str(uid),
            "--gid",
            str(gid),
            "--groups",
            str(NOGROUP),  # the socket's group: every caller here may open it
            "--socket",
            str(daemon.socket),
            action,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def reachable_daemon(home: Path, policy: str) -> Daemon:
    """A daemon whose socket uids without accounts can reach: the directories on the
    way are traversable and the socket belongs to group nogroup."""
    home.parent.chmod(0o711)
    d = Daemon(home, policy=policy, server_extra='socket_group = "nogroup"')
    home.chmod(0o711)
    (home / "run").mkdir(mode=0o750)
    os.chown(home / "run", 0, NOGROUP)
    d.init()
    return d


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Daemon]:
    d = reachable_daemon(short_tmp / "d", POLICY)
    d.start()
    yield d
    assert d.stop() == 0, d.logs()


def verify(key_pem: str, message: bytes, signature_b64: str) -> None:
    public = load_pem_public_key(key_pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(base64.b64decode(signature_b64), message, ec.ECDSA(hashes.SHA256()))


def audit_events(daemon: Daemon) -> list[dict[str, Any]]:
    events = []
    for path in sorted(daemon.audit.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["type"] == "event":
                events.append(record)
    return events


def test_whoami_is_the_kernel_s_view_of_the_caller(daemon: Daemon) -> None:
    answer = as_user(daemon, SIGNER, "whoami")
    assert answer["ok"], answer
    me = answer["value"]
    assert (me["uid"], me["gid"], me["pid"]) == (SIGNER, NOGROUP, me["my_pid"])


def test_sign_is_allowed_only_where_the_policy_says(daemon: Daemon) -> None:
    with daemon.client() as client:
        mine = client.create_key(KeyType.ECDSA_P256, role="targets", collection="example.com/app")
        other = client.create_key(KeyType.ECDSA_P256, role="targets", collection="other.org/app")
        timestamp = client.create_key(KeyType.ECDSA_P256, role="timestamp")

    answer = as_user(daemon, SIGNER, "sign", mine.key_id, "release 1.0")
    assert answer["ok"], answer
    verify(mine.public_key.pem, b"release 1.0", answer["value"])

    for key in (other, timestamp):
        answer = as_user(daemon, SIGNER, "sign", key.key_id, "release 1.0")
        assert answer["kind"] == "PermissionDenied"
        assert "sign" in answer["message"]
        assert str(SIGNER) in answer["message"]
        # The denial names what is missing, not what the policy contains.
        assert "example.com" not in answer["message"]
    assert as_user(daemon, STRANGER, "sign", mine.key_id, "x")["kind"] == "PermissionDenied"

    # Listing shows only the keys the caller may list.
    assert as_user(daemon, SIGNER, "list")["value"] == [mine.key_id]
    assert as_user(daemon, CREATOR, "list")["value"] == [timestamp.key_id]
    assert as_user(daemon, STRANGER, "list")["kind"] == "PermissionDenied"

    records = [e for e in audit_events(daemon) if e["uid"] == SIGNER and e["method"] == "Sign"]
    assert [r["result"] for r in records] == ["ok", "denied", "denied"]
    assert records[0]["payload_sha256"] == hashlib.sha256(b"release 1.0").hexdigest()
    assert records[0]["key_id"] == mine.key_id
    assert "release 1.0" not in "".join(p.read_text() for p in daemon.audit.glob("*.jsonl"))


def test_a_group_rule_applies_to_the_group_s_members(daemon: Daemon) -> None:
    with daemon.client() as client:
        key = client.create_key(KeyType.ED25519, role="root")
    # Same uid: as a member of the auditors group it may list, otherwise not.
    assert as_user(daemon, AUDITOR, "list", gid=AUDITORS)["value"] == [key.key_id]
    assert as_user(daemon, AUDITOR, "list")["kind"] == "PermissionDenied"
    assert as_user(daemon, AUDITOR, "sign", key.key_id, "x", gid=AUDITORS)["kind"] == (
        "PermissionDenied"
    )


def test_create_and_delete_follow_the_policy(daemon: Daemon) -> None:
    answer = as_user(daemon, CREATOR, "create", "timestamp", "example.com/app")
    assert answer["ok"], answer
    key_id = answer["value"]
    assert as_user(daemon, CREATOR, "create", "targets", "example.com/app")["kind"] == (
        "PermissionDenied"
    )
    assert as_user(daemon, SIGNER, "create", "targets", "example.com/app")["kind"] == (
        "PermissionDenied"
    )
    assert as_user(daemon, SIGNER, "delete", key_id)["kind"] == "PermissionDenied"
    assert as_user(daemon, CREATOR, "delete", key_id)["value"] == "pending_deletion"
    # Purging is an admin act, which the creator was not granted.
    assert as_user(daemon, CREATOR, "purge", key_id)["kind"] == "PermissionDenied"
    assert as_user(daemon, CREATOR, "restore", key_id)["value"] == "active"


def test_forged_identity_metadata_changes_nothing(daemon: Daemon) -> None:
    with daemon.client() as client:
        key = client.create_key(KeyType.ECDSA_P256, role="targets", collection="example.com/a")
    answer = as_user(daemon, STRANGER, "forge-sign", key.key_id, "x")
    assert answer["kind"] == "PermissionDenied"
    assert str(STRANGER) in answer["message"]


def _private_listener(pid: int) -> str:
    """The daemon's private abstract gRPC listener, as anyone in its namespace can see."""
    for line in Path("/proc/net/unix").read_text().splitlines():
        name = line.split()[-1]
        if name.startswith(f"@keyd-grpc-{pid}-"):
            return name[1:]
    raise AssertionError("no private listener found")


def test_bypassing_the_relay_is_refused_and_audited(daemon: Daemon) -> None:
    assert daemon.proc is not None
    address = f"unix-abstract:{_private_listener(daemon.proc.pid)}"
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.KeyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListKeys(pb.ListKeysRequest(), timeout=30)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    unknown = [e for e in audit_events(daemon) if e["uid"] == -1]
    assert unknown
    assert unknown[-1]["result"] == "Unauthenticated"


def _reload(daemon: Daemon, policy: str) -> None:
    mark = len(daemon.logs())
    daemon.policy.write_text(policy)
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tail = daemon.logs()[mark:]
        if "policy reloaded" in tail or "new policy refused" in tail:
            return
        time.sleep(0.05)
    raise AssertionError(f"no reload in the log:\n{daemon.logs()[mark:]}")


def test_policy_reload_good_and_bad(daemon: Daemon) -> None:
    with daemon.client() as client:
        key = client.create_key(KeyType.ECDSA_P256, role="targets", collection="example.com/a")
    assert as_user(daemon, SIGNER, "sign", key.key_id, "x")["ok"]

    # An invalid policy is refused; the old one stays in force.
    _reload(daemon, POLICY + "\n[[allow]]\nusers = [4001]\noperations = ['sing']\n")
    assert "new policy refused" in daemon.logs()
    assert as_user(daemon, SIGNER, "sign", key.key_id, "x")["ok"]

    # A valid one takes over: the signer lost its grant, and root never had one.
    _reload(daemon, allow_everything(STRANGER))
    assert as_user(daemon, SIGNER, "sign", key.key_id, "x")["kind"] == "PermissionDenied"
    assert as_user(daemon, STRANGER, "sign", key.key_id, "x")["ok"]
    result = run_keyd("keys", "list", "--socket", str(daemon.socket))
    assert result.returncode != 0
    assert "may not list keys" in result.stderr


def test_a_daemon_with_an_invalid_policy_does_not_start(short_tmp: Path) -> None:
    d = Daemon(short_tmp / "d", policy="[[allow]]\noperations = ['sign']\n")
    d.init()
    with pytest.raises(RuntimeError, match="policy"):
        d.start()
    d.stop()
