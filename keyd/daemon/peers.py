"""Caller identity for gRPC over Unix sockets: the daemon's side of the relay.

grpcio gives a handler no peer credentials for a Unix socket, and Python cannot
hand it an accepted connection. So a relay process (keyd.daemon.relay) accepts
connections on keyd's public sockets, reads SO_PEERCRED (filled in by the kernel
at connect time; a client cannot forge it), and forwards the bytes to the gRPC
server on a private abstract-namespace listener, over an upstream connection
bound to a fresh random abstract name. The daemon registers name -> caller (and
acknowledges) before the relay forwards a byte; gRPC reports the name as the
connection's peer (`unix-abstract:NAME`), so a handler finds its caller from
context.peer().

Why this is sound:
- the identity comes from the kernel, for the connection the bytes arrive on;
- anyone in keyd's network namespace can connect to the private listener directly,
  but such a connection has an unregistered name (or none) and every RPC on it is
  refused; other namespaces cannot reach abstract names at all (keyd.service has
  PrivateNetwork=yes, so nothing else shares its namespace);
- names are 128 random bits, bound by the relay before registration: a name that
  another process holds fails to bind and is never registered; a registration is
  removed (acknowledged) before its socket closes, so a name freed later and
  bound by another process is not registered.
Measured cost: docs/performance.md ("Caller identity").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from keyd.core.identity import Caller
from keyd.daemon import relay
from keyd.errors import StartupError

log = logging.getLogger("keyd.peers")

_START_TIMEOUT = 30.0


class PeerTable:
    """Registered upstream names and the callers they stand for."""

    def __init__(self) -> None:
        self._by_peer: dict[str, Caller] = {}

    def add(self, name: str, caller: Caller) -> None:
        self._by_peer[f"unix-abstract:{name}"] = caller

    def remove(self, name: str) -> None:
        self._by_peer.pop(f"unix-abstract:{name}", None)

    def clear(self) -> None:
        self._by_peer.clear()

    def lookup(self, peer: str) -> Caller | None:
        """The caller behind gRPC's peer string; None for a connection keyd did not relay."""
        return self._by_peer.get(peer)


@dataclass(frozen=True)
class Listener:
    """A public socket and the name its callers are tagged with ("main", "notary")."""

    socket_name: str
    sock: socket.socket


def bind_public_socket(path: Path, socket_name: str) -> Listener:
    """Bind and listen on a public socket (the caller has cleared the path)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    return Listener(socket_name, sock)


class RelayProcess:
    """Runs keyd.daemon.relay as a child process and keeps the peer table for it."""

    def __init__(self, listeners: Sequence[Listener], on_exit: Callable[[], None]) -> None:
        self.peers = PeerTable()
        self.private_name = f"keyd-grpc-{os.getpid()}-{secrets.token_hex(16)}"
        self._listeners = list(listeners)
        self._on_exit = on_exit  # called if the relay dies while keyd runs
        self._control, self._child_end = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
        )
        self._lines = self._control.makefile("rb")
        self._send_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def grpc_address(self) -> str:
        """Where the gRPC server must listen (abstract: unreachable from other namespaces)."""
        return f"unix-abstract:{self.private_name}"

    def start(self) -> None:
        fds = [self._child_end.fileno(), *(listener.sock.fileno() for listener in self._listeners)]
        args = [str(self._child_end.fileno()), self.private_name]
        args += [f"{listener.sock.fileno()}:{listener.socket_name}" for listener in self._listeners]
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "keyd.daemon.relay", *args], pass_fds=fds
            )
        except OSError as exc:
            raise StartupError(f"cannot start keyd's relay process: {exc.strerror}") from None
        # The child holds its own copies now.
        self._child_end.close()
        for listener in self._listeners:
            listener.sock.close()
        self._control.settimeout(_START_TIMEOUT)
        try:
            ready = self._lines.readline(relay.CONTROL_MAX)
        except OSError:
            ready = b""
        self._control.settimeout(None)
        if ready != relay.READY + b"\n":
            self.stop()
            raise StartupError("keyd's relay process did not start; see the log above")
        self._thread = threading.Thread(target=self._serve, name="keyd-relay-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """Register and unregister names as the relay asks; acknowledge each in order."""
        try:
            self._serve_lines()
        finally:
            # No relay, no identities: forget every name before anything can reuse one.
            self.peers.clear()
        if not self._stopping:
            log.error("keyd's relay process is gone: no caller can be identified; stopping")
            self._on_exit()

    def _serve_lines(self) -> None:
        while True:
            try:
                line = self._lines.readline(relay.CONTROL_MAX)
            except (OSError, ValueError):  # ValueError: closed by stop()
                return
            if not line:
                return
            if not line.endswith(b"\n"):
                log.error("relay control line too long or cut short; stopping")
                return
            kind, body = line[:1], line[1:-1]
            try:
                if kind == relay.ADD:
                    name = self._add(body)
                elif kind == relay.REMOVE:
                    name = body.decode("ascii")
                    self.peers.remove(name)
                else:
                    raise ValueError(f"unknown message {kind!r}")
                self._send(relay.ACK + kind + name.encode("ascii"))
            except Exception:
                log.exception("bad message from the relay process; stopping")
                return

    def _add(self, body: bytes) -> str:
        data = json.loads(body)
        name = str(data["name"])
        if not name.startswith(relay.PEER_PREFIX):
            raise ValueError("not a relay name")
        self.peers.add(
            name,
            Caller(
                uid=int(data["uid"]),
                gid=int(data["gid"]),
                pid=int(data["pid"]),
                groups=frozenset(int(g) for g in data["groups"]),
                user=str(data["user"]),
                exe=str(data["exe"]),
                socket=str(data["socket"]),
            ),
        )
        return name

    def clear_caches(self) -> None:
        """Forget cached group lists (on SIGHUP), so membership changes take effect."""
        self._send(relay.CLEAR_CACHES)

    def stop_accepting(self) -> None:
        """Close the public sockets; relayed connections carry on (drain)."""
        self._send(relay.STOP_ACCEPTING)

    def _send(self, message: bytes) -> None:
        # One line at a time: acknowledgements and commands come from two threads.
        with self._send_lock, contextlib.suppress(OSError):  # if the relay is gone,
            self._control.sendall(message + b"\n")  # _serve reports it

    def stop(self) -> None:
        self._stopping = True
        # shutdown, not just close: it wakes _serve's recv and the relay sees EOF, on
        # which it exits.
        with contextlib.suppress(OSError):
            self._control.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)  # it sees EOF now; then nothing reads _lines any more
        self._lines.close()
        self._control.close()
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
