"""Connect an EmulatedCard to vsmartcard's vpcd reader driver, so pcscd (and through it pyscard,
ykman, OpenSC and libykcs11) sees the emulated card in a reader.

vpcd makes pcscd *listen* (TCP 35963 for reader slot 0); this bridge connects there as the card.
Each message is a 2-byte big-endian length and a payload. A 1-byte payload is a control
message: 00 power off, 01 power on, 02 reset (no answer), 04 get ATR (answered with the ATR).
Anything longer is a command APDU, answered with the response APDU.

This module starts no pcscd. vpcd binds 0.0.0.0, so run pcscd and this bridge inside a private
network namespace (docs: /work/shared/reference/yubikey-piv.md, "PC/SC rig"):

    python -m tests.piv.vpcd_bridge --port 35963 --version 5.7.2 --serial 12345678 --auto-touch

Touch: with --auto-touch every touch request is granted; otherwise send SIGUSR1 to the bridge
while the card waits (up to --touch-timeout seconds, then 6982).
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading
import time
from pathlib import Path

from tests.piv.emulator import EmulatedCard

POWER_OFF, POWER_ON, RESET, GET_ATR = 0, 1, 2, 4


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    # Debian's vpcd sends length and payload in two writes: ACK at once instead of after ~40 ms.
    if hasattr(socket, "TCP_QUICKACK"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    return buf


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(len(payload).to_bytes(2, "big") + payload)


def serve_connection(card: EmulatedCard, sock: socket.socket) -> None:
    """Answer vpcd on `sock` until it closes the connection."""
    while True:
        header = _read_exactly(sock, 2)
        payload = _read_exactly(sock, int.from_bytes(header, "big")) if header else None
        if payload is None:
            return
        if len(payload) == 1:
            if payload[0] == POWER_OFF:
                card.power_off()
            elif payload[0] in (POWER_ON, RESET):
                card.power_on()
            elif payload[0] == GET_ATR:
                _send(sock, card.atr)
        else:
            _send(sock, card.transmit(payload))


def run(card: EmulatedCard, host: str, port: int, retry_seconds: float = 10.0) -> None:
    """Connect to vpcd (retrying while pcscd starts) and serve until vpcd hangs up."""
    deadline = time.monotonic() + retry_seconds
    while True:
        try:
            sock = socket.create_connection((host, port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        serve_connection(card, sock)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=35963)
    parser.add_argument("--version", default="5.7.2", help="firmware, e.g. 5.4.3")
    parser.add_argument("--serial", type=int, default=12345678)
    parser.add_argument("--state", type=Path, help="JSON file that keeps keys across restarts")
    parser.add_argument("--touch-timeout", type=float, default=15.0)
    parser.add_argument("--auto-touch", action="store_true", help="grant every touch request")
    args = parser.parse_args(argv)
    major, minor, patch = (int(part) for part in args.version.split("."))
    card = EmulatedCard(
        version=(major, minor, patch),
        serial=args.serial,
        state_path=args.state,
        touch_timeout=args.touch_timeout,
        on_touch=(lambda slot: True) if args.auto_touch else None,
    )

    # SIGUSR1 is taken by a thread of its own, never by a handler on the main thread: a
    # handler that calls card.touch() could interrupt the main thread while it holds the
    # touch event's lock, take that lock again, and hang the card for good.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    def touches() -> None:
        while True:
            signal.sigwait({signal.SIGUSR1})
            card.touch()

    threading.Thread(target=touches, name="touch", daemon=True).start()
    run(card, args.host, args.port)


if __name__ == "__main__":
    main()
