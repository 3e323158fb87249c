"""The audit log of a real daemon: the chain verifies, tampering is pinpointed by
`keyd audit verify`, and a full disk refuses requests until space returns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyd.client import SignItem
from keyd.core.keytypes import KeyType
from keyd.errors import AuditUnavailable, FailedPrecondition, InvalidArgument, NotFound
from tests.harness import Daemon, run_keyd


def verify_cli(*paths: Path, key: str = "") -> subprocess.CompletedProcess[str]:
    args = ["audit", "verify", *map(str, paths), "--json"]
    if key:
        args += ["--key", key]
    return run_keyd(*args)


def test_chain_verifies_after_1000_mixed_requests_and_tampering_is_pinpointed(
    daemon: Daemon, tmp_path: Path
) -> None:
    with daemon.client() as client:
        keys = [client.create_key(KeyType.ECDSA_P256, role="timestamp") for _ in range(3)]
        for i in range(850):
            client.sign(keys[i % 3].key_id, b"m%d" % i)
        items = [SignItem(keys[i % 3].key_id, b"b%d" % i) for i in range(100)]
        for _ in range(10):  # 10 requests of 100 signatures: one record each
            assert all(not isinstance(r, Exception) for r in client.sign_batch(items))
        for _ in range(80):
            with pytest.raises(NotFound):
                client.sign("0" * 64, b"x")
        for _ in range(50):
            client.list_keys()
        client.delete_key(keys[2].key_id)
        for _ in range(10):
            with pytest.raises(FailedPrecondition):
                client.sign(keys[2].key_id, b"x")
        public_key = client.status().audit_public_key
    assert daemon.stop() == 0  # writes the final checkpoint

    result = verify_cli(daemon.audit, key=public_key)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"]
    assert report["records"] >= 1000
    assert report["unsigned_tail"] == 0

    def tampered(name: str, change: object) -> dict[str, object]:
        copy = tmp_path / name
        shutil.copytree(daemon.audit, copy)
        (live,) = sorted(copy.glob("*.jsonl"))[-1:]
        lines = live.read_text().splitlines(keepends=True)
        change(lines)  # type: ignore[operator]
        live.write_text("".join(lines))
        out = verify_cli(copy, key=public_key)
        assert out.returncode != 0, out.stdout
        problem: dict[str, object] = json.loads(out.stdout)["problem"]
        return problem

    def edit(lines: list[str]) -> None:
        record = json.loads(lines[500])
        record["result"] = "ok" if record["result"] != "ok" else "denied"
        lines[500] = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"

    def delete(lines: list[str]) -> None:
        del lines[600]

    def swap(lines: list[str]) -> None:
        lines[700], lines[701] = lines[701], lines[700]

    seqs = [
        json.loads(line)["seq"]
        for line in (sorted(daemon.audit.glob("*.jsonl"))[-1]).read_text().splitlines()
    ]
    problem = tampered("edited", edit)
    assert problem["kind"] == "EDITED"
    assert problem["seq"] == seqs[500]
    problem = tampered("deleted", delete)
    assert problem["kind"] == "MISSING"
    assert str(seqs[600]) in str(problem["message"])
    problem = tampered("reordered", swap)
    assert problem["kind"] == "REORDERED"
    assert problem["seq"] in (seqs[700], seqs[701])
    assert verify_cli(daemon.audit, key="A" * 43 + "=").returncode != 0  # another key


def test_a_truncated_log_stops_the_daemon_from_starting(daemon: Daemon) -> None:
    with daemon.client() as client:
        key = client.create_key(KeyType.ED25519)
        for _ in range(50):
            client.sign(key.key_id, b"x")
    assert daemon.stop() == 0
    (live,) = sorted(daemon.audit.glob("*.jsonl"))[-1:]
    lines = live.read_text().splitlines(keepends=True)
    live.write_text("".join(lines[:10]))  # an intruder cuts the tail, checkpoints and all
    with pytest.raises(RuntimeError):
        daemon.start()
    assert "keyd audit reset" in daemon.logs()
    daemon.stop()

    # An operator who cannot restore it lets keyd start over, deliberately.
    refused = run_keyd("audit", "reset", "--config", str(daemon.config))
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    for path in daemon.audit.glob("*.jsonl"):
        path.unlink()
    reset = run_keyd("audit", "reset", "--config", str(daemon.config), "--yes")
    assert reset.returncode == 0, reset.stderr
    assert "forgot audit checkpoint" in reset.stdout
    daemon.start()
    with daemon.client() as client:
        client.sign(key.key_id, b"x")
    assert daemon.stop() == 0
    assert json.loads(verify_cli(daemon.audit).stdout)["ok"]


@pytest.fixture
def small_disk_daemon(short_tmp: Path) -> Iterator[Daemon]:
    """A daemon whose audit directory is a 256 KiB tmpfs in its own mount namespace."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = Daemon(short_tmp / "d")
    d.init()
    d.audit.mkdir(mode=0o700)
    d.prefix = (
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        f'mount -t tmpfs -o size=256k,mode=0700 keyd-audit "{d.audit}" && exec "$@"',
        "sh",
    )
    d.start()
    yield d
    assert d.stop() == 0, d.logs()


