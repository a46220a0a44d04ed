"""The audit trail's line: exactly its fields, written whatever the log level, and never a token, a
secret or an idempotency key (only the key's SHA-256)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from tiw_facade import audit
from tiw_facade.audit import AuditEntry, key_digest
from tiw_facade.idempotency import key_hash
from tiw_facade.logs import JsonFormatter

STOP = "/tiw.v20190919.TiwService/StopWhiteboardPush"
CREATE = "/tiw.v20190919.TiwService/CreateSnapshotTask"
OPERATOR = "system:serviceaccount:recording:push-operator"
REQUEST_ID = "6c4f8b40-5f8b-4d3c-9e31-2a1f6f1b9a77"
KEY = "order-2026-12-07-0001"
SECRET_KEY = "k-secret-of-the-account-32-chars!"
TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJzeXN0ZW0ifQ.c2lnbmF0dXJl"


@pytest.fixture
def trail() -> Iterator[io.StringIO]:
    """The lines as the facade writes them: the root logger's one handler, with the JSON formatter
    that scrubs the known secrets, and the root at ERROR (TIW_LOG_LEVEL=ERROR)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(secrets=(SECRET_KEY, TOKEN)))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.ERROR)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_stopped_push_is_one_line_with_exactly_its_fields(trail: io.StringIO) -> None:
    audit.record(
        AuditEntry(
            principal=OPERATOR,
            proven_by="token",
            method=STOP,
            sdk_app_id=1400000001,
            task_id="push-task-1",
            outcome="OK",
            tiw_request_id=REQUEST_ID,
        )
    )
    (line,) = lines(trail)  # written though the root logger is at ERROR
    assert isinstance(line.pop("ts"), str)
    assert line == {
        "level": "INFO",
        "logger": "tiw_facade.audit",
        "msg": "audit",
        "principal": OPERATOR,
        "proven_by": "token",
        "method": STOP,
        "sdk_app_id": 1400000001,
        "task_id": "push-task-1",
        "outcome": "OK",
        "tiw_request_id": REQUEST_ID,
    }
    assert list(line)[3:] == [
        "principal",
        "proven_by",
        "method",
        "sdk_app_id",
        "task_id",
        "outcome",
        "tiw_request_id",
    ]


def test_a_create_carries_the_task_created_and_the_keys_hash_never_the_key(trail: io.StringIO) -> None:
    audit.record(
        AuditEntry(
            principal="spiffe://cluster.local/ns/billing/sa/invoice-renderer",
            proven_by="certificate",
            method=CREATE,
            sdk_app_id=1400000001,
            task_id="snapshot-task-created",
            idempotency_key_sha256=key_digest(KEY),
            outcome="OK",
            tiw_request_id=REQUEST_ID,
        )
    )
    (line,) = lines(trail)
    assert line["idempotency_key_sha256"] == key_hash(KEY), "the hash the statuses and Redis use"
    assert line["task_id"] == "snapshot-task-created" and line["proven_by"] == "certificate"
    assert KEY not in trail.getvalue()
    with pytest.raises(ValueError, match="key_digest"):
        AuditEntry(principal=None, proven_by="none", method=CREATE, outcome="OK", idempotency_key_sha256=KEY)
    with pytest.raises(ValueError, match="key_digest"):
        AuditEntry(
            principal=None, proven_by="none", method=CREATE, outcome="OK", idempotency_key_sha256="A" * 64
        )


def test_a_denied_call_carries_the_decision_and_the_rule(trail: io.StringIO) -> None:
    audit.record(
        AuditEntry(
            principal="classroom",
            proven_by="claimed",
            method=STOP,
            sdk_app_id=1400000002,
            task_id="push-task-2",
            outcome="PERMISSION_DENIED",
            decision="deny",
            rule="classroom-never-stops-pushes",
        )
    )
    audit.record(
        AuditEntry(
            principal=None, proven_by="none", method=STOP, outcome="PERMISSION_DENIED", decision="deny"
        )
    )
    audit.record(
        AuditEntry(
            principal=OPERATOR, proven_by="token", method=STOP, outcome="OK", decision="would_deny", rule="r"
        )
    )
    denied, unmatched, would = lines(trail)
    for line in (denied, unmatched, would):
        del line["ts"]
    assert denied == {
        "level": "INFO",
        "logger": "tiw_facade.audit",
        "msg": "audit",
        "principal": "classroom",
        "proven_by": "claimed",
        "method": STOP,
        "sdk_app_id": 1400000002,
        "task_id": "push-task-2",
        "outcome": "PERMISSION_DENIED",
        "decision": "deny",
        "rule": "classroom-never-stops-pushes",
    }
    # Denied because no allow rule matched: a decision without a rule; nothing unknown is written.
    assert unmatched == {
        "level": "INFO",
        "logger": "tiw_facade.audit",
        "msg": "audit",
        "proven_by": "none",
        "method": STOP,
        "outcome": "PERMISSION_DENIED",
        "decision": "deny",
    }
    assert (would["decision"], would["rule"], would["outcome"]) == ("would_deny", "r", "OK")


def test_no_token_or_secret_reaches_the_line(trail: io.StringIO) -> None:
    # No field holds one; and were a caller to put one where a name goes, the formatter scrubs it.
    assert not {"token", "authorization", "secret_key", "idempotency_key"} & set(
        AuditEntry.__dataclass_fields__
    )
    audit.record(
        AuditEntry(principal=TOKEN, proven_by="claimed", method=STOP, task_id=SECRET_KEY, outcome="OK")
    )
    text = trail.getvalue()
    assert TOKEN not in text and SECRET_KEY not in text
    (line,) = lines(trail)
    assert line["principal"] == line["task_id"] == "[REDACTED]"


def test_an_entry_says_how_its_principal_was_proven() -> None:
    with pytest.raises(ValueError, match="proven_by must be one of token, certificate, claimed, none"):
        AuditEntry(principal=OPERATOR, proven_by="password", method=STOP, outcome="OK")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="proven_by 'none' has none"):
        AuditEntry(principal=OPERATOR, proven_by="none", method=STOP, outcome="OK")
    assert audit.PROOFS == ("token", "certificate", "claimed", "none")
