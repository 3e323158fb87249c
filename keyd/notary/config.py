"""`keyd notary-signer` configuration (TOML), checked completely at start.

[listen]  address = "127.0.0.1:7899", cert, key, client_ca   (mutual TLS, required;
          the key may come from the credential keyd-notary-signer.key instead)
[keyd]    socket, wait_seconds, health_interval_seconds
[log]     level

Paths are relative to the configuration file. Errors name the file, the field and
the problem; a certificate that does not match its key, or that is expired or not
yet valid, stops the start.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyd.config import LogLevel, read_toml
from keyd.errors import ConfigError
from keyd.secretfile import read_private_file

DEFAULT_KEYD_SOCKET = Path("/run/keyd-notary/notary.sock")
# systemd credential holding the TLS key (LoadCredential=keyd-notary-signer.key:FILE).
KEY_CREDENTIAL = "keyd-notary-signer.key"
MAX_PEM_BYTES = 1024 * 1024


@dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes read at start (the key file is checked like any secret file)."""

    cert: bytes
    key: bytes = field(repr=False)
    client_ca: bytes = b""


@dataclass(frozen=True)
class ShimConfig:
    host: str
    port: int
    cert: Path
    key: Path
    client_ca: Path
    keyd_socket: Path = DEFAULT_KEYD_SOCKET
    # A request that finds keyd unreachable waits this long for it before failing:
    # notary-server turns a failed GetKeyInfo into a new key, so brief restarts must
    # not surface as errors.
    wait_seconds: float = 10.0
    # How often keyd's reachability is checked for the health service.
    health_interval_seconds: float = 1.0
    log_level: LogLevel = LogLevel.INFO

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def load(cls, path: Path) -> ShimConfig:
        data = read_toml(path)
        try:
            return _build(data, path.parent.resolve())
        except _Problem as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def key_source(self) -> Path:
        """The TLS key: the systemd credential first (LoadCredential=), then [listen] key."""
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir and (Path(cred_dir) / KEY_CREDENTIAL).exists():
            return Path(cred_dir) / KEY_CREDENTIAL
        return self.key

    def read_tls(self) -> TlsFiles:
        """Read and check the certificate, its key and the client CA."""
        cert_pem = _read(self.cert, "listen", "cert")
        key_path = self.key_source()
        key_pem = read_private_file(key_path, "[listen] key", MAX_PEM_BYTES)
        ca_pem = _read(self.client_ca, "listen", "client_ca")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise ConfigError(f"[listen] cert: {self.cert} is not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise ConfigError(
                f"[listen] key: {key_path} is not an unencrypted PEM private key"
            ) from None
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise ConfigError(f"[listen] client_ca: {self.client_ca} holds no PEM CA") from None
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise ConfigError(f"[listen] key: {key_path} is not the key of {self.cert}")
        now = datetime.datetime.now(datetime.UTC)
        if now > cert.not_valid_after_utc:
            raise ConfigError(
                f"[listen] cert: {self.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
            )
        if now < cert.not_valid_before_utc:
            raise ConfigError(
                f"[listen] cert: {self.cert} is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )
        return TlsFiles(cert_pem, key_pem, ca_pem)


class _Problem(Exception):
    pass


def _read(path: Path, section: str, name: str) -> bytes:
    try:
        return path.read_bytes()[:MAX_PEM_BYTES]
    except OSError as exc:
        raise ConfigError(f"[{section}] {name}: cannot read {path}: {exc.strerror}") from None


_FIELDS: dict[str, dict[str, type]] = {
    "listen": {"address": str, "cert": str, "key": str, "client_ca": str},
    "keyd": {"socket": str, "wait_seconds": float, "health_interval_seconds": float},
    "log": {"level": str},
}


def _build(data: dict[str, Any], base: Path) -> ShimConfig:
    for section, table in data.items():
        if section not in _FIELDS:
            raise _Problem(f"[{section}]: unknown section; expected {', '.join(_FIELDS)}")
        if not isinstance(table, dict):
            raise _Problem(f"[{section}]: must be a table")
        for name, value in table.items():
            kind = _FIELDS[section].get(name)
            if kind is None:
                raise _Problem(
                    f"[{section}] {name}: unknown field; takes {', '.join(_FIELDS[section])}"
                )
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not (isinstance(value, str) and value) if kind is str else not ok:
                expected = "a non-empty string" if kind is str else "a number"
                raise _Problem(f"[{section}] {name}: must be {expected}")
    listen = data.get("listen", {})
    for name in ("address", "cert", "key", "client_ca"):
        if name not in listen:
            raise _Problem(f"[listen] {name}: is required (notary-server needs mutual TLS)")
    host, sep, port_text = str(listen["address"]).rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _Problem("[listen] address: expected HOST:PORT, such as 127.0.0.1:7899")
    keyd = data.get("keyd", {})
    wait = float(keyd.get("wait_seconds", 10.0))
    interval = float(keyd.get("health_interval_seconds", 1.0))
    if not 0 <= wait <= 300:
        raise _Problem(f"[keyd] wait_seconds: {wait} is out of range (0 to 300)")
    if not 0.1 <= interval <= 60:
        raise _Problem(f"[keyd] health_interval_seconds: {interval} is out of range (0.1 to 60)")
    level = data.get("log", {}).get("level", "info")
    if level not in {lv.value for lv in LogLevel}:
        raise _Problem(f"[log] level: {level!r} is not one of debug, info, warning, error")
    socket = Path(keyd["socket"]) if "socket" in keyd else DEFAULT_KEYD_SOCKET
    return ShimConfig(
        host=host.strip("[]"),
        port=int(port_text),
        cert=base / listen["cert"],
        key=base / listen["key"],
        client_ca=base / listen["client_ca"],
        keyd_socket=socket if socket.is_absolute() else base / socket,
        wait_seconds=wait,
        health_interval_seconds=interval,
        log_level=LogLevel(level),
    )
