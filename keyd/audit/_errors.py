"""The audit log's two failures: it cannot be written now, or it cannot be trusted.

AuditUnavailable lives in keyd.errors (the daemon maps it to UNAVAILABLE and
clients catch it); it is re-exported here so the audit API is in one place.
"""

from __future__ import annotations

from keyd.errors import AuditUnavailable, KeydError

__all__ = ["AuditCorrupt", "AuditUnavailable"]


class AuditCorrupt(KeydError):
    """The existing log is damaged, cut short or replaced; keyd will not add to it.

    keyd never repairs a log itself: the message says what was found and how to
    check and recover by hand.
    """
