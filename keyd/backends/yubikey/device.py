"""One YubiKey, chosen by serial, reached through PC/SC on a connection keyd holds alone.

keyd opens the PC/SC connection itself (not through ykman's device layer, which kills
scdaemon when it cannot connect) and in exclusive mode, so no other program talks to
the card between keyd's PIN check and its signature. One lock serialises every use.

Choosing the card: with `reader` set, only that reader is opened. Without it keyd
opens each reader whose name contains "yubico", reads the card's serial and lets go
of any card that is not the configured one. Reading a serial selects the PIV
application, which resets that card's PIN-verified state for other programs: set
`reader` to leave other YubiKeys on the machine entirely alone.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from smartcard.CardConnection import CardConnection
from smartcard.Exceptions import CardConnectionException, NoCardException
from smartcard.scard import SCARD_SHARE_EXCLUSIVE
from smartcard.System import readers as pcsc_readers
from yubikit.core import TRANSPORT
from yubikit.core.smartcard import SmartCardConnection
from yubikit.piv import PivSession

from keyd.errors import Unavailable

T = TypeVar("T")
REOPEN_SECONDS = 2.0
_YUBICO = "yubico"


class _ExclusiveConnection(SmartCardConnection):
    """A pyscard connection opened in exclusive mode, as yubikit's transport."""

    def __init__(self, connection: CardConnection) -> None:
        connection.connect(mode=SCARD_SHARE_EXCLUSIVE)
        self._connection = connection
        atr = connection.getATR()
        # How yubikit itself tells USB from NFC (the ATR's interface bytes).
        self._transport = TRANSPORT.USB if atr and atr[1] & 0xF0 == 0xF0 else TRANSPORT.NFC

    @property
    def transport(self) -> TRANSPORT:
        return self._transport

    def send_and_receive(self, apdu: bytes) -> tuple[bytes, int]:
        data, sw1, sw2 = self._connection.transmit(list(apdu))
        return bytes(data), sw1 << 8 | sw2

    def close(self) -> None:
        with contextlib.suppress(CardConnectionException):  # the card is gone already
            self._connection.disconnect()
        release = getattr(self._connection, "release", None)
        if release is not None:
            release()


class DeviceBusy(Unavailable):
    """keyd's own use of the card did not end within the wait (a touch pending)."""


@dataclass(frozen=True)
class Opened:
    reader: str
    connection: SmartCardConnection
    session: PivSession


class YubiKeyDevice:
    """The configured YubiKey: opened on first use, reopened after removal or reset."""

    def __init__(self, serial: int, reader: str = "") -> None:
        self.serial = serial
        self.reader = reader
        self._lock = threading.Lock()
        self._opened: Opened | None = None
        # Counts openings: a PIN verified under an older epoch is no longer verified.
        self.epoch = 0

    @property
    def reader_name(self) -> str:
        """The reader the card was last found in ("" before it was)."""
        return self._opened.reader if self._opened else ""

    def run(self, operation: Callable[[PivSession], T], *, wait: float | None = None) -> T:
        """Run `operation` on the card with the lock held. If the card went away or was
        reset (the connection fails), it is found again once and `operation` retried;
        the operation must therefore start from scratch (select, PIN) each time.
        With `wait`, give up (Unavailable) when the card stays busy that long."""
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            raise DeviceBusy(f"YubiKey with serial {self.serial} is busy (waiting for a touch?)")
        try:
            for attempt in (1, 2):
                opened = self._opened or (self._open() if attempt == 1 else self._reopen())
                try:
                    return operation(opened.session)
                except (CardConnectionException, NoCardException):
                    self._close()
                    if attempt == 2:
                        raise Unavailable(
                            f"YubiKey with serial {self.serial} was removed or reset; "
                            "insert it and retry"
                        ) from None
        finally:
            self._lock.release()
        raise AssertionError("unreachable")  # pragma: no cover

    def _reopen(self) -> Opened:
        """Find the card again after it failed mid-operation. A reset card takes a
        moment to come back to PC/SC, so keep looking for up to REOPEN_SECONDS."""
        deadline = time.monotonic() + REOPEN_SECONDS
        while True:
            try:
                return self._open()
            except Unavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._opened is not None:
            self._opened.connection.close()
            self._opened = None

    def _open(self) -> Opened:
        names = [r for r in pcsc_readers() if self._considered(str(r))]
        busy = []
        for reader in names:
            try:
                connection = _ExclusiveConnection(reader.createConnection())
            except NoCardException:
                continue
            except CardConnectionException:
                busy.append(str(reader))  # another program holds it (exclusively)
                continue
            try:
                session = PivSession(connection)
                serial = session.get_serial()
            except Exception:  # noqa: BLE001 - not a YubiKey PIV we can read: not ours
                connection.close()
                continue
            if serial == self.serial:
                self.epoch += 1
                self._opened = Opened(str(reader), connection, session)
                return self._opened
            connection.close()
        where = f"reader {self.reader!r}" if self.reader else "any Yubico reader"
        detail = f"; busy (held by another program): {', '.join(busy)}" if busy else ""
        raise Unavailable(
            f"YubiKey with serial {self.serial} not found in {where}{detail}. Insert it, "
            "or check [yubikey] serial and reader"
        )

    def _considered(self, name: str) -> bool:
        if self.reader:
            return name == self.reader
        return _YUBICO in name.lower()
