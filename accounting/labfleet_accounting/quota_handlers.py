"""HTTP handlers of group quota management (API and page); the logic is in :mod:`.quotas`.

Who may do what:

| endpoint | platform admin | admin of the group | anyone else |
|---|---|---|---|
| ``GET api/quotas/<g>`` | yes | yes | 403 |
| ``PUT api/quotas/<g>`` | yes (within caps) | yes (within caps) | 403 |
| ``GET api/quota-caps/<g>`` | yes | yes | 403 |
| ``PUT api/quota-caps/<g>`` | yes | 403 | 403 |
| ``GET api/audit?group=<g>`` | yes (also without ``group``) | yes | 403 |
| ``GET/POST quotas?group=<g>`` | yes | yes | 403 |
"""

from __future__ import annotations

import html
import json

from tornado import web

from .authz import may_manage_group
from .quotas import Cap, Change, OverCap, QuotaError, parse_changes
from .service import BaseHandler


class QuotaBase(BaseHandler):
    def manager(self):
        if self.ctx.quotas is None:
            self.fail(404, "quota management needs the Kubernetes mode (Kueue ClusterQueues)")
            return None
        return self.ctx.quotas

    def allowed(self, group: str, platform_only: bool = False) -> bool:
        identity = self.identity()
        ok = identity.admin if platform_only else may_manage_group(identity, group)
        if not ok:
            who = "platform admins" if platform_only else f"admins of group {group!r}"
            self.fail(403, f"only {who} may do this")
        return ok

    async def kube_call(self, coro):
        """Run a manager call; Kubernetes and validation errors become answers."""
        try:
            return await coro
        except QuotaError as e:
            self.fail(400, str(e))
        except OverCap as e:
            self.fail(403, str(e))
        except Exception as e:
            status = getattr(e, "status", None)
            if status == 404:
                self.fail(404, "this group has no ClusterQueue")
            elif status is not None:
                self.fail(502, f"the Kubernetes API refused the change: {e}")
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


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{group} quotas</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px}}</style></head><body>
<h1>Batch quotas of {group}</h1><p>ClusterQueue {cq}. {message}</p>
<form method="post"><input type="hidden" name="_xsrf" value="{xsrf}">
<table id="quotas"><tr><th>flavor</th><th>resource</th><th>nominal</th><th>cap</th>
<th>borrowing limit</th><th>cap</th></tr>{rows}</table>
<button type="submit">Save</button></form>
<h2>Changes</h2><table id="audit"><tr><th>when (UTC)</th><th>who</th><th>what</th></tr>{audit}
</table></body></html>"""


class QuotaPageHandler(QuotaBase):
    """A form over the API: one row per capped flavor/resource; no scripts."""

    async def render_page(self, group: str, message: str = ""):
        import time as _time

        manager = self.ctx.quotas
        state = await self.kube_call(manager.get(group))
        if state is None:
            return
        rows = []
        for i, q in enumerate(state["quotas"]):
            cap = q["cap"]
            disabled = "" if cap else " disabled"
            rows.append(
                f"<tr><td>{html.escape(q['flavor'])}</td><td>{html.escape(q['resource'])}</td>"
                f'<td><input name="nominal-{i}" value="{html.escape(q["nominalQuota"])}"'
                f"{disabled}></td><td>{html.escape(cap['max_nominal']) if cap else '-'}</td>"
                f'<td><input name="borrowing-{i}" '
                f'value="{html.escape(q.get("borrowingLimit", ""))}"{disabled}></td>'
                f"<td>{html.escape(cap['max_borrowing']) if cap else '-'}</td></tr>"
            )
        audit = []
        for entry in await self.db(manager.audit, group, 20):
            when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.gmtime(entry["at"]))
            audit.append(
                f"<tr><td>{when}</td><td>{html.escape(entry['actor'])}</td>"
                f"<td>{html.escape(entry['action'])}</td></tr>"
            )
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(PAGE.format(
            group=html.escape(group), cq=html.escape(state["cluster_queue"]),
            message=html.escape(message), xsrf=html.escape(self.xsrf_token.decode()),
            rows="".join(rows), audit="".join(audit),
        ))  # fmt: skip

    @web.authenticated
    async def get(self):
        group = self.get_argument("group", "")
        if self.manager() and self.allowed(group):
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
