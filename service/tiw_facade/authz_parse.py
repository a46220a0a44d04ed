"""Reading an authorization policy: gRFC A43's JSON, or the same structure in YAML, checked whole.

``parse_policy`` gives a compiled ``Policy`` (authz_policy.py) or raises ``PolicyError`` with one
line that names the rule (its name, and its place: ``deny_rules[0]``) and the field, e.g.
``policy rule "deny-stop" (deny_rules[0]): request.sdk_app_ids[1]: must be an integer, not "abc"``.
A rejected value is quoted at most 40 characters long; a syntax error says where, never the text
around it. Unknown fields are refused, as A43 asks (a field this facade ignored could be one meant
to narrow a rule), and so is a key given twice in one object (the parser would keep one silently).

Stricter than A43, where its looseness would silently change what a policy means:

- ``request.headers`` is refused: the facade matches no header (A43's headers would be matched
  against metadata any caller writes);
- an empty list is refused (A43 reads ``"principals": []`` as "anyone"; a list emptied by a
  template would open a rule to everyone): leave the field out to mean anyone, any method;
- a ``*`` other than a pattern's first or last character is refused (A43 takes it literally);
  an exact or prefix path must start with ``/``; and, when the served methods are given, every
  path must match one of them (a mistyped deny rule would otherwise deny nothing);
- rule names are unique within their list, and written so that they are safe as a metric label
  and in a status: 1 to 128 letters, digits, ``-_.:/@``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

from tiw_facade.authz_policy import NO_RULE, OTHER_RULE, Patterns, Policy, PolicyError, Rule

__all__ = ["MAX_SDK_APP_ID", "parse_policy"]

# A rule's name travels as a metric label and in a status's ErrorInfo: nothing there needs more.
RULE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}")
RULE_NAME_RULE: Final = (
    "must be 1 to 128 letters, digits, '-', '_', '.', ':', '/' or '@', starting with a letter or digit"
)
MAX_SDK_APP_ID: Final = (1 << 64) - 1  # SdkAppId is a uint64 in the requests that carry one
_SHOWN_CHARACTERS: Final = 40

POLICY_FIELDS: Final = ("name", "deny_rules", "allow_rules")
RULE_FIELDS: Final = ("name", "source", "request")
SOURCE_FIELDS: Final = ("principals",)
REQUEST_FIELDS: Final = ("paths", "sdk_app_ids")


def _shown(value: object) -> str:
    """A rejected value, as JSON spells it, cut short: a message is one line of bounded length."""
    text = json.dumps(value, ensure_ascii=True, default=lambda item: type(item).__name__)
    return text if len(text) <= _SHOWN_CHARACTERS else text[: _SHOWN_CHARACTERS - 3] + "..."


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return _shown(value)


def parse_policy(text: str, *, filename: str = "", methods: Iterable[str] | None = None) -> Policy:
    """The policy ``text`` holds, checked and compiled; ``PolicyError`` (one line) says what is wrong.

    JSON for a ``.json`` file, YAML for ``.yaml`` or ``.yml``, else JSON and then YAML. With
    ``methods`` (the full names of the methods served), a path that matches none is refused.
    """
    document = _document(text, filename)
    return _Checker(tuple(methods) if methods is not None else None).policy(document)


def _document(text: str, filename: str) -> object:
    suffix = filename.rpartition(".")[2].lower() if "." in filename.rpartition("/")[2] else ""
    if suffix == "json":
        return _json(text)
    if suffix in {"yaml", "yml"}:
        return _yaml(text)
    try:
        return _json(text)
    except PolicyError as not_json:
        try:
            return _yaml(text)  # YAML reads more than JSON: a flow mapping, comments
        except PolicyError:
            if text.lstrip().startswith(("{", "[")):
                raise not_json from None  # meant as JSON: its error is the one that helps
            raise


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            # Whichever of the two a parser kept, half of what the author wrote would be ignored.
            raise PolicyError(f"policy: the key {_shown(key)} appears twice in one object")
        found[key] = value
    return found


def _json(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise PolicyError(
            f"policy: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None


def _yaml(text: str) -> object:
    import yaml  # only a YAML policy pays for the import

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)  # merge keys (<<) first: they may repeat nothing either
                seen: set[object] = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    try:
                        duplicate = key in seen
                    except TypeError:  # unhashable: the base class says so
                        break
                    if duplicate:
                        raise PolicyError(f"policy: the key {_shown(key)} appears twice in one mapping")
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader's subclass
    except yaml.MarkedYAMLError as exc:
        # Its str() quotes the lines around the error: only the problem and where.
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(exc.problem or exc.context or "malformed").split())
        raise PolicyError(f"policy: not valid YAML: {problem}{where}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy: not valid YAML ({type(exc).__name__})") from None


# --- checking --------------------------------------------------------------------------------------


class _Invalid(Exception):
    """One field's complaint, before the rule it is in is named."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


