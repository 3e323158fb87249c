"""Writing the log: one append per request, checkpoints, rotation, refusal when it fails.

Every append is one os.write of whole lines to an O_APPEND descriptor. If the
write fails or is cut short (disk full, quota, I/O error), the file is truncated
back to its previous size, the head stays where it was and AuditUnavailable is
raised, so the daemon refuses the request: no result (no signature) leaves keyd
without its record, and the next append after the cause is fixed continues an
intact chain.

Locks: `_checkpoint_lock` serialises checkpoints and rotation end to end (including
the on_checkpoint callback, so heads are reported in order); `_lock` guards the
descriptor and the head and is held only for the time of a write. The order is
always _checkpoint_lock, then _lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keyd.audit._errors import AuditCorrupt, AuditUnavailable
from keyd.audit._format import (
    PUBLIC_KEY_BYTES,
    ZERO_HASH,
    AuditEvent,
    OpenReason,
    audit_files,
    checkpoint_message,
    checkpoint_record,
    encode_batch,
    encode_event,
    encode_events,
    encode_record,
    file_name,
    now_ms,
    open_record,
    record_hash,
)
from keyd.audit._verify import Chain, Problem, ProblemKind, check_files
from keyd.core.identity import Caller

logger = logging.getLogger("keyd.audit")

DEFAULT_ROTATE_BYTES = 64 * 1024 * 1024
Signer = Callable[[bytes], bytes]
CheckpointCallback = Callable[[int, str], None]


class AuditLog:
    """An open, checked, append-only audit log. Thread-safe; one per daemon.

    Build it with AuditLog.open(). Use as a context manager or call close().
    """

    def __init__(
        self,
        directory: Path,
        dir_fd: int,
        *,
        signer: Signer,
        public_key: bytes,
        rotate_bytes: int,
        checkpoint_seconds: float,
        fsync_each: bool,
        on_checkpoint: CheckpointCallback | None,
    ) -> None:
        self.directory = directory
        self._dir_fd = dir_fd  # holds the flock: one writer per log
        self._signer = signer
        self._public_key = public_key
        self._verifier = Ed25519PublicKey.from_public_bytes(public_key)
        self._rotate_bytes = rotate_bytes
        self._checkpoint_seconds = checkpoint_seconds
        self._fsync_each = fsync_each
        self._on_checkpoint = on_checkpoint
        self._lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._path = directory
        self._fd = -1
        self._size = 0
        self._seq = 0
        self._hash = ZERO_HASH
        self._unsigned = 0  # records since the last checkpoint
        # Set when a failed write could not be undone: the file ends in a partial
        # line, and appending after it would bury it. Every append is refused.
        self._broken = ""
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        signer: Signer,
        public_key: bytes,
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        checkpoint_seconds: float = 10.0,
        fsync_each: bool = False,
        expected_head: tuple[int, str] | None = None,
        on_checkpoint: CheckpointCallback | None = None,
    ) -> AuditLog:
        """Open the log in `directory` (created if missing), or start a new one.

        signer signs bytes with the dedicated Ed25519 key whose raw public key is
        public_key. An existing log's live file is checked completely (chain, seqs,
        checkpoint signatures) and continued with a restart record. expected_head is
        the last checkpoint (seq, hash) the daemon recorded elsewhere: a log that
        does not hold it was cut short or replaced, and is refused. checkpoint_seconds
        0 leaves checkpoints to checkpoint(), rotation and close().
        """
        if len(public_key) != PUBLIC_KEY_BYTES:
            raise ValueError("public_key must be a raw 32-byte Ed25519 public key")
        if rotate_bytes < 4096 or checkpoint_seconds < 0:
            raise ValueError("rotate_bytes must be at least 4096 and checkpoint_seconds >= 0")
        _check_signer(signer, public_key)
        dir_fd = _open_directory(directory)
        log = cls(
            directory,
            dir_fd,
            signer=signer,
            public_key=public_key,
            rotate_bytes=rotate_bytes,
            checkpoint_seconds=checkpoint_seconds,
            fsync_each=fsync_each,
            on_checkpoint=on_checkpoint,
        )
        try:
            files = audit_files(directory)
            if files:
                log._continue(files, expected_head)
            elif expected_head is not None:
                raise AuditCorrupt(
                    f"audit log {directory} is empty, but keyd recorded its checkpoint seq "
                    f"{expected_head[0]} (hash {expected_head[1]}): the log was removed. "
                    f"Restore it from a backup into {directory}, or start a new log with "
                    "`keyd audit reset` (keyd stopped)"
                )
            else:
                with log._lock:
                    log._start_file(OpenReason.GENESIS)
        except BaseException:
            log._release()
            raise
        if checkpoint_seconds > 0:
            log._thread = threading.Thread(
                target=log._run, name="keyd-audit-checkpoint", daemon=True
            )
            log._thread.start()
        return log

    # -- appending ----------------------------------------------------------

    def append(self, event: AuditEvent) -> int:
        """Record one request; its seq. Raises AuditUnavailable: refuse the request."""
        return self.append_many((event,))

    def append_many(self, events: Sequence[AuditEvent]) -> int:
        """Record several requests with one write (all or none); the last seq."""

        def encode(seq: int, prev: str) -> tuple[list[bytes], str]:
            lines = []
            for event in events:
                seq += 1
                line = encode_event(event, seq, prev)
                prev = record_hash(line)
                lines.append(line)
            return lines, prev

        return self._append(encode)

    def append_items(
        self,
        caller: Caller,
        method: str,
        operation: str,
        items: Sequence[tuple[str, str, str]],
        time_ms: int | None = None,
    ) -> int:
        """Record one request's events, one per (key ID, payload digest, result) item,
        with one write (all or none); the last seq. The daemon's path for requests of
        one item: no AuditEvent is built."""
        when = now_ms() if time_ms is None else time_ms
        return self._append(
            lambda seq, prev: encode_events(
                caller, method, operation, when, items, seq=seq, prev=prev
            )
        )

    def append_batch(
        self,
        caller: Caller,
        method: str,
        operation: str,
        items: Sequence[tuple[str, str, str]],
        time_ms: int | None = None,
    ) -> int:
        """Record one request of many items (key ID, payload digest, result) as one
        event record with an `items` list; its seq. The daemon's SignBatch path."""
        when = now_ms() if time_ms is None else time_ms

        def encode(seq: int, prev: str) -> tuple[list[bytes], str]:
            line = encode_batch(caller, method, operation, when, items, seq=seq + 1, prev=prev)
            return [line], record_hash(line)

        return self._append(encode)

    def _append(self, encode: Callable[[int, str], tuple[list[bytes], str]]) -> int:
        """Write the records encode(head seq, head hash) makes, in one write; the new
        head's seq. Rotates afterwards when the file is full."""
        with self._lock:
            lines, last = encode(self._seq, self._hash)
            if not lines:
                return self._seq
            lines.append(b"")
            self._write(b"\n".join(lines))
            count = len(lines) - 1
            self._seq += count
            self._hash = last
            self._unsigned += count
            seq = self._seq
            full = self._size >= self._rotate_bytes
        if full:
            self._rotate()
        return seq

    @property
    def head(self) -> tuple[int, str]:
        """The seq and hash of the last record written."""
        with self._lock:
            return self._seq, self._hash

    @property
    def path(self) -> Path:
        """The live file."""
        with self._lock:
            return self._path

    def _write(self, data: bytes) -> None:
        """Write whole lines at the end of the live file, or nothing. Holds _lock."""
        self._check_writable()
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # a short write: the next one says why (ENOSPC...)
                more = os.write(self._fd, data[written:])
                if more == 0:  # never for regular files; do not spin if it happens
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                written += more
            if self._fsync_each:
                os.fsync(self._fd)
        except OSError as exc:
            self._undo(exc)
            raise AuditUnavailable(
                f"audit log {self.directory} cannot be written ({exc.strerror}); the request "
                f"was refused. Free space in {self.directory} or fix its permissions: keyd "
                "accepts requests again as soon as it can write"
            ) from None
        self._size += len(data)

    def _check_writable(self) -> None:
        if self._closed:
            raise AuditUnavailable(f"audit log {self.directory} is closed; the request was refused")
        if self._broken:
            raise AuditUnavailable(self._broken)

    def _undo(self, exc: OSError) -> None:
        """Cut the live file back to its last whole line after a failed write."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as truncate_exc:
            self._broken = (
                f"audit log {self._path} ends in a partial record that keyd could not remove "
                f"({truncate_exc.strerror}, after {exc.strerror}); every request is refused. "
                f"Stop keyd, check the log with `keyd audit verify {self.directory}`, remove "
                f"the partial last line with `truncate -s {self._size} {self._path}` and start "
                "keyd again"
            )
            logger.error("%s", self._broken)

    def _start_file(self, reason: OpenReason) -> None:
        """Create the next file, begin it with an open record, make it the live file.

        Holds _lock. On failure the new file is removed and the live file stays.
        """
        seq = self._seq + 1
        path = self.directory / file_name(seq)
        line = encode_record(open_record(reason, self._public_key, seq, self._hash))
        data = line + b"\n"
        try:
            # O_EXCL: never append to a file someone else made.
            fd = os.open(
                path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except OSError as exc:
            raise AuditUnavailable(f"cannot create audit file {path}: {exc.strerror}") from None
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
            os.fsync(self._dir_fd)  # the new name itself must survive a crash
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise AuditUnavailable(
                f"cannot start audit file {path} ({exc.strerror}); free space in {self.directory}"
            ) from None
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._path, self._size = fd, path, len(data)
        self._seq, self._hash = seq, record_hash(line)
        self._unsigned += 1

    def _continue(self, files: list[tuple[int, Path]], expected: tuple[int, str] | None) -> None:
        """Check the live file and continue its chain with a restart record."""
        for _, path in files:
            _check_file_mode(path)
        chain = Chain(self._public_key)
        if expected is not None:
            chain.watch_seq = expected[0]
        live = files[-1][1]
        problem = check_files(chain, [live])
        if problem is not None:
            raise AuditCorrupt(_refusal(self.directory, problem))
        if len(files) > 1:
            _check_link(files[-2][1], live, chain)
        if expected is not None:
            _check_expected(self.directory, files, chain, expected)
        try:
            fd = os.open(live, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise AuditUnavailable(f"cannot open audit file {live}: {exc.strerror}") from None
        with self._lock:
            self._fd, self._path, self._size = fd, live, os.fstat(fd).st_size
            self._seq, self._hash = chain.last_seq, chain.last_hash
            self._unsigned = chain.unsigned
            line = encode_record(
                open_record(OpenReason.RESTART, self._public_key, self._seq + 1, self._hash)
            )
            self._write(line + b"\n")
            self._seq, self._hash = self._seq + 1, record_hash(line)
            self._unsigned += 1
        logger.info("audit log %s continues at seq %d", self.directory, self._seq)

    # -- checkpoints and rotation -------------------------------------------

    def checkpoint(self) -> tuple[int, str] | None:
        """Sign the chain head now; the checkpoint's (seq, hash), or None when
        nothing was appended since the last one. Raises AuditUnavailable."""
        with self._checkpoint_lock:
            with self._lock:
                if not self._unsigned and not self._closed:
                    return None
                seq_hash = self._write_checkpoint()
                fd = self._fd
            # Outside _lock, so appends go on; rotation and close, which could
            # close fd, wait for _checkpoint_lock.
            try:
                os.fsync(fd)
            except OSError as exc:
                raise AuditUnavailable(
                    f"audit log {self.directory} cannot be synced ({exc.strerror})"
                ) from None
            if self._on_checkpoint is not None:
                self._on_checkpoint(*seq_hash)
            return seq_hash

    def _write_checkpoint(self) -> tuple[int, str]:
        """Sign the head and append the checkpoint record. Holds _lock."""
        self._check_writable()
        message = checkpoint_message(self._seq, self._hash)
        try:
            signature = self._signer(message)
            self._verifier.verify(signature, message)
        except InvalidSignature:
            raise AuditUnavailable(
                "the audit signing key made a checkpoint signature that does not verify"
            ) from None
        except Exception as exc:
            # The signer is the daemon's: any failure means no checkpoint now.
            raise AuditUnavailable(f"cannot sign an audit checkpoint: {exc}") from exc
        line = encode_record(checkpoint_record(self._seq, self._hash, signature))
        self._write(line + b"\n")
        self._seq, self._hash = self._seq + 1, record_hash(line)
        self._unsigned = 0
        return self._seq, self._hash

    def _rotate(self) -> None:
        """Close a full live file with a checkpoint and start the next one.

        On failure the records stay in the old file and the next append retries.
        """
        # Another thread checkpointing or rotating: the next append tries again.
        if not self._checkpoint_lock.acquire(blocking=False):
            return
        try:
            checkpoint = None
            with self._lock:
                if self._closed or self._broken or self._size < self._rotate_bytes:
                    return
                try:
                    written = self._write_checkpoint() if self._unsigned else None
                    os.fsync(self._fd)
                    checkpoint = written  # reported once it is on disk
                    self._start_file(OpenReason.ROTATE)
                except (AuditUnavailable, OSError) as exc:
                    logger.warning(
                        "cannot rotate audit log %s, still writing to %s: %s",
                        self.directory,
                        self._path,
                        exc,
                    )
                else:
                    logger.info("audit log continues in %s", self._path)
            if checkpoint is not None:
                self._notify(checkpoint)
        finally:
            self._checkpoint_lock.release()

    def _notify(self, checkpoint: tuple[int, str]) -> None:
        if self._on_checkpoint is None:
            return
        try:
            self._on_checkpoint(*checkpoint)
        except Exception:
            logger.exception("audit on_checkpoint failed for seq %d", checkpoint[0])

    def _run(self) -> None:
        """The periodic checkpoint thread: never dies of a failed checkpoint."""
        while not self._stop.wait(self._checkpoint_seconds):
            try:
                self.checkpoint()
            except AuditUnavailable as exc:
                logger.warning(
                    "audit checkpoint failed, retrying in %ss: %s", self._checkpoint_seconds, exc
                )
            except Exception:
                logger.exception("audit checkpoint callback failed")
            if self._size >= self._rotate_bytes:  # a rotation that failed earlier
                self._rotate()

    # -- closing --------------------------------------------------------------

    def close(self) -> None:
        """Sign the head (best effort), sync and close. Appends are refused after."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        checkpoint = None
        with self._checkpoint_lock, self._lock:
            if self._closed:
                return
            if self._unsigned and not self._broken:
                try:
                    checkpoint = self._write_checkpoint()
                except AuditUnavailable as exc:
                    logger.warning("no final audit checkpoint: %s", exc)
            try:
                os.fsync(self._fd)
            except OSError as exc:
                logger.warning("cannot sync audit log %s: %s", self._path, exc.strerror)
            self._closed = True
            self._release()
        if checkpoint is not None:
            self._notify(checkpoint)

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir_fd >= 0:
            os.close(self._dir_fd)  # drops the flock
            self._dir_fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_signer(signer: Signer, public_key: bytes) -> None:
    """A signer that does not match the key would make every checkpoint fail later."""
    # Not a checkpoint message: this signature must never pass for one.
    message = b"keyd-audit-signer-check\n" + public_key
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signer(message), message)
    except InvalidSignature:
        raise ValueError("the audit signer does not sign with the given public_key") from None


