"""TLS and mutual TLS on the gRPC port, with certificates made here: who is calling, and rotation.

Real TLS handshakes over real gRPC channels to a facade on the emulator.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import urllib.request

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.certificates import Files, Issued, authority, server_cert
from support.facade import StartFacade, facade_environment
from support.rich_status import error_info
from support.tiw import PUSH_TASK, SDK_APP_ID
from tiw_facade import settings, tls
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc
from tiw_facade.server import FacadeServer

SPIFFE_ID = "spiffe://example.org/ns/classroom/sa/billing"
REQUEST = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK)


@pytest.fixture
def files(tmp_path: pathlib.Path) -> Files:
    return Files(authority(), tmp_path)


async def describe(
    port: int, roots: bytes, client: Issued | None = None, caller: str | None = None
) -> pb.DescribeWhiteboardPushResponse:
    """One call over a new TLS channel (a new connection, a new handshake)."""
    credentials = grpc.ssl_channel_credentials(
        roots, client.key if client else None, client.cert if client else None
    )
    metadata = (("tiw-caller", caller),) if caller is not None else ()
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        answer: pb.DescribeWhiteboardPushResponse = await tiw_pb2_grpc.TiwServiceStub(
            channel
        ).DescribeWhiteboardPush(REQUEST, metadata=metadata, timeout=5)
        return answer


async def refused(
    port: int, roots: bytes, client: Issued | None = None, caller: str | None = None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await describe(port, roots, client, caller)
    return caught.value


async def test_tls_serves_tls_only(start_facade: StartFacade, files: Files) -> None:
    facade = await start_facade(**files.env(mutual=False))
    port = facade.server.grpc_port
    assert (await describe(port, files.ca.cert)).task_id == PUSH_TASK
    # A client needs no certificate, and its own tiw-caller is taken as it is.
    assert (await describe(port, files.ca.cert, caller="billing")).task_id == PUSH_TASK
    with pytest.raises(grpc.aio.AioRpcError) as plaintext:
        await facade.stub.DescribeWhiteboardPush(REQUEST, timeout=5)
    assert plaintext.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("common_name", "sans", "named"),
    [
        # The SPIFFE ID beats a DNS name, which beats the CN.
        ("cn-ignored", [x509.DNSName("dns.example"), x509.UniformResourceIdentifier(SPIFFE_ID)], SPIFFE_ID),
        (
            "cn-ignored",
            [x509.DNSName("billing.classroom.svc"), x509.DNSName("other")],
            "billing.classroom.svc",
        ),
        ("cn-ignored", [x509.UniformResourceIdentifier("https://not.spiffe/x"), x509.DNSName("d")], "d"),
        ("billing-by-cn", [], "billing-by-cn"),
    ],
    ids=["spiffe", "dns", "non-spiffe-uri", "cn"],
)
async def test_the_client_certificate_names_the_caller(
    start_facade: StartFacade, files: Files, common_name: str, sans: list[x509.GeneralName], named: str
) -> None:
    facade = await start_facade(**files.env(mutual=True))
    port, client = facade.server.grpc_port, files.ca.issue(common_name, sans)

    assert (await describe(port, files.ca.cert, client)).task_id == PUSH_TASK
    # The certificate's own name may be echoed, even a SPIFFE ID that is no valid tiw-caller.
    assert (await describe(port, files.ca.cert, client, caller=named)).task_id == PUSH_TASK
    served = facade.emulator.stats()["DescribeWhiteboardPush"].accepted

    # Another name is refused, nothing sent; the refusal says which name the certificate gives.
    error = await refused(port, files.ca.cert, client, caller="someone-else")
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    info = error_info(error)
    assert (info.reason, info.metadata["caller"], info.metadata["outcome"]) == (
        "CALLER_MISMATCH",
        named,
        "not_sent",
    )
    assert facade.emulator.stats()["DescribeWhiteboardPush"].accepted == served

    # A malformed name is still INVALID_ARGUMENT, as without TLS.
    malformed = await refused(port, files.ca.cert, client, caller="not a name")
    assert malformed.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_mutual_tls_refuses_a_client_without_a_certificate(
    start_facade: StartFacade, files: Files
) -> None:
    facade = await start_facade(**files.env(mutual=True))
    port = facade.server.grpc_port
    without = await refused(port, files.ca.cert, caller="billing")
    assert without.code() is grpc.StatusCode.UNAVAILABLE  # the handshake failed: no call was served
    stranger = authority("another CA").issue("billing", [x509.UniformResourceIdentifier(SPIFFE_ID)])
    assert (await refused(port, files.ca.cert, stranger)).code() is grpc.StatusCode.UNAVAILABLE
    assert facade.emulator.stats()["DescribeWhiteboardPush"].accepted == 0


async def test_a_rotated_certificate_is_served_to_new_connections(
    start_facade: StartFacade, files: Files
) -> None:
    facade = await start_facade(**files.env(mutual=False))
    port, old_ca, new_ca = facade.server.grpc_port, files.ca, authority("rotated CA")
    credentials = grpc.ssl_channel_credentials(old_ca.cert)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as kept:
        stub = tiw_pb2_grpc.TiwServiceStub(kept)
        await stub.DescribeWhiteboardPush(REQUEST, timeout=5)
        assert (await refused(port, new_ca.cert)).code() is grpc.StatusCode.UNAVAILABLE

        rotated = server_cert(new_ca)
        # Halfway (the new certificate, the old key): the pair does not match, the old one stays.
        files.write("server.crt", rotated.cert)
        assert (await describe(port, old_ca.cert)).task_id == PUSH_TASK
        files.write("server.key", rotated.key)

        assert (await describe(port, new_ca.cert)).task_id == PUSH_TASK
        assert (await refused(port, old_ca.cert)).code() is grpc.StatusCode.UNAVAILABLE
        # A connection made before the rotation keeps its session.
        assert (await stub.DescribeWhiteboardPush(REQUEST, timeout=5)).task_id == PUSH_TASK


async def test_probes_work_under_mutual_tls(start_facade: StartFacade, files: Files) -> None:
    """Kubernetes' gRPC probe speaks no TLS: probes use the plaintext HTTP /healthz (docs/tls.md), and
    TLS clients still have grpc.health.v1 on the TLS port."""
    facade = await start_facade(**files.env(mutual=True))
    url = f"http://127.0.0.1:{facade.server.http_port}/healthz"
    answer = await asyncio.to_thread(urllib.request.urlopen, url, timeout=5)
    assert answer.status == 200 and json.loads(answer.read())["status"] == "SERVING"

    client = files.ca.issue("prober", [x509.DNSName("prober")])
    credentials = grpc.ssl_channel_credentials(files.ca.cert, client.key, client.cert)
    async with grpc.aio.secure_channel(f"127.0.0.1:{facade.server.grpc_port}", credentials) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert (
            await check(health_pb2.HealthCheckRequest(), timeout=5)
        ).status == health_pb2.HealthCheckResponse.SERVING


def load(**env: str) -> settings.Settings:
    return settings.load(facade_environment("http://127.0.0.1:1", **env))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TIW_TLS_CERT_FILE": "server.crt"}, "TIW_TLS_CERT_FILE and TIW_TLS_KEY_FILE go together"),
        ({"TIW_TLS_KEY_FILE": "server.key"}, "TIW_TLS_CERT_FILE and TIW_TLS_KEY_FILE go together"),
        ({"TIW_TLS_CLIENT_CA_FILE": "client-ca.crt"}, "TIW_TLS_CLIENT_CA_FILE needs TIW_TLS_CERT_FILE"),
        ({"TIW_TLS_CERT_FILE": "missing.crt", "TIW_TLS_KEY_FILE": "server.key"}, "No such file"),
        ({"TIW_TLS_CERT_FILE": "server.key", "TIW_TLS_KEY_FILE": "server.key"}, "not a usable PEM"),
        ({"TIW_TLS_CERT_FILE": "other.crt", "TIW_TLS_KEY_FILE": "server.key"}, "not a usable PEM"),
        ({"TIW_TLS_CERT_FILE": "server.crt", "TIW_TLS_KEY_FILE": "encrypted.key"}, "the key is encrypted"),
        (
            {
                "TIW_TLS_CERT_FILE": "server.crt",
                "TIW_TLS_KEY_FILE": "server.key",
                "TIW_TLS_CLIENT_CA_FILE": "junk",
            },
            "TIW_TLS_CLIENT_CA_FILE",
        ),
    ],
)
async def test_unusable_tls_files_stop_the_start_naming_the_setting(
    files: Files, env: dict[str, str], message: str
) -> None:
    files.write("other.crt", server_cert(authority()).cert)  # a certificate of another key
    key = serialization.load_pem_private_key((files.directory / "server.key").read_bytes(), None)
    encrypted = serialization.BestAvailableEncryption(b"secret")
    pkcs8 = serialization.PrivateFormat.PKCS8
    files.write("encrypted.key", key.private_bytes(serialization.Encoding.PEM, pkcs8, encrypted))
    files.write("junk", b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    config = load(**{name: str(files.directory / value) for name, value in env.items()})
    server = FacadeServer(config)
    with pytest.raises(tls.TlsFilesError, match=message) as caught:
        await server.start()
    assert b"PRIVATE KEY" not in str(caught.value).encode()
    await server.stop(0)
