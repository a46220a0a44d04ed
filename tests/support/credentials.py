"""The credentials tests' shared pieces: keys, the keyless facade environment, a facade run in
process, an emulator, and a directory laid out as the kubelet lays out a Secret volume."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from tiw_facade import settings
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc
from tiw_facade.emulator import Emulator, EmulatorConfig
from tiw_facade.server import FacadeServer

from support.facade import facade_environment
from support.tiw import PUSH_TASK, SDK_APP_ID

# Secret keys of a SecretKey's 32 characters at least (credentials.MIN_SECRET_KEY_LENGTH).
OLD = ("AKIDoldKEYrotatedAWAY", "old-secret-key-of-32-characters!")
NEW = ("AKIDnewKEYafterTHEswap", "new-secret-key-of-32-characters!")
NEWER = ("AKIDnewerKEYthirdONE", "newer-secret-key-of-33-characters")
WEB_IDENTITY_TOKEN = "eyJhbGciOiJSUzI1NiJ9.projected-service-account-token.signature"
TKE = {
    "TKE_REGION": "ap-guangzhou",
    "TKE_PROVIDER_ID": "tke-cluster-oidc",
    "TKE_ROLE_ARN": "qcs::cam::uin/100000000001:roleName/tiw-facade",
}
REQUEST = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK)
# These tests count the requests each key signed: every Describe must reach TIW, not the answer cache
# (docs/answers.md), and no refresh may add requests of its own. TIW_REFRESH_INTEREST ends a key's
# refreshes as soon as its call does (CALLS_ONLY, in each facade's environment).
FRESH = (("tiw-max-age-ms", "0"),)
CALLS_ONLY = {"TIW_REFRESH_INTEREST": "0.001"}


def profile(key: tuple[str, str], token: str = "") -> str:
    text = f"[default]\nsecret_id = {key[0]}\nsecret_key = {key[1]}\n"
    return text + (f"token = {token}\n" if token else "")


def keyless_environment(endpoint: str, **extra: str) -> dict[str, str]:
    """The facade's environment without TENCENTCLOUD_SECRET_ID/KEY: another source must serve."""
    environ = facade_environment(endpoint, **CALLS_ONLY)
    del environ["TENCENTCLOUD_SECRET_ID"], environ["TENCENTCLOUD_SECRET_KEY"]
    return {**environ, **extra}


@dataclasses.dataclass
class Running:
    server: FacadeServer
    stub: tiw_pb2_grpc.TiwServiceStub

    def metric(self, name: str) -> float:
        value = self.server.metrics.registry.get_sample_value(name)
        assert value is not None, name
        return value


@contextlib.asynccontextmanager
async def running_facade(environ: dict[str, str]) -> AsyncIterator[Running]:
    server = FacadeServer(settings.load(environ))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            yield Running(server, tiw_pb2_grpc.TiwServiceStub(channel))
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def emulating(**options: object) -> AsyncIterator[Emulator]:
    emulator = Emulator(EmulatorConfig(**options))  # type: ignore[arg-type]
    await emulator.start("127.0.0.1", 0)
    try:
        yield emulator
    finally:
        await emulator.stop()


class SecretVolume:
    """A directory laid out as the kubelet lays out a Secret volume: ``credentials`` is a symlink to
    ``..data/credentials``, and ``..data`` a symlink to a timestamped directory. An update writes a
    new directory, then renames a new ``..data`` link over the old one: one atomic step."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        self.path = root / "credentials"
        root.mkdir(exist_ok=True)

    def publish(self, text: str) -> None:
        self.publish_with(lambda path: path.write_text(text))

    def publish_with(self, make: Callable[[Path], object]) -> None:
        """A new version whose ``credentials`` is what ``make`` puts at the path it is given."""
        self.generation += 1
        version = self.root / f"..2026_01_01_00_00_0{self.generation}.{os.getpid()}"
        version.mkdir()
        make(version / "credentials")
        link = self.root / "..data_tmp"
        link.symlink_to(version.name)
        previous = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        os.replace(link, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/credentials")
        if previous is not None:
            for item in previous.iterdir():
                item.unlink()
            previous.rmdir()
