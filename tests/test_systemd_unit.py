"""Checks of the systemd integration files in systemd/.

These run systemd's own tools (systemd-analyze, systemd-sysusers, systemd-tmpfiles) on the files;
they need no running systemd and are skipped where the tools are not installed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

import pytest

from tests.systemd_tools import (
    CONFIG_PATH,
    DB_PATH,
    KEYD_BINARY,
    MAX_EXPOSURE,
    README,
    SECRET_PATH,
    SOCKET_PATH,
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


def test_exposure_level_is_low() -> None:
    level, output = exposure(UNIT)
    assert level <= MAX_EXPOSURE, f"exposure {level} > {MAX_EXPOSURE}:\n{output}"


def test_verify_is_clean(tmp_path: Path) -> None:
    returncode, problems, output = verify_problems(verifiable_copy(UNIT, tmp_path))
    assert returncode == 0, output
    assert problems == [], output


def test_verify_check_detects_a_broken_unit(tmp_path: Path) -> None:
    """The filter in verify_problems must not hide real problems in the unit."""
    text = UNIT.read_text(encoding="utf-8")
    broken = text.replace("[Service]\n", "[Service]\nNoSuchDirective=yes\nWatchdogSec=soon\n", 1)
    assert broken != text
    (tmp_path / "src").mkdir()
    source = tmp_path / "src" / UNIT.name
    source.write_text(broken, encoding="utf-8")
    _, problems, output = verify_problems(verifiable_copy(source, tmp_path))
    assert any("NoSuchDirective" in line for line in problems), output
    assert any("soon" in line for line in problems), output


def test_unit_runs_keyd_as_notify_service_with_credential() -> None:
    d = directives(UNIT)
    assert one(d, "Type") == "notify"
    assert one(d, "NotifyAccess") == "main"
    assert one(d, "ExecStart") == f"{KEYD_BINARY} serve --config {CONFIG_PATH}"
    assert one(d, "WatchdogSec") != ""
    assert one(d, "LoadCredential") == f"keyd-store-key:{SECRET_PATH}"
    assert one(d, "User") == "keyd"
    assert one(d, "Group") == "keyd"
    assert d.get(("Service", "DynamicUser"), []) in ([], ["no"])
    assert one(d, "RestrictAddressFamilies") == "AF_UNIX"
    # Device access is for a later change, together with the udev rules.
    assert ("Service", "DeviceAllow") not in d
    assert one(d, "WantedBy", section="Install") == "multi-user.target"


def test_unit_directories_match_daemon_paths() -> None:
    d = directives(UNIT)
    runtime = one(d, "RuntimeDirectory")
    assert SOCKET_PATH.parent == PurePosixPath("/run") / runtime
    # Group keyd must be able to reach the socket; nobody else.
    assert one(d, "RuntimeDirectoryMode") == "0750"
    assert DB_PATH.parent == PurePosixPath("/var/lib") / one(d, "StateDirectory")
    assert one(d, "StateDirectoryMode") == "0700"
    configuration = PurePosixPath("/etc") / one(d, "ConfigurationDirectory")
    assert CONFIG_PATH.parent == configuration
    assert SECRET_PATH.parent == configuration
    # Both files document the socket the clients use.
    assert str(SOCKET_PATH) in UNIT.read_text(encoding="utf-8")
    assert str(SOCKET_PATH) in README.read_text(encoding="utf-8")


def test_sysusers_creates_system_user_keyd(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    proc = run([tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passwd = colon_file(tmp_path / "etc/passwd")
    groups = colon_file(tmp_path / "etc/group")
    assert "keyd" in passwd, passwd
    assert "keyd" in groups, groups
    _, _, uid, gid, _, home, shell = passwd["keyd"]
    assert int(uid) < 1000, "keyd must be a system user"
    assert gid == groups["keyd"][2], "keyd's primary group must be keyd"
    assert home == "/var/lib/keyd"
    assert shell.endswith("nologin")


def test_tmpfiles_protects_config_and_secret(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles can only set root:keyd ownership when run as root")
    (tmp_path / "etc").mkdir()
    sysusers = run([tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)])
    assert sysusers.returncode == 0, sysusers.stdout + sysusers.stderr
    keyd_gid = int(colon_file(tmp_path / "etc/group")["keyd"][2])
    # A secret written with a careless umask must be tightened, not left group/world readable.
    secret = tmp_path / "etc/keyd/store.key"
    secret.parent.mkdir()
    secret.write_bytes(b"0" * 32)
    secret.chmod(0o644)

    proc = run([tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create", str(TMPFILES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr

    config_dir = (tmp_path / "etc/keyd").stat()
    assert stat.S_IMODE(config_dir.st_mode) == 0o750
    assert (config_dir.st_uid, config_dir.st_gid) == (0, keyd_gid)
    secret_stat = secret.stat()
    assert stat.S_IMODE(secret_stat.st_mode) == 0o600
    assert (secret_stat.st_uid, secret_stat.st_gid) == (0, 0)
