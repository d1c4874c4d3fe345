"""File work in a local job's folder by a privileged service, without trusting it.

The batch service runs as root; a job's folder (``~/batch/<job>/``) and
everything in it belong to the job's user, who can replace any part of it at
any moment with a symbolic link, a FIFO or a hard link. So nothing here opens
a path by name: each folder is opened from its parent's descriptor with
``O_NOFOLLOW``, starting at the user's home, whose own path is trusted (its
parents belong to the platform: ``<storage_root>/home``). Files are created
with ``O_EXCL`` and handed to the user with ``fchown`` on the descriptor;
files are read only when they are plain, singly linked and the job user's
(or, when the service does not isolate users, the service's own).

What the service writes while a job runs (its logs and exit statuses) is
written by the job's own processes, as the user (see ``EXIT_WRAPPER`` in
:mod:`.local`): the privileged side only reads them, through this module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from labfleet_spawner.safefs import CREATE_FLAGS as _CREATE_FLAGS
from labfleet_spawner.safefs import UnsafePathError as JobFolderError
from labfleet_spawner.safefs import closing as _fd
from labfleet_spawner.safefs import open_dir as _open_dir

# O_NONBLOCK: a FIFO planted as a log must not hang the service
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

SCRIPT_NAME = ".labfleet-job.sh"

__all__ = ["JobFolder", "JobFolderError", "mtime", "open_file", "prepare", "read_text"]


@dataclass(frozen=True)
class JobFolder:
    """Where a job's files are: ``home/<parts...>``.

    Everything in it must belong to whoever owns ``home`` (the job's user; the
    service itself when it does not isolate users). ``chown`` is the (uid, gid)
    that what :func:`prepare` creates is given, or None to leave it the service's.
    """

    home: Path
    parts: tuple[str, ...]  # e.g. ("batch", "train-x1y2z3w4")
    chown: tuple[int, int] | None = None

    @classmethod
    def of(cls, home: str | os.PathLike, workdir: str | os.PathLike, chown=None) -> JobFolder:
        try:
            rel = Path(workdir).relative_to(home)
        except ValueError:
            rel = Path()
        if not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
            raise JobFolderError(errno.EINVAL, f"{workdir} is not a folder inside {home}")
        return cls(Path(home), rel.parts, chown)


def _describe(folder: JobFolder, name: str) -> str:
    return "~/" + "/".join((*folder.parts, name)) if name else "~/" + "/".join(folder.parts)


def _check_owner(fd: int, owner: int, what: str) -> os.stat_result:
    st = os.fstat(fd)
    if st.st_uid != owner:
        raise JobFolderError(errno.EPERM, f"{what} belongs to uid {st.st_uid}, not the job's user")
    return st


@contextlib.contextmanager
def _walk(folder: JobFolder, create: bool = False) -> Iterator[int]:
    """A descriptor of the job's folder, reached without following any link."""
    fd = _open_dir(None, str(folder.home), "the home folder")
    try:
        owner = os.fstat(fd).st_uid
        if folder.chown is not None and folder.chown[0] != owner:
            raise JobFolderError(errno.EPERM, f"{folder.home} does not belong to the job's user")
        for depth, part in enumerate(folder.parts):
            what = _describe(JobFolder(folder.home, folder.parts[: depth + 1]), "")
            made = False
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    made = True
                except FileExistsError:
                    pass
            child = _open_dir(fd, part, what)
            os.close(fd)
            fd = child
            if made and folder.chown is not None:
                os.fchown(fd, *folder.chown)
            _check_owner(fd, owner, what)
        yield fd, owner
    finally:
        os.close(fd)


def prepare(
    folder: JobFolder, files: Mapping[str, str], script: str | None, subdirs=("logs",)
) -> None:
    """Create the job's folder (which must be new), its input files, script and ``logs/``.

    Raises :class:`JobFolderError` when something in the way is not the user's
    plain folder, e.g. ``~/batch`` replaced by a link to a folder of root's.
    """
    with _walk(folder, create=True) as (job, _):
        for name in subdirs:
            os.mkdir(name, 0o755, dir_fd=job)
            with _fd(_open_dir(job, name, _describe(folder, name))) as sub:
                if folder.chown is not None:
                    os.fchown(sub, *folder.chown)
        writes = dict(files)
        if script is not None:
            writes[SCRIPT_NAME] = script + "\n"
        for name, content in writes.items():
            mode = 0o700 if name == SCRIPT_NAME else 0o640
            try:
                fd = os.open(name, _CREATE_FLAGS, mode, dir_fd=job)
            except FileExistsError:
                raise JobFolderError(
                    errno.EEXIST, f"{_describe(folder, name)} exists already"
                ) from None
            with _fd(fd):
                os.fchmod(fd, mode)  # whatever the umask
                if folder.chown is not None:
                    os.fchown(fd, *folder.chown)
                data = content.encode()
                while data:
                    data = data[os.write(fd, data) :]


@contextlib.contextmanager
def open_file(folder: JobFolder, *names: str) -> Iterator[int]:
    """A read descriptor of ``<job folder>/<names...>``: a plain file of the job's user.

    Raises FileNotFoundError when it does not exist, :class:`JobFolderError` when
    anything on the way is a link, or the file is not a plain, singly linked file
    of the job's user (a FIFO, a hard link to someone else's file, root's file).
    """
    *dirs, name = names
    with _walk(folder) as (job, owner), contextlib.ExitStack() as opened:
        fd = job
        for d in dirs:
            fd = opened.enter_context(_fd(_open_dir(fd, d, _describe(folder, d))))
        what = _describe(folder, "/".join(names))
        try:
            file = os.open(name, _READ_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise JobFolderError(e.errno, f"{what} is a symbolic link") from None
            raise
        with _fd(file):
            st = _check_owner(file, owner, what)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise JobFolderError(errno.EPERM, f"{what} is not a plain file of the job")
            yield file


def read_text(folder: JobFolder, *names: str, limit: int | None = None) -> str:
    """The file's text (its last ``limit`` bytes when given), read through :func:`open_file`."""
    with open_file(folder, *names) as fd:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            os.lseek(fd, size - limit, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def mtime(folder: JobFolder, *names: str) -> float | None:
    """When the file was last written, or None if it is missing or not the job's."""
    try:
        with open_file(folder, *names) as fd:
            return os.fstat(fd).st_mtime
    except OSError:
        return None
