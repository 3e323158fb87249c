"""keyd's YubiKey device layer against emulated keys behind a real pcscd (tests/piv/rig.py):
the card is chosen by serial, held exclusively, and found again after reinsertion."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from keyd.backends.yubikey.device import YubiKeyDevice
from keyd.errors import Unavailable
from tests.piv.rig import Card, PcscRig, missing

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "rig available")

NEW, OLD = 32000001, 32000002


@pytest.fixture(scope="module")
def rig() -> Iterator[PcscRig]:
    r = PcscRig([Card("5.7.2", NEW), Card("5.4.3", OLD)])
    r.start()
    # libpcsclite reads this once per process, at its first call: before any test uses it.
    previous = os.environ.get("PCSCLITE_CSOCK_NAME")
    os.environ["PCSCLITE_CSOCK_NAME"] = r.env["PCSCLITE_CSOCK_NAME"]
    try:
        yield r
    finally:
        if previous is None:
            os.environ.pop("PCSCLITE_CSOCK_NAME", None)
        else:
            os.environ["PCSCLITE_CSOCK_NAME"] = previous
        r.stop()


def test_the_card_is_chosen_by_serial(rig: PcscRig) -> None:
    for serial, version in ((NEW, (5, 7, 2)), (OLD, (5, 4, 3))):
        device = YubiKeyDevice(serial)
        try:
            assert tuple(device.run(lambda session: session.version)) == version
        finally:
            device.close()


def test_an_unknown_serial_is_a_clear_error(rig: PcscRig) -> None:
    device = YubiKeyDevice(99999999)
    with pytest.raises(Unavailable, match="serial 99999999 not found in any Yubico reader"):
        device.run(lambda session: session.version)


def test_the_connection_is_exclusive(rig: PcscRig) -> None:
    first = YubiKeyDevice(NEW)
    second = YubiKeyDevice(NEW, reader=rig.reader(0))
    try:
        first.run(lambda session: session.get_serial())
        with pytest.raises(Unavailable, match="busy"):
            second.run(lambda session: session.get_serial())
    finally:
        first.close()
    try:
        assert second.run(lambda session: session.get_serial()) == NEW
    finally:
        second.close()


def test_a_reinserted_card_is_found_again(rig: PcscRig) -> None:
    device = YubiKeyDevice(OLD)
    try:
        device.run(lambda session: session.get_serial())
        rig.remove_card(1)
        with pytest.raises(Unavailable, match="not found"):
            device.run(lambda session: session.get_serial())
        rig.start_card(1)
        rig.wait_for_readers()
        assert device.run(lambda session: session.get_serial()) == OLD
    finally:
        device.close()


def test_callers_are_serialised(rig: PcscRig) -> None:
    device = YubiKeyDevice(NEW)
    inside = 0
    most = 0
    serials: list[int] = []
    guard = threading.Lock()

    def operation(session: object) -> None:
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        serial = session.get_serial()  # type: ignore[attr-defined]
        with guard:
            serials.append(serial)
            inside -= 1

    threads = [threading.Thread(target=device.run, args=(operation,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    device.close()
    assert serials == [NEW] * 8  # every caller ran, on the right card
    assert most == 1
