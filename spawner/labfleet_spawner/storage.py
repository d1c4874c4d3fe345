"""The shared filesystem layout of single-node mode, and its creation.

::

    <root>/home/<user>      0700  uid:gid of the user          private work
    <root>/groups/<group>   2770  hub user:group gid           shared within a hub group
    <root>/public           1777  hub user                     anyone writes, owners delete
    <root>/envs             0755  hub user                     shared environments, read-only

:func:`plan_storage` computes paths, ids and environment variables and
validates every name (pure); :func:`apply_storage` makes the directories
(I/O). :func:`prepare_storage` does both.

Users and groups need no entry in ``/etc/passwd``: ids come from the hub
database, ``uid = uid_base + n`` and ``gid = gid_base + m``, where ``n`` and ``m``
are the numbers of the user's and the group's names, stable across restarts and
never handed to another name (:mod:`labfleet_hub.posix_registry`). Each user's
primary group is a private one with gid == uid. The two ranges must never
overlap -- a user whose private gid equalled a hub group's gid would get into
that group's directory -- :func:`check_id_ranges` enforces it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from labfleet_hub.contract import is_valid_group_name

from . import safefs

#: JupyterHub user names after normalisation, restricted to what is safe as one path
#: component: no "/", no leading "." or "-", nothing a shell would expand.
USERNAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._@+-]{0,127}$"
_USERNAME_RE = re.compile(USERNAME_PATTERN)

#: Default id bases: above the ranges Linux distributions give to system and human
#: accounts (and to subuid/subgid ranges, which start at 100000 by default), with
#: room for 100000 hub users below the first group id.
DEFAULT_UID_BASE = 200000
DEFAULT_GID_BASE = 300000

MODE_HOME = 0o700
MODE_GROUP = 0o2770  # setgid: files created inside belong to the group
MODE_PUBLIC = 0o1777  # sticky: only a file's owner may delete it
MODE_ENVS = 0o755
MODE_PARENT = 0o755


class StorageError(ValueError):
    """A name cannot be used as a directory, or the layout cannot be created."""


def mapped_uid(user_id: int, base: int = DEFAULT_UID_BASE) -> int:
    """The uid of a hub user: ``base +`` its number (posix_registry; from 1)."""
    if int(user_id) < 1:
        raise StorageError(f"hub user id must be positive, not {user_id}")
    return base + int(user_id)


def mapped_gid(group_id: int, base: int = DEFAULT_GID_BASE) -> int:
    """The gid of a hub group (or a user's private group): ``base + id``."""
    if int(group_id) < 1:
        raise StorageError(f"hub group id must be positive, not {group_id}")
    return base + int(group_id)


def check_id_ranges(
    uid_base: int, gid_base: int, user_id: int, group_ids: Iterable[int] = ()
) -> None:
    """Refuse ids where a user's private gid (== uid) could be a hub group's gid."""
    uid = mapped_uid(user_id, uid_base)
    gids = [mapped_gid(g, gid_base) for g in group_ids]
    if uid_base == gid_base:
        raise StorageError(
            f"uid_base and gid_base are both {uid_base}: user {user_id}'s private group would "
            f"be hub group {user_id}'s; set gid_base above uid_base + the number of users"
        )
    if uid_base < gid_base and uid > gid_base:
        raise StorageError(
            f"uid {uid} of hub user {user_id} reaches into the group id range starting at "
            f"{gid_base + 1}; raise gid_base"
        )
    if gid_base < uid_base and any(g > uid_base for g in gids):
        raise StorageError(
            f"a group id of user {user_id} reaches into the user id range starting at "
            f"{uid_base + 1}; raise uid_base"
        )


def check_username(username: str) -> str:
    if not isinstance(username, str) or not _USERNAME_RE.match(username) or ".." in username:
        raise StorageError(
            f"user name {str(username)[:64]!r} cannot be a directory name; allowed: letters, "
            "digits and . _ @ + - (not first: . or -), at most 128 characters"
        )
    return username


def check_group_name(group: str) -> str:
    if not isinstance(group, str) or not is_valid_group_name(group):
        raise StorageError(
            f"group name {str(group)[:64]!r} cannot be a directory name; allowed: lower-case "
            "letters, digits, . _ - (letter or digit first and last), at most 63 characters"
        )
    return group


@dataclass(frozen=True)
class StorageLayout:
    """Where one user's files live, and who owns what. Built by :func:`plan_storage`."""

    root: Path
    username: str
    uid: int
    gid: int
    home: Path
    public: Path
    envs: Path
    group_dirs: dict[str, Path] = field(default_factory=dict)
    group_gids: dict[str, int] = field(default_factory=dict)

    @property
    def supplementary_gids(self) -> list[int]:
        """The gids a notebook process of this user joins besides its own."""
        return sorted(set(self.group_gids.values()) - {self.gid})

    def env(self) -> dict[str, str]:
        """Variables that tell code in the notebook where things are."""
        return {
            "LABFLEET_HOME": str(self.home),
            # Like PATH: directories joined by ":"; each basename is the group name.
            "LABFLEET_GROUP_DIRS": os.pathsep.join(str(p) for p in self.group_dirs.values()),
            "LABFLEET_PUBLIC": str(self.public),
            "LABFLEET_ENVS": str(self.envs),
        }


def plan_storage(
    root: str | os.PathLike,
    username: str,
    uid: int,
    gid: int,
    groups: Mapping[str, int] | None = None,
) -> StorageLayout:
    """Compute the layout for ``username`` (pure). ``groups`` maps group name to gid."""
    root = Path(root)
    if not root.is_absolute():
        raise StorageError(f"storage root {str(root)!r} must be an absolute path")
    check_username(username)
    group_dirs, group_gids = {}, {}
    for name, group_gid in sorted((groups or {}).items()):
        check_group_name(name)
        group_dirs[name] = root / "groups" / name
        group_gids[name] = int(group_gid)
    return StorageLayout(
        root=root,
        username=username,
        uid=int(uid),
        gid=int(gid),
        home=root / "home" / username,
        public=root / "public",
        envs=root / "envs",
        group_dirs=group_dirs,
        group_gids=group_gids,
    )


def apply_storage(
    layout: StorageLayout,
    *,
    as_root: bool | None = None,
    owner_uid: int | None = None,
    chown: Callable[[int, int, int], None] | None = None,
) -> StorageLayout:
    """Create the directories of ``layout`` with their modes; set owners when root.

    ``as_root`` defaults to whether this process is root (without root, every
    directory belongs to the hub user and only the modes are set).
    ``owner_uid`` owns the shared directories (default: this process's uid).
    ``chown(fd, uid, gid)`` sets an owner (default ``os.fchown``).

    Nothing is done by path below the storage root (the administrator's): each
    folder is opened from its parent's descriptor without following links
    (:mod:`labfleet_spawner.safefs`), and its owner and mode are set on that
    descriptor. A link or a file in the place of a folder is refused
    (:class:`StorageError`); whatever it points to is left alone.
    """
    if as_root is None:
        as_root = os.geteuid() == 0
    if owner_uid is None:
        owner_uid = os.geteuid()
    hub_gid = os.getegid()

    def owned(uid: int, gid: int):
        return (uid, gid) if as_root else None

    def ensure(parent: int, name: str, mode: int, owner, what: Path) -> int:
        return safefs.ensure_dir(parent, name, mode, owner, what=str(what), fchown=chown)

    layout.root.mkdir(mode=MODE_PARENT, parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as fds:
            keep = fds.enter_context
            root = keep(safefs.closing(os.open(layout.root, os.O_RDONLY | os.O_DIRECTORY)))
            shared = owned(owner_uid, hub_gid)
            homes = keep(
                safefs.closing(ensure(root, "home", MODE_PARENT, shared, layout.home.parent))
            )
            groups = keep(
                safefs.closing(ensure(root, "groups", MODE_PARENT, shared, layout.root / "groups"))
            )
            private = owned(layout.uid, layout.gid)
            os.close(ensure(homes, layout.username, MODE_HOME, private, layout.home))
            for name, path in layout.group_dirs.items():
                group_owner = owned(owner_uid, layout.group_gids[name])
                os.close(ensure(groups, name, MODE_GROUP, group_owner, path))
            os.close(ensure(root, "public", MODE_PUBLIC, shared, layout.public))
            os.close(ensure(root, "envs", MODE_ENVS, shared, layout.envs))
    except safefs.UnsafePathError as e:
        raise StorageError(e.strerror) from None
    return layout


def prepare_storage(
    root: str | os.PathLike,
    username: str,
    uid: int,
    gid: int,
    groups: Mapping[str, int] | None = None,
    **apply_kwargs,
) -> StorageLayout:
    """:func:`plan_storage` then :func:`apply_storage`; see both."""
    return apply_storage(plan_storage(root, username, uid, gid, groups), **apply_kwargs)
