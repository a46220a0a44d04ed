"""Structured logs: one JSON object per line on stderr, with every known secret scrubbed.

Secrets are never passed to a logger on purpose; the scrubbing is the second lock, for a library
that logs more than we expect at DEBUG. It runs on the finished line, so it covers the message, its
arguments, extra fields and exception text alike, in the spelling JSON gives them.

A line is ``{"ts": …, "level": …, "logger": …, "msg": …, <extra fields>, "exc": …}``; extra fields
whose value is None are left out. ``LineTemplate`` writes lines of one fixed shape cheaply (the
access log writes one per RPC), the same line as ``extra`` would.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring  # what json.dumps(str, ensure_ascii=False) uses
from typing import Any

# Attributes every LogRecord has; anything else was passed in ``extra`` and becomes a JSON field.
_BASE = vars(logging.LogRecord("", 0, "", 0, "", None, None))
_STANDARD = frozenset(_BASE) | {"message", "asctime", "taskName"}
_STANDARD_COUNT = len(_BASE)
REDACTED = "[REDACTED]"
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)
# The end of a line's "ts" field by its milliseconds: a look-up costs a third of formatting them.
_MILLISECONDS = tuple(f'{ms:03d}Z", ' for ms in range(1000))


def _json(value: object) -> str:
    """``value`` as json.dumps(value, ensure_ascii=False, default=str) spells it, quicker for the
    types log fields have (json.dumps builds an encoder per call)."""
    if isinstance(value, str):
        return encode_basestring(value)
    if type(value) is int:
        return repr(value)
    if type(value) is float and math.isfinite(value):
        return repr(value)
    return _ENCODER.encode(value)


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Each secret as the line spells it: JSON-escaped, and also its repr() (exception messages
        # often show values so) JSON-escaped; longest first, so one that contains another goes whole.
        spellings = {spelling for s in secrets if len(s) >= 4 for spelling in (s, repr(s)[1:-1])}
        forms = {form for s in spellings for form in (s, encode_basestring(s)[1:-1])}
        self._secrets = sorted(forms, key=len, reverse=True)
        self._second: tuple[int, str] = (-1, "")  # one tuple: threads may share the formatter

    def _timestamp(self, created: float) -> str:
        # strftime once a second, not once a line: a busy second has thousands of lines.
        second, start = self._second
        if int(created) != second:
            second = int(created)
            start = f'{{"ts": "{time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))}.'
            self._second = second, start
        # The milliseconds truncated, as LogRecord's msecs.
        return start + _MILLISECONDS[int((created - second) * 1000)]

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record, _TemplateRecord):
            return self.template_line(record.template, record.values, record.created)
        return self._scrubbed(self._timestamp(record.created) + self._render(record))

    def template_line(self, template: LineTemplate, values: tuple[object, ...], created: float) -> str:
        """The line of a ``LineTemplate``'s record of ``values`` made at ``created``."""
        return self._scrubbed(self._timestamp(created) + template.render(values))

    def _scrubbed(self, line: str) -> str:
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, REDACTED)
        return line

    def _render(self, record: logging.LogRecord) -> str:
        parts = [
            f'"level": {_json(record.levelname)}, "logger": {_json(record.name)}, '
            f'"msg": {_json(record.getMessage())}'
        ]
        # LogRecord.__init__ sets its attributes first, then makeRecord adds ``extra``: only what
        # comes after the standard ones needs looking at (in the order the caller gave it).
        parts.extend(
            f", {_json(key)}: {_json(value)}"
            for key, value in itertools.islice(vars(record).items(), _STANDARD_COUNT, None)
            if value is not None and key not in _STANDARD
        )
        if record.exc_info:
            parts.append(f', "exc": {_json(self.formatException(record.exc_info))}')
        parts.append("}")
        return "".join(parts)


