"""One configured token: finding it, logging in once, a pool of sessions, recovery.

States: CONNECTED (logged in), ABSENT (no token matches; retried at most every
`reconnect_seconds`), AMBIGUOUS (several match: a configuration problem, also
retried), LOCKED (the PIN was refused: never retried by keyd, because every try
can burn one of the token's PIN attempts; an operator fixes the PIN and restarts).

PKCS#11 login is per token and process, not per session, and closing the session
that logged in logs every other session out. So one long-lived session holds the
login and worker sessions are opened without a PIN (a few µs each).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, unique
from typing import TypeVar

import pkcs11
from pkcs11 import ObjectClass, TokenFlag
from pkcs11 import exceptions as p11_errors

from keyd.backends.pkcs11.module import Module
from keyd.config import Pkcs11TokenConfig
from keyd.errors import FailedPrecondition, KeydError, SecretError, Unavailable

log = logging.getLogger("keyd.pkcs11")

T = TypeVar("T")

# Errors that mean the session, the login or the token itself is gone: drop the
# connection, reconnect, and try the operation once more.
CONNECTION_LOST: tuple[type[Exception], ...] = (
    p11_errors.TokenNotPresent,
    p11_errors.TokenNotRecognised,
    p11_errors.DeviceRemoved,
    p11_errors.DeviceError,
    p11_errors.SessionClosed,
    p11_errors.SessionHandleInvalid,
    p11_errors.ObjectHandleInvalid,
    p11_errors.KeyHandleInvalid,
    p11_errors.UserNotLoggedIn,
    p11_errors.GeneralError,
    p11_errors.FunctionFailed,
)
SESSION_WAIT_SECONDS = 30.0
_PIN_FLAGS = (TokenFlag.USER_PIN_COUNT_LOW, TokenFlag.USER_PIN_FINAL_TRY, TokenFlag.USER_PIN_LOCKED)


@unique
class TokenState(Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    ABSENT = "absent"
    AMBIGUOUS = "ambiguous"
    LOCKED = "locked"


@dataclass(frozen=True)
class TokenFacts:
    """What the token says about itself (read when connecting)."""

    label: str
    serial: str
    manufacturer: str
    model: str
    flags: TokenFlag

    def pin_warnings(self) -> list[str]:
        return [flag.name or "" for flag in _PIN_FLAGS if flag in self.flags]


def _facts(token: pkcs11.Token) -> TokenFacts:
    return TokenFacts(
        label=token.label.strip(),
        serial=token.serial.decode("ascii", "replace").strip(),
        manufacturer=token.manufacturer_id.strip(),
        model=token.model.strip(),
        flags=TokenFlag(token.flags),
    )


class _Lost(Exception):
    """The session or token went away during an attempt (internal to Token.run)."""


class WorkerSession:
    """A session without its own login, and the private keys it has found."""

    def __init__(self, session: pkcs11.Session) -> None:
        self.session = session
        self._keys: dict[bytes, pkcs11.SignMixin] = {}

    def private_key(self, cka_id: bytes) -> pkcs11.SignMixin:
        # Finding an object costs ~0.25 ms; handles stay valid for the session's life.
        key = self._keys.get(cka_id)
        if key is None:
            found = self.session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=cka_id)
            key = self._keys[cka_id] = typing.cast(pkcs11.SignMixin, found)
        return key

    def close(self) -> None:
        with contextlib.suppress(p11_errors.PKCS11Error):  # gone with the token or module
            self.session.close()


class _Connection:
    """A logged-in token: the login session and idle worker sessions."""

    def __init__(self, token: pkcs11.Token, login: pkcs11.Session, generation: int) -> None:
        self.token = token
        self.generation = generation
        self._login = login
        self._idle: list[WorkerSession] = []
        self._lock = threading.Lock()
        self.lost = False

    def take(self) -> WorkerSession:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return WorkerSession(self.token.open())

    def give(self, session: WorkerSession, keep: int) -> None:
        with self._lock:
            if not self.lost and len(self._idle) < keep:
                self._idle.append(session)
                return
        session.close()

    def close(self, *, stale: bool) -> None:
        """Close the sessions; a stale connection (the module was reloaded since)
        only forgets them, since its handle numbers may belong to new sessions now."""
        with self._lock:
            if self.lost:  # closed already: its handles may belong to new sessions now
                return
            self.lost = True
            idle, self._idle = self._idle, []
        if stale:
            return
        for session in idle:
            session.close()
        with contextlib.suppress(p11_errors.PKCS11Error):
            self._login.close()


class Token:
    """A configured token, connected on demand and reconnected after a loss."""

    def __init__(self, name: str, config: Pkcs11TokenConfig, read_pin: Callable[[], str]) -> None:
        self.name = name
        self.config = config
        self._read_pin = read_pin
        self._module: Module | None = None
        self._conn: _Connection | None = None
        self._connect_lock = threading.Lock()
        # One slot per session: requests beyond them wait here (the daemon bounds how many).
        self._slots = threading.BoundedSemaphore(config.sessions)
        self._not_before = 0.0  # monotonic time before which no reconnect is tried
        self.state = TokenState.CONNECTING
        self.detail = "not connected yet"
        self.facts: TokenFacts | None = None

    # -- what others ask ---------------------------------------------------------

    def describe(self) -> str:
        wanted = []
        if self.config.token_label:
            wanted.append(f"label {self.config.token_label!r}")
        if self.config.token_serial:
            wanted.append(f"serial {self.config.token_serial!r}")
        return f"PKCS#11 token {self.name!r} ({' and '.join(wanted)})"

    def run(self, operation: Callable[[WorkerSession], T], *, rw: bool = False) -> T:
        """Run `operation` on a session of this token, reconnecting once if the
        session or the token was lost. Raises Unavailable when the token is absent,
        FailedPrecondition when it is locked."""
        reason = ""
        for attempt in (1, 2):
            conn = self._connection()
            if not self._slots.acquire(timeout=SESSION_WAIT_SECONDS):
                raise Unavailable(
                    f"{self.describe()} is busy: all {self.config.sessions} sessions stayed in use "
                    f"for {SESSION_WAIT_SECONDS:.0f} s"
                )
            try:
                return self._attempt(conn, operation, rw, retry=attempt == 1)
            except _Lost as lost:
                # Handled outside the module's shared lock: reconnecting may reload it.
                reason = str(lost)
            finally:
                self._slots.release()
            self._lose(conn, reason)
        raise Unavailable(f"{self.describe()} failed twice in a row ({reason}); check the device")

    def _attempt(
        self, conn: _Connection, operation: Callable[[WorkerSession], T], rw: bool, *, retry: bool
    ) -> T:
        with self._require_module().using() as generation:
            if generation != conn.generation:
                raise _Lost("the module was reloaded")
            if conn.lost:
                raise _Lost("another request lost the connection")
            try:
                session = WorkerSession(conn.token.open(rw=True)) if rw else conn.take()
            except CONNECTION_LOST as exc:
                raise _Lost(type(exc).__name__) from None
            try:
                result = operation(session)
            except CONNECTION_LOST as exc:
                session.close()
                raise _Lost(type(exc).__name__) from None
            except p11_errors.NoSuchKey:
                self._release(conn, session, rw)
                # A removed token shows no keys to a new session (SoftHSM); only a token
                # that still answers is believed, else reconnect once. A key that is
                # really missing must not log the whole token out on every request.
                if retry and not self._answers(conn):
                    raise _Lost("the token does not answer") from None
                raise
            except BaseException:
                self._release(conn, session, rw)
                raise
            self._release(conn, session, rw)
            return result

    @staticmethod
    def _answers(conn: _Connection) -> bool:
        try:
            conn.token.slot.get_token()
        except p11_errors.PKCS11Error:
            return False
        return True

    def check(self) -> None:
        """Probe the token (status requests): notice a removal, try to reconnect."""
        conn = self._conn
        if conn is not None:
            reason = ""
            with self._require_module().using() as generation:
                if generation != conn.generation or conn.lost:
                    reason = "the module was reloaded"
                else:
                    try:
                        self.facts = _facts(conn.token.slot.get_token())
                    except p11_errors.PKCS11Error as exc:
                        reason = type(exc).__name__
            if not reason:
                return
            self._lose(conn, reason)
        if self._connect_lock.locked():
            return  # a (re)connect is under way; status must not wait for a slow token
        with contextlib.suppress(KeydError):  # the state and detail say why
            self._connection()

    def close(self) -> None:
        with self._connect_lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                with self._require_module().using() as generation:
                    conn.close(stale=generation != conn.generation)

    # -- connecting ---------------------------------------------------------------

    def _release(self, conn: _Connection, session: WorkerSession, rw: bool) -> None:
        if rw:
            session.close()
        else:
            conn.give(session, keep=self.config.sessions)

    def _require_module(self) -> Module:
        if self._module is None:
            self._module = Module.get(self.config.module)
        return self._module

    def _lose(self, conn: _Connection, why: str) -> None:
        with self._connect_lock:
            if self._conn is conn:
                log.warning("token connection lost", extra={"token": self.name, "reason": why})
                self._conn = None
                self._not_before = 0.0  # it was there a moment ago: reconnect at once
            with self._require_module().using() as generation:
                conn.close(stale=generation != conn.generation)

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.lost:
            return conn
        with self._connect_lock:
            if self._conn is not None and not self._conn.lost:
                return self._conn
            if self.state is TokenState.LOCKED:
                raise FailedPrecondition(self._locked_message())
            if time.monotonic() < self._not_before:
                raise Unavailable(self.detail)
            try:
                self._conn = self._connect()
            except KeydError as exc:
                if not isinstance(exc, FailedPrecondition):  # _locked wrote the detail
                    self.detail = exc.message
                self._not_before = time.monotonic() + self.config.reconnect_seconds
                raise
            return self._conn

    def _locked_message(self) -> str:
        return (
            f"{self.describe()} is locked: {self.detail}. keyd does not retry a refused "
            "PIN; fix the PIN file and restart keyd"
        )

    def _connect(self) -> _Connection:
        try:
            return self._find_and_log_in()
        except p11_errors.PKCS11Error as exc:  # anything the steps below did not expect
            self.state = TokenState.ABSENT
            raise Unavailable(f"{self.describe()} cannot be used ({type(exc).__name__})") from None

    def _find_and_log_in(self) -> _Connection:
        try:
            module = self._require_module()
        except Unavailable:
            self.state = TokenState.ABSENT
            raise
        try:
            pin = self._read_pin()
        except SecretError as exc:  # the PIN file changed since start; retried later
            raise Unavailable(f"{self.describe()}: cannot read its PIN: {exc.message}") from None
        token, found_in = self._find(module, reload_if_missing=True)
        with module.using() as generation:
            if generation != found_in:  # reloaded meanwhile: slot IDs may have changed
                raise Unavailable(f"{self.describe()}: the module was reloaded; retry")
            facts = _facts(token)
            # A session without the PIN first: failures here are the token's, and safe
            # to retry. After that, any failure to log in counts as a refused PIN and is
            # never retried (some modules report a wrong PIN as a general failure, and
            # each try may cost one of the token's PIN attempts).
            try:
                probe = token.open()
            except p11_errors.PKCS11Error as exc:
                self.state = TokenState.ABSENT
                raise Unavailable(
                    f"{self.describe()} cannot open a session ({type(exc).__name__})"
                ) from None
            try:
                login = token.open(user_pin=pin)
            except p11_errors.UserAlreadyLoggedIn:
                # A previous connection of this process still holds the login, which
                # sessions without a PIN share.
                login = token.open()
            except p11_errors.PKCS11Error as exc:
                with contextlib.suppress(p11_errors.PKCS11Error):
                    probe.close()
                return self._locked(token, facts, exc)
        self.facts = facts
        self.state = TokenState.CONNECTED
        self.detail = f"connected to token {facts.label!r}, serial {facts.serial}"
        log.info(
            "token connected",
            extra={"token": self.name, "label": facts.label, "serial": facts.serial},
        )
        conn = _Connection(token, login, generation)
        conn.give(WorkerSession(probe), keep=self.config.sessions)
        return conn

    def _locked(self, token: pkcs11.Token, facts: TokenFacts, exc: Exception) -> _Connection:
        with contextlib.suppress(p11_errors.PKCS11Error):
            facts = _facts(token.slot.get_token())  # the flags after the failure
        self.facts = facts
        self.state = TokenState.LOCKED
        warnings = facts.pin_warnings()
        self.detail = f"the token refused the PIN ({type(exc).__name__})" + (
            f"; token flags: {', '.join(warnings)}" if warnings else ""
        )
        log.error(
            "token refused the PIN; not retrying", extra={"token": self.name, "flags": warnings}
        )
        raise FailedPrecondition(self._locked_message())

    def _find(self, module: Module, *, reload_if_missing: bool) -> tuple[pkcs11.Token, int]:
        """The one token matching the configuration, and the module generation it was
        found in. Some modules (SoftHSM2) see a token that came back only after a
        reload, so one reload is tried."""
        with module.using() as generation:
            found: list[pkcs11.Token] = []
            error = ""
            if module.ready:
                try:
                    found = list(module.lib.get_tokens())
                except p11_errors.PKCS11Error as exc:
                    error = type(exc).__name__
            matches = [t for t in found if self._matches(t)]
        if not matches and reload_if_missing:
            try:
                module.reload(generation)
            except Unavailable as exc:
                self.state = TokenState.ABSENT
                raise Unavailable(f"{self.describe()} is not present: {exc.message}") from None
            return self._find(module, reload_if_missing=False)
        if len(matches) == 1:
            return matches[0], generation
        seen = ", ".join(
            f"{t.label.strip()!r} (serial {t.serial.decode('ascii', 'replace').strip()})"
            for t in found
        )
        if matches:
            self.state = TokenState.AMBIGUOUS
            raise Unavailable(
                f"{self.describe()} matches {len(matches)} tokens: {seen}. Set token_serial "
                "to choose one"
            )
        self.state = TokenState.ABSENT
        listed = f"tokens present: {seen}" if seen else "no tokens present"
        if error:
            listed = f"the module could not list tokens ({error})"
        raise Unavailable(f"{self.describe()} is not present ({listed})")

    def _matches(self, token: pkcs11.Token) -> bool:
        label, serial = self.config.token_label, self.config.token_serial
        return (not label or token.label.strip() == label) and (
            not serial or token.serial.decode("ascii", "replace").strip() == serial
        )
