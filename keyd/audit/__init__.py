"""The tamper-evident audit log: one hash-chained record per request, signed checkpoints.

Every request, allowed or refused, is recorded before it is answered: who asked
(uid, gid, pid, executable), what for, which key, the SHA-256 of the payload (never
the payload) and the result. Each record carries the hash of the one before it, and
a dedicated Ed25519 key signs the chain head every few seconds, so edits, deletions,
reordering and truncation show up in verify_log(). A record that cannot be written
refuses the request (AuditUnavailable): no signature leaves keyd without its record.

    log = AuditLog.open(directory, signer=key.sign, public_key=raw_public_key)
    log.append(AuditEvent(caller=caller, method="Sign", operation="sign",
                          key_id=key_id, payload_sha256=digest_payload(payload),
                          result=RESULT_OK))
    print(format_report(verify_log(directory, raw_public_key)))

The file format is described in keyd/audit/_format.py.
"""

from keyd.audit._errors import AuditCorrupt, AuditUnavailable
from keyd.audit._format import (
    RESULT_DENIED,
    RESULT_OK,
    AuditEvent,
    OpenReason,
    RecordType,
    checkpoint_message,
    digest_payload,
    key_fingerprint,
)
from keyd.audit._log import DEFAULT_ROTATE_BYTES, AuditLog
from keyd.audit._verify import Problem, ProblemKind, VerifyReport, format_report, verify_log

__all__ = [
    "DEFAULT_ROTATE_BYTES",
    "RESULT_DENIED",
    "RESULT_OK",
    "AuditCorrupt",
    "AuditEvent",
    "AuditLog",
    "AuditUnavailable",
    "OpenReason",
    "Problem",
    "ProblemKind",
    "RecordType",
    "VerifyReport",
    "checkpoint_message",
    "digest_payload",
    "format_report",
    "key_fingerprint",
    "verify_log",
]
