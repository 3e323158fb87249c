"""The yubikey backend's pieces that need no card: its configuration, its secret files,
keyd's RSA-PSS padding and the bundled Yubico attestation roots."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from keyd.backends.yubikey import attestation
from keyd.backends.yubikey.backend import load_secrets, load_trust
from keyd.backends.yubikey.piv import pss_encode
from keyd.config import Config, PivPinPolicy, PivTouchPolicy, YubiKeyConfig
from keyd.errors import ConfigError, SecretError

# Yubico's published SHA-256 fingerprints (developers.yubico.com/PKI): a swapped or
# edited bundled certificate fails here rather than being trusted.
YUBICO_FINGERPRINTS = {
    "CN=Yubico PIV Root CA Serial 263751": (
        "63ece914e54dd87915f34033c85af4c0696ba1512f8add66ced738331207b546"
    ),
    "CN=Yubico Attestation Root 1": (
        "62760c6a6ef91679f454c8902b80fd009825b3f25da90f1fbace2ec6586cd5a8"
    ),
    "CN=Yubico Attestation Intermediate A 1": (
        "4698a1d3389c3ec60016c216250f1d0439922832d65142327436376dc2942b55"
    ),
    "CN=Yubico Attestation Intermediate B 1": (
        "d4cc3f456fdaf4e7812a21aab1dfe9d8e27d24e2fd2d6f21c9940109f0daa754"
    ),
    "CN=Yubico PIV Attestation A 1": (
        "6de693f05376f5d8ca29069261e1c8626c75d503bd2edbfd75354cad1f722870"
    ),
    "CN=Yubico PIV Attestation B 1": (
        "2d55b7998f4e42569d6d8fa382b6dc77d1dacf07358b19701163892922b17052"
    ),
    "CN=Yubico PIV Attestation B2 1": (
        "0c90b7d184a36edf50a35f9be935f0c5689bfdcfe5bdd073366cafb49061a440"
    ),
}


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "keyd.toml"
    path.write_text(text)
    return Config.load(path)


def test_a_yubikey_table(tmp_path: Path) -> None:
    (tmp_path / "root.pem").write_text("")
    config = _load(
        tmp_path,
        '[yubikey.ceremony]\nserial = 12345678\nslot = "9C"\n'
        'pin_file = "pin"\nattestation_roots = ["root.pem"]\n'
        'pin_policy = "once"\ntouch_policy = "cached"\n'
        '[yubikey.ceremony.slots]\nroot = "82"\ntargets = "0x83"\n',
    )
    yubikey = config.yubikey["ceremony"]
    assert yubikey.serial == 12345678
    assert yubikey.pin_file == tmp_path / "pin"
    assert yubikey.attestation_roots == (tmp_path / "root.pem",)
    assert yubikey.pin_policy is PivPinPolicy.ONCE
    assert yubikey.touch_policy is PivTouchPolicy.CACHED
    assert yubikey.slot_for("root") == "82"
    assert yubikey.slot_for("targets") == "0x83"
    assert yubikey.slot_for("snapshot") == "9C"
    assert yubikey.min_pin_attempts == 2  # defaults
    assert not yubikey.require_attestation


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("", r"\[yubikey.k\] serial: is required"),
        ("serial = 0\n", r"\[yubikey.k\] serial: 0 is out of range"),
        ('serial = "1"\n', r"\[yubikey.k\] serial: must be int, not str"),
        ('serial = 1\nslot = "9b"\n', r"\[yubikey.k\] slot: '9b' is not a PIV key slot"),
        ('serial = 1\nslot = "f9"\n', r"slot: 'f9' is not a PIV key slot"),
        ('serial = 1\n[yubikey.k.slots]\nroot = "96"\n', r"slots.root: '96' is not a PIV"),
        ("serial = 1\nslots = 3\n", r"slots: must be a table of strings"),
        ('serial = 1\nattestation_roots = "r.pem"\n', r"attestation_roots: must be an array"),
        ('serial = 1\nattestation_roots = ["none.pem"]\n', r"none.pem does not exist"),
        ('serial = 1\npin_policy = "sometimes"\n', r"pin_policy: 'sometimes' is not one of"),
        ("serial = 1\nmin_pin_attempts = 1\n", r"min_pin_attempts: 1 is out of range \(2 to"),
        (
            'serial = 1\n[yubikey.k.slots]\n"no such role!" = "82"\n',
            r"slots.no such role!: invalid",
        ),
        ('serial = 1\npin = "123456"\n', r"\[yubikey.k\] pin: unknown field"),
    ],
)
def test_bad_yubikey_table(tmp_path: Path, table: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        _load(tmp_path, "[yubikey.k]\n" + table)


def _secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_secrets_from_files(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    config = YubiKeyConfig(
        serial=1,
        pin_file=_secret(tmp_path / "pin", "123456\n"),
        management_key_file=_secret(tmp_path / "mgmt", "00" * 24 + "\n"),
    )
    secrets = load_secrets("k", config)
    assert secrets.pin == "123456"
    assert secrets.management_key == bytes(24)


def test_a_pin_file_written_on_windows_is_read(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    config = YubiKeyConfig(serial=1, pin_file=_secret(tmp_path / "pin", "1234567\r\n"))
    assert load_secrets("k", config).pin == "1234567"


def test_without_a_management_key_the_card_keeps_it(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    config = YubiKeyConfig(serial=1, pin_file=_secret(tmp_path / "pin", "123456"))
    assert load_secrets("k", config).management_key is None


def test_secrets_from_systemd_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path.chmod(0o700)
    _secret(tmp_path / "keyd-yubikey-k-pin", "654321")
    _secret(tmp_path / "keyd-yubikey-k-management-key", "11" * 32)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    secrets = load_secrets("k", YubiKeyConfig(serial=1))
    assert secrets.pin == "654321"
    assert secrets.management_key == b"\x11" * 32


@pytest.mark.parametrize(
    ("pin", "key", "mode", "expected"),
    [
        (None, None, 0o600, r"no PIN for YubiKey 'k'.*LoadCredential=keyd-yubikey-k-pin"),
        ("123456", None, 0o644, r"has mode 0644; others could read it"),
        ("123456789", None, 0o600, r"the PIN must be 1 to 8 bytes"),
        ("12345", None, 0o600, r"a PIV PIN is 6 to 8 printable ASCII characters"),
        ("12345\u00e9", None, 0o600, r"a PIV PIN is 6 to 8 printable ASCII characters"),
        ("1234\t56", None, 0o600, r"a PIV PIN is 6 to 8 printable ASCII characters"),
        ("123456", "zz", 0o600, r"the management key must be hex"),
        ("123456", "0102", 0o600, r"must be 16, 24 or 32 bytes"),
    ],
)
def test_bad_secrets_are_refused_without_their_content(
    tmp_path: Path, pin: str | None, key: str | None, mode: int, expected: str
) -> None:
    tmp_path.chmod(0o700)
    config = YubiKeyConfig(
        serial=1,
        pin_file=_secret(tmp_path / "pin", pin, mode) if pin is not None else None,
        management_key_file=_secret(tmp_path / "mgmt", key) if key is not None else None,
    )
    with pytest.raises(SecretError, match=expected) as caught:
        load_secrets("k", config)
    for secret in (pin, key):
        if secret:
            assert secret not in str(caught.value)


def test_secrets_are_not_in_reprs(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    config = YubiKeyConfig(
        serial=1,
        pin_file=_secret(tmp_path / "pin", "735194"),
        management_key_file=_secret(tmp_path / "mgmt", "ab" * 24),
    )
    text = repr(load_secrets("k", config))
    assert "735194" not in text
    assert "ab" * 24 not in text


def test_pss_padding_verifies_with_cryptography() -> None:
    """keyd pads, the card (here: textbook RSA) exponentiates, cryptography verifies."""
    key = rsa.generate_private_key(65537, 3072)
    n, d = key.public_key().public_numbers().n, key.private_numbers().d
    message = b"root.json canonical bytes"
    block = pss_encode(hashlib.sha256(message).digest(), 3071)
    assert len(block) == 384
    signature = pow(int.from_bytes(block, "big"), d, n).to_bytes(384, "big")
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    key.public_key().verify(signature, message, pss, hashes.SHA256())
    # A fresh salt each time: two paddings of one digest differ.
    assert pss_encode(hashlib.sha256(message).digest(), 3071) != block


def test_the_bundled_yubico_certificates_are_the_published_ones() -> None:
    roots, intermediates = load_trust(YubiKeyConfig(serial=1))
    found = {
        c.subject.rfc4514_string(): c.fingerprint(hashes.SHA256()).hex()
        for c in (*roots, *intermediates)
    }
    assert found == YUBICO_FINGERPRINTS
    assert {c.subject.rfc4514_string() for c in roots} == {
        "CN=Yubico PIV Root CA Serial 263751",
        "CN=Yubico Attestation Root 1",
    }


def test_configured_roots_replace_yubicos(tmp_path: Path) -> None:
    bundled, _ = load_trust(YubiKeyConfig(serial=1))
    mine = bundled[0]
    pem = tmp_path / "mine.pem"
    pem.write_bytes(mine.public_bytes(serialization.Encoding.PEM))
    roots, intermediates = load_trust(YubiKeyConfig(serial=1, attestation_roots=(pem,)))
    assert roots == [mine]
    assert intermediates == []
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"bad\.pem: not a readable PEM"):
        load_trust(YubiKeyConfig(serial=1, attestation_roots=(tmp_path / "bad.pem",)))


# -- attestation chains through intermediates (the firmware 5.7.4+ shape) ----------------


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool | None,
    extensions: tuple[tuple[str, bytes], ...] = (),
) -> x509.Certificate:
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    for oid, value in extensions:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _chain(*, intermediate_is_ca: bool) -> tuple[x509.Certificate, ...]:
    """root -> intermediate -> F9 (the card) -> statement for a slot key, serial 4242,
    firmware 5.7.4, PIN policy once, touch always."""
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(4)]
    root = _cert("Test Attestation Root", keys[0], None, ca=True)
    intermediate = _cert(
        "Test PIV Attestation B 1", keys[1], ("Test Attestation Root", keys[0]),
        ca=intermediate_is_ca,
    )  # fmt: skip
    f9 = _cert("Yubico PIV Attestation", keys[2], ("Test PIV Attestation B 1", keys[1]), ca=None)
    statement = _cert(
        "YubiKey PIV Attestation 9c", keys[3], ("Yubico PIV Attestation", keys[2]), ca=None,
        extensions=(
            ("1.3.6.1.4.1.41482.3.3", bytes([5, 7, 4])),
            ("1.3.6.1.4.1.41482.3.7", bytes([0x02, 0x02, 0x10, 0x92])),  # INTEGER 4242
            ("1.3.6.1.4.1.41482.3.8", bytes([2, 2])),  # PIN once, touch always
        ),
    )  # fmt: skip
    return root, intermediate, f9, statement


def test_a_statement_chains_through_intermediates_the_card_does_not_carry() -> None:
    root, intermediate, f9, statement = _chain(intermediate_is_ca=True)
    key = statement.public_key()
    result = attestation.verify(
        statement, f9, key, roots=[root], intermediates=[intermediate], serial=4242,
        pin_policy="once", touch_policy="always",
    )  # fmt: skip
    assert result.verified, result.detail
    assert result.detail == "chains to CN=Test Attestation Root"
    assert (result.serial, result.firmware) == (4242, "5.7.4")
    assert (result.pin_policy, result.touch_policy) == ("once", "always")
    # Without the intermediate there is no way up.
    missing = attestation.verify(statement, f9, key, roots=[root], serial=4242)
    assert not missing.verified
    assert "does not chain to a trusted attestation root" in missing.detail


def test_an_intermediate_that_is_not_a_ca_breaks_the_chain() -> None:
    root, intermediate, f9, statement = _chain(intermediate_is_ca=False)
    result = attestation.verify(
        statement, f9, statement.public_key(), roots=[root], intermediates=[intermediate],
        serial=4242,
    )  # fmt: skip
    assert not result.verified
    # Nor may a root be named that is no CA (here: the intermediate as a "root").
    _, not_a_ca, f9, statement = _chain(intermediate_is_ca=False)
    result = attestation.verify(
        statement, f9, statement.public_key(), roots=[not_a_ca], serial=4242
    )
    assert not result.verified
