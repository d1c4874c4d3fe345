"""The accounting service: a JupyterHub service with a REST API, a page, metrics and collectors.

Run it as a hub-managed service (``labfleet-accounting serve``); it
authenticates users and API tokens with :class:`jupyterhub.services.auth.HubOAuth`
(``HubOAuthenticated`` handlers), so browsers go through the hub's OAuth
and scripts send ``Authorization: token <hub token>``.

Endpoints (under the service prefix, ``/services/accounting/`` by default):

- ``GET  api/usage?period=2025-03&by=user|group&user=&group=&format=json|csv``
- ``GET  api/usage/series?period=...&bucket=day|week&metric=gpu_hours``
- ``GET  api/usage/recent?period=...&user=&group=`` the latest sessions and jobs, newest first
- ``GET  api/budget/check?group=&accelerator_kind=``  -> a budget Decision
- ``PUT  api/budgets/<group>`` (platform admins) ``{"gpu_hours", "period", ...}``
- ``GET  /`` a page with the caller's usage, charts (inline SVG), totals and the recent
  sessions and jobs, in the hub's layout (:mod:`labfleet_accounting.usage_page`)
- ``GET  metrics`` Prometheus text (see :mod:`labfleet_accounting.metrics`), only with
  ``Authorization: Bearer <metrics token>`` (401 without, 403 with another) unless
  opened with ``metrics_public``; with neither, closed to everyone (403)
- ``GET|PUT api/quotas/<group>`` (group and platform admins), ``GET|PUT
  api/quota-caps/<group>`` (PUT: platform admins), ``GET api/audit?group=``,
  ``GET|POST quotas?group=`` the quota page (see :mod:`labfleet_accounting.quotas`)
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from labfleet_hub.bodylimit import BodyLimit, OpenAPIHandler
from labfleet_hub.service_page import HubNav
from prometheus_client import CollectorRegistry
from tornado import web

from . import openapi
from .authz import Forbidden, Identity, may_manage_group, scope_for
from .budgets import BudgetChecker
from .metrics_http import MetricsHandler
from .reports import (
    PeriodError,
    Weights,
    describe_interval,
    parse_period,
    query_recent,
    query_series,
    query_usage,
    summarize,
    to_csv,
)
from .usage_page import render_usage_page

BUCKETS = {"hour": 3600, "day": 86400, "week": 7 * 86400}


class Context:
    """What every handler needs, built once by the application."""

    def __init__(self, engine, weights: Weights, admin_group_pattern: str, group_admins: dict,
                 budgets: BudgetChecker, registry: CollectorRegistry, clock=time.time,
                 quotas=None, nav: HubNav | None = None, recent_limit: int = 50):  # fmt: skip
        self.engine = engine
        self.recent_limit = recent_limit  # rows of "Recent sessions and jobs" (page and API)
        self.nav = nav  # the hub's navigation bar on the page; None: from hub_auth
        self.quotas = quotas  # a QuotaManager; None without Kubernetes
        self.weights = weights
        self.admin_group_pattern = admin_group_pattern
        self.group_admins = group_admins
        self.budgets = budgets
        self.registry = registry
        self.clock = clock


class BaseHandler(HubOAuthenticated, BodyLimit, web.RequestHandler):
    def initialize(self, context: Context, hub_auth: HubOAuth):
        self.ctx = context
        self.hub_auth = hub_auth

    def identity(self) -> Identity:
        return Identity.from_model(
            self.current_user, self.ctx.admin_group_pattern, self.ctx.group_admins
        )

    def fail(self, status: int, message: str):
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status, "message": message}))

    def write_error(self, status_code, **kwargs):
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": self._reason}))

    def period(self) -> tuple[int, int, str]:
        text = self.get_argument("period", "")
        if not text:
            text = time.strftime("%Y-%m", time.gmtime(self.ctx.clock()))
        start, end = parse_period(text)
        return start, end, text

    def scope(self) -> tuple[int, int, str, object] | None:
        """``(start, end, label, filter)`` from ``period``, ``user`` and ``group``: what
        the caller asks for and may see; None once a 400 or 403 has been answered."""
        try:
            start, end, label = self.period()
            flt = scope_for(
                self.identity(), self.get_argument("user", None), self.get_argument("group", None)
            )
        except PeriodError as e:
            self.fail(400, str(e))
            return None
        except Forbidden as e:
            self.fail(403, str(e))
            return None
        return start, end, label, flt

    async def db(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def recent(self, start: int, end: int, flt, now: int) -> list[dict]:
        """The latest sessions and jobs ``flt`` (the caller's scope) lets through."""
        rows = await self.db(
            query_recent, self.ctx.engine, start, end, flt, now, self.ctx.recent_limit
        )
        return [describe_interval(r, self.ctx.weights, now) for r in rows]


class UsageHandler(BaseHandler):
    @web.authenticated
    async def get(self):
        by = self.get_argument("by", "user")
        if by not in ("user", "group"):
            return self.fail(400, "by must be 'user' or 'group'")
        if (scope := self.scope()) is None:
            return
        start, end, label, flt = scope
        rows = await self.db(query_usage, self.ctx.engine, start, end, flt, int(self.ctx.clock()))
        summary = summarize(rows, by, self.ctx.weights)
        if self.get_argument("format", "json") == "csv":
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", f'attachment; filename="usage-{label}.csv"')
            return self.finish(to_csv(summary, by))
        self.finish({"period": label, "start": start, "end": end, "by": by, "usage": summary})


class SeriesHandler(BaseHandler):
    @web.authenticated
    async def get(self):
        bucket = BUCKETS.get(self.get_argument("bucket", "day"))
        if bucket is None:
            return self.fail(400, f"bucket must be one of {', '.join(BUCKETS)}")
        if (scope := self.scope()) is None:
            return
        start, end, label, flt = scope
        try:
            series = await self.db(
                query_series, self.ctx.engine, start, end, bucket, flt, self.ctx.weights,
                int(self.ctx.clock()),
            )  # fmt: skip
        except PeriodError as e:  # too many buckets (a month by the hour): a 400, not a 500
            return self.fail(400, str(e))
        self.finish({"period": label, "bucket": bucket, "series": series})


class RecentHandler(BaseHandler):
    """The usage page's "Recent sessions and jobs" as JSON, under the same scope rules."""

    @web.authenticated
    async def get(self):
        if (scope := self.scope()) is None:
            return
        start, end, label, flt = scope
        recent = await self.recent(start, end, flt, int(self.ctx.clock()))
        self.finish({"period": label, "start": start, "end": end,
                     "limit": self.ctx.recent_limit, "recent": recent})  # fmt: skip


class BudgetCheckHandler(BaseHandler):
    """``check_budget(group, accelerator_kind)`` for spawners and the batch service."""

    @web.authenticated
    async def get(self):
        group = self.get_argument("group", "")
        identity = self.identity()
        # Services (spawners, batch) and admins ask for anyone; members for their groups.
        is_service = self.current_user.get("kind") == "service"
        if not (is_service or identity.admin or group in identity.groups):
            return self.fail(403, f"you are not a member of group {group!r}")
        decision = await self.db(
            self.ctx.budgets.check_budget, group, self.get_argument("accelerator_kind", "")
        )
        self.finish(decision.as_dict())


class BudgetHandler(BaseHandler):
    @web.authenticated
    async def put(self, group):
        if not self.identity().admin:
            return self.fail(403, "only platform admins set budgets")
        try:
            body = json.loads(self.request.body or b"{}")
            gpu_hours = float(body["gpu_hours"])
            warn_fraction = float(body.get("warn_fraction", 0.8))
            period = body.get("period", "month")
            # NaN compares false with everything: checked as finite first
            if not (math.isfinite(gpu_hours) and math.isfinite(warn_fraction)):
                raise ValueError
            if period not in ("month", "quarter", "year") or gpu_hours < 0:
                raise ValueError
            if not 0 <= warn_fraction <= 1 or not isinstance(body.get("enforce", True), bool):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return self.fail(
                400,
                'body must be {"gpu_hours": >= 0, "period": "month"|"quarter"|"year", '
                '"warn_fraction": 0-1, "enforce": true|false}',
            )
        await self.db(
            self.ctx.budgets.set_budget, group, gpu_hours, period,
            warn_fraction, body.get("enforce", True),
        )  # fmt: skip
        self.finish({"group": group, "gpu_hours": gpu_hours, "period": period})


class PageHandler(BaseHandler):
    """The usage page (:mod:`labfleet_accounting.usage_page`), in the hub's layout."""

    @web.authenticated
    async def get(self):
        try:
            start, end, label = self.period()
            identity = self.identity()
            group = self.get_argument("group", None)
            flt = scope_for(identity, self.get_argument("user", None), group)
        except (PeriodError, Forbidden) as e:
            return self.fail(400 if isinstance(e, PeriodError) else 403, str(e))
        by = "group" if (group or identity.admin) else "user"
        now = int(self.ctx.clock())
        rows = await self.db(query_usage, self.ctx.engine, start, end, flt, now)
        series = await self.db(
            query_series, self.ctx.engine, start, end, 86400, flt, self.ctx.weights, now
        )
        recent = await self.recent(start, end, flt, now)
        summary = summarize(rows, by, self.ctx.weights)
        scope = (
            "You see everything (platform admin)."
            if identity.admin and not group
            else f"Group {group}."
            if group
            else "Your own usage."
        )
        nav = self.ctx.nav or HubNav.from_hub_auth(self.hub_auth)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            render_usage_page(
                self.current_user, label, scope, summary, series, by, group, nav,
                self.settings.get("service_prefix", ""), recent, self.ctx.recent_limit,
                quota_groups=self.quota_groups(identity),
            )
        )  # fmt: skip

    def quota_groups(self, identity: Identity) -> list[str]:
        """The groups whose quota page the viewer may change (none without quotas)."""
        if self.ctx.quotas is None:
            return []
        return sorted(identity.administers)


