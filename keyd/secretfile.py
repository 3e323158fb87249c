"""Files that hold secrets (store key, token PINs): checked before they are read.

A secret file must be a regular file owned by keyd's user, unreadable by others,
in a directory others cannot write to. Errors name the file, never its content.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from keyd.errors import SecretError


def check_private_file(path: Path, what: str) -> os.stat_result:
    """Refuse a secret-bearing file that others could read or replace."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise SecretError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise SecretError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecretError(f"{what} {path} is not a regular file (symbolic links are refused)")
    if st.st_uid != os.geteuid():
        raise SecretError(
            f"{what} {path} is owned by uid {st.st_uid}, not by keyd (uid {os.geteuid()})"
        )
    if st.st_mode & 0o077:
        raise SecretError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}; others could read it. "
            f"Run: chmod 600 {path}"
        )
    parent = path.parent.stat()
    if parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX:
        raise SecretError(
            f"the directory of {what} {path} is writable by others, who could replace it. "
            f"Run: chmod go-w {path.parent}"
        )
    return st


def read_private_file(path: Path, what: str, max_bytes: int) -> bytes:
    """The content of a checked secret file (at most max_bytes are read)."""
    check_private_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            return f.read(max_bytes)
    except OSError as exc:
        raise SecretError(f"cannot read {what} {path}: {exc.strerror}") from None


def find_secret(credential: str, path: Path | None) -> Path | None:
    """Where a device secret is: systemd's credential `credential` first (LoadCredential=),
    then the configured file; None when neither is there."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / credential).exists():
        return Path(cred_dir) / credential
    return path


def read_pin(path: Path, what: str, max_bytes: int) -> str:
    """A PIN from a checked secret file: UTF-8 text of 1 to max_bytes bytes; a final
    newline (LF or CRLF) is not part of it."""
    pin = read_private_file(path, what, max_bytes + 2).removesuffix(b"\n").removesuffix(b"\r")
    if not pin or len(pin) > max_bytes or b"\0" in pin:
        raise SecretError(f"{path}: the PIN must be 1 to {max_bytes} bytes without NUL")
    try:
        return pin.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{path}: the PIN is not UTF-8 text") from None
