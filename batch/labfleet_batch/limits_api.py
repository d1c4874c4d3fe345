"""``api/limits/<group>``: the single node's live group limits, for the accounting service.

The batch service enforces a single node's group limits (:mod:`.local`), so it
owns them: it keeps the live values (:mod:`.local_limits`) and applies a
change at once. People do not call this: the accounting service serves the
one quota API, page and audit log of both modes (who may change what, the
platform admin's caps, the audit: ``docs/accounting.md``) and, on a single
node, reads and changes the limits here, as on Kubernetes it reads and
patches the ClusterQueues through the API server. Only the hub services named
in ``BatchService.limit_managers`` (default ``accounting``) are answered,
with their own hub API token; users get 403.

    GET api/limits/<group>  {"group", "quotas": [entry], "configured": [entry],
                             "in_use": [{"flavor", "resource", "used", "over"}]}
    PUT api/limits/<group>  {"quotas": [{"flavor", "resource", "nominalQuota"}]}
                            -> the same, with "before" and "after"
"""

from __future__ import annotations

import dataclasses
import json
import logging

from labfleet_accounting.quotas import QuotaError, parse_changes
from labfleet_hub.hubauth import reads
from tornado import web

from .local_limits import (
    LimitsStoreError,
    check_changes,
    limit_entries,
    live_file,
    quota_from_entries,
    usage_entries,
)
from .service import BaseHandler, check_scopes

log = logging.getLogger("labfleet.batch")


class LimitsHandler(BaseHandler):
    async def prepare(self):
        hub_auth = self.ctx.hub_auth
        token = hub_auth.get_token(self, in_cookie=False)
        if not token:
            raise web.HTTPError(401, "send a hub API token: Authorization: token <token>")
        model = await hub_auth.user_for_token(
            token, use_cache=reads(self.request.method), sync=False
        )
        managers = self.ctx.limit_managers
        if not model or model.get("kind") != "service" or model.get("name") not in managers:
            raise web.HTTPError(
                403,
                "only the hub service(s) %s change group limits here; people use the "
                "accounting service's quota page and API",
                ", ".join(managers) or "(none)",
            )
        if hub_auth.access_scopes and not check_scopes(
            hub_auth.access_scopes, set(model.get("scopes") or ())
        ):
            raise web.HTTPError(403, "this token lacks %s", " or ".join(hub_auth.access_scopes))
        self.service_name = model["name"]

    def state(self, group: str) -> dict:
        ctx, backend = self.ctx, self.ctx.backend
        if not hasattr(backend, "set_group_quota"):
            raise web.HTTPError(404, "the Kubernetes backend's limits are its ClusterQueues")
        quota = ctx.config.groups.get(group)
        if quota is None:
            raise web.HTTPError(404, "group %s has no batch queue", group[:64])
        yaml_quota = ctx.configured.groups.get(group, quota)
        return {
            "group": group,
            "quotas": limit_entries(ctx.config, ctx.catalogue, quota),
            "configured": limit_entries(ctx.config, ctx.catalogue, yaml_quota),
            "in_use": usage_entries(ctx.config, ctx.catalogue, quota, backend.usage(group)),
        }

    async def get(self, group: str):
        self.write_json(self.state(group))

    async def put(self, group: str):
        before = self.state(group)
        try:
            changes = parse_changes(json.loads(self.request.body or b"null"))
            after = check_changes(before["quotas"], changes)
        except (QuotaError, ValueError) as e:
            raise web.HTTPError(400, "%s", str(e)) from None
        ctx = self.ctx
        quota = quota_from_entries(ctx.config.groups[group], after)
        groups = {**ctx.config.groups, group: quota}
        live = live_file(ctx.configured, dataclasses.replace(ctx.config, groups=groups))
        if ctx.limits_store is not None:
            try:  # stored first: a change that could not be kept is not made
                ctx.limits_store.save(live)
            except (OSError, LimitsStoreError) as e:
                log.error("Cannot save the group limits: %s", e)
                raise web.HTTPError(503, "cannot save the group limits: %s", str(e)) from None
        ctx.backend.set_group_quota(quota)
        log.info("%s changed the limits of group %s for a group admin", self.service_name, group)
        self.write_json({**self.state(group), "before": before["quotas"]})
