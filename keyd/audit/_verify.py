"""Checking a log: seqs, the hash chain, checkpoint signatures, and where it first breaks.

Records are read in order, one line at a time, and the first problem stops the
check, so its report points at one record. What each kind of tampering looks like:

- a record edited in place: the next record's `prev` no longer matches its hash;
- a record deleted: a gap in `seq`; moved: a `seq` out of order (found by looking ahead);
- a record edited and every later hash recomputed: the first checkpoint after it no
  longer verifies (only the key's holder can sign), so the records between the last
  valid checkpoint and that one are what can no longer be trusted;
- records cut from the end: only visible against a head recorded elsewhere
  (`expected_head`, which the daemon keeps in its store).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum, unique
from pathlib import Path
from typing import IO, Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keyd.audit._format import (
    FORMAT_VERSION,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    ZERO_HASH,
    OpenReason,
    RecordType,
    audit_files,
    checkpoint_message,
    encode_record,
    is_hex_digest,
    key_fingerprint,
    name_seq,
    record_hash,
)


@unique
class ProblemKind(Enum):
    EDITED = "edited"  # a record's content no longer matches the chain
    MISSING = "missing"  # seqs absent: records or whole files deleted
    REORDERED = "reordered"  # a record moved or repeated
    TORN = "torn"  # a line without its newline: a write cut short
    MALFORMED = "malformed"  # not a record keyd writes (bad JSON, fields, form)
    BAD_SIGNATURE = "bad-signature"  # a checkpoint that does not verify
    KEY_MISMATCH = "key-mismatch"  # an open record names another signing key
    TRUNCATED = "truncated"  # the log ends before the head recorded elsewhere
    HEAD_MISMATCH = "head-mismatch"  # the recorded head's seq has another hash
    UNREADABLE = "unreadable"  # a file or the directory cannot be read
    EMPTY = "empty"  # no records at all


@dataclass(frozen=True)
class Problem:
    """The first thing wrong with a log, and the record where it shows."""

    kind: ProblemKind
    message: str
    file: Path | None = None
    line: int = 0  # 1-based; 0 when the problem is not at one line
    seq: int | None = None  # the record's seq, or the missing seq
    offset: int = 0  # byte offset of the line in its file (`truncate -s OFFSET` cuts it)


@dataclass(frozen=True)
class VerifyReport:
    """What a check found. True when the log is intact."""

    ok: bool  # no problem found
    files: int
    records: int
    first_seq: int
    last_seq: int
    last_hash: str
    checkpoints: int
    last_checkpoint_seq: int  # the last checkpoint that verified (0: none)
    unsigned_tail: int  # records after it, chained but not yet signed
    key_fingerprint: str  # SHA-256 of the key checkpoints were checked with
    key_pinned: bool  # False: the key was taken from the log itself
    problem: Problem | None
    notes: tuple[str, ...] = field(default=())

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON values (`keyd audit verify --json`); kinds by name."""
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        data["notes"] = list(self.notes)
        if self.problem is not None:
            data["problem"] = {
                "kind": self.problem.kind.name,
                "message": self.problem.message,
                "file": str(self.problem.file) if self.problem.file is not None else None,
                "line": self.problem.line,
                "seq": self.problem.seq,
                "offset": self.problem.offset,
            }
        return data


_EVENT_INTS = ("uid", "gid", "pid")
_EVENT_STRS = ("user", "exe", "socket", "method", "operation", "key_id", "result")
_START_REASONS = (OpenReason.GENESIS.value, OpenReason.ROTATE.value)
_REASONS = {reason.value for reason in OpenReason}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decode(value: object, size: int) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


class _At(NamedTuple):
    """Where the record being checked is (a tuple: made once per record)."""

    path: Path
    line: int
    offset: int

    def __str__(self) -> str:
        return f"{self.path} line {self.line}"

    def problem(self, kind: ProblemKind, message: str, seq: int | None = None) -> _Broken:
        return _Broken(Problem(kind, message, self.path, self.line, seq, self.offset))


