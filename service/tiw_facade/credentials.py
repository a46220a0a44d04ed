"""Where the facade's Tencent Cloud credentials come from, and how they stay current without a restart.

``chain`` picks the source from a ``CredentialsConfig`` as the official SDKs' default chain does,
first match wins (docs/credentials.md):

1. the environment: ``TENCENTCLOUD_SECRET_ID``, ``TENCENTCLOUD_SECRET_KEY`` (and ``_SESSION_TOKEN``);
2. a profile file (INI, ``[default]`` with ``secret_id``, ``secret_key``, optional ``token``):
   ``TENCENTCLOUD_CREDENTIALS_FILE``, else ``~/.tencentcloud/credentials``, else
   ``/etc/tencentcloud/credentials``; re-read whenever it changes (a Secret volume is swapped by
   Kubernetes in one atomic rename), an invalid version ignored with a warning;
3. TKE pod identity: ``TKE_REGION``, ``TKE_PROVIDER_ID``, ``TKE_WEB_IDENTITY_TOKEN_FILE`` and
   ``TKE_ROLE_ARN`` exchanged at STS (``AssumeRoleWithWebIdentity``) for temporary credentials,
   refreshed in the background well before they expire (pod_identity.py).

Unlike the Python SDK there is no CVM instance role: on a pod it is the node's identity, and the SDK
tries it before the pod's own. ``Source.get()`` answers from memory whenever valid credentials are
held; only when none are does it wait, for the one refresh in flight. No key, token or exception
text that might hold one is ever logged.
"""

from __future__ import annotations

import configparser
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from tiw_facade import secret_files
from tiw_facade.failures import CredentialsError
from tiw_facade.metrics import Metrics
from tiw_facade.pod_identity import STS_MAX_DURATION, WebIdentity, WebIdentityConfig
from tiw_facade.secret_files import FileVersion
from tiw_facade.signing import TOKEN_TEXT, Credentials

if TYPE_CHECKING:
    from tiw_facade.settings import Settings

__all__ = [
    "DEFAULT_PROFILES",
    "MIN_SECRET_KEY_LENGTH",
    "CredentialsConfig",
    "CredentialsError",
    "ProfileFile",
    "Source",
    "Static",
    "chain",
    "parse_profile",
]

log = logging.getLogger("tiw_facade.credentials")

# Where the official SDKs look for a profile file when none is named.
DEFAULT_PROFILES: Final = ("~/.tencentcloud/credentials", "/etc/tencentcloud/credentials")
PROFILE_SECTION: Final = "default"

# Every SecretKey Tencent issues has 32 characters, and STS's temporary ones are longer: a shorter
# secret_key was cut short or is a placeholder, and TIW would refuse every call it signed.
MIN_SECRET_KEY_LENGTH: Final = 32


