"""The `keyd` command line against a real daemon: output, --json, errors, exit codes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness import Daemon, keyd_command, run_keyd


def _keyd(
    daemon: Daemon, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEYD_SOCKET": str(daemon.socket)}
    return run_keyd(*args, env=env, input_=stdin)


def _one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("keyd: error: ")
    assert text in lines[0]
    assert "Traceback" not in result.stderr


def test_init_creates_private_store_and_secret(short_tmp: Path) -> None:
    store = short_tmp / "state" / "keyd.db"
    secret = short_tmp / "secret" / "store.key"
    result = run_keyd("init", "--store", str(store), "--secret-file", str(secret), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["store"] == str(store)
    assert store.stat().st_mode & 0o777 == 0o600
    assert store.parent.stat().st_mode & 0o777 == 0o700
    assert secret.stat().st_mode & 0o777 == 0o600
    assert len(secret.read_text().strip()) == 64
    assert secret.read_text().strip() not in result.stdout + result.stderr
    # A second init refuses and leaves both files alone.
    before = (store.read_bytes(), secret.read_bytes())
    again = run_keyd("init", "--store", str(store), "--secret-file", str(secret))
    _one_line_error(again, 1, "refusing to overwrite")
    assert (store.read_bytes(), secret.read_bytes()) == before


def test_init_needs_a_secret_destination(short_tmp: Path) -> None:
    result = run_keyd("init", "--store", str(short_tmp / "s" / "keyd.db"))
    _one_line_error(result, 1, "--secret-file")


def test_create_sign_and_verify_with_openssl_style_flow(daemon: Daemon, short_tmp: Path) -> None:
    created = _keyd(
        daemon,
        "keys",
        "create",
        "--type",
        "ecdsa-p256",
        "--role",
        "timestamp",
        "--collection",
        "example.com/app",
        "--label",
        "env=prod",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["role"] == "timestamp"
    assert key["labels"] == {"env": "prod"}

    payload = short_tmp / "payload.bin"
    payload.write_bytes(b"release metadata")
    signed = _keyd(daemon, "sign", key["key_id"], "--input", str(payload), "--json")
    assert signed.returncode == 0, signed.stderr
    signature = base64.b64decode(json.loads(signed.stdout)["signature"])
    pem = _keyd(daemon, "keys", "show", key["key_id"], "--pem").stdout
    public = serialization.load_pem_public_key(pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, b"release metadata", ec.ECDSA(hashes.SHA256()))

    # stdin, raw encoding, binary output file
    out = short_tmp / "sig.raw"
    raw = _keyd(
        daemon,
        "sign",
        key["key_id"],
        "--encoding",
        "raw",
        "--output",
        str(out),
        stdin=b"release metadata",
    )
    assert raw.returncode == 0, raw.stderr
    assert len(out.read_bytes()) == 64

    listed = _keyd(daemon, "keys", "list", "--collection", "example.com/app")
    assert key["key_id"] in listed.stdout
    shown = _keyd(daemon, "keys", "show", key["key_id"])
    assert "tuf key id" in shown.stdout
    assert key["tuf_key_id"] in shown.stdout

    deleted = _keyd(daemon, "keys", "delete", key["key_id"], "--yes")
    assert deleted.returncode == 0
    assert "pending deletion" in deleted.stdout
    pending = _keyd(daemon, "sign", key["key_id"], "--input", str(payload))
    _one_line_error(pending, 1, "pending deletion")
    assert _keyd(daemon, "keys", "purge", key["key_id"]).returncode == 2  # needs --confirm
    purged = _keyd(daemon, "keys", "purge", key["key_id"], "--confirm", key["key_id"])
    assert purged.returncode == 0
    gone = _keyd(daemon, "sign", key["key_id"], "--input", str(payload))
    _one_line_error(gone, 3, "no key with ID")


def test_status_json(daemon: Daemon) -> None:
    result = _keyd(daemon, "status", "--json")
    assert result.returncode == 0
    status = json.loads(result.stdout)
    assert status["healthy"] is True
    assert status["socket"] == str(daemon.socket)
    assert status["backends"][0]["name"] == "store"


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (("sign", "zz", "--digest", "00"), 2, "malformed key ID"),
        (("sign", "a" * 64, "--digest", "nothex"), 2, "--digest must be hexadecimal"),
        (("sign", "a" * 64, "--input", "/nonexistent/file"), 2, "cannot read /nonexistent/file"),
        (("keys", "show", "b" * 64), 3, "no key with ID"),
        (("keys", "create", "--type", "ed25519", "--label", "novalue"), 2, "must be NAME=VALUE"),
        (("keys", "create", "--type", "ed25519", "--role", "bad role"), 2, "invalid role"),
        (("keys", "delete", "c" * 64), 2, "confirm the deletion with --yes"),
    ],
)
def test_cli_errors_are_one_line(
    daemon: Daemon, args: tuple[str, ...], code: int, text: str
) -> None:
    _one_line_error(_keyd(daemon, *args), code, text)


def test_empty_input_is_refused(daemon: Daemon) -> None:
    key_id = _keyd(daemon, "keys", "create", "--type", "ed25519").stdout.strip()
    _one_line_error(_keyd(daemon, "sign", key_id, stdin=b""), 2, "the message is empty")


def test_no_daemon(short_tmp: Path) -> None:
    result = run_keyd("status", "--socket", str(short_tmp / "none.sock"), "--timeout", "5")
    _one_line_error(result, 4, "cannot reach keyd at")


def test_serve_with_bad_config_names_the_field(short_tmp: Path) -> None:
    config = short_tmp / "bad.toml"
    config.write_text("[server]\nworkers = 'lots'\n")
    result = run_keyd("serve", "--config", str(config))
    _one_line_error(result, 1, f"{config}: [server] workers: must be int, not str")


def test_usage_error_exit_code() -> None:
    result = subprocess.run(
        keyd_command("keys", "create"), capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "--type" in result.stderr
