"""The keys that sign the callers' tokens: parsed from a JWKS, held, and kept current.

``parse_jwks`` keeps only keys a projected service-account token can be verified with: RSA of 2048
to 8192 bits (RS256) and EC P-256 (ES256), their public members only. ``KeyStore`` holds the last
good ``KeySet`` of a ``KeySource`` (authn_sources.py) and refreshes it on the source's schedule and
on demand, when a token names a key it does not know (the issuer rotated its signing key). On-demand
refreshes are rate-limited (one per MIN_REFRESH_GAP) and coalesced (one fetch however many tokens
wait), so a flood of tokens with made-up key ids costs no fetch beyond that. A failed refresh keeps
the last good keys and logs a WARNING naming the source and the error, never a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt import PyJWK, PyJWTError

log = logging.getLogger("tiw_facade.authn")

# The one algorithm a key of each type verifies (never `none`, never a symmetric one).
ALGORITHM_OF_KEY_TYPE: Final = {"RSA": "RS256", "EC": "ES256"}
ALGORITHMS: Final = frozenset(ALGORITHM_OF_KEY_TYPE.values())
MAX_KEYS: Final = 64  # a cluster publishes one to a few; a longer list is not a JWKS we trust
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 8192  # each verification's cost grows with the size: bounded
# A token naming an unknown key triggers at most one fetch this often (seconds of the store's clock).
MIN_REFRESH_GAP: Final = 5.0
# After a failed refresh the next comes sooner than the schedule: 1 s, doubling up to a minute.
RETRY_MIN: Final = 1.0
RETRY_MAX: Final = 60.0


class KeySourceError(Exception):
    """The keys could not be fetched or parsed; the message is safe to log (no token, no body)."""


class VerificationKey:
    """One public key of the issuer, with the algorithm it verifies."""

    __slots__ = ("algorithm", "fingerprint", "jwk", "kid")

    def __init__(self, kid: str | None, algorithm: str, jwk: PyJWK, fingerprint: str) -> None:
        self.kid = kid
        self.algorithm = algorithm
        self.jwk = jwk
        # SHA-256 of its SubjectPublicKeyInfo: the same key across refreshes, whatever its kid.
        self.fingerprint = fingerprint


class KeySet:
    """The keys of one fetch, by kid."""

    def __init__(self, keys: Sequence[VerificationKey]) -> None:
        self.keys = tuple(keys)
        self._by_kid = {key.kid: key for key in self.keys if key.kid is not None}
        self.fingerprints = frozenset(key.fingerprint for key in self.keys)
        self.identity = frozenset((key.kid, key.fingerprint) for key in self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def kids(self) -> list[str]:
        return sorted(kid for kid in self._by_kid if kid)

    def find(self, kid: str | None, algorithm: str) -> VerificationKey | None:
        """The key a token's header names; without a kid, the one key of its algorithm (if only one)."""
        if kid is not None:
            return self._by_kid.get(kid)
        candidates = [key for key in self.keys if key.algorithm == algorithm]
        return candidates[0] if len(candidates) == 1 else None


