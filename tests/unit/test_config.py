"""Configuration: every problem names the file, the field and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyd.config import DEFAULT_SOCKET, Config, SecretKind
from keyd.errors import ConfigError


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "keyd.toml"
    path.write_text(text)
    return Config.load(path)


def test_defaults(tmp_path: Path) -> None:
    config = _load(tmp_path, "")
    assert config.server.socket == DEFAULT_SOCKET
    assert config.server.max_payload_bytes == 4 * 1024 * 1024
    assert config.store.secret_kind is SecretKind.RAW_KEY
    assert config.store.verify_signatures is False


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        '[server]\nsocket = "run/k.sock"\n[store]\npath = "db/k.db"\n'
        'secret_file = "k.key"\nsecret_kind = "passphrase"\n',
    )
    assert config.server.socket == tmp_path.resolve() / "run/k.sock"
    assert config.store.path == tmp_path.resolve() / "db/k.db"
    assert config.store.secret_file == tmp_path.resolve() / "k.key"
    assert config.store.secret_kind is SecretKind.PASSPHRASE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nworkers = 'many'\n", r"\[server\] workers: must be int, not str"),
        ("[server]\nworkers = -1\n", r"\[server\] workers: -1 is out of range"),
        ("[server]\nsockett = '/x'\n", r"\[server\] sockett: unknown field"),
        ("[nope]\n", r"\[nope\]: unknown section"),
        ("server = 3\n", r"\[server\]: must be a table"),
        ("[store]\nverify_signatures = 'yes'\n", r"\[store\] verify_signatures: must be bool"),
        ("[store]\nsecret_kind = 'rot13'\n", r"\[store\] secret_kind: 'rot13' is not one of"),
        ("[server]\nmax_payload_bytes = true\n", r"max_payload_bytes: must be int, not bool"),
        ("[server]\nsocket = ''\n", r"\[server\] socket: must be a non-empty path"),
        ("[server]\nsocket = '/" + "s" * 120 + "'\n", r"socket: is longer than 107 bytes"),
        ("[log]\nlevel = 'loud'\n", r"\[log\] level: 'loud' is not one of"),
        ("[server\n", r"not valid TOML"),
    ],
)
def test_bad_config_names_file_field_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        _load(tmp_path, text)
    assert str(tmp_path / "keyd.toml") in info.value.message


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration: No such file"):
        Config.load(tmp_path / "missing.toml")
    directory = tmp_path / "dir.toml"
    directory.mkdir()
    with pytest.raises(ConfigError, match="cannot read configuration"):
        Config.load(directory)


def test_pkcs11_tokens(tmp_path: Path) -> None:
    module = tmp_path / "libtoken.so"
    module.write_bytes(b"")
    config = _load(
        tmp_path,
        '[pkcs11.hsm]\nmodule = "libtoken.so"\ntoken_label = "root-keys"\n'
        'pin_file = "hsm.pin"\nsessions = 2\n'
        '[pkcs11.usb]\nmodule = "libtoken.so"\ntoken_serial = "0123abcd"\n',
    )
    hsm, usb = config.pkcs11["hsm"], config.pkcs11["usb"]
    assert hsm.module == tmp_path.resolve() / "libtoken.so"
    assert hsm.pin_file == tmp_path.resolve() / "hsm.pin"
    assert (hsm.token_label, hsm.sessions, hsm.max_requests) == ("root-keys", 2, 16)
    assert (usb.token_serial, usb.pin_file) == ("0123abcd", None)
    assert hsm.pin_credential("hsm") == "keyd-pkcs11-hsm-pin"


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            'module = "missing.so"\ntoken_label = "x"\n',
            r"\[pkcs11.t\] module: .*missing.so does not",
        ),
        ('token_label = "x"\n', r"\[pkcs11.t\] module: is required"),
        ('module = "lib.so"\n', r"\[pkcs11.t\] token_label: set token_label, token_serial"),
        ('module = "lib.so"\ntoken_label = "x"\nsessions = 0\n', r"sessions: 0 is out of range"),
        (
            'module = "lib.so"\ntoken_label = "x"\nsessions = 8\nmax_requests = 4\n',
            r"max_requests: 4 is out of range \(8 to 1024\)",
        ),
        (
            'module = "lib.so"\ntoken_label = "x"\npin = "1234"\n',
            r"\[pkcs11.t\] pin: unknown field",
        ),
    ],
)
def test_bad_pkcs11_table(tmp_path: Path, table: str, expected: str) -> None:
    (tmp_path / "lib.so").write_bytes(b"")
    with pytest.raises(ConfigError, match=expected):
        _load(tmp_path, "[pkcs11.t]\n" + table)


def test_pkcs11_names_and_shapes(tmp_path: Path) -> None:
    (tmp_path / "lib.so").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"\[pkcs11.Bad Name\]: the name must be"):
        _load(tmp_path, '[pkcs11."Bad Name"]\nmodule = "lib.so"\ntoken_label = "x"\n')
    with pytest.raises(ConfigError, match=r"\[pkcs11.t\]: must be a table"):
        _load(tmp_path, "[pkcs11]\nt = 3\n")
