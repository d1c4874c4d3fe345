"""Group quotas on a single node: the batch service's local limits, through its API.

On a single node the batch service enforces each group's limits (what its
running jobs hold at once) and owns them (:mod:`labfleet_batch.local_limits`);
this service keeps what is the same in both modes -- who may change what, the
platform admin's caps, the audit log, the API and the page -- and reads and
changes the limits through the batch service's ``api/limits/<group>`` with its
own hub API token, as on Kubernetes :class:`.quotas.QuotaManager` reads and
patches ClusterQueues through the API server. Neither reads the other's
storage.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import Engine
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .quotas import Change, QuotaError, QuotaManager, check_caps


class LimitsAPIError(Exception):
    """The batch service refused or could not be reached; ``status`` as the handlers map it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BatchLimits:
    """``GET/PUT <batch url>api/limits/<group>`` with the service's hub API token."""

    def __init__(self, url: str, token: str, timeout: float = 20.0):
        self.url = url if url.endswith("/") else url + "/"
        self.token = token
        self.timeout = timeout

    async def request(self, method: str, group: str, body: dict | None = None) -> dict:
        request = HTTPRequest(
            f"{self.url}api/limits/{group}",
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else None,
            request_timeout=self.timeout,
            follow_redirects=False,
        )
        try:
            response = await AsyncHTTPClient().fetch(request)
        except HTTPClientError as e:
            message = str(e)
            if e.response is not None and e.response.body:
                try:
                    message = json.loads(e.response.body)["message"]
                except (ValueError, KeyError, TypeError):
                    pass
            if e.code == 400:
                raise QuotaError(message) from None
            raise LimitsAPIError(e.code, message) from None
        except OSError as e:
            raise LimitsAPIError(503, f"the batch service cannot be reached: {e}") from None
        return json.loads(response.body)


def changes_body(changes: list[Change]) -> dict:
    quotas = []
    for ch in changes:
        item = {"flavor": ch.flavor, "resource": ch.resource}
        if ch.nominal is not None:
            item["nominalQuota"] = ch.nominal
        if ch.borrowing is not None:
            item["borrowingLimit"] = ch.borrowing
        quotas.append(item)
    return {"quotas": quotas}


def _plain(entries: list[dict]) -> list[dict]:
    keys = ("flavor", "resource", "nominalQuota")
    return [{k: e[k] for k in keys if k in e} for e in entries]


class LocalQuotaManager(QuotaManager):
    """:class:`.quotas.QuotaManager` over the batch service's local limits (same caps, audit)."""

    mode = "local"

    def __init__(self, limits: BatchLimits, engine: Engine, clock=time.time):
        super().__init__(None, engine, clock=clock)
        self.limits = limits

    @staticmethod
    def _state(group: str, answer: dict, caps) -> dict:
        in_use = {(u["flavor"], u["resource"]): u for u in answer.get("in_use", [])}
        configured = {(c["flavor"], c["resource"]): c for c in answer.get("configured", [])}
        quotas = []
        for q in _plain(answer["quotas"]):
            key = (q["flavor"], q["resource"])
            cap = caps.get(key)
            use = in_use.get(key, {})
            quotas.append({
                **q,
                "cap": cap.as_dict() if cap else None,
                "in_use": use.get("used", "0"),
                "over": bool(use.get("over")),
                "configured": configured.get(key, {}).get("nominalQuota"),
            })  # fmt: skip
        return {"group": group, "where": "The local batch queue (single node)", "quotas": quotas}

    async def get(self, group: str) -> dict:
        answer = await self.limits.request("GET", group)
        return self._state(group, answer, self.caps(group))

    async def set(self, actor: str, group: str, changes: list[Change]) -> dict:
        """Check caps, change the batch service's limits (at once), audit; ``get``'s answer."""
        caps = self.caps(group)
        check_caps(group, changes, caps)
        answer = await self.limits.request("PUT", group, changes_body(changes))
        with self.engine.begin() as connection:
            self._audit(
                connection, actor, "quota.set", group,
                _plain(answer["before"]), _plain(answer["quotas"]), mode="local",
            )  # fmt: skip
        return self._state(group, answer, caps)
