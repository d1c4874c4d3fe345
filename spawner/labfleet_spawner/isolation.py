"""Whether users' code runs under their own uids: one decision for notebooks and jobs.

On a single node every user's notebook (:class:`~labfleet_spawner.local.LocalGPUSpawner`)
and batch job (:class:`labfleet_batch.local.LocalBackend`) must run under that
user's own mapped uid, or users can read and change each other's files. That
needs a root hub (or batch service) and, for notebooks, a Python that an
unprivileged uid can run. :func:`decide` fails closed:

- ``auto`` (the default) and ``yes``: isolate; when that is impossible (not
  root, or the check fails) nothing starts and :class:`IsolationRefused` says
  why and what to change. Nothing ever falls back to running as the platform's
  own user.
- ``no``: a single-user installation, said explicitly: run as the platform's
  own user. If that user is root, only with the explicit acknowledgement
  ``allow_root`` (``spawner.allow_root_notebooks``).

Pure: the caller says which uid it runs as and whether isolation can work.
"""

from __future__ import annotations

MODES = ("auto", "yes", "no")

#: Where an administrator changes the decision (the platform YAML's names).
MODE_KEY = "spawner.isolate_users"
ROOT_KEY = "spawner.allow_root_notebooks"


class IsolationRefused(Exception):
    """Users' code may not run here as configured; the message says why and how to fix it."""


def decide(
    mode: str,
    *,
    uid: int,
    can_isolate: bool = True,
    why_not: str = "",
    allow_root: bool = False,
    what: str = "notebooks",
) -> bool:
    """True: run each user's ``what`` under their own uid; False: as ``uid`` (the caller's).

    ``can_isolate``: whether a root caller can actually isolate (``why_not`` says
    why it cannot). Raises :class:`IsolationRefused` rather than fall back.
    """
    if mode not in MODES:
        raise ValueError(f"isolation mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "no":
        if uid == 0 and not allow_root:
            raise IsolationRefused(
                f"{MODE_KEY} is 'no' and the platform runs as root, so {what} would run "
                f"as root: set {ROOT_KEY}: true to accept that (a one-person machine only), "
                f"or isolate users ({MODE_KEY}: auto, with the platform running as root)"
            )
        return False
    if uid != 0:
        raise IsolationRefused(
            f"{what} cannot run under their users' own uids: the platform runs as uid "
            f"{uid}, not root, and would run every user's {what} as that same uid (each "
            "able to read and change the others' files). Run labfleet as root, with a "
            f"Python every uid can read; or, on a single-user installation, set {MODE_KEY}: no"
        )
    if not can_isolate:
        raise IsolationRefused(
            f"{what} cannot run under their users' own uids: {why_not or 'unknown reason'}. "
            f"Nothing runs as root instead. Fix that (e.g. install Python where every uid "
            f"can read it); or, on a single-user installation, set {MODE_KEY}: no and "
            f"{ROOT_KEY}: true"
        )
    return True