def fill(path: Path) -> None:
    with path.open("wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()


def test_a_full_audit_disk_refuses_signing_until_space_returns(small_disk_daemon: Daemon) -> None:
    d = small_disk_daemon
    assert d.proc is not None
    # The tmpfs as the daemon sees it, from outside its mount namespace.
    audit_dir = Path(f"/proc/{d.proc.pid}/root") / str(d.audit).lstrip("/")
    with d.client() as client:
        key = client.create_key(KeyType.ECDSA_P256)
        client.sign(key.key_id, b"before")
        filler = audit_dir / "filler"
        with pytest.raises(OSError, match="No space"):
            fill(filler)
        # The live file's last page may still hold a few records; then it is full.
        refused = None
        for _ in range(100):
            try:
                client.sign(key.key_id, b"during")
            except AuditUnavailable as exc:
                refused = exc
                break
        assert refused is not None, "signing went on with the audit disk full"
        assert "audit log" in refused.message
        assert "during" not in refused.message
        with pytest.raises(AuditUnavailable):
            client.sign(key.key_id, b"during")
        with pytest.raises(AuditUnavailable):
            client.list_keys()  # every request needs its record
        filler.unlink()
        assert client.sign(key.key_id, b"after").key_id == key.key_id
    # The chain survived the failures: nothing partial was left in the file.
    result = verify_cli(audit_dir)
    assert result.returncode == 0, result.stdout


def test_pending_deletion_restore_and_purge(daemon: Daemon) -> None:
    with daemon.client() as client:
        key = client.create_key(KeyType.ECDSA_P256, role="snapshot")
        pending = client.delete_key(key.key_id)
        assert pending.state.value == "pending_deletion"
        assert pending.purge_after_unix_ms > time.time() * 1000 + 6 * 86400 * 1000
        with pytest.raises(FailedPrecondition, match="pending deletion"):
            client.sign(key.key_id, b"x")
        with pytest.raises(FailedPrecondition, match="already pending"):
            client.delete_key(key.key_id)
        assert client.restore_key(key.key_id).state.value == "active"
        client.sign(key.key_id, b"x")
        with pytest.raises(FailedPrecondition, match="not pending"):
            client.purge_key(key.key_id)
        client.delete_key(key.key_id)
        client.purge_key(key.key_id)
        with pytest.raises(NotFound):
            client.get_key(key.key_id)


def test_keys_are_purged_when_their_window_ends(short_tmp: Path) -> None:
    d = Daemon(short_tmp / "d", extra="[keys]\ndeletion_window_days = 0.00002\n")  # ~1.7 s
    d.init()
    d.start()
    try:
        with d.client() as client:
            key = client.create_key(KeyType.ED25519)
            client.delete_key(key.key_id)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    client.get_key(key.key_id)
                except NotFound:
                    break
                time.sleep(0.2)
            else:
                pytest.fail("the key was not purged")
    finally:
        assert d.stop() == 0
    purges = [
        json.loads(line)
        for path in d.audit.glob("*.jsonl")
        for line in path.read_text().splitlines()
        if '"PurgeDue"' in line
    ]
    assert [(p["key_id"], p["result"]) for p in purges] == [
        (key.key_id, "started"),
        (key.key_id, "ok"),
    ]
    # Deleting it was recorded before it happened, too.
    deletes = [
        json.loads(line)["result"]
        for path in d.audit.glob("*.jsonl")
        for line in path.read_text().splitlines()
        if '"DeleteKey"' in line
    ]
    assert deletes == ["started", "ok"]


def test_destroying_a_device_key_needs_admin_and_confirmation(daemon: Daemon) -> None:
    with daemon.client() as client:
        key = client.create_key(KeyType.ED25519)
        # Store keys are always destroyed at purge: the flag is refused for them.
        with pytest.raises(InvalidArgument, match="store keys are always destroyed"):
            client.delete_key(key.key_id, destroy_on_device_confirmed=key.key_id)
    result = run_keyd(
        "keys", "delete", key.key_id, "--yes", "--destroy-on-device", "--socket", str(daemon.socket)
    )
    assert result.returncode != 0
    assert "--confirm" in result.stderr


def test_rotation_keeps_one_chain_across_files(short_tmp: Path) -> None:
    d = Daemon(short_tmp / "d", extra="[audit]\nrotate_bytes = 65536\n")
    d.init()
    d.start()
    with d.client() as client:
        key = client.create_key(KeyType.ED25519)
        for i in range(400):
            client.sign(key.key_id, b"%d" % i)
        public_key = client.status().audit_public_key
    assert d.stop() == 0
    files = sorted(d.audit.glob("audit-*.jsonl"))
    assert len(files) >= 2
    report = json.loads(verify_cli(d.audit, key=public_key).stdout)
    assert report["ok"], report["problem"]
    assert report["files"] == len(files)
    assert report["records"] >= 400
