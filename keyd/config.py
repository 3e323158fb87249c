"""The daemon's TOML configuration: typed sections, validated once at start.

Every problem is reported as `FILE: [section] field: problem`. Relative paths
are taken relative to the configuration file's directory. Secrets are never
configuration values: only paths to the files that hold them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, unique
from pathlib import Path
from types import MappingProxyType
from typing import Any

from keyd.core.model import check_role
from keyd.errors import ConfigError, InvalidArgument

DEFAULT_CONFIG = Path("/etc/keyd/keyd.toml")
NOTARY_SIGNER_CONFIG = Path("/etc/keyd/notary-signer.toml")
DEFAULT_SOCKET = Path("/run/keyd/keyd.sock")
DEFAULT_STORE = Path("/var/lib/keyd/keyd.db")
DEFAULT_POLICY = Path("/etc/keyd/policy.toml")
CREDENTIAL_NAME = "keyd-store-key"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
_BACKEND_NAME = re.compile(r"[a-z0-9_-]{1,32}")


@unique
class SecretKind(Enum):
    RAW_KEY = "raw-key"  # 256-bit random key, hex in the secret file; opens in ~0.1 ms
    PASSPHRASE = "passphrase"  # noqa: S105 - a kind name, not a password; SQLCipher's PBKDF2 (256,000 rounds); ~100 ms per open


@unique
class LogLevel(Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class ServerConfig:
    socket: Path = DEFAULT_SOCKET
    # Group given to the socket (mode 0660); empty: the daemon's own group.
    socket_group: str = ""
    # Threads that run request handlers; 0: one per CPU core. More runnable threads
    # than cores only pass the GIL around (docs/performance.md): RPCs beyond them
    # wait in a queue. Each hardware backend adds threads for its in-flight limit.
    workers: int = 0
    # RPCs accepted at once (running or queued); more are refused with RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 256
    # Largest message or digest accepted for signing.
    max_payload_bytes: int = 4 * 1024 * 1024
    # Most requests in one SignBatch message.
    max_batch_items: int = 1024
    # How long SIGTERM waits for in-flight requests.
    shutdown_grace_seconds: float = 10.0
    # A second socket for `keyd notary-signer`: callers on it reach only online keys
    # (timestamp, snapshot) of collections, enforced by the daemon. Unset: no such socket.
    notary_socket: Path | None = None
    # Group of the notary socket (mode 0660): the shim's group.
    notary_socket_group: str = ""

    @property
    def worker_threads(self) -> int:
        return self.workers or max(2, os.cpu_count() or 2)

    def validate(self) -> None:
        if not self.socket.is_absolute():
            _fail("server", "socket", "must be an absolute path")
        if len(bytes(self.socket)) > _SUN_PATH_MAX:
            _fail("server", "socket", f"is longer than {_SUN_PATH_MAX} bytes (a Unix socket limit)")
        if self.notary_socket is not None:
            if len(bytes(self.notary_socket)) > _SUN_PATH_MAX:
                _fail("server", "notary_socket", f"is longer than {_SUN_PATH_MAX} bytes")
            if self.notary_socket.parent == self.socket.parent:
                # Whoever may enter the directory to reach the notary socket could
                # reach the main one too, if its group allowed.
                _fail("server", "notary_socket", "must be in another directory than socket")
        check_range("server", "workers", self.workers, 0, 1024)
        check_range("server", "max_concurrent_rpcs", self.max_concurrent_rpcs, 1, 65536)
        check_range("server", "max_payload_bytes", self.max_payload_bytes, 1, 64 * 1024 * 1024)
        check_range("server", "max_batch_items", self.max_batch_items, 1, 65536)
        check_range("server", "shutdown_grace_seconds", self.shutdown_grace_seconds, 0, 3600)


@dataclass(frozen=True)
class StoreConfig:
    path: Path = DEFAULT_STORE
    # Where the store secret is read when $CREDENTIALS_DIRECTORY/keyd-store-key is absent.
    secret_file: Path | None = None
    secret_kind: SecretKind = SecretKind.RAW_KEY
    # Verify every store-key signature before returning it (hardware keys always are).
    verify_signatures: bool = False

    def validate(self) -> None:
        if not self.path.is_absolute():
            _fail("store", "path", "must be an absolute path")


@dataclass(frozen=True)
class Pkcs11TokenConfig:
    """One `[pkcs11.NAME]` table: a token reached through a PKCS#11 module. Its keys
    live on backend `pkcs11:NAME`."""

    module: Path
    # The token must match every selector given (at least one), and only one token may.
    token_label: str = ""
    token_serial: str = ""
    # The user PIN: $CREDENTIALS_DIRECTORY/keyd-pkcs11-NAME-pin first, then this file.
    pin_file: Path | None = None
    # Sessions kept open: how many operations run on the token at once.
    sessions: int = 4
    # Requests accepted for this token at once, running or waiting for a session;
    # more are refused with RESOURCE_EXHAUSTED so a slow token cannot hold every thread.
    # Each adds a server thread, and more threads cost store keys throughput (GIL).
    max_requests: int = 16
    # How often an absent token is looked for again (on demand, not in a loop).
    reconnect_seconds: float = 5.0

    def validate(self, name: str) -> None:
        section = f"pkcs11.{name}"
        if not _BACKEND_NAME.fullmatch(name):
            _fail(section, "", "the name must be 1-32 lowercase letters, digits, - or _")
        if not self.module.is_file():
            _fail(section, "module", f"{self.module} does not exist or is not a file")
        if not (self.token_label or self.token_serial):
            _fail(section, "token_label", "set token_label, token_serial or both")
        check_range(section, "sessions", self.sessions, 1, 64)
        check_range(section, "max_requests", self.max_requests, self.sessions, 1024)
        check_range(section, "reconnect_seconds", self.reconnect_seconds, 0, 3600)

    def pin_credential(self, name: str) -> str:
        return f"keyd-pkcs11-{name}-pin"


@unique
class PivPinPolicy(Enum):
    # When the card wants the PIN for a key's use. keyd holds the PIN and verifies
    # it as the policy requires; ALWAYS also stops other programs between uses.
    NEVER = "never"
    ONCE = "once"
    ALWAYS = "always"


@unique
class PivTouchPolicy(Enum):
    NEVER = "never"
    ALWAYS = "always"
    CACHED = "cached"  # one touch covers 15 seconds of uses


# PIV key slots keyd generates in: the four standard ones and the 20 retired ones.
PIV_SLOTS = frozenset([0x9A, 0x9C, 0x9D, 0x9E, *range(0x82, 0x96)])


def parse_piv_slot(text: str) -> int | None:
    """A slot named in hex ("9c", "82", "0x9c"), or None when it is not a key slot."""
    try:
        value = int(text.lower().removeprefix("0x"), 16)
    except ValueError:
        return None
    return value if value in PIV_SLOTS else None


@dataclass(frozen=True)
class YubiKeyConfig:
    """One `[yubikey.NAME]` table: a YubiKey's PIV application. Its keys live on backend
    `yubikey:NAME`. The emulated card in tests/piv stands in for it in keyd's tests."""

    serial: int
    # The PC/SC reader to use. Empty: every reader whose name contains "Yubico" is
    # opened until the serial matches (which resets other YubiKeys' PIV PIN state).
    reader: str = ""
    # The PIN: $CREDENTIALS_DIRECTORY/keyd-yubikey-NAME-pin first, then this file.
    pin_file: Path | None = None
    # The management key in hex: credential keyd-yubikey-NAME-management-key first,
    # then this file. Neither: the card's PIN-protected key (ykman ... --protect).
    management_key_file: Path | None = None
    # Where new keys go: the slot for each role (`[yubikey.NAME.slots] root = "9c"`),
    # else `slot`. A request may name its slot instead.
    slot: str = "9c"
    slots: Mapping[str, str] = field(default_factory=dict)
    pin_policy: PivPinPolicy = PivPinPolicy.ALWAYS
    touch_policy: PivTouchPolicy = PivTouchPolicy.NEVER
    # keyd does not try the PIN when fewer attempts than this remain; one refusal
    # stops keyd trying until the operator re-arms it (SIGHUP, keyd.service reload).
    min_pin_attempts: int = 2
    # Attestation trust: PEM files of roots and of intermediates the card does not
    # carry. Empty roots: Yubico's published PIV attestation roots (bundled).
    attestation_roots: tuple[Path, ...] = ()
    attestation_intermediates: tuple[Path, ...] = ()
    # Refuse (and destroy) a generated key whose attestation does not verify.
    require_attestation: bool = False
    # Requests accepted at once; the card does one thing at a time, the rest wait.
    max_requests: int = 4

    def validate(self, name: str) -> None:
        section = f"yubikey.{name}"
        if not _BACKEND_NAME.fullmatch(name):
            _fail(section, "", "the name must be 1-32 lowercase letters, digits, - or _")
        check_range(section, "serial", self.serial, 1, 2**32 - 1)
        for field_name, value in (
            ("slot", self.slot),
            *((f"slots.{role}", slot) for role, slot in self.slots.items()),
        ):
            if not isinstance(value, str) or parse_piv_slot(value) is None:
                _fail(
                    section, field_name, f"{value!r} is not a PIV key slot (9a, 9c, 9d, 9e, 82-95)"
                )
        # At least 2: keyd must never use the last attempt (a refusal would block the PIN).
        check_range(section, "min_pin_attempts", self.min_pin_attempts, 2, 255)
        for role in self.slots:
            try:
                check_role(role)
            except InvalidArgument as exc:
                _fail(section, f"slots.{role}", exc.message)
        check_range(section, "max_requests", self.max_requests, 1, 1024)
        for field_name, paths in (
            ("attestation_roots", self.attestation_roots),
            ("attestation_intermediates", self.attestation_intermediates),
        ):
            for path in paths:
                if not path.is_file():
                    _fail(section, field_name, f"{path} does not exist or is not a file")

    def slot_for(self, role: str) -> str:
        return self.slots.get(role, self.slot)

    def credential(self, name: str, what: str) -> str:
        return f"keyd-yubikey-{name}-{what}"


