"""PKCS#11 objects <-> keyd keys: templates, public keys, signing mechanisms.

Facts this relies on (SoftHSM 2.6 and the PKCS#11 3.0 specification):
- ECDSA is signed with CKM_ECDSA over a digest computed on the host (SoftHSM has
  no hashing ECDSA mechanism); the token returns r||s.
- Ed25519 keys are CKK_EC_EDWARDS with the curve OID as CKA_EC_PARAMS, signed
  with CKM_EDDSA over the whole message.
- RSA-PSS needs its parameters spelt out: SHA-256, MGF1-SHA-256, salt 32.
- CKA_EC_POINT is a DER OCTET STRING around the point; some tokens return the
  bare point, which is told apart by its length.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import MGF, Attribute, Mechanism
from pkcs11 import KeyType as P11KeyType

from keyd.core.keys import PublicKey
from keyd.core.keytypes import RSA_BITS, RSA_PSS_SALT_LENGTH, KeyType
from keyd.core.signing import raw_to_der
from keyd.errors import InvalidArgument

# DER-encoded curve OIDs as CKA_EC_PARAMS holds them.
_P256 = bytes.fromhex("06082a8648ce3d030107")
_P384 = bytes.fromhex("06052b81040022")
_ED25519 = bytes.fromhex("06032b6570")
# Some tokens name the curve instead: PrintableString "edwards25519".
_ED25519_NAMED = bytes.fromhex("130c") + b"edwards25519"

_EC_CURVES: dict[bytes, tuple[KeyType, ec.EllipticCurve]] = {
    _P256: (KeyType.ECDSA_P256, ec.SECP256R1()),
    _P384: (KeyType.ECDSA_P384, ec.SECP384R1()),
}
_EC_PARAMS = {KeyType.ECDSA_P256: _P256, KeyType.ECDSA_P384: _P384, KeyType.ED25519: _ED25519}

# What keyd's keys may do: sign and verify, nothing else; never leave the token.
PRIVATE_TEMPLATE: dict[Attribute, object] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
PUBLIC_TEMPLATE: dict[Attribute, object] = {
    Attribute.TOKEN: True,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
    Attribute.DERIVE: False,
}


def generation_arguments(key_type: KeyType) -> dict[str, object]:
    """Arguments of Session.generate_keypair for a key type (templates apart)."""
    if key_type is KeyType.RSA_3072:
        return {
            "key_type": P11KeyType.RSA,
            "key_length": RSA_BITS,
            "mechanism": Mechanism.RSA_PKCS_KEY_PAIR_GEN,
            "public_template": {**PUBLIC_TEMPLATE, Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"},
        }
    is_ed = key_type is KeyType.ED25519
    return {
        "key_type": P11KeyType.EC_EDWARDS if is_ed else P11KeyType.EC,
        "mechanism": (Mechanism.EC_EDWARDS_KEY_PAIR_GEN if is_ed else Mechanism.EC_KEY_PAIR_GEN),
        "public_template": {**PUBLIC_TEMPLATE, Attribute.EC_PARAMS: _EC_PARAMS[key_type]},
    }


def required_mechanisms(key_type: KeyType) -> tuple[Mechanism, ...]:
    if key_type is KeyType.ED25519:
        return (Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA)
    if key_type is KeyType.RSA_3072:
        return (
            Mechanism.RSA_PKCS_KEY_PAIR_GEN,
            Mechanism.RSA_PKCS_PSS,
            Mechanism.SHA256_RSA_PKCS_PSS,
        )
    return (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA)


def _unwrap_point(data: bytes, raw_length: int) -> bytes:
    """CKA_EC_POINT: a DER OCTET STRING around the point, or the bare point."""
    if len(data) == raw_length:
        return data
    if len(data) >= 2 and data[0] == 0x04:
        length, start = data[1], 2
        if length & 0x80:  # long form: the next (length & 0x7f) bytes give the length
            count = length & 0x7F
            length, start = int.from_bytes(data[2 : 2 + count], "big"), 2 + count
        if len(data) == start + length == start + raw_length:
            return data[start:]
    raise InvalidArgument(f"cannot read the key's CKA_EC_POINT ({len(data)} bytes)")


def public_key_of(obj: pkcs11.Object) -> PublicKey:
    """The public key of a token object, in keyd's terms. Unsupported kinds of key
    (RSA of another size, other curves, other algorithms) and malformed public keys
    raise InvalidArgument."""
    p11_type = obj[Attribute.KEY_TYPE]
    if p11_type not in (P11KeyType.RSA, P11KeyType.EC, P11KeyType.EC_EDWARDS):
        raise InvalidArgument(
            "unsupported key on the token: keyd takes ECDSA P-256/P-384, Ed25519 and RSA-3072"
        )
    try:
        return _public_key_of(obj, p11_type)
    except ValueError as exc:  # cryptography refuses the point or the numbers
        raise InvalidArgument(f"the token's public key is malformed: {exc}") from None


def _public_key_of(obj: pkcs11.Object, p11_type: P11KeyType) -> PublicKey:
    if p11_type == P11KeyType.RSA:
        modulus = int.from_bytes(obj[Attribute.MODULUS], "big")
        exponent = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
        if modulus.bit_length() != RSA_BITS:
            raise InvalidArgument(
                f"the key is RSA-{modulus.bit_length()}; keyd supports RSA-{RSA_BITS}"
            )
        return PublicKey.from_crypto(rsa.RSAPublicNumbers(exponent, modulus).public_key())
    params = bytes(obj[Attribute.EC_PARAMS])
    point = bytes(obj[Attribute.EC_POINT])
    if p11_type == P11KeyType.EC_EDWARDS:
        if params not in (_ED25519, _ED25519_NAMED):
            raise InvalidArgument("the Edwards-curve key is not Ed25519")
        raw = _unwrap_point(point, 32)
        return PublicKey.from_crypto(ed25519.Ed25519PublicKey.from_public_bytes(raw))
    if p11_type == P11KeyType.EC and params in _EC_CURVES:
        key_type, curve = _EC_CURVES[params]
        raw = _unwrap_point(point, 1 + 2 * (key_type.digest_size or 0))
        return PublicKey.from_crypto(ec.EllipticCurvePublicKey.from_encoded_point(curve, raw))
    raise InvalidArgument(
        "unsupported key on the token: keyd takes ECDSA P-256/P-384, Ed25519 and RSA-3072"
    )


_PSS_PARAMS = (Mechanism.SHA256, MGF.SHA256, RSA_PSS_SALT_LENGTH)


@functools.cache
def signer(
    key_type: KeyType, *, prehashed: bool
) -> Callable[[pkcs11.SignMixin, Sequence[bytes]], list[bytes]]:
    """A function signing payloads with a token key; ECDSA results are DER (the
    Backend contract)."""
    if key_type.is_ecdsa:
        hash_function = hashlib.sha256 if key_type is KeyType.ECDSA_P256 else hashlib.sha384

        def sign_ecdsa(key: pkcs11.SignMixin, payloads: Sequence[bytes]) -> list[bytes]:
            digests = payloads if prehashed else [hash_function(p).digest() for p in payloads]
            return [raw_to_der(key.sign(d, mechanism=Mechanism.ECDSA), key_type) for d in digests]

        return sign_ecdsa
    if key_type is KeyType.ED25519:
        return lambda key, payloads: [key.sign(p, mechanism=Mechanism.EDDSA) for p in payloads]
    # RSA-PSS: the token hashes a message itself; a digest is signed as it is.
    mechanism = Mechanism.RSA_PKCS_PSS if prehashed else Mechanism.SHA256_RSA_PKCS_PSS

    def sign_rsa(key: pkcs11.SignMixin, payloads: Sequence[bytes]) -> list[bytes]:
        return [key.sign(p, mechanism=mechanism, mechanism_param=_PSS_PARAMS) for p in payloads]

    return sign_rsa
