"""The daemon process: start-up checks, socket handling, signals, crash safety, logs.

Real `keyd serve` processes; readiness and shutdown are read from sd_notify the
way systemd reads them.
"""

from __future__ import annotations

import grp
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from keyd.client import Client, SignItem
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.signing import SignInput
from keyd.errors import (
    InvalidArgument,
    KeydError,
    PayloadTooLarge,
    ResourceExhausted,
    Unavailable,
)
from keyd.v1 import keyd_pb2 as pb
from keyd.v1 import keyd_pb2_grpc as pb_grpc
from tests.harness import Daemon


def _files(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.iterdir()
        if p.is_file() and p.suffix != ".lock"
    }


def _fails_to_start(d: Daemon, expected: str) -> str:
    d.start(wait=False)
    assert d.wait(60) != 0
    log = d.logs()
    assert expected in log, log
    assert "Traceback" not in log
    d.stop()
    return log


def test_socket_permissions_and_directory(daemon: Daemon) -> None:
    st = daemon.socket.lstat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) & 0o007 == 0


def test_socket_group_is_applied(daemon_home: Path) -> None:
    group = grp.getgrgid(os.getgid() if os.getgid() != 0 else 1)  # "daemon" on Debian
    d = Daemon(daemon_home, server_extra=f'socket_group = "{group.gr_name}"')
    d.init()
    d.start()
    try:
        assert daemon_home.joinpath("run/keyd.sock").stat().st_gid == group.gr_gid
    finally:
        assert d.stop() == 0


def test_unknown_socket_group_is_a_startup_error(daemon_home: Path) -> None:
    d = Daemon(daemon_home, server_extra='socket_group = "no-such-group-keyd"')
    d.init()
    _fails_to_start(d, "no group named 'no-such-group-keyd'")


def test_sigterm_drains_in_flight_requests_and_exits_zero(daemon: Daemon) -> None:
    results: list[object] = []
    started = threading.Barrier(9)

    def create() -> None:
        with daemon.client(timeout=60) as c:
            started.wait()
            try:
                results.append(c.create_key(KeyType.RSA_3072).key_id)  # ~0.1-1 s each
            except KeydError as exc:
                results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)  # the RPCs have reached the daemon; RSA generation is under way
    daemon.signal(signal.SIGTERM)
    for message in daemon.notifications(30):
        if "STOPPING=1" in message.split("\n"):
            break
    else:
        pytest.fail("no STOPPING=1")
    for t in threads:
        t.join(60)
    assert daemon.wait(60) == 0
    created = [r for r in results if isinstance(r, str)]
    assert len(results) == 8
    assert created, results  # at least the in-flight ones finished
    assert all(isinstance(r, str | Unavailable) for r in results), results
    assert "keyd stopped" in daemon.logs()
    daemon.stop()
    daemon.start()
    with daemon.client() as c:
        stored = {k.key_id for k in c.list_keys()}
    assert set(created) <= stored


def test_keys_survive_restart(daemon: Daemon) -> None:
    with daemon.client() as c:
        records = [c.create_key(t, role="snapshot") for t in KeyType]
    assert daemon.stop() == 0
    daemon.start()
    with daemon.client() as c:
        for record in records:
            again = c.get_key(record.key_id)
            assert again.public_key.pem == record.public_key.pem
            sig = c.sign(record.key_id, b"after restart")
            assert record.public_key.verify(
                sig.signature, SignInput.of_message(b"after restart"), sig.encoding
            )


def test_sigkill_during_key_creation_leaves_whole_keys(daemon: Daemon) -> None:
    acknowledged: list[str] = []
    stop = threading.Event()

    def create(key_type: KeyType) -> None:
        with daemon.client(timeout=30) as c:
            while not stop.is_set():
                try:
                    acknowledged.append(c.create_key(key_type).key_id)
                except KeydError:
                    return

    threads = [
        threading.Thread(target=create, args=(t,))
        for t in (KeyType.ECDSA_P256, KeyType.ED25519, KeyType.ECDSA_P256, KeyType.RSA_3072)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon.kill()  # SIGKILL while creations are in flight
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acknowledged) >= 40

    daemon.start()
    with daemon.client() as c:
        listed = c.list_keys()
        # Every acknowledged key is there (durable before the reply) ...
        assert set(acknowledged) <= {k.key_id for k in listed}
        # ... and every listed key is whole: it signs and verifies.
        for record in listed:
            sig = c.sign(record.key_id, b"m")
            assert record.public_key.verify(sig.signature, SignInput.of_message(b"m"), sig.encoding)


def test_second_daemon_on_a_live_socket_refuses(daemon: Daemon, short_tmp: Path) -> None:
    other = Daemon(short_tmp / "other")
    other.config.write_text(other.config.read_text().replace(str(other.socket), str(daemon.socket)))
    other.init()
    _fails_to_start(other, "another server (keyd?) is listening on")
    with daemon.client() as c:  # the first one is unharmed
        assert c.status().keys == 0


