"""The authorization policy (gRFC A43 and the SdkAppId extension): reading it from JSON and YAML,
every way a policy can be malformed named by rule and field in one line, the decisions, the modes,
the metric, and the file reloaded under running decisions (real files, the poll driven by hand)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiw_facade import authz, cli, logs, settings
from tiw_facade.authz import (
    MAX_RULE_LABELS,
    Authorizer,
    AuthzConfig,
    Decision,
    DecisionCounter,
    PolicyError,
    PolicyFile,
    parse_policy,
)
from tiw_facade.authz_policy import MAX_CACHED_DECISIONS, MAX_CACHED_METHODS
from tiw_facade.metrics import Metrics

TIW = "/tiw.v20190919.TiwService"
WATCHER = "/tiw.facade.v1.TaskWatcher"
STOP = f"{TIW}/StopWhiteboardPush"
CREATE = f"{TIW}/CreateSnapshotTask"
DESCRIBE_PUSH = f"{TIW}/DescribeWhiteboardPush"
WATCH_PUSH = f"{WATCHER}/WatchWhiteboardPush"
METHODS = (
    CREATE,
    f"{TIW}/DescribeSnapshotTask",
    DESCRIBE_PUSH,
    STOP,
    f"{TIW}/DescribeVideoGenerationTask",
    f"{WATCHER}/WatchSnapshotTask",
    WATCH_PUSH,
    f"{WATCHER}/WatchVideoGenerationTask",
)
APP = 1400000001
OTHER_APP = 1400000002
OPERATOR = "system:serviceaccount:recording:push-operator"
CLASSROOM = "system:serviceaccount:classroom:web"
BILLING = "system:serviceaccount:billing:invoice-renderer"

# The production overlay's example, as a dict: deny first, prefixes, an SdkAppId restriction.
POLICY: dict[str, Any] = {
    "name": "tiw-facade",
    "deny_rules": [
        {
            "name": "classroom-never-stops-pushes",
            "source": {"principals": ["system:serviceaccount:classroom:*"]},
            "request": {"paths": [STOP]},
        }
    ],
    "allow_rules": [
        {
            "name": "recording-operator-manages-pushes",
            "source": {"principals": [OPERATOR]},
            "request": {"paths": [STOP, DESCRIBE_PUSH, WATCH_PUSH]},
        },
        {
            "name": "classroom-reads",
            "source": {"principals": ["system:serviceaccount:classroom:*"]},
            "request": {"paths": [f"{TIW}/Describe*", f"{WATCHER}/*"]},
        },
        {
            "name": "billing-snapshots-its-app",
            "source": {"principals": [BILLING]},
            "request": {"paths": [CREATE, f"{TIW}/DescribeSnapshotTask"], "sdk_app_ids": [APP]},
        },
    ],
}


def policy_of(document: object, **options: Any) -> authz.Policy:
    return parse_policy(json.dumps(document), **options)


def error_of(document: object, **options: Any) -> str:
    text = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, **options)
    message = str(caught.value)
    assert "\n" not in message, "one line"
    return message


def allow(*rules: object, deny: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A policy of these allow rules (and deny rules); a rule may be anything, to be refused."""
    document: dict[str, Any] = {"name": "p", "allow_rules": list(rules)}
    if deny is not None:
        document["deny_rules"] = deny
    return document


def decided(policy: authz.Policy, principal: str | None, method: str, app: int | None = APP) -> str | None:
    """The deciding rule's name when allowed, ``DENY:<rule>`` when denied."""
    decision = policy.decide(principal, method, app)
    return decision.rule if decision.allowed else f"DENY:{decision.rule}"


# --- reading: JSON, YAML, by extension or by content ----------------------------------------------


def test_the_same_policy_in_json_and_yaml_decides_the_same(tmp_path: Path) -> None:
    as_json, as_yaml = json.dumps(POLICY, indent=2), yaml.safe_dump(POLICY, sort_keys=False)
    policies = [
        parse_policy(as_json),
        parse_policy(as_json, filename="policy.json"),
        parse_policy(as_yaml),  # no extension: JSON first, then YAML
        parse_policy(as_yaml, filename="/etc/tiw/policy.yaml"),
        parse_policy(as_yaml, filename="policy.YML"),
        parse_policy(as_json, filename="policy.yaml"),  # JSON is YAML too
    ]
    calls = [
        (OPERATOR, STOP, APP),
        (CLASSROOM, STOP, APP),
        (CLASSROOM, DESCRIBE_PUSH, APP),
        (BILLING, CREATE, APP),
        (BILLING, CREATE, OTHER_APP),
        (None, DESCRIBE_PUSH, APP),
    ]
    expected = [
        "recording-operator-manages-pushes",
        "DENY:classroom-never-stops-pushes",
        "classroom-reads",
        "billing-snapshots-its-app",
        "DENY:None",
        "DENY:None",
    ]
    for policy in policies:
        assert policy.name == "tiw-facade"
        assert policy.deny_rules == ("classroom-never-stops-pushes",)
        assert [decided(policy, *call) for call in calls] == expected


