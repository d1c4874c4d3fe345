"""Who administers a group, and who may change its quotas: one rule for every service.

A user administers group ``G`` when they are in the hub group that
``pattern`` names for it (default ``{group}-admins``: ``ml-admins`` for
``ml``, a group managed in the identity provider like any other) or are
listed for ``G`` in the configured ``{group: [users]}``. Membership of ``G``
itself is not required by this rule (a service may add it: the batch service
lets a group admin see the group's jobs only while they are a member).

Quotas (both modes: Kueue ClusterQueues and the single node's local limits):
a platform admin (hub ``admin``) may change any group's caps and quotas; an
administrator of ``G`` may change ``G``'s quotas within the caps; nobody else
may change anything. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

DEFAULT_PATTERN = "{group}-admins"


def administered_groups(
    name: str,
    hub_groups: Iterable[str],
    pattern: str = DEFAULT_PATTERN,
    configured: Mapping[str, Iterable[str]] | None = None,
) -> frozenset[str]:
    """The groups ``name`` (a member of ``hub_groups``) administers."""
    administers = set()
    prefix, _, suffix = pattern.partition("{group}")
    for g in hub_groups:
        if g.startswith(prefix) and g.endswith(suffix) and len(g) > len(prefix) + len(suffix):
            administers.add(g[len(prefix) : len(g) - len(suffix)])
    for group, users in (configured or {}).items():
        if name in set(users):
            administers.add(group)
    return frozenset(administers)


def may_change_quotas(platform_admin: bool, administers: Iterable[str], group: str) -> bool:
    """A group's quotas (within the caps): platform admins and that group's admins."""
    return platform_admin or group in set(administers)


def may_change_caps(platform_admin: bool) -> bool:
    """The caps (the most a group's admins may give their group): platform admins only."""
    return platform_admin