class _Checker:
    def __init__(self, methods: tuple[str, ...] | None) -> None:
        self._methods = methods

    def policy(self, document: object) -> Policy:
        if not isinstance(document, Mapping):
            raise PolicyError(
                f"policy: must be an object with name and allow_rules, not {_kind(document)}"
                if document is not None
                else "policy: the file is empty"
            )
        name = document.get("name")
        where = f'policy "{name}"' if isinstance(name, str) and name and len(name) <= 128 else "policy"
        try:
            self._fields(document, POLICY_FIELDS, "")
            if not isinstance(name, str) or not name:
                raise _Invalid("name", "required, a non-empty string")
            if "\n" in name or len(name) > 128:
                raise _Invalid("name", "must be one line of at most 128 characters")
            if "allow_rules" not in document:
                raise _Invalid("allow_rules", "required (A43): at least one rule")
        except _Invalid as exc:
            raise PolicyError(f"{where}: {exc}") from None
        deny = self._rules(document, "deny_rules", "deny", where)
        allow = self._rules(document, "allow_rules", "allow", where)
        return Policy(name, deny, allow)

    def _rules(
        self, document: Mapping[str, Any], key: str, kind: Literal["deny", "allow"], where: str
    ) -> list[Rule]:
        items = document.get(key, [])
        if not isinstance(items, list):
            raise PolicyError(f"{where}: {key}: must be a list of rules, not {_kind(items)}")
        if kind == "allow" and not items:
            raise PolicyError(f"{where}: {key}: required (A43): at least one rule")
        rules: list[Rule] = []
        names: set[str] = set()
        for index, item in enumerate(items):
            name = item.get("name") if isinstance(item, Mapping) else None
            shown = f'"{name}" ' if isinstance(name, str) and RULE_NAME.fullmatch(name) else ""
            try:
                rule = self._rule(item, kind)
                if rule.name in names:
                    raise _Invalid("name", f"another rule of {key} has this name")
            except _Invalid as exc:
                raise PolicyError(f"policy rule {shown}({key}[{index}]): {exc}") from None
            names.add(rule.name)
            rules.append(rule)
        return rules

    def _rule(self, item: object, kind: Literal["deny", "allow"]) -> Rule:
        if not isinstance(item, Mapping):
            raise _Invalid("rule", f"must be an object with a name, not {_kind(item)}")
        self._fields(item, RULE_FIELDS, "")
        name = item.get("name")
        if name is None:
            raise _Invalid("name", "required")
        if not isinstance(name, str) or not RULE_NAME.fullmatch(name):
            raise _Invalid("name", f"{RULE_NAME_RULE}, not {_kind(name)}")
        if name in {NO_RULE, OTHER_RULE}:
            raise _Invalid("name", f"{name!r} is reserved (a label value of tiw_authz_decisions_total)")
        principals = paths = None
        sdk_app_ids = None
        if "source" in item:
            source = self._object(item["source"], "source", SOURCE_FIELDS)
            if "principals" in source:
                principals = Patterns(self._patterns(source["principals"], "source.principals"))
        if "request" in item:
            request = self._object(item["request"], "request", REQUEST_FIELDS)
            if "paths" in request:
                paths = Patterns(self._paths(request["paths"]))
            if "sdk_app_ids" in request:
                sdk_app_ids = frozenset(self._sdk_app_ids(request["sdk_app_ids"]))
        return Rule(name, kind, principals, paths, sdk_app_ids)

    def _fields(self, item: Mapping[Any, Any], known: tuple[str, ...], prefix: str) -> None:
        for key in item:
            if key == "headers" and prefix == "request.":
                raise _Invalid(
                    "request.headers",
                    "headers are not supported by this facade (match on principals, paths and sdk_app_ids)",
                )
            if key not in known:
                raise _Invalid(
                    f"{prefix}{key}" if isinstance(key, str) else f"{prefix}{_shown(key)}",
                    f"unknown field (known here: {', '.join(known)})",
                )

    def _object(self, value: object, field: str, known: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise _Invalid(field, f"must be an object, not {_kind(value)}")
        self._fields(value, known, f"{field}.")
        return value

    def _list(self, value: object, field: str, what: str) -> list[Any]:
        if not isinstance(value, list):
            raise _Invalid(field, f"must be a list of {what}, not {_kind(value)}")
        if not value:
            field_name = field.rpartition(".")[0]
            raise _Invalid(field, f"must not be empty (leave it out of {field_name} to match any)")
        return value

    def _patterns(self, value: object, field: str) -> list[str]:
        patterns = self._list(value, field, "strings")
        for index, pattern in enumerate(patterns):
            if not isinstance(pattern, str):
                raise _Invalid(f"{field}[{index}]", f"must be a string, not {_kind(pattern)}")
            stars = pattern.count("*")
            if stars > 1 or (stars == 1 and not pattern.startswith("*") and not pattern.endswith("*")):
                raise _Invalid(
                    f"{field}[{index}]",
                    f"a '*' may only start or end a pattern, or be the whole of it, not {_shown(pattern)}",
                )
        return patterns

    def _paths(self, value: object) -> list[str]:
        field = "request.paths"
        paths = self._patterns(value, field)
        for index, path in enumerate(paths):
            if path != "*" and not path.startswith(("/", "*")):
                raise _Invalid(
                    f"{field}[{index}]",
                    "must be a full method name such as /tiw.v20190919.TiwService/StopWhiteboardPush "
                    f"(or a pattern of one), not {_shown(path)}",
                )
            if self._methods is not None and not any(Patterns([path]).match(m) for m in self._methods):
                raise _Invalid(f"{field}[{index}]", f"matches no method this facade serves: {_shown(path)}")
        return paths

    def _sdk_app_ids(self, value: object) -> list[int]:
        field = "request.sdk_app_ids"
        ids = self._list(value, field, "integers")
        for index, sdk_app_id in enumerate(ids):
            if isinstance(sdk_app_id, bool) or not isinstance(sdk_app_id, int):
                raise _Invalid(f"{field}[{index}]", f"must be an integer, not {_kind(sdk_app_id)}")
            if not 1 <= sdk_app_id <= MAX_SDK_APP_ID:
                raise _Invalid(f"{field}[{index}]", f"must be an SdkAppId (1 to 2^64-1), not {sdk_app_id}")
        return ids
