"""One Tencent Cloud API at one endpoint: sign a request, post it, read the answer. TIW's client
(upstream.py) and STS's (pod_identity.py) each hold one.

Every Tencent Cloud API (API 3.0) takes a JSON ``POST /`` naming its action in ``X-TC-Action`` and
answers 200 with ``{"Response": {..., "RequestId"}}``, or ``{"Response": {"Error": {"Code",
"Message"}, "RequestId"}}``. This module knows that much and nothing of any one API. Whatever else
an endpoint answers (not HTTP, not 200, larger than the transport's cap, not JSON, NaN, nested past
the parser's depth, an integer too long to convert, another shape, an error code of another form)
is one of the failures module's exceptions, so a hostile endpoint is met the same way whichever API
it claims to be; ``name`` ("TIW", "STS") says which in their texts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from tiw_facade.failures import TiwError, UpstreamHttpError, UpstreamMalformed
from tiw_facade.signing import Credentials, Signer, unsigned_headers
from tiw_facade.transport import Answer, Transport

# Tencent's error codes: dotted words (InvalidParameter.TaskNotFound), underscores allowed (other
# APIs use them). A code of another shape or length is not one Tencent sends: it becomes a metric
# label and a status's reason, where an arbitrary string would be a new series, and a bloated trailer.
ERROR_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
MAX_ERROR_CODE_LENGTH = 128
# A RequestId is kept for the caller and the logs only when it is one: printable ASCII, not too long.
REQUEST_ID = re.compile(r"[!-~]{1,128}")


def encode(params: Mapping[str, Any]) -> bytes:
    """The exact bytes sent and signed: compact JSON, UTF-8, integers as integers."""
    return json.dumps(params, separators=(",", ":"), ensure_ascii=False).encode()


class TencentApi:
    """Requests to one API (``service``, ``version``) at the transport's endpoint, ``host``."""

    def __init__(
        self,
        transport: Transport,
        *,
        name: str,
        host: str,
        service: str,
        version: str,
        region: str = "",
        language: str = "",
    ) -> None:
        self.name = name
        self._transport = transport
        self._host = host
        self._service = service
        self._version = version
        self._region = region
        self._language = language
        self._signer: Signer | None = None  # for the credentials it was made for (it caches their key)
        self._signer_credentials: Credentials | None = None

    async def start(self) -> None:
        await self._transport.start()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def send(
        self,
        action: str,
        body: bytes,
        *,
        credentials: Credentials | None,
        timestamp: int,
        timeout: float,  # noqa: ASYNC109 (the transport splits it: see Transport.post)
    ) -> Answer:
        """POST ``body`` as ``action``, signed by ``credentials`` (None: unsigned, ``SKIP``) at
        ``timestamp`` (Tencent's Unix seconds); the transport's failures as they are."""
        if credentials is None:
            headers = unsigned_headers(
                self._host,
                action,
                timestamp,
                version=self._version,
                region=self._region,
                language=self._language,
            )
        else:
            headers = self._signer_for(credentials).headers(action, body, timestamp)
        return await self._transport.post(body, headers, timeout)

    def read(self, answer: Answer) -> dict[str, Any]:
        """The ``Response`` object of a successful answer; else ``TiwError`` (the API's error: TIW's
        or STS's), ``UpstreamHttpError`` or ``UpstreamMalformed``."""
        response = self._response(answer)
        if "Error" in response:
            raise self._error(response)
        return response

    def _signer_for(self, credentials: Credentials) -> Signer:
        if credentials is not self._signer_credentials or self._signer is None:
            self._signer = Signer(
                credentials,
                self._host,
                service=self._service,
                version=self._version,
                region=self._region,
                language=self._language,
            )
            self._signer_credentials = credentials
        return self._signer

    def _response(self, answer: Answer) -> dict[str, Any]:
        if answer.status != 200:  # redirects too: Tencent answers 200 to everything it processes
            raise UpstreamHttpError(answer.status, api=self.name)
        try:
            envelope = json.loads(answer.body, parse_constant=_not_json)
        # RecursionError: nested deeper than the parser's stack (a hostile answer; 1 MB of "[" is enough).
        # ValueError: not JSON, NaN or Infinity, an integer too long to convert.
        except (ValueError, RecursionError):
            raise UpstreamMalformed(f"{self.name}'s answer is not JSON") from None
        response = envelope.get("Response") if isinstance(envelope, dict) else None
        if not isinstance(response, dict):
            raise UpstreamMalformed(
                f"{self.name}'s answer is not a {self.name} envelope (no Response object)"
            )
        if "Error" in response and not isinstance(response["Error"], dict):
            raise UpstreamMalformed(
                f"{self.name}'s answer has an Error that is not an object", request_id=request_id(response)
            )
        return response

    def _error(self, response: Mapping[str, Any]) -> TiwError | UpstreamMalformed:
        """The failure an error envelope stands for: the API's error, or, when the envelope is not one
        Tencent sends (a code of the wrong type or shape, a message that is not text, a RequestId
        that is not a string), UPSTREAM_MALFORMED."""
        name = self.name
        error = response["Error"]
        code, message, given_id = error.get("Code"), error.get("Message"), response.get("RequestId")
        if not isinstance(given_id, str | None):
            return UpstreamMalformed(f"{name}'s error has a RequestId that is not a string")
        if not (isinstance(code, str) and len(code) <= MAX_ERROR_CODE_LENGTH and ERROR_CODE.fullmatch(code)):
            return UpstreamMalformed(
                f"{name}'s error has no error code of {name}'s shape ({_kind(code)})",
                request_id=request_id(response),
            )
        if not isinstance(message, str | None):
            return UpstreamMalformed(
                f"{name}'s error has a Message that is not text", request_id=request_id(response)
            )
        # JSON may carry lone surrogates ("\ud800"), which no UTF-8 encoder (protobuf's, gRPC's) takes.
        readable = (message or "").encode(errors="replace").decode()
        return TiwError(code, readable, request_id(response))


def request_id(response: Mapping[str, Any]) -> str:
    """The answer's RequestId, when it looks like one (Tencent's are UUIDs): it goes into trailers
    and logs."""
    found = response.get("RequestId")
    return found if isinstance(found, str) and REQUEST_ID.fullmatch(found) else ""


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _kind(code: Any) -> str:
    """How a rejected code is described: never the code itself, which may be anything."""
    if isinstance(code, str):
        return f"a string of {len(code)} characters" if code else "an empty string"
    return "missing" if code is None else f"a JSON {type(code).__name__}"
