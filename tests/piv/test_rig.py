"""Emulated YubiKeys through the real PC/SC stack (pcscd + vpcd in private namespaces):
what pyscard and the `ykman` CLI see. Needs root; skipped elsewhere with the reason."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.piv.rig import Card, PcscRig, missing

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "rig available")

YKMAN = str(Path(sys.executable).parent / "ykman")


@pytest.fixture(scope="module")
def rig() -> Iterator[PcscRig]:
    r = PcscRig([Card("5.7.2", 31000001), Card("5.4.3", 31000002)])
    try:
        r.start()
        yield r
    finally:
        r.stop()


def ykman(rig: PcscRig, index: int, *args: str) -> str:
    result = subprocess.run(
        [YKMAN, "--reader", rig.reader(index), *args],
        env=rig.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_ykman_sees_both_emulated_keys(rig: PcscRig) -> None:
    readers = subprocess.run(
        [YKMAN, "list", "--readers"],
        env=rig.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rig.reader(0) in readers.stdout
    assert rig.reader(1) in readers.stdout
    assert "PIV version:              5.7.2" in ykman(rig, 0, "piv", "info")
    assert "PIV version:              5.4.3" in ykman(rig, 1, "piv", "info")


def test_a_key_generated_with_ykman_is_seen_after_the_card_is_reinserted(
    rig: PcscRig, tmp_path: Path
) -> None:
    public = tmp_path / "pub.pem"
    ykman(
        rig, 1, "piv", "keys", "generate", "--algorithm", "ECCP256",
        "--management-key", "010203040506070801020304050607080102030405060708",
        "9a", str(public),
    )  # fmt: skip
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    rig.remove_card(1)
    rig.start_card(1)
    rig.wait_for_readers()
    info = ykman(rig, 1, "piv", "keys", "info", "9a")
    assert "ECCP256" in info
