"""A loaded PKCS#11 module (the vendor's .so), shared by every token that uses it.

Two things python-pkcs11 does not do for us:

- It calls C_Initialize(NULL), which tells the module that no thread locking is
  needed, yet it releases the GIL during every call. With SoftHSM2 two threads
  signing on their own sessions then crash the process. Right after loading we
  finalize and initialize again with CKF_OS_LOCKING_OK, through ctypes on the
  same library (dlopen returns the same instance, so python-pkcs11's function
  table stays valid).
- A reload (C_Finalize + C_Initialize, the only way to see a token that was
  removed and reinserted on some modules, SoftHSM2 among them) invalidates every
  session of every token on the module. A reader-writer lock keeps a reload from
  running while any call is in progress; `generation` tells tokens that their
  sessions are gone.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import pkcs11
from pkcs11 import exceptions as p11_errors

from keyd.errors import Unavailable

log = logging.getLogger("keyd.pkcs11")

CKF_OS_LOCKING_OK = 0x2
CKR_OK = 0
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190


class _InitArgs(ctypes.Structure):
    # CK_C_INITIALIZE_ARGS: four mutex callbacks (unused with OS locking), flags, reserved.
    _fields_ = (
        ("mutex_callbacks", ctypes.c_void_p * 4),
        ("flags", ctypes.c_ulong),
        ("reserved", ctypes.c_void_p),
    )


class _SharedLock:
    """Many holders of `shared()` at once, or one holder of `exclusive()`."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Module:
    """One PKCS#11 library, initialised for multi-threaded use."""

    _loaded: ClassVar[dict[Path, Module]] = {}
    _loaded_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        self.generation = 0
        # False after a failed (re)initialisation: calls fail until a reload works.
        self.ready = False
        self._lock = _SharedLock()
        try:
            self.lib = pkcs11.lib(str(path))
            self._ctypes = ctypes.CDLL(str(path))
        except (p11_errors.PKCS11Error, OSError) as exc:
            raise Unavailable(
                f"cannot load PKCS#11 module {path}: {type(exc).__name__} {exc}".rstrip()
            ) from None
        self._initialize_with_locking()

    @classmethod
    def get(cls, path: Path) -> Module:
        """The one Module per library in this process (a library reached through two
        paths, a symlink, is still one: it can be initialised only once)."""
        key = path.resolve()
        with cls._loaded_lock:
            module = cls._loaded.get(key)
            if module is None:
                module = cls._loaded[key] = cls(path)
            return module

    def _initialize_with_locking(self) -> None:
        finalize = self._ctypes.C_Finalize
        initialize = self._ctypes.C_Initialize
        self.ready = False
        rv = finalize(None)
        if rv not in (CKR_OK, CKR_CRYPTOKI_NOT_INITIALIZED):
            raise Unavailable(f"PKCS#11 module {self.path}: C_Finalize failed (CKR 0x{rv:x})")
        args = _InitArgs(flags=CKF_OS_LOCKING_OK)
        rv = initialize(ctypes.byref(args))
        if rv == CKR_OK:
            self.ready = True
        else:
            raise Unavailable(
                f"PKCS#11 module {self.path}: C_Initialize with OS locking failed "
                f"(CKR 0x{rv:x}); is its token directory or configuration present?"
            )

    @contextmanager
    def using(self) -> Iterator[int]:
        """Hold off reloads while calling into the module; yields the generation."""
        with self._lock.shared():
            yield self.generation

    def reload(self, seen_generation: int) -> None:
        """Finalize and initialize again, unless someone already did since
        `seen_generation`. Every session on the module is gone afterwards."""
        with self._lock.exclusive():
            if self.generation != seen_generation:
                return
            self.generation += 1
            log.warning("reloading PKCS#11 module", extra={"pkcs11_module": str(self.path)})
            self._initialize_with_locking()
