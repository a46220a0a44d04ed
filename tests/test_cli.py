"""The `tiw-facade` command: flags derived from the settings, one-line errors, and the composition
root (only the CLI knows both the emulator and the facade)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tiw_facade import cli, settings
from tiw_facade.emulator import DEMO_REGION, DEMO_SECRET_ID, DEMO_SECRET_KEY

CREDENTIALS = {
    "PATH": "/usr/bin:/bin",
    "TENCENTCLOUD_SECRET_ID": "AKIDx",
    "TENCENTCLOUD_SECRET_KEY": "k-secret",
    "TENCENTCLOUD_REGION": "ap-guangzhou",
}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiw_facade.cli", *args],
        env=CREDENTIALS if env is None else env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--log-level", "verbose"], "--log-level='verbose': must be DEBUG, INFO, WARNING or ERROR"),
        (["--endpoint", "not a url"], "--endpoint='not a url': must be an http(s) base URL"),
        (["--grpc-port", "http"], "--grpc-port='http': malformed"),
        (["--redis-url", "http://:pw-secret@redis"], "--redis-url='http://***@redis': must be a redis://"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2(args: list[str], named: str) -> None:
    result = run_cli("serve", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "pw-secret" not in result.stderr


def test_every_flag_setting_has_a_serve_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    for item in settings.settings():
        assert (item.flag in text) is item.spec.flag, item.name
    assert "--no-reflection" in text
    assert "--secret-key" not in text


def parsed(*argv: str) -> settings.Settings:
    return cli.load_settings(cli._parser().parse_args(["serve", *argv]))


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**CREDENTIALS, "TIW_GRPC_PORT": "6000", "TIW_REFLECTION": "true"}.items():
        monkeypatch.setenv(name, value)
    config = parsed(
        "--grpc-port", "7000", "--no-reflection", "--log-level", "debug", "--max-queue-wait", "2.5"
    )
    assert (config.grpc_port, config.reflection, config.log_level, config.max_queue_wait) == (
        7000,
        False,
        "DEBUG",
        2.5,
    )
    assert parsed().grpc_port == 6000


def test_the_emulator_mode_brings_its_own_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENCENTCLOUD_SECRET_ID", "AKIDreal")  # the emulator would refuse it
    monkeypatch.delenv("TENCENTCLOUD_SECRET_KEY", raising=False)
    monkeypatch.delenv("TENCENTCLOUD_REGION", raising=False)
    config = parsed("--emulator")
    assert (config.secret_id, config.secret_key, config.region) == (
        DEMO_SECRET_ID,
        DEMO_SECRET_KEY,
        DEMO_REGION,
    )
    monkeypatch.setenv("TENCENTCLOUD_REGION", "ap-singapore")
    assert parsed("--emulator").region == "ap-singapore"


def test_only_the_cli_knows_both_the_emulator_and_the_facade() -> None:
    probe = (
        "import sys\n"
        "import tiw_facade.server, tiw_facade.settings\n"
        "assert not any(m.startswith('tiw_facade.emulator') for m in sys.modules), 'facade imports it'\n"
        "for m in [m for m in sys.modules if m.startswith('tiw_facade')]: del sys.modules[m]\n"
        "import tiw_facade.emulator\n"
        "assert 'tiw_facade.settings' not in sys.modules, 'the emulator imports the settings'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
