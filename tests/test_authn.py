"""Callers' projected service-account tokens, checked against a real local OIDC issuer over HTTP(S)
whose keys the tests make (tests/support/oidc.py); time is a VirtualClock, never a sleep."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.rpc import error_details_pb2, status_pb2
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from support.certificates import authority, server_cert
from support.clock import VirtualClock
from support.oidc import OidcServer, SigningKey, service_account, sign
from support.waiting import wait_until
from tiw_facade import errors, settings
from tiw_facade.authn import LEEWAY, AuthnConfig, Principal, TokenVerifier
from tiw_facade.authn_keys import MIN_REFRESH_GAP, KeySourceError, parse_jwks
from tiw_facade.authn_sources import MAX_DOCUMENT_BYTES, MAX_REDIRECTS
from tiw_facade.failures import AuthenticationFailed, AuthnReason
from tiw_facade.metrics import Metrics

BILLING = service_account("billing", "invoices")

MakeVerifier = Callable[..., Awaitable[TokenVerifier]]


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock.at_wall_time()


@pytest.fixture
async def issuer(clock: VirtualClock) -> AsyncIterator[OidcServer]:
    async with OidcServer(clock=clock) as server:
        yield server


@pytest.fixture
async def make_verifier(clock: VirtualClock) -> AsyncIterator[MakeVerifier]:
    started: list[TokenVerifier] = []

    async def make(config: AuthnConfig, **options: object) -> TokenVerifier:
        verifier = TokenVerifier(config, clock=clock, **options)  # type: ignore[arg-type]
        started.append(verifier)
        await verifier.start()
        return verifier

    yield make
    for verifier in started:
        await verifier.aclose()


@pytest.fixture
async def verifier(issuer: OidcServer, make_verifier: MakeVerifier) -> TokenVerifier:
    """Checking the issuer's tokens through its discovery document."""
    return await make_verifier(AuthnConfig(issuer=issuer.issuer))


async def refused(verifier: TokenVerifier, token: str, reason: AuthnReason) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as caught:
        await verifier.verify(token)
    assert caught.value.reason == reason, str(caught.value)
    assert token not in str(caught.value)
    return caught.value


# --- valid tokens, by each source of keys ---


async def test_a_valid_rs256_token_names_its_service_account(
    issuer: OidcServer, verifier: TokenVerifier, clock: VirtualClock
) -> None:
    principal = await verifier.verify(issuer.mint(sub=BILLING, lifetime=600))
    assert principal == Principal(
        "system:serviceaccount:billing:invoices",
        "billing",
        "invoices",
        expires_at=int(clock()) + 600,
        pod="invoices-6d9f7c8b5-x2x4q",
    )
    assert principal.proof == "service_account_token"
    # Through the issuer's discovery: its document, then its jwks_uri, once each.
    assert issuer.fetches == {"/.well-known/openid-configuration": 1, "/openid/v1/jwks": 1}


async def test_a_valid_es256_token_is_accepted(clock: VirtualClock, make_verifier: MakeVerifier) -> None:
    async with OidcServer(alg="ES256", clock=clock) as issuer:
        verifier = await make_verifier(AuthnConfig(issuer=issuer.issuer))
        assert (await verifier.verify(issuer.mint(sub=BILLING))).name == BILLING


async def test_an_issuer_below_the_root_is_discovered_there(
    clock: VirtualClock, make_verifier: MakeVerifier
) -> None:
    async with OidcServer(clock=clock, path="/id/ABC123") as issuer:
        verifier = await make_verifier(AuthnConfig(issuer=issuer.issuer))
        assert (await verifier.verify(issuer.mint())).namespace == "default"
        assert issuer.fetches["/id/ABC123/.well-known/openid-configuration"] == 1


async def test_keys_from_a_jwks_url_check_no_issuer(issuer: OidcServer, make_verifier: MakeVerifier) -> None:
    verifier = await make_verifier(AuthnConfig(jwks_url=issuer.jwks_url))
    assert (await verifier.verify(issuer.mint(sub=BILLING, iss="https://elsewhere"))).name == BILLING
    assert issuer.fetches == {"/openid/v1/jwks": 1}


