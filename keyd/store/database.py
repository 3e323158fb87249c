"""The SQLCipher 4 database file: creation, opening, schema, transactions.

One writer connection guarded by a lock; the daemon keeps the catalog in memory,
so reads rarely reach the file. WAL with synchronous=FULL: a committed key
creation survives a crash or power loss. secure_delete zeroes freed pages, so a
deleted private key does not linger in the (encrypted) file; temp_store=MEMORY
keeps SQLite's temporary tables off the disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlcipher3

from keyd.errors import StoreError
from keyd.store.secret import StoreSecret

SCHEMA_VERSION = 2

_AUDIT_STATE = """
-- The audit log's checkpoint key (PKCS#8 DER) and the last checkpoint written, so a
-- truncated or replaced log is noticed at start.
CREATE TABLE audit_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    pkcs8       BLOB NOT NULL,
    head_seq    INTEGER NOT NULL DEFAULT 0,
    head_hash   TEXT NOT NULL DEFAULT ''
);
"""

_SCHEMA = (
    """
CREATE TABLE keys (
    key_id      TEXT PRIMARY KEY,
    key_type    TEXT NOT NULL,
    public_key  BLOB NOT NULL,     -- Notary's public key bytes
    backend     TEXT NOT NULL,
    location    TEXT NOT NULL,     -- JSON object of strings
    role        TEXT NOT NULL,
    collection  TEXT NOT NULL,
    labels      TEXT NOT NULL,     -- JSON object of strings
    created_ms  INTEGER NOT NULL,
    state       TEXT NOT NULL,
    purge_after_ms   INTEGER NOT NULL DEFAULT 0,
    destroy_on_purge INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
-- Private keys of store keys (PKCS#8 DER), only ever written with their catalog row.
CREATE TABLE store_private_keys (
    key_id      TEXT PRIMARY KEY REFERENCES keys(key_id) ON DELETE CASCADE,
    pkcs8       BLOB NOT NULL
) WITHOUT ROWID;
"""
    + _AUDIT_STATE
)

# Version 1 -> 2: pending deletion, and the audit log's key and last checkpoint.
_MIGRATE_1_TO_2 = (
    """
ALTER TABLE keys ADD COLUMN purge_after_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN destroy_on_purge INTEGER NOT NULL DEFAULT 0;
"""
    + _AUDIT_STATE
)

Row = tuple[Any, ...]


def _check_store_path(path: Path, *, must_exist: bool) -> None:
    """Refuse a store whose directory or file others can read or change."""
    try:
        parent = path.parent.stat()
    except FileNotFoundError:
        raise StoreError(
            f"store directory {path.parent} does not exist (run `keyd init`)"
        ) from None
    if parent.st_mode & 0o077 or parent.st_uid != os.geteuid():
        raise StoreError(
            f"store directory {path.parent} must be mode 0700 and owned by keyd's user "
            f"(it is {stat.S_IMODE(parent.st_mode):04o}, uid {parent.st_uid}). "
            f"Run: chmod 700 {path.parent}"
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        if must_exist:
            raise StoreError(f"store {path} does not exist; create it with `keyd init`") from None
        return
    if not must_exist:
        raise StoreError(f"store {path} already exists; refusing to overwrite it")
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"store {path} is not a regular file (symbolic links are refused)")
    if st.st_mode & 0o077 or st.st_uid != os.geteuid():
        raise StoreError(
            f"store {path} must be mode 0600 and owned by keyd's user "
            f"(it is {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}). Run: chmod 600 {path}"
        )


class Database:
    """An open, keyed, checked store file. Thread-safe; one per process."""

    def __init__(self, path: Path, conn: sqlcipher3.Connection, lock_fd: int) -> None:
        self.path = path
        self._conn = conn
        self._lock = threading.Lock()
        self._lock_fd = lock_fd

    @classmethod
    def create(cls, path: Path, secret: StoreSecret) -> Database:
        """Create a new empty store; never overwrites an existing file."""
        _check_store_path(path, must_exist=False)
        for suffix in ("-wal", "-shm", "-journal"):
            if Path(str(path) + suffix).exists():
                raise StoreError(f"{path}{suffix} exists; remove it or choose another store path")
        old_umask = os.umask(0o077)
        try:
            # O_EXCL: a racing creator cannot have us write into its file.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            lock_fd = _lock(path)
            conn = _connect(path, secret)
            try:
                _migrate(conn, _SCHEMA, SCHEMA_VERSION)
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlcipher3.Error as exc:
                conn.close()
                raise StoreError(f"cannot create store {path}: {exc}") from None
        finally:
            os.umask(old_umask)
        db = cls(path, conn, lock_fd)
        db._configure()
        return db

    @classmethod
    def open(cls, path: Path, secret: StoreSecret) -> Database:
        """Open and check an existing store. A wrong secret writes nothing to it."""
        _check_store_path(path, must_exist=True)
        lock_fd = _lock(path)
        try:
            conn = _connect(path, secret)
            try:
                # The first read is where a wrong key or a damaged first page shows.
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                check = conn.execute("PRAGMA quick_check").fetchall()
            except sqlcipher3.DatabaseError as exc:
                conn.close()
                if "not a database" in str(exc):
                    # SQLCipher cannot tell a wrong key from a damaged first page.
                    raise StoreError(
                        f"cannot open store {path}: the store secret does not match it, or "
                        f"the file is damaged or not a keyd store ({exc})"
                    ) from None
                raise StoreError(
                    f"store {path} is damaged ({exc}). Restore it from a backup"
                ) from None
            if check != [("ok",)]:
                conn.close()
                detail = "; ".join(str(r[0]) for r in check[:3])
                raise StoreError(f"store {path} is damaged: {detail}. Restore it from a backup")
            if version == 1:
                try:
                    _migrate(conn, _MIGRATE_1_TO_2, 2)
                except sqlcipher3.Error as exc:
                    conn.close()
                    raise StoreError(f"cannot upgrade store {path} to version 2: {exc}") from None
                version = 2
            if version != SCHEMA_VERSION:
                conn.close()
                raise StoreError(
                    f"store {path} has schema version {version}; this keyd reads version "
                    f"{SCHEMA_VERSION}"
                )
        except BaseException:
            os.close(lock_fd)
            raise
        db = cls(path, conn, lock_fd)
        db._configure()
        return db

    def _configure(self) -> None:
        for pragma in (
            "PRAGMA journal_mode = WAL",
            "PRAGMA synchronous = FULL",
            "PRAGMA foreign_keys = ON",
            "PRAGMA secure_delete = ON",
            "PRAGMA temp_store = MEMORY",
        ):
            self._conn.execute(pragma)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlcipher3.Connection]:
        """A write transaction: all of it is committed (durably) or none of it."""
        with self._lock, _transaction(self._conn):
            yield self._conn

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    def ping(self) -> None:
        """A cheap read proving the database and its lock still work (watchdog)."""
        self.query("SELECT 1")

    def close(self) -> None:
        """Close the connection and release the lock; closing twice is harmless."""
        with self._lock:
            if self._lock_fd < 0:
                return
            self._conn.close()
            os.close(self._lock_fd)
            self._lock_fd = -1


def _migrate(conn: sqlcipher3.Connection, script: str, version: int) -> None:
    with _transaction(conn):
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")


def _connect(path: Path, secret: StoreSecret) -> sqlcipher3.Connection:
    # isolation_level=None: autocommit; transactions are explicit BEGIN IMMEDIATE.
    conn = sqlcipher3.connect(str(path), isolation_level=None, check_same_thread=False)
    # The C library prints "hmac check failed" on stderr for a wrong key; the error
    # raised below says it better.
    conn.execute("PRAGMA cipher_log_level = NONE")
    conn.execute(secret.sqlcipher_key_pragma())
    return conn


@contextlib.contextmanager
def _transaction(conn: sqlcipher3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _lock(path: Path) -> int:
    """Hold an exclusive lock beside the store so two daemons never share it."""
    lock_path = Path(str(path) + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"store {path} is in use by another keyd process (lock {lock_path} is held)"
        ) from None
    return fd
