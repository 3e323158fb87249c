"""Shared helpers for the tests of systemd/ (unit, drop-ins): paths and systemd's tools."""

from __future__ import annotations

import os
import re
import shutil
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

# Plain, uncoloured, unpaged output from the systemd tools.
TOOL_ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (it comes with systemd)")
    return path


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, env=TOOL_ENV, timeout=60, check=False
    )


def directives(path: Path) -> dict[tuple[str, str], list[str]]:
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


def one(directives: dict[tuple[str, str], list[str]], key: str, section: str = "Service") -> str:
    values = directives.get((section, key), [])
    assert len(values) == 1, f"expected exactly one {key}= in [{section}], found {values}"
    return values[0]


def colon_file(path: Path) -> dict[str, list[str]]:
    """Read /etc/passwd or /etc/group into {name: fields}."""
    return {
        fields[0]: fields
        for fields in (line.split(":") for line in path.read_text(encoding="utf-8").splitlines())
    }


def verifiable_copy(unit: Path, directory: Path) -> Path:
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


def verify_problems(unit: Path) -> tuple[int, list[str], str]:
    """Run `systemd-analyze verify`; return its exit code, the lines about keyd, all output.

    verify exits 0 even for unknown keys and unparsable values (it only logs them), so the output
    has to be read. Lines about other units (default dependencies such as sysinit.target, which
    differ from host to host) are not this unit's problem; every line about the unit names its
    file, the unit or the binary, all of which contain "keyd".
    """
    proc = run([tool("systemd-analyze"), "verify", str(unit)])
    output = proc.stdout + proc.stderr
    problems = [line for line in output.splitlines() if "keyd" in line]
    return proc.returncode, problems, output


def exposure(unit: Path) -> tuple[float, str]:
    """`systemd-analyze security --offline=true`'s overall exposure of `unit`, and the output."""
    proc = run([tool("systemd-analyze"), "security", "--offline=true", str(unit)])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    level = re.compile(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)")
    match = level.search(output)
    assert match is not None, f"no overall exposure level in:\n{output}"
    return float(match.group(1)), output
