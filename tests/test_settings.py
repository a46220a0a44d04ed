"""Settings: one typed object; a bad setting names the variable; secrets stay out of reprs."""

from __future__ import annotations

import pytest
from tiw_facade.settings import DEFAULT_ENDPOINT, SettingsError, load

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
            "TIW_REFLECTION": "false",
            "TIW_RATE_LIMIT_ACCOUNT": "team-a",
            "TIW_EXPECTED_REPLICAS": "3",
        },
        grpc_port=7000,
        http_port=None,
    )
    assert config.endpoint == "http://127.0.0.1:9000"
    assert config.upstream_host == "127.0.0.1:9000"  # the signed host follows the endpoint, port included
    assert config.grpc_port == 7000
    assert config.reflection is False
    assert config.account == "team-a"
    assert config.degraded_rate_limit == 6


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TENCENTCLOUD_SECRET_ID": ""}, "TENCENTCLOUD_SECRET_ID is required"),
        ({"TENCENTCLOUD_SECRET_KEY": " "}, "TENCENTCLOUD_SECRET_KEY is required"),
        ({"TENCENTCLOUD_REGION": ""}, "TENCENTCLOUD_REGION is required"),
        ({"TIW_GRPC_PORT": "http"}, "TIW_GRPC_PORT='http': malformed"),
        ({"TIW_HTTP_PORT": "70000"}, "TIW_HTTP_PORT='70000': must be a port number"),
        (
            {"TIW_ENDPOINT": "tiw.tencentcloudapi.com"},
            "TIW_ENDPOINT='tiw.tencentcloudapi.com': must be an http(s) base URL",
        ),
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


def test_demo_fills_only_what_is_missing() -> None:
    config = load({"TENCENTCLOUD_REGION": "ap-singapore"}, demo=True)
    assert config.region == "ap-singapore"
    assert config.secret_id.startswith("AKID")


def test_repr_holds_no_secret() -> None:
    config = load(
        {**BASE, "TENCENTCLOUD_SESSION_TOKEN": "tok-secret", "TIW_REDIS_URL": "redis://:pw-secret@r:6379/0"}
    )
    text = repr(config)
    for secret in ("sekrit-key", "tok-secret", "pw-secret"):
        assert secret not in text
