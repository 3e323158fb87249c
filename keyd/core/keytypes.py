"""Key types and signature encodings, with the names Notary and TUF use for them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, unique

from cryptography.hazmat.primitives import hashes

from keyd.errors import InvalidArgument


@dataclass(frozen=True)
class _KeyTypeInfo:
    notary_keytype: str  # keytype in Notary's key ID and root.json
    notary_method: str  # signature "method" in Notary metadata / Signer.algorithm
    tuf_keytype: str  # securesystemslib SSlibKey.keytype
    tuf_scheme: str  # securesystemslib SSlibKey.scheme
    digest_size: int | None  # bytes of the pre-computed digest; None: signs the whole message


@unique
class KeyType(Enum):
    """An algorithm keyd creates keys for. Values are the CLI/config names."""

    ECDSA_P256 = "ecdsa-p256"
    ED25519 = "ed25519"
    ECDSA_P384 = "ecdsa-p384"
    RSA_3072 = "rsa-3072"

    # Members are singletons compared by identity; object.__hash__ keeps dict
    # lookups on the signing path off Enum's Python-level __hash__.
    __hash__ = object.__hash__

    @property
    def _info(self) -> _KeyTypeInfo:
        return _INFO[self]

    @property
    def notary_keytype(self) -> str:
        return self._info.notary_keytype

    @property
    def notary_method(self) -> str:
        return self._info.notary_method

    @property
    def tuf_keytype(self) -> str:
        return self._info.tuf_keytype

    @property
    def tuf_scheme(self) -> str:
        return self._info.tuf_scheme

    @property
    def is_ecdsa(self) -> bool:
        return self._info.notary_keytype == "ecdsa"

    @property
    def digest_size(self) -> int | None:
        """Length of the digest a caller may send instead of the message, or None."""
        return self._info.digest_size

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        """The hash this key type signs over (RSA-PSS also uses it for MGF1)."""
        if self is KeyType.ECDSA_P384:
            return hashes.SHA384()
        if self is KeyType.ED25519:
            raise InvalidArgument("ed25519 signs the whole message; it has no separate hash")
        return hashes.SHA256()

    @classmethod
    def parse(cls, name: str) -> KeyType:
        try:
            return cls(name)
        except ValueError:
            choices = ", ".join(t.value for t in cls)
            raise InvalidArgument(
                f"unsupported key type {name!r}; choose one of {choices}"
            ) from None


_INFO = {
    KeyType.ECDSA_P256: _KeyTypeInfo("ecdsa", "ecdsa", "ecdsa", "ecdsa-sha2-nistp256", 32),
    KeyType.ED25519: _KeyTypeInfo("ed25519", "eddsa", "ed25519", "ed25519", None),
    KeyType.ECDSA_P384: _KeyTypeInfo("ecdsa", "ecdsa", "ecdsa", "ecdsa-sha2-nistp384", 48),
    KeyType.RSA_3072: _KeyTypeInfo("rsa", "rsapss", "rsa", "rsassa-pss-sha256", 32),
}

RSA_BITS = 3072
RSA_PSS_SALT_LENGTH = 32


@unique
class SignatureEncoding(Enum):
    """How an ECDSA signature is encoded. Ed25519 and RSA have one form only (NATIVE)."""

    NATIVE = "native"  # DER for ECDSA, the only form for the others
    DER = "der"
    RAW = "raw"  # r||s, each left-padded to the curve's field size: what Notary wants

    __hash__ = object.__hash__  # as KeyType

    def resolve(self, key_type: KeyType) -> SignatureEncoding:
        """The concrete encoding for key_type; raises if it does not apply."""
        if key_type.is_ecdsa:
            return SignatureEncoding.DER if self is SignatureEncoding.NATIVE else self
        if self is not SignatureEncoding.NATIVE:
            raise InvalidArgument(
                f"signature encoding {self.value!r} applies to ECDSA keys only; "
                f"{key_type.value} signatures have a single encoding (leave it unset)"
            )
        return self