def _open_directory(directory: Path) -> int:
    """Create or check the log directory (0700, keyd's), open and lock it."""
    try:
        directory.mkdir(mode=0o700)
        directory.chmod(0o700)  # whatever the umask
    except FileExistsError:
        pass
    except OSError as exc:
        raise AuditUnavailable(
            f"cannot create audit log directory {directory}: {exc.strerror}"
        ) from None
    try:
        st = directory.lstat()
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise AuditUnavailable(
            f"cannot open audit log directory {directory}: {exc.strerror} (symbolic links "
            "are refused)"
        ) from None
    if st.st_mode & 0o077 or st.st_uid != os.geteuid():
        os.close(fd)
        raise AuditUnavailable(
            f"audit log directory {directory} must be mode 0700 and owned by keyd's user "
            f"(it is {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}). Run: chmod 700 {directory}"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise AuditUnavailable(
            f"audit log {directory} is in use by another process (another keyd?); stop it first"
        ) from None
    return fd


def _check_file_mode(path: Path) -> None:
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise AuditCorrupt(f"audit file {path} is not a regular file (symbolic links are refused)")
    if st.st_mode & 0o077 or st.st_uid != os.geteuid():
        raise AuditUnavailable(
            f"audit file {path} must be mode 0600 and owned by keyd's user (it is "
            f"{stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}). Run: chmod 600 {path}"
        )


def _refusal(directory: Path, problem: Problem) -> str:
    if problem.kind is ProblemKind.TORN and problem.file is not None:
        return (
            f"audit log {problem.file} ends in an incomplete record at line {problem.line}: "
            "keyd stopped, the system crashed or the disk filled up while it was written. "
            f"keyd does not repair logs itself: check the rest with `keyd audit verify "
            f"{directory}`, then remove the incomplete line with `truncate -s {problem.offset} "
            f"{problem.file}` and start keyd again"
        )
    return (
        f"audit log {directory} is damaged ({problem.kind.value}): {problem.message}. keyd "
        f"will not add to a log it cannot vouch for: run `keyd audit verify {directory}` for "
        "the full report, keep the files as evidence and move them out of the directory, "
        "then `keyd audit reset` (keyd stopped) starts a new log"
    )


def _last_line(path: Path) -> bytes:
    """The last line of a file, without its newline (b"" when it has none)."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        chunk = 4096
        while True:
            start = max(0, end - chunk)
            f.seek(start)
            data = f.read(end - start)
            if not data.endswith(b"\n"):
                return b""
            cut = data.rfind(b"\n", 0, len(data) - 1)
            if cut >= 0 or start == 0:
                return data[cut + 1 : -1]
            chunk *= 4


def _check_link(previous: Path, live: Path, chain: Chain) -> None:
    """The live file must continue the file before it (only the live file is fully read)."""
    try:
        last = _last_line(previous)
    except OSError as exc:
        raise AuditUnavailable(f"cannot read audit file {previous}: {exc.strerror}") from None
    if not last or record_hash(last) != chain.first_prev:
        raise AuditCorrupt(
            f"audit log {live} does not continue {previous}: the first record's prev is not "
            f"the hash of the last record before it. Run `keyd audit verify {live.parent}` "
            "for the full report"
        )


def _check_expected(
    directory: Path, files: list[tuple[int, Path]], chain: Chain, expected: tuple[int, str]
) -> None:
    """The head keyd recorded elsewhere must be in the log, with the same hash."""
    seq, digest = expected
    found = ""
    if seq > chain.last_seq:
        raise AuditCorrupt(
            f"audit log {directory} ends at seq {chain.last_seq}, but keyd recorded the "
            f"checkpoint seq {seq} (hash {digest}): records were removed from its end or the "
            f"log was replaced by an older copy. Restore the log from a backup, or keep these "
            "files as evidence, move them out of the directory and run `keyd audit reset` "
            "(keyd stopped) to start a new log"
        )
    if seq >= chain.first_seq:
        found = chain.watched[0] if chain.watched else ""
    elif seq == chain.first_seq - 1:  # the checkpoint that closed the previous file
        found = chain.first_prev
    else:
        found = _hash_at(files, seq)
    if found != digest:
        raise AuditCorrupt(
            f"audit log {directory} has hash {found or 'nothing'} at seq {seq}, but keyd "
            f"recorded the checkpoint seq {seq} with hash {digest}: the log was replaced or "
            "rewritten. Keep the files as evidence and run `keyd audit verify` on them"
        )


def _hash_at(files: list[tuple[int, Path]], seq: int) -> str:
    """The hash of one record of an older file ("" if it is not there)."""
    candidates = [(first, path) for first, path in files if first <= seq]
    if not candidates:
        return ""
    first, path = candidates[-1]
    wanted = seq - first + 1  # seqs are consecutive within a file
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if number == wanted:
                return record_hash(raw[:-1]) if raw.endswith(b"\n") else ""
    return ""
