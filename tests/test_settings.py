"""Settings: declared once; a bad setting names the variable (or flag); secrets stay out of reprs
and error messages."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from tiw_facade import settings
from tiw_facade.call_record import UNIDENTIFIED
from tiw_facade.metrics import CallerSeries
from tiw_facade.settings import DEFAULT_ENDPOINT, Settings, SettingsError, configure, load

BASE = {
    "TENCENTCLOUD_SECRET_ID": "AKIDx",
    "TENCENTCLOUD_SECRET_KEY": "sekrit-key",
    "TENCENTCLOUD_REGION": "ap-guangzhou",
}


def test_defaults() -> None:
    config = load(BASE)
    assert config.endpoint == DEFAULT_ENDPOINT
    assert config.upstream_host == "tiw.tencentcloudapi.com"
    assert (config.grpc_port, config.http_port, config.rate_limit) == (50051, 8080, 20)
    assert config.reflection is True
    assert config.account == "AKIDx"  # the quota is the account's: by default its SecretId
    assert config.redis_url == ""


def test_environment_and_overrides() -> None:
    config = load(
        {
            **BASE,
            "TIW_ENDPOINT": "http://127.0.0.1:9000/",
            "TIW_GRPC_PORT": "6000",
            "TIW_HTTP_PORT": "6001",
            "TIW_REFLECTION": "false",
            "TIW_RATE_LIMIT_ACCOUNT": "team-a",
            "TIW_EXPECTED_REPLICAS": "3",
        },
        overrides={"grpc_port": "7000", "http_port": None, "log_level": "debug"},
    )
    assert config.endpoint == "http://127.0.0.1:9000"
    assert config.upstream_host == "127.0.0.1:9000"  # the signed host follows the endpoint, port included
    assert config.grpc_port == 7000
    assert config.http_port == 6001  # a None override leaves the environment's value
    assert config.log_level == "DEBUG"  # through the same parser as TIW_LOG_LEVEL
    assert config.reflection is False
    assert config.account == "team-a"
    assert config.degraded_rate_limit == 6


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TENCENTCLOUD_REGION": ""}, "TENCENTCLOUD_REGION is required"),
        ({"TIW_GRPC_PORT": "http"}, "TIW_GRPC_PORT='http': malformed"),
        ({"TIW_HTTP_PORT": "70000"}, "TIW_HTTP_PORT='70000': must be a port number"),
        (
            {"TIW_ENDPOINT": "tiw.tencentcloudapi.com"},
            "TIW_ENDPOINT='tiw.tencentcloudapi.com': must be an http(s) base URL",
        ),
        ({"TIW_ENDPOINT": "http://[::1"}, "TIW_ENDPOINT='http://[::1': malformed"),
        ({"TIW_ENDPOINT": "http://host:99999"}, "TIW_ENDPOINT='http://host:99999': malformed"),
        ({"TIW_RATE_LIMIT": "0"}, "TIW_RATE_LIMIT='0': must be a positive integer"),
        ({"TIW_REFLECTION": "maybe"}, "TIW_REFLECTION='maybe': must be true or false"),
        ({"TIW_REDIS_URL": "http://redis"}, "TIW_REDIS_URL='http://redis': must be a redis://"),
        ({"TIW_SHUTDOWN_GRACE": "-1"}, "TIW_SHUTDOWN_GRACE='-1': must be a positive number"),
        ({"TIW_LOG_LEVEL": "LOUD"}, "TIW_LOG_LEVEL='LOUD': must be DEBUG"),
        ({"TIW_LANGUAGE": "fr-FR"}, "TIW_LANGUAGE='fr-FR': must be zh-CN or en-US"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load({**BASE, **env})
    assert named in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"endpoint": "not a url"}, "--endpoint='not a url': must be an http(s) base URL"),
        ({"log_level": "verbose"}, "--log-level='verbose': must be DEBUG, INFO, WARNING or ERROR"),
        ({"grpc_port": "-1"}, "--grpc-port='-1': must be a port number"),
        ({"reflection": "perhaps"}, "--reflection='perhaps': must be true or false"),
    ],
)
def test_overrides_go_through_the_same_parsers(overrides: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load(BASE, overrides=overrides)
    assert named in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TIW_REDIS_URL", "http://:hunter2-secret@redis:6379/0"),
        ("TIW_REDIS_URL", "redis://user:hunter2-secret@redis:notaport/0"),
        ("TIW_ENDPOINT", "http://user:hunter2-secret@[::1"),
        ("TIW_ENDPOINT", "https://user:hunter2-secret@tiw.tencentcloudapi.com"),
    ],
)
def test_a_rejected_url_does_not_echo_its_password(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load({**BASE, variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}=")
    assert "hunter2-secret" not in message
    shown = message.split("=", 1)[1].split("': ", 1)[0]
    assert "@" not in shown and "user" not in shown  # nothing of the user information


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@redis:6379/0", "redis://redis:6379/0"),
        ("rediss://user:pw@cache.example:6380/1?password=x", "rediss://cache.example:6380/1"),
        ("unix:///run/redis.sock?password=x&db=0", "unix:///run/redis.sock"),
        ("redis://[::1]:6379/2", "redis://[::1]:6379/2"),
        ("redis://host/0?password=se@cret", "redis://host/0"),
        ("redis://:pa?ss@host/0", "redis://"),  # netloc ":pa": neither a host nor a port
        ("redis://user:pw@redis:notaport/0", "redis://redis/0"),
        ("http://user:pw@host:99999", "http://host:99999"),  # out of range: shown, it is what was wrong
        ("http://user:pw@[::1", "http://[::1"),  # urlsplit refuses it
        ("not a url", "not a url"),
    ],
)
def test_the_url_redactor_drops_user_information_and_query(url: str, shown: str) -> None:
    """The one redactor of the logs, /healthz (a Redis's address) and the errors of rejected settings."""
    assert settings.redact_url(url) == shown


def test_an_endpoint_with_userinfo_is_refused() -> None:
    with pytest.raises(SettingsError) as caught:
        load({**BASE, "TIW_ENDPOINT": "https://me@tiw.tencentcloudapi.com"})
    assert "must not carry user:password@" in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("a=\u0661", "'a=\u0661': the weight must be a whole number in the digits 0-9"),  # Arabic-Indic one
        ("a=\u00b2", "the weight must be a whole number in the digits 0-9"),  # superscript two
        ("a=+1", "the weight must be a whole number in the digits 0-9"),
        ("a=1_0", "the weight must be a whole number in the digits 0-9"),
        ("a=1.5", "the weight must be a whole number in the digits 0-9"),
        ("a=-1", "the weight must be a whole number in the digits 0-9"),
        ("a=", "the weight must be a whole number in the digits 0-9"),
        ("a=0", "'a=0': the weight must be from 1 to 100"),
        ("a=101", "'a=101': the weight must be from 1 to 100"),
        ("a=99999999999999999999", "the weight must be from 1 to 100"),
        ("a=" + "9" * 5000, "the weight must be from 1 to 100"),  # past int()'s own digit limit
        ("other=1", "'other' is reserved (the metrics' label for proven callers not listed)"),
        ("unidentified=2", "'unidentified' is reserved (the share of every caller not listed or proven)"),
        ("billing=1,billing=2", "'billing=2': 'billing' is given a weight twice"),
        ("b\u00efll=1", "is not caller=weight"),
        ("spiffe://td/\u00e9=1", "is not caller=weight"),
        ("billing", "is not caller=weight"),
    ],
)
def test_caller_weights_are_refused_naming_the_problem(raw: str, problem: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load({**BASE, "TIW_CALLER_WEIGHTS": raw})
    message = str(caught.value)
    assert message.startswith("TIW_CALLER_WEIGHTS=")
    assert problem in message


def test_caller_weights_take_ascii_digits_up_to_100() -> None:
    weights = load({**BASE, "TIW_CALLER_WEIGHTS": "billing=100, classroom=007,spiffe://td/ns/a/sa/b=1"})
    assert weights.caller_weights == (("billing", 100), ("classroom", 7), ("spiffe://td/ns/a/sa/b", 1))


def test_reserved_caller_names_are_the_metrics_own_labels() -> None:
    assert CallerSeries.UNIDENTIFIED == UNIDENTIFIED
    for label in (CallerSeries.UNIDENTIFIED, CallerSeries.OTHER):
        with pytest.raises(SettingsError, match="is reserved"):
            load({**BASE, "TIW_CALLER_WEIGHTS": f"{label}=1"})


def test_defaults_fill_only_what_is_missing() -> None:
    fallback = {"secret_id": "AKIDdemo", "secret_key": "demo-key", "region": "ap-guangzhou"}
    config = load({"TENCENTCLOUD_REGION": "ap-singapore"}, defaults=fallback)
    assert config.region == "ap-singapore"
    assert (config.secret_id, config.secret_key) == ("AKIDdemo", "demo-key")


def test_unknown_setting_names_are_a_programming_error() -> None:
    with pytest.raises(TypeError, match="grpc_prot"):
        load(BASE, overrides={"grpc_prot": "1"})


def test_repr_holds_no_secret() -> None:
    config = load(
        {**BASE, "TENCENTCLOUD_SESSION_TOKEN": "tok-secret", "TIW_REDIS_URL": "redis://:pw-secret@r:6379/0"}
    )
    text = repr(config)
    for secret in ("sekrit-key", "tok-secret", "pw-secret"):
        assert secret not in text


def test_every_field_is_declared_with_its_variable() -> None:
    declared = settings.ENVIRONMENT
    assert [item.name for item in declared] == [field.name for field in dataclasses.fields(Settings)]
    assert len({item.env for item in declared}) == len(declared)
    # The README's default, read back by the setting's parser, is what load() gives when unset.
    config = load(BASE)
    for item in declared:
        if not item.spec.required and not item.spec.shown_default and item.value != "":
            assert item.spec.parse(item.default) == item.value == getattr(config, item.name)


def test_credentials_have_no_flags() -> None:
    flags = {item.name for item in settings.ENVIRONMENT if item.spec.flag}
    assert not flags & {"secret_id", "secret_key", "session_token"}
    assert {"grpc_port", "http_port", "endpoint", "redis_url", "reflection", "log_level"} <= flags


def test_the_markdown_command_prints_the_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tiw_facade.settings", "--markdown"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout == settings.markdown_table()
    assert "| `TIW_GRPC_PORT` | `--grpc-port` | 50051 |" in result.stdout


def test_a_config_takes_each_setting_of_its_name_and_fails_on_a_field_without_one() -> None:
    @dataclasses.dataclass(frozen=True)
    class Config:
        rate_limit: int = 0
        renamed: float = 0.0

    loaded = settings.load(BASE | {"TIW_RATE_LIMIT": "7"})
    assert configure(Config, loaded, renamed=1.5) == Config(7, 1.5)
    with pytest.raises(TypeError, match=r"Config: no setting named \['renamed'\]"):
        configure(Config, loaded)


def test_every_components_config_maps_from_the_settings() -> None:
    from tiw_facade.answers import Config as AnswersConfig
    from tiw_facade.credentials import CredentialsConfig
    from tiw_facade.idempotency import KeysConfig
    from tiw_facade.limiter import LimiterConfig
    from tiw_facade.pod_identity import WebIdentityConfig
    from tiw_facade.tls import TlsFiles
    from tiw_facade.upstream import ClientConfig

    loaded = load(BASE | {"TIW_RATE_LIMIT": "7", "TIW_MAX_QUEUE_WAIT": "0.5"})
    configs = [
        kind.from_settings(loaded)
        for kind in (AnswersConfig, CredentialsConfig, KeysConfig, LimiterConfig, WebIdentityConfig, TlsFiles)
    ]
    assert LimiterConfig.from_settings(loaded).rate_limit == 7
    assert AnswersConfig.from_settings(loaded).max_queue_wait == 0.5
    assert ClientConfig.from_settings(loaded).region == loaded.region
    assert all(dataclasses.is_dataclass(config) for config in configs)


def test_caller_weights_take_service_account_principals() -> None:
    loaded = load(BASE | {"TIW_CALLER_WEIGHTS": "system:serviceaccount:billing:api=3,classroom=1"})
    assert loaded.caller_weights == (("system:serviceaccount:billing:api", 3), ("classroom", 1))
    with pytest.raises(SettingsError, match="system:serviceaccount:NAMESPACE:NAME"):
        load(BASE | {"TIW_CALLER_WEIGHTS": "system:serviceaccount:Billing:api=3"})
