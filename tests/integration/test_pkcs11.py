"""The pkcs11 backend against real SoftHSM2 tokens and a real daemon.

Every token lives in a temporary directory of its own (SOFTHSM2_CONF); the
machine's default token store is never used. Nothing is mocked: "token removed"
is the token's directory moved away, "wrong PIN" is a wrong PIN file, and PIN
attempts are counted with OpenSC's pkcs11-spy, a pass-through module that logs
every PKCS#11 call the daemon makes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11_errors

from keyd.client import Client, SignItem
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.errors import FailedPrecondition, InvalidArgument, Unavailable
from tests.harness import Daemon, keyd_command, run_callers, run_keyd, wait_for_backend
from tests.softhsm import USER_PIN, SoftHSM, spy_module
from tests.verify import independent_verify

MESSAGE = b"targets.json canonical bytes " * 40  # ~1 KiB


def write_pin(path: Path, pin: str) -> Path:
    path.write_text(pin + "\n")
    path.chmod(0o600)
    return path


def token_table(
    name: str,
    module: Path,
    pin_file: Path,
    *,
    label: str = "",
    serial: str = "",
    extra: str = "",
) -> str:
    lines = [f"[pkcs11.{name}]", f'module = "{module}"', f'pin_file = "{pin_file}"']
    if label:
        lines.append(f'token_label = "{label}"')
    if serial:
        lines.append(f'token_serial = "{serial}"')
    lines.append("reconnect_seconds = 0.2")
    return "\n".join(lines) + "\n" + extra


class Rig:
    """A SoftHSM instance, a PIN file and a daemon configured for its tokens."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hsm = SoftHSM(root / "hsm")
        self.pin_file = write_pin(root / "token.pin", USER_PIN)
        self.daemon: Daemon | None = None

    def start(self, tables: str, *, env: dict[str, str] | None = None) -> Daemon:
        home = self.root / f"d{len(list(self.root.glob('d*')))}"
        self.daemon = Daemon(home, extra=tables, env={**self.hsm.env, **(env or {})})
        self.daemon.init()
        self.daemon.start()
        return self.daemon

    def restart(self, *, env: dict[str, str] | None = None) -> Daemon:
        assert self.daemon is not None
        assert self.daemon.stop() == 0, self.daemon.logs()
        self.daemon.env.update(env or {})
        self.daemon.start()
        return self.daemon

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()


@pytest.fixture
def rig() -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="keyd-p-"))
    root.chmod(0o700)
    r = Rig(root)
    yield r
    r.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_rig() -> Iterator[Rig]:
    """One token ("keyd-test") and one daemon for the read-mostly tests."""
    root = Path(tempfile.mkdtemp(prefix="keyd-pm-"))
    root.chmod(0o700)
    r = Rig(root)
    r.hsm.init_token("keyd-test")
    r.start(token_table("hsm", r.hsm.module, r.pin_file, label="keyd-test"))
    with pytest.MonkeyPatch.context() as env:
        # open_token() loads SoftHSM in this process too, with this rig's configuration.
        env.setenv("SOFTHSM2_CONF", r.hsm.env["SOFTHSM2_CONF"])
        yield r
    r.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def client(shared_rig: Rig) -> Iterator[Client]:
    assert shared_rig.daemon is not None
    with shared_rig.daemon.client() as c:
        wait_for_backend(c, "pkcs11:hsm", "connected")
        yield c


@pytest.fixture(scope="module")
def token_keys(client: Client) -> dict[KeyType, str]:
    return {t: client.create_key(t, backend="pkcs11", role="root").key_id for t in KeyType}


def open_token(rig: Rig, label: str) -> pkcs11.Session:
    """A session of the test process itself on the token (SoftHSM is multi-process)."""
    assert os.environ["SOFTHSM2_CONF"] == rig.hsm.env["SOFTHSM2_CONF"]
    lib = pkcs11.lib(str(rig.hsm.module))
    lib.reinitialize()  # see tokens created since this process first loaded SoftHSM
    return lib.get_token(token_label=label).open(user_pin=USER_PIN, rw=True)


