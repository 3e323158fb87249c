"""The relay process: accepts keyd's public sockets and tags every connection.

Started by the daemon (keyd.daemon.peers.RelayProcess) with the listening sockets
and a control socket as inherited file descriptors. For each connection it reads
SO_PEERCRED (filled in by the kernel at connect time; a client cannot forge it),
binds a fresh upstream socket to a random abstract name, has the daemon register
name -> caller and waits for its acknowledgement, and only then connects to the
daemon's private gRPC listener and forwards bytes both ways. gRPC reports the
upstream name as the connection's peer, so a handler finds its caller. When a
connection ends, the name is unregistered (acknowledged) before its socket
closes, so nobody can later bind the freed name and inherit the identity.

A separate process, so relaying costs the daemon's interpreter nothing per call
(docs/performance.md, "Caller identity"). It exits when the daemon goes away.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pwd
import resource
import secrets
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable

PEER_PREFIX = "keyd-peer-"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Above this much unsent data in one direction, stop reading the other side.
_HIGH_WATER = 1024 * 1024
# Group lists are looked up once per uid for this long (membership rarely changes;
# a policy reload clears the cache).
_GROUPS_TTL = 60.0
# Connections relayed at once; more are closed at once. Each costs three descriptors
# (two here, one in the daemon): see raise_fd_limit.
MAX_CONNECTIONS = 8192
# Control messages, one line each on a stream socket (whose flow control asyncio
# handles well). Relay -> daemon: ADD + JSON, REMOVE + name, READY. Daemon -> relay:
# ACK + the acknowledged kind + name, STOP_ACCEPTING, CLEAR_CACHES.
ADD, REMOVE, READY, ACK, STOP_ACCEPTING, CLEAR_CACHES = b"A", b"R", b"Y", b"K", b"S", b"C"
CONTROL_MAX = 64 * 1024  # longest line


def abstract(name: str) -> bytes:
    return b"\0" + name.encode("ascii")


class _Groups:
    """uid -> (account name, groups of the account), cached briefly."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[float, str, list[int]]] = {}

    def clear(self) -> None:
        self._cache.clear()

    def of(self, uid: int, gid: int) -> tuple[str, list[int]]:
        now = time.monotonic()
        hit = self._cache.get((uid, gid))
        if hit is not None and now - hit[0] < _GROUPS_TTL:
            return hit[1], hit[2]
        try:
            name = pwd.getpwuid(uid).pw_name
            groups = sorted(set(os.getgrouplist(name, gid)))
        except KeyError:
            name, groups = "", [gid]  # no account: its primary gid only
        self._cache[(uid, gid)] = (now, name, groups)
        return name, groups


