"""A keyd daemon with `[yubikey.NAME]` backends on the emulated YubiKeys of a PcscRig.

What is emulated: the YubiKey itself (tests/piv/emulator.py, a Python PIV card behind
vpcd). pcscd, libpcsclite, pyscard, yubikit and keyd are the real ones. The daemon
reaches only the rig's private pcscd (PCSCLITE_CSOCK_NAME).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.harness import Daemon
from tests.piv.rig import Card, PcscRig

PIN = "123456"
MANAGEMENT_KEY = "010203040506070801020304050607080102030405060708"
YKMAN = str(Path(sys.executable).parent / "ykman")


def private_file(path: Path, text: str) -> Path:
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


class YubiKeyRig:
    """A PcscRig, secrets for its cards, and daemons configured for them."""

    def __init__(self, cards: list[Card]) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="keyd-yk-"))
        self.root.chmod(0o700)
        self.pcsc = PcscRig(cards)
        self.pin_file = private_file(self.root / "secrets" / "pin", PIN + "\n")
        self.key_file = private_file(self.root / "secrets" / "mgmt", MANAGEMENT_KEY + "\n")
        self.daemons: list[Daemon] = []

    def start(self) -> None:
        self.pcsc.start()

    @property
    def env(self) -> dict[str, str]:
        return {"PCSCLITE_CSOCK_NAME": self.pcsc.env["PCSCLITE_CSOCK_NAME"]}

    def serial(self, index: int) -> int:
        return self.pcsc.cards[index].serial

    def emulator_root(self, index: int) -> Path:
        """The emulated card's own attestation CA, as a PEM file (the test trust root)."""
        state = json.loads(self.pcsc.state(index).read_text())
        der = bytes.fromhex(state["attestation_root_der"])
        pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        path = self.root / f"root{index}.pem"
        path.write_bytes(pem)
        return path

    def table(
        self,
        name: str,
        index: int,
        *,
        reader: bool = True,
        trust_emulator: bool = True,
        pin_file: Path | None = None,
        extra: str = "",
    ) -> str:
        lines = [
            f"[yubikey.{name}]",
            f"serial = {self.serial(index)}",
            f'pin_file = "{pin_file or self.pin_file}"',
            f'management_key_file = "{self.key_file}"',
        ]
        if reader:
            lines.append(f'reader = "{self.pcsc.reader(index)}"')
        if trust_emulator:
            lines.append(f'attestation_roots = ["{self.emulator_root(index)}"]')
        return "\n".join(lines) + "\n" + extra + "\n"

    def daemon(self, tables: str, *, start: bool = True) -> Daemon:
        daemon = Daemon(self.root / f"d{len(self.daemons)}", extra=tables, env=self.env)
        self.daemons.append(daemon)
        daemon.init()
        if start:
            daemon.start()
        return daemon

    def ykman(self, index: int, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            [YKMAN, "--reader", self.pcsc.reader(index), *args],
            env=self.pcsc.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    def touch(self, index: int, seconds: float = 1.0) -> threading.Thread:
        """A finger on card `index` for `seconds`, from now, as a user told to touch it
        would. A YubiKey (and the emulator) counts a touch only while it waits for one;
        the bridge turns each SIGUSR1 into a touch."""
        bridge = self.pcsc.bridges[index]

        def press() -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and bridge.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    bridge.send_signal(signal.SIGUSR1)
                time.sleep(0.05)

        finger = threading.Thread(target=press, daemon=True)
        finger.start()
        return finger

    def finger(self, index: int) -> Callable[[str], None]:
        """An `on_touch` callback: touch card `index` when keyd asks."""

        def touch(device: str) -> None:
            self.touch(index)

        return touch

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        self.pcsc.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def running_rig(cards: list[Card]) -> Iterator[YubiKeyRig]:
    rig = YubiKeyRig(cards)
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()
