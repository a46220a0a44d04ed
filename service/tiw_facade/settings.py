"""One typed settings object, built from the environment (and command-line overrides).

Each setting is declared once, as a field of ``Settings`` whose metadata carries its environment
variable, parser and help (in the spirit of struct tags). ``load()``, the `serve` flags and the
README's table are all derived from those declarations. Nothing else in the package reads
``os.environ``. A missing or malformed setting raises ``SettingsError`` naming the variable (or the
flag), before anything listens; a URL's password is never echoed.

    python -m tiw_facade.settings --markdown    # the README's configuration table
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from tiw_facade import budget

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

DEFAULT_ENDPOINT = "https://tiw.tencentcloudapi.com"
MIN_MEMORY_BUDGET = 16 << 20
# The shared answers' bound in Redis (TIW_SHARED_ANSWERS_MAX_BYTES): 128 MiB. It must fit whichever
# Redis holds the answers, next to what else that Redis holds (docs/redis.md, "The answers' share"):
# the production overlay's own answers Redis (maxmemory 256mb) keeps the other half for the answers'
# uncounted keys (leases, schedules, stamps) and its own buffers; on the durable Redis (maxmemory
# 2560mb, the idempotency records' worst case 1.93 GiB) it stays well within the ~580 MiB left over.
# About 70,000 answers of ~600 bytes (answers/_scripts.py, ENTRY_OVERHEAD).
DEFAULT_SHARED_ANSWERS_MAX_BYTES = 128 << 20
# The events a log keeps (TIW_EVENTS_MAX_BYTES), in process or per account in Redis: with TIW's
# bodies of about 1 KiB, some 13,000 events; a flood of large bodies under a leaked signature stops
# there. events/ counts them (``counted_bytes``).
DEFAULT_EVENTS_MAX_BYTES = 16 << 20
MIN_SHARED_ANSWERS_MAX_BYTES = 64 << 10
_DERIVED = budget.bounds(budget.DEFAULT_BUDGET)  # what the README states as the defaults
_SPEC = "tiw_facade.setting"  # the metadata key of a field's Spec


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class Invalid(ValueError):
    """A parser's own complaint, safe to show; any other ValueError is reported as 'malformed'."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one setting is read and documented."""

    env: str
    parse: Callable[[str], Any]
    help: str
    required: bool = False
    shown_default: str = ""  # the README's default, when the default value does not say it
    flag: bool = True  # a `serve` flag; not for credentials (a command line is visible in `ps`)
    show: Callable[[str], str] = repr  # how a rejected value appears in the error


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting as the README, the CLI and the deployment checks see it."""

    name: str
    spec: Spec
    value: Any  # the typed default (dataclasses.MISSING when there is none)

    @property
    def env(self) -> str:
        return self.spec.env

    @property
    def help(self) -> str:
        return self.spec.help

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_bool(self) -> bool:
        return isinstance(self.value, bool)

    @property
    def default(self) -> str:
        """The default as the README states it."""
        if self.spec.shown_default:
            return self.spec.shown_default
        if self.spec.required:
            return "(required)"
        if isinstance(self.value, bool):
            return "true" if self.value else "false"
        if isinstance(self.value, float):
            return f"{self.value:g}"
        return str(self.value) if self.value != "" else "(empty)"


# --- parsers: text in, typed value out, Invalid with a reason ------------------------------------


def text(raw: str) -> str:
    return raw


def positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise Invalid("must be a positive integer")
    return value


def port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise Invalid("must be a port number 0..65535")
    return value


def optional_port(raw: str) -> int | None:
    """A port, or nothing (empty): a server that is off."""
    return port(raw) if raw.strip() else None


def positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise Invalid("must be a positive number of seconds")
    return value


def non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise Invalid("must be an integer >= 0")
    return value


_BYTE_UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def _bytes(raw: str, example: str) -> int:
    """Bytes, as Kubernetes writes a memory quantity in binary units: ``160Mi``, ``1Gi``, ``65536``."""
    found = re.fullmatch(r"([0-9]{1,12})(Ki|Mi|Gi)?", raw)
    if found is None:
        raise Invalid(f"must be a whole number of bytes, optionally with Ki, Mi or Gi (e.g. {example})")
    return int(found[1]) * _BYTE_UNITS[found[2] or ""]


def byte_size(raw: str) -> int:
    """The memory budget: bytes as ``_bytes`` reads them, at least MIN_MEMORY_BUDGET."""
    value = _bytes(raw, "160Mi")
    if value < MIN_MEMORY_BUDGET:
        raise Invalid(f"must be at least {MIN_MEMORY_BUDGET >> 20}Mi")
    return value


def shared_answers_size(raw: str) -> int:
    """The shared answers' bound: bytes as ``_bytes`` reads them, at least 64Ki (room for a few dozen
    answers; a smaller bound would hold next to none)."""
    value = _bytes(raw, "128Mi")
    if value < MIN_SHARED_ANSWERS_MAX_BYTES:
        raise Invalid(f"must be at least {MIN_SHARED_ANSWERS_MAX_BYTES >> 10}Ki")
    return value


def events_size(raw: str) -> int:
    """The events' bound: bytes as ``_bytes`` reads them, at least 64Ki."""
    value = _bytes(raw, "16Mi")
    if value < 64 << 10:
        raise Invalid("must be at least 64Ki")
    return value


