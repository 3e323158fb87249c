"""What is signed (a message or a pre-computed digest) and ECDSA signature encodings."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import utils

from keyd.core.keytypes import KeyType
from keyd.errors import InvalidArgument

_FIELD_BYTES = {KeyType.ECDSA_P256: 32, KeyType.ECDSA_P384: 48}


@dataclass(frozen=True)
class SignInput:
    """Exactly one of message or digest. Never logged: repr hides the bytes."""

    message: bytes | None = field(default=None, repr=False)
    digest: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.message is None) == (self.digest is None):
            raise InvalidArgument("send either a message or a digest to sign, not both or neither")
        if self.message is not None and not self.message:
            raise InvalidArgument("nothing to sign: the message is empty")

    @property
    def size(self) -> int:
        return len(self.message if self.message is not None else self.digest or b"")

    def check_for(self, key_type: KeyType) -> None:
        """Raise InvalidArgument when this input cannot be signed by key_type."""
        if self.digest is None:
            return
        expected = key_type.digest_size
        if expected is None:
            raise InvalidArgument(
                f"{key_type.value} keys sign the whole message; send the message, not a digest"
            )
        if len(self.digest) != expected:
            name = key_type.hash_algorithm().name
            raise InvalidArgument(
                f"digest is {len(self.digest)} bytes; a {key_type.value} key needs "
                f"a {expected}-byte {name} digest"
            )

    def message_for(self, key_type: KeyType) -> bytes:
        """The message itself (for Ed25519)."""
        self.check_for(key_type)
        if self.message is None:  # pragma: no cover - check_for rejects digests here
            raise InvalidArgument("a digest cannot be signed by this key type")
        return self.message

    def digest_and_hash(
        self, key_type: KeyType
    ) -> tuple[bytes, hashes.HashAlgorithm | utils.Prehashed]:
        """(data, algorithm) for cryptography's sign/verify of ECDSA and RSA keys."""
        self.check_for(key_type)
        algorithm = key_type.hash_algorithm()
        if self.digest is not None:
            return self.digest, utils.Prehashed(algorithm)
        assert self.message is not None  # noqa: S101 - guaranteed by __post_init__
        return self.message, algorithm

    def digest_for(self, key_type: KeyType) -> bytes:
        """The digest to sign for ECDSA/RSA, hashing the message if needed."""
        data, algorithm = self.digest_and_hash(key_type)
        if isinstance(algorithm, utils.Prehashed):
            return data
        h = hashes.Hash(algorithm)
        h.update(data)
        return h.finalize()


def der_to_raw(signature: bytes, key_type: KeyType) -> bytes:
    """DER ECDSA signature -> r||s, each left-padded to the field size."""
    size = _FIELD_BYTES[key_type]
    r, s = utils.decode_dss_signature(signature)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def raw_to_der(signature: bytes, key_type: KeyType) -> bytes:
    """r||s -> DER. Raises ValueError for a signature of the wrong length."""
    size = _FIELD_BYTES[key_type]
    if len(signature) != 2 * size:
        raise ValueError(f"raw {key_type.value} signature must be {2 * size} bytes")
    r = int.from_bytes(signature[:size], "big")
    s = int.from_bytes(signature[size:], "big")
    return utils.encode_dss_signature(r, s)
