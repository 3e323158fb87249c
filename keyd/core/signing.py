"""What is signed (a message or a pre-computed digest) and ECDSA signature encodings."""

from __future__ import annotations

from typing import NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from keyd.core.keytypes import RSA_PSS_SALT_LENGTH, KeyType
from keyd.errors import InvalidArgument

_FIELD_BYTES = {KeyType.ECDSA_P256: 32, KeyType.ECDSA_P384: 48}


class SignInput(NamedTuple):
    """What to sign: a message, or (prehashed) a digest of it.

    A NamedTuple because one is built per signature on the batch path. Its repr
    shows the size only, so a payload never reaches a log line by accident.
    """

    payload: bytes
    prehashed: bool = False

    @classmethod
    def of_message(cls, message: bytes) -> SignInput:
        return cls(message, False)

    @classmethod
    def of_digest(cls, digest: bytes) -> SignInput:
        return cls(digest, True)

    def __repr__(self) -> str:
        kind = "digest" if self.prehashed else "message"
        return f"SignInput({kind} of {len(self.payload)} bytes)"

    def check_for(self, key_type: KeyType) -> None:
        """Raise InvalidArgument when this input cannot be signed by key_type."""
        if not self.prehashed:
            if not self.payload:
                raise InvalidArgument("nothing to sign: the message is empty")
            return
        expected = key_type.digest_size
        if expected is None:
            raise InvalidArgument(
                f"{key_type.value} keys sign the whole message; send the message, not a digest"
            )
        if len(self.payload) != expected:
            name = key_type.hash_algorithm().name
            raise InvalidArgument(
                f"digest is {len(self.payload)} bytes; a {key_type.value} key needs "
                f"a {expected}-byte {name} digest"
            )


# cryptography's algorithm arguments, built once: constructing them per signature
# costs as much as the rest of the request handling.
_HASH_ARGS: dict[tuple[KeyType, bool], hashes.HashAlgorithm | utils.Prehashed] = {
    (t, pre): utils.Prehashed(t.hash_algorithm()) if pre else t.hash_algorithm()
    for t in KeyType
    if t is not KeyType.ED25519
    for pre in (False, True)
}
_ECDSA = {key: ec.ECDSA(arg) for key, arg in _HASH_ARGS.items() if key[0].is_ecdsa}
RSA_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=RSA_PSS_SALT_LENGTH)


def hash_arg(key_type: KeyType, *, prehashed: bool) -> hashes.HashAlgorithm | utils.Prehashed:
    """The hash argument for RSA sign/verify of a message, or of a digest (prehashed)."""
    return _HASH_ARGS[key_type, prehashed]


def ecdsa_algorithm(key_type: KeyType, *, prehashed: bool) -> ec.ECDSA:
    """The ECDSA argument for sign/verify of a message, or of a digest (prehashed)."""
    return _ECDSA[key_type, prehashed]


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
