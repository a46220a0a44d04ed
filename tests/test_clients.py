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

And once more against facades that require a Kubernetes service-account token (TIW_AUTH_REQUIRED,
keys from TIW_AUTH_JWKS_FILE), with `--token-file`: the call credentials that
docs/authentication-clients.md quotes. The facade counts and audits the calls under the token's
principal; without the file a call is refused UNAUTHENTICATED; and a file the kubelet's way replaced
while a program runs reaches the facade on the program's next call.

Needs go, mvn + java and node (scripts/install-clients installs their plugins and packages). In CI
(CI=true) a missing toolchain fails these tests; elsewhere it skips them with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable

import pytest
from cryptography import x509
from support.certificates import Files, authority
from support.facade import Facade, StartFacade
from support.oidc import DEFAULT_AUDIENCE, OidcServer, service_account
from support.waiting import wait_until
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


# --- Kubernetes service-account tokens (docs/authentication-clients.md) ---


def _principal(language: str) -> str:
    return service_account("clients", f"{language}-example")


class ProjectedToken:
    """A token file laid out as the kubelet writes a projected volume: ``token`` links to
    ``..data/token``, ``..data`` to the directory of the current version, and a rotation writes a new
    directory and swaps ``..data`` in one rename. A client must follow the links and notice the swap."""

    def __init__(self, directory: pathlib.Path) -> None:
        directory.mkdir()
        self.directory = directory
        self.path = directory / "token"

    def write(self, token: str) -> None:
        version = self.directory / f"..{time.time_ns()}"
        version.mkdir()
        (version / "token").write_text(token)
        staged = self.directory / "..data_tmp"
        staged.symlink_to(version.name)
        staged.replace(self.directory / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/token")


class Tokens:
    """An issuer's keys, in the JWKS file the facades read (TIW_AUTH_JWKS_FILE: the issuer serves
    nothing), and a caller's projected token file."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.issuer = OidcServer()
        self.jwks_file = directory / "jwks.json"
        self.issuer.write_jwks(self.jwks_file)
        self.file = ProjectedToken(directory / "tiw-facade")

    def project(self, principal: str, audience: str = DEFAULT_AUDIENCE) -> None:
        """Put a token for ``principal`` and ``audience`` in the file, the kubelet's way."""
        self.file.write(self.issuer.mint(sub=principal, aud=audience))


@pytest.fixture
def tokens(tmp_path: pathlib.Path) -> Tokens:
    return Tokens(tmp_path)


async def _token_facades(start_facade: StartFacade, tokens: Tokens, principal: str) -> tuple[Facade, Facade]:
    auth = {"TIW_AUTH_JWKS_FILE": str(tokens.jwks_file), "TIW_AUTH_REQUIRED": "true"}
    # Listed, so that the metrics by caller name it: an unlisted principal counts as `other`.
    facade = await start_facade(**auth, TIW_CALLER_WEIGHTS=f"{principal}=1")
    limited = await start_facade(**auth, **LIMITED)
    return facade, limited


def _refused_for(facade: Facade) -> list[tuple[str, float]]:
    """The facade's authentication refusals so far, by reason."""
    return [(labels["reason"], value) for labels, value in _samples(facade, "tiw_authn_failures_total")]


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("language", sorted(PROGRAMS))
async def test_client_authenticates_with_its_service_account_token(
    start_facade: StartFacade, tokens: Tokens, caplog: pytest.LogCaptureFixture, language: str
) -> None:
    principal = _principal(language)
    tokens.project(principal)
    facade, limited = await _token_facades(start_facade, tokens, principal)
    caplog.set_level(logging.INFO, logger="tiw_facade.audit")
    code, output = await _run(language, facade, limited, "--token-file", str(tokens.file.path))
    print(output)
    assert code == 0, output
    assert f"{language} client: 11 checks passed" in output
    # Every call that went to TIW was admitted as the token's principal, and as no one else; the
    # changes it asked for (a create, a stop) are in the audit trail under that name, proven by it.
    admitted = {labels["caller"] for labels, _ in _samples(facade, "tiw_limiter_caller_admitted_total")}
    assert admitted == {principal}
    audited = [vars(record) for record in caplog.records if record.name == "tiw_facade.audit"]
    assert {(line["principal"], line["proven_by"]) for line in audited} == {(principal, "token")}
    changed = {line["method"].rpartition("/")[2] for line in audited if line["outcome"] == "OK"}
    assert changed == {"CreateSnapshotTask", "StopWhiteboardPush"}
    assert _refused_for(facade) == []

    # The same facade refuses a call without the token, and sends nothing to TIW for it.
    code, output = await _run(language, facade, limited, "--only", "CreateSnapshotTask")
    assert code == 1, output
    assert "FAIL CreateSnapshotTask" in output
    assert re.search("UNAUTHENTICATED|Unauthenticated", output), output
    assert _refused_for(facade) == [("MISSING_TOKEN", 1.0)]
    assert facade.emulator.stats()["CreateSnapshotTask"].tasks_created == 1  # the first run's


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("language", sorted(PROGRAMS))
async def test_client_sends_the_token_the_kubelet_rotated_in(
    start_facade: StartFacade, tokens: Tokens, language: str
) -> None:
    principal = _principal(language)
    tokens.project(principal)
    facade, limited = await _token_facades(start_facade, tokens, principal)

    async def rotate() -> None:
        # The deadline check's call (the program's second DescribeVideoGenerationTask), the last
        # before the watch, has reached the facade with the first token and waits there for its
        # 300 ms: the file is replaced now, before the watch starts. The new token is for another
        # audience, so how the watch ends shows which token it carried. (All the checks run: with
        # --only, a JVM's first call may not reach the facade within that deadline.)
        await wait_until(lambda: _started(facade, "DescribeVideoGenerationTask") >= 2, within=RUN_TIMEOUT)
        tokens.project(principal, audience="another-service")

    rotation = asyncio.create_task(rotate())
    try:
        code, output = await _run(language, facade, limited, "--token-file", str(tokens.file.path))
    finally:
        rotated = rotation.done()
        rotation.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rotation
    assert rotated, f"the deadline check's call never reached the facade:\n{output}"
    assert code == 1, output
    assert output.count("ok   ") == 10, output  # every check before the watch passed
    assert "FAIL WatchSnapshotTask" in output
    assert re.search("UNAUTHENTICATED|Unauthenticated", output), output
    # Refused by the facade, for the new token's audience: the program read the replaced file.
    assert _refused_for(facade) == [("WRONG_AUDIENCE", 1.0)]


def _started(facade: Facade, method: str) -> float:
    return sum(
        value
        for labels, value in _samples(facade, "grpc_server_started_total")
        if labels["grpc_method"] == method
    )
