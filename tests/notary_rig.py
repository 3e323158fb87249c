"""The real Notary binaries on loopback, for end-to-end tests and benchmarks.

Debian's `notary` package gives notary-signer, notary-server and the notary client
(0.7.0). This module runs them the way docs/reference describes: a throwaway PKI
made here with `cryptography`, notary-signer with memory storage, notary-server with
memory storage and a *remote* trust service, and a non-interactive client. The
signer notary-server talks to is only a host and port, so the same rig drives the
real notary-signer or keyd's `notary-signer` shim.

What comes back from notary-server is checked by verify_repository(), which uses
only `cryptography` and this file's canonical JSON: no Notary code, and no keyd
code, is trusted to say that a repository is well signed.

Every process started here is stopped by the stop() of the object that started it,
and every temporary directory made here is removed by it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOTARY = Path("/usr/bin/notary")
NOTARY_SERVER = Path("/usr/bin/notary-server")
NOTARY_SIGNER = Path("/usr/bin/notary-signer")

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0

KeyAlgorithm = Literal["ecdsa", "ed25519"]
TUF_ROLES = ("root", "targets", "snapshot", "timestamp")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The test process's environment without NOTARY_* variables, plus `extra`.

    Notary's binaries read NOTARY_SERVER_*, NOTARY_SIGNER_* and NOTARY_* variables as
    overrides of their configuration (viper), so a stray one in the developer's shell
    could silently change what is being tested.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTARY_")}
    env.update(extra)
    return env


def _private_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o700)
    return path


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    """Paths of a throwaway PKI made by make_pki(); keys are PKCS#8 PEM, mode 0600.

    `foreign_client_*` is a client certificate with the same subject as `client_*`
    but issued by an unrelated CA, so a test that sees it rejected knows the signer
    checked the issuer, not the name.
    """

    directory: Path
    ca_cert: Path
    ca_key: Path
    signer_cert: Path
    signer_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    foreign_ca_cert: Path
    foreign_ca_key: Path
    foreign_client_cert: Path
    foreign_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyd tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


Issuer = tuple[x509.Name, ec.EllipticCurvePrivateKey]
_NO_OTHER_USAGE = {
    "content_commitment": False,
    "key_encipherment": False,
    "data_encipherment": False,
    "key_agreement": False,
    "encipher_only": False,
    "decipher_only": False,
}


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: Issuer | None,
    days: int,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A certificate for `key`, self-signed when `issuer` is None."""
    issuer_name, issuer_key = issuer or (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
        builder = builder.add_extension(aki, critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _make_ca(common_name: str, days: int) -> tuple[x509.Certificate, Issuer]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, **_NO_OTHER_USAGE
    )
    cert = _issue(
        _name(common_name),
        key,
        None,
        days,
        [(x509.BasicConstraints(ca=True, path_length=0), True), (usage, True)],
    )
    return cert, (cert.subject, key)


def _make_leaf(
    issuer: Issuer,
    common_name: str,
    purpose: x509.ObjectIdentifier,
    days: int,
    *,
    sans: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=False, crl_sign=False, **_NO_OTHER_USAGE
    )
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (usage, True),
        (x509.ExtendedKeyUsage([purpose]), False),
    ]
    if sans:
        # Go checks the signer's certificate against trust_service.hostname and
        # Python's ssl checks notary-server's against 127.0.0.1: both must be there.
        names = [x509.DNSName("localhost"), x509.IPAddress(IPv4Address(LOOPBACK))]
        extensions.append((x509.SubjectAlternativeName(names), False))
    return _issue(_name(common_name), key, issuer, days, extensions), key


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the file may have existed with a wider mode
        os.write(fd, pem)
    finally:
        os.close(fd)
    return path


