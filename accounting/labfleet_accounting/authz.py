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
        administers = set()
        # Membership of "<group>-admins" is enough; membership of "<group>" is not required.
        prefix, _, suffix = admin_group_pattern.partition("{group}")
        for g in groups:
            if g.startswith(prefix) and g.endswith(suffix) and len(g) > len(prefix) + len(suffix):
                administers.add(g[len(prefix) : len(g) - len(suffix)])
        for group, users in (group_admins or {}).items():
            if name in set(users):
                administers.add(group)
        return cls(name, bool(model.get("admin")), groups, frozenset(administers))


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
    return identity.admin or group in identity.administers
