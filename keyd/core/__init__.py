"""Core types: key types, public keys and their IDs, signature encodings, key records.

Nothing here does I/O; backends, the daemon and the clients all build on it.
"""

from keyd.core.keys import PublicKey
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.model import KeyRecord, KeySelector, KeyState
from keyd.core.signing import SignInput

__all__ = [
    "KeyRecord",
    "KeySelector",
    "KeyState",
    "KeyType",
    "PublicKey",
    "SignInput",
    "SignatureEncoding",
]