def make_pki(directory: Path, *, days: int = 7) -> Pki:
    """Make a P-256 CA with signer, notary-server and client certificates, and an
    unrelated CA with a client certificate, in `directory` (created 0700)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    d = directory
    ca_cert, ca = _make_ca("keyd test CA", days)
    foreign_ca_cert, foreign = _make_ca("keyd test foreign CA", days)
    server_auth = ExtendedKeyUsageOID.SERVER_AUTH
    client_auth = ExtendedKeyUsageOID.CLIENT_AUTH
    signer = _make_leaf(ca, "notary-signer", server_auth, days, sans=True)
    server = _make_leaf(ca, "notary-server", server_auth, days, sans=True)
    client = _make_leaf(ca, "notary-server client", client_auth, days, sans=False)
    foreign_client = _make_leaf(foreign, "notary-server client", client_auth, days, sans=False)
    return Pki(
        directory=d,
        ca_cert=_write_cert(d / "ca.crt", ca_cert),
        ca_key=_write_key(d / "ca.key", ca[1]),
        signer_cert=_write_cert(d / "signer.crt", signer[0]),
        signer_key=_write_key(d / "signer.key", signer[1]),
        server_cert=_write_cert(d / "server.crt", server[0]),
        server_key=_write_key(d / "server.key", server[1]),
        client_cert=_write_cert(d / "client.crt", client[0]),
        client_key=_write_key(d / "client.key", client[1]),
        foreign_ca_cert=_write_cert(d / "foreign-ca.crt", foreign_ca_cert),
        foreign_ca_key=_write_key(d / "foreign-ca.key", foreign[1]),
        foreign_client_cert=_write_cert(d / "foreign-client.crt", foreign_client[0]),
        foreign_client_key=_write_key(d / "foreign-client.key", foreign_client[1]),
    )


# --------------------------------------------------------------------- processes


class _Service:
    """One Notary daemon: a JSON config and a log in a private temporary directory."""

    binary: Path
    label: str

    def __init__(self) -> None:
        self.directory = _private_dir(f"keyd-{self.label}-")
        self.config = self.directory / "config.json"
        self.log_path = self.directory / f"{self.label}.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self, port: int) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self, port: int | None = None) -> None:
        """Start and return once the port accepts TCP connections."""
        if self.proc is not None:
            raise RuntimeError(f"{self.label} is already running")
        self.port = port if port is not None else free_port()
        self.config.write_text(json.dumps(self._config(self.port), indent=2))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "-config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_child_env({}),
                cwd=self.directory,
            )
        self._wait_listening()

    def _wait_listening(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"{self.label} exited with {code}; log:\n{self.logs()}")
            try:
                # A bare TCP probe: notary-server logs it as "TLS handshake error ...
                # EOF", which is harmless.
                with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"{self.label} did not listen on {self.address}; log:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit; returns the exit code (None if
        it was not running). Notary's daemons do not trap SIGTERM, so a daemon that
        was still up returns -SIGTERM. The directory (and log) stays until close();
        start() again restarts on a port of choice (memory storage: keys are lost)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        """Stop, and remove the config, log and directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class NotarySigner(_Service):
    """Debian's notary-signer: memory storage, mutual TLS with client certificates
    checked against the PKI's CA, log level error (at info it logs what it signs).

    Memory storage means a restart loses every key: a repository made before a
    restart can no longer be published to.
    """

    binary = NOTARY_SIGNER
    label = "notary-signer"

    def __init__(self, pki: Pki) -> None:
        super().__init__()
        self.pki = pki

    def _config(self, port: int) -> dict[str, Any]:
        return {
            "server": {
                "grpc_addr": f"{LOOPBACK}:{port}",
                "tls_cert_file": str(self.pki.signer_cert),
                "tls_key_file": str(self.pki.signer_key),
                "client_ca_file": str(self.pki.ca_cert),
            },
            "logging": {"level": "error"},
            "storage": {"backend": "memory"},
        }


