"""Canonical JSON as Notary and securesystemslib compute it for key IDs.

Keys sorted, no whitespace, only '"' and '\\' escaped, every other character
written as is. Only the value kinds key IDs need (objects, strings, null).
"""

from __future__ import annotations

from collections.abc import Mapping

CanonicalValue = str | None | Mapping[str, "CanonicalValue"]


def encode_canonical(value: CanonicalValue) -> bytes:
    return _encode(value).encode("utf-8")


def _encode(value: CanonicalValue) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    items = (f"{_encode(k)}:{_encode(value[k])}" for k in sorted(value))
    return "{" + ",".join(items) + "}"
