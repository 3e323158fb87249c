"""Structured log lines on stderr (logfmt), journald-friendly.

Under systemd (JOURNAL_STREAM set) each line starts with a <N> priority prefix
that journald turns into the entry's priority, and the timestamp is left to
journald. Callers pass fields with `extra=`; payloads and secrets are never
passed, so they are never logged.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from keyd.config import LogLevel

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


def _quote(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "-_./:@" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower()
        parts = [] if self._journal else [f"ts={self._timestamp(record)}"]
        parts += [f"level={level}", f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        parts += [f"{k}={_quote(v)}" for k, v in record.__dict__.items() if k not in _STANDARD]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        line = " ".join(parts)
        if self._journal:
            return f"<{_PRIORITY.get(record.levelname, 6)}>{line}"
        return line

    @staticmethod
    def _timestamp(record: logging.LogRecord) -> str:
        base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{base}.{int(record.msecs):03d}Z"


def configure(level: LogLevel) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger("keyd")
    root.handlers[:] = [handler]
    root.setLevel(level.value.upper())
    root.propagate = False
