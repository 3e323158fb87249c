"""Checks of the Notary signer shim's systemd files: keyd-notary-signer.service, its user, the
notary socket's directory and the example configuration.

Like tests/test_systemd_unit.py, these run systemd's own tools on the files and are skipped where
the tools are missing (or, for ownership, where they cannot chown: not root).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path, PurePosixPath

import pytest

from keyd.config import NOTARY_SIGNER_CONFIG as DEFAULT_CONFIG
from keyd.notary.config import DEFAULT_KEYD_SOCKET, KEY_CREDENTIAL, ShimConfig
from tests.systemd_tools import (
    KEYD_BINARY,
    MAX_EXPOSURE,
    README,
    SYSTEMD_DIR,
    SYSUSERS,
    TMPFILES,
    UNIT,
    colon_file,
    directives,
    exposure,
    one,
    run,
    tool,
    verifiable_copy,
    verify_problems,
)

SHIM_UNIT = SYSTEMD_DIR / "keyd-notary-signer.service"
EXAMPLE = SYSTEMD_DIR / "notary-signer.toml.example"
SHIM_USER = "keyd-notary"
NOTARY_DIR = PurePosixPath(DEFAULT_KEYD_SOCKET.parent)
# The configuration is handed over as a credential; ExecStart= finds it through %d.
CONFIG_CREDENTIAL = DEFAULT_CONFIG.name
# Where the files the credentials are loaded from live (root-only in effect: /etc/keyd is
# 0750 root:keyd and the shim's user is not in group keyd).
ETC = PurePosixPath(DEFAULT_CONFIG.parent)


def credentials(unit: Path) -> dict[str, PurePosixPath]:
    """LoadCredential=NAME:PATH lines of the unit as {NAME: PATH}."""
    result: dict[str, PurePosixPath] = {}
    for value in directives(unit).get(("Service", "LoadCredential"), []):
        name, sep, path = value.partition(":")
        assert sep, f"LoadCredential={value} has no source path"
        assert name not in result, f"credential {name} loaded twice"
        result[name] = PurePosixPath(path)
    return result


def tmpfiles_line(path: PurePosixPath) -> list[str]:
    """The fields of the one keyd.tmpfiles.conf line for `path`."""
    lines = [
        line.split()
        for line in TMPFILES.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    matching = [fields for fields in lines if len(fields) > 1 and fields[1] == str(path)]
    assert len(matching) == 1, f"expected one line for {path} in {TMPFILES.name}: {matching}"
    return matching[0]


def test_exposure_level_is_low() -> None:
    level, output = exposure(SHIM_UNIT)
    assert level <= MAX_EXPOSURE, f"exposure {level} > {MAX_EXPOSURE}:\n{output}"


def test_verify_is_clean(tmp_path: Path) -> None:
    returncode, problems, output = verify_problems(verifiable_copy(SHIM_UNIT, tmp_path))
    assert returncode == 0, output
    assert problems == [], output


def test_verify_is_clean_next_to_keyd_service(tmp_path: Path) -> None:
    """Loaded together, as installed: the shim's dependencies resolve to the real keyd.service."""
    shim = verifiable_copy(SHIM_UNIT, tmp_path)
    keyd = verifiable_copy(UNIT, tmp_path)
    proc = run([tool("systemd-analyze"), "verify", str(shim), str(keyd)])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert [line for line in output.splitlines() if "keyd" in line] == [], output


def test_unit_runs_the_shim_as_notify_service_of_its_own_user() -> None:
    d = directives(SHIM_UNIT)
    assert one(d, "Type") == "notify"
    assert one(d, "NotifyAccess") == "main"
    assert one(d, "ExecStart") == f"{KEYD_BINARY} notary-signer --config %d/{CONFIG_CREDENTIAL}"
    assert one(d, "User") == SHIM_USER
    assert one(d, "Group") == SHIM_USER
    assert d.get(("Service", "DynamicUser"), []) in ([], ["no"])
    # Any extra group could open the way to the main socket (group keyd).
    assert ("Service", "SupplementaryGroups") not in d
    assert one(d, "WantedBy", section="Install") == "multi-user.target"


def test_unit_orders_after_keyd_without_depending_on_it_hard() -> None:
    """Wants=, not Requires=/BindsTo=: the shim rides out keyd restarts (NOT_SERVING, waits)."""
    d = directives(SHIM_UNIT)
    assert "keyd.service" in " ".join(d.get(("Unit", "Wants"), [])).split()
    assert "keyd.service" in " ".join(d.get(("Unit", "After"), [])).split()
    for hard in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert ("Unit", hard) not in d, f"{hard}= would stop the shim with keyd"


def test_credentials_hold_config_tls_files_and_the_key() -> None:
    creds = credentials(SHIM_UNIT)
    # The shim reads the key credential by this name before [listen] key.
    assert creds[KEY_CREDENTIAL] == ETC / "notary-signer.key"
    assert creds[CONFIG_CREDENTIAL] == PurePosixPath(DEFAULT_CONFIG)
    # Every file the shim needs comes from /etc/keyd through PID 1.
    assert all(path.parent == ETC for path in creds.values()), creds
    assert ("Service", "LoadCredentialEncrypted") not in directives(SHIM_UNIT)


