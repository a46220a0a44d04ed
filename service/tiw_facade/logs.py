"""Structured logs: one JSON object per line on stderr, with every known secret scrubbed.

Secrets are never passed to a logger on purpose; the scrubbing is the second lock, for a library
that logs more than we expect at DEBUG.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
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
        entry: dict[str, object] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = json.dumps(entry, default=str, ensure_ascii=False)
        for secret in self._secrets:
            line = line.replace(secret, REDACTED)
        return line


def configure(level: str, secrets: Iterable[str] = ()) -> None:
    """Send every logger's records, as JSON lines, to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