class Source(Protocol):
    """Credentials for the next request; ``get`` is cheap whenever valid credentials are held."""

    description: str

    async def start(self) -> None: ...

    async def get(self) -> Credentials: ...

    async def aclose(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class CredentialsConfig:
    """Every source's configuration; ``chain`` takes the first that is set."""

    secret_id: str = ""  # TENCENTCLOUD_SECRET_ID
    secret_key: str = dataclasses.field(default="", repr=False)  # TENCENTCLOUD_SECRET_KEY
    session_token: str = dataclasses.field(default="", repr=False)  # TENCENTCLOUD_SESSION_TOKEN
    profile: str = ""  # TENCENTCLOUD_CREDENTIALS_FILE (empty: the SDKs' DEFAULT_PROFILES)
    profile_poll: float = 1.0  # TIW_CREDENTIALS_POLL: seconds between looks at the profile file
    pod: WebIdentityConfig = dataclasses.field(default_factory=WebIdentityConfig)  # TKE_*, TIW_STS_*

    @classmethod
    def from_settings(cls, settings: Settings) -> CredentialsConfig:
        from tiw_facade.settings import configure

        return configure(
            cls,
            settings,
            profile=settings.credentials_file,
            profile_poll=settings.credentials_poll,
            pod=WebIdentityConfig.from_settings(settings),
        )


def chain(config: CredentialsConfig, metrics: Metrics, *, clock: Callable[[], float]) -> Source:
    """The first source of the chain that is configured (not started); ``clock`` is Tencent's time
    (Unix seconds), which pod identity stamps its STS calls with.

    Raises ``CredentialsError`` when none is, or one is half configured.
    """
    if config.secret_id or config.secret_key:
        if not (config.secret_id and config.secret_key):
            missing = "TENCENTCLOUD_SECRET_KEY" if config.secret_id else "TENCENTCLOUD_SECRET_ID"
            raise CredentialsError(f"{missing} is not set, but its pair is: set both, or neither")
        key = Credentials(config.secret_id, config.secret_key, config.session_token)
        return Static(key, "the environment (TENCENTCLOUD_SECRET_ID)")
    profile = config.profile or next(
        (path for path in map(os.path.expanduser, DEFAULT_PROFILES) if os.path.exists(path)), ""
    )
    if profile:
        return ProfileFile(profile, poll=config.profile_poll, metrics=metrics)
    tke = config.pod.variables
    if any(tke.values()):
        if missing_tke := [name for name, value in tke.items() if not value]:
            raise CredentialsError(f"TKE pod identity is half configured: {', '.join(missing_tke)} not set")
        if config.pod.duration > STS_MAX_DURATION:
            raise CredentialsError(f"TIW_STS_DURATION must be at most {STS_MAX_DURATION} seconds")
        return WebIdentity(config.pod, metrics=metrics, clock=clock)
    raise CredentialsError(
        "no credentials: set TENCENTCLOUD_SECRET_ID and TENCENTCLOUD_SECRET_KEY, or "
        "TENCENTCLOUD_CREDENTIALS_FILE, or TKE pod identity (TKE_*); see docs/credentials.md"
    )


class Static:
    """A long-term key (or fixed temporary credentials) from the environment."""

    def __init__(self, credentials: Credentials, description: str) -> None:
        self._credentials = credentials
        self.description = description

    async def start(self) -> None:
        log.info("credentials", extra={"source": self.description, "secret_id": self._credentials.secret_id})

    async def get(self) -> Credentials:
        return self._credentials

    async def aclose(self) -> None:
        pass


# --- the profile file -----------------------------------------------------------------------------


def parse_profile(text: str) -> Credentials:
    """The ``[default]`` credentials of a profile file; ``CredentialsError`` says what is wrong.

    Only a file that looks whole is taken: one read while it was being written in place would
    otherwise yield a secret cut short, which parses but signs nothing TIW accepts. Every line of a
    profile ends in a newline (editors, ``printf '...\\n'``, a YAML ``|`` block write one), so a
    write cut short almost always leaves a last line without one; cut exactly at a line's end, the
    lines there are whole and a missing secret_id or secret_key is refused below. The secret_key
    must also have a SecretKey's length, which every key Tencent issues has. No rule on the
    SecretId's: a temporary one has no documented shape, and the emulator's demo one is shorter.
    """
    if text and not text.endswith("\n"):
        raise CredentialsError("the last line does not end in a newline (cut short while being written?)")
    parser = configparser.ConfigParser(interpolation=None)  # a "%" in a key is a "%"
    try:
        parser.read_string(text)
    except configparser.Error as exc:  # its text may quote a line of the file, i.e. a secret
        line = getattr(exc, "lineno", None)
        where = f" at line {line}" if line else ""
        raise CredentialsError(f"not an INI file ({type(exc).__name__}{where})") from None
    if not parser.has_section(PROFILE_SECTION):
        raise CredentialsError(f"no [{PROFILE_SECTION}] section")
    section = parser[PROFILE_SECTION]
    values = {name: section.get(name, "").strip() for name in ("secret_id", "secret_key", "token")}
    for name in ("secret_id", "secret_key"):
        if not values[name]:
            raise CredentialsError(f"[{PROFILE_SECTION}] has no {name}")
    for name, value in values.items():
        if value and not TOKEN_TEXT.fullmatch(value):
            raise CredentialsError(f"[{PROFILE_SECTION}] {name} holds spaces or characters no key has")
    if len(values["secret_key"]) < MIN_SECRET_KEY_LENGTH:
        raise CredentialsError(
            f"[{PROFILE_SECTION}] secret_key is shorter than a SecretKey's {MIN_SECRET_KEY_LENGTH} characters"
        )
    return Credentials(values["secret_id"], values["secret_key"], values["token"])


def _load(path: str) -> tuple[FileVersion, Credentials]:
    """The profile file's version and credentials, or ``CredentialsError``; in a worker thread."""
    try:
        version, text = secret_files.read(path)
    except secret_files.Unreadable as exc:
        raise CredentialsError(str(exc)) from None
    return version, parse_profile(text)


class ProfileFile(secret_files.WatchedFile[Credentials]):
    """A profile file, polled for a new version; the old credentials serve until a new one parses."""

    unusable = (CredentialsError,)

    def __init__(self, path: str, *, poll: float, metrics: Metrics) -> None:
        super().__init__(path, poll=poll, name="credentials-file-watch")
        self.description = f"the profile file {path}"
        self._metrics = metrics
        self._credentials: Credentials | None = None

    async def get(self) -> Credentials:
        if self._credentials is None:
            raise CredentialsError("the credentials file was not read yet (start() not awaited)")
        return self._credentials

    def _load(self) -> tuple[FileVersion, Credentials]:
        return _load(self.path)

    def _adopt(self, credentials: Credentials, *, first: bool) -> None:
        previous, self._credentials = self._credentials, credentials
        if first:
            self._metrics.credentials_expiry.set(0)
            log.info("credentials", extra={"source": self.description, "secret_id": credentials.secret_id})
        elif credentials != previous:
            self._metrics.credentials_refreshes.inc()
            log.info(
                "credentials file changed: new credentials in use",
                extra={"source": self.description, "secret_id": credentials.secret_id},
            )

    def _refused(self, why: str) -> None:
        self._metrics.credentials_refresh_failures.inc()
        log.warning(
            "credentials file ignored: the previous credentials stay in use",
            extra={"source": self.description, "error": why},
        )
