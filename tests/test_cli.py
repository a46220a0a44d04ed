"""The `tiw-facade` command: flags derived from the settings, one-line errors, and the composition
root (only the CLI knows both the emulator and the facade)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@pytest.mark.slow  # a process per case
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--log-level", "verbose"], "--log-level='verbose': must be DEBUG, INFO, WARNING or ERROR"),
        (["--endpoint", "not a url"], "--endpoint='not a url': must be an http(s) base URL"),
        (["--grpc-port", "http"], "--grpc-port='http': malformed"),
        (["--redis-url", "http://:pw-secret@redis"], "--redis-url='http://redis': must be a redis://"),
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
    for item in settings.ENVIRONMENT:
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


@pytest.mark.slow  # a process of its own
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


@pytest.mark.slow  # a process of its own
def test_the_emulator_port_needs_the_emulator() -> None:
    result = run_cli("serve", "--emulator-port", "8090")
    assert result.returncode == 2
    assert result.stderr.strip() == "tiw-facade: error: --emulator-port needs --emulator (see --help)"


def _announced(args: list[str], emulator_port: int) -> tuple[dict[str, Any], str]:
    """Run `tiw-facade ARGS` until its emulator answers on `emulator_port`, stop it with Ctrl-C, and
    return the log line that says where the emulator listens, and the whole of stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tiw_facade.cli", *args],
        env={"PATH": "/usr/bin:/bin"},  # no credentials: the emulator brings its own
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stats = f"http://127.0.0.1:{emulator_port}/_emulator/stats"
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                with urllib.request.urlopen(stats, timeout=1) as page:
                    assert page.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "the emulator did not answer on the chosen port"
                time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines()]  # the log stays one JSON object a line
    announced = [line for line in lines if "emulator listening on" in line["msg"]]
    assert len(announced) == 1, stderr
    return announced[0], stderr


def _says_where_and_which_key(line: dict[str, Any], stderr: str, port: int) -> None:
    url = f"http://127.0.0.1:{port}"
    assert line["endpoint"] == url
    assert line["secret_id"] == DEMO_SECRET_ID
    assert line["reset"] == f"{url}/_emulator/reset"
    assert f"listening on {url};" in line["msg"]
    assert f"SecretId {DEMO_SECRET_ID} with the demo SecretKey (docs/emulator.md)" in line["msg"]
    assert DEMO_SECRET_KEY not in stderr  # named in the docs, never printed


@pytest.mark.slow
def test_serve_with_the_emulator_says_where_it_listens_and_which_key(
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    emulator_port, grpc_port, http_port = (unused_tcp_port_factory() for _ in range(3))
    args = ["serve", "--emulator", "--emulator-port", str(emulator_port)]
    line, stderr = _announced(
        [*args, "--grpc-port", str(grpc_port), "--http-port", str(http_port)], emulator_port
    )
    _says_where_and_which_key(line, stderr, emulator_port)
    assert line["msg"].startswith("embedded TIW emulator")
    serving = [json.loads(row) for row in stderr.splitlines() if '"msg": "serving"' in row]
    assert serving[0]["endpoint"] == f"http://127.0.0.1:{emulator_port}"  # the facade uses that one


@pytest.mark.slow
def test_the_standalone_emulator_says_where_it_listens_and_which_key(
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    port = unused_tcp_port_factory()
    line, stderr = _announced(["emulator", "--port", str(port)], port)
    _says_where_and_which_key(line, stderr, port)


@pytest.mark.slow  # a process of its own
def test_a_malformed_policy_at_start_is_one_line_naming_the_rule_and_field_and_exit_2(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: p\nallow_rules:\n  - name: readers\n    request: {sdk_app_ids: [1400000001, abc]}\n"
    )
    result = run_cli("serve", "--emulator", env={**CREDENTIALS, "TIW_AUTHZ_POLICY_FILE": str(policy)})
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after the start's INFO lines, the one error
    assert line.startswith("tiw-facade: authorization policy: ")
    assert 'rule "readers"' in line and "request.sdk_app_ids[1]" in line