# -- keys on the token ----------------------------------------------------------------


@pytest.mark.parametrize("key_type", list(KeyType), ids=lambda t: t.value)
def test_generate_on_token_sign_and_verify(
    client: Client, token_keys: dict[KeyType, str], key_type: KeyType
) -> None:
    record = client.get_key(token_keys[key_type])
    assert record.backend == "pkcs11:hsm"
    assert record.role == "root"
    assert record.location["token_label"] == "keyd-test"
    assert len(bytes.fromhex(record.location["cka_id"])) == 16
    sig = client.sign(record.key_id, MESSAGE)
    independent_verify(record, sig.signature, MESSAGE, sig.encoding)
    with pytest.raises(InvalidSignature):
        independent_verify(record, sig.signature, MESSAGE + b"!", sig.encoding)


@pytest.mark.parametrize("key_type", [KeyType.ECDSA_P256, KeyType.ECDSA_P384])
def test_ecdsa_raw_and_digest_inputs(
    client: Client, token_keys: dict[KeyType, str], key_type: KeyType
) -> None:
    record = client.get_key(token_keys[key_type])
    raw = client.sign(record.key_id, MESSAGE, encoding=SignatureEncoding.RAW)
    assert len(raw.signature) == (64 if key_type is KeyType.ECDSA_P256 else 96)
    independent_verify(record, raw.signature, MESSAGE, SignatureEncoding.RAW)
    digest = hashlib.new(key_type.hash_algorithm().name, MESSAGE).digest()
    der = client.sign(record.key_id, digest=digest, encoding=SignatureEncoding.DER)
    independent_verify(record, der.signature, MESSAGE, SignatureEncoding.DER)
    with pytest.raises(InvalidArgument, match="digest"):
        client.sign(record.key_id, digest=digest[:-1])


def test_rsa_digest_input(client: Client, token_keys: dict[KeyType, str]) -> None:
    record = client.get_key(token_keys[KeyType.RSA_3072])
    sig = client.sign(record.key_id, digest=hashlib.sha256(MESSAGE).digest())
    independent_verify(record, sig.signature, MESSAGE, sig.encoding)


def test_batch_mixes_token_and_store_keys(client: Client, token_keys: dict[KeyType, str]) -> None:
    store_key = client.create_key(KeyType.ECDSA_P256, role="timestamp")
    token_key = client.get_key(token_keys[KeyType.ECDSA_P256])
    items = [
        SignItem(k.key_id, message=MESSAGE + bytes([i]))
        for i in range(20)
        for k in (store_key, token_key)
    ]
    results = client.sign_batch(items)
    for item, result in zip(items, results, strict=True):
        assert not isinstance(result, Exception), result
        record = token_key if item.key_id == token_key.key_id else store_key
        assert item.message is not None
        independent_verify(record, result.signature, item.message, result.encoding)


def test_private_key_cannot_leave_the_token(
    shared_rig: Rig, client: Client, token_keys: dict[KeyType, str]
) -> None:
    for key_id in token_keys.values():
        cka_id = bytes.fromhex(client.get_key(key_id).location["cka_id"])
        with open_token(shared_rig, "keyd-test") as session:
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=cka_id)
            assert key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.SENSITIVE] is True
            assert key[Attribute.NEVER_EXTRACTABLE] is True
            assert key[Attribute.DERIVE] is False
            is_rsa = key.key_type == pkcs11.KeyType.RSA
            with pytest.raises(p11_errors.AttributeSensitive):
                key[Attribute.PRIVATE_EXPONENT if is_rsa else Attribute.VALUE]


def test_show_reads_extractability_from_the_token(
    shared_rig: Rig, token_keys: dict[KeyType, str]
) -> None:
    assert shared_rig.daemon is not None
    key_id = token_keys[KeyType.ECDSA_P256]
    result = run_keyd("keys", "show", key_id, "--socket", str(shared_rig.daemon.socket))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "pkcs11:hsm" in out
    assert "token_label=keyd-test" in out
    assert f"module={shared_rig.hsm.module}" in out
    assert "extractable=false" in out
    assert "never_extractable=true" in out
    assert "generated_on_token=true" in out


