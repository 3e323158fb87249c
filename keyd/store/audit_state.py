"""What the audit log keeps in the encrypted store: its checkpoint key and last head.

The checkpoint key signs the audit log's chain head. It is not a catalog key: no
caller can sign with it or delete it. The last checkpoint recorded here lets the
daemon notice at start that the log was truncated or replaced.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyd.errors import StoreError
from keyd.store.database import Database


class AuditState:
    def __init__(self, db: Database) -> None:
        self._db = db

    def checkpoint_key(self) -> Ed25519PrivateKey:
        """The checkpoint key, made (and stored durably) the first time it is needed."""
        rows = self._db.query("SELECT pkcs8 FROM audit_state WHERE id = 1")
        if rows:
            key = serialization.load_der_private_key(bytes(rows[0][0]), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise StoreError("the audit checkpoint key in the store is not an Ed25519 key")
            return key
        key = Ed25519PrivateKey.generate()
        pkcs8 = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with self._db.transaction() as conn:
            conn.execute("INSERT INTO audit_state (id, pkcs8) VALUES (1, ?)", (pkcs8,))
        return key

    def head(self) -> tuple[int, str] | None:
        """The last checkpoint recorded (sequence number, record hash), if any."""
        rows = self._db.query("SELECT head_seq, head_hash FROM audit_state WHERE id = 1")
        if not rows or not rows[0][0]:
            return None
        return int(rows[0][0]), str(rows[0][1])

    def record_head(self, seq: int, record_hash: str) -> None:
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE audit_state SET head_seq = ?, head_hash = ? WHERE id = 1",
                (seq, record_hash),
            )

    def forget_head(self) -> tuple[int, str] | None:
        """Forget the last checkpoint (an operator starting a new log after losing the
        old one); returns what was forgotten."""
        head = self.head()
        with self._db.transaction() as conn:
            conn.execute("UPDATE audit_state SET head_seq = 0, head_hash = '' WHERE id = 1")
        return head