def test_yaml_with_comments_and_flow_style_is_read() -> None:
    text = (
        "# who may stop pushes\n"
        "name: p\n"
        "allow_rules:\n"
        "  - {name: operator, source: {principals: ['"
        + OPERATOR
        + "']}, request: {sdk_app_ids: ["
        + str(APP)
        + "]}}\n"
    )
    policy = parse_policy(text)
    assert decided(policy, OPERATOR, STOP) == "operator"
    assert decided(policy, OPERATOR, STOP, OTHER_APP) == "DENY:None"


def test_the_production_overlays_example_policy_is_valid() -> None:
    path = Path(__file__).resolve().parent.parent / "k8s" / "overlays" / "production" / "authz-policy.yaml"
    if not path.exists():
        pytest.skip("no example policy in the production overlay")
    policy = parse_policy(path.read_text(), filename=str(path), methods=METHODS)
    assert policy.allow_rules, "an example that allows nothing"


# --- validation: one line naming the rule and the field -------------------------------------------

RULE = {"name": "a"}

MALFORMED: list[tuple[object, str]] = [
    # The policy itself.
    ([], "policy: must be an object with name and allow_rules, not a list"),
    ("", "policy: the file is empty"),
    ("  # only a comment\n", "policy: the file is empty"),
    ({"allow_rules": [RULE]}, "policy: name: required, a non-empty string"),
    ({"name": "", "allow_rules": [RULE]}, "policy: name: required, a non-empty string"),
    ({"name": 7, "allow_rules": [RULE]}, "policy: name: required, a non-empty string"),
    ({"name": "p"}, 'policy "p": allow_rules: required (A43): at least one rule'),
    ({"name": "p", "allow_rules": []}, 'policy "p": allow_rules: required (A43): at least one rule'),
    ({"name": "p", "allow_rules": RULE}, 'policy "p": allow_rules: must be a list of rules, not an object'),
    (
        {"name": "p", "allow_rules": [RULE], "audit_logging_options": {}},
        'policy "p": audit_logging_options: unknown field (known here: name, deny_rules, allow_rules)',
    ),
    (
        {"name": "p", "allow_rules": [RULE], "deny_rules": "everyone"},
        'policy "p": deny_rules: must be a list of rules, not "everyone"',
    ),
    # A rule's name.
    (allow("x"), 'policy rule (allow_rules[0]): rule: must be an object with a name, not "x"'),
    (allow({}), "policy rule (allow_rules[0]): name: required"),
    (allow({"source": {}}), "policy rule (allow_rules[0]): name: required"),
    (
        allow({"name": "has space"}),
        "policy rule (allow_rules[0]): name: must be 1 to 128 letters, digits, '-', '_', '.', ':', '/' "
        "or '@', starting with a letter or digit, not \"has space\"",
    ),
    (
        allow({"name": 3}),
        "policy rule (allow_rules[0]): name: must be 1 to 128 letters, digits, '-', "
        "'_', '.', ':', '/' or '@', starting with a letter or digit, not 3",
    ),
    (
        allow({"name": "other"}),
        "policy rule \"other\" (allow_rules[0]): name: 'other' is reserved (a label value of "
        "tiw_authz_decisions_total)",
    ),
    (
        allow(RULE, deny=[{"name": "none"}]),
        "policy rule \"none\" (deny_rules[0]): name: 'none' is reserved (a label value of "
        "tiw_authz_decisions_total)",
    ),
    (
        allow(RULE, {"name": "b"}, RULE),
        'policy rule "a" (allow_rules[2]): name: another rule of allow_rules has this name',
    ),
    # A rule's fields.
    (
        allow({"name": "a", "when": {}}),
        'policy rule "a" (allow_rules[0]): when: unknown field (known here: name, source, request)',
    ),
    (
        allow({"name": "a", "source": []}),
        'policy rule "a" (allow_rules[0]): source: must be an object, not a list',
    ),
    (
        allow({"name": "a", "request": None}),
        'policy rule "a" (allow_rules[0]): request: must be an object, not null',
    ),
    (
        allow({"name": "a", "source": {"namespaces": ["billing"]}}),
        'policy rule "a" (allow_rules[0]): source.namespaces: unknown field (known here: principals)',
    ),
    # Principals.
    (
        allow({"name": "a", "source": {"principals": OPERATOR}}),
        'policy rule "a" (allow_rules[0]): source.principals: must be a list of strings, not '
        '"system:serviceaccount:recording:push...',
    ),
    (
        allow({"name": "a", "source": {"principals": []}}),
        'policy rule "a" (allow_rules[0]): source.principals: must not be empty (leave it out of source '
        "to match any)",
    ),
    (
        allow({"name": "a", "source": {"principals": [OPERATOR, 1]}}),
        'policy rule "a" (allow_rules[0]): source.principals[1]: must be a string, not 1',
    ),
    (
        allow({"name": "a", "source": {"principals": ["system:*:billing"]}}),
        "policy rule \"a\" (allow_rules[0]): source.principals[0]: a '*' may only start or end a "
        'pattern, or be the whole of it, not "system:*:billing"',
    ),
    (
        allow({"name": "a", "source": {"principals": ["*billing*"]}}),
        "policy rule \"a\" (allow_rules[0]): source.principals[0]: a '*' may only start or end a "
        'pattern, or be the whole of it, not "*billing*"',
    ),
    (
        allow({"name": "a", "source": {"principals": ["**"]}}),
        "policy rule \"a\" (allow_rules[0]): source.principals[0]: a '*' may only start or end a "
        'pattern, or be the whole of it, not "**"',
    ),
    # The request.
    (
        allow({"name": "a", "request": {"headers": [{"key": "tiw-caller", "values": ["x"]}]}}),
        'policy rule "a" (allow_rules[0]): request.headers: headers are not supported by this facade '
        "(match on principals, paths and sdk_app_ids)",
    ),
    (
        allow({"name": "a", "request": {"methods": ["POST"]}}),
        'policy rule "a" (allow_rules[0]): request.methods: unknown field (known here: paths, sdk_app_ids)',
    ),
    (
        allow({"name": "a", "request": {"paths": []}}),
        'policy rule "a" (allow_rules[0]): request.paths: must not be empty (leave it out of request to '
        "match any)",
    ),
    (
        allow({"name": "a", "request": {"paths": ["tiw.v20190919.TiwService/StopWhiteboardPush"]}}),
        'policy rule "a" (allow_rules[0]): request.paths[0]: must be a full method name such as '
        "/tiw.v20190919.TiwService/StopWhiteboardPush (or a pattern of one), not "
        '"tiw.v20190919.TiwService/StopWhitebo...',
    ),
    (
        allow({"name": "a", "request": {"paths": [f"{TIW}/*/Stop"]}}),
        "policy rule \"a\" (allow_rules[0]): request.paths[0]: a '*' may only start or end a pattern, "
        'or be the whole of it, not "/tiw.v20190919.TiwService/*/Stop"',
    ),
    # The SdkAppIds: the brief's own example first.
    (
        allow(RULE, deny=[{"name": "deny-stop", "request": {"paths": [STOP], "sdk_app_ids": [APP, "abc"]}}]),
        'policy rule "deny-stop" (deny_rules[0]): request.sdk_app_ids[1]: must be an integer, not "abc"',
    ),
    (
        allow({"name": "a", "request": {"sdk_app_ids": [str(APP)]}}),
        'policy rule "a" (allow_rules[0]): request.sdk_app_ids[0]: must be an integer, not "1400000001"',
    ),
    (
        allow({"name": "a", "request": {"sdk_app_ids": [True]}}),
        'policy rule "a" (allow_rules[0]): request.sdk_app_ids[0]: must be an integer, not a boolean',
    ),
    (
        allow({"name": "a", "request": {"sdk_app_ids": [1.5]}}),
        'policy rule "a" (allow_rules[0]): request.sdk_app_ids[0]: must be an integer, not 1.5',
    ),
    (
        allow({"name": "a", "request": {"sdk_app_ids": [0]}}),
        'policy rule "a" (allow_rules[0]): request.sdk_app_ids[0]: must be an SdkAppId (1 to 2^64-1), not 0',
    ),
    (
        allow({"name": "a", "request": {"sdk_app_ids": [1 << 64]}}),
        'policy rule "a" (allow_rules[0]): request.sdk_app_ids[0]: must be an SdkAppId (1 to 2^64-1), '
        f"not {1 << 64}",
    ),
    (
        allow({"name": "a", "request": {"sdk_app_ids": APP}}),
        'policy rule "a" (allow_rules[0]): request.sdk_app_ids: must be a list of integers, not 1400000001',
    ),
    (
        allow({"name": "a", "request": {"sdk_app_ids": []}}),
        'policy rule "a" (allow_rules[0]): request.sdk_app_ids: must not be empty (leave it out of '
        "request to match any)",
    ),
    # Text that is no policy at all: where, never the text around it.
    ('{"name": "p", "allow_rules": [}', "policy: not valid JSON: Expecting value at line 1, column 31"),
    # Not JSON (a trailing comma), but YAML: read as YAML.
    ('{"name": "p", "allow_rules": [],}', 'policy "p": allow_rules: required (A43): at least one rule'),
    (
        '{"name": "p", "name": "q", "allow_rules": [{"name": "a"}]}',
        'policy: the key "name" appears twice in one object',
    ),
    ("name: p\nallow_rules:\n  - name: a\nname: q\n", 'policy: the key "name" appears twice in one mapping'),
    (
        "name: p\nallow_rules: [\n",
        "policy: not valid YAML: expected the node content, but found '<stream end>' at line 3, column 1",
    ),
    (
        "name: p\n  bad: indentation: here\n",
        "policy: not valid YAML: mapping values are not allowed here at line 2, column 6",
    ),
]