def test_status_names_the_token(shared_rig: Rig, client: Client) -> None:
    status = {b.name: b for b in client.status().backends}
    token = status["pkcs11:hsm"]
    assert token.healthy
    assert token.state == "connected"
    assert "'keyd-test'" in token.detail
    assert shared_rig.hsm.serial("keyd-test") in token.detail


def test_sixteen_concurrent_callers(client: Client, token_keys: dict[KeyType, str]) -> None:
    records = [client.get_key(token_keys[t]) for t in (KeyType.ECDSA_P256, KeyType.ED25519)]
    signed: list[int] = []

    def caller(n: int) -> None:
        record = records[n % 2]
        for i in range(40):
            message = MESSAGE + f"{n}-{i}".encode()
            sig = client.sign(record.key_id, message)
            independent_verify(record, sig.signature, message, sig.encoding)
        signed.append(40)

    run_callers(caller, 16)
    assert sum(signed) == 16 * 40


# -- adoption, restart, deletion --------------------------------------------------------


def test_adopt_key_made_with_pkcs11_tool(shared_rig: Rig, client: Client) -> None:
    shared_rig.hsm.pkcs11_tool(
        "keyd-test", "--keypairgen", "--key-type", "EC:prime256v1",
        "--id", "c0ffee01", "--label", "ceremony-root", "--usage-sign",
    )  # fmt: skip
    with open_token(shared_rig, "keyd-test") as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=bytes.fromhex("c0ffee01"))
        if key[Attribute.EXTRACTABLE]:  # pkcs11-tool's default depends on its version
            key[Attribute.EXTRACTABLE] = False
    record = client.adopt_key(backend="pkcs11", device_key_id="c0ffee01", role="root")
    assert record.location["cka_id"] == "c0ffee01"
    assert record.location["cka_label"] == "ceremony-root"
    sig = client.sign(record.key_id, MESSAGE, encoding=SignatureEncoding.RAW)
    independent_verify(record, sig.signature, MESSAGE, SignatureEncoding.RAW)
    # The same key again: already known.
    with pytest.raises(Exception, match="already"):
        client.adopt_key(backend="pkcs11:hsm", device_label="ceremony-root")


