"""Word from a backend to the caller while its request is still running.

Today there is one such word: "touch the YubiKey with serial N". The daemon's API
layer listens for the length of each request; a backend calls `touch_needed` right
before a device operation that waits for a touch, and the caller learns it at once
(as gRPC initial metadata), not when the request ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

# Initial-metadata key that carries the notice: the device's name for a human
# ("YubiKey with serial 12345678").
TOUCH_KEY = "keyd-touch"

_listener: ContextVar[Callable[[str], None] | None] = ContextVar("keyd_notice", default=None)


def touch_needed(device: str) -> None:
    """Tell the caller, if anyone listens, that `device` waits for a touch."""
    listener = _listener.get()
    if listener is not None:
        listener(device)


@contextlib.contextmanager
def listening(listener: Callable[[str], None]) -> Iterator[None]:
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