class NotaryServer(_Service):
    """Debian's notary-server: memory storage, HTTPS with the PKI's server
    certificate, and a remote trust service at `signer_host`:`signer_port`.

    The signer may be the real notary-signer or anything speaking its protocol;
    `signer_host` must be a name in the signer certificate (127.0.0.1 or localhost
    for make_pki's). notary-server starts even if nothing listens there yet.
    """

    binary = NOTARY_SERVER
    label = "notary-server"

    def __init__(
        self,
        pki: Pki,
        signer_port: int,
        *,
        signer_host: str = LOOPBACK,
        key_algorithm: KeyAlgorithm = "ecdsa",
    ) -> None:
        super().__init__()
        self.pki = pki
        self.signer_host = signer_host
        self.signer_port = signer_port
        self.key_algorithm = key_algorithm

    def _config(self, port: int) -> dict[str, Any]:
        return {
            "server": {
                "http_addr": f"{LOOPBACK}:{port}",
                "tls_cert_file": str(self.pki.server_cert),
                "tls_key_file": str(self.pki.server_key),
            },
            "trust_service": {
                "type": "remote",
                "hostname": self.signer_host,
                "port": str(self.signer_port),
                "key_algorithm": self.key_algorithm,
                "tls_ca_file": str(self.pki.ca_cert),
                "tls_client_cert": str(self.pki.client_cert),
                "tls_client_key": str(self.pki.client_key),
            },
            "logging": {"level": "error"},
            "storage": {"backend": "memory"},
        }

    @property
    def url(self) -> str:
        return f"https://{self.address}"

    def get(self, path: str, *, ca: Path | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
        """GET `path` over HTTPS, trusting only `ca` (default: the PKI's CA)."""
        return https_get(self.port, path, ca or self.pki.ca_cert, timeout)

    def health(self) -> int:
        """HTTP status of /_notary_server/health: 200, or 503 once a periodic
        (10 s) health check of the signer has failed."""
        return self.get("/_notary_server/health")[0]


def https_get(port: int, path: str, ca: Path, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET https://127.0.0.1:PORT/PATH trusting only `ca` (certificate and name are
    checked); (status, body). Plain http.client: no proxy settings apply."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=timeout, context=context)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------ client


class NotaryCommandError(RuntimeError):
    """A notary client command failed; carries its argv, exit code and output."""

    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(
            f"{' '.join(args)} exited with {returncode}\n"
            f"--- stdout:\n{stdout}\n--- stderr:\n{stderr}"
        )
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


@dataclass(frozen=True)
class Passphrases:
    """Passphrases for the client's locally held keys, passed in the environment
    (never argv). Random per rig: nothing outside a test ever needs them."""

    root: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    targets: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    snapshot: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    delegation: str = field(default_factory=lambda: secrets.token_urlsafe(18))

    def env(self) -> dict[str, str]:
        return {
            "NOTARY_ROOT_PASSPHRASE": self.root,
            "NOTARY_TARGETS_PASSPHRASE": self.targets,
            "NOTARY_SNAPSHOT_PASSPHRASE": self.snapshot,
            "NOTARY_DELEGATION_PASSPHRASE": self.delegation,
        }


class NotaryClient:
    """Debian's notary client against one notary-server, never interactive.

    Each client has its own temporary HOME (so ~/.notary/config.json is never read)
    holding its trust directory. stdin is /dev/null, so a command that would prompt
    fails instead of hanging. PCSCLITE_CSOCK_NAME points at a socket that does not
    exist: Debian builds the client with PKCS#11 (YubiKey) support, and with a PIV
    card visible through pcscd `notary init` would quietly put the root key on it.
    """

    def __init__(self, url: str, ca: Path, passphrases: Passphrases | None = None) -> None:
        self.url = url
        self.ca = ca
        self.passphrases = passphrases or Passphrases()
        self.home = _private_dir("keyd-notary-client-")
        self.trust_dir = self.home / "trust"

    def fresh(self) -> NotaryClient:
        """Another client for the same server with an empty trust directory (it
        trusts the repository's root on first use, as a new machine would)."""
        return NotaryClient(self.url, self.ca, self.passphrases)

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run `notary -d TRUST -s URL --tlscacert CA ARGS...`; stdout, or raise."""
        argv = [
            str(NOTARY), "-d", str(self.trust_dir), "-s", self.url,
            "--tlscacert", str(self.ca), *args,
        ]  # fmt: skip
        env = _child_env(
            {
                **self.passphrases.env(),
                "HOME": str(self.home),
                "PCSCLITE_CSOCK_NAME": "/nonexistent",
            }
        )
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=env,
                cwd=self.home,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else ""
            raise NotaryCommandError(argv, -1, out, f"timed out after {timeout} s\n{err}") from e
        if result.returncode != 0:
            raise NotaryCommandError(argv, result.returncode, result.stdout, result.stderr)
        return result.stdout

    def init(self, gun: str) -> None:
        """Make root and targets keys locally and a repository; the server makes
        the timestamp key (snapshot stays local until rotated with remote=True)."""
        self.run("init", gun)

    def add(self, gun: str, name: str, file: Path) -> None:
        self.run("add", gun, name, str(file))

    def publish(self, gun: str) -> None:
        self.run("publish", gun)

    def list(self, gun: str) -> list[str]:
        """Target names, from the table `notary list` prints (NAME first)."""
        lines = self.run("list", gun).splitlines()
        names: list[str] = []
        seen_rule = False
        for line in lines:
            if not line.strip():
                continue
            if line.lstrip().startswith("----"):
                seen_rule = True
                continue
            if seen_rule:
                names.append(line.split()[0])
        return names

    def rotate(self, gun: str, role: str, *, remote: bool = True) -> None:
        """`notary key rotate GUN ROLE [-r]`; publishes the rotation at once."""
        self.run("key", "rotate", gun, role, *(["-r"] if remote else []))

    def close(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ------------------------------------------------------------ canonical JSON, TUF


def canonical_json(value: Any) -> bytes:
    """Notary's canonical JSON (docker/go canonical/json): object keys sorted, no
    whitespace, only `"` and `\\` escaped, every other character written raw as
    UTF-8, integers only (floats are refused, as Notary refuses them)."""
    out: list[bytes] = []
    _canonical(value, out)
    return b"".join(out)


_JSON_CONSTANTS: dict[object, bytes] = {None: b"null", True: b"true", False: b"false"}


def _canonical(value: Any, out: list[bytes]) -> None:
    if value is None or isinstance(value, bool):  # before int: bool is an int
        out.append(_JSON_CONSTANTS[value])
    elif isinstance(value, int):
        out.append(str(value).encode())
    elif isinstance(value, str):
        out.append(b'"' + value.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"')
    elif isinstance(value, list | tuple):
        out.append(b"[")
        for i, item in enumerate(value):
            out.append(b"," if i else b"")
            _canonical(item, out)
        out.append(b"]")
    elif isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("canonical JSON object keys must be strings")
        out.append(b"{")
        # Go sorts keys by their UTF-8 bytes; Python's order (code points) agrees.
        for i, key in enumerate(sorted(value)):
            out.append(b"," if i else b"")
            _canonical(key, out)
            out.append(b":")
            _canonical(value[key], out)
        out.append(b"}")
    else:
        raise TypeError(f"no canonical JSON for {type(value).__name__}: {value!r}")


def tuf_key_id(keytype: str, public: bytes) -> str:
    """Notary's key ID: SHA-256 of the canonical JSON of the public key, with
    `"private": null` present. `public` is the bytes base64-encoded in keyval."""
    encoded = base64.b64encode(public).decode()
    key = {"keytype": keytype, "keyval": {"private": None, "public": encoded}}
    return hashlib.sha256(canonical_json(key)).hexdigest()


class RepositoryVerificationError(AssertionError):
    """What notary-server serves is not a correctly signed TUF repository."""


@dataclass(frozen=True)
class RoleSignatures:
    """One role's file as verified against root.json."""

    role: str
    version: int
    threshold: int
    authorised: tuple[str, ...]  # key IDs root.json gives the role
    signed_by: tuple[str, ...]  # authorised key IDs whose signature verified, sorted
    ignored: tuple[str, ...]  # key IDs of signatures by keys not authorised for the role


@dataclass(frozen=True)
class VerifiedRepo:
    """A repository whose four top-level files all verified."""

    gun: str
    roles: Mapping[str, RoleSignatures]
    key_types: Mapping[str, str]  # key ID -> keytype, for every key in root.json
    metadata: Mapping[str, Mapping[str, Any]]  # role -> its parsed file
    raw: Mapping[str, bytes]  # role -> the file's bytes as served

    def signed_by(self, role: str) -> tuple[str, ...]:
        return self.roles[role].signed_by

    def key_types_of(self, role: str) -> set[str]:
        """Key types of the keys whose signatures on `role` verified."""
        return {self.key_types[k] for k in self.roles[role].signed_by}

    def target_names(self) -> list[str]:
        return sorted(self.metadata["targets"]["signed"]["targets"])


PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
_SIGNATURE_METHOD = {"ecdsa": "ecdsa", "ecdsa-x509": "ecdsa", "ed25519": "eddsa"}


def _public_key(keytype: str, public: bytes) -> PublicKey:
    if keytype == "ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(public)
    if keytype == "ecdsa":
        key = serialization.load_der_public_key(public)
    elif keytype == "ecdsa-x509":
        key = x509.load_pem_x509_certificate(public).public_key()
    else:
        raise RepositoryVerificationError(f"key type {keytype!r} is not one this rig checks")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise RepositoryVerificationError(f"{keytype} key is not P-256")
    return key


def _signature_valid(key: PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)  # pure Ed25519 over the canonical bytes
            return True
        # Notary's ECDSA signatures are raw r||s; clients reject DER, so do we.
        if len(signature) != 64:
            return False
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        key.verify(utils.encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _root_keys(root: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, PublicKey]]:
    """Key types and public keys of root.json, each key ID checked against its key."""
    key_types: dict[str, str] = {}
    keys: dict[str, PublicKey] = {}
    for key_id, key in root["keys"].items():
        public = base64.b64decode(key["keyval"]["public"], validate=True)
        if tuf_key_id(key["keytype"], public) != key_id:
            raise RepositoryVerificationError(f"root.json key {key_id} hashes to another ID")
        key_types[key_id] = key["keytype"]
        keys[key_id] = _public_key(key["keytype"], public)
    return key_types, keys


def _verify_role(
    role: str,
    document: Mapping[str, Any],
    root: Mapping[str, Any],
    key_types: Mapping[str, str],
    keys: Mapping[str, PublicKey],
) -> RoleSignatures:
    signed = document["signed"]
    if str(signed.get("_type", "")).lower() != role:
        raise RepositoryVerificationError(f"{role}.json has _type {signed.get('_type')!r}")
    if dt.datetime.fromisoformat(signed["expires"]) <= dt.datetime.now(dt.UTC):
        raise RepositoryVerificationError(f"{role}.json expired at {signed['expires']}")
    authorised = tuple(root["roles"][role]["keyids"])
    threshold = int(root["roles"][role]["threshold"])
    if threshold < 1 or not set(authorised) <= keys.keys():
        raise RepositoryVerificationError(f"root.json's {role} role is malformed")
    message = canonical_json(signed)
    valid: set[str] = set()
    ignored: list[str] = []
    for sig in document["signatures"]:
        key_id = sig["keyid"]
        if key_id not in authorised:
            ignored.append(key_id)
            continue
        signature = base64.b64decode(sig["sig"], validate=True)
        method_ok = sig["method"] == _SIGNATURE_METHOD[key_types[key_id]]
        if not method_ok or not _signature_valid(keys[key_id], signature, message):
            raise RepositoryVerificationError(
                f"{role}.json: the signature by {key_id} ({key_types[key_id]}, method "
                f"{sig['method']!r}, {len(signature)} bytes) does not verify"
            )
        valid.add(key_id)
    if len(valid) < threshold:
        raise RepositoryVerificationError(
            f"{role}.json has {len(valid)} valid signatures, its threshold is {threshold}"
        )
    return RoleSignatures(
        role=role,
        version=int(signed["version"]),
        threshold=threshold,
        authorised=authorised,
        signed_by=tuple(sorted(valid)),
        ignored=tuple(ignored),
    )


def _check_hashes(role: str, meta: Mapping[str, Any], name: str, raw: bytes) -> None:
    entry = meta.get(name)
    if entry is None or not entry.get("hashes"):
        raise RepositoryVerificationError(f"{role}.json does not describe {name}.json")
    if entry.get("length") != len(raw):
        raise RepositoryVerificationError(f"{role}.json has the wrong length of {name}.json")
    for algorithm, expected in entry["hashes"].items():
        actual = base64.b64encode(hashlib.new(algorithm, raw).digest()).decode()
        if actual != expected:
            raise RepositoryVerificationError(f"{role}.json has the wrong {algorithm} of {name}")


def verify_repository(server: NotaryServer, gun: str, ca: Path | None = None) -> VerifiedRepo:
    """Download the four top-level files of `gun` over HTTPS (trusting `ca`, by
    default the server's PKI CA) and check them with verify_metadata()."""
    raw: dict[str, bytes] = {}
    for role in TUF_ROLES:
        path = f"/v2/{urllib.parse.quote(gun)}/_trust/tuf/{role}.json"
        status, body = server.get(path, ca=ca)
        if status != 200:
            raise RepositoryVerificationError(f"GET {path}: HTTP {status} {body[:200]!r}")
        raw[role] = body
    return verify_metadata(gun, raw)


def verify_metadata(gun: str, raw: Mapping[str, bytes]) -> VerifiedRepo:
    """Verify a repository's root, targets, snapshot and timestamp files (as served)
    with `cryptography` only; raise RepositoryVerificationError on any fault.

    Checked: every key ID in root.json is the ID its key hashes to; every file is of
    its type, unexpired, and carries at least `threshold` valid signatures from the
    keys root.json gives its role; a signature by an authorised key that does not
    verify fails the check even when the threshold is met (a signer returning broken
    signatures must not hide behind a good one); snapshot.json matches root.json and
    targets.json byte for byte, and timestamp.json matches snapshot.json.
    """
    docs: dict[str, dict[str, Any]] = {role: json.loads(raw[role]) for role in TUF_ROLES}
    root = docs["root"]["signed"]
    key_types, keys = _root_keys(root)
    roles = {role: _verify_role(role, docs[role], root, key_types, keys) for role in TUF_ROLES}
    snapshot_meta = docs["snapshot"]["signed"]["meta"]
    _check_hashes("snapshot", snapshot_meta, "root", raw["root"])
    _check_hashes("snapshot", snapshot_meta, "targets", raw["targets"])
    _check_hashes("timestamp", docs["timestamp"]["signed"]["meta"], "snapshot", raw["snapshot"])
    return VerifiedRepo(gun=gun, roles=roles, key_types=key_types, metadata=docs, raw=dict(raw))
