"""Process lifecycle: open the store, bind the socket, serve, drain on SIGTERM.

Server model: grpcio's threaded server, which outruns grpc.aio for unary calls
on this machine kind (docs/performance.md). Its pool has one thread per core
(cryptography releases the GIL while signing, so they use every core; more
runnable threads only hand the GIL around) plus, for each hardware backend, its
in-flight limit: a thread waiting on a device is blocked, not runnable, and a
slow device can never hold the threads store keys need. SignBatch is unary, so
no call holds a thread while it waits for a client.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from keyd.backends.base import Backend
from keyd.backends.pkcs11 import Pkcs11Backend
from keyd.backends.store import StoreBackend
from keyd.config import Config
from keyd.daemon import api, logs
from keyd.daemon.manager import NOTARY_SCOPE, KeyManager
from keyd.daemon.notify import notify, watchdog_interval
from keyd.errors import StartupError
from keyd.store.catalog import Catalog
from keyd.store.database import Database
from keyd.store.secret import load_store_secret

log = logging.getLogger("keyd.server")

SOCKET_MODE = 0o660
# Room for the protobuf framing around the largest payload, and for batches.
_MESSAGE_OVERHEAD = 1024 * 1024


def prepare_socket_path(path: Path) -> None:
    """Make sure binding `path` harms nothing: refuse a live server, clear a stale socket."""
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(mode=0o750, parents=True)
            parent.chmod(0o750)  # the umask (077) would leave the group out
        except OSError as exc:
            raise StartupError(
                f"cannot create socket directory {parent}: {exc.strerror}. Under systemd it "
                "comes from RuntimeDirectory= or keyd.tmpfiles.conf (systemd-tmpfiles --create)"
            ) from None
    if not parent.is_dir():
        raise StartupError(f"socket directory {parent} is not a directory")
    st = parent.stat()
    if st.st_mode & 0o007:
        raise StartupError(
            f"socket directory {parent} is open to all users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); use a directory of mode 0750 or stricter"
        )
    try:
        existing = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(existing.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.info("removing stale socket", extra={"socket": str(path)})
        path.unlink()
        return
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise StartupError(f"cannot check socket {path}: {exc.strerror}") from None
        return
    finally:
        probe.close()
    raise StartupError(
        f"another server (keyd?) is listening on {path}; stop it or set [server] socket"
    )


def _socket_gid(group: str, field: str) -> int | None:
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"[server] {field}: no group named {group!r} on this host") from None


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    socket_path: Path
    socket_inode: int

    def stop(self, grace: float) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.remove_socket()

    def remove_socket(self) -> None:
        try:
            if self.socket_path.lstat().st_ino == self.socket_inode:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass


def start_server(manager: KeyManager, config: Config) -> list[RunningServer]:
    """Serve the main socket and, when configured, the notary socket (same threads)."""
    server_config = config.server
    pool = futures.ThreadPoolExecutor(
        max_workers=server_config.worker_threads + manager.blocking_threads(),
        thread_name_prefix="keyd-worker",
    )
    running = [
        _serve_socket(
            manager,
            config,
            pool,
            path=server_config.socket,
            group=server_config.socket_group,
            group_field="socket_group",
        )
    ]
    if server_config.notary_socket is not None:
        try:
            running.append(
                _serve_socket(
                    manager.scoped(NOTARY_SCOPE),
                    config,
                    pool,
                    path=server_config.notary_socket,
                    group=server_config.notary_socket_group,
                    group_field="notary_socket_group",
                )
            )
        except BaseException:
            running[0].stop(0)
            raise
    return running


def _serve_socket(
    manager: KeyManager,
    config: Config,
    pool: futures.ThreadPoolExecutor,
    *,
    path: Path,
    group: str,
    group_field: str,
) -> RunningServer:
    """Bind one Unix socket (0660, the configured group) and start serving it."""
    server_config = config.server
    gid = _socket_gid(group, group_field)
    prepare_socket_path(path)
    limit = server_config.max_payload_bytes + _MESSAGE_OVERHEAD
    server = grpc.server(
        pool,
        maximum_concurrent_rpcs=server_config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    api.add_servicers(
        server,
        manager,
        socket=str(path),
        max_batch_items=server_config.max_batch_items,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *api.SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*api.SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        server.add_insecure_port(f"unix:{path}")
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {path}: {exc}") from None
    server.start()
    # The umask made the socket 0600 at bind; open it to the group only now.
    os.chmod(path, SOCKET_MODE)
    if gid is not None:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            server.stop(0)
            raise StartupError(
                f"cannot give {path} to group {group!r}: keyd's user "
                "must be a member of it, and no seccomp filter may forbid chown (under "
                "systemd/keyd.service leave socket_group unset: the socket already gets "
                "the service's group)"
            ) from None
    return RunningServer(server, health_servicer, path, path.lstat().st_ino)


def open_manager(
    config: Config, extra_backends: Mapping[str, Backend] | None = None
) -> tuple[Database, KeyManager]:
    secret = load_store_secret(config.store.secret_kind, config.store.secret_file)
    db = Database.open(config.store.path, secret)
    catalog = Catalog(db)
    backends: dict[str, Backend] = {"store": StoreBackend(catalog)}
    try:
        for token_name, token_config in config.pkcs11.items():
            backend = Pkcs11Backend(token_name, token_config)
            backends[backend.name] = backend
    except BaseException:
        db.close()
        raise
    backends.update(extra_backends or {})
    manager = KeyManager(
        catalog,
        backends,
        verify_store_signatures=config.store.verify_signatures,
        max_payload_bytes=config.server.max_payload_bytes,
    )
    return db, manager


def _watchdog(db: Database, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            db.ping()
        except Exception:
            log.exception("watchdog: store check failed; not pinging systemd")
            continue
        notify("WATCHDOG=1")


def serve(config: Config) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns the exit code."""
    logs.configure(config.log.level)
    os.umask(0o077)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    db, manager = open_manager(config)
    try:
        running = start_server(manager, config)
    except BaseException:
        db.close()
        raise
    keys = manager.key_count()
    sockets = " and ".join(str(r.socket_path) for r in running)
    log.info("keyd ready", extra={"socket": sockets, "keys": keys})
    notify(f"READY=1\nSTATUS=serving {keys} keys on {sockets}")
    threading.Thread(target=manager.warm_up, name="keyd-warm-up", daemon=True).start()
    interval = watchdog_interval()
    if interval:
        threading.Thread(
            target=_watchdog, args=(db, interval, stop), name="keyd-watchdog", daemon=True
        ).start()

    while not stop.wait(1.0):
        pass
    grace = config.server.shutdown_grace_seconds
    log.info("stopping: draining in-flight requests", extra={"grace_seconds": grace})
    notify("STOPPING=1\nSTATUS=draining requests")
    # Both sockets stop taking calls at once, then drain within one grace period.
    for server in running:
        server.health.enter_graceful_shutdown()
    events = [server.server.stop(grace) for server in running]
    for event in events:
        event.wait()
    for server in running:
        server.remove_socket()
    manager.close()
    db.close()
    log.info("keyd stopped")
    return 0
