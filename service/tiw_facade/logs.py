"""Structured logs: one JSON object per line on stderr, with every known secret scrubbed.

Secrets are never passed to a logger on purpose; the scrubbing is the second lock, for a library
that logs more than we expect at DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable

# Attributes every LogRecord has; anything else was passed in ``extra`` and becomes a JSON field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
REDACTED = "[REDACTED]"


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is scrubbed whole.
        # Each secret also in its JSON-escaped spelling, which is what appears in the line.
        forms = {
            form for s in secrets if len(s) >= 4 for form in (s, json.dumps(s, ensure_ascii=False)[1:-1])
        }
        self._secrets = sorted(forms, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        entry: dict[str, object] = {
            "ts": f"{time.strftime('%Y-%m-%dT%H:%M:%S', created)}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = vars(record)
        for key in fields.keys() - _STANDARD:  # what the caller passed in ``extra``
            if fields[key] is not None:
                entry[key] = fields[key]
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = json.dumps(entry, default=str, ensure_ascii=False)
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, REDACTED)
        return line


def configure(level: str, secrets: Iterable[str] = ()) -> None:
    """Send every logger's records, as JSON lines, to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The logging HOWTO's "Optimization": the caller's file and line, thread and process names are
    # not in our lines, and computing them costs more than formatting the line of an RPC.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