def test_stale_socket_is_replaced(daemon_home: Path) -> None:
    d = Daemon(daemon_home)
    d.init()
    d.socket.parent.mkdir(mode=0o750)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(d.socket))
    stale.close()  # the file stays; nobody listens
    d.start()
    try:
        with d.client() as c:
            assert c.status().socket == str(d.socket)
    finally:
        assert d.stop() == 0
    assert not d.socket.exists()  # removed on clean exit


def test_socket_path_that_is_a_regular_file_is_left_alone(daemon_home: Path) -> None:
    d = Daemon(daemon_home)
    d.init()
    d.socket.parent.mkdir(mode=0o750)
    d.socket.write_text("precious")
    _fails_to_start(d, "exists and is not a socket; refusing to replace it")
    assert d.socket.read_text() == "precious"


def test_world_accessible_socket_directory_is_refused(daemon_home: Path) -> None:
    d = Daemon(daemon_home)
    d.init()
    d.socket.parent.mkdir()
    d.socket.parent.chmod(0o755)
    _fails_to_start(d, "is open to all users (mode 0755)")


def test_socket_directory_that_cannot_exist_is_a_clear_error(daemon_home: Path) -> None:
    d = Daemon(daemon_home)
    d.init()
    blocker = daemon_home / "blocker"
    blocker.write_text("a file where a directory should be")
    text = d.config.read_text().replace(str(d.notary_socket), str(blocker / "sub" / "n.sock"))
    d.config.write_text(text)
    _fails_to_start(d, f"cannot create socket directory {blocker / 'sub'}: Not a directory")
    d.config.write_text(text.replace(str(blocker / "sub" / "n.sock"), str(blocker / "n.sock")))
    _fails_to_start(d, f"socket directory {blocker} is not a directory")
    assert blocker.read_text() == "a file where a directory should be"


def test_wrong_store_secret_refuses_to_start_and_store_is_untouched(daemon_home: Path) -> None:
    d = Daemon(daemon_home)
    d.init()
    d.secret.chmod(0o600)
    d.secret.write_text("ab" * 32 + "\n")
    before = _files(d.store.parent)
    _fails_to_start(d, "the store secret does not match it")
    assert _files(d.store.parent) == before


def test_missing_store_secret(daemon_home: Path) -> None:
    d = Daemon(daemon_home)
    d.init()
    d.secret.unlink()
    _fails_to_start(d, "store secret")


def test_secret_with_unsafe_permissions(daemon_home: Path) -> None:
    d = Daemon(daemon_home)
    d.init()
    d.secret.chmod(0o640)
    _fails_to_start(d, "has mode 0640; others could read it")


def test_store_with_unsafe_permissions(daemon_home: Path) -> None:
    d = Daemon(daemon_home)
    d.init()
    d.store.chmod(0o644)
    _fails_to_start(d, "must be mode 0600")


