"""The store secret: where it comes from, how it is checked, how it is created.

Order of sources: $CREDENTIALS_DIRECTORY/keyd-store-key (systemd LoadCredential=
or LoadCredentialEncrypted=), then [store] secret_file, then (passphrase stores
only) an interactive prompt. Never argv, never the environment, never logged.
"""

from __future__ import annotations

import getpass
import os
import secrets
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from keyd.config import CREDENTIAL_NAME, SecretKind
from keyd.errors import SecretError
from keyd.secretfile import check_private_file, read_private_file

RAW_KEY_BYTES = 32
MAX_PASSPHRASE_BYTES = 1024


@dataclass(frozen=True)
class StoreSecret:
    """The key material SQLCipher is opened with. repr and str never show it."""

    kind: SecretKind
    value: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.kind is SecretKind.RAW_KEY and len(self.value) != RAW_KEY_BYTES:
            raise SecretError(f"a raw store key must be {RAW_KEY_BYTES} bytes")
        if self.kind is SecretKind.PASSPHRASE and not self.value:
            raise SecretError("the store passphrase is empty")

    @classmethod
    def generate(cls) -> StoreSecret:
        return cls(SecretKind.RAW_KEY, secrets.token_bytes(RAW_KEY_BYTES))

    @classmethod
    def parse(cls, kind: SecretKind, text: bytes, source: str) -> StoreSecret:
        """Parse the content of a secret file. Errors name the source, never the content."""
        if kind is SecretKind.RAW_KEY:
            hex_text = text.strip()
            try:
                value = bytes.fromhex(hex_text.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                value = b""
            if len(value) != RAW_KEY_BYTES:
                raise SecretError(
                    f"{source}: expected a {RAW_KEY_BYTES}-byte store key written as "
                    f"{2 * RAW_KEY_BYTES} hex characters (create one with `keyd init`)"
                )
            return cls(kind, value)
        passphrase = text.removesuffix(b"\n")
        if not passphrase or b"\0" in passphrase or len(passphrase) > MAX_PASSPHRASE_BYTES:
            raise SecretError(
                f"{source}: the passphrase must be 1 to {MAX_PASSPHRASE_BYTES} bytes without NUL"
            )
        return cls(kind, passphrase)

    def serialize(self) -> bytes:
        if self.kind is SecretKind.RAW_KEY:
            return self.value.hex().encode("ascii") + b"\n"
        return self.value + b"\n"

    def sqlcipher_key_pragma(self) -> str:
        """The PRAGMA statement that keys a connection (PRAGMA takes no bound parameters)."""
        if self.kind is SecretKind.RAW_KEY:
            return f"PRAGMA key = \"x'{self.value.hex()}'\""
        text = self.value.decode("utf-8", errors="surrogateescape").replace("'", "''")
        return f"PRAGMA key = '{text}'"


def _read_secret_file(path: Path, kind: SecretKind) -> StoreSecret:
    text = read_private_file(path, "store secret", 4 * MAX_PASSPHRASE_BYTES)
    return StoreSecret.parse(kind, text, str(path))


def secret_source(secret_file: Path | None) -> Path | None:
    """The file the secret is read from, or None when no file source is configured."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        candidate = Path(cred_dir) / CREDENTIAL_NAME
        if candidate.exists():
            return candidate
    return secret_file


def load_store_secret(kind: SecretKind, secret_file: Path | None) -> StoreSecret:
    path = secret_source(secret_file)
    if path is not None:
        return _read_secret_file(path, kind)
    if kind is SecretKind.PASSPHRASE and sys.stdin.isatty():
        text = getpass.getpass("keyd store passphrase: ").encode("utf-8")
        return StoreSecret.parse(kind, text, "the passphrase prompt")
    raise SecretError(
        "no store secret: set [store] secret_file, or run under systemd with "
        f"LoadCredential={CREDENTIAL_NAME}:/path/to/secret"
        + (", or run interactively to be prompted" if kind is SecretKind.PASSPHRASE else "")
    )


def ensure_private_dir(path: Path) -> None:
    """Create a 0700 directory if missing; refuse an existing one that others can enter."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SecretError(f"cannot create directory {path}: {exc.strerror}") from None
    st = path.stat()
    if st.st_mode & 0o077 or st.st_uid != os.geteuid():
        raise SecretError(
            f"directory {path} must be mode 0700 and owned by keyd's user "
            f"(it is {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}). Run: chmod 700 {path}"
        )


def create_secret_file(path: Path, secret: StoreSecret) -> None:
    """Write a new secret file (0600, never overwriting) and flush it to disk."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        raise SecretError(f"{path} already exists; refusing to overwrite a secret") from None
    except OSError as exc:
        raise SecretError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.write(fd, secret.serialize())
        os.fsync(fd)
    finally:
        os.close(fd)
    check_private_file(path, "store secret")