def boolean(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise Invalid("must be true or false")


def one_of(*choices: str, fold: Callable[[str], str] = str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = fold(raw)
        if value not in choices:
            raise Invalid(f"must be {', '.join(choices[:-1])} or {choices[-1]}")
        return value

    return parse


def base_url(raw: str) -> str:
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname or parts.path not in {"", "/"}:
        raise Invalid("must be an http(s) base URL such as https://tiw.tencentcloudapi.com")
    if "@" in parts.netloc:
        raise Invalid("must not carry user:password@ (TIW authenticates by signature)")
    _ = parts.port  # raises ValueError on a malformed port
    return f"{parts.scheme}://{parts.netloc}"


def key_url(raw: str) -> str:
    """Where the callers' token keys come from (an issuer, a JWKS URL): https, or plain http only to
    this host (a local proxy, a test's server), since keys fetched in the clear from elsewhere could
    be anyone's. No user:password@, no fragment."""
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise Invalid("must be an https URL")
    if "@" in parts.netloc or parts.fragment:
        raise Invalid("must not carry user:password@ or a #fragment")
    _ = parts.port  # raises ValueError on a malformed port
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise Invalid("must be https (plain http only to localhost)")
    return raw


def is_loopback(host: str) -> bool:
    """``host`` (a URL's hostname) is this machine: ``localhost`` or a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redis_address(raw: str) -> str:
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise Invalid("must be a redis:// rediss:// or unix:// URL")
    _ = parts.port  # raises ValueError on a malformed port
    return raw


def sentinel_addresses(raw: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (``[::1]:26379`` for IPv6), at least one."""
    nodes = []
    for item in raw.split(","):
        host, colon, number = item.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not colon or not host or not number.isdigit():
            raise Invalid("must be host:port pairs separated by commas, e.g. sentinel-0:26379")
        nodes.append((host, port(number)))
    return tuple(nodes)


def callback_keys(raw: str) -> tuple[tuple[int, str], ...]:
    """``SdkAppId=key`` pairs separated by commas (or lines, in a file); an SdkAppId named twice
    has both keys accepted, as during a rotation. Blank items and ``#`` comment lines are skipped."""
    pairs = []
    for line in raw.splitlines():
        if line.strip().startswith("#"):
            continue
        for item in line.split(","):
            if not item.strip():
                continue
            app, equals, key = item.strip().partition("=")
            if not equals or not app.strip().isdigit() or not key.strip():
                raise Invalid("must be SdkAppId=key pairs separated by commas, e.g. 1400000001=Xz4ZgayTr7")
            pairs.append((int(app.strip()), key.strip()))
    return tuple(pairs)


def non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise Invalid("must be a number of seconds >= 0")
    return value


def redact_url(url: str) -> str:
    """``url`` without what may hold a password: its user information and its query (and fragment).

    The one redactor of URLs: for logs, /healthz (shared_redis) and the errors of rejected settings.
    Never fails, whatever the text: a value is shown this way because it may be malformed.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: cut by hand, erring on the side of cutting
        return re.split(r"[?#]", re.sub(r"(?<=//).*@", "", url), maxsplit=1)[0]
    if not parts.scheme and not parts.netloc:
        return parts.path
    # Rebuilt from what parses as a host and a port: a password that ends the netloc early (an
    # unescaped ``?`` in it) leaves only garbage there, which parses as neither.
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    try:
        port = "" if parts.port is None else str(parts.port)
    except ValueError:  # out of range, say: as written, since that is what a message must show
        port = parts.netloc.rpartition(":")[2] if netloc else ""
    if port.isdigit():
        netloc += f":{port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def shown_url(raw: str) -> str:
    """A rejected URL as its error message shows it (``Spec.show``)."""
    return repr(redact_url(raw))


def declare(
    env: str,
    parse: Callable[[str], Any],
    help: str,
    *,
    default: Any = dataclasses.MISSING,
    required: bool = False,
    shown_default: str = "",
    flag: bool = True,
    secret: bool = False,
    show: Callable[[str], str] = repr,
) -> Any:
    """A ``Settings`` field: its default, and the Spec that ``load()``, the CLI and the README use."""
    spec = Spec(env, parse, help, required or default is dataclasses.MISSING, shown_default, flag, show)
    return dataclasses.field(default=default, repr=not secret, metadata={_SPEC: spec})


# A name TIW_CALLER_WEIGHTS may list: a tiw-caller name, a SPIFFE ID, a service-account principal.
CALLER_NAME = re.compile(
    r"[A-Za-z0-9._-]{1,64}|spiffe://[!-<>-~]{1,2039}"
    r"|system:serviceaccount:[a-z0-9.-]{1,253}:[a-z0-9.-]{1,253}"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    # Not required here: a credentials file or pod identity may supply the key (credentials.py says
    # which source wins, and refuses to start with none).
    secret_id: str = declare(
        "TENCENTCLOUD_SECRET_ID",
        text,
        "SecretId of the Tencent Cloud API key.",
        default="",
        shown_default="(empty: see docs/credentials.md)",
        flag=False,
    )
    secret_key: str = declare(
        "TENCENTCLOUD_SECRET_KEY",
        text,
        "SecretKey of the API key. Never logged.",
        default="",
        shown_default="(empty: see docs/credentials.md)",
        flag=False,
        secret=True,
    )
    session_token: str = declare(
        "TENCENTCLOUD_SESSION_TOKEN",
        text,
        "Session token of temporary credentials, sent as X-TC-Token.",
        default="",
        flag=False,
        secret=True,
    )
    region: str = declare(
        "TENCENTCLOUD_REGION",
        text,
        "Region sent as X-TC-Region, e.g. `ap-guangzhou`.",
        default="",
        required=True,
    )
    endpoint: str = declare(
        "TIW_ENDPOINT",
        base_url,
        "Upstream base URL; the signed Host follows it.",
        default=DEFAULT_ENDPOINT,
        show=shown_url,
    )
    language: str = declare(
        "TIW_LANGUAGE",
        one_of("zh-CN", "en-US"),
        "X-TC-Language for TIW's error messages: `zh-CN` or `en-US`.",
        default="",
    )
    grpc_port: int = declare(
        "TIW_GRPC_PORT", port, "Port of the gRPC server (TiwService, health, reflection).", default=50051
    )
    http_port: int = declare(
        "TIW_HTTP_PORT", port, "Port of the HTTP server: `/metrics`, `/healthz`.", default=8080
    )
    bind_host: str = declare("TIW_BIND_HOST", text, "Address both servers listen on.", default="[::]")
    reflection: bool = declare("TIW_REFLECTION", boolean, "Serve gRPC server reflection.", default=True)
    shutdown_grace: float = declare(
        "TIW_SHUTDOWN_GRACE",
        positive_float,
        "Seconds in-flight RPCs may take to finish after SIGTERM.",
        default=20.0,
    )
    log_level: str = declare(
        "TIW_LOG_LEVEL",
        one_of("DEBUG", "INFO", "WARNING", "ERROR", fold=str.upper),
        "DEBUG, INFO, WARNING or ERROR.",
        default="INFO",
    )
    upstream_timeout: float = declare(
        "TIW_UPSTREAM_TIMEOUT",
        positive_float,
        "Seconds one upstream attempt may take; without a caller deadline, the whole call.",
        default=10.0,
    )
    connect_timeout: float = declare(
        "TIW_CONNECT_TIMEOUT",
        positive_float,
        "Seconds connecting to TIW may take; a connect time-out proves the request was not sent, so "
        "even CreateSnapshotTask is retried after one.",
        default=2.0,
    )
    max_answer_bytes: int = declare(
        "TIW_MAX_ANSWER_BYTES",
        positive_int,
        "Largest TIW answer read, in bytes (TIW's are a few KB); a larger one fails as UPSTREAM_MALFORMED.",
        default=1 << 20,
    )
    max_attempts: int = declare(
        "TIW_MAX_ATTEMPTS",
        positive_int,
        "Upper bound on attempts per call, where retrying is safe.",
        default=3,
    )
    rate_limit: int = declare(
        "TIW_RATE_LIMIT",
        positive_int,
        "Requests per second per action, for all replicas together.",
        default=20,
    )
    rate_limit_account: str = declare(
        "TIW_RATE_LIMIT_ACCOUNT",
        text,
        "Whose quota: replicas with the same value share it.",
        default="",
        shown_default="(the SecretId)",
    )
    redis_url: str = declare(
        "TIW_REDIS_URL",
        redis_address,
        "Redis for the state replicas share: the limiter's tokens, and the answers and idempotency "
        "keys unless their own URL is set, e.g. `redis://redis:6379/0` (`rediss://` for TLS, "
        "`unix://`, a password as `redis://:pw@host`).",
        default="",
        shown_default="(empty: in-process)",
        secret=True,  # may hold a password
        show=shown_url,
    )
    answers_redis_url: str = declare(
        "TIW_ANSWERS_REDIS_URL",
        redis_address,
        "Redis for the Describe answers replicas share (docs/answers.md), when not TIW_REDIS_URL's.",
        default="",
        shown_default="(TIW_REDIS_URL)",
        secret=True,
        show=shown_url,
    )
    shared_answers_max_bytes: int = declare(
        "TIW_SHARED_ANSWERS_MAX_BYTES",
        shared_answers_size,
        "Most memory, in bytes (`Ki`, `Mi`, `Gi` suffixes), the Describe answers replicas share may "
        "take in their Redis, per account; beyond it the least recently used are deleted, so that "
        "answers sharing a Redis with the limiter and the idempotency keys never fill it (docs/redis.md).",
        default=DEFAULT_SHARED_ANSWERS_MAX_BYTES,
        shown_default=f"{DEFAULT_SHARED_ANSWERS_MAX_BYTES >> 20}Mi",
    )
    idempotency_redis_url: str = declare(
        "TIW_IDEMPOTENCY_REDIS_URL",
        redis_address,
        "Redis for the idempotency keys (docs/idempotency.md), when not TIW_REDIS_URL's.",
        default="",
        shown_default="(TIW_REDIS_URL)",
        secret=True,
        show=shown_url,
    )
    redis_sentinels: tuple[tuple[str, int], ...] = declare(
        "TIW_REDIS_SENTINELS",
        sentinel_addresses,
        "Redis Sentinel nodes, `host:port,host:port`: the Redis of every role without a URL of its "
        "own (TIW_ANSWERS_REDIS_URL, TIW_IDEMPOTENCY_REDIS_URL) is then the master they name "
        "TIW_REDIS_SENTINEL_MASTER, and TIW_REDIS_URL gives only its password, TLS and database "
        "(its host is not used; unset: no password, database 0). The sentinels are asked without "
        "a password.",
        default=(),
        shown_default="(empty: no Sentinel)",
    )
    redis_sentinel_master: str = declare(
        "TIW_REDIS_SENTINEL_MASTER",
        text,
        "The master's name in the sentinels' configuration (`sentinel monitor <name> ...`); "
        "required with TIW_REDIS_SENTINELS.",
        default="",
    )
    redis_cluster: bool = declare(
        "TIW_REDIS_CLUSTER",
        boolean,
        "Every role's Redis is a Redis Cluster, its URL one seed node (database 0 only).",
        default=False,
    )
    redis_timeout: float = declare(
        "TIW_REDIS_TIMEOUT",
        positive_float,
        "Seconds a Redis call may take before it counts as failed; the limiter degrades only when "
        "Redis fails for 0.5 s (at once when it refuses connections).",
        default=0.25,
    )
    expected_replicas: int = declare(
        "TIW_EXPECTED_REPLICAS",
        positive_int,
        "Replicas sharing the quota; while Redis is down each takes rate/replicas.",
        default=1,
    )
    max_queue_wait: float = declare(
        "TIW_MAX_QUEUE_WAIT",
        positive_float,
        "Longest wait, in seconds, for a rate-limit slot; beyond it, RESOURCE_EXHAUSTED.",
        default=5.0,
    )
    max_queue_length: int = declare(
        "TIW_MAX_QUEUE_LENGTH",
        positive_int,
        "Callers that may wait per action; beyond it, RESOURCE_EXHAUSTED.",
        default=1000,
    )
    max_connection_age: float = declare(
        "TIW_MAX_CONNECTION_AGE",
        positive_float,
        "Seconds before a client connection is asked to reconnect (spreads load).",
        default=300.0,
    )

    max_request_bytes: int = declare(
        "TIW_MAX_REQUEST_BYTES",
        positive_int,
        "Largest gRPC request accepted, in bytes; a larger one is refused by gRPC itself with "
        "RESOURCE_EXHAUSTED before it is read (TIW's requests are under 1 KB; the bound caps the "
        "memory of calls in flight, about their number times this).",
        default=16 << 10,
    )
    http_timeout: float = declare(
        "TIW_HTTP_TIMEOUT",
        positive_float,
        "Seconds the HTTP server waits on one read or write (headers, an idle keep-alive, a client "
        "that does not read) before it closes the connection.",
        default=5.0,
    )
    http_max_connections: int = declare(
        "TIW_HTTP_MAX_CONNECTIONS",
        positive_int,
        "Connections the HTTP server holds at once; beyond it, new ones are closed at once.",
        default=32,
    )

    credentials_file: str = declare(
        "TENCENTCLOUD_CREDENTIALS_FILE",
        text,
        "Credentials file in the official SDK's profile format (`[default]`: `secret_id`, "
        "`secret_key`, optional `token`), e.g. a mounted Secret; re-read when it changes. Used when "
        "TENCENTCLOUD_SECRET_ID is unset (docs/credentials.md).",
        default="",
        shown_default="(empty: ~/.tencentcloud/credentials or /etc/tencentcloud/credentials, if present)",
    )
    credentials_poll: float = declare(
        "TIW_CREDENTIALS_POLL",
        positive_float,
        "Seconds between checks of the credentials file (and of TIW_AUTHZ_POLICY_FILE) for a new version.",
        default=1.0,
    )
    tke_region: str = declare(
        "TKE_REGION",
        text,
        "TKE pod identity (OIDC), set by TKE with the three below: region of the STS call.",
        default="",
        flag=False,
    )
    tke_provider_id: str = declare(
        "TKE_PROVIDER_ID", text, "TKE pod identity: the OIDC identity provider.", default="", flag=False
    )
    tke_web_identity_token_file: str = declare(
        "TKE_WEB_IDENTITY_TOKEN_FILE",
        text,
        "TKE pod identity: the projected service-account token, re-read on every refresh.",
        default="",
        flag=False,
    )
    tke_role_arn: str = declare(
        "TKE_ROLE_ARN", text, "TKE pod identity: the CAM role to assume.", default="", flag=False
    )
    sts_endpoint: str = declare(
        "TIW_STS_ENDPOINT",
        base_url,
        "STS base URL for AssumeRoleWithWebIdentity (TKE pod identity).",
        default="https://sts.tencentcloudapi.com",
        show=shown_url,
    )
    sts_duration: int = declare(
        "TIW_STS_DURATION",
        positive_int,
        "Seconds the temporary credentials of TKE pod identity are asked to last (at most 43200).",
        default=7200,
    )
    credentials_refresh_margin: float = declare(
        "TIW_CREDENTIALS_REFRESH_MARGIN",
        positive_float,
        "Temporary credentials are refreshed once less than this many seconds, or a third of their "
        "lifetime, remain (whichever comes first).",
        default=300.0,
    )

    tls_cert_file: str = declare(
        "TIW_TLS_CERT_FILE",
        text,
        "PEM certificate chain of the gRPC server; with TIW_TLS_KEY_FILE, the gRPC port speaks only "
        "TLS. Both re-read when they change (docs/tls.md).",
        default="",
        shown_default="(empty: plaintext)",
    )
    tls_key_file: str = declare("TIW_TLS_KEY_FILE", text, "PEM private key of that certificate.", default="")
    tls_client_ca_file: str = declare(
        "TIW_TLS_CLIENT_CA_FILE",
        text,
        "PEM CA bundle for mutual TLS: every client must present a certificate it signed, and the "
        "certificate names the caller (its SPIFFE ID, else first DNS name, else CN).",
        default="",
        shown_default="(empty: no client certificates)",
    )

    # Callers' projected service-account tokens (authn.py): one source of their keys at most.
    auth_issuer: str = declare(
        "TIW_AUTH_ISSUER",
        key_url,
        "Issuer of the callers' service-account tokens (the cluster's `--service-account-issuer`): "
        "a token's `iss` must equal it, and its keys are found through "
        "`{issuer}/.well-known/openid-configuration`. Set one of this, TIW_AUTH_JWKS_URL and "
        "TIW_AUTH_JWKS_FILE to accept `authorization: Bearer` tokens.",
        default="",
        shown_default="(empty: no tokens)",
        show=shown_url,
    )
    auth_jwks_url: str = declare(
        "TIW_AUTH_JWKS_URL",
        key_url,
        "URL of the token keys (a JWKS), instead of the issuer's discovery; `iss` is then not checked.",
        default="",
        show=shown_url,
    )
    auth_jwks_file: str = declare(
        "TIW_AUTH_JWKS_FILE",
        text,
        "File of the token keys (a JWKS, JSON), re-read when it changes; `iss` is then not checked.",
        default="",
    )
    auth_audience: str = declare(
        "TIW_AUTH_AUDIENCE",
        text,
        "Audience a token must be for (its `aud`): the projected volume's `audience`.",
        default="tiw-facade",
    )
    auth_required: bool = declare(
        "TIW_AUTH_REQUIRED",
        boolean,
        "Refuse calls without a token (UNAUTHENTICATED `MISSING_TOKEN`); false: they are served as "
        "unauthenticated. A token sent is checked either way.",
        default=False,
    )
    auth_ca_file: str = declare(
        "TIW_AUTH_CA_FILE",
        text,
        "PEM CA bundle trusted, besides the system's, to fetch the token keys (the cluster's CA "
        "for an in-cluster issuer).",
        default="",
    )
    auth_token_file: str = declare(
        "TIW_AUTH_TOKEN_FILE",
        text,
        "File of a bearer token sent when fetching the token keys (the facade's own service-account "
        "token, for an API server that asks for one), re-read on every fetch.",
        default="",
    )

    @staticmethod
    def _weights(raw: str) -> tuple[tuple[str, int], ...]:
        """``billing=3,classroom=1``: caller names (or SPIFFE IDs), each with a weight of 1 to 100."""
        # A caller's turn of the round robin is `weight` tokens in a row, and a caller that starts
        # waiting may wait one turn of every other: at the documented 20 requests per second, 100
        # is 5 s, the default TIW_MAX_QUEUE_WAIT. A heavier turn would outlast other callers'
        # deadlines, and 1% steps are finer than any share worth setting.
        most = 100
        # The metrics' own label values (metrics.CallerSeries): a caller listed under one would be
        # counted together with everyone that label stands for.
        reserved = {
            "unidentified": "the share of every caller not listed or proven",
            "other": "the metrics' label for proven callers not listed",
        }
        found: dict[str, int] = {}
        for entry in filter(None, (part.strip() for part in raw.split(","))):
            name, equals, weight = (part.strip() for part in entry.rpartition("="))
            # ASCII only, SPIFFE IDs included (the spec allows no more, and at most 2048 bytes), and
            # the principals of service-account tokens (Kubernetes names: lowercase DNS labels).
            if not equals or not re.fullmatch(CALLER_NAME, name):
                raise Invalid(
                    f"{entry!r} is not caller=weight (a caller name, a spiffe:// ID, or "
                    "system:serviceaccount:NAMESPACE:NAME)"
                )
            if name in reserved:
                raise Invalid(f"{entry!r}: {name!r} is reserved ({reserved[name]}), not a caller name")
            if name in found:
                raise Invalid(f"{entry!r}: {name!r} is given a weight twice")
            # Not str.isdigit, which takes Arabic-Indic and superscript digits; nor int() alone,
            # which takes '+1' and '1_0'.
            if not re.fullmatch(r"[0-9]+", weight):
                raise Invalid(f"{entry!r}: the weight must be a whole number in the digits 0-9")
            # By length first: Python refuses int() of over 4300 digits with an unhelpful message.
            digits = weight.lstrip("0")
            value = int(digits or "0") if len(digits) <= len(str(most)) else most + 1
            if not 1 <= value <= most:
                raise Invalid(f"{entry!r}: the weight must be from 1 to {most}")
            found[name] = value
        return tuple(found.items())

    caller_weights: tuple[tuple[str, int], ...] = declare(
        "TIW_CALLER_WEIGHTS",
        _weights,
        "Shares of the rate limit by caller (`tiw-caller`, a client certificate's name, or a token's "
        "`system:serviceaccount:NAMESPACE:NAME`), e.g. `billing=3,classroom=1`, weights 1 to 100. "
        "A `tiw-caller` not named here shares one share "
        "with every other unproven caller; a certificate's name not named here weighs 1.",
        default=(),
        shown_default="(empty: certificates weigh 1, unproven callers share one)",
    )

    # Who may call what (authz.py): gRFC A43's policy, with the SdkAppIds a rule covers.
    authz_policy_file: str = declare(
        "TIW_AUTHZ_POLICY_FILE",
        text,
        "Authorization policy (gRFC A43's JSON, or the same in YAML, plus `request.sdk_app_ids`): "
        "who may call which methods for which SdkAppIds, deny rules first; a denied call is "
        "PERMISSION_DENIED `NOT_AUTHORIZED`, nothing sent. Re-read when it changes; a malformed "
        "change is refused and the last good policy kept (docs/authentication.md).",
        default="",
        shown_default="(empty: no policy, every caller may call every method)",
    )
    authz_mode: str = declare(
        "TIW_AUTHZ_MODE",
        one_of("enforce", "audit", fold=str.lower),
        "`enforce`: a call the policy denies is refused; `audit`: it is served, and logged and "
        "counted as `would_deny`, to try a policy out before enforcing it.",
        default="enforce",
    )

    # TIW's callbacks (callbacks.py) and the events they carry (events/, WatchEvents).
    callback_port: int | None = declare(
        "TIW_CALLBACK_PORT",
        optional_port,
        "Port of the intake of TIW's callbacks (`POST /callbacks/push`, `/callbacks/snapshot`, "
        "`/callbacks/video`), the one port meant for the internet; nothing else is served on it "
        "(docs/callbacks.md). 0: any free port.",
        default=None,
        shown_default="(empty: no intake)",
    )
    callback_keys: tuple[tuple[int, str], ...] = declare(
        "TIW_CALLBACK_KEYS",
        callback_keys,
        "The callback keys TIW signs with, `SdkAppId=key` pairs separated by commas; an SdkAppId "
        "named twice has both keys accepted (a rotation). A callback for an SdkAppId without a key is "
        "refused.",
        default=(),
        shown_default="(empty)",
        secret=True,
        flag=False,  # keys: never on a command line
        show=lambda raw: "(not shown: it holds keys)",
    )
    callback_key_file: str = declare(
        "TIW_CALLBACK_KEY_FILE",
        text,
        "A file of the same pairs (one per line or comma-separated), re-read when it changes, for "
        "rotating a key without a restart; with TIW_CALLBACK_KEYS, both are accepted.",
        default="",
    )
    callback_max_bytes: int = declare(
        "TIW_CALLBACK_MAX_BYTES",
        positive_int,
        "Largest callback body accepted, in bytes; a larger one is refused 413 unread.",
        default=65536,
    )
    callback_max_ahead: float = declare(
        "TIW_CALLBACK_MAX_AHEAD",
        positive_float,
        "How far ahead of now, in seconds, a callback's `ExpireTime` may be; one further ahead is "
        "refused (a signature meant to be replayed for ever).",
        default=86400.0,
    )
    callback_confirm_interval: float = declare(
        "TIW_CALLBACK_CONFIRM_INTERVAL",
        positive_float,
        "Seconds between two confirming Describe requests one task's callbacks may cause, across "
        "replicas: a later callback within it is confirmed at its end, once.",
        default=1.0,
    )
    refresh_after_with_callbacks: float = declare(
        "TIW_REFRESH_AFTER_WITH_CALLBACKS",
        non_negative_float,
        "While callbacks of an action arrive (one in the last minute), its answers are refreshed "
        "with spare quota once this many seconds old instead of at 90% of TIW_MAX_STALENESS, "
        "returning quota to callers; 0: refresh as without callbacks.",
        default=0.0,
        shown_default="(0: as without callbacks)",
    )
    events_redis_url: str = declare(
        "TIW_EVENTS_REDIS_URL",
        redis_address,
        "Redis for the events WatchEvents streams (a Redis Stream) and the callbacks already seen, "
        "when not TIW_REDIS_URL's.",
        default="",
        shown_default="(TIW_REDIS_URL)",
        secret=True,
        show=shown_url,
    )
    events_retention: float = declare(
        "TIW_EVENTS_RETENTION",
        positive_float,
        "Seconds an event is kept for WatchEvents subscribers resuming from a cursor.",
        default=3600.0,
    )
    events_max: int = declare(
        "TIW_EVENTS_MAX",
        positive_int,
        "Most events kept (in process, or per account in Redis), the oldest dropped first.",
        default=100_000,
    )
    events_max_bytes: int = declare(
        "TIW_EVENTS_MAX_BYTES",
        events_size,
        "Most bytes of events kept (`Ki`, `Mi`, `Gi` suffixes; bodies and fields, in process or per "
        "account in Redis), the oldest dropped first: a flood of large callbacks stops there.",
        default=DEFAULT_EVENTS_MAX_BYTES,
        shown_default=f"{DEFAULT_EVENTS_MAX_BYTES >> 20}Mi",
    )

    idempotency_ttl: float = declare(
        "TIW_IDEMPOTENCY_TTL",
        positive_float,
        "Seconds the answer to a CreateSnapshotTask with an `idempotency-key` is kept for its retries "
        "(docs/idempotency.md); in Redis when TIW_IDEMPOTENCY_REDIS_URL or TIW_REDIS_URL is set, else "
        "in process.",
        default=86400.0,
    )
    idempotency_loss_window: float = declare(
        "TIW_IDEMPOTENCY_LOSS_WINDOW",
        positive_float,
        "Seconds after the idempotency records' Redis is found to have lost them (docs/idempotency.md) "
        "during which a create whose key has no record is refused FAILED_PRECONDITION "
        "`IDEMPOTENCY_RECORDS_LOST` rather than risk a second task: cover your callers' longest retry.",
        default=300.0,
    )
    idempotency_replicas: int = declare(
        "TIW_IDEMPOTENCY_REPLICAS",
        non_negative_int,
        "Replicas of the idempotency records' Redis that must acknowledge a key's claim (Redis `WAIT`, "
        "within 80% of TIW_REDIS_TIMEOUT) before the create is sent, so a failover cannot lose it; "
        "fewer: refused UNAVAILABLE `IDEMPOTENCY_UNAVAILABLE`, nothing sent (docs/idempotency.md). "
        "0: no wait. Not with TIW_REDIS_CLUSTER.",
        default=0,
    )
    idempotency_max_keys: int = declare(
        "TIW_IDEMPOTENCY_MAX_KEYS",
        positive_int,
        "Idempotency keys kept in process (without Redis); beyond it the oldest is forgotten, and a "
        "retry with it may create a second task.",
        default=0,
        shown_default=f"(from TIW_MEMORY_BUDGET: {_DERIVED.idempotency_max_keys})",
    )

    max_staleness: float = declare(
        "TIW_MAX_STALENESS",
        positive_float,
        "Oldest a cached non-terminal Describe answer may be, in seconds, for a call without "
        "`tiw-max-age-ms` (docs/answers.md). Answers callers ask for are refreshed at 90% of this age.",
        default=2.0,
    )
    max_stale_on_saturation: float = declare(
        "TIW_MAX_STALE_ON_SATURATION",
        positive_float,
        "Oldest cached answer, in seconds, served instead of RESOURCE_EXHAUSTED when no rate-limit "
        "slot comes within the call's deadline; also how long non-terminal answers are kept.",
        default=30.0,
    )
    cache_entries: int = declare(
        "TIW_CACHE_ENTRIES",
        positive_int,
        "Describe answers kept in process (and keys marked wanted); beyond it the least recently "
        "used is dropped.",
        default=0,
        shown_default=f"(from TIW_MEMORY_BUDGET: {_DERIVED.cache_entries})",
    )
    cache_terminal_ttl: float = declare(
        "TIW_CACHE_TERMINAL_TTL",
        positive_float,
        "Seconds a terminal answer (snapshot `Finished`, push `STOPPED`, video `FINISHED`) is kept.",
        default=3600.0,
    )
    cache_not_found_ttl: float = declare(
        "TIW_CACHE_NOT_FOUND_TTL",
        positive_float,
        "Seconds an `InvalidParameter.TaskNotFound` answer is kept (TIW may lag behind its creates).",
        default=2.0,
    )
    refresh_interest: float = declare(
        "TIW_REFRESH_INTEREST",
        positive_float,
        "Seconds after the last call (or while a watch is open) that an answer is refreshed with "
        "spare quota.",
        default=10.0,
    )
    refresh_reserve: int = declare(
        "TIW_REFRESH_RESERVE",
        non_negative_int,
        "Rate-limit slots per action that refreshes leave free for direct calls.",
        default=2,
    )
    max_watches: int = declare(
        "TIW_MAX_WATCHES",
        positive_int,
        "Watch streams open at once on one replica; beyond it, RESOURCE_EXHAUSTED `TOO_MANY_WATCHES`.",
        default=0,
        shown_default=f"(from TIW_MEMORY_BUDGET: {_DERIVED.max_watches})",
    )
    max_watches_per_caller: int = declare(
        "TIW_MAX_WATCHES_PER_CALLER",
        positive_int,
        "Watch streams one caller may hold open on one replica (a proven identity, or all unproven "
        "callers together: docs/limits.md); beyond it, RESOURCE_EXHAUSTED `TOO_MANY_WATCHES`.",
        default=0,
        shown_default=f"(from TIW_MEMORY_BUDGET: {_DERIVED.max_watches_per_caller})",
    )
    memory_budget: int = declare(
        "TIW_MEMORY_BUDGET",
        byte_size,
        "Memory, in bytes (`Ki`, `Mi`, `Gi` suffixes), that what callers make grow may take: the "
        "defaults of TIW_CACHE_ENTRIES, TIW_MAX_WATCHES, TIW_MAX_WATCHES_PER_CALLER and "
        "TIW_IDEMPOTENCY_MAX_KEYS are shares of it (docs/limits.md). Sized for a 256Mi pod limit.",
        default=budget.DEFAULT_BUDGET,
        shown_default=f"{budget.DEFAULT_BUDGET >> 20}Mi",
    )

    def __post_init__(self) -> None:
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise SettingsError("TIW_REDIS_SENTINELS and TIW_REDIS_SENTINEL_MASTER go together: set both")
        if self.redis_sentinels and self.redis_cluster:
            raise SettingsError("TIW_REDIS_SENTINELS and TIW_REDIS_CLUSTER exclude each other")
        # WAIT counts the writes of its own connection; the cluster client sends it to every primary
        # on connections of their own, so the count would not be about the claim.
        if self.idempotency_replicas and self.redis_cluster:
            raise SettingsError("TIW_IDEMPOTENCY_REPLICAS and TIW_REDIS_CLUSTER exclude each other")
        key_sources = [
            env
            for env, value in (
                ("TIW_AUTH_ISSUER", self.auth_issuer),
                ("TIW_AUTH_JWKS_URL", self.auth_jwks_url),
                ("TIW_AUTH_JWKS_FILE", self.auth_jwks_file),
            )
            if value
        ]
        if len(key_sources) > 1:
            raise SettingsError(
                f"{' and '.join(key_sources)} exclude each other: set one of TIW_AUTH_ISSUER, "
                "TIW_AUTH_JWKS_URL and TIW_AUTH_JWKS_FILE"
            )
        if self.auth_required and not key_sources:
            raise SettingsError(
                "TIW_AUTH_REQUIRED needs the tokens' keys: set TIW_AUTH_ISSUER, TIW_AUTH_JWKS_URL "
                "or TIW_AUTH_JWKS_FILE"
            )
        # A bound left at 0 (unset) takes its share of the memory budget; one set explicitly wins.
        derived = budget.bounds(self.memory_budget, max_watches=self.max_watches or None)
        for field in dataclasses.fields(derived):
            if getattr(self, field.name) == 0:
                object.__setattr__(self, field.name, getattr(derived, field.name))

    @property
    def account(self) -> str:
        """Whose quota this is: the configured account, else the SecretId (else the pod's role)."""
        return self.rate_limit_account or self.secret_id or self.tke_role_arn or "default"

    @property
    def upstream_host(self) -> str:
        """The Host header and the signed host follow the endpoint."""
        return urllib.parse.urlsplit(self.endpoint).netloc

    @property
    def degraded_rate_limit(self) -> int:
        """Per-replica limit while Redis is unreachable: never unlimited, never zero."""
        return max(1, self.rate_limit // self.expected_replicas)


# Every setting, in declaration order: the README's rows, the `serve` flags, the deployment checks.
ENVIRONMENT: tuple[Setting, ...] = tuple(
    Setting(field.name, field.metadata[_SPEC], field.default) for field in dataclasses.fields(Settings)
)


def variable(name: str) -> str:
    """The environment variable of the setting ``name``, for messages such as a busy port's."""
    return next(item.env for item in ENVIRONMENT if item.name == name)


def _parse(item: Setting, raw: str, where: str) -> Any:
    try:
        return item.spec.parse(raw)
    except Invalid as exc:
        detail = str(exc)
    except ValueError:  # int()/float()/urlsplit() messages may repeat the value: say no more
        detail = "malformed"
    raise SettingsError(f"{where}={item.spec.show(raw)}: {detail}")


def load(
    environ: Mapping[str, str] | None = None,
    *,
    defaults: Mapping[str, str] | None = None,
    overrides: Mapping[str, str | None] | None = None,
) -> Settings:
    """Build the settings from ``environ`` (default: the process environment).

    ``overrides`` (from flags, by setting name) win over the environment; ``defaults`` (by setting
    name, e.g. the emulator's demo credentials) fill in what the environment leaves unset. Both are
    text, read by the same parsers as the environment; ``None`` or blank means unset.
    """
    env = os.environ if environ is None else environ
    # Blank means unset, wherever it comes from.
    given = {name: raw.strip() for name, raw in (overrides or {}).items() if raw and raw.strip()}
    fallback = {name: raw.strip() for name, raw in (defaults or {}).items() if raw.strip()}
    known = {item.name for item in ENVIRONMENT}
    if unknown := (given.keys() | fallback.keys()) - known:
        raise TypeError(f"no such setting: {', '.join(sorted(unknown))}")

    # Flags first: a mistake just typed is the one to report.
    values: dict[str, Any] = {
        item.name: _parse(item, given[item.name], item.flag) for item in ENVIRONMENT if item.name in given
    }
    for item in ENVIRONMENT:
        if item.name in values:
            continue
        if raw := env.get(item.env, "").strip():
            values[item.name] = _parse(item, raw, item.env)
        elif item.name in fallback:
            values[item.name] = _parse(item, fallback[item.name], item.env)
        elif item.spec.required:
            raise SettingsError(
                f"{item.env} is required (or run `tiw-facade serve --emulator` to try the service)"
            )
    return Settings(**values)


def configure(config: type[C], settings: Settings, **given: object) -> C:
    """A component's config from the settings, field by field: a field named as a setting takes
    that setting's value; the others (a setting named otherwise, a value made of several) are
    ``given``. A field that is neither fails here, rather than keep its default unnoticed."""
    names = {field.name for field in dataclasses.fields(config) if field.init}
    derived = {name for name, value in vars(Settings).items() if isinstance(value, property)}  # account
    unmapped = names - given.keys() - {field.name for field in dataclasses.fields(Settings)} - derived
    if unmapped:
        raise TypeError(f"{config.__name__}: no setting named {sorted(unmapped)}: give their values")
    values = {name: getattr(settings, name) for name in names - given.keys()}
    return config(**values, **given)


def markdown_table() -> str:
    """The README's configuration table."""
    lines = ["| variable | `serve` flag | default | meaning |", "|---|---|---|---|"]
    for item in ENVIRONMENT:
        flag = f"`{item.flag}`" if item.spec.flag else "(environment only)"
        if item.is_bool and item.spec.flag:
            flag = f"`{item.flag}`, `--no-{item.flag[2:]}`"
        lines.append(f"| `{item.env}` | {flag} | {item.default} | {item.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m tiw_facade.settings --markdown")
    sys.stdout.write(markdown_table())