@pytest.mark.parametrize(("document", "message"), MALFORMED)
def test_a_malformed_policy_is_one_line_naming_the_rule_and_the_field(document: object, message: str) -> None:
    assert error_of(document) == message


def test_a_json_file_is_read_as_json_only_and_a_yaml_file_as_yaml() -> None:
    assert error_of("name: p\n", filename="policy.json").startswith("policy: not valid JSON: Expecting value")
    # A YAML file's error is YAML's, even when it looks like JSON.
    assert error_of('{"name": "p",, }', filename="p.yaml").startswith("policy: not valid YAML:")


def test_a_path_must_match_a_served_method_when_they_are_given() -> None:
    typo = allow(RULE, deny=[{"name": "no-stops", "request": {"paths": [f"{TIW}/StopWhiteboardPsh"]}}])
    assert error_of(typo, methods=METHODS) == (
        'policy rule "no-stops" (deny_rules[0]): request.paths[0]: matches no method this facade '
        'serves: "/tiw.v20190919.TiwService/StopWhiteb...'
    )
    assert error_of(allow({"name": "a", "request": {"paths": ["/tiw.v1.*"]}}), methods=METHODS).endswith(
        'matches no method this facade serves: "/tiw.v1.*"'
    )
    # Without the methods, a path is taken as written; with them, patterns that match one pass.
    policy_of(typo)
    fine = [STOP, f"{TIW}/*", f"{WATCHER}/Watch*", "*/StopWhiteboardPush", "*"]
    policy_of(allow({"name": "a", "request": {"paths": fine}}), methods=METHODS)