@unique
class AccessMode(Enum):
    # Every request is attributed to the calling process (SO_PEERCRED), checked
    # against the policy, and audited.
    POLICY = "policy"
    # No identity, policy or audit: whoever can open the socket may do anything.
    # For measurements and migration only; the daemon warns at start.
    OPEN = "open"


@dataclass(frozen=True)
class AccessConfig:
    mode: AccessMode = AccessMode.POLICY
    # Read at start and on SIGHUP; relative to the configuration file's directory.
    policy: Path = DEFAULT_POLICY


@dataclass(frozen=True)
class AuditConfig:
    # Unset: the directory "audit" beside the store.
    directory: Path | None = None
    # A new file starts once the live one reaches this size; the chain continues.
    rotate_bytes: int = 64 * 1024 * 1024
    # How often the chain head is signed (when there is anything new).
    checkpoint_seconds: float = 10.0
    # fsync after every record (durable across power loss; slower). Off: records
    # reach the kernel before a reply is sent, and disk at each checkpoint.
    fsync_each: bool = False

    def validate(self) -> None:
        check_range("audit", "rotate_bytes", self.rotate_bytes, 64 * 1024, 2**40)
        check_range("audit", "checkpoint_seconds", self.checkpoint_seconds, 0.1, 3600)


@dataclass(frozen=True)
class KeysConfig:
    # How long a deleted key stays restorable before it is purged.
    deletion_window_days: float = 7.0

    def validate(self) -> None:
        check_range("keys", "deletion_window_days", self.deletion_window_days, 0, 3650)