def test_truncated_store_refuses_to_start(daemon: Daemon) -> None:
    with daemon.client() as c:
        for _ in range(30):
            c.create_key(KeyType.ED25519, labels={"pad": "p" * 200})
    assert daemon.stop() == 0
    with daemon.store.open("r+b") as f:
        f.truncate(daemon.store.stat().st_size // 2)
    _fails_to_start(daemon, "damaged")


def test_unreadable_config(daemon_home: Path) -> None:
    d = Daemon(daemon_home)
    d.config.write_text("[server\n")
    _fails_to_start(d, "not valid TOML")
    d.config.unlink()
    _fails_to_start(d, "cannot read configuration")


def test_credentials_directory_supplies_the_secret(daemon_home: Path, short_tmp: Path) -> None:
    d = Daemon(daemon_home)
    d.init()
    creds = short_tmp / "creds-dir"
    creds.mkdir(mode=0o700)
    os.rename(d.secret, creds / "keyd-store-key")  # no secret_file left in place
    d.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
    try:
        with d.client() as c:
            assert c.status().keys == 0
    finally:
        assert d.stop() == 0


def test_client_pointed_at_no_daemon(short_tmp: Path) -> None:
    with (
        Client(short_tmp / "nothing.sock", timeout=5) as c,
        pytest.raises(
            Unavailable, match=r"cannot reach keyd at .*nothing\.sock: is the daemon running"
        ),
    ):
        c.status()


def test_watchdog_pings(daemon_home: Path) -> None:
    d = Daemon(daemon_home)
    d.init()
    d.start(env={"WATCHDOG_USEC": "200000"})
    try:
        assert "WATCHDOG=1" in d.wait_for("WATCHDOG=1", timeout=10)
    finally:
        assert d.stop() == 0


def test_status_notification_and_stopping(daemon_home: Path) -> None:
    d = Daemon(daemon_home)
    d.init()
    d.start(wait=False)
    ready = d.wait_for("READY=1")
    assert f"STATUS=serving 0 keys on {d.socket}" in ready
    d.signal(signal.SIGTERM)
    d.wait_for("STOPPING=1")
    assert d.wait() == 0
    d.stop()


def test_logs_hold_no_payload_or_secret(daemon_home: Path) -> None:
    d = Daemon(daemon_home)
    d.config.write_text(d.config.read_text() + '[log]\nlevel = "debug"\n')
    d.init()
    secret_text = d.secret.read_text().strip()
    d.start()
    marker = b"PAYLOAD-MARKER-6d1f"
    try:
        with d.client() as c:
            key = c.create_key(KeyType.ECDSA_P256)
            c.sign(key.key_id, marker)
            with pytest.raises(KeydError):
                c.sign(key.key_id, digest=marker)
            with pytest.raises(KeydError):
                c.sign("f" * 64, marker)
    finally:
        assert d.stop() == 0
    log = d.logs()
    assert "key created" in log
    assert marker.decode() not in log
    assert marker.hex() not in log
    assert secret_text not in log


def test_oversized_messages_are_refused_and_daemon_keeps_serving(daemon_home: Path) -> None:
    d = Daemon(daemon_home, server_extra="max_payload_bytes = 1024\nmax_batch_items = 4")
    d.init()
    d.start()
    try:
        with d.client() as c:
            key = c.create_key(KeyType.ECDSA_P256)
            with pytest.raises(PayloadTooLarge, match="payload is 1025 bytes; the limit is 1024"):
                c.sign(key.key_id, b"x" * 1025)
            # Over the transport limit (payload limit + 1 MiB): grpc refuses it.
            with pytest.raises(ResourceExhausted):
                c.sign(key.key_id, b"x" * (3 * 1024 * 1024))
            with grpc.insecure_channel(f"unix:{d.socket}") as channel:
                stub = pb_grpc.SignServiceStub(channel)
                batch = pb.SignBatchRequest(
                    requests=[pb.SignRequest(key_id=key.key_id, message=b"m")] * 5
                )
                with pytest.raises(grpc.RpcError) as info:
                    stub.SignBatch(batch, timeout=10)
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert "the limit is 4" in str(info.value.details())
            # Through the client, a refused call is one typed error, however it is sent.
            items = [SignItem(key.key_id, message=b"m")] * 5
            for in_flight in (1, 2):
                with pytest.raises(InvalidArgument, match="batch of 5 requests; the limit is 4"):
                    list(c.sign_batch(items, batch_size=5, in_flight=in_flight))
            sig = c.sign(key.key_id, b"x" * 1024, encoding=SignatureEncoding.RAW)
            assert len(sig.signature) == 64
    finally:
        assert d.stop() == 0


def test_client_without_socket_permission_is_told_so(daemon: Daemon) -> None:
    # Run the client as an unprivileged uid that is not in the socket's group.
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    script = (
        "import sys; from keyd.client import Client; from keyd.errors import PermissionDenied\n"
        f"c = Client({str(daemon.socket)!r}, timeout=5)\n"
        "try:\n    c.status()\nexcept PermissionDenied as e:\n    print(e.message); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    daemon.home.chmod(0o755)  # let the other uid reach the socket's directory
    daemon.socket.parent.chmod(0o755)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    probe = subprocess.run(
        [*as_nobody, "-c", "import keyd.client"],
        capture_output=True,
        check=False,
        timeout=60,
        env=env,
    )
    if probe.returncode != 0:
        pytest.skip("uid 65534 cannot run this interpreter or import keyd from this checkout")
    result = subprocess.run(
        [*as_nobody, "-c", script], capture_output=True, text=True, check=False, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "permission denied on" in result.stdout
    assert "must be in the socket's group" in result.stdout


def _relay_pids(daemon_pid: int) -> list[int]:
    """The relay processes keyd started (children running keyd.daemon.relay)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat_fields[1]) == daemon_pid and b"keyd.daemon.relay" in cmdline:
            pids.append(int(entry.name))
    return pids


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; init reaps it


def test_the_relay_process_dies_with_the_daemon(daemon: Daemon) -> None:
    assert daemon.proc is not None
    (relay,) = _relay_pids(daemon.proc.pid)
    daemon.kill()  # SIGKILL: no chance to stop the relay itself
    deadline = time.monotonic() + 10
    while _running(relay):
        assert time.monotonic() < deadline, "the relay outlived its daemon"
        time.sleep(0.05)
    daemon.start()  # the socket is free again
    with daemon.client() as client:
        assert client.whoami().pid == os.getpid()


def test_a_dead_relay_stops_the_daemon_with_an_error(daemon: Daemon) -> None:
    assert daemon.proc is not None
    (relay,) = _relay_pids(daemon.proc.pid)
    os.kill(relay, signal.SIGKILL)
    assert daemon.wait(30) == 1  # fails closed: no identities, no service
    assert "relay process is gone" in daemon.logs()
    daemon.stop()