async def test_keys_from_a_jwks_file_follow_its_rotation(
    issuer: OidcServer, make_verifier: MakeVerifier, clock: VirtualClock, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "jwks.json"
    issuer.write_jwks(path)
    verifier = await make_verifier(AuthnConfig(jwks_file=str(path), file_poll=3600))
    assert (await verifier.verify(issuer.mint())).name == "system:serviceaccount:default:caller"

    # A new signing key: a token naming it makes the file be read again (once the gap has passed).
    issuer.rotate("ES256")
    issuer.write_jwks(path)
    clock.advance(MIN_REFRESH_GAP)
    assert (await verifier.verify(issuer.mint(sub=BILLING))).name == BILLING


async def test_a_changed_jwks_file_is_taken_without_a_token_asking(
    issuer: OidcServer, make_verifier: MakeVerifier, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "jwks.json"
    issuer.write_jwks(path)
    verifier = await make_verifier(AuthnConfig(jwks_file=str(path), file_poll=0.01))
    fresh = issuer.rotate(retire=True)
    issuer.write_jwks(path)
    await wait_until(lambda: verifier.keys is not None and verifier.keys.kids == [fresh.kid])


async def test_a_jwks_file_that_breaks_keeps_the_last_good_keys(
    issuer: OidcServer, make_verifier: MakeVerifier, clock: VirtualClock, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "jwks.json"
    issuer.write_jwks(path)
    verifier = await make_verifier(AuthnConfig(jwks_file=str(path), file_poll=3600))
    path.write_text('{"keys": [')
    assert await verifier.refresh()  # failed, but keys are held
    assert (await verifier.verify(issuer.mint())).service_account == "caller"


# --- the signing key rotates; made-up kids ---


async def test_a_rotated_signing_key_is_fetched_for_the_first_token_it_signs(
    issuer: OidcServer, verifier: TokenVerifier, clock: VirtualClock
) -> None:
    old_token = issuer.mint()
    issuer.rotate()
    clock.advance(MIN_REFRESH_GAP)
    assert (await verifier.verify(issuer.mint(sub=BILLING))).name == BILLING
    assert issuer.jwks_fetches == 2
    assert (await verifier.verify(old_token)).service_account == "caller"  # still published


async def test_a_flood_of_unknown_kids_costs_one_fetch_per_gap(
    clock: VirtualClock, make_verifier: MakeVerifier
) -> None:
    metrics = Metrics("test")
    async with OidcServer(alg="ES256", clock=clock) as issuer:  # ES256: cheap to mint hundreds
        verifier = await make_verifier(AuthnConfig(jwks_url=issuer.jwks_url), metrics=metrics)

        async def flood() -> None:
            tokens = [issuer.mint(kid=secrets.token_hex(8)) for _ in range(100)]
            outcomes = await asyncio.gather(*map(verifier.verify, tokens), return_exceptions=True)
            reasons = {getattr(outcome, "reason", outcome) for outcome in outcomes}
            assert reasons == {"UNKNOWN_KEY"}

        await flood()  # right after start-up's fetch: none
        assert issuer.jwks_fetches == 1
        clock.advance(MIN_REFRESH_GAP)
        await flood()  # the hundred share one fetch
        assert issuer.jwks_fetches == 2
        clock.advance(MIN_REFRESH_GAP / 2)
        await flood()
        assert issuer.jwks_fetches == 2
        clock.advance(MIN_REFRESH_GAP / 2)
        await flood()
        assert issuer.jwks_fetches == 3
        sample = metrics.registry.get_sample_value("tiw_authn_failures_total", {"reason": "UNKNOWN_KEY"})
        assert sample == 400


async def test_a_clock_stepped_back_does_not_stop_refreshes(
    issuer: OidcServer, verifier: TokenVerifier, clock: VirtualClock
) -> None:
    issuer.rotate()
    clock.set(clock() - 3600)  # NTP corrected the clock by an hour
    assert (await verifier.verify(issuer.mint(sub=BILLING, iat=clock() - 10))).name == BILLING


async def test_a_key_the_issuer_removes_stops_verifying_at_the_next_refresh(
    issuer: OidcServer, verifier: TokenVerifier
) -> None:
    token = issuer.mint()
    await verifier.verify(token)  # and remembered
    issuer.rotate(retire=True)
    assert await verifier.refresh()
    await refused(verifier, token, AuthnReason.UNKNOWN_KEY)


# --- tokens refused ---


async def test_an_expired_token_is_refused_after_the_leeway(
    issuer: OidcServer, verifier: TokenVerifier, clock: VirtualClock
) -> None:
    now = clock()
    await refused(verifier, issuer.mint(exp=now - LEEWAY - 1), AuthnReason.EXPIRED)
    token = issuer.mint(exp=now - LEEWAY + 2)
    assert (await verifier.verify(token)).service_account == "caller"
    clock.advance(2)  # remembered, it still expires
    await refused(verifier, token, AuthnReason.EXPIRED)


async def test_a_token_without_expiry_is_refused(issuer: OidcServer, verifier: TokenVerifier) -> None:
    claims = issuer.claims()
    del claims["exp"]
    await refused(verifier, sign(claims, issuer.signing), AuthnReason.MALFORMED_TOKEN)
    await refused(verifier, issuer.mint(exp="tomorrow"), AuthnReason.MALFORMED_TOKEN)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_a_token_not_yet_valid_is_refused(
    issuer: OidcServer, verifier: TokenVerifier, clock: VirtualClock, claim: str
) -> None:
    future: dict[str, Any] = {claim: clock() + LEEWAY + 5}
    await refused(verifier, issuer.mint(**future), AuthnReason.NOT_YET_VALID)
    within_leeway: dict[str, Any] = {claim: clock() + LEEWAY - 5}
    assert await verifier.verify(issuer.mint(**within_leeway))


async def test_the_audience_must_be_among_the_token_s(issuer: OidcServer, verifier: TokenVerifier) -> None:
    await refused(verifier, issuer.mint(aud="vault"), AuthnReason.WRONG_AUDIENCE)
    await refused(verifier, issuer.mint(aud=[]), AuthnReason.WRONG_AUDIENCE)
    assert await verifier.verify(issuer.mint(aud=["vault", "tiw-facade"]))


async def test_another_configured_audience(issuer: OidcServer, make_verifier: MakeVerifier) -> None:
    verifier = await make_verifier(AuthnConfig(issuer=issuer.issuer, audience="whiteboards"))
    await refused(verifier, issuer.mint(), AuthnReason.WRONG_AUDIENCE)
    assert await verifier.verify(issuer.mint(aud="whiteboards"))


async def test_the_issuer_must_be_the_configured_one(issuer: OidcServer, verifier: TokenVerifier) -> None:
    await refused(verifier, issuer.mint(iss="https://kubernetes.default.svc"), AuthnReason.WRONG_ISSUER)
    claims = issuer.claims()
    del claims["iss"]
    await refused(verifier, sign(claims, issuer.signing), AuthnReason.WRONG_ISSUER)


@pytest.mark.parametrize("alg", ["none", "HS256", "HS384", "HS512", "RS384", "PS256"])
async def test_other_algorithms_are_refused_before_any_key_is_looked_at(
    issuer: OidcServer, verifier: TokenVerifier, clock: VirtualClock, alg: str
) -> None:
    """``none``, and HS256 signed with the issuer's public key as the HMAC secret (the classic
    confusion: a verifier that let the token pick the algorithm would accept it)."""
    clock.advance(MIN_REFRESH_GAP)
    fetched = issuer.jwks_fetches
    await refused(verifier, issuer.mint(alg=alg), AuthnReason.UNSUPPORTED_ALGORITHM)
    await refused(verifier, issuer.mint(alg=alg, kid="made-up"), AuthnReason.UNSUPPORTED_ALGORITHM)
    assert issuer.jwks_fetches == fetched


async def test_a_token_signed_by_another_key_is_refused(issuer: OidcServer, verifier: TokenVerifier) -> None:
    forger = SigningKey("RS256")
    await refused(verifier, issuer.mint(key=forger, kid=issuer.signing.kid), AuthnReason.BAD_SIGNATURE)
    # An ES256 header on the issuer's RSA key: not the key's algorithm.
    es_forger = SigningKey("ES256")
    await refused(verifier, issuer.mint(key=es_forger, kid=issuer.signing.kid), AuthnReason.BAD_SIGNATURE)
    # The issuer's signature over other claims.
    header, _, signature = issuer.mint().split(".")
    _, claims, _ = issuer.mint(sub=BILLING).split(".")
    await refused(verifier, f"{header}.{claims}.{signature}", AuthnReason.BAD_SIGNATURE)


async def test_a_token_without_a_kid_uses_the_one_key(
    issuer: OidcServer, verifier: TokenVerifier, clock: VirtualClock
) -> None:
    assert await verifier.verify(issuer.mint(kid=""))
    issuer.rotate()
    await verifier.refresh()
    await refused(verifier, issuer.mint(kid=""), AuthnReason.UNKNOWN_KEY)  # which of two?


@pytest.mark.parametrize(
    "sub",
    ["alice", "system:serviceaccount:billing", "system:serviceaccount:Billing:x", "system:node:n1", ""],
)
async def test_only_a_service_account_is_a_principal(
    issuer: OidcServer, verifier: TokenVerifier, sub: str
) -> None:
    await refused(verifier, issuer.mint(sub=sub), AuthnReason.NOT_A_SERVICE_ACCOUNT)


async def test_the_kubernetes_claims_must_agree_with_the_subject(
    issuer: OidcServer, verifier: TokenVerifier
) -> None:
    other: dict[str, Any] = {"kubernetes.io": {"namespace": "billing", "serviceaccount": {"name": "admin"}}}
    await refused(verifier, issuer.mint(sub=BILLING, **other), AuthnReason.NOT_A_SERVICE_ACCOUNT)
    plain = await verifier.verify(issuer.mint(sub=BILLING, kubernetes=False))
    assert (plain.name, plain.pod) == (BILLING, "")


@pytest.mark.parametrize(
    "token", ["not-a-jwt", "a.b.c", "eyJhbGciOiJSUzI1NiJ9", "x" * 9000, "a b", "a.b.c\n"]
)
async def test_what_is_not_a_jwt_is_malformed(verifier: TokenVerifier, token: str) -> None:
    await refused(verifier, token, AuthnReason.MALFORMED_TOKEN)


async def test_the_authorization_metadata(issuer: OidcServer, make_verifier: MakeVerifier) -> None:
    optional = await make_verifier(AuthnConfig(issuer=issuer.issuer))
    assert await optional.authenticate(None) is None
    assert await optional.authenticate("") is None
    token = issuer.mint(sub=BILLING)
    principal = await optional.authenticate(f"Bearer {token}")
    assert principal is not None and principal.name == BILLING
    assert await optional.authenticate(f"bearer  {token} ") == principal
    for value in (f"Basic {token}", "Bearer", "Bearer   ", token):
        with pytest.raises(AuthenticationFailed) as caught:
            await optional.authenticate(value)
        assert caught.value.reason == "MALFORMED_TOKEN"
    required = await make_verifier(AuthnConfig(issuer=issuer.issuer, required=True))
    with pytest.raises(AuthenticationFailed) as caught:
        await required.authenticate(None)
    assert caught.value.reason == "MISSING_TOKEN"


def test_only_signing_keys_of_the_two_kinds_are_read() -> None:
    rsa_key, ec_key = SigningKey("RS256", kid="rsa"), SigningKey("ES256", kid="ec")
    p384 = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True)
    small = RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 1024).public_key(), as_dict=True)
    assert isinstance(rsa_key.private, rsa.RSAPrivateKey)
    private = RSAAlgorithm.to_jwk(rsa_key.private, as_dict=True)
    ignored = [
        {**rsa_key.jwk(), "kid": "for-encryption", "use": "enc"},
        {**rsa_key.jwk(), "kid": "for-ps256", "alg": "PS256"},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "shared-secret"},
        {**p384, "kid": "p384"},
        {**small, "kid": "rsa-1024"},
        {**rsa_key.jwk(), "kid": "broken", "n": "not base64!"},
        "not a key",
    ]
    keys = parse_jwks(
        {"keys": [rsa_key.jwk(), ec_key.jwk(), *ignored, {**private, "kid": "published-whole"}]}
    )
    assert keys.kids == ["ec", "published-whole", "rsa"]
    whole = keys.find("published-whole", "RS256")
    assert whole is not None and isinstance(whole.jwk.key, rsa.RSAPublicKey)  # only its public half
    found = keys.find("rsa", "RS256"), keys.find("ec", "ES256")
    assert [key.algorithm if key else None for key in found] == ["RS256", "ES256"]

    with pytest.raises(KeySourceError, match="no usable key among 7"):
        parse_jwks({"keys": ignored})
    with pytest.raises(KeySourceError, match="the same kid"):
        parse_jwks({"keys": [rsa_key.jwk(), {**ec_key.jwk(), "kid": "rsa"}]})
    with pytest.raises(KeySourceError, match="more than 64 keys"):
        parse_jwks({"keys": [ec_key.jwk()] * 65})
    with pytest.raises(KeySourceError, match="not a JWKS"):
        parse_jwks([rsa_key.jwk()])


