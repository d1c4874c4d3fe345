"""Account names for the per-user uids of single-node mode.

Notebooks and local batch jobs run under uids mapped from the hub's user ids
(:mod:`labfleet_spawner.storage`), which have no ``/etc/passwd`` entry: the
prompt says ``I have no name!``, ``whoami`` fails, ``ls -l`` shows numbers and
``ssh`` refuses to run. The Littlest JupyterHub solves this by creating system
users; labfleet's uids come from the hub, so it leaves the machine's account
files alone and gives its processes their own view instead, through
`nss_wrapper <https://cwrap.org/nss_wrapper.html>`_ (Debian ``libnss-wrapper``):

- :class:`AccountsRegistry` keeps every platform user seen so far (name, uid,
  private group, home, hub groups) in ``<dir>/accounts.json`` and renders
  ``<dir>/passwd`` and ``<dir>/group``: the machine's own entries, then the
  platform's. The folder belongs to the privileged process (the hub's state
  directory), the files are world-readable (names and numbers only, like
  ``/etc/passwd``) and replaced atomically under a lock, so the hub and the
  batch service can both register users.
- :func:`nss_env` is what a notebook or job needs in its environment to see them.

Rendering is pure (:func:`render_passwd`, :func:`render_group`); only the
registry touches files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .storage import StorageLayout

log = logging.getLogger(__name__)

#: Where Debian's libnss-wrapper puts the library (multiarch folders).
NSS_WRAPPER_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libnss_wrapper.so",
    "/usr/lib/aarch64-linux-gnu/libnss_wrapper.so",
    "/usr/lib64/libnss_wrapper.so",
    "/usr/lib/libnss_wrapper.so",
)
SHELL = "/bin/bash"


@dataclass(frozen=True)
class Account:
    """One platform user as the machine should see it."""

    name: str
    uid: int
    gid: int  # the user's private group, named like the user
    home: str
    groups: dict[str, int] = field(default_factory=dict)  # hub group name -> gid

    @classmethod
    def from_layout(cls, layout: StorageLayout) -> Account:
        return cls(
            name=layout.username,
            uid=layout.uid,
            gid=layout.gid,
            home=str(layout.home),
            groups={g: gid for g, gid in layout.group_gids.items() if gid != layout.gid},
        )


def _system_names(text: str) -> tuple[set[str], set[int]]:
    names, ids = set(), set()
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[2].isdigit():
            names.add(parts[0])
            ids.add(int(parts[2]))
    return names, ids


def render_passwd(system: str, accounts: Iterable[Account]) -> str:
    """``/etc/passwd`` as the platform's processes see it (pure).

    An account whose name or uid the machine already has is left out: the
    machine's own entry wins, and the platform never shadows ``root``.
    """
    names, uids = _system_names(system)
    lines = [line for line in system.splitlines() if line.strip()]
    for a in sorted(accounts, key=lambda a: a.uid):
        if a.name in names or a.uid in uids:
            continue
        lines.append(f"{a.name}:x:{a.uid}:{a.gid}:{a.name} (labfleet):{a.home}:{SHELL}")
    return "\n".join(lines) + "\n"


def render_group(system: str, accounts: Iterable[Account]) -> str:
    """``/etc/group`` as the platform's processes see it (pure): each user's private
    group, and each hub group with its platform members."""
    names, gids = _system_names(system)
    groups: dict[int, tuple[str, set[str]]] = {}
    for a in accounts:
        groups.setdefault(a.gid, (a.name, set()))
        for name, gid in a.groups.items():
            groups.setdefault(gid, (name, set()))[1].add(a.name)
    lines = [line for line in system.splitlines() if line.strip()]
    for gid in sorted(groups):
        name, members = groups[gid]
        if name in names or gid in gids:
            continue
        lines.append(f"{name}:x:{gid}:{','.join(sorted(members))}")
    return "\n".join(lines) + "\n"


def find_nss_wrapper(candidates: Iterable[str] = NSS_WRAPPER_CANDIDATES) -> str | None:
    return next((p for p in candidates if os.path.isfile(p)), None)


def nss_env(directory: str | os.PathLike, library: str) -> dict[str, str]:
    """The environment that makes a process resolve the registry's names."""
    directory = Path(directory)
    return {
        "LD_PRELOAD": library,
        "NSS_WRAPPER_PASSWD": str(directory / "passwd"),
        "NSS_WRAPPER_GROUP": str(directory / "group"),
    }


class AccountsRegistry:
    """The platform's users, kept in a folder the privileged process owns."""

    def __init__(
        self,
        directory: str | os.PathLike,
        system_passwd: str = "/etc/passwd",
        system_group: str = "/etc/group",
    ):
        self.directory = Path(directory)
        self.system_passwd = Path(system_passwd)
        self.system_group = Path(system_group)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        # Written by a privileged process: the folder must be its own, not a link a user
        # planted, and writable by nobody else.
        st = os.lstat(self.directory)
        if (
            not stat.S_ISDIR(st.st_mode)
            or st.st_uid != os.geteuid()
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        ):
            raise PermissionError(
                f"{self.directory} must be a folder of uid {os.geteuid()} that no one else "
                "can write (it holds the account names of every platform user)"
            )
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def accounts(self) -> dict[str, Account]:
        try:
            raw = json.loads((self.directory / "accounts.json").read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("Ignoring unreadable %s: %s", self.directory / "accounts.json", e)
            return {}
        return {name: Account(**entry) for name, entry in raw.items()}

    def _write(self, name: str, text: str, mode: int) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, mode)
            os.replace(tmp, self.directory / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def register(self, account: Account) -> bool:
        """Add or update ``account``; returns whether anything changed."""
        with self._locked():
            accounts = self.accounts()
            if accounts.get(account.name) == account and (self.directory / "passwd").exists():
                return False
            # a uid belongs to one name: a renamed user's old entry goes
            accounts = {n: a for n, a in accounts.items() if a.uid != account.uid}
            accounts[account.name] = account
            system_passwd = self.system_passwd.read_text()
            system_group = self.system_group.read_text()
            self._write(
                "accounts.json",
                json.dumps({n: asdict(a) for n, a in sorted(accounts.items())}, indent=1),
                0o600,
            )
            self._write("passwd", render_passwd(system_passwd, accounts.values()), 0o644)
            self._write("group", render_group(system_group, accounts.values()), 0o644)
            return True