class LineTemplate:
    """Lines of one shape, written cheaply: one logger, level and message, constant fields, then
    variable fields in a fixed order.

    For a line written very often (the access log's, once per RPC). The constant part is JSON once
    and for all; JsonFormatter adds only the timestamp and the variable fields, and scrubs the line
    like any other. Where the record would reach one handler only, a plain ``StreamHandler`` with a
    JsonFormatter (``configure``'s), ``emit`` makes no record: it writes the line as that handler
    would (its lock, write, flush; ``handleError`` on failure), at half the cost of the record's
    way through ``Logger.handle``. Otherwise the record is made, skipping ``Logger.log``'s
    work (LogRecord's ``__init__``, the ``extra`` checks), and goes through ``Logger.handle``
    (filters, handlers, propagation) with every field as an attribute, as with ``extra``.
    """

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        msg: str,
        constant: Mapping[str, object],
        variable: tuple[str, ...],
    ) -> None:
        self.logger = logger
        self.level = level
        self.variable = variable
        # A real record's attributes, for handlers that read them (thread and process are the
        # template maker's: the event loop's thread).
        base = vars(logging.LogRecord(logger.name, level, "(unknown file)", 0, msg, (), None))
        self.attributes = {**base, "funcName": "(unknown function)", **constant}
        self.created: float = base["created"]
        head = (
            f'"level": {_json(logging.getLevelName(level))}, "logger": {_json(logger.name)}, '
            f'"msg": {_json(msg)}'
        )
        self._head = head + "".join(
            f", {_json(key)}: {_json(value)}" for key, value in constant.items() if value is not None
        )
        self._keys = tuple(f", {_json(key)}: " for key in variable)

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(self.level)

    def emit(self, *values: object) -> None:
        """Log one line; ``values`` in the order of ``variable``. The caller checks ``enabled()``."""
        route = self._only_handler()
        if route is None:
            self.logger.handle(_TemplateRecord(self, values))
            return
        handler, formatter = route
        # Handler.handle's and StreamHandler.emit's work, with the line made from the values.
        try:
            line = formatter.template_line(self, values, time.time())
            handler.acquire()
            try:
                stream = handler.stream
                stream.write(line + handler.terminator)
                if hasattr(stream, "flush"):
                    stream.flush()
            finally:
                handler.release()
        except RecursionError:  # as StreamHandler.emit
            raise
        except Exception:
            handler.handleError(_TemplateRecord(self, values))

    def _only_handler(self) -> tuple[logging.StreamHandler[Any], JsonFormatter] | None:
        """The handler that a record would reach (and its formatter), if it is the only one and
        writing the line to it without a record is all that ``Logger.handle`` would do: a plain
        StreamHandler (not a subclass, which may emit otherwise) with a JsonFormatter, no filters,
        and a level the record passes; the logger enabled and without filters. Looked at on every
        line: handlers come and go at run time (tests add theirs), and the walk costs less than a
        record.
        """
        logger = self.logger
        if logger.disabled or logger.filters:
            return None
        found: logging.Handler | None = None
        current: logging.Logger | None = logger
        while current is not None:  # Logger.callHandlers' walk
            for handler in current.handlers:
                if found is not None:
                    return None
                found = handler
            current = current.parent if current.propagate else None
        # None found: logging's last resort writes the line. One that needs the record: it has it.
        if type(found) is not logging.StreamHandler or found.filters or self.level < found.level:
            return None
        formatter = found.formatter
        if type(formatter) is not JsonFormatter:
            return None
        return found, formatter

    def render(self, values: tuple[object, ...]) -> str:
        """The line after its timestamp."""
        line = self._head
        for key, value in zip(self._keys, values, strict=True):
            if value is not None:  # a str is most values: _json's first case, without the call
                line += key + (encode_basestring(value) if type(value) is str else _json(value))
        return line + "}"


class _TemplateRecord(logging.LogRecord):
    def __init__(self, template: LineTemplate, values: tuple[object, ...]) -> None:
        # LogRecord.__init__ is not called: the template's attributes are those it would set.
        fields = self.__dict__
        fields.update(template.attributes)
        fields.update(zip(template.variable, values, strict=True))
        self.created = now = time.time()
        self.msecs = (now - int(now)) * 1000
        self.relativeCreated = template.attributes["relativeCreated"] + (now - template.created) * 1000
        self.template = template
        self.values = values


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
