"""Start and stop real keyd daemons for tests and benchmarks.

Each Daemon gets its own 0700 directory, a fresh SQLCipher store created with
`keyd init`, and its own Unix socket. Readiness is read from sd_notify: the
harness binds a datagram socket, passes it as NOTIFY_SOCKET, and waits for
READY=1, exactly as systemd does. Every process started here is stopped by
Daemon.stop() (tests use it through fixtures).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from keyd.client import Client

READY_TIMEOUT = 60.0


def keyd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "keyd.cli", *args]


def run_callers(caller: Callable[[int], None], count: int) -> None:
    """Run caller(0) ... caller(count - 1) at once, each on its own thread, and fail
    with the first errors any of them raised."""
    failures: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            caller(n)
        except BaseException as exc:  # noqa: BLE001 - collected and reported below
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]


def run_keyd(
    *args: str, env: dict[str, str] | None = None, input_: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        keyd_command(*args),
        capture_output=True,
        text=True,
        env=env,
        input=input_.decode() if input_ is not None else None,
        timeout=timeout,
        check=False,
    )


def wait_for_backend(client: Client, backend: str, state: str, timeout: float = 20) -> str:
    """Poll status until `backend` is in `state` (connected, absent, locked...); returns
    its detail."""
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        for b in client.status().backends:
            if b.name == backend:
                seen = f"{b.state}: {b.detail}"
                if b.state == state:
                    return b.detail
        time.sleep(0.1)
    raise AssertionError(f"{backend} never became {state}; last: {seen}")


def allow_everything(uid: int) -> str:
    """A policy granting one uid every operation on every key."""
    return (
        f'[[allow]]\nusers = [{uid}]\noperations = ["create", "sign", "list", "delete", "admin"]\n'
    )


class KeydProcess:
    """A `keyd` subcommand run in the foreground with NOTIFY_SOCKET, as systemd would.
    Subclasses set `command`, `home`, `log_path` and `env`."""

    command: tuple[str, ...]
    home: Path
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    # Runs the command through this first (for example `unshare ... sh -c ...`),
    # which must exec it so the pid stays the daemon's.
    prefix: tuple[str, ...] = ()

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None) -> None:
        notify_path = Path(tempfile.mkdtemp(prefix="keyd-notify-")) / "notify.sock"
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify_path))
        self._notify_dir = notify_path.parent
        child_env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        child_env.pop("CREDENTIALS_DIRECTORY", None)
        child_env.update(self.env)
        child_env.update(env or {})
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *keyd_command(*self.command)],
                stderr=log,
                stdout=subprocess.DEVNULL,
                env=child_env,
            )
        if wait:
            self.wait_for("READY=1")

    def notifications(self, timeout: float) -> Iterator[str]:
        """Messages the daemon sent to NOTIFY_SOCKET, as they arrive."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self._notify.settimeout(min(left, 0.2))
            try:
                yield self._notify.recv(4096).decode()
            except TimeoutError:
                if self.proc is not None and self.proc.poll() is not None:
                    return
        return

    def wait_for(self, state: str, timeout: float = READY_TIMEOUT) -> str:
        for message in self.notifications(timeout):
            if state in message.split("\n"):
                return message
        code = self.proc.poll() if self.proc else None
        raise RuntimeError(f"keyd did not send {state} (exit code {code}); log:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit; returns the exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._notify.close()
        for leftover in self._notify_dir.iterdir():
            leftover.unlink()
        self._notify_dir.rmdir()
        return proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.stop()


class Daemon(KeydProcess):
    """A keyd process on a private socket, with its store and logs in `home`."""

    def __init__(
        self,
        home: Path,
        *,
        server_extra: str = "",
        store_extra: str = "",
        extra: str = "",
        policy: str | None = None,
        access_extra: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        """`policy` is the policy file's TOML; by default the test's own uid may do
        everything (the policy is not what most tests are about)."""
        self.home = home
        self.home.mkdir(mode=0o700, exist_ok=True)
        self.home.chmod(0o700)
        self.socket = home / "run" / "keyd.sock"
        # The restricted socket for `keyd notary-signer` (see NotaryShim).
        self.notary_socket = home / "notary" / "notary.sock"
        self.store = home / "state" / "keyd.db"
        self.secret = home / "secret" / "store.key"
        self.config = home / "keyd.toml"
        self.log_path = home / "keyd.log"
        self.policy = home / "policy.toml"
        self.audit = home / "state" / "audit"
        self.policy.write_text(policy if policy is not None else allow_everything(os.getuid()))
        self.config.write_text(
            "[server]\n"
            f'socket = "{self.socket}"\nnotary_socket = "{self.notary_socket}"\n'
            f"{server_extra}\n"
            "[store]\n"
            f'path = "{self.store}"\n'
            f'secret_file = "{self.secret}"\n{store_extra}\n'
            f'[access]\npolicy = "{self.policy}"\n{access_extra}\n'
            f"{extra}\n"
        )
        # Added to the daemon's environment (SOFTHSM2_CONF for SoftHSM tokens).
        self.env = dict(env or {})
        self.command = ("serve", "--config", str(self.config))

    def init(self) -> None:
        result = run_keyd("init", "--config", str(self.config))
        if result.returncode != 0:
            raise RuntimeError(f"keyd init failed: {result.stderr}")

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket, timeout=timeout)


class NotaryShim(KeydProcess):
    """`keyd notary-signer` on 127.0.0.1:`port`, in front of a daemon's notary socket."""

    def __init__(
        self,
        home: Path,
        daemon: Daemon,
        *,
        port: int,
        cert: Path,
        key: Path,
        client_ca: Path,
        wait_seconds: float = 10.0,
    ) -> None:
        self.home = home
        self.home.mkdir(mode=0o700, exist_ok=True)
        self.port = port
        self.config = home / "notary-signer.toml"
        self.log_path = home / "notary-signer.log"
        self.config.write_text(
            "[listen]\n"
            f'address = "127.0.0.1:{port}"\ncert = "{cert}"\nkey = "{key}"\n'
            f'client_ca = "{client_ca}"\n'
            "[keyd]\n"
            f'socket = "{daemon.notary_socket}"\nwait_seconds = {wait_seconds}\n'
            "health_interval_seconds = 0.5\n"
        )
        self.env = {}
        self.command = ("notary-signer", "--config", str(self.config))
