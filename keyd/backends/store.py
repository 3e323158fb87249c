"""Backend `store`: online keys (timestamp, snapshot) in the encrypted SQLCipher store.

Private keys are generated with `cryptography`, kept as PKCS#8 DER inside the
encrypted database, and cached decrypted in memory after first use so that
unattended signing costs one dictionary lookup plus the signature.
"""

from __future__ import annotations

import logging
import threading
import typing
from collections.abc import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyd.backends.base import Backend, BackendHealth, GeneratedKey
from keyd.core.keys import PublicKey
from keyd.core.keytypes import RSA_BITS, KeyType
from keyd.core.model import KeyRecord
from keyd.core.signing import RSA_PSS, SignInput, ecdsa_algorithm, hash_arg
from keyd.errors import Internal
from keyd.store.catalog import Catalog

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

NAME = "store"

log = logging.getLogger("keyd.store")


def new_private_key(key_type: KeyType) -> PrivateKey:
    if key_type is KeyType.ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.ECDSA_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def sign_with(key: PrivateKey, key_type: KeyType, data: SignInput) -> bytes:
    """Sign one checked input with a `cryptography` private key (DER for ECDSA)."""
    return _sign_many(key, key_type, [data.payload], data.prehashed)[0]


def _sign_many(
    key: PrivateKey, key_type: KeyType, payloads: Sequence[bytes], prehashed: bool
) -> list[bytes]:
    # One comprehension per batch: the per-signature Python cost is what limits
    # batched throughput once the GIL is released inside sign(). Dispatch on the
    # key type (a plain attribute), not isinstance on cryptography's ABCs.
    if key_type.is_ecdsa:
        ec_key = typing.cast(ec.EllipticCurvePrivateKey, key)
        algorithm = ecdsa_algorithm(key_type, prehashed=prehashed)
        return [ec_key.sign(p, algorithm) for p in payloads]
    if key_type is KeyType.ED25519:
        ed_key = typing.cast(ed25519.Ed25519PrivateKey, key)
        return [ed_key.sign(p) for p in payloads]
    rsa_key = typing.cast(rsa.RSAPrivateKey, key)
    hash_argument = hash_arg(key_type, prehashed=prehashed)
    return [rsa_key.sign(p, RSA_PSS, hash_argument) for p in payloads]


def _load(key_id: str, pkcs8: bytes) -> PrivateKey:
    loaded = serialization.load_der_private_key(pkcs8, password=None)
    if not isinstance(loaded, PrivateKey):
        raise Internal(f"store key {key_id} holds an unsupported private key")
    # A row under the wrong ID would sign for another key: check before first use.
    if PublicKey.from_crypto(loaded.public_key()).notary_key_id != key_id:
        raise Internal(f"store key {key_id} does not match its public key")
    return loaded


class StoreBackend(Backend):
    name = NAME
    # Verification of store keys is the daemon's [store] verify_signatures option.
    always_verify = False
    # Signing here is CPU work that releases the GIL; nothing to protect others from.
    max_in_flight = None

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._cache: dict[str, PrivateKey] = {}
        self._load_lock = threading.Lock()

    def generate(self, key_type: KeyType, *, role: str = "", slot: str = "") -> GeneratedKey:
        key = new_private_key(key_type)
        pkcs8 = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),  # the database itself is encrypted
        )
        return GeneratedKey(PublicKey.from_crypto(key.public_key()), private_pkcs8=pkcs8)

    def _private_key(self, record: KeyRecord) -> PrivateKey:
        key = self._cache.get(record.key_id)
        if key is not None:
            return key
        with self._load_lock:
            key = self._cache.get(record.key_id)
            if key is None:
                key = _load(record.key_id, self._catalog.private_pkcs8(record.key_id))
                self._cache[record.key_id] = key
        return key

    def warm_up(self) -> None:
        """Decrypt every store key into the cache, so that no request pays for a
        cold load from the database. Runs in the background after start."""
        for key_id, pkcs8 in self._catalog.all_private_pkcs8():
            if key_id in self._cache:
                continue
            try:
                key = _load(key_id, pkcs8)
            except Internal as exc:
                log.error("store key is unusable", extra={"key_id": key_id, "error": exc.message})
                continue
            with self._load_lock:
                if key_id in self._catalog:  # not deleted meanwhile
                    self._cache.setdefault(key_id, key)

    def sign(self, record: KeyRecord, payloads: Sequence[bytes], *, prehashed: bool) -> list[bytes]:
        return _sign_many(self._private_key(record), record.key_type, payloads, prehashed)

    def delete(self, record: KeyRecord) -> None:
        # The private key went with the catalog row (ON DELETE CASCADE).
        self._cache.pop(record.key_id, None)

    def health(self) -> BackendHealth:
        return BackendHealth(self.name, True)
