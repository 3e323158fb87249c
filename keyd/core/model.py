"""Key records (the catalog's rows) and the validation of their fields."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, unique
from types import MappingProxyType

from keyd.core.keys import PublicKey
from keyd.core.keytypes import KeyType
from keyd.errors import InvalidArgument

_KEY_ID = re.compile(r"[0-9a-f]{64}")
# Roles: root, targets, snapshot, timestamp, or a delegation name (targets/releases).
_ROLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
# Collections (Notary GUNs) look like registry.example.com:5000/team/app.
_COLLECTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}")
_LABEL_KEY = re.compile(r"[a-z0-9][a-z0-9._/-]{0,62}")
MAX_LABELS = 32
MAX_LABEL_VALUE = 256


@unique
class KeyState(Enum):
    ACTIVE = "active"
    # Deleted but restorable until purge_after_unix_ms; cannot sign.
    PENDING_DELETION = "pending_deletion"


def _shown(value: str) -> str:
    """A caller's value quoted for an error message, cut short so errors stay small."""
    return repr(value if len(value) <= 80 else value[:77] + "...")


def check_key_id(key_id: str) -> str:
    if not _KEY_ID.fullmatch(key_id):
        raise InvalidArgument(
            f"malformed key ID {_shown(key_id)}: expected 64 lowercase hex characters "
            "(see `keyd keys list`)"
        )
    return key_id


def check_role(role: str) -> str:
    if role and not _ROLE.fullmatch(role):
        raise InvalidArgument(
            f"invalid role {_shown(role)}: use root, targets, snapshot, timestamp or a "
            "delegation name of letters, digits and . _ / - (at most 128 characters)"
        )
    return role


def check_collection(collection: str) -> str:
    if collection and not _COLLECTION.fullmatch(collection):
        raise InvalidArgument(
            f"invalid collection {_shown(collection)}: use a GUN such as "
            "registry.example.com/team/app (letters, digits and . _ : / -)"
        )
    return collection


def check_labels(labels: Mapping[str, str]) -> Mapping[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels ({len(labels)}); at most {MAX_LABELS}")
    for name, value in labels.items():
        if not _LABEL_KEY.fullmatch(name):
            raise InvalidArgument(
                f"invalid label name {_shown(name)}: lowercase letters, digits and . _ / -, "
                "at most 63 characters"
            )
        if len(value) > MAX_LABEL_VALUE or not value.isprintable():
            raise InvalidArgument(
                f"invalid value for label {name!r}: printable text of at most "
                f"{MAX_LABEL_VALUE} characters"
            )
    return MappingProxyType(dict(labels))


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class KeyRecord:
    """Everything keyd records about one key, wherever its private half lives."""

    public_key: PublicKey
    backend: str
    location: Mapping[str, str] = field(default_factory=dict)
    role: str = ""
    collection: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created_unix_ms: int = 0
    state: KeyState = KeyState.ACTIVE
    # Pending deletion only: when the key is purged, and whether the purge also
    # destroys a hardware key on its device (otherwise keyd only forgets it).
    purge_after_unix_ms: int = 0
    destroy_on_purge: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "location", _frozen(self.location))
        object.__setattr__(self, "labels", _frozen(self.labels))

    @property
    def key_id(self) -> str:
        return self.public_key.notary_key_id

    @property
    def key_type(self) -> KeyType:
        return self.public_key.key_type


@dataclass(frozen=True)
class KeySelector:
    """A list filter: every field that is set must match."""

    role: str = ""
    collection: str = ""
    backend: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def matches(self, record: KeyRecord) -> bool:
        return (
            (not self.role or record.role == self.role)
            and (not self.collection or record.collection == self.collection)
            and (not self.backend or _in_backend(record.backend, self.backend))
            and all(record.labels.get(k) == v for k, v in self.labels.items())
        )


def _in_backend(name: str, wanted: str) -> bool:
    """`pkcs11` selects every `pkcs11:NAME`; a full name selects itself."""
    return name == wanted or name.startswith(wanted + ":")
