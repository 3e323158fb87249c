"""SoftHSM2 tokens for tests and benchmarks, each in its own temporary directory.

SoftHSM2 is a real PKCS#11 module (Debian's softhsm2 package); nothing here is
emulated. Every SoftHSM instance gets its own softhsm2.conf and token directory,
passed to processes through SOFTHSM2_CONF, so the machine's default token store
(/var/lib/softhsm/tokens) is never read or written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

# Throwaway test tokens' PINs.
SO_PIN = "87654321"
USER_PIN = "123456"

MODULE_CANDIDATES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
)
SPY_CANDIDATES = (
    Path("/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so"),
    Path("/usr/lib/aarch64-linux-gnu/pkcs11/pkcs11-spy.so"),
)


def _first(candidates: Sequence[Path], what: str) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise RuntimeError(f"{what} not found; install it (./dev.sh test does)")


def softhsm_module() -> Path:
    return _first(MODULE_CANDIDATES, "SoftHSM2 (Debian package softhsm2)")


def spy_module() -> Path:
    """OpenSC's pkcs11-spy: a real pass-through module that logs every call."""
    return _first(SPY_CANDIDATES, "pkcs11-spy (Debian package opensc-pkcs11)")


class SoftHSM:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokens = root / "tokens"
        self.tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        self.module = softhsm_module()
        self.env = {"SOFTHSM2_CONF": str(self.conf)}

    def _run(self, *args: str) -> str:
        result = subprocess.run(
            args,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def init_token(self, label: str, pin: str = USER_PIN) -> str:
        """Initialise a token in a free slot; returns its serial number."""
        self._run(
            "softhsm2-util", "--init-token", "--free", "--label", label,
            "--so-pin", SO_PIN, "--pin", pin,
        )  # fmt: skip
        return self.serial(label)

    def serial(self, label: str) -> str:
        out = self._run("softhsm2-util", "--show-slots")
        serial = ""
        for raw_line in out.splitlines():
            line = raw_line.strip()
            if line.startswith("Serial number:"):
                serial = line.split(":", 1)[1].strip()
            elif line.startswith("Label:") and line.split(":", 1)[1].strip() == label:
                return serial
        raise RuntimeError(f"no token labelled {label!r}:\n{out}")

    def pkcs11_tool(self, label: str, *args: str, pin: str = USER_PIN) -> str:
        """Run OpenSC's pkcs11-tool against one token. Its PIN is on the command line,
        which is acceptable only for a throwaway test token."""
        return self._run(
            "pkcs11-tool", "--module", str(self.module), "--token-label", label,
            "--login", "--pin", pin, *args,
        )  # fmt: skip

    def token_dirs(self) -> list[Path]:
        return sorted(p for p in self.tokens.iterdir() if p.is_dir())

    def token_dir(self, serial: str) -> Path:
        # SoftHSM names a token's directory by a UUID that ends with its serial.
        for path in self.token_dirs():
            if path.name.replace("-", "").endswith(serial):
                return path
        raise RuntimeError(f"no token directory for serial {serial}")

    def remove_token(self, serial: str) -> Path:
        """Take one token away (as unplugging it would); returns where it went."""
        directory = self.token_dir(serial)
        away = self.root / f"away-{directory.name}"
        shutil.move(directory, away)
        return away

    def restore_token(self, away: Path) -> None:
        shutil.move(away, self.tokens / away.name.removeprefix("away-"))

    def remove_all(self) -> Path:
        """Take every token away (as unplugging would); returns where they went."""
        away = self.root / "tokens.away"
        shutil.move(self.tokens, away)
        return away

    def restore_all(self, away: Path) -> None:
        shutil.move(away, self.tokens)
