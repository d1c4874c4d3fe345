"""Request bodies over a service's limit are answered with a JSON 413, read to the end.

Tornado's own ``max_body_size`` closes the connection as soon as a body is too
large, before the request is read; a proxy in front (configurable-http-proxy)
is then still writing, gets ``ECONNRESET`` and answers its own 503 HTML page.
:class:`BodyLimit` streams the body instead: it keeps at most
``max_body_bytes`` of it, reads (and drops) the rest up to the server's hard cap
(:data:`HARD_CAP_BYTES`, the HTTP server's ``max_body_size``), then answers a
JSON 413 naming the limit instead of calling the handler's method. Bodies
within the limit reach the method as usual (``self.request.body``, form
arguments parsed). A refusal raised in ``prepare`` (a missing token: 401) is
likewise answered once the body is read.
"""

from __future__ import annotations

import json

from tornado import web

#: what a service accepts in one request body by default
MAX_BODY_BYTES = 1024 * 1024
#: what the HTTP server reads at most before it closes the connection (413 beyond)
HARD_CAP_BYTES = 64 * 1024 * 1024


def describe(limit: int) -> str:
    if limit % (1024 * 1024) == 0:
        return f"{limit} bytes ({limit // (1024 * 1024)} MiB)"
    return f"{limit} bytes"


def too_large_message(limit: int) -> str:
    return f"the request body is over this service's limit of {describe(limit)}"


@web.stream_request_body
class BodyLimit(web.RequestHandler):
    """Mix in before ``web.RequestHandler`` (or a subclass): bounded request bodies."""

    max_body_bytes: int = MAX_BODY_BYTES

    _body_chunks: list[bytes]
    _body_size: int

    def _body_state(self):
        if not hasattr(self, "_body_size"):
            self._body_chunks, self._body_size = [], 0
            future = getattr(self.request, "_body_future", None)
            if future is not None:
                # runs before the handler's method (its wait is registered later)
                future.add_done_callback(lambda f: self._body_complete())

    async def _execute(self, transforms, *args, **kwargs):
        self._body_state()
        prepare = self.prepare

        async def prepare_then_read():
            # A refusal in prepare (401, 403) is answered once the body is read too:
            # answered at once, the connection would close on the unread body.
            try:
                result = prepare()
                if result is not None:
                    await result
            except Exception as e:
                self._prepare_error = e

        self.prepare = prepare_then_read
        return await super()._execute(transforms, *args, **kwargs)

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size <= self.max_body_bytes:
            self._body_chunks.append(chunk)
        else:
            self._body_chunks = []  # dropped; read on to the end all the same

    def _body_complete(self) -> None:
        error = getattr(self, "_prepare_error", None)
        if error is not None:

            def refuse(*args, **kwargs):
                raise error

            setattr(self, self.request.method.lower(), refuse)
            return
        if self._body_size > self.max_body_bytes:
            # answered instead of the handler's method, once the whole body is read
            setattr(self, self.request.method.lower(), self._refuse_too_large)
            return
        self.request.body = b"".join(self._body_chunks)
        self._body_chunks = []
        try:
            self.request._parse_body()
        except Exception:  # a malformed form body: the method reports what it lacks
            pass

    def _refuse_too_large(self, *args, **kwargs):
        message = too_large_message(self.max_body_bytes)
        self.set_status(413)
        self.set_header("Content-Type", "application/json")
        self.finish(
            json.dumps({"status": 413, "message": message, "max_body_bytes": self.max_body_bytes})
        )


class OpenAPIHandler(BodyLimit, web.RequestHandler):
    """``api/openapi.json``: a service's OpenAPI 3 document, with the prefix it is served
    under as its server (the batch and accounting services each pass their document)."""

    def initialize(self, prefix: str, document: dict):
        self.prefix = prefix
        self.document = document

    def get(self):
        self.set_header("Content-Type", "application/json")
        servers = [{"url": self.prefix.rstrip("/")}]
        self.finish(json.dumps({**self.document, "servers": servers}))