@dataclass(frozen=True)
class LogConfig:
    level: LogLevel = LogLevel.INFO


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    log: LogConfig = field(default_factory=LogConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    pkcs11: Mapping[str, Pkcs11TokenConfig] = field(default_factory=dict)
    yubikey: Mapping[str, YubiKeyConfig] = field(default_factory=dict)

    @property
    def audit_directory(self) -> Path:
        return self.audit.directory or self.store.path.parent / "audit"

    @classmethod
    def load(cls, path: Path) -> Config:
        data = read_toml(path)
        try:
            return cls.from_dict(data, base=path.parent.resolve())
        except FieldError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path) -> Config:
        sections: dict[str, Any] = {}
        known = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in data.items():
            if name not in known:
                raise FieldError(f"[{name}]: unknown section; expected one of {', '.join(known)}")
            if not isinstance(value, dict):
                raise FieldError(f"[{name}]: must be a table")
            section_type = typing.get_type_hints(cls)[name]
            if name in _NAMED:  # a table of named tables, one per device
                sections[name] = _build_named_sections(name, _NAMED[name], value, base)
            else:
                sections[name] = build_section(name, section_type, value, base)
        config = cls(**sections)
        config.server.validate()
        config.store.validate()
        config.audit.validate()
        config.keys.validate()
        for token_name, token in config.pkcs11.items():
            token.validate(token_name)
        for key_name, yubikey in config.yubikey.items():
            yubikey.validate(key_name)
        return config


