"""Emulated YubiKeys behind the real PC/SC stack: pcscd + vpcd in private namespaces.

pcscd runs in its own mount and network namespaces: its socket directory is a
private tmpfs (so it never meets the machine's pcscd), and vpcd, which listens on
0.0.0.0:35963/35964, is reachable only from that network namespace's loopback.
Each emulated card (tests/piv/emulator.py) is connected by a vpcd bridge started
inside the same network namespace. Clients (pyscard, ykman, keyd) reach this pcscd
with PCSCLITE_CSOCK_NAME, through /proc/PID/root. Needs root (namespaces); a real
YubiKey or a real pcscd is never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Debian's vpcd driver, as ./dev.sh unpacks it (not installed: the package would also set
# up the machine's pcscd), or installed. One reader.conf entry gives two readers, on ports
# 35963 and 35964.
_DRIVER = Path("usr/lib/pcsc/drivers/serial/libifdvpcd.so")
_VPCD_CANDIDATES = (Path(__file__).parents[2] / ".cache" / "vpcd" / _DRIVER, Path("/") / _DRIVER)


def _vpcd() -> Path | None:
    return next((path for path in _VPCD_CANDIDATES if path.exists()), None)


_FRIENDLY = "Yubico YubiKey OTP+FIDO+CCID"  # ykman and libykcs11 look for "Yubico"
_PORTS = (35963, 35964)
_START_TIMEOUT = 20.0


def missing() -> str:
    """Why the rig cannot run here, or "" when it can."""
    if os.geteuid() != 0:
        return "the PC/SC rig needs root (private mount and network namespaces)"
    for tool in ("pcscd", "unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"the PC/SC rig needs {tool} (Debian: pcscd, util-linux, iproute2)"
    if _vpcd() is None:
        return "the PC/SC rig needs vpcd's driver (./dev.sh unpacks vsmartcard-vpcd into .cache)"
    return ""


@dataclass(frozen=True)
class Card:
    version: str  # firmware, e.g. "5.7.2"
    serial: int
    auto_touch: bool = True
    touch_timeout: float = 2.0


class PcscRig:
    """pcscd and up to two emulated cards; stop() ends every process it started."""

    def __init__(self, cards: list[Card]) -> None:
        if len(cards) > len(_PORTS):
            raise ValueError("vpcd offers two readers")
        self.cards = cards
        self.dir = Path(tempfile.mkdtemp(prefix="keyd-pcsc-"))
        self.pcscd: subprocess.Popen[bytes] | None = None
        self.bridges: list[subprocess.Popen[bytes]] = []

    def reader(self, index: int) -> str:
        return f"{_FRIENDLY} 00 {index:02d}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients of this pcscd (and no other)."""
        assert self.pcscd is not None
        socket_path = f"/proc/{self.pcscd.pid}/root/run/pcscd/pcscd.comm"
        return {**os.environ, "PCSCLITE_CSOCK_NAME": socket_path}

    def state(self, index: int) -> Path:
        """The card's state file: it keeps keys across a card restart."""
        return self.dir / f"card{index}.json"

    def start(self) -> None:
        conf = self.dir / "reader.conf.d"
        conf.mkdir()
        (conf / "vpcd").write_text(
            f'FRIENDLYNAME "{_FRIENDLY}"\nDEVICENAME /dev/null:0x8C7B\n'
            f"LIBPATH {_vpcd()}\nCHANNELID 0x8C7B\n"
        )
        log = (self.dir / "pcscd.log").open("wb")
        # /run is a private tmpfs in the new mount namespace: /run/pcscd is ours alone.
        script = (
            "mount -t tmpfs -o mode=0755 tmpfs /run && mkdir /run/pcscd && "
            'ip link set lo up && exec pcscd --foreground -c "$1"'
        )
        self.pcscd = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "--",
             "sh", "-c", script, "sh", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            self._wait_for_namespaces()
            for index in range(len(self.cards)):
                self.start_card(index)
            self.wait_for_readers()
        except BaseException:
            self.stop()  # a rig that failed to start leaves nothing running
            raise

    def _wait_for_namespaces(self) -> None:
        """Until `unshare` has made pcscd's network namespace, nsenter would join the
        machine's own and a bridge would knock on the machine's loopback."""
        assert self.pcscd is not None
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.pcscd.poll() is not None:
                raise RuntimeError(f"pcscd exited:\n{self.logs()}")
            try:
                if os.readlink(f"/proc/{self.pcscd.pid}/ns/net") != own:
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        raise RuntimeError("pcscd's network namespace never appeared")

    def start_card(self, index: int) -> None:
        """(Re)connect card `index`, as if inserted: its keys come from its state file."""
        assert self.pcscd is not None
        card = self.cards[index]
        args = [
            "nsenter", f"--net=/proc/{self.pcscd.pid}/ns/net", "--",
            sys.executable, "-m", "tests.piv.vpcd_bridge", "--port", str(_PORTS[index]),
            "--version", card.version, "--serial", str(card.serial),
            "--state", str(self.state(index)), "--touch-timeout", str(card.touch_timeout),
        ]  # fmt: skip
        if card.auto_touch:
            args.append("--auto-touch")
        log = (self.dir / f"card{index}.log").open("ab")
        bridge = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2]
        )
        if index < len(self.bridges):
            self.bridges[index] = bridge
        else:
            self.bridges.append(bridge)

    def remove_card(self, index: int) -> None:
        """Pull card `index` out: its bridge stops, the reader goes empty."""
        _stop(self.bridges[index])

    def wait_for_readers(self) -> None:
        """Wait until pcscd lists a card in every reader in use."""
        deadline = time.monotonic() + _START_TIMEOUT
        probe = (
            "from smartcard.System import readers\n"
            "from smartcard.Exceptions import CardConnectionException, NoCardException\n"
            "present = 0\n"
            "for r in readers():\n"
            "    try:\n"
            "        c = r.createConnection(); c.connect(); c.disconnect(); present += 1\n"
            "    except NoCardException:\n"
            "        pass\n"
            "    except CardConnectionException:\n"
            "        present += 1  # held exclusively by a program (keyd): present\n"
            "print(present)\n"
        )
        while time.monotonic() < deadline:
            assert self.pcscd is not None
            if self.pcscd.poll() is not None:
                raise RuntimeError(f"pcscd exited:\n{self.logs()}")
            result = subprocess.run(
                [sys.executable, "-c", probe],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            if result.returncode == 0 and result.stdout.strip() == str(len(self.cards)):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the emulated cards did not appear in pcscd:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')}"
            for path in sorted(self.dir.glob("*.log"))
        )

    def stop(self) -> None:
        for bridge in self.bridges:
            _stop(bridge)
        if self.pcscd is not None:
            _stop(self.pcscd)
            self.pcscd = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
