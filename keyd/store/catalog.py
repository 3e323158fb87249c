"""The key catalog: every key keyd knows, online or on hardware.

Rows live in the encrypted database; the daemon serves reads from an in-memory
copy loaded at start, so signing never touches the file. Writes go to the file
first (durably) and to memory after, so memory never shows a key the file lacks.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import replace

from keyd.core.keys import PublicKey
from keyd.core.keytypes import KeyType
from keyd.core.model import KeyRecord, KeySelector, KeyState
from keyd.errors import AlreadyExists, Internal, NotFound, StoreError
from keyd.store.database import Database, Row

_COLUMNS = (
    "key_id, key_type, public_key, backend, location, role, collection, labels, created_ms, "
    "state, purge_after_ms, destroy_on_purge"
)


def _dump(mapping: Mapping[str, str]) -> str:
    return json.dumps(dict(mapping), sort_keys=True, separators=(",", ":"))


class Catalog:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._records: dict[str, KeyRecord] = {}
        for row in db.query(f"SELECT {_COLUMNS} FROM keys"):  # noqa: S608 - constant columns
            record = self._from_row(row)
            self._records[record.key_id] = record

    @staticmethod
    def _from_row(row: Row) -> KeyRecord:
        (key_id, key_type, public, backend, location, role, collection, labels, created, state,
         purge_after, destroy) = row  # fmt: skip
        try:
            record = KeyRecord(
                public_key=PublicKey.from_notary_bytes(KeyType(key_type), public, trusted=True),
                backend=backend,
                location=json.loads(location),
                role=role,
                collection=collection,
                labels=json.loads(labels),
                created_unix_ms=created,
                state=KeyState(state),
                purge_after_unix_ms=purge_after,
                destroy_on_purge=bool(destroy),
            )
        except (ValueError, KeyError) as exc:
            raise StoreError(f"catalog row for key {key_id} is unreadable: {exc}") from None
        if record.key_id != key_id:
            raise StoreError(f"catalog row {key_id} holds a public key with another ID")
        return record

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._records

    def get(self, key_id: str) -> KeyRecord:
        record = self._records.get(key_id)
        if record is None:
            raise NotFound(f"no key with ID {key_id}; `keyd keys list` shows the keys keyd has")
        return record

    def find(self, key_id: str) -> KeyRecord | None:
        return self._records.get(key_id)

    def is_active(self, key_id: str) -> bool:
        """Whether the key exists and may sign (cheap: the signing path asks it)."""
        record = self.find(key_id)
        return record is not None and record.state is KeyState.ACTIVE

    def select(self, selector: KeySelector) -> list[KeyRecord]:
        records = [r for r in list(self._records.values()) if selector.matches(r)]
        records.sort(key=lambda r: (r.created_unix_ms, r.key_id))
        return records

    def count(self, backend: str) -> int:
        return sum(1 for r in list(self._records.values()) if r.backend == backend)

    def add(self, record: KeyRecord, private_pkcs8: bytes | None = None) -> KeyRecord:
        """Record a key (and a store key's private half) in one durable transaction."""
        if not record.created_unix_ms:
            record = _with_created(record)
        with self._lock:
            if record.key_id in self._records:
                raise AlreadyExists(f"key {record.key_id} is already in the catalog")
            with self._db.transaction() as conn:
                conn.execute(
                    f"INSERT INTO keys ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                    (
                        record.key_id,
                        record.key_type.value,
                        record.public_key.notary_bytes,
                        record.backend,
                        _dump(record.location),
                        record.role,
                        record.collection,
                        _dump(record.labels),
                        record.created_unix_ms,
                        record.state.value,
                        record.purge_after_unix_ms,
                        int(record.destroy_on_purge),
                    ),
                )
                if private_pkcs8 is not None:
                    conn.execute(
                        "INSERT INTO store_private_keys (key_id, pkcs8) VALUES (?, ?)",
                        (record.key_id, private_pkcs8),
                    )
            self._records[record.key_id] = record
        return record

    def set_state(
        self,
        key_id: str,
        state: KeyState,
        *,
        purge_after_unix_ms: int = 0,
        destroy_on_purge: bool = False,
    ) -> KeyRecord:
        """Change a key's state (pending deletion and back) durably."""
        with self._lock:
            record = replace(
                self.get(key_id),
                state=state,
                purge_after_unix_ms=purge_after_unix_ms,
                destroy_on_purge=destroy_on_purge,
            )
            with self._db.transaction() as conn:
                conn.execute(
                    "UPDATE keys SET state = ?, purge_after_ms = ?, destroy_on_purge = ? "
                    "WHERE key_id = ?",
                    (state.value, purge_after_unix_ms, int(destroy_on_purge), key_id),
                )
            self._records[key_id] = record
        return record

    def remove(self, key_id: str) -> KeyRecord:
        """Delete the row (and a store key's private half) durably."""
        with self._lock:
            record = self.get(key_id)
            with self._db.transaction() as conn:
                conn.execute("DELETE FROM keys WHERE key_id = ?", (key_id,))
            del self._records[key_id]
        return record

    def private_pkcs8(self, key_id: str) -> bytes:
        """The private key of a store key. Only the store backend calls this."""
        rows = self._db.query("SELECT pkcs8 FROM store_private_keys WHERE key_id = ?", (key_id,))
        if not rows:
            raise Internal(f"store key {key_id} has no private key in the store")
        return bytes(rows[0][0])

    def all_private_pkcs8(self) -> list[tuple[str, bytes]]:
        """Every store key's private key, in one scan (the store backend's warm-up)."""
        rows = self._db.query("SELECT key_id, pkcs8 FROM store_private_keys")
        return [(key_id, bytes(pkcs8)) for key_id, pkcs8 in rows]


def _with_created(record: KeyRecord) -> KeyRecord:
    return replace(record, created_unix_ms=int(time.time() * 1000))
