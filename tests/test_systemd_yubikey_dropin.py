"""systemd/keyd-yubikey.conf: verified with the unit by systemd-analyze, as shipped and with
its example credentials enabled; the credential names are the ones keyd reads."""

from __future__ import annotations

import re
from pathlib import Path

from keyd.config import YubiKeyConfig
from tests.systemd_tools import UNIT, directives, verifiable_copy, verify_problems

ROOT = Path(__file__).resolve().parent.parent
DROPIN = ROOT / "systemd" / "keyd-yubikey.conf"


def _unit_with(directory: Path, text: str) -> Path:
    directory.mkdir()
    unit = verifiable_copy(UNIT, directory)
    dropins = directory / f"{UNIT.name}.d"
    dropins.mkdir()
    (dropins / DROPIN.name).write_text(text, encoding="utf-8")
    return unit


def test_the_dropin_verifies_as_shipped_and_with_its_examples(tmp_path: Path) -> None:
    shipped = DROPIN.read_text(encoding="utf-8")
    examples, enabled = re.subn(r"^#(?=[A-Z][A-Za-z]*=)", "", shipped, flags=re.MULTILINE)
    assert enabled == 2
    for n, text in enumerate((shipped, examples, shipped + "NoSuchDirective=yes\n")):
        returncode, problems, output = verify_problems(_unit_with(tmp_path / str(n), text))
        if n < 2:
            assert returncode == 0, output
            assert problems == [], output
        else:  # proof that verify reads the drop-in at all
            assert any("NoSuchDirective" in line for line in problems), output


def test_the_dropin_orders_keyd_after_pcscd_and_names_keyds_credentials() -> None:
    active = directives(DROPIN)
    assert active[("Unit", "Wants")] == ["pcscd.socket"]
    assert active[("Unit", "After")] == ["pcscd.socket"]
    assert ("Service", "PrivateDevices") not in active  # pcscd's socket needs no device node
    text = DROPIN.read_text(encoding="utf-8")
    config = YubiKeyConfig(serial=1)
    for what in ("pin", "management-key"):
        assert f"\n#LoadCredential={config.credential('NAME', what)}:" in text
