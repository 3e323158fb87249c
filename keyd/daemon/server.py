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

import base64
import errno
import grp
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from keyd.audit import AuditLog
from keyd.backends.base import Backend
from keyd.backends.pkcs11 import Pkcs11Backend
from keyd.backends.store import StoreBackend
from keyd.backends.yubikey.backend import YubiKeyBackend
from keyd.config import AccessMode, Config
from keyd.core.identity import Caller, Operation
from keyd.core.model import KeyRecord
from keyd.daemon import api, logs
from keyd.daemon.access import Gate
from keyd.daemon.manager import NOTARY_SCOPE, KeyManager
from keyd.daemon.notify import notify, watchdog_interval
from keyd.daemon.peers import RelayProcess, bind_public_socket
from keyd.daemon.relay import raise_fd_limit
from keyd.errors import KeydError, StartupError
from keyd.policy import Policy
from keyd.store.audit_state import AuditState
from keyd.store.catalog import Catalog
from keyd.store.database import Database
from keyd.store.secret import load_store_secret
from keyd.v1 import keyd_pb2 as pb
from keyd.v1 import keyd_pb2_grpc as pb_grpc

log = logging.getLogger("keyd.server")

SOCKET_MODE = 0o660
# Keys whose deletion window ended are purged at least this often.
_PURGE_SECONDS = 3600.0
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
class Service:
    """Everything that serves requests: gRPC server(s), the relay, the audit log."""

    servers: list[tuple[grpc.Server, health.HealthServicer]]
    sockets: list[tuple[Path, int]]  # path and inode, to remove only our own socket
    pool: futures.ThreadPoolExecutor | None = None
    gate: Gate | None = None
    relay: RelayProcess | None = None
    audit: AuditLog | None = None
    # Set when a part keyd cannot serve without has died; keyd then stops, exit code 1.
    failed: bool = False

    def fail(self) -> None:
        self.failed = True
        os.kill(os.getpid(), signal.SIGTERM)

    def describe_sockets(self) -> str:
        return " and ".join(str(path) for path, _ in self.sockets)

    def stop(self, grace: float) -> None:
        """Stop taking calls on every socket at once, then drain within one grace period."""
        if self.relay is not None:
            self.relay.stop_accepting()
        for _, health_servicer in self.servers:
            health_servicer.enter_graceful_shutdown()
        events = [server.stop(grace) for server, _ in self.servers]
        for event in events:
            event.wait()
        if self.pool is not None:
            # gRPC stops waiting after the grace period, not its handlers: let them
            # finish (and write their audit records) before the log closes.
            self.pool.shutdown(wait=True)
        if self.relay is not None:
            self.relay.stop()
        if self.audit is not None:
            self.audit.close()
        for path, inode in self.sockets:
            try:
                if path.lstat().st_ino == inode:
                    path.unlink()
            except FileNotFoundError:
                pass

    def reload_policy(self, config: Config) -> None:
        """SIGHUP: a valid new policy replaces the old one; an invalid one is refused."""
        if self.gate is None or self.relay is None:
            log.info("SIGHUP ignored: [access] mode is open, there is no policy")
            return
        try:
            policy = Policy.load(config.access.policy)
        except KeydError as exc:
            log.error("new policy refused; the previous one stays", extra={"error": exc.message})
            return
        self.gate.policy = policy
        self.relay.clear_caches()
        log.info("policy reloaded", extra={"policy": str(policy.path), "rules": policy.rule_count})


def start_service(
    manager: KeyManager, config: Config, audit_state: AuditState | None = None
) -> Service:
    """Serve the main socket and, when configured, the notary socket."""
    server_config = config.server
    sockets = [(server_config.socket, server_config.socket_group, "socket_group", "main")]
    if server_config.notary_socket is not None:
        sockets.append(
            (
                server_config.notary_socket,
                server_config.notary_socket_group,
                "notary_socket_group",
                "notary",
            )
        )
    views = {"main": manager, "notary": manager.scoped(NOTARY_SCOPE)}
    pool = futures.ThreadPoolExecutor(
        max_workers=server_config.worker_threads + manager.blocking_threads(),
        thread_name_prefix="keyd-worker",
    )
    if config.access.mode is AccessMode.OPEN:
        log.warning(
            "[access] mode is open: callers are not identified, authorised or audited; "
            "anyone who can open the socket may use every key"
        )
        return _start_open(views, config, pool, sockets)
    if audit_state is None:
        raise StartupError("[access] mode policy needs the store's audit state")
    return _start_policy(views, config, pool, sockets, audit_state)


