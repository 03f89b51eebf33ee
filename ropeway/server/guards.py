"""What every request passes before anything of it is read: the API key, then the body's size.

Both are ASGI middleware on the raw request, ahead of FastAPI, which reads and parses the whole
body before a route's dependencies run: a 200 MB body from a client without the key would be read
and parsed only to be refused.
"""

import hmac

from .errors import APIError, error_response

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


class RequireAPIKey:
    """401 for a protected path without `Authorization: Bearer <key>` (when the server has a key)."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = api_key.encode() if api_key is not None else None

    async def __call__(self, scope, receive, send):
        if self.expected is None or scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.expected):
            error = APIError(401, "missing or incorrect API key: send `Authorization: Bearer <key>`",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await error_response(error)(scope, receive, send)
        return await self.app(scope, receive, send)


class _TooLarge(BaseException):  # noqa: N818
    """Raised from receive(); a BaseException so that FastAPI's body reader (which turns any
    Exception into a 400) and the 500 middleware let it through to LimitRequestSize."""


class LimitRequestSize:
    """413 for a body over max_bytes: at once from its Content-Length, or, for a chunked body, as
    soon as the chunks read so far pass the limit (the rest is never read)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> APIError:
        return APIError(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes "
                             "(--max-request-bytes)", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(self._error())(scope, receive, send)
        received = 0
        response_started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def noting_send(message):
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, noting_send)
        except _TooLarge:
            if not response_started:
                await error_response(self._error())(scope, receive, send)
