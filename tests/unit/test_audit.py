"""The audit log: chain, checkpoints, rotation, restart, refusal on write failure, verify.

Real files in temporary directories. Write failures are real kernel errors: a file
size limit (RLIMIT_FSIZE, EFBIG, with a short write first) in-process, and a full
64 KiB tmpfs (ENOSPC) in a private mount namespace when the test runs as root.
Only the failure of the truncation that undoes a failed write is emulated.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyd.audit import (
    RESULT_DENIED,
    RESULT_OK,
    AuditCorrupt,
    AuditEvent,
    AuditLog,
    AuditUnavailable,
    ProblemKind,
    checkpoint_message,
    digest_payload,
    format_report,
    key_fingerprint,
    verify_log,
)
from keyd.audit._format import encode_event, encode_events, encode_record, file_name, record_hash
from keyd.core.identity import Caller

REPO = Path(__file__).resolve().parents[2]


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def public(key: Ed25519PrivateKey) -> bytes:
    return raw_public(key)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "audit"


def caller(i: int = 0) -> Caller:
    return Caller(
        uid=1000 + i % 3,
        gid=1000,
        pid=4000 + i,
        groups=frozenset({1000}),
        user=f"ci{i % 3}",
        exe="/usr/bin/notary-signer",
    )


def event(i: int = 0, *, payload: bytes | None = None, key_id: str = "") -> AuditEvent:
    """A mix of what the daemon records: signatures, refusals, errors, listings."""
    kind = i % 5
    return AuditEvent(
        caller=caller(i),
        method=("Sign", "Sign", "ListKeys", "DeleteKey", "Sign")[kind],
        operation=("sign", "sign", "list", "delete", "sign")[kind],
        key_id=key_id or ("", f"{i:064x}")[kind != 2],
        payload_sha256=digest_payload(payload if payload is not None else b"%d" % i)
        if kind in (0, 1, 4)
        else "",
        result=(RESULT_OK, RESULT_DENIED, RESULT_OK, "NotFound", RESULT_OK)[kind],
    )


def open_log(
    directory: Path, key: Ed25519PrivateKey, **kwargs: Any
) -> AuditLog:  # checkpoints only when asked, unless a test sets checkpoint_seconds
    kwargs.setdefault("checkpoint_seconds", 0)
    return AuditLog.open(directory, signer=key.sign, public_key=raw_public(key), **kwargs)


def files(directory: Path) -> list[Path]:
    return sorted(directory.glob("audit-*.jsonl"))


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def records(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in files(directory) for line in lines_of(path)]


def canonical(record: dict[str, Any]) -> bytes:
    return encode_record(record) + b"\n"


@pytest.fixture
def filled(directory: Path, key: Ed25519PrivateKey) -> Path:
    """A closed log of 200 events with a checkpoint after every 50: one file."""
    with open_log(directory, key) as log:
        for i in range(200):
            log.append(event(i))
            if i % 50 == 49:
                log.checkpoint()
    return files(directory)[0]


def test_a_thousand_mixed_events_verify(directory: Path, key: Ed25519PrivateKey) -> None:
    heads: list[tuple[int, str]] = []
    with open_log(directory, key, on_checkpoint=lambda s, h: heads.append((s, h))) as log:
        for i in range(0, 1000, 10):
            if i % 20:
                log.append_many([event(j) for j in range(i, i + 10)])
            else:
                for j in range(i, i + 10):
                    log.append(event(j))
            if i % 100 == 90:
                log.checkpoint()
        last_event = log.head
    report = verify_log(directory, raw_public(key))
    assert report.ok, format_report(report)
    assert report.checkpoints == 10
    assert report.records == 1 + 1000 + 10  # genesis, events, checkpoints
    assert (report.first_seq, report.last_seq) == (1, report.records)
    assert report.unsigned_tail == 0
    assert report.key_pinned
    assert heads[-1] == (report.last_seq, report.last_hash) == (last_event[0], last_event[1])
    assert "OK" in format_report(report)
    kept = records(directory)
    assert [r["seq"] for r in kept] == list(range(1, 1012))
    assert kept[0]["reason"] == "genesis"
    assert kept[0]["key_fingerprint"] == key_fingerprint(raw_public(key))
    denied = [r for r in kept if r["type"] == "event" and r["result"] == RESULT_DENIED]
    assert len(denied) == 200
    assert denied[0] | {"prev": "", "time_ms": 0, "seq": 0} == {
        "type": "event",
        "seq": 0,
        "prev": "",
        "time_ms": 0,
        "uid": 1001,
        "gid": 1000,
        "pid": 4001,
        "user": "ci1",
        "exe": "/usr/bin/notary-signer",
        "socket": "main",
        "method": "Sign",
        "operation": "sign",
        "key_id": f"{1:064x}",
        "payload_sha256": digest_payload(b"1"),
        "result": RESULT_DENIED,
    }


def test_an_edited_record_is_pinpointed(filled: Path, key: Ed25519PrivateKey) -> None:
    lines = lines_of(filled)
    record = json.loads(lines[120])
    record["result"] = RESULT_OK if record["result"] != RESULT_OK else RESULT_DENIED
    lines[120] = canonical(record)
    filled.write_bytes(b"".join(lines))
    report = verify_log(filled.parent, raw_public(key))
    assert report.problem is not None
    assert report.problem.kind is ProblemKind.EDITED
    assert (report.problem.file, report.problem.line) == (filled, 121)
    assert report.problem.seq == record["seq"]
    assert report.problem.offset == sum(len(line) for line in lines[:120])
    assert report.records == 121  # read up to the break, which shows at the next one
    text = format_report(report)
    assert f"BROKEN (edited) at {filled} line 121 (seq {record['seq']})" in text


def test_a_deleted_record_is_pinpointed(filled: Path, key: Ed25519PrivateKey) -> None:
    lines = lines_of(filled)
    gone = json.loads(lines[77])["seq"]
    del lines[77]
    filled.write_bytes(b"".join(lines))
    problem = verify_log(filled.parent, raw_public(key)).problem
    assert problem is not None
    assert problem.kind is ProblemKind.MISSING
    assert (problem.seq, problem.line) == (gone, 78)
    assert f"seq {gone} is missing" in problem.message


def test_reordered_records_are_pinpointed(filled: Path, key: Ed25519PrivateKey) -> None:
    lines = lines_of(filled)
    first, second = json.loads(lines[30])["seq"], json.loads(lines[31])["seq"]
    lines[30], lines[31] = lines[31], lines[30]
    filled.write_bytes(b"".join(lines))
    problem = verify_log(filled.parent, raw_public(key)).problem
    assert problem is not None
    assert problem.kind is ProblemKind.REORDERED
    assert (problem.line, problem.seq) == (31, second)
    assert f"seq {first} is at {filled} line 32" in problem.message


def rechain(lines: list[bytes], start: int) -> None:
    """What a forger does after an edit: recompute every later prev (and checkpoint head)."""
    for i in range(start, len(lines)):
        record = json.loads(lines[i])
        record["prev"] = record_hash(lines[i - 1][:-1])
        if record["type"] == "checkpoint":
            record["head"] = record["prev"]
        lines[i] = canonical(record)


def test_a_recomputed_chain_is_caught_by_the_next_checkpoint(
    filled: Path, key: Ed25519PrivateKey
) -> None:
    lines = lines_of(filled)
    kinds = [json.loads(line)["type"] for line in lines]
    checkpoints = [i for i, kind in enumerate(kinds) if kind == "checkpoint"]
    edited = 120  # between the checkpoints at lines checkpoints[1] and checkpoints[2]
    assert checkpoints[1] < edited < checkpoints[2]
    record = json.loads(lines[edited])
    record["key_id"] = "f" * 64
    lines[edited] = canonical(record)
    rechain(lines, edited + 1)
    filled.write_bytes(b"".join(lines))

    report = verify_log(filled.parent, raw_public(key))
    problem = report.problem
    assert problem is not None
    assert problem.kind is ProblemKind.BAD_SIGNATURE
    # The first record the signatures no longer vouch for: the last valid checkpoint
    # covers everything before itself.
    assert problem.line == checkpoints[1] + 1
    assert problem.seq == json.loads(lines[checkpoints[1]])["seq"]
    assert report.last_checkpoint_seq == problem.seq
    bad_seq = json.loads(lines[checkpoints[2]])["seq"]
    assert f"one of seqs {problem.seq}-{bad_seq - 1} was changed" in problem.message


def test_a_forged_checkpoint_is_caught(filled: Path, key: Ed25519PrivateKey) -> None:
    lines = lines_of(filled)
    last = json.loads(lines[-1])
    assert last["type"] == "checkpoint"
    forger = Ed25519PrivateKey.generate()
    last["sig"] = base64.b64encode(
        forger.sign(checkpoint_message(last["head_seq"], last["head"]))
    ).decode()
    lines[-1] = canonical(last)
    filled.write_bytes(b"".join(lines))
    problem = verify_log(filled.parent, raw_public(key)).problem
    assert problem is not None
    assert problem.kind is ProblemKind.BAD_SIGNATURE


def test_the_key_is_pinned_or_taken_from_the_log(filled: Path, key: Ed25519PrivateKey) -> None:
    other = raw_public(Ed25519PrivateKey.generate())
    report = verify_log(filled.parent, other)
    assert report.problem is not None
    assert report.problem.kind is ProblemKind.KEY_MISMATCH
    assert (report.problem.line, report.problem.seq) == (1, 1)
    assert key_fingerprint(other) in report.problem.message

    unpinned = verify_log(filled.parent)
    assert unpinned.ok
    assert not unpinned.key_pinned
    assert unpinned.key_fingerprint == key_fingerprint(raw_public(key))
    assert "not pinned" in format_report(unpinned)


def test_a_log_rewritten_with_another_key_passes_only_unpinned(
    tmp_path: Path, filled: Path, key: Ed25519PrivateKey
) -> None:
    """Why the key must be pinned: a forger can build a self-consistent log."""
    forger = Ed25519PrivateKey.generate()
    with open_log(tmp_path / "forged", forger) as log:
        log.append(event(1))
    assert verify_log(tmp_path / "forged").ok
    problem = verify_log(tmp_path / "forged", raw_public(key)).problem
    assert problem is not None
    assert problem.kind is ProblemKind.KEY_MISMATCH


def test_a_restart_with_another_key_is_refused(
    directory: Path, filled: Path, key: Ed25519PrivateKey
) -> None:
    with pytest.raises(AuditCorrupt, match="key-mismatch"):
        open_log(directory, Ed25519PrivateKey.generate())


def test_rotation_keeps_the_chain_across_files(directory: Path, key: Ed25519PrivateKey) -> None:
    heads: list[tuple[int, str]] = []
    with open_log(
        directory, key, rotate_bytes=4096, on_checkpoint=lambda s, h: heads.append((s, h))
    ) as log:
        for i in range(120):
            log.append(event(i))
        live = log.path
    paths = files(directory)
    assert len(paths) >= 8
    assert live == paths[-1]
    for before, after in itertools.pairwise(paths):
        last = lines_of(before)[-1]
        first = json.loads(lines_of(after)[0])
        assert json.loads(last)["type"] == "checkpoint"  # each file is closed signed
        assert (first["type"], first["reason"]) == ("open", "rotate")
        assert first["prev"] == record_hash(last[:-1])
        assert after.name == file_name(first["seq"])
        assert before.stat().st_size >= 4096
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in paths)
    report = verify_log(directory, raw_public(key))
    assert report.ok, format_report(report)
    assert report.files == len(paths)
    assert report.records == len(records(directory))
    assert heads[-1] == (report.last_seq, report.last_hash)
    # A list of files, given in any order, is checked in seq order.
    assert verify_log(list(reversed(paths)), raw_public(key)).ok


def test_restart_continues_the_chain(directory: Path, key: Ed25519PrivateKey) -> None:
    with open_log(directory, key, fsync_each=True) as log:
        log.append_many([event(i) for i in range(5)])
        first_head = log.head
    closed_head = first_head[0] + 1  # the final checkpoint
    with open_log(directory, key) as log:
        assert log.head[0] == closed_head + 1  # the restart record
        log.append(event(9))
    kept = records(directory)
    restart = kept[closed_head]
    assert (restart["type"], restart["reason"], restart["seq"]) == (
        "open",
        "restart",
        closed_head + 1,
    )
    assert kept[closed_head - 1]["type"] == "checkpoint"
    report = verify_log(directory, raw_public(key))
    assert report.ok, format_report(report)
    assert report.checkpoints == 2
    assert len(files(directory)) == 1


def test_a_log_cut_short_or_replaced_is_refused_with_the_recorded_head(
    tmp_path: Path, directory: Path, key: Ed25519PrivateKey
) -> None:
    heads: list[tuple[int, str]] = []
    with open_log(directory, key, on_checkpoint=lambda s, h: heads.append((s, h))) as log:
        for i in range(40):
            log.append(event(i))
            if i % 10 == 9:
                log.checkpoint()
    recorded = heads[-1]
    backup = tmp_path / "backup"
    shutil.copytree(directory, backup)

    live = files(directory)[0]
    live.write_bytes(b"".join(lines_of(live)[:12]))  # the tail cut, checkpoints and all
    assert verify_log(directory, raw_public(key)).ok  # consistent with itself...
    report = verify_log(directory, raw_public(key), expected_head=recorded)
    assert report.problem is not None
    assert report.problem.kind is ProblemKind.TRUNCATED  # ...but not with the head
    with pytest.raises(AuditCorrupt) as refused:
        open_log(directory, key, expected_head=recorded)
    assert str(recorded[0]) in refused.value.message
    assert recorded[1] in refused.value.message
    assert "ends at seq 12" in refused.value.message

    shutil.rmtree(directory)  # replaced by another log of the same length
    with open_log(directory, key) as log:
        log.append_many([event(i) for i in range(60)])
    with pytest.raises(AuditCorrupt, match=f"recorded the checkpoint seq {recorded[0]} with hash"):
        open_log(directory, key, expected_head=recorded)
    problem = verify_log(directory, raw_public(key), expected_head=recorded).problem
    assert problem is not None
    assert problem.kind is ProblemKind.HEAD_MISMATCH

    shutil.rmtree(directory)  # removed altogether
    with pytest.raises(AuditCorrupt, match="the log was removed"):
        open_log(directory, key, expected_head=recorded)

    shutil.rmtree(directory)
    shutil.copytree(backup, directory)  # the real log opens
    open_log(directory, key, expected_head=recorded).close()
    assert verify_log(directory, raw_public(key), expected_head=recorded).ok


def test_a_recorded_head_in_an_older_file_is_found(directory: Path, key: Ed25519PrivateKey) -> None:
    heads: list[tuple[int, str]] = []
    with open_log(
        directory, key, rotate_bytes=4096, on_checkpoint=lambda s, h: heads.append((s, h))
    ) as log:
        for i in range(60):
            log.append(event(i))
    assert len(files(directory)) >= 3
    for head in heads:  # the closing checkpoint of an old file, or one in the live file
        open_log(directory, key, expected_head=head).close()
    with pytest.raises(AuditCorrupt, match="replaced or rewritten"):
        open_log(directory, key, expected_head=(heads[0][0], "0" * 64))


def test_a_torn_last_line_is_refused_on_open_and_reported(
    filled: Path, key: Ed25519PrivateKey
) -> None:
    whole = filled.stat().st_size
    with filled.open("ab") as f:
        f.write(b'{"exe":"/usr/bin/notary-signer","gid":1000,"key_')  # a crash mid-write
    with pytest.raises(AuditCorrupt) as refused:
        open_log(filled.parent, key)
    assert f"truncate -s {whole} {filled}" in refused.value.message
    report = verify_log(filled.parent, raw_public(key))
    assert report.problem is not None
    assert report.problem.kind is ProblemKind.TORN
    assert report.problem.line == len(lines_of(filled))
    assert report.problem.offset == whole
    os.truncate(filled, whole)  # what the message says to do
    open_log(filled.parent, key).close()
    assert verify_log(filled.parent, raw_public(key)).ok


def test_malformed_lines_and_empty_logs_are_reported(
    tmp_path: Path, filled: Path, key: Ed25519PrivateKey
) -> None:
    lines = lines_of(filled)
    lines[50] = b"not json\n"
    filled.write_bytes(b"".join(lines))
    problem = verify_log(filled.parent, raw_public(key)).problem
    assert problem is not None
    assert (problem.kind, problem.line) == (ProblemKind.MALFORMED, 51)

    lines[50] = lines[51].replace(b":", b": ", 1)  # valid JSON, not as keyd writes it
    filled.write_bytes(b"".join(lines))
    problem = verify_log(filled.parent, raw_public(key)).problem
    assert problem is not None
    assert (problem.kind, problem.line) == (ProblemKind.MALFORMED, 51)
    assert "canonical" in problem.message

    (tmp_path / "none").mkdir()
    problem = verify_log(tmp_path / "none").problem
    assert problem is not None
    assert problem.kind is ProblemKind.EMPTY


def test_a_log_whose_first_files_were_removed_is_a_note_not_a_failure(
    directory: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(directory, key, rotate_bytes=4096) as log:
        for i in range(40):
            log.append(event(i))
    paths = files(directory)
    paths[0].unlink()
    report = verify_log(directory, raw_public(key))
    assert report.ok, format_report(report)
    assert report.first_seq == json.loads(lines_of(paths[1])[0])["seq"]
    assert any("starts at seq" in note for note in report.notes)
    paths[2].unlink()  # a file from the middle: its seqs are missing
    problem = verify_log(directory, raw_public(key)).problem
    assert problem is not None
    assert problem.kind is ProblemKind.MISSING


@pytest.fixture
def file_size_limit() -> Iterator[Callable[[int], None]]:
    """Set the process's RLIMIT_FSIZE (writes past it fail with EFBIG); restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_write_is_undone_and_the_next_append_resumes(
    directory: Path, key: Ed25519PrivateKey, file_size_limit: Callable[[int], None]
) -> None:
    secret = b"payload-that-must-not-appear"
    log = open_log(directory, key)
    log.append_many([event(i) for i in range(5)])
    live = log.path
    size, head = live.stat().st_size, log.head

    file_size_limit(size + 100)  # the batch gets a short write, then EFBIG
    try:
        with pytest.raises(AuditUnavailable) as refused:
            log.append_many([event(i, payload=secret) for i in range(5)])
        after_short = live.stat().st_size
        file_size_limit(size)  # the very first write fails
        with pytest.raises(AuditUnavailable):
            log.append(event(7))
        with pytest.raises(AuditUnavailable):
            log.checkpoint()
    finally:
        file_size_limit(resource.RLIM_INFINITY)
    assert after_short == size  # the partial batch was cut off again
    assert live.stat().st_size == size
    assert log.head == head
    message = refused.value.message
    assert str(directory) in message
    assert "File too large" in message
    assert "refused" in message
    assert secret.decode() not in message
    assert digest_payload(secret) not in message

    log.append_many([event(i) for i in range(10, 15)])  # the cause is gone
    log.close()
    report = verify_log(directory, raw_public(key))
    assert report.ok, format_report(report)
    assert [r["seq"] for r in records(directory)] == list(range(1, report.last_seq + 1))
    assert digest_payload(secret) not in live.read_text()


