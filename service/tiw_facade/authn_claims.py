"""What a projected service-account token says, checked: its header before any key is looked at,
its signature and claims once its key is found (authn.py finds it).

Only the signature, ``aud`` and ``iss`` are PyJWT's to check; ``exp``, ``nbf`` and ``iat`` are
checked here against the verifier's clock (PyJWT reads the system's), with LEEWAY.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, Final

import jwt

from tiw_facade.authn_keys import ALGORITHMS, VerificationKey
from tiw_facade.failures import AuthenticationFailed, AuthnReason

# Seconds of disagreement between the issuer's clock and this host's that exp, nbf and iat forgive:
# the API server and the nodes are NTP-synchronised, but not to the second.
LEEWAY: Final = 30.0
PROOF: Final = "service_account_token"

_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?"
SERVICE_ACCOUNT: Final = re.compile(rf"system:serviceaccount:({_DNS_LABEL}):({_DNS_SUBDOMAIN})")

_DECODER = jwt.PyJWT(
    options={
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_sub": False,
        "verify_jti": False,
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """A caller a valid token proves."""

    name: str  # system:serviceaccount:NAMESPACE:NAME
    namespace: str
    service_account: str
    expires_at: float  # the token's exp (Unix seconds)
    pod: str = ""  # the kubernetes.io claims' pod name, when the token is bound to a pod
    proof: str = PROOF  # how it was proven, for the audit line


def header(token: str) -> tuple[str, str | None]:
    """The token's algorithm (RS256 or ES256) and kid, read before any key is looked at."""
    try:
        found = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise AuthenticationFailed(AuthnReason.MALFORMED_TOKEN, "the bearer token is not a JWT") from None
    algorithm = found.get("alg")
    if algorithm not in ALGORITHMS:
        raise AuthenticationFailed(
            AuthnReason.UNSUPPORTED_ALGORITHM, "the token is not signed with RS256 or ES256"
        )
    kid = found.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise AuthenticationFailed(AuthnReason.MALFORMED_TOKEN, "the token's kid is not text")
    return algorithm, kid


def signed_claims(token: str, key: VerificationKey, *, audience: str, issuer: str) -> dict[str, Any]:
    """The claims of ``token`` if ``key`` signed it, ``aud`` holds ``audience`` and (``issuer``
    given) ``iss`` is ``issuer``."""
    try:
        claims: dict[str, Any] = _DECODER.decode(
            token, key.jwk, algorithms=[key.algorithm], audience=audience, issuer=issuer or None
        )
    except jwt.InvalidSignatureError:
        raise AuthenticationFailed(AuthnReason.BAD_SIGNATURE, "the token's signature is not valid") from None
    except jwt.InvalidAudienceError:
        raise _wrong_audience(audience) from None
    except jwt.InvalidIssuerError:
        raise _wrong_issuer(issuer) from None
    except jwt.MissingRequiredClaimError as exc:
        if exc.claim == "aud":
            raise _wrong_audience(audience) from None
        if exc.claim == "iss":
            raise _wrong_issuer(issuer) from None
        raise AuthenticationFailed(AuthnReason.MALFORMED_TOKEN, "the token lacks a claim") from None
    except jwt.InvalidAlgorithmError:
        raise AuthenticationFailed(
            AuthnReason.UNSUPPORTED_ALGORITHM, "the token's algorithm is not its key's"
        ) from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise AuthenticationFailed(AuthnReason.MALFORMED_TOKEN, "the token is not a valid JWT") from None
    return claims


def expired() -> AuthenticationFailed:
    return AuthenticationFailed(AuthnReason.EXPIRED, "the token has expired")


def principal(claims: Mapping[str, Any], now: float) -> Principal:
    """The service account valid ``claims`` name at ``now`` (Unix seconds)."""
    exp = _time(claims, "exp")
    if exp is None:
        raise AuthenticationFailed(AuthnReason.MALFORMED_TOKEN, "the token has no expiry (exp)")
    if exp <= now - LEEWAY:
        raise expired()
    for name in ("nbf", "iat"):
        moment = _time(claims, name)
        if moment is not None and moment > now + LEEWAY:
            raise AuthenticationFailed(AuthnReason.NOT_YET_VALID, f"the token is not valid yet ({name})")
    subject = claims.get("sub")
    found = SERVICE_ACCOUNT.fullmatch(subject) if isinstance(subject, str) else None
    if found is None:
        raise AuthenticationFailed(
            AuthnReason.NOT_A_SERVICE_ACCOUNT,
            "the token's subject is not system:serviceaccount:NAMESPACE:NAME",
        )
    namespace, name = found[1], found[2]
    pod = ""
    kubernetes = claims.get("kubernetes.io")
    if kubernetes is not None:
        account = kubernetes.get("serviceaccount") if isinstance(kubernetes, dict) else None
        if (
            not isinstance(account, dict)
            or kubernetes.get("namespace") != namespace
            or account.get("name") != name
        ):
            raise AuthenticationFailed(
                AuthnReason.NOT_A_SERVICE_ACCOUNT,
                "the token's kubernetes.io claims disagree with its subject",
            )
        bound = kubernetes.get("pod")
        if isinstance(bound, dict) and isinstance(bound.get("name"), str):
            pod = bound["name"]
    return Principal(found[0], namespace, name, exp, pod)


def _time(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthenticationFailed(AuthnReason.MALFORMED_TOKEN, f"the token's {name} is not a time")
    return float(value)


def _wrong_audience(audience: str) -> AuthenticationFailed:
    return AuthenticationFailed(AuthnReason.WRONG_AUDIENCE, f"the token is not for the audience {audience!r}")


def _wrong_issuer(issuer: str) -> AuthenticationFailed:
    return AuthenticationFailed(AuthnReason.WRONG_ISSUER, f"the token was not issued by {issuer!r}")