class _Broken(Exception):
    """The first problem, raised from deep in the checks and returned by Chain.add."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class Chain:
    """Checks records one at a time, in log order, until the first problem."""

    def __init__(self, public_key: bytes | None) -> None:
        self.key = public_key
        self.key_pinned = public_key is not None
        self._verifier = (
            Ed25519PublicKey.from_public_bytes(public_key) if public_key is not None else None
        )
        self.records = 0
        self.first_seq = 0
        self.first_prev = ""
        self.last_seq = 0
        self.last_hash = ""
        self.checkpoints = 0
        self.last_checkpoint_seq = 0
        self.unsigned = 0
        self.notes: list[str] = []
        # The hash of one seq, captured on the way (the head recorded elsewhere).
        self.watch_seq = 0
        self.watched: tuple[str, _At] | None = None
        self._last_at = _At(Path(), 0, 0)
        # The first record no valid checkpoint covers yet, and its seq.
        self._uncovered: tuple[_At, int] | None = None

    def add(
        self, path: Path, line_no: int, offset: int, raw: bytes, file_seq: int | None
    ) -> Problem | None:
        """Check the next line; the problem it shows, if any (then stop)."""
        at = _At(path, line_no, offset)
        try:
            line, record, seq, prev = self._parse(at, raw)
            self._check_place(at, seq, prev, file_seq)
            rtype = record.get("type")
            if line_no == 1 and rtype != RecordType.OPEN.value:
                raise at.problem(ProblemKind.MALFORMED, f"{at}: a file starts with an open record")
            if rtype == RecordType.EVENT.value:
                _check_event(at, record, seq)
            elif rtype == RecordType.OPEN.value:
                self._check_open(at, record, seq)
            elif rtype == RecordType.CHECKPOINT.value:
                self._check_checkpoint(at, record, seq, prev)
            else:
                raise at.problem(ProblemKind.MALFORMED, f"{at} has an unknown type {rtype!r}", seq)
        except _Broken as broken:
            return broken.problem

        if rtype == RecordType.CHECKPOINT.value:
            self.checkpoints += 1
            self.last_checkpoint_seq = seq
            self.unsigned = 0
            # The checkpoint vouches for the records before it, not for itself.
            self._uncovered = (at, seq)
        else:
            self.unsigned += 1
            if self._uncovered is None:
                self._uncovered = (at, seq)
        if self.records == 0:
            self.first_seq, self.first_prev = seq, prev
        self.records += 1
        self.last_seq, self.last_hash = seq, record_hash(line)
        self._last_at = at
        if seq == self.watch_seq:
            self.watched = (self.last_hash, at)
        return None

    def _parse(self, at: _At, raw: bytes) -> tuple[bytes, dict[str, Any], int, str]:
        if not raw.endswith(b"\n"):
            raise at.problem(
                ProblemKind.TORN,
                f"{at} is incomplete ({len(raw)} bytes without the final newline): keyd "
                "stopped, the system crashed or the disk filled up while it was written, "
                "or the file was cut",
                self.last_seq + 1 if self.records else None,
            )
        line = raw[:-1]
        try:
            record = json.loads(line)
        except ValueError:
            raise at.problem(ProblemKind.MALFORMED, f"{at} is not a JSON record") from None
        if not isinstance(record, dict):
            raise at.problem(ProblemKind.MALFORMED, f"{at} is not a JSON object")
        try:
            canonical = encode_record(record)
        except ValueError:  # NaN or infinity: never written by keyd
            canonical = b""
        if canonical != line:
            raise at.problem(
                ProblemKind.MALFORMED,
                f"{at} is not in keyd's canonical form (sorted keys, no spaces, ASCII): "
                "it was rewritten",
            )
        seq, prev = record.get("seq"), record.get("prev")
        if not (
            isinstance(seq, int)
            and _is_int(seq)
            and seq > 0
            and isinstance(prev, str)
            and is_hex_digest(prev)
            and _is_int(record.get("time_ms"))
        ):
            raise at.problem(ProblemKind.MALFORMED, f"{at} lacks a valid seq, prev or time_ms")
        return line, record, seq, prev

    def _check_place(self, at: _At, seq: int, prev: str, file_seq: int | None) -> None:
        """Order and chain come first: they say which record is out of place."""
        if self.records == 0:
            if (seq == 1) != (prev == ZERO_HASH):
                raise at.problem(
                    ProblemKind.MALFORMED,
                    f"{at}: seq 1, and only seq 1, has a prev of 64 zeros (seq {seq})",
                    seq,
                )
            if seq > 1:
                self.notes.append(
                    f"the log starts at seq {seq} ({at.path}): the files before it are not "
                    "present, so their records were not checked"
                )
        else:
            expected = self.last_seq + 1
            if seq > expected:
                raise at.problem(
                    ProblemKind.MISSING,
                    f"{_seqs(expected, seq - 1)} missing: {at} has seq {seq} right after "
                    f"seq {self.last_seq} ({self._last_at})",
                    expected,
                )
            if seq < expected:
                raise at.problem(
                    ProblemKind.REORDERED,
                    f"{at} has seq {seq} after seq {self.last_seq}: a record was moved or repeated",
                    seq,
                )
            if prev != self.last_hash:
                last = self._last_at
                raise last.problem(
                    ProblemKind.EDITED,
                    f"record seq {self.last_seq} ({last}) was changed: its hash no longer "
                    f"matches the prev of seq {seq} ({at}), or that prev was changed",
                    self.last_seq,
                )
        if at.line == 1 and file_seq is not None and file_seq != seq:
            if seq > file_seq:
                raise at.problem(
                    ProblemKind.MISSING,
                    f"{_seqs(file_seq, seq - 1)} missing: {at.path.name} should start with "
                    f"seq {file_seq} but starts with seq {seq}",
                    file_seq,
                )
            raise at.problem(
                ProblemKind.MALFORMED, f"{at.path.name} should start with seq {file_seq}, not {seq}"
            )

    def _check_open(self, at: _At, record: dict[str, Any], seq: int) -> None:
        reason = record.get("reason")
        if record.get("format") != FORMAT_VERSION:
            raise at.problem(
                ProblemKind.MALFORMED,
                f"open record seq {seq} is in format {record.get('format')!r}; this keyd reads "
                f"format {FORMAT_VERSION} (was the log written by a newer keyd?)",
                seq,
            )
        # Files start with genesis or rotate; a restart continues the live file.
        if (
            reason not in _REASONS
            or (at.line == 1) != (reason in _START_REASONS)
            or (reason == OpenReason.GENESIS.value) != (seq == 1)
        ):
            raise at.problem(
                ProblemKind.MALFORMED,
                f"open record seq {seq} with reason {reason!r} at {at}: unknown or out of place",
                seq,
            )
        public_key = _decode(record.get("public_key"), PUBLIC_KEY_BYTES)
        if public_key is None or record.get("key_fingerprint") != key_fingerprint(public_key):
            raise at.problem(
                ProblemKind.MALFORMED,
                f"open record seq {seq} has no valid public_key and key_fingerprint",
                seq,
            )
        if self.key is None:
            self.key = public_key
            self._verifier = Ed25519PublicKey.from_public_bytes(public_key)
        elif public_key != self.key:
            source = "the pinned key" if self.key_pinned else "the key of the log's first record"
            raise at.problem(
                ProblemKind.KEY_MISMATCH,
                f"open record seq {seq} ({at}) names signing key {key_fingerprint(public_key)}, "
                f"not {source} ({key_fingerprint(self.key)})",
                seq,
            )

    def _check_checkpoint(self, at: _At, record: dict[str, Any], seq: int, prev: str) -> None:
        if record.get("head_seq") != seq - 1 or record.get("head") != prev:
            raise at.problem(
                ProblemKind.EDITED,
                f"the checkpoint at {at} (seq {seq}) names head seq {record.get('head_seq')!r}, "
                "not the record before it: it was changed",
                seq,
            )
        signature = _decode(record.get("sig"), SIGNATURE_BYTES)
        if signature is None:
            raise at.problem(ProblemKind.MALFORMED, f"the checkpoint at {at} has no valid sig", seq)
        if self._verifier is None or self.key is None:
            raise at.problem(ProblemKind.MALFORMED, f"the checkpoint at {at} precedes any key", seq)
        try:
            self._verifier.verify(signature, checkpoint_message(seq - 1, prev))
        except InvalidSignature:
            fingerprint = key_fingerprint(self.key)
            if self._uncovered is None:  # nothing before it to blame
                raise at.problem(
                    ProblemKind.BAD_SIGNATURE,
                    f"the checkpoint at {at} (seq {seq}) does not verify with signing key "
                    f"{fingerprint}: it was forged or changed",
                    seq,
                ) from None
            first_at, first = self._uncovered
            covered = (
                f"records up to seq {first - 1} are covered by the valid checkpoint at seq "
                f"{self.last_checkpoint_seq}"
                if self.last_checkpoint_seq
                else "no earlier checkpoint verified"
            )
            # Which record changed cannot be known: only that the signed head differs.
            raise first_at.problem(
                ProblemKind.BAD_SIGNATURE,
                f"the checkpoint at {at} (seq {seq}) does not verify with signing key "
                f"{fingerprint}: one of seqs {first}-{seq - 1} was changed and the chain after "
                f"it recomputed, or the checkpoint was forged; {covered}",
                first,
            ) from None


def _seqs(first: int, last: int) -> str:
    return f"seq {first} is" if first == last else f"seqs {first}-{last} are"


def _check_event(at: _At, record: dict[str, Any], seq: int) -> None:
    for name in _EVENT_INTS:
        if not _is_int(record.get(name)):
            raise at.problem(ProblemKind.MALFORMED, f"{at}: event field {name} is not an integer")
    for name in _EVENT_STRS:
        if not isinstance(record.get(name), str):
            raise at.problem(ProblemKind.MALFORMED, f"{at}: event field {name} is not a string")
    digest = record.get("payload_sha256")
    if not isinstance(digest, str) or (digest and not is_hex_digest(digest)):
        raise at.problem(
            ProblemKind.MALFORMED, f"{at}: event field payload_sha256 is not a SHA-256", seq
        )
    items = record.get("items", [])
    if not isinstance(items, list) or not all(_is_item(item) for item in items):
        raise at.problem(
            ProblemKind.MALFORMED,
            f"{at}: event field items is not a list of [key ID, payload SHA-256, result]",
            seq,
        )


def _is_item(item: object) -> bool:
    """One SignBatch item of an event record: [key ID, payload digest or "", result]."""
    return (
        isinstance(item, list)
        and len(item) == 3
        and all(isinstance(part, str) for part in item)
        and (not item[1] or is_hex_digest(item[1]))
    )


def _find_seq(
    seq: int, rest_of_file: Iterable[bytes], path: Path, line_no: int, later: Sequence[Path]
) -> tuple[Path, int] | None:
    """Where a missing seq turns up further on, if it does (a moved record)."""

    def scan(lines: Iterable[bytes], file: Path, start: int) -> tuple[Path, int] | None:
        for number, raw in enumerate(lines, start):
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("seq") == seq:
                return file, number
        return None

    found = scan(rest_of_file, path, line_no + 1)
    for file in later:
        if found:
            break
        try:
            with file.open("rb") as f:
                found = scan(f, file, 1)
        except OSError:
            return None
    return found


def check_files(chain: Chain, files: Sequence[Path]) -> Problem | None:
    for index, path in enumerate(files):
        try:
            with path.open("rb") as f:
                problem, line_no = _check_file(chain, path, f, files[index + 1 :])
        except OSError as exc:
            return Problem(ProblemKind.UNREADABLE, f"cannot read {path}: {exc.strerror}", path)
        if problem:
            return problem
        if line_no == 0:
            return Problem(ProblemKind.MALFORMED, f"{path} is empty", path)
    return None


def _check_file(
    chain: Chain, path: Path, f: IO[bytes], later: Sequence[Path]
) -> tuple[Problem | None, int]:
    file_seq = name_seq(path)
    offset = line_no = 0
    for line_no, raw in enumerate(f, 1):
        problem = chain.add(path, line_no, offset, raw, file_seq)
        if problem is None:
            offset += len(raw)
            continue
        if problem.kind is ProblemKind.MISSING and problem.seq is not None:
            moved = _find_seq(problem.seq, f, path, line_no, later)
            if moved:
                here = json.loads(raw)["seq"]  # add() parsed this line already
                problem = Problem(
                    ProblemKind.REORDERED,
                    f"records are out of order: {path} line {line_no} has seq {here} where "
                    f"seq {problem.seq} belongs, and seq {problem.seq} is at {moved[0]} "
                    f"line {moved[1]}",
                    path,
                    line_no,
                    here,
                    offset,
                )
        return problem, line_no
    return None, line_no


def _resolve(paths: Sequence[Path] | Path) -> tuple[list[Path], Problem | None]:
    if isinstance(paths, Path) and paths.is_dir():
        try:
            files = [path for _, path in audit_files(paths)]
        except OSError as exc:
            return [], Problem(ProblemKind.UNREADABLE, f"cannot list {paths}: {exc.strerror}")
        if not files:
            return [], Problem(ProblemKind.EMPTY, f"{paths} holds no audit-*.jsonl files")
        return files, None
    files = [paths] if isinstance(paths, Path) else list(paths)
    seqs = [name_seq(path) for path in files]
    if all(seq is not None for seq in seqs):
        files.sort(key=lambda path: name_seq(path) or 0)
    return files, None


def _check_head(chain: Chain, files: Sequence[Path], expected: tuple[int, str]) -> Problem | None:
    seq, digest = expected
    if seq > chain.last_seq:
        return Problem(
            ProblemKind.TRUNCATED,
            f"keyd recorded the checkpoint seq {seq} (hash {digest}) but the log ends at "
            f"seq {chain.last_seq}: records were removed from its end, or it was replaced "
            "by an older copy",
            files[-1],
            0,
            chain.last_seq + 1,
        )
    if seq < chain.first_seq:
        chain.notes.append(
            f"the recorded head seq {seq} is before the first record present; not compared"
        )
        return None
    if chain.watched is None:  # cannot happen: every seq in range was seen
        return Problem(ProblemKind.MISSING, f"seq {seq} was not found", files[-1], 0, seq)
    found, at = chain.watched
    if found != digest:
        return at.problem(
            ProblemKind.HEAD_MISMATCH,
            f"record seq {seq} ({at}) has hash {found}, but keyd recorded {digest} for it: "
            "the log was replaced or rewritten",
            seq,
        ).problem
    return None


def verify_log(
    paths: Sequence[Path] | Path,
    public_key: bytes | None = None,
    *,
    expected_head: tuple[int, str] | None = None,
) -> VerifyReport:
    """Check a log (its directory, or files) and report the first broken record.

    public_key: the raw Ed25519 key checkpoints must verify with. None: the key of
    the first open record is used, which proves the log consistent with itself
    only (someone who rewrote all of it with their own key would pass).
    expected_head: a checkpoint (seq, hash) recorded elsewhere; the log must hold it.
    """
    files, problem = _resolve(paths)
    chain = Chain(public_key)
    if expected_head is not None:
        chain.watch_seq = expected_head[0]
    if problem is None:
        problem = check_files(chain, files)
    if problem is None and chain.records == 0:
        problem = Problem(ProblemKind.EMPTY, "the log holds no records")
    if problem is None and expected_head is not None:
        problem = _check_head(chain, files, expected_head)
    return VerifyReport(
        ok=problem is None,
        files=len(files),
        records=chain.records,
        first_seq=chain.first_seq,
        last_seq=chain.last_seq,
        last_hash=chain.last_hash,
        checkpoints=chain.checkpoints,
        last_checkpoint_seq=chain.last_checkpoint_seq,
        unsigned_tail=chain.unsigned,
        key_fingerprint=key_fingerprint(chain.key) if chain.key is not None else "",
        key_pinned=chain.key_pinned,
        problem=problem,
        notes=tuple(chain.notes),
    )


def format_report(report: VerifyReport) -> str:
    """The report as `keyd audit verify` prints it."""
    lines = [
        f"{report.records} records in {report.files} file(s)"
        + (f", seq {report.first_seq} to {report.last_seq}" if report.records else "")
    ]
    if report.last_checkpoint_seq:
        lines.append(
            f"{report.checkpoints} checkpoint(s) verified, the last at seq "
            f"{report.last_checkpoint_seq}"
        )
    else:
        lines.append("no checkpoint verified")
    if report.unsigned_tail:
        lines.append(
            f"{report.unsigned_tail} record(s) after the last checkpoint are chained but not "
            "signed yet: a rewrite of them is only caught once keyd signs the next checkpoint"
        )
    if report.key_fingerprint:
        source = (
            "pinned"
            if report.key_pinned
            else "taken from the log itself, not pinned: a log rewritten in full with another "
            "key would pass; give keyd's audit public key to pin it"
        )
        lines.append(f"signing key SHA-256 {report.key_fingerprint} ({source})")
    lines.extend(f"note: {note}" for note in report.notes)
    problem = report.problem
    if problem is None:
        lines.append("OK: every record is in order, chained, and covered as stated above")
    else:
        where = ""
        if problem.file is not None:
            where = f" at {problem.file}" + (f" line {problem.line}" if problem.line else "")
        if problem.seq is not None:
            where += f" (seq {problem.seq})"
        lines.append(f"BROKEN ({problem.kind.value}){where}: {problem.message}")
    return "\n".join(lines)
