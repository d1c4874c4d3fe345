"""Folder and file work by a privileged process where users can write.

The rule (``docs/security.md``): root never opens, writes, ``chown``s or
``chmod``s by path anything a user can write or replace. Everything here works
on descriptors: a folder is opened from its parent's descriptor with
``O_NOFOLLOW | O_DIRECTORY`` (a link or a file in its place is refused, never
followed), owners and modes are set with ``fchown``/``fchmod`` on the opened
folder, and files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a name
that appeared in between is refused, not written through). Only the first
folder is opened by path: the caller's trusted starting point (the storage
root, or a home whose parent belongs to the platform).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Collection, Iterator

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(OSError):
    """Something in the way is not the plain folder (or file) it must be: said in words."""


@contextlib.contextmanager
def closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _what_is(parent: int | None, name: str) -> str:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        return "not a folder"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    return "not a folder" if not stat.S_ISDIR(st.st_mode) else "a folder"


def open_dir(parent: int | None, name: str, what: str | None = None) -> int:
    """A descriptor of folder ``name`` in ``parent`` (a path when ``parent`` is None).

    Never follows a link at ``name`` itself: raises :class:`UnsafePathError`
    when a link or a file is in its place, FileNotFoundError when it is missing.
    """
    what = what or name
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = _what_is(parent, name)
            if kind == "a symbolic link":
                raise UnsafePathError(
                    e.errno, f"{what} is a symbolic link; refusing to use it"
                ) from None
            raise UnsafePathError(e.errno, f"{what} exists and is not a directory") from None
        raise


def ensure_dir(
    parent: int | None,
    name: str,
    mode: int | None,
    owner: tuple[int, int] | None = None,
    *,
    what: str | None = None,
    expect_uid: int | Collection[int] | None = None,
    fchown=None,
) -> int:
    """Open folder ``name`` in ``parent``, creating it; returns its descriptor.

    A new folder is made mode 0700 and only then given away. ``owner`` (uid, gid)
    is set with ``fchown`` and ``mode`` with ``fchmod`` (after it: ``chown``
    clears setgid), on the descriptor, whatever was there before; ``mode`` None
    leaves an existing folder's mode alone (a new one gets 0700). ``expect_uid``:
    an existing folder must belong to that uid, or one of those uids
    (:class:`UnsafePathError` if not).
    """
    what = what or name
    created = False
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
        created = True
    except FileExistsError:
        pass
    fd = open_dir(parent, name, what)
    try:
        st = os.fstat(fd)
        allowed = {expect_uid} if isinstance(expect_uid, int) else expect_uid
        if not created and allowed is not None and st.st_uid not in allowed:
            raise UnsafePathError(
                errno.EPERM, f"{what} belongs to uid {st.st_uid}, not the home's owner"
            )
        if owner is not None:
            (fchown or os.fchown)(fd, *owner)
        if mode is not None:
            os.fchmod(fd, mode)
        elif created:
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def replace_file(
    parent: int, name: str, data: bytes, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """Make ``name`` in ``parent`` a new file holding ``data``, ``mode``, ``owner``.

    Whatever had the name (a link, a hard link to someone else's file, a file)
    is unlinked, never opened; a folder in its place is refused. The new file is
    created with ``O_EXCL | O_NOFOLLOW``, so a name planted in between is refused.
    """
    try:
        os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise UnsafePathError(errno.EISDIR, f"{name} is a folder; refusing to replace it") from None
    try:
        fd = os.open(name, CREATE_FLAGS, 0o600, dir_fd=parent)
    except FileExistsError:
        raise UnsafePathError(errno.EEXIST, f"{name} appeared while it was written") from None
    with closing(fd):
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        while data:
            data = data[os.write(fd, data) :]


def check_private_folder(path: str | os.PathLike) -> None:
    """Refuse a folder that a user could change, or reach through something they can.

    Every existing folder from ``/`` to ``path`` (links resolved) must belong to
    root or this process's uid and be writable by no one else; an ancestor that
    others can write is accepted only with the sticky bit (``/tmp``: others cannot
    move or remove what is not theirs). Folders still missing will be created by
    this process. Raises :class:`UnsafePathError` naming the first offending folder.
    """
    target = os.path.realpath(path)
    trusted = {0, os.geteuid()}
    parts = [p for p in target.split(os.sep) if p]
    current = os.sep
    for depth in range(len(parts) + 1):
        if depth:
            current = os.path.join(current, parts[depth - 1])
        try:
            st = os.stat(current, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(errno.ENOTDIR, f"{current} is not a folder")
        if st.st_uid not in trusted:
            raise UnsafePathError(
                errno.EPERM, f"{current} belongs to uid {st.st_uid}, who could change it"
            )
        last = depth == len(parts)
        if st.st_mode & 0o022 and (last or not st.st_mode & stat.S_ISVTX):
            raise UnsafePathError(errno.EPERM, f"{current} is writable by other users")