def _start_open(
    views: Mapping[str, KeyManager],
    config: Config,
    pool: futures.ThreadPoolExecutor,
    sockets: list[tuple[Path, str, str, str]],
) -> Service:
    # One gRPC server per socket, each with its fixed view of the keys.
    service = Service(servers=[], sockets=[], pool=pool)
    try:
        for path, group, field, name in sockets:
            gid = _socket_gid(group, field)
            prepare_socket_path(path)
            server, health_servicer = _grpc_server(
                Gate({"main": views[name]}), config, pool, socket=str(path)
            )
            _listen(server, f"unix:{path}", str(path))
            server.start()
            service.servers.append((server, health_servicer))
            service.sockets.append((path, _share_socket(path, gid, group)))
    except BaseException:
        service.stop(0)
        raise
    return service


def _start_policy(
    views: Mapping[str, KeyManager],
    config: Config,
    pool: futures.ThreadPoolExecutor,
    sockets: list[tuple[Path, str, str, str]],
    audit_state: AuditState,
) -> Service:
    policy = Policy.load(config.access.policy)
    if not policy.rule_count:
        log.warning(
            "the policy grants nothing: every request will be denied",
            extra={"policy": str(policy.path)},
        )
    key = audit_state.checkpoint_key()
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    public_b64 = base64.b64encode(public).decode("ascii")

    def on_checkpoint(seq: int, record_hash: str) -> None:
        audit_state.record_head(seq, record_hash)
        # The journal keeps a second copy of each head, out of the log's reach.
        log.info("audit checkpoint", extra={"seq": seq, "head": record_hash})

    audit = AuditLog.open(
        config.audit_directory,
        signer=key.sign,
        public_key=public,
        rotate_bytes=config.audit.rotate_bytes,
        checkpoint_seconds=config.audit.checkpoint_seconds,
        fsync_each=config.audit.fsync_each,
        expected_head=audit_state.head(),
        on_checkpoint=on_checkpoint,
    )
    service = Service(servers=[], sockets=[], pool=pool, audit=audit)
    try:
        listeners = []
        for path, group, field, name in sockets:
            gid = _socket_gid(group, field)
            prepare_socket_path(path)
            listeners.append(bind_public_socket(path, name))
            service.sockets.append((path, _share_socket(path, gid, group)))
        relay = RelayProcess(listeners, on_exit=service.fail)
        service.relay = relay
        gate = Gate(views, peers=relay.peers, policy=policy, audit=audit)
        service.gate = gate
        server, health_servicer = _grpc_server(
            gate,
            config,
            pool,
            socket=str(config.server.socket),
            audit_public_key=public_b64,
        )
        _listen(server, relay.grpc_address, "keyd's private listener")
        server.start()
        service.servers.append((server, health_servicer))
        relay.start()
        _check_identity(config.server.socket)
    except BaseException:
        service.stop(0)
        raise
    log.info(
        "callers are identified, authorised and audited",
        extra={
            "policy": str(policy.path),
            "rules": policy.rule_count,
            "audit": str(config.audit_directory),
            "audit_public_key": public_b64,
        },
    )
    return service


def _check_identity(socket_path: Path) -> None:
    """Ask the running server who we are: proves, once per start, that this grpcio
    still reports peers the way the relay relies on (pinned, but checked anyway)."""
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        try:
            me = pb_grpc.StatusServiceStub(channel).WhoAmI(pb.WhoAmIRequest(), timeout=10)
        except grpc.RpcError as exc:
            raise StartupError(
                f"caller identity does not work on this system ({exc.details()}); keyd refuses "
                'to serve without it. Set [access] mode = "open" only to investigate'
            ) from None
    if (me.uid, me.pid) != (os.getuid(), os.getpid()):
        raise StartupError(
            f"caller identity is wrong: keyd sees itself as uid {me.uid}, pid {me.pid}"
        )


