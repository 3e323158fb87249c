"""The pkcs11 backend in this process, against SoftHSM2: recovery from lost sessions.

Closing every session behind the backend's back (C_CloseAllSessions, through the
same loaded module) and reloading the module are done for real; the backend must
notice, reconnect and sign without the caller seeing an error.
"""

from __future__ import annotations

import ctypes
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyd.backends.pkcs11 import Pkcs11Backend
from keyd.backends.pkcs11.module import Module
from keyd.config import Pkcs11TokenConfig
from keyd.core.keys import PublicKey
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.model import KeyRecord
from keyd.core.signing import SignInput
from keyd.errors import SecretError, Unavailable
from tests.softhsm import USER_PIN, SoftHSM

MESSAGE = b"snapshot.json " * 64


@pytest.fixture(scope="module")
def hsm() -> Iterator[SoftHSM]:
    root = Path(tempfile.mkdtemp(prefix="keyd-r-"))
    root.chmod(0o700)
    soft = SoftHSM(root / "hsm")
    soft.init_token("recover")
    with pytest.MonkeyPatch.context() as env:
        # SoftHSM in this process reads its configuration at (re)initialisation.
        env.setenv("SOFTHSM2_CONF", soft.env["SOFTHSM2_CONF"])
        yield soft
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def backend(hsm: SoftHSM) -> Iterator[Pkcs11Backend]:
    pin = hsm.root / "pin"
    pin.write_text(USER_PIN + "\n")
    pin.chmod(0o600)
    config = Pkcs11TokenConfig(
        module=hsm.module, token_label="recover", pin_file=pin, reconnect_seconds=0
    )
    b = Pkcs11Backend("r", config)
    yield b
    b.close()


def _record(backend: Pkcs11Backend, key_type: KeyType) -> KeyRecord:
    generated = backend.generate(key_type)
    return KeyRecord(generated.public_key, backend.name, generated.location)


def _check(public: PublicKey, signature: bytes) -> None:
    assert public.verify(signature, SignInput.of_message(MESSAGE), SignatureEncoding.DER)


def _close_all_sessions(module: Path) -> None:
    lib = ctypes.CDLL(str(module))
    slots = (ctypes.c_ulong * 16)()
    count = ctypes.c_ulong(16)
    assert lib.C_GetSlotList(1, slots, ctypes.byref(count)) == 0
    for i in range(count.value):
        assert lib.C_CloseAllSessions(slots[i]) == 0


def test_sessions_closed_behind_its_back(backend: Pkcs11Backend, hsm: SoftHSM) -> None:
    record = _record(backend, KeyType.ECDSA_P256)
    _check(record.public_key, backend.sign(record, [MESSAGE], prehashed=False)[0])
    _close_all_sessions(hsm.module)  # also logs the token out
    (signature,) = backend.sign(record, [MESSAGE], prehashed=False)
    _check(record.public_key, signature)
    assert backend.health().state == "connected"


def test_module_reloaded_while_signing(backend: Pkcs11Backend, hsm: SoftHSM) -> None:
    record = _record(backend, KeyType.ED25519)
    module = Module.get(hsm.module)
    errors: list[BaseException] = []
    done = threading.Event()

    def signer() -> None:
        try:
            while not done.is_set():
                for signature in backend.sign(record, [MESSAGE] * 4, prehashed=False):
                    _check(record.public_key, signature)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=signer) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(5):
        with module.using() as generation:
            pass
        module.reload(generation)
    done.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_pin_file_that_is_a_symlink_is_refused(hsm: SoftHSM) -> None:
    target = hsm.root / "pin.real"
    target.write_text(USER_PIN)
    target.chmod(0o600)
    link = hsm.root / "pin.link"
    link.symlink_to(target)
    config = Pkcs11TokenConfig(module=hsm.module, token_label="recover", pin_file=link)
    with pytest.raises(SecretError, match="symbolic links are refused"):
        Pkcs11Backend("s", config)


def test_unavailable_names_the_token_and_what_is_present(hsm: SoftHSM) -> None:
    pin = hsm.root / "pin2"
    pin.write_text(USER_PIN)
    pin.chmod(0o600)
    config = Pkcs11TokenConfig(module=hsm.module, token_label="elsewhere", pin_file=pin)
    b = Pkcs11Backend("gone", config)
    with pytest.raises(Unavailable, match=r"'elsewhere'.*tokens present: 'recover'"):
        b.generate(KeyType.ECDSA_P256)
    health = b.health()
    assert not health.healthy
    assert health.state == "absent"