def _executable(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""  # another user's process, when keyd is not root: "where available"


class _Side(asyncio.Protocol):
    """One end of a relayed connection; writes what it reads to its partner."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.transport: asyncio.Transport | None = None
        self.partner: _Side | None = None
        self.on_connected: Callable[[], object] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - stream sockets only
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER)
        if self.on_connected is not None:
            # The client's side: its bytes wait in the kernel until the upstream
            # connection is registered and open (resumed in _open_upstream), so
            # nothing is buffered here and nothing overtakes anything.
            transport.pause_reading()
            self.on_connected()

    def data_received(self, data: bytes) -> None:
        partner = self.partner
        if partner is not None and partner.transport is not None:
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
        self.upstream_sock: socket.socket | None = None
        # A second descriptor of the upstream socket: asyncio closes its own when the
        # daemon hangs up, and the name must stay bound until the daemon forgot it.
        self.name_holder: socket.socket | None = None
        self.connecting = False  # the upstream socket is inside an asyncio connect
        self.released = False
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    def is_open(self) -> bool:
        # A method, not the attribute: the state changes across awaits.
        return not self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.client.transport is not None:
            self.client.transport.close()  # after what is buffered for the client
        self.relay.connections.discard(self)
        if self.name:
            # The upstream socket closes only once the daemon has forgotten its name.
            self.task = self.relay.loop.create_task(self.relay.unregister(self))
        else:
            self.release_upstream()

    def release_upstream(self) -> None:
        self.released = True
        if self.connecting:
            return  # _open_upstream releases it when the connect ends, never mid-call
        if self.upstream.transport is not None:
            self.upstream.transport.abort()
        elif self.upstream_sock is not None:
            self.upstream_sock.close()
        if self.name_holder is not None:
            self.name_holder.close()  # the last descriptor: the name is free now
            self.name_holder = None


class Relay:
    def __init__(
        self, listeners: list[tuple[socket.socket, str]], private_name: str, control: socket.socket
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.connections: set[_Connection] = set()
        self._listeners = listeners
        self._private = abstract(private_name)
        self._control = control
        self._groups = _Groups()
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._writer: asyncio.StreamWriter | None = None
        self.done = asyncio.Event()

    async def run(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(
            sock=self._control, limit=CONTROL_MAX
        )
        reading = self.loop.create_task(self._read_control(reader))
        for sock, socket_name in self._listeners:
            server = await self.loop.create_unix_server(
                lambda socket_name=socket_name: self._accepted(socket_name),  # type: ignore[misc]
                sock=sock,
            )
            self._servers.append(server)
        await self._send(READY)
        await self.done.wait()
        reading.cancel()

    async def _read_control(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (OSError, ValueError):
                line = b""
            if not line.endswith(b"\n"):  # the daemon is gone: nothing may be relayed
                self.done.set()
                return
            self._handle(line[:1], line[1:-1])

    async def _send(self, message: bytes) -> None:
        assert self._writer is not None  # noqa: S101 - set in run()
        self._writer.write(message + b"\n")
        await self._writer.drain()  # waits while the daemon is slow to read

    def _handle(self, kind: bytes, body: bytes) -> None:
        if kind == ACK:  # ACK + the acknowledged kind (ADD or REMOVE) + name
            future = self._waiting.get(body.decode("ascii"))
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == STOP_ACCEPTING:
            for server in self._servers:
                server.close()
        elif kind == CLEAR_CACHES:
            self._groups.clear()

    async def _ask(self, kind: bytes, name: str, body: bytes) -> None:
        """Send a request to the daemon and wait until it has acted on it."""
        key = (kind + name.encode("ascii")).decode("ascii")
        future = self.loop.create_future()
        self._waiting[key] = future
        try:
            await self._send(kind + body)
            await future
        finally:
            self._waiting.pop(key, None)

    async def unregister(self, connection: _Connection) -> None:
        name = connection.name
        try:
            await self._ask(REMOVE, name, name.encode("ascii"))
        except (OSError, asyncio.CancelledError) as exc:
            # Without the daemon's acknowledgement the name must not be freed while
            # the daemon may still know it: stop relaying altogether (the daemon
            # forgets every name and stops when the control socket closes).
            print(f"keyd relay: cannot unregister a connection ({exc}); exiting", file=sys.stderr)
            self.done.set()
            return
        connection.release_upstream()

    def _accepted(self, socket_name: str) -> _Side:
        connection = _Connection(self)
        self.connections.add(connection)

        def open_upstream() -> None:
            # Kept on the connection: the loop holds only weak references to tasks.
            connection.task = self.loop.create_task(self._open_upstream(connection, socket_name))

        connection.client.on_connected = open_upstream
        return connection.client

    async def _open_upstream(self, connection: _Connection, socket_name: str) -> None:
        transport = connection.client.transport
        if transport is None or not connection.is_open():
            return
        if len(self.connections) > MAX_CONNECTIONS:
            print(f"keyd relay: over {MAX_CONNECTIONS} connections; refusing one", file=sys.stderr)
            connection.close()
            return
        try:
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            connection.upstream_sock = upstream
            pid, uid, gid = _PEERCRED.unpack(
                transport.get_extra_info("socket").getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size
                )
            )
            user, groups = self._groups.of(uid, gid)
            name = _bind_random(upstream)
            connection.name_holder = upstream.dup()
            caller = {
                "name": name,
                "uid": uid,
                "gid": gid,
                "pid": pid,
                "groups": groups,
                "user": user,
                "exe": _executable(pid),
                "socket": socket_name,
            }
            # Set first: a close() from now on unregisters the name (after this ADD,
            # since the daemon handles messages in order) before freeing it.
            body = json.dumps(caller).encode()
            if len(body) + 2 > CONTROL_MAX:
                # (thousands of groups): the daemon would not take the line.
                raise ValueError(f"caller uid {uid} has too many groups to register")
            connection.name = name
            await self._ask(ADD, name, body)
            if not connection.is_open():
                return
            connection.connecting = True
            try:
                # Blocking, in a thread: a non-blocking Unix connect fails at once with
                # EAGAIN while the listener's backlog is full (asyncio even takes it for
                # a connect in progress); a blocking one waits for room.
                upstream.setblocking(True)
                await self.loop.run_in_executor(None, upstream.connect, self._private)
                upstream.setblocking(False)
                await self.loop.create_unix_connection(lambda: connection.upstream, sock=upstream)
            finally:
                connection.connecting = False
        except Exception as exc:  # noqa: BLE001 - one connection fails, the relay goes on
            print(f"keyd relay: cannot relay a connection: {exc}", file=sys.stderr)
            connection.close()
            if connection.released:
                connection.release_upstream()
            return
        if connection.released:  # unregistered while connecting: finish the release
            connection.release_upstream()
        if not connection.is_open():
            return  # the client left while we connected; close() cleans up
        transport.resume_reading()


def raise_fd_limit() -> None:
    """Use the hard limit on open files: the soft default (1024) would run out long
    before MAX_CONNECTIONS."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 4 * MAX_CONNECTIONS
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _bind_random(sock: socket.socket) -> str:
    for _ in range(8):
        name = PEER_PREFIX + secrets.token_hex(16)
        try:
            sock.bind(abstract(name))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue  # someone holds it: never register a name keyd did not bind
            raise
        return name
    raise OSError(errno.EADDRINUSE, "no free abstract name for a relayed connection")


def main(argv: list[str]) -> int:
    """argv: CONTROL_FD PRIVATE_NAME FD:SOCKET_NAME..."""
    # The daemon decides when we stop (its control socket closes): a SIGTERM to the
    # whole service must not end relaying before the daemon has drained its requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise_fd_limit()
    control = socket.socket(fileno=int(argv[0]))
    listeners = []
    for spec in argv[2:]:
        fd, _, socket_name = spec.partition(":")
        listeners.append((socket.socket(fileno=int(fd)), socket_name))
    relay = Relay(listeners, argv[1], control)
    relay.loop.run_until_complete(relay.run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
