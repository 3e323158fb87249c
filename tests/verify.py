"""Signature checks that use only `cryptography`, never keyd's own verification."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from keyd.core.keytypes import SignatureEncoding
from keyd.core.model import KeyRecord


def independent_verify(
    record: KeyRecord, signature: bytes, message: bytes, encoding: SignatureEncoding
) -> None:
    """Verify with cryptography only, from the PEM the daemon reported."""
    public = serialization.load_pem_public_key(record.public_key.pem.encode())
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, message)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        if encoding is SignatureEncoding.RAW:
            half = len(signature) // 2
            signature = utils.encode_dss_signature(
                int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
            )
        algorithm = hashes.SHA384() if isinstance(public.curve, ec.SECP384R1) else hashes.SHA256()
        public.verify(signature, message, ec.ECDSA(algorithm))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        public.verify(signature, message, pss, hashes.SHA256())
