"""The example clients in clients/ (Go, Java, Node), generated with buf, built, and run against a live
facade on the emulator: each program checks the five RPCs, rich errors, a deadline, presence,
health and a watch stream (a snapshot task the program adds to the emulator, Running for a few
seconds, watched until Finished), and exits 0 only when every check passed.

The refusal check needs a facade that refuses: a second one on the same emulator with
TIW_RATE_LIMIT=1 and a TIW_MAX_QUEUE_WAIT far below the second a slot takes, so the second call in a
second is refused at once with RESOURCE_EXHAUSTED and RetryInfo (and with answers that are never
fresh enough to serve from its cache instead, see LIMITED).

Each program runs once more against facades serving mutual TLS, with a client certificate and the
`--caller` its certificate names: the channel credentials and the caller interceptor that
docs/tls.md quotes from these programs. A `--caller` the certificate does not name is refused, which
shows the interceptor's name reaches the facade on unary calls and on the watch stream alike.

Needs go, mvn + java and node (scripts/install-clients installs their plugins and packages). In CI
(CI=true) a missing toolchain fails these tests; elsewhere it skips them with the reason.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable

import pytest
from cryptography import x509
from support.certificates import Files, authority
from support.facade import Facade, StartFacade
from tiw_facade.emulator import Emulator, EmulatorConfig

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "clients"
TOOLCHAINS = ("go", "mvn", "java", "node", "npm")
REQUIRED_FILES = (
    ROOT / "node_modules" / ".bin" / "buf",
    ROOT / ".tools" / "bin" / "protoc-gen-go",
    ROOT / ".tools" / "bin" / "protoc-gen-grpc-java",
    CLIENTS / "node" / "node_modules" / ".bin" / "protoc-gen-ts_proto",
)
RUN_TIMEOUT = 120.0  # seconds for one program: a JVM's start on a busy 2-core machine included


def _missing() -> list[str]:
    missing = [tool for tool in TOOLCHAINS if shutil.which(tool) is None]
    missing += [str(path.relative_to(ROOT)) for path in REQUIRED_FILES if not path.exists()]
    return missing


def _java_command() -> list[str]:
    target = CLIENTS / "java" / "target"
    classpath = f"{target / 'classes'}{os.pathsep}{(target / 'classpath.txt').read_text().strip()}"
    return ["java", "-cp", classpath, "com.tiwfacade.example.Main"]


def _go_command() -> list[str]:
    return [str(CLIENTS / "go" / "bin" / "tiwclient")]


def _node_command() -> list[str]:
    return ["node", str(CLIENTS / "node" / "dist" / "main.js")]


# How to run each built program (the Java classpath exists only after the build).
PROGRAMS: dict[str, Callable[[], list[str]]] = {
    "go": _go_command,
    "java": _java_command,
    "node": _node_command,
}


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """conftest's emulator, but with tasks that stay Running (and PREPARED) for a minute: a JVM
    that starts slowly on a busy machine must still see the task it just created running."""
    instance = Emulator(EmulatorConfig(snapshot_seconds=60, push_prepare_seconds=60))
    await instance.start("127.0.0.1", 0)
    yield instance
    await instance.stop()


@pytest.fixture(scope="module")
def built(pytestconfig: pytest.Config) -> None:
    """Generate and build all three programs once, and show how long each step took."""
    missing = _missing()
    if missing:
        message = f"the client toolchains are incomplete: {', '.join(missing)} (run scripts/install-clients)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI builds and runs every client", pytrace=False)
        pytest.skip(message)
    done = subprocess.run(
        ["bash", str(CLIENTS / "build")], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, f"clients/build failed:\n{done.stdout}\n{done.stderr}"
    # Past the output capture: CI's log shows what generating and building the clients costs.
    # (Debian's Maven leaves colour resets before a line even with -B: hence the search.)
    timings = [
        line[line.index("clients/build:") :] for line in done.stdout.splitlines() if "clients/build:" in line
    ]
    with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        pytestconfig.get_terminal_writer().line("\n" + "\n".join(timings))


async def _run(language: str, facade: Facade, limited: Facade, *extra: str) -> tuple[int, str]:
    # The same flags for all three (Go's flag package takes `--name` as well as `-name`).
    arguments = {
        "--target": facade.target,
        "--limited-target": limited.target,
        "--emulator": facade.emulator.url,
    }
    process = await asyncio.create_subprocess_exec(
        *PROGRAMS[language](),
        *(item for pair in arguments.items() for item in pair),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"the {language} client did not finish in {RUN_TIMEOUT:g} s") from None
    assert process.returncode is not None
    return process.returncode, output.decode()


# The refusing facade: one request a second, and no cached answer young enough to serve (a repeated
# Describe would be answered from the cache, and under saturation a stale answer beats a refusal).
LIMITED = {
    "TIW_RATE_LIMIT": "1",
    "TIW_MAX_QUEUE_WAIT": "0.05",
    "TIW_MAX_STALENESS": "0.001",
    "TIW_MAX_STALE_ON_SATURATION": "0.001",
}


async def _facades(start_facade: StartFacade) -> tuple[Facade, Facade]:
    facade = await start_facade()
    limited = await start_facade(**LIMITED)
    return facade, limited


@pytest.mark.parametrize("language", sorted(PROGRAMS))
async def test_client_passes_every_check(built: None, start_facade: StartFacade, language: str) -> None:
    facade, limited = await _facades(start_facade)
    code, output = await _run(language, facade, limited)
    print(output)
    assert code == 0, output
    assert f"{language} client: 11 checks passed" in output
    # The program really called through the facade: the created task reached the emulator.
    assert facade.emulator.stats()["CreateSnapshotTask"].tasks_created == 1


@pytest.mark.parametrize("language", sorted(PROGRAMS))
async def test_client_fails_when_a_check_fails(built: None, start_facade: StartFacade, language: str) -> None:
    # A "limited" facade that never refuses: every check before the refusal passes, that one fails.
    facade = await start_facade()
    code, output = await _run(language, facade, facade)
    assert code == 1, output
    assert "FAIL RESOURCE_EXHAUSTED with RetryInfo" in output
    assert "checks passed" not in output


@pytest.fixture
def files(tmp_path: pathlib.Path) -> Files:
    return Files(authority(), tmp_path)


def _tls_flags(files: Files, caller: str) -> list[str]:
    """The programs' flags for mutual TLS: --ca, the CA that signed the facades' certificate, and a
    client certificate whose DNS name (the caller it names, docs/tls.md) is ``caller``."""
    issued = files.ca.issue(caller, [x509.DNSName(caller)])
    files.write("ca.crt", files.ca.cert)
    files.write("client.crt", issued.cert)
    files.write("client.key", issued.key)
    directory = files.directory
    return [
        "--ca",
        str(directory / "ca.crt"),
        "--cert",
        str(directory / "client.crt"),
        "--key",
        str(directory / "client.key"),
    ]


async def _mutual_tls_facades(start_facade: StartFacade, files: Files, caller: str) -> tuple[Facade, Facade]:
    mutual = files.env(mutual=True)
    # Listed, so that the metrics by caller name it: an unlisted certificate's name counts as `other`.
    facade = await start_facade(**mutual, TIW_CALLER_WEIGHTS=f"{caller}=1")
    limited = await start_facade(**mutual, **LIMITED)
    return facade, limited


def _samples(facade: Facade, name: str) -> list[tuple[dict[str, str], float]]:
    registry = facade.server.metrics.registry
    return [
        (sample.labels, sample.value)
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == name and sample.value
    ]


@pytest.mark.parametrize("language", sorted(PROGRAMS))
async def test_client_over_mutual_tls_names_its_caller(
    built: None, start_facade: StartFacade, files: Files, language: str
) -> None:
    caller = f"{language}-example"
    facade, limited = await _mutual_tls_facades(start_facade, files, caller)
    code, output = await _run(language, facade, limited, *_tls_flags(files, caller), "--caller", caller)
    print(output)
    assert code == 0, output
    assert f"{language} client: 11 checks passed" in output
    # Every call that went to TIW was admitted as the certificate's caller, and as no one else.
    admitted = {labels["caller"] for labels, _ in _samples(facade, "tiw_limiter_caller_admitted_total")}
    assert admitted == {caller}


# A check that starts with a unary call, and the watch's: grpc-go intercepts the two kinds apart.
FIRST_CALLS = ("CreateSnapshotTask", "WatchSnapshotTask")


@pytest.mark.parametrize("language", sorted(PROGRAMS))
@pytest.mark.parametrize("method", FIRST_CALLS)
async def test_a_caller_the_certificate_does_not_name_is_refused(
    built: None, start_facade: StartFacade, files: Files, language: str, method: str
) -> None:
    facade, limited = await _mutual_tls_facades(start_facade, files, f"{language}-example")
    flags = [*_tls_flags(files, f"{language}-example"), "--caller", "someone-else", "--only", method]
    code, output = await _run(language, facade, limited, *flags)
    assert code == 1, output
    assert f"FAIL {method}" in output
    assert re.search("PERMISSION_DENIED|PermissionDenied", output), output
    # The facade refused that call for the name it carried.
    refused = [
        labels for labels, _ in _samples(facade, "grpc_server_handled_total") if labels["grpc_code"] != "OK"
    ]
    assert [(labels["grpc_method"], labels["grpc_code"]) for labels in refused] == [
        (method, "PermissionDenied")
    ]
