"""Backends hold private keys. Each knows nothing of the others.

`store` keeps online keys in the encrypted database; hardware backends (PKCS#11,
YubiKey) come with their own modules and register under their own names.
"""

from keyd.backends.base import Backend, BackendHealth, GeneratedKey

__all__ = ["Backend", "BackendHealth", "GeneratedKey"]
