"""The vpcd bridge, against a stand-in for vpcd's side of the socket (no pcscd is started).

The stand-in listens on 127.0.0.1 only, speaks vpcd's framing (2-byte length + payload, 1-byte
control messages), and carries a real PivSession's APDUs to the bridged card.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from yubikit.core import TRANSPORT
from yubikit.core.smartcard import SmartCardConnection
from yubikit.piv import DEFAULT_MANAGEMENT_KEY, KEY_TYPE, SLOT, PivSession

from tests.piv.emulator import YUBIKEY5_USB_ATR, EmulatedCard
from tests.piv.vpcd_bridge import GET_ATR, POWER_ON, run


class FakeVpcd(SmartCardConnection):
    """pcscd + vpcd as the bridge sees them: the listening end of the card's TCP connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @property
    def transport(self) -> TRANSPORT:
        return TRANSPORT.USB

    def exchange(self, payload: bytes) -> bytes:
        self.sock.sendall(len(payload).to_bytes(2, "big") + payload)
        n = int.from_bytes(self._read(2), "big")
        return self._read(n)

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, "bridge closed the connection"
            buf += chunk
        return buf

    def control(self, code: int) -> None:
        self.sock.sendall(b"\x00\x01" + bytes([code]))

    def send_and_receive(self, apdu: bytes) -> tuple[bytes, int]:
        response = self.exchange(apdu)
        return response[:-2], int.from_bytes(response[-2:], "big")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def vpcd() -> Iterator[tuple[FakeVpcd, EmulatedCard]]:
    card = EmulatedCard(version=(5, 4, 3), serial=7, on_touch=lambda slot: True)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]
        bridge = threading.Thread(target=run, args=(card, "127.0.0.1", port), daemon=True)
        bridge.start()
        sock, _ = listener.accept()
    fake = FakeVpcd(sock)
    yield fake, card
    fake.close()  # vpcd hanging up ends the bridge
    bridge.join(10)
    assert not bridge.is_alive()


def test_control_messages_and_piv_session(vpcd: tuple[FakeVpcd, EmulatedCard]) -> None:
    fake, card = vpcd
    fake.control(POWER_ON)
    assert fake.exchange(bytes([GET_ATR])) == YUBIKEY5_USB_ATR
    session = PivSession(fake)
    assert (tuple(session.version), session.get_serial()) == ((5, 4, 3), 7)
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    public = session.generate_key(SLOT.RETIRED1, KEY_TYPE.ECCP256)
    session.verify_pin("123456")
    signature = session.sign(SLOT.RETIRED1, KEY_TYPE.ECCP256, b"over tcp", hashes.SHA256())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, b"over tcp", ec.ECDSA(hashes.SHA256()))
    assert card.state.keys[SLOT.RETIRED1].generated