def test_example_config_names_only_credentials(tmp_path: Path) -> None:
    """Installed as the config credential, the example's relative paths resolve to credentials.

    Laid out like $CREDENTIALS_DIRECTORY (files named after the credentials), the example
    config loads, and its cert and client_ca are credentials of the unit. [listen] key is only
    read when the key credential is missing (keyd notary-signer run by hand).
    """
    creds = credentials(SHIM_UNIT)
    shutil.copyfile(EXAMPLE, tmp_path / CONFIG_CREDENTIAL)
    config = ShimConfig.load(tmp_path / CONFIG_CREDENTIAL)
    for path in (config.cert, config.client_ca):
        assert path.parent == tmp_path, f"{path} is not relative to the configuration"
        assert path.name in creds, f"{path.name} is not a credential of {SHIM_UNIT.name}"
    assert config.key.parent == tmp_path
    # Run by hand from /etc/keyd, the same names are the files the credentials come from.
    assert {config.cert.name, config.client_ca.name, config.key.name} <= {
        path.name for path in creds.values()
    }
    assert config.keyd_socket == DEFAULT_KEYD_SOCKET
    assert (config.host, config.port) == ("127.0.0.1", 7899)


def test_unit_is_sandboxed_but_may_serve_tcp() -> None:
    d = directives(SHIM_UNIT)
    families = set(" ".join(d.get(("Service", "RestrictAddressFamilies"), [])).split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert d.get(("Service", "PrivateNetwork"), []) in ([], ["no"])
    assert one(d, "IPAddressDeny") == "any"
    assert one(d, "IPAddressAllow") == "localhost"
    assert one(d, "ProtectSystem") == "strict"
    assert one(d, "NoNewPrivileges") == "yes"
    assert one(d, "CapabilityBoundingSet") == ""
    assert one(d, "LimitCORE") == "0"
    # Nothing writable: the shim keeps no state and creates no socket of its own.
    for key in ("ReadWritePaths", "StateDirectory", "RuntimeDirectory", "LogsDirectory"):
        assert ("Service", key) not in d, f"{key}= gives the shim write access"


def test_notary_socket_directory_matches_the_shim_default() -> None:
    # tmpfiles creates it; keyd may write into it; both units and the README name it.
    kind, _, mode, user, group, *_ = tmpfiles_line(NOTARY_DIR)
    assert (kind, mode, user, group) == ("d", "2750", "keyd", SHIM_USER)
    keyd_unit = directives(UNIT)
    writable = [p.lstrip("-") for p in keyd_unit.get(("Service", "ReadWritePaths"), [])]
    assert writable == [str(NOTARY_DIR)]
    # Not keyd's RuntimeDirectory=: that one is keyd:keyd and removed when keyd stops.
    assert PurePosixPath("/run") / one(keyd_unit, "RuntimeDirectory") != NOTARY_DIR
    for path in (SHIM_UNIT, UNIT, EXAMPLE, README):
        assert str(DEFAULT_KEYD_SOCKET) in path.read_text(encoding="utf-8"), path.name


def test_sysusers_creates_shim_user_outside_group_keyd(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    proc = run([tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passwd = colon_file(tmp_path / "etc/passwd")
    groups = colon_file(tmp_path / "etc/group")
    assert SHIM_USER in passwd, passwd
    assert SHIM_USER in groups, groups
    _, _, uid, gid, _, _, shell = passwd[SHIM_USER]
    assert int(uid) < 1000, f"{SHIM_USER} must be a system user"
    assert gid == groups[SHIM_USER][2], f"{SHIM_USER}'s primary group must be {SHIM_USER}"
    assert shell.endswith("nologin")
    # Group keyd opens the main socket: the shim must not be in it, nor share its GID.
    assert gid != groups["keyd"][2]
    assert SHIM_USER not in groups["keyd"][3].split(",")
    # keyd needs no membership of keyd-notary either (the setgid directory gives the group).
    assert groups[SHIM_USER][3] == ""


def test_tmpfiles_creates_setgid_notary_socket_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles can only set keyd:keyd-notary ownership when run as root")
    (tmp_path / "etc").mkdir()
    sysusers = run([tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)])
    assert sysusers.returncode == 0, sysusers.stdout + sysusers.stderr
    passwd = colon_file(tmp_path / "etc/passwd")
    groups = colon_file(tmp_path / "etc/group")
    keyd_uid = int(passwd["keyd"][2])
    shim_gid = int(groups[SHIM_USER][2])
    # The TLS key, written with a careless umask, is tightened like the store secret.
    key = tmp_path / "etc/keyd/notary-signer.key"
    key.parent.mkdir()
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o644)

    proc = run([tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create", str(TMPFILES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr

    directory = tmp_path / NOTARY_DIR.relative_to("/")
    st = directory.stat()
    assert stat.S_IMODE(st.st_mode) == 0o2750
    assert (st.st_uid, st.st_gid) == (keyd_uid, shim_gid)
    # What keyd's socket preparation requires of the directory.
    assert st.st_mode & 0o007 == 0
    key_stat = key.stat()
    assert stat.S_IMODE(key_stat.st_mode) == 0o600
    assert (key_stat.st_uid, key_stat.st_gid) == (0, 0)

    # A file created there by keyd (here: root) gets the directory's group, no chown needed.
    probe = directory / "probe"
    probe.write_bytes(b"")
    assert probe.stat().st_gid == shim_gid


def test_readme_documents_the_shim() -> None:
    text = README.read_text(encoding="utf-8")
    assert "## Notary signer shim" in text
    for needle in (
        SHIM_UNIT.name,
        EXAMPLE.name,
        f'notary_socket = "{DEFAULT_KEYD_SOCKET}"',
        KEY_CREDENTIAL,
        "systemd-tmpfiles --create",
    ):
        assert needle in text, needle
