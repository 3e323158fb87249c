"""Signature encodings, digests and the store backend's signing primitive,
checked against cryptography and securesystemslib as independent verifiers."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from securesystemslib.signer import Signature as SslibSignature
from securesystemslib.signer import SSlibKey

from keyd.backends.store import PrivateKey, new_private_key, sign_with
from keyd.core.keys import PublicKey
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.signing import SignInput, der_to_raw, raw_to_der
from keyd.errors import InvalidArgument

MESSAGE = b"x" * 1024


@pytest.fixture(scope="module", params=list(KeyType), ids=lambda t: t.value)
def key(request: pytest.FixtureRequest) -> tuple[KeyType, PrivateKey]:
    return request.param, new_private_key(request.param)


def test_message_signature_verifies_in_cryptography(key: tuple[KeyType, PrivateKey]) -> None:
    key_type, private = key
    signature = sign_with(private, key_type, SignInput.of_message(MESSAGE))
    public = private.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, MESSAGE)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, MESSAGE, ec.ECDSA(key_type.hash_algorithm()))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        public.verify(signature, MESSAGE, pss, hashes.SHA256())
    # And a different message does not verify.
    assert not PublicKey.from_crypto(public).verify(
        signature, SignInput.of_message(MESSAGE + b"!"), SignatureEncoding.NATIVE.resolve(key_type)
    )


def test_securesystemslib_verifies_store_signatures(key: tuple[KeyType, PrivateKey]) -> None:
    key_type, private = key
    sslib = SSlibKey.from_crypto(private.public_key())
    signature = sign_with(private, key_type, SignInput.of_message(MESSAGE))
    sslib.verify_signature(SslibSignature(sslib.keyid, signature.hex()), MESSAGE)


@pytest.mark.parametrize("key_type", [KeyType.ECDSA_P256, KeyType.ECDSA_P384, KeyType.RSA_3072])
def test_digest_and_message_signatures_are_interchangeable(key_type: KeyType) -> None:
    private = new_private_key(key_type)
    public = PublicKey.from_crypto(private.public_key())
    digest = hashlib.new(key_type.hash_algorithm().name, MESSAGE).digest()
    by_digest = sign_with(private, key_type, SignInput.of_digest(digest))
    # A signature over the digest verifies as a signature over the message.
    assert public.verify(
        by_digest,
        SignInput.of_message(MESSAGE),
        SignatureEncoding.DER if key_type.is_ecdsa else SignatureEncoding.NATIVE,
    )


@pytest.mark.parametrize(
    ("key_type", "length"),
    [
        (KeyType.ECDSA_P256, 31),
        (KeyType.ECDSA_P256, 48),
        (KeyType.ECDSA_P384, 32),
        (KeyType.RSA_3072, 64),
    ],
)
def test_wrong_digest_length_is_refused(key_type: KeyType, length: int) -> None:
    with pytest.raises(InvalidArgument, match=f"digest is {length} bytes"):
        SignInput.of_digest(b"\0" * length).check_for(key_type)


def test_ed25519_refuses_a_digest() -> None:
    with pytest.raises(InvalidArgument, match="send the message, not a digest"):
        SignInput.of_digest(b"\0" * 32).check_for(KeyType.ED25519)


def test_empty_message_is_refused_for_every_key_type() -> None:
    for key_type in KeyType:
        with pytest.raises(InvalidArgument, match="message is empty"):
            SignInput.of_message(b"").check_for(key_type)


def test_sign_input_repr_hides_payload() -> None:
    assert "secret-payload" not in repr(SignInput.of_message(b"secret-payload"))


@pytest.mark.parametrize(("key_type", "size"), [(KeyType.ECDSA_P256, 32), (KeyType.ECDSA_P384, 48)])
def test_raw_encoding_is_fixed_width_and_round_trips(key_type: KeyType, size: int) -> None:
    private = new_private_key(key_type)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    for _ in range(50):  # some r or s values are short: padding must keep the width
        der = sign_with(private, key_type, SignInput.of_message(MESSAGE))
        raw = der_to_raw(der, key_type)
        assert len(raw) == 2 * size
        r, s = utils.decode_dss_signature(der)
        assert raw == r.to_bytes(size, "big") + s.to_bytes(size, "big")
        assert raw_to_der(raw, key_type) == der
    public = PublicKey.from_crypto(private.public_key())
    assert public.verify(raw, SignInput.of_message(MESSAGE), SignatureEncoding.RAW)


def test_raw_signature_of_wrong_length_does_not_verify() -> None:
    private = new_private_key(KeyType.ECDSA_P256)
    public = PublicKey.from_crypto(private.public_key())
    assert not public.verify(b"\1" * 63, SignInput.of_message(MESSAGE), SignatureEncoding.RAW)


@pytest.mark.parametrize("key_type", [KeyType.ED25519, KeyType.RSA_3072])
@pytest.mark.parametrize("encoding", [SignatureEncoding.DER, SignatureEncoding.RAW])
def test_ecdsa_encodings_are_refused_for_other_key_types(
    key_type: KeyType, encoding: SignatureEncoding
) -> None:
    with pytest.raises(InvalidArgument, match="applies to ECDSA keys only"):
        encoding.resolve(key_type)


def test_native_encoding_is_der_for_ecdsa() -> None:
    assert SignatureEncoding.NATIVE.resolve(KeyType.ECDSA_P256) is SignatureEncoding.DER
    assert SignatureEncoding.NATIVE.resolve(KeyType.ED25519) is SignatureEncoding.NATIVE


def test_ed25519_signature_is_over_the_whole_message() -> None:
    private = new_private_key(KeyType.ED25519)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    signature = sign_with(private, KeyType.ED25519, SignInput.of_message(MESSAGE))
    private.public_key().verify(signature, MESSAGE)
    with pytest.raises(InvalidSignature):
        private.public_key().verify(signature, hashlib.sha512(MESSAGE).digest())


def test_unknown_key_type_name() -> None:
    with pytest.raises(InvalidArgument, match="unsupported key type 'dsa'"):
        KeyType.parse("dsa")
