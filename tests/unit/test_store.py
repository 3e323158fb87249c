"""The SQLCipher store file: creation, opening, damage, permissions, confidentiality.

Real SQLCipher files in temporary directories; nothing is emulated.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlcipher3

from keyd.backends.store import StoreBackend
from keyd.config import SecretKind
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.model import KeyRecord, KeySelector, KeyState
from keyd.core.signing import SignInput
from keyd.errors import AlreadyExists, Internal, NotFound, SecretError, StoreError
from keyd.store.audit_state import AuditState
from keyd.store.catalog import Catalog
from keyd.store.database import Database
from keyd.store.secret import StoreSecret, create_secret_file, load_store_secret


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def secret() -> StoreSecret:
    return StoreSecret.generate()


@pytest.fixture
def db(store_dir: Path, secret: StoreSecret) -> Iterator[Database]:
    database = Database.create(store_dir / "keyd.db", secret)
    yield database
    database.close()


def _digest_files(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.suffix != ".lock"
    }


def _add_key(
    catalog: Catalog,
    backend: StoreBackend,
    key_type: KeyType,
    *,
    role: str = "",
    collection: str = "",
    labels: dict[str, str] | None = None,
) -> KeyRecord:
    generated = backend.generate(key_type)
    record = KeyRecord(
        public_key=generated.public_key,
        backend="store",
        role=role,
        collection=collection,
        labels=labels or {},
    )
    return catalog.add(record, generated.private_pkcs8)


def test_create_then_reopen_keeps_keys(store_dir: Path, secret: StoreSecret) -> None:
    path = store_dir / "keyd.db"
    db = Database.create(path, secret)
    catalog = Catalog(db)
    record = _add_key(catalog, StoreBackend(catalog), KeyType.ECDSA_P256, role="timestamp")
    db.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    db = Database.open(path, secret)
    catalog = Catalog(db)
    again = catalog.get(record.key_id)
    assert again.role == "timestamp"
    assert again.public_key.pem == record.public_key.pem
    (signature,) = StoreBackend(catalog).sign(again, [b"m"], prehashed=False)
    assert again.public_key.verify(signature, SignInput.of_message(b"m"), SignatureEncoding.DER)
    db.close()


def test_a_version_1_store_is_upgraded_in_place(store_dir: Path, secret: StoreSecret) -> None:
    path = store_dir / "keyd.db"
    db = Database.create(path, secret)
    catalog = Catalog(db)
    record = _add_key(catalog, StoreBackend(catalog), KeyType.ED25519, role="snapshot")
    db.close()
    # Turn it back into what keyd wrote before pending deletion and the audit log.
    conn = sqlcipher3.connect(str(path), isolation_level=None)
    conn.execute(secret.sqlcipher_key_pragma())
    for statement in (
        "ALTER TABLE keys DROP COLUMN purge_after_ms",
        "ALTER TABLE keys DROP COLUMN destroy_on_purge",
        "DROP TABLE audit_state",
        "PRAGMA user_version = 1",
    ):
        conn.execute(statement)
    conn.close()

    db = Database.open(path, secret)
    catalog = Catalog(db)
    again = catalog.get(record.key_id)
    assert (again.role, again.state, again.purge_after_unix_ms) == ("snapshot", KeyState.ACTIVE, 0)
    assert AuditState(db).head() is None
    AuditState(db).checkpoint_key()  # the new table works
    db.close()
    db = Database.open(path, secret)
    assert db.query("PRAGMA user_version") == [(2,)]
    db.close()


def test_wrong_secret_is_refused_and_store_untouched(db: Database, store_dir: Path) -> None:
    db.close()
    before = _digest_files(store_dir)
    with pytest.raises(StoreError, match="secret does not match it, or the file is damaged"):
        Database.open(store_dir / "keyd.db", StoreSecret.generate())
    assert _digest_files(store_dir) == before


def test_passphrase_store(store_dir: Path) -> None:
    secret = StoreSecret(SecretKind.PASSPHRASE, b"correct horse 'battery' staple")
    Database.create(store_dir / "p.db", secret).close()
    Database.open(store_dir / "p.db", secret).close()
    with pytest.raises(StoreError, match="secret does not match"):
        Database.open(store_dir / "p.db", StoreSecret(SecretKind.PASSPHRASE, b"wrong"))


def test_truncated_store_is_refused(db: Database, store_dir: Path, secret: StoreSecret) -> None:
    catalog = Catalog(db)
    backend = StoreBackend(catalog)
    for _ in range(40):
        _add_key(catalog, backend, KeyType.ED25519)
    db.close()
    path = store_dir / "keyd.db"
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(StoreError, match="damaged"):
        Database.open(path, secret)


def test_corrupted_page_is_refused(db: Database, store_dir: Path, secret: StoreSecret) -> None:
    catalog = Catalog(db)
    backend = StoreBackend(catalog)
    for _ in range(40):
        _add_key(catalog, backend, KeyType.ED25519, labels={"filler": "x" * 200})
    db.close()
    path = store_dir / "keyd.db"
    data = bytearray(path.read_bytes())
    assert len(data) > 3 * 4096
    data[2 * 4096 + 100] ^= 0xFF  # one bit flip inside the third page
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged"):
        Database.open(path, secret)


def test_empty_file_is_not_a_store(store_dir: Path, secret: StoreSecret) -> None:
    path = store_dir / "keyd.db"
    path.write_bytes(b"not a database at all" * 100)
    path.chmod(0o600)
    with pytest.raises(StoreError, match="not a keyd store"):
        Database.open(path, secret)


def test_missing_store_says_run_init(store_dir: Path, secret: StoreSecret) -> None:
    with pytest.raises(StoreError, match="does not exist; create it with `keyd init`"):
        Database.open(store_dir / "nope.db", secret)


def test_create_never_overwrites(db: Database, store_dir: Path, secret: StoreSecret) -> None:
    with pytest.raises(StoreError, match="already exists"):
        Database.create(store_dir / "keyd.db", secret)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_store_file_with_unsafe_mode_is_refused(
    db: Database, store_dir: Path, secret: StoreSecret, mode: int
) -> None:
    db.close()
    path = store_dir / "keyd.db"
    path.chmod(mode)
    with pytest.raises(StoreError, match=f"must be mode 0600.*it is {mode:04o}.*chmod 600"):
        Database.open(path, secret)


def test_store_directory_with_unsafe_mode_is_refused(
    db: Database, store_dir: Path, secret: StoreSecret
) -> None:
    db.close()
    store_dir.chmod(0o755)
    with pytest.raises(StoreError, match=r"store directory .* must be mode 0700"):
        Database.open(store_dir / "keyd.db", secret)


def test_symlinked_store_is_refused(db: Database, store_dir: Path, secret: StoreSecret) -> None:
    db.close()
    (store_dir / "link.db").symlink_to(store_dir / "keyd.db")
    with pytest.raises(StoreError, match="not a regular file"):
        Database.open(store_dir / "link.db", secret)


def test_second_open_is_refused_while_first_holds_the_lock(
    db: Database, store_dir: Path, secret: StoreSecret
) -> None:
    with pytest.raises(StoreError, match="in use by another keyd process"):
        Database.open(store_dir / "keyd.db", secret)


def test_nothing_secret_reaches_the_disk_unencrypted(db: Database, store_dir: Path) -> None:
    catalog = Catalog(db)
    backend = StoreBackend(catalog)
    marker = "plaintext-marker-label-value"
    records = [
        _add_key(catalog, backend, key_type, labels={"marker": marker}) for key_type in KeyType
    ]
    private_blobs = [catalog.private_pkcs8(r.key_id) for r in records]

    def leaks() -> list[str]:
        found = []
        for path in store_dir.iterdir():
            data = path.read_bytes()
            for needle in [
                marker.encode(),
                b"store_private_keys",
                b"SQLite format 3",
                *[blob[-32:] for blob in private_blobs],
                *[r.key_id.encode() for r in records],
            ]:
                if needle in data:
                    found.append(f"{path.name}: {needle[:20]!r}")
        return found

    # While open (the WAL holds the recent writes) and after closing.
    assert (store_dir / "keyd.db-wal").exists()
    assert leaks() == []
    db.close()
    assert leaks() == []
    assert not [p for p in store_dir.iterdir() if "etilqs" in p.name]  # SQLite temp files


def test_catalog_rejects_duplicates_and_deletes_private_key(db: Database) -> None:
    catalog = Catalog(db)
    backend = StoreBackend(catalog)
    record = _add_key(catalog, backend, KeyType.ECDSA_P256)
    with pytest.raises(AlreadyExists):
        catalog.add(record, b"whatever")
    catalog.remove(record.key_id)
    with pytest.raises(NotFound):
        catalog.get(record.key_id)
    assert db.query("SELECT count(*) FROM store_private_keys") == [(0,)]


def test_catalog_filters(db: Database) -> None:
    catalog = Catalog(db)
    backend = StoreBackend(catalog)
    ts = _add_key(catalog, backend, KeyType.ECDSA_P256, role="timestamp", collection="a/b")
    sn = _add_key(
        catalog, backend, KeyType.ED25519, role="snapshot", collection="a/b", labels={"env": "prod"}
    )
    other = _add_key(catalog, backend, KeyType.ED25519, role="snapshot", collection="c/d")

    def ids(selector: KeySelector) -> set[str]:
        return {r.key_id for r in catalog.select(selector)}

    assert ids(KeySelector()) == {ts.key_id, sn.key_id, other.key_id}
    assert ids(KeySelector(collection="a/b")) == {ts.key_id, sn.key_id}
    assert ids(KeySelector(role="snapshot", collection="a/b")) == {sn.key_id}
    assert ids(KeySelector(labels={"env": "prod"})) == {sn.key_id}
    assert ids(KeySelector(labels={"env": "dev"})) == set()
    assert ids(KeySelector(backend="pkcs11")) == set()


def test_secret_file_round_trip_and_permissions(tmp_path: Path) -> None:
    secret_dir = tmp_path / "secret"
    path = secret_dir / "store.key"
    secret = StoreSecret.generate()
    create_secret_file(path, secret)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_store_secret(SecretKind.RAW_KEY, path) == secret
    with pytest.raises(SecretError, match="refusing to overwrite"):
        create_secret_file(path, StoreSecret.generate())
    path.chmod(0o644)
    with pytest.raises(SecretError, match="has mode 0644; others could read it"):
        load_store_secret(SecretKind.RAW_KEY, path)
    path.chmod(0o600)
    secret_dir.chmod(0o777)
    with pytest.raises(SecretError, match="writable by others"):
        load_store_secret(SecretKind.RAW_KEY, path)
    secret_dir.chmod(0o700)


def test_malformed_secret_file_does_not_echo_content(tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    path.write_text("not-hex-but-secret-looking\n")
    path.chmod(0o600)
    with pytest.raises(SecretError) as info:
        load_store_secret(SecretKind.RAW_KEY, path)
    assert "64 hex characters" in info.value.message
    assert "secret-looking" not in info.value.message


def test_missing_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(SecretError, match="does not exist"):
        load_store_secret(SecretKind.RAW_KEY, tmp_path / "absent.key")
    with pytest.raises(SecretError, match="LoadCredential=keyd-store-key"):
        load_store_secret(SecretKind.RAW_KEY, None)


def test_systemd_credential_wins_over_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    from_creds = StoreSecret.generate()
    create_secret_file(creds / "keyd-store-key", from_creds)
    create_secret_file(tmp_path / "file.key", StoreSecret.generate())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_store_secret(SecretKind.RAW_KEY, tmp_path / "file.key") == from_creds


def test_secret_repr_hides_value() -> None:
    secret = StoreSecret.generate()
    assert secret.value.hex() not in repr(secret)
    assert secret.value.hex() not in str(secret)


def test_store_file_is_created_private_even_with_open_umask(store_dir: Path) -> None:
    old = os.umask(0)
    try:
        Database.create(store_dir / "u.db", StoreSecret.generate()).close()
    finally:
        os.umask(old)
    for p in store_dir.iterdir():
        assert p.stat().st_mode & 0o077 == 0, p


def test_warm_up_loads_keys_and_refuses_a_swapped_private_key(db: Database) -> None:
    catalog = Catalog(db)
    writer = StoreBackend(catalog)
    a = _add_key(catalog, writer, KeyType.ECDSA_P256)
    b = _add_key(catalog, writer, KeyType.ECDSA_P256)
    c = _add_key(catalog, writer, KeyType.ED25519)
    # Swap a's and b's private keys behind the catalog's back (a damaged or tampered row).
    pkcs8_a, pkcs8_b = catalog.private_pkcs8(a.key_id), catalog.private_pkcs8(b.key_id)
    with db.transaction() as conn:
        conn.execute(
            "UPDATE store_private_keys SET pkcs8 = ? WHERE key_id = ?", (pkcs8_b, a.key_id)
        )
        conn.execute(
            "UPDATE store_private_keys SET pkcs8 = ? WHERE key_id = ?", (pkcs8_a, b.key_id)
        )
    backend = StoreBackend(catalog)
    backend.warm_up()
    assert set(backend._cache) == {c.key_id}  # only the intact key was loaded
    (signature,) = backend.sign(c, [b"m"], prehashed=False)
    assert c.public_key.verify(signature, SignInput.of_message(b"m"), SignatureEncoding.NATIVE)
    for record in (a, b):
        with pytest.raises(Internal, match="does not match its public key"):
            backend.sign(record, [b"m"], prehashed=False)
