"""The audit log's records and files, byte for byte.

A log is a directory of JSON Lines files, `audit-<first seq>.jsonl`. Each line is
one record in canonical JSON (sorted keys, no spaces, ASCII only), so its hash is
the SHA-256 of the line's bytes (without the newline) and any tool can recompute
it. Every record carries `seq` (consecutive from 1 across files) and `prev` (the
hash of the record before it), so an edit, a deletion or a move breaks the chain.
Checkpoint records sign the chain head with a dedicated Ed25519 key, so a chain
rewritten from some record on is caught at the next checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, unique
from pathlib import Path
from typing import Any

from keyd.core.identity import Caller

_esc: Callable[[str], str] = json.encoder.encode_basestring_ascii

FORMAT_VERSION = 1
ZERO_HASH = "0" * 64
# Domain separation: a checkpoint signature can never be mistaken for another
# signature made with the same key, nor the other way round.
CHECKPOINT_CONTEXT = b"keyd-audit-checkpoint-v1\n"
PUBLIC_KEY_BYTES = 32  # raw Ed25519
SIGNATURE_BYTES = 64

RESULT_OK = "ok"
RESULT_DENIED = "denied"

_FILE_NAME = re.compile(r"audit-(\d{12})\.jsonl")
_HEX64 = re.compile(r"[0-9a-f]{64}")

# One encoder, built once: json.dumps with keyword arguments builds a new one per call.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, check_circular=False
)


@unique
class RecordType(Enum):
    OPEN = "open"  # first record of a file, and the first after each daemon start
    EVENT = "event"  # one request, allowed or refused
    CHECKPOINT = "checkpoint"  # a signature over the chain head


@unique
class OpenReason(Enum):
    GENESIS = "genesis"  # seq 1: a new log
    ROTATE = "rotate"  # first record of a file after the previous one filled up
    RESTART = "restart"  # keyd started again and continues the chain


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def digest_payload(payload: bytes) -> str:
    """What the log keeps of a payload: its SHA-256, hex. Never the payload itself."""
    return hashlib.sha256(payload).hexdigest()


def is_hex_digest(value: str) -> bool:
    return _HEX64.fullmatch(value) is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditEvent:
    """One request as the audit log records it."""

    caller: Caller
    method: str  # the RPC, e.g. "Sign"
    result: str  # RESULT_OK, RESULT_DENIED or an error kind such as "NotFound"
    operation: str = ""  # the permission checked (keyd.core.identity.Operation value)
    key_id: str = ""
    payload_sha256: str = ""  # digest_payload(payload); "" when there is none
    time_ms: int = field(default_factory=now_ms)

    def __post_init__(self) -> None:
        check_digest(self.payload_sha256)


def check_digest(digest: str) -> None:
    """Guards the promise that no payload reaches the log: a payload passed where its
    digest belongs is refused (and not echoed in the message)."""
    if digest and not is_hex_digest(digest):
        raise ValueError("payload_sha256 must be digest_payload(payload): 64 lowercase hex")


def encode_record(record: dict[str, Any]) -> bytes:
    """A record's line, without the newline: the bytes its hash is computed over."""
    return _ENCODER.encode(record).encode("ascii")


def record_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def encode_event(event: AuditEvent, seq: int, prev: str) -> bytes:
    """An event record's line, without the newline (see encode_events)."""
    items = ((event.key_id, event.payload_sha256, event.result),)
    lines, _ = encode_events(
        event.caller, event.method, event.operation, event.time_ms, items, seq=seq - 1, prev=prev
    )
    return lines[0]


def encode_events(
    caller: Caller,
    method: str,
    operation: str,
    time_ms: int,
    items: Sequence[tuple[str, str, str]],
    *,
    seq: int,
    prev: str,
) -> tuple[list[bytes], str]:
    """The lines of several events of one request (a batch: one caller, method and
    time; each item its key ID, payload digest and result), chained from `prev`,
    numbered from seq + 1; and the last line's hash.

    Written out by hand in canonical form (keys sorted, as encode_record would write
    them; a test holds the two equal), and with the parts every item shares built
    once: this runs for every signature keyd makes.
    """
    head = f'{{"exe":{_esc(caller.exe)},"gid":{caller.gid:d},"key_id":'
    middle = f',"method":{_esc(method)},"operation":{_esc(operation)},"payload_sha256":'
    pid = f',"pid":{caller.pid:d},"prev":"'
    tail = (
        f',"socket":{_esc(caller.socket)},"time_ms":{time_ms:d},"type":"event",'
        f'"uid":{caller.uid:d},"user":{_esc(caller.user)}}}'
    )
    lines = []
    for key_id, digest, result in items:
        check_digest(digest)
        seq += 1
        line = (
            f'{head}{_esc(key_id)}{middle}"{digest}"{pid}{prev}","result":{_esc(result)},'
            f'"seq":{seq:d}{tail}'
        ).encode("ascii")
        prev = hashlib.sha256(line).hexdigest()
        lines.append(line)
    return lines, prev


def encode_batch(
    caller: Caller,
    method: str,
    operation: str,
    time_ms: int,
    items: Sequence[tuple[str, str, str]],
    *,
    seq: int,
    prev: str,
) -> bytes:
    """One event record for a request of many items (SignBatch): `items` lists each
    item's key ID, payload digest and result. One record, not one per item, so the
    cost per signature is a list entry, not a record and its hash."""
    for _, digest, _ in items:
        check_digest(digest)
    return encode_record(
        {
            "type": RecordType.EVENT.value,
            "seq": seq,
            "prev": prev,
            "time_ms": time_ms,
            "uid": caller.uid,
            "gid": caller.gid,
            "pid": caller.pid,
            "user": caller.user,
            "exe": caller.exe,
            "socket": caller.socket,
            "method": method,
            "operation": operation,
            "key_id": "",
            "payload_sha256": "",
            "result": "ok",
            "items": [list(item) for item in items],
        }
    )


def open_record(reason: OpenReason, public_key: bytes, seq: int, prev: str) -> dict[str, Any]:
    return {
        "type": "open",
        "seq": seq,
        "prev": prev,
        "time_ms": now_ms(),
        "format": FORMAT_VERSION,
        "reason": reason.value,
        "public_key": b64encode(public_key),
        "key_fingerprint": key_fingerprint(public_key),
    }


def checkpoint_record(head_seq: int, head: str, signature: bytes) -> dict[str, Any]:
    return {
        "type": "checkpoint",
        "seq": head_seq + 1,
        "prev": head,
        "time_ms": now_ms(),
        "head_seq": head_seq,
        "head": head,
        "sig": b64encode(signature),
    }


def checkpoint_message(head_seq: int, head: str) -> bytes:
    """The bytes a checkpoint signs: the seq and hash of the record before it."""
    return CHECKPOINT_CONTEXT + f"{head_seq}:{head}".encode("ascii")


def key_fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def file_name(first_seq: int) -> str:
    return f"audit-{first_seq:012d}.jsonl"


def audit_files(directory: Path) -> list[tuple[int, Path]]:
    """The log's files with the seq of their first record, oldest first."""
    files = []
    for path in directory.iterdir():
        match = _FILE_NAME.fullmatch(path.name)
        if match:
            files.append((int(match.group(1)), path))
    files.sort()
    return files


def name_seq(path: Path) -> int | None:
    """The first seq a file's name announces, or None for a name keyd did not give."""
    match = _FILE_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None
