"""What the platform keeps from its users: its state folder, and secrets off command lines.

Single node, every user has a shell (a notebook terminal) on the machine the
platform runs on. Two rules follow (docs/security.md):

- **The state folder is the platform's alone.** ``hub.state_dir`` and the
  folders in it are mode 0700, every file in them 0600: the hub database
  (users, groups, admin flags, server options), the accounting ledger, the
  logs, the secrets, the batch service's job records. :func:`prepare_state_dir`
  makes it so before ``labfleet up`` starts anything, tightening what an
  earlier version left readable, and creates the files that programs whose
  umask labfleet does not set would otherwise create 0644: the logs and the
  SQLite databases (SQLite gives a database's ``-wal``, ``-shm`` and
  ``-journal`` files the database's own mode). User storage
  (``spawner.storage_root``) lives outside it (checked by the configurer).
- **Secrets never go on a command line**, where ``ps`` shows them to every
  local user (``/proc/<pid>/cmdline`` is world-readable). Database URLs (which
  may hold a password) reach the hub-managed services through their
  environment, readable only by the service's own uid; the services read
  these variables as their traits' defaults.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

#: The accounting service's ledger (``AccountingApp.db_url``).
ACCOUNTING_DB_URL_ENV = "LABFLEET_ACCOUNTING_DB_URL"
#: The accounting database the batch service checks budgets in (``BatchService.budget_db_url``).
BUDGET_DB_URL_ENV = "LABFLEET_BUDGET_DB_URL"
#: The hub database the single-node GPU exporter reads (``GpuExporterApp.hub_db_url``).
HUB_DB_URL_ENV = "LABFLEET_HUB_DB_URL"

DIR_MODE = 0o700
FILE_MODE = 0o600
#: Folders of the state folder that labfleet creates (the accounting spool's is added).
STATE_FOLDERS = ("logs", "secrets", "batch")
#: Where earlier versions kept user storage by default (``<state_dir>/storage``).
OLD_STORAGE = "storage"


class StateError(RuntimeError):
    """The state folder cannot be made private; the message says what to do."""


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL; None for other databases and memory."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return None
    return Path(parsed.database)


def private_dir(path: Path) -> bool:
    """Create ``path`` (and missing parents) mode 0700, or tighten it; True if it changed.

    A link is left alone (it is the administrator's): nothing is changed through it.
    """
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.is_symlink():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) == DIR_MODE:
            return False
        os.fchmod(fd, DIR_MODE)
        return True
    finally:
        os.close(fd)


def private_file(path: Path) -> bool:
    """Create ``path`` empty with mode 0600, or tighten an existing plain file; True if changed.

    Never follows a link (``O_NOFOLLOW``); anything but a plain file is left alone.
    """
    try:
        flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(path, flags, FILE_MODE)
    except OSError as e:
        if os.path.islink(path):
            return False
        raise StateError(f"cannot create {path} mode 0600: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) == FILE_MODE:
            return False
        os.fchmod(fd, FILE_MODE)
        return True
    finally:
        os.close(fd)


def _tighten_files(folder: Path) -> list[Path]:
    """Every plain file directly in ``folder`` to 0600 (links and folders are left alone)."""
    changed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return changed
    for entry in entries:
        if entry.is_file(follow_symlinks=False) and private_file(Path(entry.path)):
            changed.append(Path(entry.path))
    return changed


def state_folders(values: dict) -> list[Path]:
    """The state folder and the folders in it labfleet uses, each to be mode 0700."""
    state = Path(values["hub"]["state_dir"])
    folders = [state, *(state / name for name in STATE_FOLDERS)]
    spool_dir = Path(values["accounting"]["spool"]).parent
    if spool_dir not in folders and spool_dir.is_relative_to(state):
        folders.append(spool_dir)
    return folders


def state_files(values: dict) -> list[Path]:
    """Files created before anything starts, so that they are 0600 from their first byte."""
    logs = Path(values["hub"]["state_dir"]) / "logs"
    files = [logs / "jupyterhub.log"]
    if values["devidp"]["enabled"]:
        files.append(logs / "devidp.log")
    urls = [values["hub"]["db_url"]]
    if values["accounting"]["enabled"] or values["batch"]["budgets"]["enabled"]:
        urls.append(values["accounting"]["db_url"])
    files += [p for p in map(sqlite_path, urls) if p is not None]
    if values["accounting"]["enabled"]:
        # written 0600 by whoever appends first; its folder, when outside the state
        # folder, is created 0700 (an existing one is the administrator's)
        files.append(Path(values["accounting"]["spool"]))
    return files


def _refuse_old_storage(values: dict) -> None:
    old = Path(values["hub"]["state_dir"]) / OLD_STORAGE
    if not old.is_dir() or old.is_symlink():
        return
    if not any(old.iterdir()):
        old.rmdir()
        return
    storage_root = values["spawner"]["storage_root"]
    raise StateError(
        f"{old} holds user storage (homes, group folders) from an earlier labfleet, whose "
        "spawner.storage_root defaulted to a folder inside hub.state_dir. The state folder "
        f"is now private to the platform and users cannot reach anything in it, so user "
        f"storage must move out: `mv {old} {storage_root}` (spawner.storage_root, which must "
        "not exist yet), or set spawner.storage_root to another place outside hub.state_dir "
        f"and move it there. Nothing was started."
    )


def prepare_state_dir(values: dict, extra_files: Iterable[Path] = ()) -> list[Path]:
    """Make the state folder private (see the module's docstring); returns what changed.

    Raises :class:`StateError` when it cannot, or when user storage of an earlier
    version is still inside it (it would become unreachable to its owners).
    """
    try:
        if values["spawner"]["kind"] == "local":
            _refuse_old_storage(values)
        changed = []
        for folder in state_folders(values):
            if private_dir(folder):
                changed.append(folder)
            changed += _tighten_files(folder)
        for path in [*state_files(values), *extra_files]:
            path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            if private_file(path):
                changed.append(path)
    except OSError as e:
        raise StateError(
            f"cannot make {e.filename or values['hub']['state_dir']} private to the platform "
            f"({e.strerror or e}); run labfleet as the state folder's owner (or root)"
        ) from None
    return changed
