"""The emulator's knobs: who may call, how fast, and how long tasks take to move on."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# The key the emulator accepts unless told otherwise, and a region to go with it: `serve --emulator`
# hands these to the facade, so a newcomer needs no Tencent account.
DEMO_SECRET_ID = "AKIDdemoTIWfacadeEMULATOR"
DEMO_SECRET_KEY = "demo-secret-key-for-the-embedded-emulator"
DEMO_REGION = "ap-guangzhou"
# The key the emulator signs its callbacks with under `serve --emulator` (and `tiw-facade emulator
# --callback-url` unless TIW_EMULATOR_CALLBACK_KEY is set), and the applications whose callbacks the
# facade of `serve --emulator` accepts with it: the seeded tasks' and the examples'.
DEMO_CALLBACK_KEY = "demo-callback-key-for-the-emulator"
DEMO_CALLBACK_SDK_APP_IDS = (1400000001, 1400123480, 1400127230)


def _demo_credentials() -> Mapping[str, str]:
    return {DEMO_SECRET_ID: DEMO_SECRET_KEY}


@dataclass(frozen=True)
class EmulatorConfig:
    """``clock`` (Unix seconds) drives everything that depends on time: the signature window,
    the rate window, the tasks' states, the expiry of temporary credentials and the ``Date``
    header, so a test can move them all (or run the emulator ahead of the facade) by one clock."""

    # SecretId -> SecretKey of the keys the emulator accepts.
    credentials: Mapping[str, str] = field(default_factory=_demo_credentials, repr=False)
    # Requests per action accepted in any `rate_window` seconds (TIW documents 20 per second).
    rate_limit: int = 20
    rate_window: float = 1.0
    # A created snapshot task is Running for this long, then Finished.
    snapshot_seconds: float = 5.0
    snapshot_images: int = 3
    # A whiteboard push task is PREPARED for this long, then PUSHING until stopped.
    push_prepare_seconds: float = 2.0
    # A video generation task is QUEUED, then PROCESSING, then FINISHED.
    video_queue_seconds: float = 3.0
    video_process_seconds: float = 10.0
    # SdkAppIds answered UnauthorizedOperation.SdkAppId, as for an app of another account.
    unauthorized_sdk_app_ids: frozenset[int] = frozenset()
    max_clock_skew: int = 300
    # Accepted arrival times kept per action for `Emulator.arrivals` (the counters are exact anyway).
    arrival_history: int = 100_000
    clock: Callable[[], float] = time.time
    # STS (AssumeRoleWithWebIdentity): the web identity tokens it accepts (none: it refuses every
    # call), and the longest life of the temporary credentials it issues, whatever is asked.
    web_identity_tokens: frozenset[str] = frozenset()
    sts_max_seconds: float = 43200.0
    # TIW's callbacks (callbacks.py). `callback_url`: a base URL for every SdkAppId and kind, e.g.
    # the facade's intake, posted to at <base>/callbacks/push, <base>/callbacks/snapshot and
    # <base>/callbacks/video ("": none, unless the Set...Callback actions or a snapshot's CallbackURL
    # give one). `callback_key`: the key signing every SdkAppId's callbacks unless the
    # Set...CallbackKey actions set another ("": unsigned, `Sign` is "").
    callback_url: str = ""
    callback_key: str = field(default="", repr=False)
    # A callback's ExpireTime is its Timestamp plus this many seconds (TIW: some minutes).
    callback_expire_seconds: int = 300
    # Each callback: posted at most `callback_attempts` times (TIW retries anything but a 200), the
    # first retry `callback_retry_seconds` after a failure, each later one twice as long after.
    callback_attempts: int = 4
    callback_retry_seconds: float = 1.0
    callback_timeout: float = 3.0
    # The longest the sender sleeps, in real seconds, before it reads `clock` again: a clock a test
    # moves by hand (or a wall clock stepped) is noticed within it.
    callback_poll_seconds: float = 0.25

    def __post_init__(self) -> None:
        if self.rate_limit < 1 or self.rate_window <= 0:
            raise ValueError("rate_limit must be >= 1 and rate_window > 0")
        durations = (
            self.snapshot_seconds,
            self.push_prepare_seconds,
            self.video_queue_seconds,
            self.video_process_seconds,
        )
        if min(durations) < 0:
            raise ValueError("task durations must not be negative")
        if self.sts_max_seconds <= 0:
            raise ValueError("sts_max_seconds must be positive")
        if self.callback_url and not self.callback_url.startswith(("http://", "https://")):
            raise ValueError("callback_url must be an http:// or https:// URL (or empty: none)")
        if self.callback_attempts < 1 or self.callback_expire_seconds < 0:
            raise ValueError("callback_attempts must be >= 1 and callback_expire_seconds >= 0")
        if self.callback_retry_seconds < 0 or self.callback_timeout <= 0 or self.callback_poll_seconds <= 0:
            raise ValueError("callback_retry_seconds must be >= 0, callback_timeout and poll_seconds > 0")