def test_a_long_or_multiline_value_is_shown_cut_short_on_one_line() -> None:
    text = (
        'name: p\nallow_rules:\n  - name: a\n    source:\n      principals: ["a*b'
        + "x" * 500
        + '\\nline two"]\n'
    )
    message = error_of(text)
    assert len(message) < 200 and message.endswith('not "a*b' + "x" * 33 + "...")
    quoted = 'name: p\nallow_rules:\n  - name: a\n    request:\n      sdk_app_ids: ["12\\n34"]\n'
    assert error_of(quoted).endswith('request.sdk_app_ids[0]: must be an integer, not "12\\n34"')


# --- decisions: A43's matching, deny first, the SdkAppId extension -----------------------------------


def test_principal_patterns_exact_prefix_suffix_and_any_proven_caller() -> None:
    policy = policy_of(
        allow(
            {"name": "exact", "source": {"principals": [OPERATOR]}, "request": {"paths": [STOP]}},
            {
                "name": "prefix",
                "source": {"principals": ["system:serviceaccount:classroom:*"]},
                "request": {"paths": [DESCRIBE_PUSH]},
            },
            {
                "name": "suffix",
                "source": {"principals": ["*:invoice-renderer"]},
                "request": {"paths": [CREATE]},
            },
            {"name": "any-proven", "source": {"principals": ["*"]}, "request": {"paths": [WATCH_PUSH]}},
        )
    )
    assert decided(policy, OPERATOR, STOP) == "exact"
    assert decided(policy, OPERATOR + "-2", STOP) == "DENY:None"  # exact is exact
    assert decided(policy, CLASSROOM, DESCRIBE_PUSH) == "prefix"
    assert (
        decided(policy, "system:serviceaccount:classroom:", DESCRIBE_PUSH) == "prefix"
    )  # "abc*" matches "abc"
    assert decided(policy, "system:serviceaccount:classroomx:web", DESCRIBE_PUSH) == "DENY:None"
    assert decided(policy, BILLING, CREATE) == "suffix"
    assert decided(policy, "spiffe://cluster.local/ns/b/sa/invoice-renderer", CREATE) == "DENY:None"
    assert decided(policy, "x:invoice-renderer", CREATE) == "suffix"
    for anyone in (OPERATOR, "spiffe://cluster.local/ns/a/sa/b", "classroom"):
        assert decided(policy, anyone, WATCH_PUSH) == "any-proven"
    # No proven identity: "*" is "not empty" (A43), so it does not match; nor do the others.
    for method in (STOP, DESCRIBE_PUSH, CREATE, WATCH_PUSH):
        assert decided(policy, None, method) == "DENY:None"


def test_an_unproven_caller_matches_only_a_rule_without_source_or_the_empty_principal() -> None:
    policy = policy_of(
        allow(
            {"name": "anyone-reads", "request": {"paths": [f"{TIW}/Describe*"]}},
            {"name": "proven-creates", "source": {"principals": ["*"]}, "request": {"paths": [CREATE]}},
            deny=[
                {"name": "no-anonymous-stops", "source": {"principals": [""]}, "request": {"paths": [STOP]}}
            ],
        )
    )
    assert decided(policy, None, DESCRIBE_PUSH) == "anyone-reads"
    assert decided(policy, OPERATOR, DESCRIBE_PUSH) == "anyone-reads"
    assert decided(policy, None, CREATE) == "DENY:None"
    assert decided(policy, OPERATOR, CREATE) == "proven-creates"
    assert decided(policy, None, STOP) == "DENY:no-anonymous-stops"
    assert decided(policy, "", STOP) == "DENY:no-anonymous-stops"  # "" is no identity either
    assert decided(policy, OPERATOR, STOP) == "DENY:None"  # not denied, not allowed