_NAMED: dict[str, type[Any]] = {"pkcs11": Pkcs11TokenConfig, "yubikey": YubiKeyConfig}


def read_toml(path: Path) -> dict[str, Any]:
    """A configuration file's tables; errors name the file."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


class FieldError(Exception):
    """A problem in one section or field, as `[section] field: problem`."""


def _fail(section: str, name: str, problem: str) -> typing.NoReturn:
    raise FieldError(f"[{section}] {name}: {problem}" if name else f"[{section}]: {problem}")


def check_range(section: str, name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        _fail(section, name, f"{value} is out of range ({low} to {high})")


def _build_named_sections(
    section: str, cls: type[Any], values: dict[str, Any], base: Path
) -> Mapping[str, Any]:
    built = {}
    for name, table in values.items():
        if not isinstance(table, dict):
            raise FieldError(f"[{section}.{name}]: must be a table, such as [{section}.hsm]")
        built[name] = build_section(f"{section}.{name}", cls, table, base)
    return MappingProxyType(built)


def build_section(section: str, cls: type[Any], values: dict[str, Any], base: Path) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        if name not in hints:
            fields = ", ".join(hints)
            _fail(section, name, f"unknown field; [{section}] takes {fields}")
        kwargs[name] = _convert(section, name, hints[name], raw, base)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        if name not in kwargs:
            _fail(section, name, "is required")
    return cls(**kwargs)


def _convert_collection(section: str, name: str, hint: Any, raw: Any, base: Path) -> Any:
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]: a TOML array
        if not isinstance(raw, list):
            _fail(section, name, "must be an array")
        item_type = typing.get_args(hint)[0]
        return tuple(_convert(section, name, item_type, item, base) for item in raw)
    # Mapping[str, str]: a TOML table of strings
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        _fail(section, name, "must be a table of strings")
    return MappingProxyType(dict(raw))


def _convert(section: str, name: str, hint: Any, raw: Any, base: Path) -> Any:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        return _convert(section, name, inner, raw, base)
    if typing.get_origin(hint) in (tuple, Mapping):
        return _convert_collection(section, name, hint, raw, base)
    if hint is Path:
        if not isinstance(raw, str) or not raw:
            _fail(section, name, "must be a non-empty path string")
        return base / raw
    if isinstance(hint, type) and issubclass(hint, Enum):
        choices = [m.value for m in hint]
        if raw not in choices:
            _fail(section, name, f"{raw!r} is not one of {', '.join(map(str, choices))}")
        return hint(raw)
    if hint is float and isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    # bool is an int subclass: check the exact type.
    if type(raw) is not hint:
        _fail(section, name, f"must be {hint.__name__}, not {type(raw).__name__}")
    return raw
