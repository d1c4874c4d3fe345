"""From IAM group claims to hub group names: a pure function.

INDIGO IAM sends group names in two claims: ``groups`` (``ai-infn/users``) and,
with scope ``wlcg.groups``, ``wlcg.groups`` (``/ai-infn/users``). labfleet reads
the claims it is told to, strips the leading ``/``, keeps only the groups under
the configured prefix (``ai-infn/``) and removes that prefix, so the hub sees
``users``, ``ml``, ``cms``. Names that cannot be a hub group (and so a
namespace suffix and a label value) are dropped, never guessed at.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .contract import is_valid_group_name


def map_iam_groups(
    claims: Mapping, claim_keys: Iterable[str], prefix: str = ""
) -> tuple[set[str], list[str]]:
    """Hub group names from ``claims``; returns (groups, names that were dropped and why)."""
    groups: set[str] = set()
    dropped: list[str] = []
    for key in claim_keys:
        values = claims.get(key) or []
        if isinstance(values, str):
            values = [values]
        for raw in values:
            if not isinstance(raw, str):
                dropped.append(f"{raw!r} (not a string, in claim {key})")
                continue
            name = raw.lstrip("/")
            if prefix:
                if not name.startswith(prefix):
                    continue  # another organisation's or VO's group: not ours to map
                name = name[len(prefix) :]
            if not is_valid_group_name(name):
                dropped.append(f"{raw!r} (not a valid hub group name, in claim {key})")
                continue
            groups.add(name)
    return groups, dropped
