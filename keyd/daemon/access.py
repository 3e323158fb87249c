"""The gate every keyd.v1 request passes: who is calling, may they, and the record.

    with gate.begin(context, "Sign", Operation.SIGN) as request:
        record = request.manager.get(key_id)
        request.authorize(record)
        ...                       # the work
    # leaving the block appends the audit record (ok, denied or the error kind);
    # if it cannot be written the request fails and its result is never returned

With [access] mode = "open" there is no caller, no policy and no audit: the
gate only picks the manager for the socket.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import TracebackType

import grpc

from keyd.audit import RESULT_DENIED, RESULT_OK, AuditLog
from keyd.core.identity import Caller, Operation
from keyd.core.model import KeyRecord
from keyd.daemon.manager import KeyManager
from keyd.daemon.peers import PeerTable
from keyd.errors import AuditUnavailable, KeydError, PermissionDenied, Unauthenticated
from keyd.policy import KeyTarget, Policy

log = logging.getLogger("keyd.access")

# Stands for a connection keyd did not relay, in the audit log.
_UNKNOWN = Caller(uid=-1, gid=-1, pid=0, groups=frozenset(), socket="unrelayed")
# The result of a change's first record, written before the change (see announce()).
RESULT_STARTED = "started"


class Gate:
    def __init__(
        self,
        managers: Mapping[str, KeyManager],
        *,
        peers: PeerTable | None = None,
        policy: Policy | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        """`managers` maps socket names to the view of keys callers on it get. Without
        `peers` (open mode) every caller gets the "main" view, unchecked, unaudited."""
        if (peers is None) != (policy is None) or (peers is None) != (audit is None):
            raise ValueError("peers, policy and audit go together")
        self._managers = dict(managers)
        self._peers = peers
        self.policy = policy
        self.audit = audit

    @property
    def enforcing(self) -> bool:
        return self._peers is not None

    def begin(self, context: grpc.ServicerContext, method: str, op: Operation | None) -> Request:
        if self._peers is None:
            return Request(self, None, self._managers["main"], method, op)
        caller = self._peers.lookup(context.peer())
        if caller is None:
            request = Request(self, _UNKNOWN, self._managers["main"], method, op)
            request.refuse(
                Unauthenticated(
                    "this connection did not come through keyd's socket, so keyd cannot tell "
                    "who is calling; connect to the socket keyd listens on"
                )
            )
            return request
        return Request(self, caller, self._managers[caller.socket], method, op)


class Request:
    """One RPC's caller, the keys it may reach, and what goes into its audit record."""

    __slots__ = (
        "_gate",
        "_refused",
        "caller",
        "items",
        "key_id",
        "manager",
        "method",
        "operation",
        "payload_sha256",
    )

    def __init__(
        self,
        gate: Gate,
        caller: Caller | None,
        manager: KeyManager,
        method: str,
        op: Operation | None,
    ) -> None:
        self._gate = gate
        self.caller = caller
        self.manager = manager
        self.method = method
        self.operation = op
        self.key_id = ""
        self.payload_sha256 = ""
        # SignBatch: its items (key ID, payload digest, result) for the audit record.
        self.items: list[tuple[str, str, str]] | None = None
        self._refused: KeydError | None = None

    def announce(self) -> None:
        """Record, before a change to keys is made, that it is about to be: a change
        whose outcome record then fails to be written is still in the log. Raises
        AuditUnavailable (nothing was changed)."""
        self._append(RESULT_STARTED)

    def refuse(self, error: KeydError) -> None:
        """Fail the request on entry (after auditing the refusal)."""
        self._refused = error

    def _policy(self) -> tuple[Caller, Policy] | None:
        policy = self._gate.policy
        if policy is None or self.caller is None:
            return None
        return self.caller, policy

    def authorize(self, record: KeyRecord, op: Operation | None = None) -> None:
        """PERMISSION_DENIED unless the policy grants this request's operation on the key."""
        checked = self._policy()
        if checked is not None:
            checked[1].check(checked[0], op or self._operation(), record)

    def authorize_new(
        self, *, backend: str, role: str, collection: str, labels: Mapping[str, str]
    ) -> None:
        """The same, for a key that does not exist yet (create, adopt): judged by the
        attributes it would get, on the backend the request's name stands for."""
        checked = self._policy()
        if checked is not None:
            target = KeyTarget(
                key_id="",
                role=role,
                collection=collection,
                backend=self.manager.backend_name(backend),
                labels=labels,
            )
            checked[1].check(checked[0], self._operation(), target)

    def authorize_any(self) -> None:
        """For requests about no key in particular (status): any grant of the operation."""
        checked = self._policy()
        if checked is not None:
            checked[1].check_any(checked[0], self._operation())

    def allowed(self, record: KeyRecord) -> bool:
        checked = self._policy()
        return checked is None or checked[1].allows(checked[0], self._operation(), record)

    def _operation(self) -> Operation:
        if self.operation is None:
            raise AssertionError(f"{self.method} has no operation to authorize")
        return self.operation

    def __enter__(self) -> Request:
        if self._refused is not None:
            self._write(self._refused)
            raise self._refused
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._refused is None:
            self._write(exc)

    def _write(self, exc: BaseException | None) -> None:
        try:
            if self.items and exc is None:  # an empty or failed batch: the record below
                self._append("", items=self.items)
            else:
                self._append(_result(exc))
        except AuditUnavailable:
            # No record, no result: whatever the request produced is dropped.
            log.error("request refused: the audit log cannot be written", exc_info=False)
            raise

    def _append(self, result: str, *, items: list[tuple[str, str, str]] | None = None) -> None:
        """This request's record: one with `result`, or a batch record of `items`."""
        audit = self._gate.audit
        if audit is None:
            return
        operation = self.operation.value if self.operation is not None else ""
        caller = self.caller or _UNKNOWN
        if items is not None:
            audit.append_batch(caller, self.method, operation, items)
        else:
            item = (self.key_id, self.payload_sha256, result)
            audit.append_items(caller, self.method, operation, [item])


def _result(exc: BaseException | None) -> str:
    if exc is None:
        return RESULT_OK
    if isinstance(exc, PermissionDenied):
        return RESULT_DENIED
    if isinstance(exc, KeydError):
        return type(exc).__name__
    return "Internal"


def item_result(outcome: object) -> str:
    """An audit result for one SignBatch item (a Signature or the error)."""
    return _result(outcome if isinstance(outcome, KeydError) else None)
