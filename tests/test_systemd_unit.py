"""Checks of the systemd integration files in systemd/.

These run systemd's own tools (systemd-analyze, systemd-sysusers, systemd-tmpfiles) on the files;
they need no running systemd and are skipped where the tools are not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "keyd.service"
SYSUSERS = SYSTEMD_DIR / "keyd.sysusers.conf"
TMPFILES = SYSTEMD_DIR / "keyd.tmpfiles.conf"
README = SYSTEMD_DIR / "README.md"

# The daemon's fixed paths (see systemd/README.md); the unit must agree with them.
KEYD_BINARY = "/usr/bin/keyd"
CONFIG_PATH = PurePosixPath("/etc/keyd/keyd.toml")
SECRET_PATH = PurePosixPath("/etc/keyd/store.key")
DB_PATH = PurePosixPath("/var/lib/keyd/keyd.db")
SOCKET_PATH = PurePosixPath("/run/keyd/keyd.sock")

MAX_EXPOSURE = 2.0
EXPOSURE_RE = re.compile(r"Overall exposure level for keyd\.service: (\d+\.\d+)")

# Plain, uncoloured, unpaged output from the systemd tools.
TOOL_ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (it comes with systemd)")
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, env=TOOL_ENV, timeout=60, check=False
    )


def _directives(path: Path) -> dict[tuple[str, str], list[str]]:
    """Parse a unit file into {(section, key): [values in order]}.

    configparser cannot be used: systemd allows a key to repeat (SystemCallFilter=, DeviceAllow=).
    """
    result: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line continuations are not handled: {raw!r}"
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        result.setdefault((section, key.strip()), []).append(value.strip())
    return result


def _one(directives: dict[tuple[str, str], list[str]], key: str, section: str = "Service") -> str:
    values = directives.get((section, key), [])
    assert len(values) == 1, f"expected exactly one {key}= in [{section}], found {values}"
    return values[0]


def _colon_file(path: Path) -> dict[str, list[str]]:
    """Read /etc/passwd or /etc/group into {name: fields}."""
    return {
        fields[0]: fields
        for fields in (line.split(":") for line in path.read_text(encoding="utf-8").splitlines())
    }


def _verifiable_copy(unit: Path, directory: Path) -> Path:
    """Copy the unit into directory, keeping its name (systemd derives the unit name from it).

    `systemd-analyze verify` fails when the ExecStart= binary does not exist. Where keyd is not
    installed (a development checkout), point ExecStart= at this Python interpreter instead: it
    is an existing executable, and the rest of the unit is checked unchanged.
    """
    text = unit.read_text(encoding="utf-8")
    if not os.access(KEYD_BINARY, os.X_OK):
        prefix = f"ExecStart={KEYD_BINARY} "
        assert prefix in text, f"{unit.name} does not start {KEYD_BINARY}"
        text = text.replace(prefix, f"ExecStart={sys.executable} ")
    copy = directory / unit.name
    copy.write_text(text, encoding="utf-8")
    return copy


def _verify_problems(unit: Path) -> tuple[int, list[str], str]:
    """Run `systemd-analyze verify`; return its exit code, the lines about keyd, all output.

    verify exits 0 even for unknown keys and unparsable values (it only logs them), so the output
    has to be read. Lines about other units (default dependencies such as sysinit.target, which
    differ from host to host) are not this unit's problem; every line about the unit names its
    file, the unit or the binary, all of which contain "keyd".
    """
    proc = _run([_tool("systemd-analyze"), "verify", str(unit)])
    output = proc.stdout + proc.stderr
    problems = [line for line in output.splitlines() if "keyd" in line]
    return proc.returncode, problems, output


def test_exposure_level_is_low() -> None:
    proc = _run([_tool("systemd-analyze"), "security", "--offline=true", str(UNIT)])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    match = EXPOSURE_RE.search(output)
    assert match is not None, f"no overall exposure level in:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{output}"


def test_verify_is_clean(tmp_path: Path) -> None:
    returncode, problems, output = _verify_problems(_verifiable_copy(UNIT, tmp_path))
    assert returncode == 0, output
    assert problems == [], output


def test_verify_check_detects_a_broken_unit(tmp_path: Path) -> None:
    """The filter in _verify_problems must not hide real problems in the unit."""
    text = UNIT.read_text(encoding="utf-8")
    broken = text.replace("[Service]\n", "[Service]\nNoSuchDirective=yes\nWatchdogSec=soon\n", 1)
    assert broken != text
    (tmp_path / "src").mkdir()
    source = tmp_path / "src" / UNIT.name
    source.write_text(broken, encoding="utf-8")
    _, problems, output = _verify_problems(_verifiable_copy(source, tmp_path))
    assert any("NoSuchDirective" in line for line in problems), output
    assert any("soon" in line for line in problems), output


def test_unit_runs_keyd_as_notify_service_with_credential() -> None:
    d = _directives(UNIT)
    assert _one(d, "Type") == "notify"
    assert _one(d, "NotifyAccess") == "main"
    assert _one(d, "ExecStart") == f"{KEYD_BINARY} serve --config {CONFIG_PATH}"
    assert _one(d, "WatchdogSec") != ""
    assert _one(d, "LoadCredential") == f"keyd-store-key:{SECRET_PATH}"
    assert _one(d, "User") == "keyd"
    assert _one(d, "Group") == "keyd"
    assert d.get(("Service", "DynamicUser"), []) in ([], ["no"])
    assert _one(d, "RestrictAddressFamilies") == "AF_UNIX"
    # Device access is for a later change, together with the udev rules.
    assert ("Service", "DeviceAllow") not in d
    assert _one(d, "WantedBy", section="Install") == "multi-user.target"


def test_unit_directories_match_daemon_paths() -> None:
    d = _directives(UNIT)
    runtime = _one(d, "RuntimeDirectory")
    assert SOCKET_PATH.parent == PurePosixPath("/run") / runtime
    # Group keyd must be able to reach the socket; nobody else.
    assert _one(d, "RuntimeDirectoryMode") == "0750"
    assert DB_PATH.parent == PurePosixPath("/var/lib") / _one(d, "StateDirectory")
    assert _one(d, "StateDirectoryMode") == "0700"
    configuration = PurePosixPath("/etc") / _one(d, "ConfigurationDirectory")
    assert CONFIG_PATH.parent == configuration
    assert SECRET_PATH.parent == configuration
    # Both files document the socket the clients use.
    assert str(SOCKET_PATH) in UNIT.read_text(encoding="utf-8")
    assert str(SOCKET_PATH) in README.read_text(encoding="utf-8")


def test_sysusers_creates_system_user_keyd(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    proc = _run([_tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passwd = _colon_file(tmp_path / "etc/passwd")
    groups = _colon_file(tmp_path / "etc/group")
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
    sysusers = _run([_tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)])
    assert sysusers.returncode == 0, sysusers.stdout + sysusers.stderr
    keyd_gid = int(_colon_file(tmp_path / "etc/group")["keyd"][2])
    # A secret written with a careless umask must be tightened, not left group/world readable.
    secret = tmp_path / "etc/keyd/store.key"
    secret.parent.mkdir()
    secret.write_bytes(b"0" * 32)
    secret.chmod(0o644)

    proc = _run([_tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create", str(TMPFILES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr

    config_dir = (tmp_path / "etc/keyd").stat()
    assert stat.S_IMODE(config_dir.st_mode) == 0o750
    assert (config_dir.st_uid, config_dir.st_gid) == (0, keyd_gid)
    secret_stat = secret.stat()
    assert stat.S_IMODE(secret_stat.st_mode) == 0o600
    assert (secret_stat.st_uid, secret_stat.st_gid) == (0, 0)