def test_path_patterns_exact_service_wide_suffix_and_any() -> None:
    policy = policy_of(
        allow(
            {"name": "stop", "source": {"principals": ["a"]}, "request": {"paths": [STOP]}},
            {"name": "service", "source": {"principals": ["b"]}, "request": {"paths": [f"{TIW}/*"]}},
            {
                "name": "stops-anywhere",
                "source": {"principals": ["c"]},
                "request": {"paths": ["*/StopWhiteboardPush"]},
            },
            {"name": "everything", "source": {"principals": ["d"]}, "request": {"paths": ["*"]}},
        )
    )
    assert [decided(policy, "a", m) for m in (STOP, DESCRIBE_PUSH)] == ["stop", "DENY:None"]
    assert [decided(policy, "b", m) for m in (STOP, CREATE, WATCH_PUSH)] == [
        "service",
        "service",
        "DENY:None",
    ]
    assert [decided(policy, "c", m) for m in (STOP, f"{WATCHER}/StopWhiteboardPush", CREATE)] == [
        "stops-anywhere",
        "stops-anywhere",
        "DENY:None",
    ]
    assert {decided(policy, "d", m) for m in METHODS} == {"everything"}


def test_sdk_app_ids_restrict_a_rule_and_an_unknown_one_is_denied_by_deny_rules_only() -> None:
    policy = policy_of(
        allow(
            {"name": "billing-app", "source": {"principals": [BILLING]}, "request": {"sdk_app_ids": [APP]}},
            {"name": "readers", "source": {"principals": [CLASSROOM]}},
            deny=[{"name": "frozen-app", "request": {"paths": [STOP, CREATE], "sdk_app_ids": [OTHER_APP]}}],
        )
    )
    assert decided(policy, BILLING, CREATE, APP) == "billing-app"
    assert decided(policy, BILLING, CREATE, OTHER_APP) == "DENY:frozen-app"
    assert decided(policy, BILLING, DESCRIBE_PUSH, OTHER_APP) == "DENY:None"  # not its app
    assert decided(policy, CLASSROOM, STOP, APP) == "readers"
    assert decided(policy, CLASSROOM, STOP, OTHER_APP) == "DENY:frozen-app"
    # No SdkAppId known: it could be the frozen one, and it is not known to be billing's.
    assert decided(policy, CLASSROOM, STOP, None) == "DENY:frozen-app"
    assert decided(policy, BILLING, DESCRIBE_PUSH, None) == "DENY:None"
    assert decided(policy, CLASSROOM, DESCRIBE_PUSH, None) == "readers"


def test_deny_wins_over_allow_and_nothing_matching_is_denied() -> None:
    policy = policy_of(
        allow(
            {"name": "everyone-everything"},
            deny=[{"name": "nobody-stops", "request": {"paths": [STOP]}}],
        )
    )
    assert policy.decide(OPERATOR, STOP, APP) == Decision(allowed=False, rule="nobody-stops", matched="deny")
    assert policy.decide(None, CREATE, None) == Decision(
        allowed=True, rule="everyone-everything", matched="allow"
    )
    narrow = policy_of(allow({"name": "only-operator", "source": {"principals": [OPERATOR]}}))
    decision = narrow.decide(CLASSROOM, STOP, APP)
    assert decision == Decision(allowed=False, rule=None, matched=None)
    assert (decision.label, decision.explanation) == ("none", "no allow rule matched")
    assert narrow.decide(OPERATOR, STOP, APP).explanation == 'allowed by rule "only-operator"'
    assert policy.decide(OPERATOR, STOP, APP).explanation == 'denied by rule "nobody-stops"'


def test_the_first_matching_rule_of_a_list_decides() -> None:
    policy = policy_of(allow({"name": "first", "request": {"paths": [STOP]}}, {"name": "second"}))
    assert decided(policy, OPERATOR, STOP) == "first"
    assert decided(policy, OPERATOR, CREATE) == "second"


def test_methods_seen_are_remembered_up_to_a_bound_and_decided_alike_beyond_it() -> None:
    policy = policy_of(allow({"name": "stops", "request": {"paths": ["*/Stop"]}}))
    for index in range(MAX_CACHED_METHODS + 50):
        assert decided(policy, OPERATOR, f"/x.S{index}/Stop") == "stops"
        assert decided(policy, OPERATOR, f"/x.S{index}/Go") == "DENY:None"
    assert len(policy._by_method) == MAX_CACHED_METHODS


def test_decisions_are_remembered_up_to_a_bound_and_stay_right_past_it() -> None:
    policy = policy_of(allow({"name": "even-apps", "request": {"sdk_app_ids": list(range(2, 5000, 2))}}))
    for _ in range(2):  # made, then remembered (or made again once forgotten): the same
        for app in range(1, 3 * MAX_CACHED_DECISIONS):
            assert policy.decide(OPERATOR, STOP, app).allowed is (app % 2 == 0)
            assert len(policy._decided) <= MAX_CACHED_DECISIONS


# --- the authorizer: modes, metric, the file ---------------------------------------------------------


def publish(path: Path, document: object) -> None:
    """A new version as Kubernetes and editors write one: a whole new file renamed into place."""
    text = document if isinstance(document, str) else json.dumps(document, indent=1)
    staging = path.with_name(f".{path.name}.new")
    staging.write_text(text)
    os.replace(staging, path)


