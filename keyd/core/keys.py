"""Public keys, their Notary and TUF-specification key IDs, and verification."""

from __future__ import annotations

import base64
import hashlib
import typing
from dataclasses import dataclass
from functools import cached_property

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyd.core.canonical import CanonicalValue, encode_canonical
from keyd.core.keytypes import RSA_BITS, KeyType, SignatureEncoding
from keyd.core.signing import RSA_PSS, SignInput, ecdsa_algorithm, hash_arg, raw_to_der
from keyd.errors import InvalidArgument

PublicKeyObject = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


@dataclass(frozen=True)
class PublicKey:
    """A public key keyd knows, with the IDs Notary and securesystemslib give it.

    Held as Notary's bytes (DER SubjectPublicKeyInfo, raw 32 bytes for Ed25519);
    the `cryptography` object is parsed on first use, so loading a large catalog
    costs a hash per key, not a curve-point check.
    """

    key_type: KeyType
    notary_bytes: bytes

    @classmethod
    def from_crypto(cls, key: object) -> PublicKey:
        """Wrap a `cryptography` public key; raises InvalidArgument for unsupported keys."""
        key_type = _key_type_of(key)
        public = cls(key_type, _notary_bytes(typing.cast(PublicKeyObject, key)))
        public.__dict__["key"] = key  # prime the cached_property below
        return public

    @classmethod
    def from_notary_bytes(
        cls, key_type: KeyType, data: bytes, *, trusted: bool = False
    ) -> PublicKey:
        """Rebuild a key from Notary's bytes. Untrusted bytes (from a caller) are parsed
        and must be in canonical form now; trusted ones (from the encrypted catalog)
        are parsed when first used."""
        public = cls(key_type, bytes(data))
        if not trusted and _notary_bytes(public.key) != public.notary_bytes:
            raise InvalidArgument(f"{key_type.value} public key is not in canonical form")
        return public

    @cached_property
    def key(self) -> PublicKeyObject:
        """The `cryptography` public key object."""
        key_type, data = self.key_type, self.notary_bytes
        try:
            if key_type is KeyType.ED25519:
                key: object = ed25519.Ed25519PublicKey.from_public_bytes(data)
            else:
                key = serialization.load_der_public_key(data)
        except ValueError as exc:
            raise InvalidArgument(f"malformed {key_type.value} public key: {exc}") from None
        actual = _key_type_of(key)
        if actual is not key_type:
            raise InvalidArgument(f"public key is {actual.value}, not {key_type.value}")
        return typing.cast(PublicKeyObject, key)

    @property
    def pem(self) -> str:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    @property
    def spki_der(self) -> bytes:
        if self.key_type is KeyType.ED25519:
            return _ED25519_SPKI_PREFIX + self.notary_bytes
        return self.notary_bytes

    @cached_property
    def notary_key_id(self) -> str:
        """sha256 of canonical {"keytype", "keyval": {"private": null, "public": b64}}."""
        doc: CanonicalValue = {
            "keytype": self.key_type.notary_keytype,
            "keyval": {
                "private": None,
                "public": base64.b64encode(self.notary_bytes).decode("ascii"),
            },
        }
        return hashlib.sha256(encode_canonical(doc)).hexdigest()

    @property
    def tuf_keyval(self) -> dict[str, str]:
        """keyval as securesystemslib writes it: PEM, or hex of the raw Ed25519 key."""
        if self.key_type is KeyType.ED25519:
            return {"public": self.notary_bytes.hex()}
        return {"public": self.pem}

    @cached_property
    def tuf_key_id(self) -> str:
        """The key ID securesystemslib computes (keytype, scheme, keyval)."""
        doc: CanonicalValue = {
            "keytype": self.key_type.tuf_keytype,
            "scheme": self.key_type.tuf_scheme,
            "keyval": self.tuf_keyval,
        }
        return hashlib.sha256(encode_canonical(doc)).hexdigest()

    def verify(self, signature: bytes, data: SignInput, encoding: SignatureEncoding) -> bool:
        """True when signature is valid for data in the given (resolved) encoding."""
        try:
            self._verify(signature, data, encoding)
        except (InvalidSignature, ValueError):
            return False
        return True

    def _verify(self, signature: bytes, data: SignInput, encoding: SignatureEncoding) -> None:
        data.check_for(self.key_type)
        key = self.key
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data.payload)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if encoding is SignatureEncoding.RAW:
                signature = raw_to_der(signature, self.key_type)
            key.verify(
                signature, data.payload, ecdsa_algorithm(self.key_type, prehashed=data.prehashed)
            )
        else:
            key.verify(
                signature,
                data.payload,
                RSA_PSS,
                hash_arg(self.key_type, prehashed=data.prehashed),
            )


def _key_type_of(key: object) -> KeyType:
    """The key type of a `cryptography` public key; InvalidArgument if keyd has none."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return KeyType.ED25519
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return KeyType.ECDSA_P256
        if isinstance(key.curve, ec.SECP384R1):
            return KeyType.ECDSA_P384
        raise InvalidArgument(f"unsupported elliptic curve {key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size != RSA_BITS:
            raise InvalidArgument(f"unsupported RSA key size {key.key_size}; keyd uses 3072")
        return KeyType.RSA_3072
    raise InvalidArgument(f"unsupported public key type {type(key).__name__}")


def _notary_bytes(key: PublicKeyObject) -> bytes:
    """Notary's public key bytes: raw 32 bytes for Ed25519, DER SPKI otherwise."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