# --- the keys' source fails ---


async def test_no_keys_at_start_refuses_every_token_until_they_come(
    issuer: OidcServer, make_verifier: MakeVerifier, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    issuer.down = True
    with caplog.at_level(logging.WARNING, logger="tiw_facade.authn"):
        verifier = await make_verifier(AuthnConfig(issuer=issuer.issuer, refresh_interval=3600))
    assert verifier.keys is None
    (warning,) = [r for r in caplog.records if r.name == "tiw_facade.authn"]
    assert "no keys yet" in warning.message and "HTTP 503" in warning.error  # type: ignore[attr-defined]
    token = issuer.mint()
    failure = await refused(verifier, token, AuthnReason.KEYS_UNAVAILABLE)
    status = errors.status_for(failure, action="DescribeSnapshotTask")
    assert status.code is grpc.StatusCode.UNAVAILABLE  # the facade's trouble, not the caller's

    issuer.down = False
    clock.advance(MIN_REFRESH_GAP)
    assert (await verifier.verify(token)).service_account == "caller"
    assert token not in caplog.text


async def test_a_source_down_later_keeps_the_last_good_keys(
    issuer: OidcServer, verifier: TokenVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    token = issuer.mint()
    issuer.down = True
    with caplog.at_level(logging.WARNING, logger="tiw_facade.authn"):
        assert await verifier.refresh()
    assert "the last good keys stay in use" in caplog.text
    assert (await verifier.verify(token)).service_account == "caller"


async def test_an_oversized_jwks_is_refused(
    issuer: OidcServer, make_verifier: MakeVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    issuer.jwks_padding = MAX_DOCUMENT_BYTES
    with caplog.at_level(logging.WARNING, logger="tiw_facade.authn"):
        verifier = await make_verifier(AuthnConfig(jwks_url=issuer.jwks_url))
    assert verifier.keys is None
    errors_logged = [getattr(r, "error", "") for r in caplog.records if r.name == "tiw_facade.authn"]
    assert errors_logged == [f"{issuer.jwks_url} answered more than {MAX_DOCUMENT_BYTES} bytes"]
    await refused(verifier, issuer.mint(), AuthnReason.KEYS_UNAVAILABLE)


async def test_a_discovery_document_of_another_issuer_is_not_trusted(
    issuer: OidcServer, make_verifier: MakeVerifier
) -> None:
    issuer.discovery_issuer = "https://kubernetes.default.svc"
    verifier = await make_verifier(AuthnConfig(issuer=issuer.issuer))
    assert verifier.keys is None
    assert issuer.jwks_fetches == 0


async def test_keys_are_not_followed_to_another_host(
    clock: VirtualClock, make_verifier: MakeVerifier
) -> None:
    async with OidcServer(clock=clock) as first, OidcServer(clock=clock) as other:
        first.jwks_redirect = other.jwks_url
        verifier = await make_verifier(AuthnConfig(jwks_url=first.jwks_url))
        assert verifier.keys is None
        assert other.jwks_fetches == 0


async def test_redirects_within_the_host_are_followed_a_few_times(
    issuer: OidcServer, make_verifier: MakeVerifier
) -> None:
    issuer.jwks_redirect = issuer.jwks_url + "?again"  # to itself, for ever
    verifier = await make_verifier(AuthnConfig(jwks_url=issuer.jwks_url))
    assert verifier.keys is None
    assert issuer.jwks_fetches == 1 + MAX_REDIRECTS


async def test_https_with_the_cluster_ca_and_the_facade_s_own_token(
    clock: VirtualClock, make_verifier: MakeVerifier, tmp_path: pathlib.Path
) -> None:
    ca = authority("cluster CA")
    served = server_cert(ca)
    (tmp_path / "ca.crt").write_bytes(ca.cert)
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    async with OidcServer(clock=clock, tls=(served.cert, served.key), require_token="first-token") as issuer:
        assert issuer.issuer.startswith("https://127.0.0.1:")
        # Without the cluster's CA the server is not trusted.
        untrusted = await make_verifier(AuthnConfig(issuer=issuer.issuer))
        assert untrusted.keys is None
        assert issuer.fetches == {}  # the TLS handshake failed: nothing was asked

        config = AuthnConfig(
            issuer=issuer.issuer, ca_file=str(tmp_path / "ca.crt"), token_file=str(token_file)
        )
        verifier = await make_verifier(config)
        assert (await verifier.verify(issuer.mint(sub=BILLING))).name == BILLING
        assert issuer.authorizations == ["Bearer first-token"] * 2

        # The kubelet rotates the facade's token: the next fetch reads the new one.
        token_file.write_text("second-token\n")
        issuer.require_token = "second-token"
        issuer.rotate(retire=True)
        assert await verifier.refresh()
        assert verifier.keys is not None and verifier.keys.kids == [issuer.signing.kid]
        assert issuer.authorizations[-1] == "Bearer second-token"


async def test_the_fetches_token_goes_over_https_or_to_this_host_only(
    issuer: OidcServer, make_verifier: MakeVerifier, tmp_path: pathlib.Path
) -> None:
    """To this host (the test's server) plain http may carry it; settings refuse http elsewhere."""
    token_file = tmp_path / "token"
    token_file.write_text("tok")
    await make_verifier(AuthnConfig(jwks_url=issuer.jwks_url, token_file=str(token_file)))
    assert issuer.authorizations == ["Bearer tok"]
    with pytest.raises(settings.SettingsError, match="must be https"):
        settings.load(
            {"TENCENTCLOUD_REGION": "ap-guangzhou", "TIW_AUTH_JWKS_URL": "http://keys.example/jwks"}
        )


# --- the failure as callers and operators see it ---


async def test_a_refusal_is_unauthenticated_with_its_reason(
    issuer: OidcServer, verifier: TokenVerifier
) -> None:
    failure = await refused(verifier, issuer.mint(aud="vault"), AuthnReason.WRONG_AUDIENCE)
    status = errors.status_for(failure, action="StopWhiteboardPush")
    assert status.code is grpc.StatusCode.UNAUTHENTICATED
    rich = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert info.reason == "WRONG_AUDIENCE"
    assert dict(info.metadata) == {"action": "StopWhiteboardPush", "outcome": "not_sent"}


def test_every_reason_is_counted_from_start_up() -> None:
    metrics = Metrics("test")
    metrics.prime("tiw.v20190919.TiwService", ["DescribeSnapshotTask"], 20, "memory")
    for reason in AuthnReason:
        assert metrics.registry.get_sample_value("tiw_authn_failures_total", {"reason": reason.value}) == 0


# --- settings ---

BASE = {"TENCENTCLOUD_REGION": "ap-guangzhou"}


def test_the_settings_make_the_config() -> None:
    loaded = settings.load(
        {
            **BASE,
            "TIW_AUTH_ISSUER": "https://kubernetes.default.svc.cluster.local",
            "TIW_AUTH_REQUIRED": "true",
            "TIW_AUTH_CA_FILE": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
            "TIW_AUTH_TOKEN_FILE": "/var/run/secrets/kubernetes.io/serviceaccount/token",
        }
    )
    config = AuthnConfig.from_settings(loaded)
    assert config.enabled and config.required and config.audience == "tiw-facade"
    assert config.issuer == "https://kubernetes.default.svc.cluster.local"
    assert not AuthnConfig.from_settings(settings.load(BASE)).enabled


def test_one_source_of_keys_at_most() -> None:
    with pytest.raises(
        settings.SettingsError, match="TIW_AUTH_ISSUER and TIW_AUTH_JWKS_FILE exclude each other"
    ):
        settings.load({**BASE, "TIW_AUTH_ISSUER": "https://issuer.example", "TIW_AUTH_JWKS_FILE": "/k.json"})


def test_required_without_keys_is_an_error() -> None:
    with pytest.raises(settings.SettingsError, match="TIW_AUTH_REQUIRED needs"):
        settings.load({**BASE, "TIW_AUTH_REQUIRED": "true"})
