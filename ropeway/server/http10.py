"""HTTP/1.0 clients get replies HTTP/1.0 can read.

HTTP/1.0 has no chunked encoding, and uvicorn's httptools protocol chunks every reply without a
Content-Length (an SSE stream) whatever the client's version, beside the stream's own
`Connection: keep-alive` and its own `Connection: close`. For an HTTP/1.0 request this middleware
holds such a reply until it is complete and sends it with its Content-Length and one Connection
header: a stream arrives whole, as a client that cannot read chunks can take it.
"""


class WholeRepliesForHTTP10:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("http_version") != "1.0":
            return await self.app(scope, receive, send)
        start: dict | None = None
        body = bytearray()

        async def send_whole(message):
            nonlocal start
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", [])
                           if name.lower() != b"connection"]
                if any(name.lower() == b"content-length" for name, _ in headers):
                    return await send({**message, "headers": headers})
                start = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and start is not None:
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    start["headers"].append((b"content-length", str(len(body)).encode()))
                    await send(start)
                    await send({"type": "http.response.body", "body": bytes(body)})
            else:
                await send(message)

        await self.app(scope, receive, send_whole)
