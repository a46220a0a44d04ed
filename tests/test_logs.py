"""JSON log lines: their format, the access log's cheap records, and secrets scrubbed from every line."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from tiw_facade import logs
from tiw_facade.interceptor import LINE_FIELDS

# A secret as Tencent's keys look, and one whose JSON and repr() spellings differ from it.
PLAIN = "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE"
ESCAPED = 'pa"ss\\wörd\t42'
SECRETS = (PLAIN, ESCAPED)
# Every way a secret can be spelled in a line that JsonFormatter wrote.
SPELLINGS = {
    form
    for secret in SECRETS
    for spelling in (secret, repr(secret)[1:-1])
    for form in (spelling, json.dumps(spelling, ensure_ascii=False)[1:-1], json.dumps(spelling)[1:-1])
}

# Run in a child process, so that what is checked is the real stderr handler's output: every logger
# the facade's process has, the secret in the message, its arguments, extra fields and exception
# text. It prints to stdout how many lines it logged.
PROBE = textwrap.dedent(
    """
    import asyncio, logging, sys
    from tiw_facade import logs
    from tiw_facade.interceptor import LINE_FIELDS
    loop = asyncio.new_event_loop()  # before configure: its DEBUG line has no secret to scrub
    logs.configure("DEBUG", secrets=tuple(sys.argv[1:]))
    count = 0
    for name in ("tiw_facade.upstream", "tiw_facade.server", "aiohttp.client", "aiohttp.server",
                 "aiohttp.access", "grpc", "grpc._cython.cygrpc", "asyncio", ""):
        log = logging.getLogger(name)
        for secret in {plain!r}, {escaped!r}:
            log.warning("in the message: " + secret)
            log.info("in the arguments: %s and %r", secret, secret)
            log.error("in extra fields", extra={{"key": secret, "headers": {{"Authorization": secret}},
                                                 "body": secret.encode()}})
            try:
                raise RuntimeError(f"in the exception: {{secret}} and {{secret!r}}")
            except RuntimeError:
                log.exception("in the exception text")
            count += 4
    line = logs.LineTemplate(logging.getLogger("tiw_facade.rpc"), logging.INFO, "rpc",
                             {{"grpc_method": "/s/m"}}, LINE_FIELDS)
    for secret in {plain!r}, {escaped!r}:
        line.emit("OK", 1.0, "Action", secret, secret, secret)  # as TIW's RequestId, code; a caller
        count += 1

    async def main():
        def boom():
            raise RuntimeError("from a callback: " + {plain!r})
        asyncio.get_running_loop().call_soon(boom)  # asyncio logs it itself, with the traceback
        await asyncio.sleep(0.05)
    loop.run_until_complete(main())
    count += 1
    print(count)
    """
).format(plain=PLAIN, escaped=ESCAPED)


def probe(*secrets: str) -> tuple[int, list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *secrets], capture_output=True, text=True, timeout=60, check=True
    )
    return int(result.stdout), result.stderr.splitlines()


def test_every_line_of_every_logger_is_scrubbed() -> None:
    logged, lines = probe(*SECRETS)
    assert len(lines) == logged
    for line in lines:
        json.loads(line)  # each is one JSON object still
        assert logs.REDACTED in line, line
        leaked = [spelling for spelling in SPELLINGS if spelling in line]
        assert not leaked, line


def test_without_secrets_configured_every_probe_line_shows_one() -> None:
    """The probe above can fail: unscrubbed, each of its lines carries a secret."""
    logged, lines = probe()
    assert len(lines) == logged
    for line in lines:
        assert any(spelling in line for spelling in SPELLINGS), line


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    log = logging.getLogger("test_logs")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter(secrets=SECRETS))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log, stream
    log.removeHandler(handler)
    log.propagate = True
    log.setLevel(logging.NOTSET)


def test_a_line_is_one_json_object_with_the_common_fields_first(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = captured
    log.warning("hello %s", "world", extra={"port": 8080, "ratio": 0.5, "none": None, "on": True})
    line = stream.getvalue()
    assert line.endswith("}\n") and line.count("\n") == 1
    entry = json.loads(line)
    assert list(entry) == ["ts", "level", "logger", "msg", "port", "ratio", "on"]  # None is left out
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
    assert entry | {"ts": None} == {
        "ts": None,
        "level": "WARNING",
        "logger": "test_logs",
        "msg": "hello world",
        "port": 8080,
        "ratio": 0.5,
        "on": True,
    }


def test_the_access_template_writes_the_line_extra_would(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = captured
    fields = {
        "grpc_method": "/tiw.v20190919.TiwService/DescribeWhiteboardPush",
        "grpc_code": "NOT_FOUND",
        "duration_ms": 12.345,
        "tiw_action": "DescribeWhiteboardPush",
        "tiw_request_id": "6c4f8b40-5f8b-4d3c-9e31-2a1f6f1b9a77",
        "tiw_code": None,
        "caller": "system:serviceaccount:classroom:lesson-service",
    }
    log.info("rpc", extra=fields)
    line = logs.LineTemplate(log, logging.INFO, "rpc", {"grpc_method": fields["grpc_method"]}, LINE_FIELDS)
    assert line.enabled()
    line.emit(*(fields[name] for name in LINE_FIELDS))
    by_extra, by_template = stream.getvalue().splitlines()
    assert by_template[by_template.index('"level"') :] == by_extra[by_extra.index('"level"') :]


def test_template_records_carry_their_fields_for_other_handlers() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("test_logs.keep")
    log.propagate = False
    log.addHandler(Keep())
    log.setLevel(logging.INFO)
    text = logging.Formatter("%(levelname)s %(name)s %(filename)s:%(lineno)d %(message)s %(grpc_code)s")
    logs.LineTemplate(log, logging.INFO, "rpc", {"grpc_method": "/s/m"}, LINE_FIELDS).emit(
        "OK", 1.5, None, "rid", None, None
    )
    [record] = records
    assert (record.grpc_method, record.grpc_code, record.tiw_request_id) == ("/s/m", "OK", "rid")  # type: ignore[attr-defined]
    assert text.format(record) == "INFO test_logs.keep (unknown file):0 rpc OK"
    assert record.created > 0 and 0 <= record.msecs < 1000
