"""Who may see which usage: pure decisions on a hub user model, no I/O.

- a platform admin (hub ``admin: true``) sees everything;
- a group admin sees the usage charged to the groups they administer. A user
  administers group ``G`` when they are in the hub group named by
  ``admin_group_pattern`` (default ``{group}-admins``, e.g. ``ml-admins``)
  or are listed for ``G`` in the ``group_admins`` mapping of the service;
- everyone else sees their own usage only.

A request names what it wants (``user``, ``group``); :func:`scope_for`
returns the :class:`~labfleet_accounting.reports.Filter` that the query
runs with, or raises :class:`Forbidden` with a sentence saying what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from labfleet_hub.groupadmin import administered_groups, may_change_caps, may_change_quotas

from .reports import Filter


class Forbidden(Exception):
    """The caller may not see this; the message says what they may see."""


@dataclass(frozen=True)
class Identity:
    name: str
    admin: bool = False
    groups: frozenset[str] = frozenset()
    administers: frozenset[str] = frozenset()

    @classmethod
    def from_model(
        cls,
        model: Mapping,
        admin_group_pattern: str = "{group}-admins",
        group_admins: Mapping[str, Iterable[str]] | None = None,
    ) -> Identity:
        """From a hub user model (``name``, ``admin``, ``groups``) as HubAuth returns it."""
        name = model.get("name", "")
        groups = frozenset(model.get("groups") or ())
        # the one rule of labfleet_hub.groupadmin: "<group>-admins" is enough
        administers = administered_groups(name, groups, admin_group_pattern, group_admins)
        return cls(name, bool(model.get("admin")), groups, administers)


def scope_for(identity: Identity, user: str | None, group: str | None) -> Filter:
    """The filter a report for ``identity`` runs with, given the requested user/group."""
    users = (user,) if user else None
    groups = (group,) if group else None
    if identity.admin:
        return Filter(users=users, groups=groups)
    if group:
        if group in identity.administers:
            return Filter(users=users, groups=groups)
        if user == identity.name:
            # Own usage charged to one of one's groups.
            return Filter(users=users, groups=groups)
        raise Forbidden(f"you do not administer group {group!r}; " + _allowed(identity))
    if user and user != identity.name:
        raise Forbidden(f"you may not see the usage of {user!r}; " + _allowed(identity))
    return Filter(users=(identity.name,))


def _allowed(identity: Identity) -> str:
    if identity.administers:
        return (
            f"you may see your own usage and that of group(s) "
            f"{', '.join(sorted(identity.administers))}"
        )
    return "you may see your own usage only"


def may_manage_group(identity: Identity, group: str) -> bool:
    """May change ``group``'s quotas (within the caps): :mod:`labfleet_hub.groupadmin`."""
    return may_change_quotas(identity.admin, identity.administers, group)


def may_set_caps(identity: Identity) -> bool:
    return may_change_caps(identity.admin)
