from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Daemon


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private temporary directory with a short path (Unix socket paths max 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="keyd-t-"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon_home(short_tmp: Path) -> Path:
    return short_tmp


@pytest.fixture
def daemon(daemon_home: Path) -> Iterator[Daemon]:
    """A running keyd with a fresh store; stopped (and checked to exit 0) afterwards."""
    d = Daemon(daemon_home)
    d.init()
    d.start()
    yield d
    assert d.stop() in (0, None), d.logs()  # None: the test stopped it itself


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[Daemon]:
    """One daemon for a module's read-mostly tests (faster than one per test)."""
    home = Path(tempfile.mkdtemp(prefix="keyd-m-"))
    d = Daemon(home)
    d.init()
    d.start()
    yield d
    code = d.stop()
    shutil.rmtree(home, ignore_errors=True)
    assert code == 0
