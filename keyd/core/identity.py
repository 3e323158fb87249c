"""Who is calling: the OS identity of the process on the other end of the socket.

Built by the daemon from SO_PEERCRED when a connection is accepted (never from
anything the client sends), then used by the policy and the audit log.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, unique


@unique
class Operation(Enum):
    """What a request does, as the policy grants it."""

    CREATE = "create"  # CreateKey, AdoptKey
    SIGN = "sign"  # Sign, SignBatch
    LIST = "list"  # GetKey, ListKeys, GetStatus
    DELETE = "delete"  # DeleteKey (to pending deletion), RestoreKey
    ADMIN = "admin"  # PurgeKey, destroying a key on its device


@dataclass(frozen=True)
class Caller:
    """A connected client process, as the kernel reported it at connect time."""

    uid: int
    gid: int
    pid: int
    # The primary gid and the supplementary groups of the uid's account.
    groups: frozenset[int]
    # The user's name, when the account exists (for messages and the audit log).
    user: str = ""
    # /proc/PID/exe at connect time, when keyd may read it.
    exe: str = ""
    # Which of keyd's sockets the connection came through ("main" or "notary").
    socket: str = "main"

    def describe(self) -> str:
        """How errors and logs name the caller: `uid 1001 (ci), pid 4242`."""
        who = f"uid {self.uid} ({self.user})" if self.user else f"uid {self.uid}"
        return f"{who}, pid {self.pid}"
