"""One typed settings object, built from the environment (and command-line overrides).

Nothing else in the package reads ``os.environ``. A missing or malformed setting raises
``SettingsError`` naming the variable, before anything listens.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_ENDPOINT = "https://tiw.tencentcloudapi.com"
# Demo credentials for `serve --emulator`: the embedded emulator accepts exactly these.
DEMO_SECRET_ID = "AKIDdemoTIWfacadeEMULATOR"
DEMO_SECRET_KEY = "demo-secret-key-for-the-embedded-emulator"
DEMO_REGION = "ap-guangzhou"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """Documentation of one environment variable (the README's table is checked against these)."""

    env: str
    default: str
    help: str


@dataclasses.dataclass(frozen=True)
class Settings:
    secret_id: str
    secret_key: str = dataclasses.field(repr=False)
    session_token: str = dataclasses.field(default="", repr=False)
    region: str = ""
    endpoint: str = DEFAULT_ENDPOINT
    language: str = ""
    grpc_port: int = 50051
    http_port: int = 8080
    bind_host: str = "[::]"
    reflection: bool = True
    shutdown_grace: float = 20.0
    log_level: str = "INFO"
    upstream_timeout: float = 10.0
    max_attempts: int = 3
    rate_limit: int = 20
    rate_limit_account: str = ""
    redis_url: str = dataclasses.field(default="", repr=False)  # may hold a password
    redis_timeout: float = 0.25
    expected_replicas: int = 1
    max_queue_wait: float = 5.0
    max_queue_length: int = 1000
    max_connection_age: float = 300.0

    @property
    def account(self) -> str:
        """Whose quota this is: the configured account, else the SecretId."""
        return self.rate_limit_account or self.secret_id

    @property
    def upstream_host(self) -> str:
        """The Host header and the signed host follow the endpoint."""
        return urllib.parse.urlsplit(self.endpoint).netloc

    @property
    def degraded_rate_limit(self) -> int:
        """Per-replica limit while Redis is unreachable: never unlimited, never zero."""
        return max(1, self.rate_limit // self.expected_replicas)


# The environment variables, their defaults and meaning: one place, also rendered in the README.
ENVIRONMENT: tuple[Setting, ...] = (
    Setting("TENCENTCLOUD_SECRET_ID", "(required)", "SecretId of the Tencent Cloud API key."),
    Setting("TENCENTCLOUD_SECRET_KEY", "(required)", "SecretKey of the API key. Never logged."),
    Setting(
        "TENCENTCLOUD_SESSION_TOKEN", "(empty)", "Session token of temporary credentials, sent as X-TC-Token."
    ),
    Setting("TENCENTCLOUD_REGION", "(required)", "Region sent as X-TC-Region, e.g. `ap-guangzhou`."),
    Setting("TIW_ENDPOINT", DEFAULT_ENDPOINT, "Upstream base URL; the signed Host follows it."),
    Setting("TIW_LANGUAGE", "(empty)", "X-TC-Language for TIW's error messages: `zh-CN` or `en-US`."),
    Setting("TIW_GRPC_PORT", "50051", "Port of the gRPC server (TiwService, health, reflection)."),
    Setting("TIW_HTTP_PORT", "8080", "Port of the HTTP server: `/metrics`, `/healthz`."),
    Setting("TIW_BIND_HOST", "[::]", "Address both servers listen on."),
    Setting("TIW_REFLECTION", "true", "Serve gRPC server reflection."),
    Setting("TIW_SHUTDOWN_GRACE", "20", "Seconds in-flight RPCs may take to finish after SIGTERM."),
    Setting("TIW_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR."),
    Setting(
        "TIW_UPSTREAM_TIMEOUT",
        "10",
        "Seconds one upstream attempt may take; without a caller deadline, the whole call.",
    ),
    Setting("TIW_MAX_ATTEMPTS", "3", "Upper bound on attempts per call, where retrying is safe."),
    Setting("TIW_RATE_LIMIT", "20", "Requests per second per action, for all replicas together."),
    Setting(
        "TIW_RATE_LIMIT_ACCOUNT", "(the SecretId)", "Whose quota: replicas with the same value share it."
    ),
    Setting(
        "TIW_REDIS_URL",
        "(empty: in-process)",
        "Redis for the limiter shared by replicas, e.g. `redis://redis:6379/0`.",
    ),
    Setting(
        "TIW_REDIS_TIMEOUT",
        "0.25",
        "Seconds a Redis call may take before it counts as failed; the limiter degrades only when "
        "Redis fails for 0.5 s (at once when it refuses connections).",
    ),
    Setting(
        "TIW_EXPECTED_REPLICAS",
        "1",
        "Replicas sharing the quota; while Redis is down each takes rate/replicas.",
    ),
    Setting(
        "TIW_MAX_QUEUE_WAIT",
        "5",
        "Longest wait, in seconds, for a rate-limit slot; beyond it, RESOURCE_EXHAUSTED.",
    ),
    Setting(
        "TIW_MAX_QUEUE_LENGTH", "1000", "Callers that may wait per action; beyond it, RESOURCE_EXHAUSTED."
    ),
    Setting(
        "TIW_MAX_CONNECTION_AGE",
        "300",
        "Seconds before a client connection is asked to reconnect (spreads load).",
    ),
)


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number 0..65535")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _endpoint(raw: str) -> str:
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.netloc or parts.path not in {"", "/"}:
        raise ValueError("must be an http(s) base URL such as https://tiw.tencentcloudapi.com")
    return f"{parts.scheme}://{parts.netloc}"


def _log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


def _language(raw: str) -> str:
    if raw not in {"", "zh-CN", "en-US"}:
        raise ValueError("must be zh-CN or en-US")
    return raw


def _redis_url(raw: str) -> str:
    if raw and urllib.parse.urlsplit(raw).scheme not in {"redis", "rediss", "unix"}:
        raise ValueError("must be a redis:// rediss:// or unix:// URL")
    return raw


def load(environ: Mapping[str, str] | None = None, *, demo: bool = False, **overrides: Any) -> Settings:
    """Build the settings from ``environ`` (default: the process environment).

    ``demo`` fills in the credentials the embedded emulator accepts. ``overrides`` (from flags)
    win over the environment; ``None`` values are ignored.
    """
    env = dict(os.environ if environ is None else environ)

    def get(name: str, parse: Callable[[str], T], default: T) -> T:
        raw = env.get(name, "")
        if raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            detail = (
                str(exc) if not str(exc).startswith(("invalid literal", "could not convert")) else "malformed"
            )
            raise SettingsError(f"{name}={raw!r}: {detail}") from None

    def required(name: str, demo_value: str) -> str:
        value = env.get(name, "").strip()
        if value:
            return value
        if demo:
            return demo_value
        raise SettingsError(f"{name} is required (or run `tiw-facade serve --emulator` to try the service)")

    values: dict[str, Any] = {
        "secret_id": required("TENCENTCLOUD_SECRET_ID", DEMO_SECRET_ID),
        "secret_key": required("TENCENTCLOUD_SECRET_KEY", DEMO_SECRET_KEY),
        "session_token": env.get("TENCENTCLOUD_SESSION_TOKEN", "").strip(),
        "region": required("TENCENTCLOUD_REGION", DEMO_REGION),
        "endpoint": get("TIW_ENDPOINT", _endpoint, DEFAULT_ENDPOINT),
        "language": get("TIW_LANGUAGE", _language, ""),
        "grpc_port": get("TIW_GRPC_PORT", _port, 50051),
        "http_port": get("TIW_HTTP_PORT", _port, 8080),
        "bind_host": get("TIW_BIND_HOST", str, "[::]"),
        "reflection": get("TIW_REFLECTION", _bool, True),
        "shutdown_grace": get("TIW_SHUTDOWN_GRACE", _positive_float, 20.0),
        "log_level": get("TIW_LOG_LEVEL", _log_level, "INFO"),
        "upstream_timeout": get("TIW_UPSTREAM_TIMEOUT", _positive_float, 10.0),
        "max_attempts": get("TIW_MAX_ATTEMPTS", _positive_int, 3),
        "rate_limit": get("TIW_RATE_LIMIT", _positive_int, 20),
        "rate_limit_account": get("TIW_RATE_LIMIT_ACCOUNT", str, ""),
        "redis_url": get("TIW_REDIS_URL", _redis_url, ""),
        "redis_timeout": get("TIW_REDIS_TIMEOUT", _positive_float, 0.25),
        "expected_replicas": get("TIW_EXPECTED_REPLICAS", _positive_int, 1),
        "max_queue_wait": get("TIW_MAX_QUEUE_WAIT", _positive_float, 5.0),
        "max_queue_length": get("TIW_MAX_QUEUE_LENGTH", _positive_int, 1000),
        "max_connection_age": get("TIW_MAX_CONNECTION_AGE", _positive_float, 300.0),
    }
    values.update({key: value for key, value in overrides.items() if value is not None})
    return Settings(**values)
