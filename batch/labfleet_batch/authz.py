"""Who may do what with batch jobs. Pure functions of the hub's user model.

- **submit** for a group: the caller is a member of that hub group.
- **see, read logs of, cancel** a job: its owner; or a *group admin* of the
  job's group; or (``hub_admins_see_all``) a hub admin.
- **group admin** of ``g``: a member of the hub group ``g`` *and* an
  administrator of ``g`` by the platform's one rule
  (:mod:`labfleet_hub.groupadmin`): in the hub group ``<g><admin_group_suffix>``
  (default ``g-admins``, managed in IAM like any other group) or listed under
  ``groups.<g>.admins`` in the queue configuration.

The caller comes from the hub (``HubAuth.user_for_token``): name, groups,
admin. Nothing the client sends about itself is trusted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from labfleet_hub.groupadmin import administered_groups


@dataclass(frozen=True)
class Caller:
    name: str
    groups: frozenset[str]
    admin: bool = False

    @classmethod
    def from_hub_model(cls, model: Mapping[str, Any]) -> Caller:
        return cls(
            name=str(model["name"]),
            groups=frozenset(model.get("groups") or ()),
            admin=bool(model.get("admin", False)),
        )


@dataclass(frozen=True)
class Policy:
    admin_group_suffix: str = "-admins"
    hub_admins_see_all: bool = True
    configured_admins: Mapping[str, Iterable[str]] | None = None
    #: the platform's pattern (accounting.admin_group_pattern); empty: "{group}<suffix>"
    admin_group_pattern: str = ""

    def is_group_admin(self, caller: Caller, group: str) -> bool:
        # a member of the group who administers it by the one rule (labfleet_hub.groupadmin)
        if group not in caller.groups:
            return False
        pattern = self.admin_group_pattern or "{group}" + self.admin_group_suffix
        groups = caller.groups if pattern != "{group}" else ()
        return group in administered_groups(caller.name, groups, pattern, self.configured_admins)

    def can_submit(self, caller: Caller, group: str) -> bool:
        return group in caller.groups

    def can_access(self, caller: Caller, owner: str, group: str) -> bool:
        if caller.name == owner:
            return True
        if self.hub_admins_see_all and caller.admin:
            return True
        return self.is_group_admin(caller, group)

    def can_list_group(self, caller: Caller, group: str) -> bool:
        return (self.hub_admins_see_all and caller.admin) or self.is_group_admin(caller, group)