class OAuthCallbackHandler(BodyLimit, HubOAuthCallbackHandler):
    """The hub's OAuth callback, with the application's HubOAuth.

    Without this the handler uses ``HubOAuth.instance()``, a different object
    from the one that started the login and holds its PKCE code verifier:
    the hub then refuses the code ("Code verifier required").
    """

    def initialize(self, hub_auth: HubOAuth):
        self.hub_auth = hub_auth


def make_app(
    context: Context,
    hub_auth: HubOAuth,
    prefix: str = "/",
    metrics_token: str = "",
    cookie_secret=b"",
    metrics_public: bool = False,
):
    """The tornado application; ``prefix`` is the service prefix (JUPYTERHUB_SERVICE_PREFIX).

    ``metrics`` answers only ``Authorization: Bearer <metrics_token>``; without a token
    nobody, unless ``metrics_public`` opens it to everyone."""
    # here, not at the top: those handlers subclass BaseHandler from this module
    from .quota_handlers import AuditHandler, QuotaCapsHandler, QuotaHandler, QuotaPageHandler

    args = {"context": context, "hub_auth": hub_auth}
    routes = [
        (
            url_path_join(prefix, "api/openapi.json"),
            OpenAPIHandler,
            {"prefix": prefix, "document": openapi.DOCUMENT},
        ),  # fmt: skip
        (url_path_join(prefix, "api/usage"), UsageHandler, args),
        (url_path_join(prefix, "api/usage/series"), SeriesHandler, args),
        (url_path_join(prefix, "api/usage/recent"), RecentHandler, args),
        (url_path_join(prefix, "api/budget/check"), BudgetCheckHandler, args),
        (url_path_join(prefix, r"api/budgets/([^/]+)"), BudgetHandler, args),
        (url_path_join(prefix, r"api/quotas/([^/]+)"), QuotaHandler, args),
        (url_path_join(prefix, r"api/quota-caps/([^/]+)"), QuotaCapsHandler, args),
        (url_path_join(prefix, "api/audit"), AuditHandler, args),
        (url_path_join(prefix, "quotas"), QuotaPageHandler, args),
        (
            url_path_join(prefix, "metrics"),
            MetricsHandler,
            {
                "registry": context.registry,
                "token": metrics_token,
                "public": metrics_public,
                "realm": "labfleet-accounting metrics",
                "token_setting": "AccountingApp.metrics_token_file",
            },
        ),
        (url_path_join(prefix, "oauth_callback"), OAuthCallbackHandler, {"hub_auth": hub_auth}),
        (prefix.rstrip("/") + "/?", PageHandler, args),
    ]
    return web.Application(
        routes, cookie_secret=cookie_secret or os.urandom(32), hub_auth=hub_auth,
        login_url=hub_auth.login_url, service_prefix=url_path_join(prefix, ""),
        # No tornado-level XSRF: HubOAuth checks XSRF itself on cookie-authenticated
        # requests (and token-authenticated API calls need none).
        xsrf_cookies=False,
    )  # fmt: skip


__all__ = ["Context", "make_app", "may_manage_group"]
