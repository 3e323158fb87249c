"""Caller identity for gRPC over Unix sockets: a relay that tags each connection.

grpcio gives a handler no peer credentials for a Unix socket, and Python cannot
hand it an accepted connection. So keyd accepts connections on its public sockets
itself, reads SO_PEERCRED (filled in by the kernel at connect time; a client
cannot forge it), and forwards the bytes to the gRPC server on a private
abstract-namespace listener, over an upstream connection bound to a fresh random
abstract name. The name is registered with the caller's identity before the
first byte is forwarded, and gRPC reports it as the connection's peer
(`unix-abstract:NAME`), so a handler finds the caller from context.peer().

Why this is sound:
- the identity comes from the kernel, for the connection the bytes arrive on;
- anyone in keyd's network namespace can connect to the private listener directly,
  but such a connection has an unregistered name (or none) and every RPC on it is
  refused; other namespaces cannot reach abstract names at all;
- names are 128 random bits, bound by keyd before registration: a name that
  another process holds fails to bind and is never registered; a registration is
  removed before its socket closes, so a name freed later and bound by another
  process is not registered.
Measured cost: docs/performance.md ("Caller identity").
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from keyd.core.identity import Caller
from keyd.errors import StartupError

log = logging.getLogger("keyd.peers")

PEER_PREFIX = "keyd-peer-"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Above this much unsent data in one direction, stop reading the other side.
_HIGH_WATER = 1024 * 1024
# Group lists are looked up once per uid for this long (membership rarely changes;
# SIGHUP clears the cache).
_GROUPS_TTL = 60.0


def _abstract(name: str) -> bytes:
    return b"\0" + name.encode("ascii")


class PeerTable:
    """Registered upstream names and the callers they stand for."""

    def __init__(self) -> None:
        self._by_peer: dict[str, Caller] = {}

    def add(self, name: str, caller: Caller) -> None:
        self._by_peer[f"unix-abstract:{name}"] = caller

    def remove(self, name: str) -> None:
        self._by_peer.pop(f"unix-abstract:{name}", None)

    def lookup(self, peer: str) -> Caller | None:
        """The caller behind gRPC's peer string; None for a connection keyd did not relay."""
        return self._by_peer.get(peer)

    def __len__(self) -> int:
        return len(self._by_peer)


class _Groups:
    """uid -> (name, groups of its account), cached briefly."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[float, str, frozenset[int]]] = {}

    def clear(self) -> None:
        self._cache.clear()

    def of(self, uid: int, gid: int) -> tuple[str, frozenset[int]]:
        now = time.monotonic()
        hit = self._cache.get((uid, gid))
        if hit is not None and now - hit[0] < _GROUPS_TTL:
            return hit[1], hit[2]
        try:
            name = pwd.getpwuid(uid).pw_name
            groups = frozenset(os.getgrouplist(name, gid))
        except KeyError:
            name, groups = "", frozenset((gid,))  # no account: its primary gid only
        self._cache[(uid, gid)] = (now, name, groups)
        return name, groups


def _executable(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""  # another user's process, when keyd is not root: "where available"


@dataclass(frozen=True)
class Listener:
    """A public socket and the name its callers are tagged with ("main", "notary")."""

    path: Path
    socket_name: str
    sock: socket.socket


class _Side(asyncio.Protocol):
    """One end of a relayed connection; writes what it reads to its partner."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.transport: asyncio.Transport | None = None
        self.partner: _Side | None = None
        self.pending: list[bytes] = []  # data that arrived before the partner existed
        self.on_connected: Callable[[], object] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - stream sockets only
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER)
        if self.on_connected is not None:
            self.on_connected()

    def data_received(self, data: bytes) -> None:
        partner = self.partner
        if partner is None or partner.transport is None:
            self.pending.append(data)
            return
        partner.transport.write(data)

    def eof_received(self) -> bool:
        self.connection.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.close()

    # Flow control: the partner cannot keep up, so stop reading this side.
    def pause_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.resume_reading()


class _Connection:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.client.partner = self.upstream
        self.upstream.partner = self.client
        self.name = ""
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    def is_open(self) -> bool:
        # A method, not the attribute: the state changes across awaits.
        return not self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # Unregister first: once the upstream socket closes its name is free again.
        if self.name:
            self.relay.peers.remove(self.name)
        self.relay.connections.discard(self)
        for side in (self.upstream, self.client):
            if side.transport is not None:
                side.transport.abort()