def parse_jwks(document: Any) -> KeySet:
    """The usable keys of a JWKS (``{"keys": [...]}``); KeySourceError when there are none.

    Keys of other types, curves, uses or algorithms are skipped (a JWKS may hold encryption keys);
    two keys with one kid make the document ambiguous, and so refused.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeySourceError("not a JWKS (no list of keys)")
    entries: list[Any] = document["keys"]
    if len(entries) > MAX_KEYS:
        raise KeySourceError(f"more than {MAX_KEYS} keys")
    keys = [key for key in map(_verification_key, entries) if key is not None]
    kids = [key.kid for key in keys if key.kid is not None]
    if len(set(kids)) != len(kids):
        raise KeySourceError("two keys have the same kid")
    if not keys:
        raise KeySourceError(
            f"no usable key among {len(entries)} "
            f"(RSA of {MIN_RSA_BITS} bits or more, or EC P-256, for signing)"
        )
    return KeySet(keys)


def _verification_key(entry: Any) -> VerificationKey | None:
    if not isinstance(entry, dict):
        return None
    kty = entry.get("kty")
    algorithm = ALGORITHM_OF_KEY_TYPE.get(kty) if isinstance(kty, str) else None
    if algorithm is None or entry.get("use", "sig") != "sig" or entry.get("alg", algorithm) != algorithm:
        return None
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    if kty == "EC" and entry.get("crv") != "P-256":
        return None
    # Only the public members: private ones (a JWKS published by mistake) or extras are not read.
    members = ("n", "e") if kty == "RSA" else ("crv", "x", "y")
    public = {"kty": kty, **{name: entry.get(name) for name in members}}
    if not all(isinstance(public[name], str) for name in members):
        return None
    try:
        jwk = PyJWK(public, algorithm)
        key = jwk.key
        if isinstance(key, rsa.RSAPublicKey) and not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            return None
        spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (PyJWTError, ValueError, TypeError, AttributeError):  # not a valid key of its type
        return None
    return VerificationKey(kid, algorithm, jwk, hashlib.sha256(spki).hexdigest())


class KeySource(Protocol):
    """Where the keys come from: a discovery, a JWKS URL or a JWKS file (authn_sources.py)."""

    description: str  # for logs: the URL or path, nothing secret
    schedule: float  # seconds between scheduled looks while they succeed
    polled: bool  # scheduled looks only fetch when the source changed (a file's version)

    async def start(self) -> None: ...

    async def fetch(self, *, if_changed: bool = False) -> KeySet | None:
        """The keys (KeySourceError when they cannot be had); None when ``if_changed`` and the
        source is as at the last successful fetch."""
        ...

    async def aclose(self) -> None: ...


class KeyStore:
    """The last good keys of a source, refreshed on its schedule and on demand.

    ``clock`` (seconds) measures MIN_REFRESH_GAP only; the schedule runs on the event loop's time.
    ``on_change`` is called with each new key set that differs from the one held.
    """

    def __init__(
        self,
        source: KeySource,
        *,
        clock: Callable[[], float],
        on_change: Callable[[KeySet], None] = lambda keys: None,
        min_gap: float = MIN_REFRESH_GAP,
    ) -> None:
        self.source = source
        self.keys: KeySet | None = None
        self._clock = clock
        self._on_change = on_change
        self._min_gap = min_gap
        self._last_fetch: float | None = None  # when the last forced fetch started (by clock)
        self._failures = 0  # failed refreshes in a row
        self._last_error = ""
        self._inflight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0  # forced fetches started: for tests and the operator's curiosity

    async def start(self) -> None:
        """Fetch the keys once and start the schedule. Failing to get them is not fatal: tokens are
        refused KEYS_UNAVAILABLE meanwhile, and the schedule keeps trying."""
        await self.source.start()
        await self.refresh()
        self._task = asyncio.create_task(self._keep_fresh(), name="authn-keys-refresh")

    async def aclose(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._inflight = None
        await self.source.aclose()

    async def refresh(self) -> bool:
        """Fetch the keys now, or join the fetch in flight; True when keys are held after it."""
        return await self._coalesced(if_changed=False)

    async def refresh_on_demand(self) -> bool:
        """A refresh for a token whose key is not held: joins the fetch in flight, else starts one
        unless the last started less than ``min_gap`` ago. False when none was made or joined."""
        if self._inflight is None and self._last_fetch is not None:
            elapsed = self._clock() - self._last_fetch
            if 0 <= elapsed < self._min_gap:  # a clock stepped back does not block refreshes
                return False
        await self._coalesced(if_changed=False)
        return True

    async def _coalesced(self, *, if_changed: bool) -> bool:
        if self._inflight is None:
            if not if_changed:
                self._last_fetch = self._clock()
                self.fetches += 1
            self._inflight = asyncio.create_task(self._refresh(if_changed), name="authn-keys-fetch")
            self._inflight.add_done_callback(self._fetched)
        # Shielded: a caller that goes away does not cancel the fetch others wait for.
        return await asyncio.shield(self._inflight)

    def _fetched(self, task: asyncio.Task[bool]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved, so an abandoned failure is not reported as unhandled

    async def _refresh(self, if_changed: bool) -> bool:
        try:
            fresh = await self.source.fetch(if_changed=if_changed)
        except KeySourceError as exc:
            self._failed(str(exc))
            return self.keys is not None
        except Exception as exc:  # a bug: the schedule must outlive it
            log.error("authentication keys: unexpected failure", exc_info=exc)
            self._failed(f"unexpected failure: {type(exc).__name__}")
            return self.keys is not None
        if self._failures:
            log.info("authentication keys fetched again", extra={"source": self.source.description})
        self._failures, self._last_error = 0, ""
        if fresh is not None:
            self._take(fresh)
        return self.keys is not None

    def _take(self, fresh: KeySet) -> None:
        previous, self.keys = self.keys, fresh
        if previous is not None and previous.identity == fresh.identity:
            return
        log.info(
            "authentication keys in use",
            extra={"source": self.source.description, "kids": fresh.kids, "keys": len(fresh)},
        )
        self._on_change(fresh)

    def _failed(self, why: str) -> None:
        self._failures += 1
        if why == self._last_error:  # a source down stays down for many looks: said once
            return
        self._last_error = why
        kept = (
            "the last good keys stay in use" if self.keys is not None else "no keys yet: tokens are refused"
        )
        log.warning(
            f"authentication keys not refreshed: {kept}",
            extra={"source": self.source.description, "error": why},
        )

    def _next_delay(self) -> float:
        if not self._failures:
            return self.source.schedule
        return min(self.source.schedule, RETRY_MAX, RETRY_MIN * (1 << min(self._failures - 1, 16)))

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self._next_delay())
            await self._coalesced(if_changed=self.source.polled)
