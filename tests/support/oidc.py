"""A real local OIDC issuer, as the Kubernetes API server is one for service-account tokens.

It serves ``/.well-known/openid-configuration`` and a JWKS of keys made here (RSA and EC P-256),
over HTTP or HTTPS, and mints tokens shaped as the API server mints projected service-account
tokens (``sub``, ``aud``, ``kubernetes.io`` claims), hostile ones too (``alg: none``, HS256 signed
with the public key, a made-up kid). It counts what it is asked, and can go down or answer an
oversized JWKS::

    async with OidcServer() as issuer:
        token = issuer.mint(sub=service_account("billing", "api"))
        # the facade: TIW_AUTH_ISSUER=issuer.issuer; the caller: authorization: Bearer <token>

From a shell (another language's client tests), a JWKS file and a token, no server needed::

    python tests/support/oidc.py --jwks-file keys.json --token-file token --sub system:serviceaccount:ci:go
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import hmac
import json
import os
import pathlib
import secrets
import ssl
import tempfile
import time
from collections.abc import Callable
from typing import Any, Literal

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

Algorithm = Literal["RS256", "ES256"]
DEFAULT_AUDIENCE = "tiw-facade"
DEFAULT_SUBJECT = "system:serviceaccount:default:caller"
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/openid/v1/jwks"  # the API server's


def service_account(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SigningKey:
    """A private key the issuer signs with, and its public JWK."""

    def __init__(self, alg: Algorithm = "RS256", kid: str | None = None) -> None:
        self.alg = alg
        self.kid = kid or secrets.token_urlsafe(12)
        self.private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if alg == "RS256"
            else ec.generate_private_key(ec.SECP256R1())
        )

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        found: dict[str, Any] = (
            RSAAlgorithm.to_jwk(public, as_dict=True)
            if isinstance(public, rsa.RSAPublicKey)
            else ECAlgorithm.to_jwk(public, as_dict=True)
        )
        return {**found, "kid": self.kid, "alg": self.alg, "use": "sig"}

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def jwks(keys: list[SigningKey]) -> dict[str, Any]:
    return {"keys": [key.jwk() for key in keys]}


def write_jwks(path: pathlib.Path, keys: list[SigningKey]) -> None:
    """Write a JWKS file anew and rename it over the old one, as the kubelet swaps a volume's files."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(json.dumps(jwks(keys)))
    os.replace(fresh, path)


def sign(claims: dict[str, Any], key: SigningKey, *, alg: str | None = None, kid: str | None = None) -> str:
    """``claims`` signed by ``key``; the header says ``alg`` (default the key's) and ``kid`` (default
    the key's; "" for none). ``alg`` none or HS256..HS512: the hostile tokens a verifier must refuse,
    unsigned or HMAC-signed with the public key's PEM as the secret (the classic confusion)."""
    alg = alg or key.alg
    kid = key.kid if kid is None else kid
    header: dict[str, Any] = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    if alg == "none" or alg.startswith("HS"):
        signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        if alg == "none":
            return signing_input + "."
        digest = getattr(hashlib, "sha" + alg[2:])
        mac = hmac.new(key.public_pem, signing_input.encode(), digest).digest()
        return signing_input + "." + _b64(mac)
    return jwt.encode(claims, key.private, algorithm=alg, headers={"kid": kid} if kid else None)


