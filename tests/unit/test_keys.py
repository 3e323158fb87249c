"""Key IDs (Notary's and the TUF specification's) and public key handling."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from securesystemslib.signer import SSlibKey

from keyd.backends.store import new_private_key
from keyd.core.canonical import encode_canonical
from keyd.core.keys import PublicKey
from keyd.core.keytypes import KeyType
from keyd.errors import InvalidArgument

# Vectors from real Notary output (shared/reference/notary-signer.md, section 3).
NOTARY_ECDSA_PUBLIC = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAErxs9p6IUXJ1J5ZL/qSwXEHad9QJ8kgpNFpOd+HvExEzEyM77/us3"
    "uldg7vfKlDFxXgsYj29gMjP2jpn9DataKA=="
)
NOTARY_ECDSA_ID = "1dbaaf58670fa0a1f8fbe2e57f1dc44c5e1937c3dba96515d5e44777b790d746"
NOTARY_ED25519_PUBLIC = "Su0FhzvhLLUlybaD4YFn17pMLaxm6CeBF7gH1TEDbl0="
NOTARY_ED25519_ID = "5bdf3efa10102522456de689250cc952f2bbc9f7922fc94febdcf95883958a68"


@pytest.fixture(scope="module", params=list(KeyType), ids=lambda t: t.value)
def public(request: pytest.FixtureRequest) -> PublicKey:
    return PublicKey.from_crypto(new_private_key(request.param).public_key())


def test_notary_vector_ecdsa() -> None:
    key = PublicKey.from_notary_bytes(KeyType.ECDSA_P256, base64.b64decode(NOTARY_ECDSA_PUBLIC))
    assert key.notary_key_id == NOTARY_ECDSA_ID
    assert len(key.notary_bytes) == 91


def test_notary_vector_ed25519() -> None:
    key = PublicKey.from_notary_bytes(KeyType.ED25519, base64.b64decode(NOTARY_ED25519_PUBLIC))
    assert key.notary_key_id == NOTARY_ED25519_ID
    assert len(key.notary_bytes) == 32


def test_notary_key_id_matches_the_formula_with_json_module(public: PublicKey) -> None:
    # An independent computation with the json module (sorted, compact).
    doc = {
        "keytype": public.key_type.notary_keytype,
        "keyval": {"private": None, "public": base64.b64encode(public.notary_bytes).decode()},
    }
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert public.notary_key_id == hashlib.sha256(canonical).hexdigest()


def test_tuf_key_id_matches_securesystemslib(public: PublicKey) -> None:
    sslib = SSlibKey.from_crypto(public.key)
    assert public.tuf_key_id == sslib.keyid
    assert public.key_type.tuf_keytype == sslib.keytype
    assert public.key_type.tuf_scheme == sslib.scheme
    assert public.tuf_keyval == sslib.keyval


def test_ids_differ_between_notary_and_tuf(public: PublicKey) -> None:
    assert public.notary_key_id != public.tuf_key_id


def test_round_trip_through_notary_bytes(public: PublicKey) -> None:
    again = PublicKey.from_notary_bytes(public.key_type, public.notary_bytes)
    assert again.notary_key_id == public.notary_key_id
    assert again.pem == public.pem


def test_spki_der_loads_in_cryptography(public: PublicKey) -> None:
    loaded = serialization.load_der_public_key(public.spki_der)
    assert PublicKey.from_crypto(loaded).notary_key_id == public.notary_key_id


def test_canonical_json_escapes_only_quote_and_backslash() -> None:
    assert encode_canonical({"b": "x\ny", "a": 'q"\\', "c": None}) == (
        b'{"a":"q\\"\\\\","b":"x\ny","c":null}'
    )


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP521R1()).public_key(),
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
    ],
    ids=["p521", "rsa2048"],
)
def test_unsupported_public_keys_are_refused(key: object) -> None:
    with pytest.raises(InvalidArgument, match="unsupported"):
        PublicKey.from_crypto(key)


def test_malformed_public_key_bytes() -> None:
    with pytest.raises(InvalidArgument, match="malformed ecdsa-p256 public key"):
        PublicKey.from_notary_bytes(KeyType.ECDSA_P256, b"\x30\x03garbage")
    with pytest.raises(InvalidArgument, match="malformed ed25519"):
        PublicKey.from_notary_bytes(KeyType.ED25519, b"short")


def test_key_type_mismatch_is_refused() -> None:
    p384 = PublicKey.from_crypto(ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(InvalidArgument, match="is ecdsa-p384, not ecdsa-p256"):
        PublicKey.from_notary_bytes(KeyType.ECDSA_P256, p384.notary_bytes)