class Relay:
    """Accepts on keyd's public sockets and relays each connection, tagged, to gRPC."""

    def __init__(self, listeners: Sequence[Listener]) -> None:
        self.peers = PeerTable()
        self.private_name = f"keyd-grpc-{os.getpid()}-{secrets.token_hex(16)}"
        self._listeners = list(listeners)
        self._groups = _Groups()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="keyd-relay", daemon=True)
        self._servers: list[asyncio.AbstractServer] = []
        self.connections: set[_Connection] = set()

    @property
    def grpc_address(self) -> str:
        """Where the gRPC server must listen (abstract: unreachable from other namespaces)."""
        return f"unix-abstract:{self.private_name}"

    def start(self) -> None:
        started = threading.Event()
        failure: list[BaseException] = []

        async def listen() -> None:
            try:
                for listener in self._listeners:
                    server = await self._loop.create_unix_server(
                        lambda listener=listener: self._accepted(listener),  # type: ignore[misc]
                        sock=listener.sock,
                    )
                    self._servers.append(server)
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
            finally:
                started.set()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(listen(), self._loop)
        started.wait()
        if failure:
            self.stop()
            raise StartupError(f"cannot accept connections: {failure[0]}")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def clear_caches(self) -> None:
        """Forget cached group lists (on SIGHUP), so membership changes take effect."""
        self._loop.call_soon_threadsafe(self._groups.clear)

    def stop_accepting(self) -> None:
        """Close the public sockets; relayed connections carry on (drain)."""

        def close() -> None:
            for server in self._servers:
                server.close()

        self._loop.call_soon_threadsafe(close)

    def stop(self) -> None:
        def shutdown() -> None:
            for server in self._servers:
                server.close()
            for connection in list(self.connections):
                connection.close()
            self._loop.stop()

        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(shutdown)
            self._thread.join(5)
        for listener in self._listeners:
            listener.sock.close()

    # -- per connection (on the relay's loop) ------------------------------------

    def _accepted(self, listener: Listener) -> _Side:
        connection = _Connection(self)
        self.connections.add(connection)

        def open_upstream() -> None:
            # Kept on the connection: the loop holds only weak references to tasks.
            connection.task = self._loop.create_task(
                self._open_upstream(connection, listener.socket_name)
            )

        connection.client.on_connected = open_upstream
        return connection.client

    async def _open_upstream(self, connection: _Connection, socket_name: str) -> None:
        try:
            await self._connect(connection, socket_name)
        except Exception:
            log.exception("cannot relay a connection; it was closed")
            connection.close()
        if connection.closed:
            return
        upstream = connection.upstream
        for data in connection.client.pending:
            assert upstream.transport is not None  # noqa: S101 - connected above
            upstream.transport.write(data)
        connection.client.pending.clear()

    async def _connect(self, connection: _Connection, socket_name: str) -> None:
        transport = connection.client.transport
        if transport is None or not connection.is_open():
            return
        client_sock = transport.get_extra_info("socket")
        pid, uid, gid = _PEERCRED.unpack(
            client_sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        user, groups = self._groups.of(uid, gid)
        caller = Caller(
            uid=uid,
            gid=gid,
            pid=pid,
            groups=groups,
            user=user,
            exe=_executable(pid),
            socket=socket_name,
        )
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            name = _bind_random(upstream)
            connection.name = name
            self.peers.add(name, caller)  # before any byte reaches gRPC
            upstream.setblocking(False)
            await self._loop.sock_connect(upstream, _abstract(self.private_name))
            await self._loop.create_unix_connection(lambda: connection.upstream, sock=upstream)
        except BaseException:
            connection.close()
            upstream.close()
            raise
        if not connection.is_open() and connection.upstream.transport is not None:
            connection.upstream.transport.abort()  # the client left while we connected


def _bind_random(sock: socket.socket) -> str:
    for _ in range(8):
        name = PEER_PREFIX + secrets.token_hex(16)
        try:
            sock.bind(_abstract(name))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue  # someone holds it: never register a name keyd did not bind
            raise
        return name
    raise OSError(errno.EADDRINUSE, "no free abstract name for a relayed connection")


def bind_public_socket(path: Path, socket_name: str) -> Listener:
    """Bind and listen on a public socket (the caller has cleared the path)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    return Listener(path, socket_name, sock)