def token_claims(
    *,
    issuer: str,
    now: float,
    sub: str = DEFAULT_SUBJECT,
    aud: str | list[str] = DEFAULT_AUDIENCE,
    iss: str | None = None,
    exp: object = None,
    nbf: object = None,
    iat: object = None,
    lifetime: float = 3600,
    kubernetes: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """The claims of a projected token, as the API server writes them (whole seconds); a time given
    is written as given (a float, or no number at all); ``iss`` overrides ``issuer``."""
    second = int(now)
    found: dict[str, Any] = {
        "aud": [aud] if isinstance(aud, str) else aud,
        "iss": issuer if iss is None else iss,
        "sub": sub,
        "iat": second if iat is None else iat,
        "nbf": second if nbf is None else nbf,
        "exp": int(second + lifetime) if exp is None else exp,
    }
    parts = sub.split(":")
    if kubernetes and len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        found["kubernetes.io"] = {
            "namespace": parts[2],
            "serviceaccount": {"name": parts[3], "uid": "7e3f0c2a-1d4b-4c8e-9f6a-2b5d8e1c4a90"},
            "pod": {"name": f"{parts[3]}-6d9f7c8b5-x2x4q", "uid": "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"},
        }
    return {**found, **extra}


def _server_context(cert: bytes, key: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as directory:  # ssl loads a chain only from files
        cert_file, key_file = pathlib.Path(directory, "tls.crt"), pathlib.Path(directory, "tls.key")
        cert_file.write_bytes(cert)
        key_file.write_bytes(key)
        context.load_cert_chain(cert_file, key_file)
    return context


class OidcServer:
    """An issuer at ``127.0.0.1`` on a free port; ``tls`` (a PEM certificate and key for 127.0.0.1)
    makes it HTTPS, ``path`` puts the issuer below the root (``https://host/id/abc``).

    ``clock`` gives the default ``iat``/``nbf``/``exp`` of minted tokens (Unix seconds).
    ``require_token``: the fetches must bring ``authorization: Bearer <it>`` (as an API server that
    grants no anonymous access to its discovery), else 401.
    """

    def __init__(
        self,
        *,
        alg: Algorithm = "RS256",
        clock: Callable[[], float] = time.time,
        path: str = "",
        tls: tuple[bytes, bytes] | None = None,
        require_token: str | None = None,
    ) -> None:
        self.clock = clock
        self.path = path.rstrip("/")
        self.signing = SigningKey(alg)
        self.published: list[SigningKey] = [self.signing]
        self.require_token = require_token
        self.fetches: collections.Counter[str] = collections.Counter()  # by path, answered or not
        self.authorizations: list[str] = []  # the authorization header of every fetch ("" if none)
        self.down = False  # answer 503 to everything
        self.jwks_padding = 0  # bytes of blanks added to the JWKS: an oversized document
        self.discovery_issuer: str | None = None  # what the discovery document says (default: issuer)
        self.jwks_redirect: str | None = None  # answer the JWKS with a redirect there
        self._tls = tls
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def scheme(self) -> str:
        return "https" if self._tls else "http"

    @property
    def issuer(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{self.path}"

    @property
    def jwks_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{self.path}{JWKS_PATH}"

    @property
    def jwks_fetches(self) -> int:
        return self.fetches[self.path + JWKS_PATH]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(self.path + DISCOVERY_PATH, self._discovery)
        app.router.add_get(self.path + JWKS_PATH, self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        context = _server_context(*self._tls) if self._tls else None
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OidcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- keys ---

    def rotate(self, alg: Algorithm | None = None, *, retire: bool = False) -> SigningKey:
        """A new signing key, published next to the old (as the API server does while tokens signed
        by the old are still valid); ``retire`` removes the old one at once."""
        previous, self.signing = self.signing, SigningKey(alg or self.signing.alg)
        self.published.append(self.signing)
        if retire:
            self.retire(previous.kid)
        return self.signing

    def retire(self, kid: str) -> None:
        self.published = [key for key in self.published if key.kid != kid]

    def jwks(self) -> dict[str, Any]:
        return jwks(self.published)

    def write_jwks(self, path: pathlib.Path) -> None:
        write_jwks(path, self.published)

    # --- tokens ---

    def claims(self, **given: Any) -> dict[str, Any]:
        """``token_claims`` of this issuer, at its clock's time."""
        return token_claims(issuer=self.issuer, now=self.clock(), **given)

    def mint(
        self,
        *,
        alg: str | None = None,
        kid: str | None = None,
        key: SigningKey | None = None,
        **claims: Any,
    ) -> str:
        """A token of ``claims(**claims)`` signed by ``key`` (default the current signing key); see
        ``sign`` for ``alg`` and ``kid``."""
        return sign(self.claims(**claims), key or self.signing, alg=alg, kid=kid)

    # --- the endpoints ---

    def _refused(self, request: web.Request) -> web.Response | None:
        self.fetches[request.path] += 1
        self.authorizations.append(request.headers.get("Authorization", ""))
        if self.down:
            return web.Response(status=503, text="down")
        if self.require_token and request.headers.get("Authorization") != f"Bearer {self.require_token}":
            return web.Response(status=401, text="Unauthorized")
        return None

    async def _discovery(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        document = {
            "issuer": self.issuer if self.discovery_issuer is None else self.discovery_issuer,
            "jwks_uri": self.jwks_url,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        }
        return web.json_response(document)

    async def _jwks(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        if self.jwks_redirect:
            return web.Response(status=302, headers={"Location": self.jwks_redirect})
        body = json.dumps(self.jwks()) + " " * self.jwks_padding
        return web.Response(text=body, content_type="application/jwk-set+json")


def main() -> None:
    """Write a JWKS file and a token it verifies: for the clients' tests in other languages."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--jwks-file", type=pathlib.Path, required=True)
    parser.add_argument("--token-file", type=pathlib.Path, required=True)
    parser.add_argument("--sub", default=DEFAULT_SUBJECT)
    parser.add_argument("--aud", default=DEFAULT_AUDIENCE)
    parser.add_argument("--alg", choices=["RS256", "ES256"], default="RS256")
    parser.add_argument("--lifetime", type=float, default=3600)
    args = parser.parse_args()
    key = SigningKey(args.alg)
    write_jwks(args.jwks_file, [key])
    # The issuer is not checked with a JWKS file.
    claims = token_claims(
        issuer="tiw-facade-tests", now=time.time(), sub=args.sub, aud=args.aud, lifetime=args.lifetime
    )
    args.token_file.write_text(sign(claims, key) + "\n")


if __name__ == "__main__":
    main()
