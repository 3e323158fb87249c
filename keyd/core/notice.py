"""Word from a backend to the caller while its request is still running.

Today there is one such word: "touch the YubiKey with serial N". The daemon's API
layer listens for the length of each request; a backend calls `touch_needed` right
before a device operation that waits for a touch, and the caller learns it at once
(as gRPC initial metadata), not when the request ends.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token

# Initial-metadata key that carries the notice: the device's name for a human
# ("YubiKey with serial 12345678").
TOUCH_KEY = "keyd-touch"

_listener: ContextVar[Callable[[str], None] | None] = ContextVar("keyd_notice", default=None)


def touch_needed(device: str) -> None:
    """Tell the caller, if anyone listens, that `device` waits for a touch."""
    listener = _listener.get()
    if listener is not None:
        listener(device)


def listen(listener: Callable[[str], None]) -> Token[Callable[[str], None] | None]:
    """Start listening for this request; pass the result to stop(). (A plain token
    rather than a context manager: this runs on every request.)"""
    return _listener.set(listener)


def stop(token: Token[Callable[[str], None] | None]) -> None:
    _listener.reset(token)