def decisions(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {
        (sample.labels["decision"], sample.labels["rule"]): sample.value
        for family in metrics.registry.collect()
        if family.name == "tiw_authz_decisions"
        for sample in family.samples
    }


def reload_failures(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("tiw_authz_policy_reload_failures_total")
    assert value is not None
    return value


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    publish(path, POLICY)
    return path


async def started(path: Path, metrics: Metrics, mode: authz.Mode = "enforce") -> Authorizer:
    authorizer = Authorizer(
        AuthzConfig(policy_file=str(path), mode=mode, poll=3600), metrics, methods=METHODS
    )
    await authorizer.start()
    return authorizer


async def test_enforce_refuses_what_the_policy_denies_and_counts_every_decision(policy_path: Path) -> None:
    metrics = Metrics.unobserved()
    authorizer = await started(policy_path, metrics)
    try:
        # Every series is there, at 0, before the first call.
        assert decisions(metrics) == {
            ("allow", "recording-operator-manages-pushes"): 0,
            ("allow", "classroom-reads"): 0,
            ("allow", "billing-snapshots-its-app"): 0,
            ("deny", "classroom-never-stops-pushes"): 0,
            ("deny", "none"): 0,
        }
        assert reload_failures(metrics) == 0
        stop = authorizer.authorize(CLASSROOM, STOP, APP)
        assert (stop.proceed, stop.refused, stop.outcome) == (False, True, "deny")
        assert stop.decision.rule == "classroom-never-stops-pushes"
        unmatched = authorizer.authorize(None, STOP, APP)
        assert (unmatched.proceed, unmatched.outcome, unmatched.decision.rule) == (False, "deny", None)
        ok = authorizer.authorize(OPERATOR, STOP, APP)
        assert (ok.proceed, ok.outcome, ok.decision.rule) == (
            True,
            "allow",
            "recording-operator-manages-pushes",
        )
        authorizer.authorize(OPERATOR, STOP, APP)
        counted = decisions(metrics)
        assert counted[("deny", "classroom-never-stops-pushes")] == 1
        assert counted[("deny", "none")] == 1
        assert counted[("allow", "recording-operator-manages-pushes")] == 2
        assert not [key for key in counted if key[0] == "would_deny"]
    finally:
        await authorizer.aclose()


async def test_audit_mode_lets_a_denied_call_through_as_would_deny(policy_path: Path) -> None:
    metrics = Metrics.unobserved()
    authorizer = await started(policy_path, metrics, mode="audit")
    try:
        assert ("would_deny", "classroom-never-stops-pushes") in decisions(metrics)
        verdict = authorizer.authorize(CLASSROOM, STOP, APP)
        assert (verdict.proceed, verdict.refused, verdict.outcome) == (True, False, "would_deny")
        assert verdict.decision == Decision(
            allowed=False, rule="classroom-never-stops-pushes", matched="deny"
        )
        assert authorizer.authorize(None, CREATE, APP).outcome == "would_deny"
        assert authorizer.authorize(BILLING, CREATE, APP).outcome == "allow"
        counted = decisions(metrics)
        assert counted[("would_deny", "classroom-never-stops-pushes")] == 1
        assert counted[("would_deny", "none")] == 1
        assert counted[("allow", "billing-snapshots-its-app")] == 1
        assert not [key for key in counted if key[0] == "deny"], "audit mode denies nothing"
    finally:
        await authorizer.aclose()


def test_rule_labels_are_bounded_and_the_rest_count_as_other() -> None:
    metrics = Metrics.unobserved()
    counter = DecisionCounter(metrics)
    many = policy_of(
        {"name": "p", "allow_rules": [{"name": f"rule-{index}"} for index in range(MAX_RULE_LABELS + 20)]}
    )
    for rule in many.allow_rules:
        counter.series("allow", rule)
    counter.series("allow", f"rule-{MAX_RULE_LABELS + 5}").inc()
    counter.series("deny", "none").inc()  # the label of no rule is not one of the bounded names
    counted = decisions(metrics)
    rules = {rule for _, rule in counted}
    assert len(rules - {"other", "none"}) == MAX_RULE_LABELS
    assert counted[("allow", "other")] == 1 and counted[("deny", "none")] == 1
    assert ("allow", f"rule-{MAX_RULE_LABELS + 5}") not in counted


def test_authz_settings_and_their_config(tmp_path: Path) -> None:
    base = {"TENCENTCLOUD_REGION": "ap-guangzhou"}
    unset = AuthzConfig.from_settings(settings.load(base))
    assert unset == AuthzConfig(policy_file="", mode="enforce", poll=1.0) and not unset.enabled
    config = AuthzConfig.from_settings(
        settings.load(
            {
                **base,
                "TIW_AUTHZ_POLICY_FILE": str(tmp_path / "p.yaml"),
                "TIW_AUTHZ_MODE": "Audit",
                "TIW_CREDENTIALS_POLL": "5",
            }
        )
    )
    assert (
        config == AuthzConfig(policy_file=str(tmp_path / "p.yaml"), mode="audit", poll=5.0) and config.enabled
    )
    with pytest.raises(settings.SettingsError, match="TIW_AUTHZ_MODE='deny': must be enforce or audit"):
        settings.load({**base, "TIW_AUTHZ_MODE": "deny"})
    with pytest.raises(ValueError, match="no policy file"):
        Authorizer(unset, Metrics.unobserved())


async def test_a_malformed_or_missing_policy_at_start_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("name: p\nallow_rules:\n  - name: a\n    request:\n      sdk_app_ids: [1, abc]\n")
    with pytest.raises(PolicyError) as caught:
        await started(path, Metrics.unobserved())
    assert (
        str(caught.value)
        == f'{path}: policy rule "a" (allow_rules[0]): request.sdk_app_ids[1]: must be an integer, not "abc"'
    )
    with pytest.raises(PolicyError, match=r"none\.json: cannot read \(No such file or directory\)$"):
        await started(tmp_path / "none.json", Metrics.unobserved())
    with pytest.raises(PolicyError, match=r": not a regular file$"):
        await started(tmp_path, Metrics.unobserved())
    with pytest.raises(PolicyError, match="not read yet"):
        _ = PolicyFile(str(path), poll=1, metrics=Metrics.unobserved()).policy


async def test_a_good_change_is_taken_into_use_whole(policy_path: Path) -> None:
    metrics = Metrics.unobserved()
    authorizer = await started(policy_path, metrics)
    try:
        before = authorizer.policy
        await authorizer.file.check()  # unchanged: the same policy object
        assert authorizer.policy is before
        changed = json.loads(json.dumps(POLICY))
        changed["deny_rules"][0] = {"name": "nobody-stops-pushes", "request": {"paths": [STOP]}}
        publish(policy_path, changed)
        await authorizer.file.check()
        assert authorizer.policy is not before
        assert authorizer.authorize(OPERATOR, STOP, APP).decision.rule == "nobody-stops-pushes"
        assert before.decide(OPERATOR, STOP, APP).allowed, "a decision under the old policy is unchanged"
        # The new rule's series exist before it decides anything; the old one's stay (counted so far).
        assert ("deny", "nobody-stops-pushes") in decisions(metrics)
        assert ("deny", "classroom-never-stops-pushes") in decisions(metrics)
        assert reload_failures(metrics) == 0
    finally:
        await authorizer.aclose()


async def test_a_file_edited_in_place_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "policy"  # no extension: JSON or YAML by content
    path.write_text(json.dumps(allow({"name": "everyone"})))
    authorizer = await started(path, Metrics.unobserved())
    try:
        with path.open("w") as same_inode:
            same_inode.write(
                "name: p\nallow_rules:\n  - name: only-operator\n    source: {principals: ["
                + OPERATOR
                + "]}\n"
            )
        await authorizer.file.check()
        assert authorizer.authorize(CLASSROOM, CREATE, APP).refused
        assert authorizer.authorize(OPERATOR, CREATE, APP).decision.rule == "only-operator"
    finally:
        await authorizer.aclose()


async def test_a_malformed_change_keeps_the_last_good_policy_with_one_error_line(
    policy_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics.unobserved()
    authorizer = await started(policy_path, metrics)
    try:
        good = authorizer.policy
        broken = json.loads(json.dumps(POLICY))
        broken["allow_rules"][2]["source"]["principals"] = ["system:serviceaccount:secret-team:*", 42]
        with caplog.at_level(logging.INFO, logger="tiw_facade.authz"):
            publish(policy_path, broken)
            for _ in range(3):  # polled again and again: still one line, one count
                await authorizer.file.check()
        assert authorizer.policy is good
        assert authorizer.authorize(OPERATOR, STOP, APP).proceed
        assert reload_failures(metrics) == 1
        (record,) = [r for r in caplog.records if r.name == "tiw_facade.authz"]
        assert record.levelno == logging.ERROR
        line = logs.JsonFormatter().format(record)
        assert "\n" not in line
        fields = json.loads(line)
        assert fields["msg"] == "authorization policy file ignored: the last good policy stays in use"
        assert fields["policy_file"] == str(policy_path)
        assert fields["error"] == (
            'policy rule "billing-snapshots-its-app" (allow_rules[2]): source.principals[1]: '
            "must be a string, not 42"
        )
        assert "secret-team" not in line and "recording" not in line, "no policy content beyond the error"

        # Half written, then whole: the next good version is taken, no further failure counted.
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tiw_facade.authz"):
            publish(policy_path, json.dumps(allow({"name": "everyone"}))[:-7])
            await authorizer.file.check()
            publish(policy_path, allow({"name": "everyone-again"}))
            await authorizer.file.check()
        assert reload_failures(metrics) == 2
        assert [r.levelname for r in caplog.records if r.name == "tiw_facade.authz"] == ["ERROR", "INFO"]
        assert authorizer.authorize(None, STOP, None).decision.rule == "everyone-again"
    finally:
        await authorizer.aclose()


async def test_a_deleted_file_keeps_the_last_good_policy(
    policy_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics.unobserved()
    authorizer = await started(policy_path, metrics)
    try:
        with caplog.at_level(logging.ERROR, logger="tiw_facade.authz"):
            os.unlink(policy_path)
            await authorizer.file.check()
            await authorizer.file.check()
        assert reload_failures(metrics) == 1
        (record,) = caplog.records
        assert record.error == "cannot read (No such file or directory)"  # type: ignore[attr-defined]
        assert authorizer.authorize(OPERATOR, STOP, APP).proceed
        publish(policy_path, POLICY)
        await authorizer.file.check()
        assert authorizer.authorize(CLASSROOM, STOP, APP).refused
    finally:
        await authorizer.aclose()


async def test_calls_decided_while_the_policy_swaps_never_fail_and_see_whole_versions(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    # Version i allows STOP by rule "stop-i" and everything else by rule "rest-i".
    versions = [
        allow({"name": f"stop-{index}", "request": {"paths": [STOP]}}, {"name": f"rest-{index}"})
        for index in range(20)
    ]
    publish(path, versions[0])
    authorizer = await started(path, Metrics.unobserved())
    seen: list[tuple[int, int]] = []
    swapping = True

    def version_of(verdict: authz.Verdict) -> int:
        assert verdict.proceed and verdict.decision.rule is not None
        return int(verdict.decision.rule.rpartition("-")[2])

    async def caller() -> None:
        while swapping:
            stop = version_of(authorizer.authorize(OPERATOR, STOP, APP))
            rest = version_of(authorizer.authorize(OPERATOR, CREATE, APP))
            seen.append((stop, rest))
            await asyncio.sleep(0)

    callers = [asyncio.create_task(caller()) for _ in range(4)]
    try:
        for version in versions[1:]:
            # Each version of another size: a same-sized file of a reused inode written within the
            # same clock tick would look unchanged. The swap happens while the callers run (check()
            # awaits a worker thread).
            publish(path, json.dumps(version, indent=versions.index(version)))
            await authorizer.file.check()
        swapping = False
        await asyncio.gather(*callers)  # re-raises a caller's failed assertion
    finally:
        await authorizer.aclose()
    assert authorizer.policy.allow_rules == ("stop-19", "rest-19")
    assert len({stop for stop, _ in seen}) > 5, "calls were decided across many versions"
    # One policy in use at a time, only ever replaced by a newer one.
    assert all(stop <= rest for stop, rest in seen)
    assert [stop for stop, _ in seen] == sorted(stop for stop, _ in seen)


async def test_the_poll_finds_a_change_by_itself(policy_path: Path) -> None:
    authorizer = Authorizer(AuthzConfig(policy_file=str(policy_path), poll=0.01), Metrics.unobserved())
    await authorizer.start()
    try:
        publish(policy_path, allow({"name": "everyone-now"}))
        for _ in range(500):
            if authorizer.policy.allow_rules == ("everyone-now",):
                break
            await asyncio.sleep(0.01)
        assert authorizer.authorize(None, STOP, None).decision.rule == "everyone-now"
    finally:
        await authorizer.aclose()


# --- the command: a malformed policy at start-up is one line and exit status 2 ------------------------


def test_the_cli_reports_a_malformed_policy_in_one_line_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("name: p\nallow_rules:\n  - name: a\n    source: {principals: []}\n")
    for name, value in {
        "TENCENTCLOUD_SECRET_ID": "AKIDx",
        "TENCENTCLOUD_SECRET_KEY": "k-secret",
        "TENCENTCLOUD_REGION": "ap-guangzhou",
        "TIW_AUTHZ_POLICY_FILE": str(path),
    }.items():
        monkeypatch.setenv(name, value)

    async def serve(config: settings.Settings, **_: object) -> int:
        # What the server does first with a policy file: read it (the rest is the server's tests').
        await Authorizer(AuthzConfig.from_settings(config), Metrics.unobserved()).start()
        return 0

    monkeypatch.setattr(cli, "_serve", serve)
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)  # the test's logging stays
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err == (
        f'tiw-facade: authorization policy: {path}: policy rule "a" (allow_rules[0]): source.principals: '
        "must not be empty (leave it out of source to match any)\n"
    )


def test_a_subscription_is_judged_by_its_one_sdk_app_id_and_several_as_unknown() -> None:
    """WatchEvents filters on a set of SdkAppIds. With one, a rule restricted to SdkAppIds judges it
    as a call for that one; with several or none (every application's events), the SdkAppId is
    unknown, which only a rule for every SdkAppId allows: a caller allowed one application's
    events never gets another's by asking for all of them."""
    from tiw_facade._proto.tiw.facade.v1 import events_pb2
    from tiw_facade.access import Call

    method = "/tiw.facade.v1.EventStream/WatchEvents"
    assert Call(method, events_pb2.WatchEventsRequest(sdk_app_ids=[APP])).sdk_app_id == APP
    assert Call(method, events_pb2.WatchEventsRequest(sdk_app_ids=[APP, OTHER_APP])).sdk_app_id is None
    assert Call(method, events_pb2.WatchEventsRequest()).sdk_app_id is None
    policy = parse_policy(
        json.dumps(
            {
                "name": "events",
                "allow_rules": [
                    {
                        "name": "classroom-events",
                        "source": {"principals": [CLASSROOM]},
                        "request": {"paths": [method], "sdk_app_ids": [APP]},
                    }
                ],
            }
        )
    )
    assert policy.decide(CLASSROOM, method, APP).allowed
    assert not policy.decide(CLASSROOM, method, None).allowed
    assert not policy.decide(CLASSROOM, method, OTHER_APP).allowed
