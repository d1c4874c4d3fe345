"""``/metrics`` behind a static bearer token: the accounting service's and the GPU exporter's.

Prometheus cannot log in through the hub, so both endpoints take
``Authorization: Bearer <token>`` (Prometheus' ``authorization`` with a
``credentials_file``), compared in constant time: 401 without it, 403 with
another token, 403 for everyone when the server was given no token at all;
``public`` opens it deliberately. One handler, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import hmac

from labfleet_hub.bodylimit import BodyLimit
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from tornado import web


class MetricsHandler(BodyLimit, web.RequestHandler):
    """``registry``'s metrics for whoever sends the token (or anyone, with ``public``)."""

    def initialize(
        self,
        registry: CollectorRegistry,
        token: str = "",
        public: bool = False,
        realm: str = "labfleet metrics",
        token_setting: str = "metrics_token_file",
    ):
        self.registry = registry
        self.token = token
        self.public = public
        self.realm = realm
        self.token_setting = token_setting

    def refuse(self, status: int, message: str):
        self.set_status(status)
        if status == 401:
            self.set_header("WWW-Authenticate", f'Bearer realm="{self.realm}"')
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(message + "\n")

    async def get(self):
        if not self.public:
            if not self.token:
                return self.refuse(
                    403, f"metrics are closed: no metrics token ({self.token_setting}) "
                    "and metrics_public is off",
                )  # fmt: skip
            scheme, _, credentials = self.request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not credentials.strip():
                return self.refuse(401, "send the metrics token: Authorization: Bearer <token>")
            if not hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
                return self.refuse(403, "wrong metrics token")
        data = await asyncio.to_thread(generate_latest, self.registry)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(data)
