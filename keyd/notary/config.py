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

from keyd.config import FieldError, LogConfig, LogLevel, build_section, check_range, read_toml
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
        except FieldError as exc:
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


def _read(path: Path, section: str, name: str) -> bytes:
    try:
        return path.read_bytes()[:MAX_PEM_BYTES]
    except OSError as exc:
        raise ConfigError(f"[{section}] {name}: cannot read {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class _Listen:
    address: str
    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class _Keyd:
    socket: Path = DEFAULT_KEYD_SOCKET
    wait_seconds: float = 10.0
    health_interval_seconds: float = 1.0


_SECTIONS: dict[str, type[Any]] = {"listen": _Listen, "keyd": _Keyd, "log": LogConfig}


def _build(data: dict[str, Any], base: Path) -> ShimConfig:
    # The same typed sections, checks and messages as keyd's own configuration.
    sections: dict[str, Any] = {}
    for name, table in data.items():
        cls = _SECTIONS.get(name)
        if cls is None:
            raise FieldError(f"[{name}]: unknown section; expected {', '.join(_SECTIONS)}")
        if not isinstance(table, dict):
            raise FieldError(f"[{name}]: must be a table")
        sections[name] = build_section(name, cls, table, base)
    listen = sections.get("listen")
    if listen is None:
        raise FieldError("[listen]: is required (notary-server needs mutual TLS)")
    keyd = sections.get("keyd", _Keyd())
    host, sep, port_text = listen.address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise FieldError("[listen] address: expected HOST:PORT, such as 127.0.0.1:7899")
    check_range("keyd", "wait_seconds", keyd.wait_seconds, 0, 300)
    check_range("keyd", "health_interval_seconds", keyd.health_interval_seconds, 0.1, 60)
    return ShimConfig(
        host=host.strip("[]"),
        port=int(port_text),
        cert=listen.cert,
        key=listen.key,
        client_ca=listen.client_ca,
        keyd_socket=keyd.socket,
        wait_seconds=keyd.wait_seconds,
        health_interval_seconds=keyd.health_interval_seconds,
        log_level=sections.get("log", LogConfig()).level,
    )
