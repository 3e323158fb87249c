"""One YubiKey, chosen by serial, reached through PC/SC on a connection keyd holds alone.

keyd opens the PC/SC connection itself (not through ykman's device layer, which kills
scdaemon when it cannot connect) and in exclusive mode, so no other program talks to
the card between keyd's PIN check and its signature. One lock serialises every use.
When keyd lets go of its card, the card is reset, so no PIN-verified state is left
behind for the next program.

Choosing the card: with `reader` set, only that reader is opened. Without it keyd
looks at each reader whose name contains "yubico" in shared mode, reads the card's
serial, and leaves any card that is not the configured one as it was (no power cycle).
Reading a serial selects the PIV application, which resets that card's PIN-verified
state for other programs: set `reader` to leave other YubiKeys entirely alone.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from smartcard.CardConnection import CardConnection
from smartcard.Exceptions import CardConnectionException, NoCardException, SmartcardException
from smartcard.pcsc.PCSCExceptions import BaseSCardException
from smartcard.scard import (
    SCARD_LEAVE_CARD,
    SCARD_RESET_CARD,
    SCARD_SHARE_EXCLUSIVE,
    SCARD_SHARE_SHARED,
)
from smartcard.System import readers as pcsc_readers
from yubikit.core import TRANSPORT
from yubikit.core.smartcard import SmartCardConnection
from yubikit.piv import PivSession

from keyd.errors import Unavailable

T = TypeVar("T")
REOPEN_SECONDS = 2.0
_YUBICO = "yubico"


class _Connection(SmartCardConnection):
    """A pyscard connection as yubikit's transport; counts the exchanges that worked."""

    def __init__(self, connection: CardConnection, *, exclusive: bool) -> None:
        if exclusive:
            connection.connect(mode=SCARD_SHARE_EXCLUSIVE, disposition=SCARD_RESET_CARD)
        else:
            connection.connect(mode=SCARD_SHARE_SHARED, disposition=SCARD_LEAVE_CARD)
        self._connection = connection
        self.exchanges = 0
        try:
            atr = connection.getATR()
        except SmartcardException:
            self.close()
            raise
        # How yubikit itself tells USB from NFC (the ATR's interface bytes).
        self._transport = TRANSPORT.USB if atr and atr[1] & 0xF0 == 0xF0 else TRANSPORT.NFC

    @property
    def transport(self) -> TRANSPORT:
        return self._transport

    def send_and_receive(self, apdu: bytes) -> tuple[bytes, int]:
        data, sw1, sw2 = self._connection.transmit(list(apdu))
        self.exchanges += 1
        return bytes(data), sw1 << 8 | sw2

    def close(self) -> None:
        with contextlib.suppress(CardConnectionException):  # the card is gone already
            self._connection.disconnect()
        release = getattr(self._connection, "release", None)
        if release is not None:
            with contextlib.suppress(SmartcardException, BaseSCardException):
                release()


class DeviceBusy(Unavailable):
    """keyd's own use of the card did not end within the wait (a touch pending)."""


@dataclass(frozen=True)
class Opened:
    reader: str
    connection: _Connection
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
        """Run `operation` on the card with the lock held. If the connection turns out to
        be dead at the operation's first exchange (the card was removed or reset since
        the last use), the card is found again and `operation` run once more from the
        start. A failure after the card has answered part of an operation is never
        retried: the card may have acted (a key made, a PIN attempt counted).
        With `wait`, give up (DeviceBusy) when the card stays busy that long."""
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            raise DeviceBusy(f"YubiKey with serial {self.serial} is busy (waiting for a touch?)")
        try:
            for attempt in (1, 2):
                opened = self._opened or (self._open() if attempt == 1 else self._reopen())
                before = opened.connection.exchanges
                try:
                    return operation(opened.session)
                except (CardConnectionException, NoCardException):
                    self._close()
                    if attempt == 2 or opened.connection.exchanges > before:
                        raise Unavailable(
                            f"YubiKey with serial {self.serial} was removed or reset during "
                            "the operation; insert it and retry"
                        ) from None
        finally:
            self._lock.release()
        raise AssertionError("unreachable")  # pragma: no cover

    def _reopen(self) -> Opened:
        """Find the card again after its connection died. A reset card takes a moment
        to come back to PC/SC, so keep looking for up to REOPEN_SECONDS."""
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
        try:
            names = [r for r in pcsc_readers() if self._considered(str(r))]
        except (SmartcardException, BaseSCardException) as exc:
            raise Unavailable(
                f"cannot reach pcscd to find YubiKey with serial {self.serial} ({exc}); is "
                "pcscd running, and may keyd use it?"
            ) from None
        busy = []
        for reader in names:
            try:
                if not self.reader and self._serial_in(reader) != self.serial:
                    continue
                opened = self._exclusive(reader)
            except NoCardException:
                continue
            except CardConnectionException:
                busy.append(str(reader))  # another program holds it (exclusively)
                continue
            if opened is not None:
                self.epoch += 1
                self._opened = opened
                return opened
        where = f"reader {self.reader!r}" if self.reader else "any Yubico reader"
        detail = f"; busy (held by another program): {', '.join(busy)}" if busy else ""
        raise Unavailable(
            f"YubiKey with serial {self.serial} not found in {where}{detail}. Insert it, "
            "or check [yubikey] serial and reader"
        )

    def _serial_in(self, reader: object) -> int | None:
        """The serial of the card in `reader`, read in shared mode and left as it was."""
        connection = _Connection(reader.createConnection(), exclusive=False)  # type: ignore[attr-defined]
        _, serial = _piv_session(connection)
        connection.close()
        return serial

    def _exclusive(self, reader: object) -> Opened | None:
        connection = _Connection(reader.createConnection(), exclusive=True)  # type: ignore[attr-defined]
        session, serial = _piv_session(connection)
        if session is None or serial != self.serial:
            connection.close()
            return None
        return Opened(str(reader), connection, session)

    def _considered(self, name: str) -> bool:
        if self.reader:
            return name == self.reader
        return _YUBICO in name.lower()


def _piv_session(connection: _Connection) -> tuple[PivSession | None, int | None]:
    """PIV selected on the card and its serial; (None, None) for a card that is not a
    YubiKey PIV keyd can read (then it is not ours)."""
    try:
        session = PivSession(connection)
        return session, session.get_serial()
    except Exception:  # noqa: BLE001 - any card, any failure: not ours
        return None, None
