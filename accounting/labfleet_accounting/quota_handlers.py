"""HTTP handlers of group quota management (API and page); the logic is in :mod:`.quotas`.

Who may do what:

| endpoint | platform admin | admin of the group | anyone else |
|---|---|---|---|
| ``GET api/quotas/<g>`` | yes | yes | 403 |
| ``PUT api/quotas/<g>`` | yes (within caps) | yes (within caps) | 403 |
| ``GET api/quota-caps/<g>`` | yes | yes | 403 |
| ``PUT api/quota-caps/<g>`` | yes | 403 | 403 |
| ``GET api/audit?group=<g>`` | yes (also without ``group``) | yes | 403 |
| ``GET quotas?group=<g>`` (page) | yes | yes | members: read only; others 403 |
| ``POST quotas?group=<g>`` | yes (within caps) | yes (within caps) | 403 |

The same in both modes: the manager is a :class:`.quotas.QuotaManager`
(Kubernetes: ClusterQueues) or a :class:`.local_quotas.LocalQuotaManager`
(single node: the batch service's local limits). Who may change what is
:mod:`labfleet_hub.groupadmin`'s rule; a malformed value, an unknown entry or
one above its cap is a 400 naming the field.
"""

from __future__ import annotations

import json

from labfleet_hub.service_page import HubNav
from tornado import web

from .authz import may_manage_group, may_set_caps
from .quota_page import render_quota_page
from .quotas import Cap, Change, QuotaError, parse_changes
from .service import BaseHandler


class QuotaBase(BaseHandler):
    def manager(self):
        if self.ctx.quotas is None:
            self.fail(
                404,
                "quota management needs the Kubernetes mode (Kueue ClusterQueues) or, on a "
                "single node, the batch service (AccountingApp.batch_limits_url)",
            )
            return None
        return self.ctx.quotas

    def allowed(self, group: str, platform_only: bool = False) -> bool:
        identity = self.identity()
        ok = may_set_caps(identity) if platform_only else may_manage_group(identity, group)
        if not ok:
            who = "platform admins" if platform_only else f"admins of group {group!r}"
            self.fail(403, f"only {who} may do this")
        return ok

    async def kube_call(self, coro):
        """Run a manager call; Kubernetes and validation errors become answers."""
        try:
            return await coro
        except QuotaError as e:  # also above a cap (OverCap): the same 400 in both modes
            self.fail(400, str(e))
        except Exception as e:
            status = getattr(e, "status", None)
            local = getattr(self.ctx.quotas, "mode", "") == "local"
            if status == 404:
                self.fail(404, f"this group has no {'batch queue' if local else 'ClusterQueue'}")
            elif status is not None:
                api = "the batch service" if local else "the Kubernetes API"
                self.fail(502, f"{api} refused the change: {e}")
            else:
                raise
        return None


class QuotaHandler(QuotaBase):
    @web.authenticated
    async def get(self, group):
        manager = self.manager()
        if manager and self.allowed(group):
            result = await self.kube_call(manager.get(group))
            if result is not None:
                self.finish(result)

    @web.authenticated
    async def put(self, group):
        manager = self.manager()
        if not (manager and self.allowed(group)):
            return
        try:
            changes = parse_changes(json.loads(self.request.body or b"null"))
        except (QuotaError, ValueError) as e:
            return self.fail(400, str(e))
        result = await self.kube_call(manager.set(self.identity().name, group, changes))
        if result is not None:
            self.finish(result)


class QuotaCapsHandler(QuotaBase):
    @web.authenticated
    async def get(self, group):
        manager = self.manager()
        if manager and self.allowed(group):
            caps = await self.db(manager.caps, group)
            self.finish({"group": group, "caps": [
                {"flavor": f, "resource": r, **c.as_dict()} for (f, r), c in sorted(caps.items())
            ]})  # fmt: skip

    @web.authenticated
    async def put(self, group):
        manager = self.manager()
        if not (manager and self.allowed(group, platform_only=True)):
            return
        try:
            body = json.loads(self.request.body or b"null")
            caps = [
                Cap(str(c["flavor"]), str(c["resource"]), str(c["max_nominal"]),
                    str(c.get("max_borrowing", "0")))
                for c in body["caps"]
            ]  # fmt: skip
            after = await self.db(manager.set_caps, self.identity().name, group, caps)
        except (QuotaError, ValueError, KeyError, TypeError) as e:
            return self.fail(
                400,
                f'body must be {{"caps": [{{"flavor", "resource", "max_nominal", '
                f'"max_borrowing"}}]}} with quantities ({e})',
            )
        self.finish({"group": group, "caps": after})


class AuditHandler(QuotaBase):
    @web.authenticated
    async def get(self):
        manager = self.manager()
        if not manager:
            return
        group = self.get_argument("group", None)
        identity = self.identity()
        if group is None and not identity.admin:
            return self.fail(403, "name a group you administer: ?group=<group>")
        if group is not None and not self.allowed(group):
            return
        self.finish({"entries": await self.db(manager.audit, group)})


class QuotaPageHandler(QuotaBase):
    """A form over the API, in the hub's layout: editable for group and platform admins,
    read only for the group's other members; no scripts."""

    def may_view(self, group: str) -> bool:
        identity = self.identity()
        if may_manage_group(identity, group) or group in identity.groups:
            return True
        self.fail(403, f"only members and admins of group {group!r} see its quotas")
        return False

    async def render_page(self, group: str, message: str = ""):
        manager = self.ctx.quotas
        state = await self.kube_call(manager.get(group))
        if state is None:
            return
        audit = await self.db(manager.audit, group, 20)
        nav = self.ctx.nav or HubNav.from_hub_auth(self.hub_auth)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            render_quota_page(
                nav, self.current_user, state, audit,
                editable=may_manage_group(self.identity(), group),
                local=getattr(manager, "mode", "") == "local",
                xsrf=self.xsrf_token.decode(), message=message,
            )
        )  # fmt: skip

    @web.authenticated
    async def get(self):
        group = self.get_argument("group", "")
        if self.manager() and self.may_view(group):
            await self.render_page(group)

    @web.authenticated
    async def post(self):
        group = self.get_argument("group", "")
        manager = self.manager()
        if not (manager and self.allowed(group)):
            return
        state = await self.kube_call(manager.get(group))
        if state is None:
            return
        changes = []
        for i, q in enumerate(state["quotas"]):
            if not q["cap"]:
                continue
            nominal = self.get_body_argument(f"nominal-{i}", "").strip()
            borrowing = self.get_body_argument(f"borrowing-{i}", "").strip()
            if nominal != q["nominalQuota"] or borrowing != q.get("borrowingLimit", ""):
                changes.append(Change(q["flavor"], q["resource"], nominal, borrowing or None))
        if not changes:
            return await self.render_page(group, "Nothing changed.")
        try:
            parsed = parse_changes({"quotas": [
                {"flavor": c.flavor, "resource": c.resource, "nominalQuota": c.nominal,
                 **({"borrowingLimit": c.borrowing} if c.borrowing else {})}
                for c in changes
            ]})  # fmt: skip
        except QuotaError as e:
            return self.fail(400, str(e))
        if await self.kube_call(manager.set(self.identity().name, group, parsed)) is not None:
            await self.render_page(group, f"Saved {len(parsed)} change(s).")
