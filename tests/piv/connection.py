"""An in-process yubikit SmartCardConnection to an EmulatedCard: PivSession without pcscd.

    card = EmulatedCard(version=(5, 4, 3))
    session = PivSession(EmulatedConnection(card))

Closing a connection powers the card off, as a PC/SC disconnect does with a YubiKey: PIN and
management-key status do not survive it; keys and objects do. Opening one does not reset the
card, but PivSession's SELECT does reset the PIV security status (as on a YubiKey), so two
sessions on one card undo each other's PIN and management-key authentication.
"""

from __future__ import annotations

from yubikit.core import TRANSPORT
from yubikit.core.smartcard import SmartCardConnection

from tests.piv.emulator import EmulatedCard


class EmulatedConnection(SmartCardConnection):
    """Each `send_and_receive` is one APDU exchange with the emulated card, in this thread."""

    def __init__(self, card: EmulatedCard) -> None:
        self.card = card
        self.atr = card.atr
        self._closed = False

    @property
    def transport(self) -> TRANSPORT:
        # yubikit's rule for the ATR: high nibble of T0 is F on USB (all interface bytes present).
        return TRANSPORT.USB if self.atr[1] & 0xF0 == 0xF0 else TRANSPORT.NFC

    def send_and_receive(self, apdu: bytes) -> tuple[bytes, int]:
        if self._closed:
            raise OSError("connection to the emulated card is closed")
        response = self.card.transmit(apdu)
        return response[:-2], int.from_bytes(response[-2:], "big")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.card.power_off()