def test_adopt_refuses_extractable_and_unknown_keys(shared_rig: Rig, client: Client) -> None:
    with open_token(shared_rig, "keyd-test") as session:
        session.generate_keypair(
            pkcs11.KeyType.EC_EDWARDS, store=True, id=b"\xee\x01", label="loose",
            mechanism=pkcs11.Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
            public_template={Attribute.EC_PARAMS: bytes.fromhex("06032b6570")},
            private_template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
        )  # fmt: skip
    with pytest.raises(FailedPrecondition, match="can leave the token"):
        client.adopt_key(backend="pkcs11", device_label="loose")
    # A public-key object that claims the CKA_ID of another key's private half.
    with open_token(shared_rig, "keyd-test") as session:
        ec_params = {Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107")}
        private_only = {Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True}
        pub_x, _ = session.generate_keypair(
            pkcs11.KeyType.EC, store=True, id=b"\xdd\x01", label="x",
            public_template=ec_params, private_template=private_only,
        )  # fmt: skip
        pub_y, _ = session.generate_keypair(
            pkcs11.KeyType.EC, store=True, id=b"\xdd\x02", label="y",
            public_template=ec_params, private_template=private_only,
        )  # fmt: skip
        pub_x.destroy()
        pub_y[Attribute.ID] = b"\xdd\x01"
    with pytest.raises(FailedPrecondition, match="does not belong to the private key"):
        client.adopt_key(backend="pkcs11", device_key_id="dd01")
    # Usable without a login, or not the only key with its CKA_ID: refused.
    with open_token(shared_rig, "keyd-test") as session:
        public_login_free = {Attribute.PRIVATE: False, **private_only}
        session.generate_keypair(
            pkcs11.KeyType.EC, store=True, id=b"\xdd\x03", label="no-login",
            public_template=ec_params, private_template=public_login_free,
        )  # fmt: skip
        for label in ("twin-a", "twin-b"):
            session.generate_keypair(
                pkcs11.KeyType.EC, store=True, id=b"\xdd\x04", label=label,
                public_template=ec_params, private_template=private_only,
            )  # fmt: skip
    with pytest.raises(FailedPrecondition, match="without the PIN"):
        client.adopt_key(backend="pkcs11", device_label="no-login")
    with pytest.raises(FailedPrecondition, match="shares it with another private key"):
        client.adopt_key(backend="pkcs11", device_label="twin-a")
    with pytest.raises(InvalidArgument, match="no private key"):
        client.adopt_key(backend="pkcs11", device_key_id="0badc0de")
    with pytest.raises(InvalidArgument, match="not hex"):
        client.adopt_key(backend="pkcs11", device_key_id="xyz")
    with pytest.raises(FailedPrecondition, match="cannot adopt"):
        client.adopt_key(backend="store", device_key_id="01")


def test_cli_adopt_and_list(shared_rig: Rig) -> None:
    assert shared_rig.daemon is not None
    shared_rig.hsm.pkcs11_tool(
        "keyd-test", "--keypairgen", "--key-type", "rsa:3072", "--id", "c0ffee02",
        "--label", "ceremony-targets", "--usage-sign",
    )  # fmt: skip
    with open_token(shared_rig, "keyd-test") as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=bytes.fromhex("c0ffee02"))
        if key[Attribute.EXTRACTABLE]:
            key[Attribute.EXTRACTABLE] = False
    socket = str(shared_rig.daemon.socket)
    result = run_keyd(
        "keys", "adopt", "--backend", "pkcs11", "--device-label", "ceremony-targets",
        "--role", "targets", "--socket", socket,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    key_id = result.stdout.strip()
    listed = run_keyd(
        "keys", "list", "--backend", "pkcs11", "--role", "targets", "--socket", socket
    )
    assert key_id in listed.stdout
    assert "pkcs11:hsm" in listed.stdout
    missing = run_keyd("keys", "adopt", "--backend", "pkcs11", "--socket", socket)
    assert missing.returncode == 2
    assert "--id" in missing.stderr


def test_delete_forgets_but_keeps_the_key_on_the_token(shared_rig: Rig, client: Client) -> None:
    record = client.create_key(KeyType.ECDSA_P256, backend="pkcs11")
    client.delete_key(record.key_id)
    client.purge_key(record.key_id)
    with pytest.raises(Exception, match="no key with ID"):
        client.get_key(record.key_id)
    again = client.adopt_key(backend="pkcs11", device_key_id=record.location["cka_id"])
    assert again.key_id == record.key_id
    client.sign(again.key_id, MESSAGE)


def test_destroy_on_device_removes_the_key_from_the_token_at_purge(
    shared_rig: Rig, client: Client
) -> None:
    record = client.create_key(KeyType.ECDSA_P256, backend="pkcs11")
    cka_id = bytes.fromhex(record.location["cka_id"])
    with pytest.raises(InvalidArgument, match="confirm_key_id"):
        client.delete_key(record.key_id, destroy_on_device_confirmed="0" * 64)
    pending = client.delete_key(record.key_id, destroy_on_device_confirmed=record.key_id)
    assert pending.destroy_on_purge
    with open_token(shared_rig, "keyd-test") as session:
        assert list(session.get_objects({Attribute.ID: cka_id}))  # still there while pending
    client.purge_key(record.key_id)
    with open_token(shared_rig, "keyd-test") as session:
        assert list(session.get_objects({Attribute.ID: cka_id})) == []


def test_key_deleted_outside_keyd_is_a_clear_error_without_relogging(
    shared_rig: Rig, client: Client
) -> None:
    record = client.create_key(KeyType.ECDSA_P256, backend="pkcs11")
    client.sign(record.key_id, MESSAGE)
    with open_token(shared_rig, "keyd-test") as session:
        for obj in session.get_objects({Attribute.ID: bytes.fromhex(record.location["cka_id"])}):
            obj.destroy()
    assert shared_rig.daemon is not None
    lost_before = shared_rig.daemon.logs().count("token connection lost")
    for _ in range(5):
        with pytest.raises(FailedPrecondition, match="deleted outside keyd"):
            client.sign(record.key_id, MESSAGE)
    # The token still answers, so keyd believes it: no logout and login per request
    # (one reconnect at most, when a pooled session's cached handle went stale).
    assert shared_rig.daemon.logs().count("token connection lost") - lost_before <= 1
    client.delete_key(record.key_id)


def test_keys_survive_a_restart(rig: Rig) -> None:
    rig.hsm.init_token("persist")
    daemon = rig.start(token_table("hsm", rig.hsm.module, rig.pin_file, label="persist"))
    with daemon.client() as c:
        created = [
            c.create_key(t, backend="pkcs11").key_id for t in (KeyType.ECDSA_P256, KeyType.ED25519)
        ]
    daemon = rig.restart()
    with daemon.client() as c:
        for key_id in created:
            record = c.get_key(key_id)
            sig = c.sign(key_id, MESSAGE)
            independent_verify(record, sig.signature, MESSAGE, sig.encoding)


# -- configuration and bad input ---------------------------------------------------------


def serve_fails(rig: Rig, tables: str) -> str:
    daemon = Daemon(Path(tempfile.mkdtemp(prefix="bad-", dir=rig.root)), env=rig.hsm.env)
    daemon.init()
    daemon.config.write_text(daemon.config.read_text() + tables)
    result = subprocess.run(
        keyd_command("serve", "--config", str(daemon.config)),
        capture_output=True, text=True, timeout=60, env={**os.environ, **rig.hsm.env}, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    return result.stderr


def test_missing_module_refuses_start(rig: Rig) -> None:
    err = serve_fails(
        rig, token_table("hsm", Path("/nonexistent/libp11.so"), rig.pin_file, label="x")
    )
    assert "[pkcs11.hsm] module: /nonexistent/libp11.so does not exist" in err


def test_missing_or_unsafe_pin_file_refuses_start(rig: Rig) -> None:
    err = serve_fails(rig, token_table("hsm", rig.hsm.module, rig.root / "nope.pin", label="x"))
    assert "nope.pin does not exist" in err
    rig.pin_file.chmod(0o644)
    err = serve_fails(rig, token_table("hsm", rig.hsm.module, rig.pin_file, label="x"))
    assert "others could read it" in err
    assert USER_PIN not in err


def test_absent_token_makes_only_its_keys_unavailable(rig: Rig) -> None:
    rig.hsm.init_token("present")
    daemon = rig.start(token_table("hsm", rig.hsm.module, rig.pin_file, label="not-plugged-in"))
    with daemon.client() as c:
        detail = wait_for_backend(c, "pkcs11:hsm", "absent")
        assert "'not-plugged-in'" in detail
        assert "'present'" in detail  # what was found instead
        with pytest.raises(Unavailable, match="not-plugged-in"):
            c.create_key(KeyType.ECDSA_P256, backend="pkcs11")
        store_key = c.create_key(KeyType.ECDSA_P256)
        c.sign(store_key.key_id, MESSAGE)
    result = run_keyd("status", "--socket", str(daemon.socket))
    assert result.returncode == 4  # unhealthy backend
    assert "pkcs11:hsm: UNHEALTHY (absent)" in result.stdout


def test_label_matching_two_tokens_is_ambiguous(rig: Rig) -> None:
    first = rig.hsm.init_token("twin")
    second = rig.hsm.init_token("twin")
    tables = token_table("a", rig.hsm.module, rig.pin_file, label="twin")
    tables += token_table("b", rig.hsm.module, rig.pin_file, label="twin", serial=second)
    daemon = rig.start(tables)
    with daemon.client() as c:
        detail = wait_for_backend(c, "pkcs11:a", "ambiguous")
        assert first in detail
        assert second in detail
        assert "token_serial" in detail
        with pytest.raises(Unavailable, match="matches 2 tokens"):
            c.create_key(KeyType.ECDSA_P256, backend="pkcs11:a")
        # The serial picks one; "pkcs11" alone is ambiguous with two tokens configured.
        wait_for_backend(c, "pkcs11:b", "connected")
        record = c.create_key(KeyType.ECDSA_P256, backend="pkcs11:b")
        assert record.location["token_serial"] == second
        with pytest.raises(InvalidArgument, match="ambiguous"):
            c.create_key(KeyType.ECDSA_P256, backend="pkcs11")


def test_wrong_pin_is_tried_once_and_never_again(rig: Rig) -> None:
    rig.hsm.init_token("pinned")
    daemon = rig.start(token_table("hsm", rig.hsm.module, rig.pin_file, label="pinned"))
    with daemon.client() as c:
        key_id = c.create_key(KeyType.ECDSA_P256, backend="pkcs11").key_id
    assert daemon.stop() == 0
    # Restart with a wrong PIN, through pkcs11-spy, which logs every PKCS#11 call.
    write_pin(rig.pin_file, "000000")
    spy_log = rig.root / "spy.log"
    daemon.config.write_text(
        daemon.config.read_text().replace(
            f'module = "{rig.hsm.module}"', f'module = "{spy_module()}"'
        )
    )
    daemon.start(env={"PKCS11SPY": str(rig.hsm.module), "PKCS11SPY_OUTPUT": str(spy_log)})
    with daemon.client() as c:
        detail = wait_for_backend(c, "pkcs11:hsm", "locked")
        assert "PinIncorrect" in detail
        assert "USER_PIN_COUNT_LOW" in detail  # the token's own flag, read back after the failure
        for _ in range(5):
            with pytest.raises(FailedPrecondition, match="restart keyd"):
                c.sign(key_id, MESSAGE)
            c.status()
        with pytest.raises(FailedPrecondition, match="locked"):
            c.create_key(KeyType.ED25519, backend="pkcs11")
        store_key = c.create_key(KeyType.ED25519)
        c.sign(store_key.key_id, MESSAGE)
    assert daemon.stop() == 0
    logins = [line for line in spy_log.read_text().splitlines() if "C_Login" in line]
    assert len(logins) == 1, logins
    assert "000000" not in daemon.logs()


def test_token_removed_while_serving_then_reinserted(rig: Rig) -> None:
    removable = rig.hsm.init_token("removable")
    rig.hsm.init_token("stays")
    tables = token_table("usb", rig.hsm.module, rig.pin_file, label="removable")
    tables += token_table("fixed", rig.hsm.module, rig.pin_file, label="stays")
    daemon = rig.start(tables)
    with daemon.client() as c:
        wait_for_backend(c, "pkcs11:usb", "connected")
        usb_key = c.create_key(KeyType.ECDSA_P256, backend="pkcs11:usb")
        fixed_key = c.create_key(KeyType.ECDSA_P256, backend="pkcs11:fixed")
        store_key = c.create_key(KeyType.ECDSA_P256)
        for record in (usb_key, fixed_key, store_key):
            c.sign(record.key_id, MESSAGE)

        away = rig.hsm.remove_token(removable)
        with pytest.raises(Unavailable, match="usb"):
            c.sign(usb_key.key_id, MESSAGE)
        wait_for_backend(c, "pkcs11:usb", "absent")
        # The other token on the same module and the store keep serving, even
        # though looking for the missing token reloads the module.
        for _ in range(3):
            for record in (fixed_key, store_key):
                sig = c.sign(record.key_id, MESSAGE)
                independent_verify(record, sig.signature, MESSAGE, sig.encoding)
            time.sleep(0.3)
            with pytest.raises(Unavailable):
                c.sign(usb_key.key_id, MESSAGE)

        rig.hsm.restore_token(away)
        wait_for_backend(c, "pkcs11:usb", "connected")
        sig = c.sign(usb_key.key_id, MESSAGE)
        independent_verify(usb_key, sig.signature, MESSAGE, sig.encoding)
        sig = c.sign(fixed_key.key_id, MESSAGE)
        independent_verify(fixed_key, sig.signature, MESSAGE, sig.encoding)