def test_a_failure_that_cannot_be_undone_refuses_every_append(
    directory: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emulated: ftruncate failing after a failed write (e.g. EIO) is not reproducible here."""
    log = open_log(directory, key)
    size = log.path.stat().st_size

    def fail(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("keyd.audit._log.os.write", fail)
    monkeypatch.setattr("keyd.audit._log.os.ftruncate", fail)
    with pytest.raises(AuditUnavailable):
        log.append(event(1))
    monkeypatch.undo()
    with pytest.raises(AuditUnavailable, match=f"truncate -s {size} "):
        log.append(event(2))
    log.close()


_DISK_FULL_SCRIPT = """
import json, os, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from keyd.audit import AuditLog, AuditUnavailable, verify_log
from tests.unit.test_audit import event

mount = Path(sys.argv[1])
key = Ed25519PrivateKey.generate()
public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
log = AuditLog.open(mount / "audit", signer=key.sign, public_key=public, checkpoint_seconds=0)
filler = mount / "filler"
fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
try:
    while True:
        os.write(fd, b"x" * 4096)
except OSError:
    os.close(fd)
appended, error = 0, ""
while not error:
    size = log.path.stat().st_size
    try:
        log.append_many([event(i) for i in range(3)])
        appended += 3
    except AuditUnavailable as exc:
        error = exc.message
full_size_ok = log.path.stat().st_size == size
filler.unlink()
log.append_many([event(i) for i in range(3)])
log.close()
report = verify_log(mount / "audit", public)
print(json.dumps({"error": error, "appended": appended, "size_kept": full_size_ok,
                  "ok": report.ok, "records": report.records}))
"""


def test_a_full_disk_refuses_then_resumes(tmp_path: Path) -> None:
    """A real ENOSPC: a 64 KiB tmpfs mounted in a private mount namespace (needs root)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("mounting a tmpfs needs root and unshare(1)")
    mount = tmp_path / "small"
    mount.mkdir()
    run = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            'mount -t tmpfs -o size=64k,mode=0700 keyd-test "$1" || exit 77; shift; exec "$@"',
            "sh",
            str(mount),
            sys.executable,
            "-c",
            _DISK_FULL_SCRIPT,
            str(mount),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    if run.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert "No space left on device" in result["error"]
    assert result["size_kept"]
    assert result["ok"]
    assert result["records"] == 1 + result["appended"] + 3 + 1


def test_eight_threads_appending_make_one_valid_chain(
    directory: Path, key: Ed25519PrivateKey
) -> None:
    heads: list[tuple[int, str]] = []
    log = open_log(
        directory,
        key,
        rotate_bytes=64 * 1024,
        checkpoint_seconds=0.005,
        on_checkpoint=lambda s, h: heads.append((s, h)),
    )
    start = threading.Barrier(8)

    def work(n: int) -> None:
        start.wait()
        for i in range(100):
            if i % 4:
                log.append(event(i, key_id=f"{n:064x}"))
            else:
                log.append_many([event(i, key_id=f"{n:064x}") for _ in range(3)])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    report = verify_log(directory, raw_public(key))
    assert report.ok, format_report(report)
    assert len(files(directory)) > 1
    assert heads == sorted(heads)  # heads are reported in order
    events = [r for r in records(directory) if r["type"] == "event"]
    for n in range(8):
        assert sum(r["key_id"] == f"{n:064x}" for r in events) == 75 + 25 * 3


def test_modes_and_ownership(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    old = os.umask(0)
    try:
        directory = tmp_path / "audit"
        open_log(directory, key).close()
    finally:
        os.umask(old)
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    (live,) = files(directory)
    assert oct(live.stat().st_mode & 0o777) == "0o600"

    live.chmod(0o644)
    with pytest.raises(AuditUnavailable, match=f"Run: chmod 600 {live}"):
        open_log(directory, key)
    live.chmod(0o600)
    directory.chmod(0o750)
    with pytest.raises(AuditUnavailable, match=f"Run: chmod 700 {directory}"):
        open_log(directory, key)
    directory.chmod(0o700)

    link = tmp_path / "link"
    link.symlink_to(directory)
    with pytest.raises(AuditUnavailable, match="symbolic links"):
        open_log(link, key)
    with pytest.raises(AuditUnavailable, match="cannot create audit log directory"):
        open_log(tmp_path / "no" / "such", key)


def test_one_writer_per_log(directory: Path, key: Ed25519PrivateKey) -> None:
    with open_log(directory, key), pytest.raises(AuditUnavailable, match="in use"):
        open_log(directory, key)
    open_log(directory, key).close()  # free again once closed


def test_no_payload_reaches_the_log(directory: Path, key: Ed25519PrivateKey) -> None:
    payload = os.urandom(24) + b"--secret-document--"
    with open_log(directory, key) as log:
        log.append(event(0, payload=payload))
    stored = b"".join(path.read_bytes() for path in files(directory))
    assert digest_payload(payload).encode() in stored
    for form in (payload, payload.hex().encode(), base64.b64encode(payload), b"secret-document"):
        assert form not in stored
    # A payload passed where its digest belongs is refused, and not echoed.
    with pytest.raises(ValueError, match="payload_sha256 must be") as refused:
        AuditEvent(caller=caller(), method="Sign", result=RESULT_OK, payload_sha256="secret")
    assert "secret" not in str(refused.value).replace("payload_sha256", "")


def test_the_checkpoint_thread_survives_failures(
    directory: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    calls = {"sign": 0, "notify": 0}
    signed = threading.Event()

    def flaky_signer(message: bytes) -> bytes:
        calls["sign"] += 1
        if calls["sign"] == 2:  # the first periodic checkpoint (1 is open()'s check)
            raise RuntimeError("store locked")
        return key.sign(message)

    def flaky_callback(seq: int, digest: str) -> None:
        calls["notify"] += 1
        if calls["notify"] == 1:
            raise RuntimeError("store busy")
        signed.set()

    caplog.set_level(logging.WARNING, logger="keyd.audit")
    log = AuditLog.open(
        directory,
        signer=flaky_signer,
        public_key=raw_public(key),
        checkpoint_seconds=0.01,
        on_checkpoint=flaky_callback,
    )
    for i in range(500):  # a failed signature, a failed callback, then success
        log.append(event(i))
        if signed.wait(0.01):
            break
    log.close()
    assert signed.is_set()
    assert "store locked" in caplog.text
    assert "store busy" in caplog.text
    report = verify_log(directory, raw_public(key))
    assert report.ok, format_report(report)
    assert report.unsigned_tail == 0


def test_a_failed_rotation_keeps_writing_to_the_old_file(
    directory: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log(directory, key, rotate_bytes=4096)
    first = log.path
    # The next file's name is taken: after the append (seq+1) and its checkpoint
    # (seq+2), the new file would start at seq+3.
    while True:
        blocker = directory / file_name(log.head[0] + 3)
        blocker.touch(mode=0o600)
        log.append(event(1))
        if first.stat().st_size >= 4096:
            break
        blocker.unlink()
    assert log.path == first
    assert "cannot rotate" in caplog.text
    seq = log.append(event(2))  # still in the old file, then rotated
    assert json.loads(lines_of(first)[-1])["type"] == "checkpoint"
    assert any(json.loads(line)["seq"] == seq for line in lines_of(first))
    assert log.path != first
    log.close()
    blocker.unlink()
    report = verify_log(directory, raw_public(key))
    assert report.ok, format_report(report)


def test_a_signer_that_does_not_match_the_key_is_refused(
    directory: Path, key: Ed25519PrivateKey
) -> None:
    with pytest.raises(ValueError, match="does not sign with the given public_key"):
        AuditLog.open(
            directory,
            signer=Ed25519PrivateKey.generate().sign,
            public_key=raw_public(key),
        )


def test_events_are_written_in_canonical_form() -> None:
    odd = Caller(
        uid=0,
        gid=0,
        pid=1,
        groups=frozenset(),
        user='qu"ote\\',
        exe="/opt/caf\u00e9/\udcff\nbin",  # non-ASCII, a lone surrogate (undecodable), newline
    )
    line = encode_event(AuditEvent(caller=odd, method="Sign", result="ok", time_ms=5), 7, "a" * 64)
    assert encode_record(json.loads(line)) == line
    assert b"\n" not in line
    assert json.loads(line)["exe"] == odd.exe


def test_a_request_s_items_are_written_as_its_events_would_be(tmp_path: Path) -> None:
    caller = Caller(uid=7, gid=8, pid=9, groups=frozenset(), user="ci", exe="/bin/x")
    items = [("k" * 64, "ab" * 32, "ok"), ('odd"id', "", "NotFound"), ("k" * 64, "cd" * 32, "ok")]
    lines, last = encode_events(caller, "SignBatch", "sign", 5, items, seq=10, prev="0" * 64)
    prev = "0" * 64
    for n, ((key_id, digest, result), line) in enumerate(zip(items, lines, strict=True)):
        event = AuditEvent(
            caller=caller,
            method="SignBatch",
            operation="sign",
            key_id=key_id,
            payload_sha256=digest,
            result=result,
            time_ms=5,
        )
        assert line == encode_event(event, 11 + n, prev)
        assert encode_record(json.loads(line)) == line
        prev = record_hash(line)
    assert last == prev
    with pytest.raises(ValueError, match="payload_sha256"):
        encode_events(caller, "Sign", "sign", 5, [("k", "the payload", "ok")], seq=0, prev=prev)


def test_a_batch_is_one_record_that_verifies(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    caller = Caller(uid=7, gid=8, pid=9, groups=frozenset(), user="ci", exe="/bin/x")
    items = [("k" * 64, "ab" * 32, "ok"), ('odd"id', "", "NotFound")]
    with AuditLog.open(tmp_path / "a", signer=key.sign, public_key=raw_public(key)) as log:
        seq = log.append_batch(caller, "SignBatch", "sign", items)
        with pytest.raises(ValueError, match="payload_sha256"):
            log.append_batch(caller, "SignBatch", "sign", [("k", "the payload", "ok")])
        assert log.head[0] == seq  # the refused batch left nothing
    report = verify_log(tmp_path / "a", raw_public(key))
    assert report.ok, report.problem
    (line,) = [
        json.loads(raw)
        for path in sorted((tmp_path / "a").glob("*.jsonl"))
        for raw in path.read_text().splitlines()
        if '"SignBatch"' in raw
    ]
    assert line["items"] == [list(item) for item in items]