def _grpc_server(
    gate: Gate,
    config: Config,
    pool: futures.ThreadPoolExecutor,
    *,
    socket: str,
    audit_public_key: str = "",
) -> tuple[grpc.Server, health.HealthServicer]:
    server_config = config.server
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
        gate,
        socket=socket,
        max_batch_items=server_config.max_batch_items,
        audit_public_key=audit_public_key,
    )
    health_servicer = _CheckOnlyHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *api.SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if not gate.enforcing:
        # Reflection is a stream that holds a worker thread for as long as the client
        # likes, outside the policy: only where the socket's permissions are all there is.
        reflection.enable_server_reflection(
            (*api.SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    return server, health_servicer


class _CheckOnlyHealth(health.HealthServicer):
    """The standard health service without Watch: a Watch stream would hold one of
    the few worker threads for as long as any socket user keeps it open."""

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: object = None,
    ) -> None:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "keyd answers Check only; poll it")


def _listen(server: grpc.Server, address: str, shown: str) -> None:
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {shown}: {exc}") from None


def _share_socket(path: Path, gid: int | None, group: str) -> int:
    """Open a socket to its group (the umask made it 0600 at bind); returns its inode."""
    os.chmod(path, SOCKET_MODE)
    if gid is not None:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            raise StartupError(
                f"cannot give {path} to group {group!r}: keyd's user "
                "must be a member of it, and no seccomp filter may forbid chown (under "
                "systemd/keyd.service leave socket_group unset: the socket already gets "
                "the service's group)"
            ) from None
    return path.lstat().st_ino


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
        for key_name, key_config in config.yubikey.items():
            yubikey = YubiKeyBackend(key_name, key_config)
            backends[yubikey.name] = yubikey
    except BaseException:
        db.close()
        raise
    backends.update(extra_backends or {})
    manager = KeyManager(
        catalog,
        backends,
        verify_store_signatures=config.store.verify_signatures,
        max_payload_bytes=config.server.max_payload_bytes,
        deletion_window_seconds=config.keys.deletion_window_days * 86400,
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
    raise_fd_limit()  # one descriptor per relayed connection here too
    stop = threading.Event()
    reload = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())

    db, manager = open_manager(config)
    try:
        service = start_service(manager, config, AuditState(db))
    except BaseException:
        db.close()
        raise
    keys = manager.key_count()
    sockets = service.describe_sockets()
    log.info("keyd ready", extra={"socket": sockets, "keys": keys})
    notify(f"READY=1\nSTATUS=serving {keys} keys on {sockets}")
    threading.Thread(target=manager.warm_up, name="keyd-warm-up", daemon=True).start()
    interval = watchdog_interval()
    if interval:
        threading.Thread(
            target=_watchdog, args=(db, interval, stop), name="keyd-watchdog", daemon=True
        ).start()

    purge_every = min(_PURGE_SECONDS, max(1.0, config.keys.deletion_window_days * 86400 / 4))
    next_purge = 0.0
    while not stop.wait(1.0 if not reload.is_set() else 0):
        if reload.is_set():
            reload.clear()
            service.reload_policy(config)
            manager.reload_backends()
        if time.monotonic() >= next_purge:
            next_purge = time.monotonic() + purge_every
            _purge_due(manager, service)
    grace = config.server.shutdown_grace_seconds
    log.info("stopping: draining in-flight requests", extra={"grace_seconds": grace})
    notify("STOPPING=1\nSTATUS=draining requests")
    service.stop(grace)
    manager.close()
    db.close()
    if service.failed:
        log.error("keyd stopped after a failure")
        return 1
    log.info("keyd stopped")
    return 0


def _purge_due(manager: KeyManager, service: Service) -> None:
    audit = service.audit
    # The daemon's own act, recorded like a request: "started" before it happens.
    me = Caller(
        uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), groups=frozenset(), socket="keyd"
    )

    def record(key: KeyRecord, result: str) -> None:
        if audit is not None:
            audit.append_items(me, "PurgeDue", Operation.ADMIN.value, [(key.key_id, "", result)])

    try:
        manager.purge_due(record=record)
    except Exception:  # the loop must go on: SIGTERM still has to drain and checkpoint
        log.exception("purging keys failed; retrying later")
