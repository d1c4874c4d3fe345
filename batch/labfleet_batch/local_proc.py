"""How one completion of a local batch job runs.

The privileged service only starts a process; everything else happens as the
job's user, inside a PID namespace of the job's own:

- ``unshare --pid --fork --kill-child --mount-proc`` gives the completion a
  namespace whose first process (its "init") is :data:`EXIT_WRAPPER`. When
  that process ends, the kernel kills every other process in the namespace:
  nothing a job starts (``setsid``, double forks, children that ignore
  SIGTERM) outlives the job, its cancel or its time limit. The service ends a
  completion through its process group (``unshare`` and the init, which keep
  ``unshare``'s group): SIGKILL to the group reaches the init, and the kernel
  ends the rest. (``--kill-child`` alone would not do: ``setpriv``'s change of
  credentials clears the init's parent-death signal.)
- ``setpriv`` drops to the user's uid, gid and groups before the wrapper runs;
  the wrapper then changes into the job's folder, opens the completion's log
  and writes its exit status, all as the user. The service never opens a file
  in the job's folder for writing (it reads them through :mod:`.jobfs`).
- The wrapper, being the namespace's init, forwards SIGTERM to every process
  in the namespace (``kill -1`` inside a PID namespace reaches only that
  namespace; the wrapper checks it *is* pid 1 before doing so), waits for the
  command, and records its exit status.

Without root (the service then runs jobs as itself) there is no namespace and
no privilege change: the wrapper runs the command directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal

#: ``sh -c EXIT_WRAPPER labfleet-job <workdir> <index> <command...>``.
#: A command that is not found is said so, naming the command and the PATH it
#: was looked up in (the shell would name this wrapper instead).
EXIT_WRAPPER = (
    'cd -- "$1" 2>/dev/null || { echo "cannot enter the job folder $1" >&2; exit 126; }; '
    "i=$2; shift 2; "
    '{ command exec >>"logs/$i.log"; } 2>/dev/null '
    '|| { echo "cannot open logs/$i.log in $PWD" >&2; exit 126; }; '
    'exec 2>&1; rm -f -- "logs/$i.exit"; '
    # only ever as the init of the job's own PID namespace: there -1 is the job alone
    "if [ \"$$\" = 1 ]; then trap 'kill -s TERM -- -1 2>/dev/null' TERM INT; fi; "
    'rc=0; if command -v -- "$1" >/dev/null 2>&1; then "$@" & p=$!; '
    'while :; do wait "$p"; rc=$?; kill -0 "$p" 2>/dev/null || break; done; '
    'else echo "labfleet-batch: $1: command not found (PATH=$PATH)"; rc=127; fi; '
    'echo "$rc" > "logs/$i.exit.tmp" && mv -f "logs/$i.exit.tmp" "logs/$i.exit"; exit "$rc"'
)


#: The wrapper's exit status when it never got to run the command.
CANNOT_START = 126


class CompletionNotStarted(RuntimeError):
    """The wrapper could not enter the job's folder or open its log."""


class ContainmentMissing(RuntimeError):
    """unshare/setpriv (util-linux) are needed to run jobs as their users."""


def containment_tools() -> tuple[str, str]:
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if not unshare or not setpriv:
        raise ContainmentMissing(
            "running batch jobs as their users needs unshare and setpriv (Debian: "
            "util-linux); without them a job's processes could outlive the job"
        )
    return unshare, setpriv


def completion_argv(
    workdir: str,
    index: int,
    command: list[str],
    user: tuple[int, int, list[int]] | None = None,
    tools: tuple[str, str] | None = None,
) -> list[str]:
    """The command line that runs ``command`` as completion ``index`` (pure).

    ``user`` = (uid, gid, supplementary gids) with ``tools`` = (unshare, setpriv):
    as that user in a PID namespace of its own; None: as this process, directly.
    """
    wrapped = ["/bin/sh", "-c", EXIT_WRAPPER, "labfleet-job", workdir, str(index), *command]
    if user is None:
        return wrapped
    if tools is None:
        raise ValueError("running as another user needs the containment tools")
    uid, gid, groups = user
    unshare, setpriv = tools
    group_opt = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return [
        unshare, "--pid", "--fork", "--kill-child", "--mount-proc",
        setpriv, f"--reuid={uid}", f"--regid={gid}", group_opt, "--",
        *wrapped,
    ]  # fmt: skip


def namespace_init(pid: int) -> int | None:
    """The first process ``unshare`` (``pid``) forked: the init of the job's namespace."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def terminate(pid: int, contained: bool) -> None:
    """Ask a completion to stop: SIGTERM to what it runs, which may clean up."""
    init = namespace_init(pid) if contained else None
    with contextlib.suppress(ProcessLookupError):
        if init is not None:
            os.kill(init, signal.SIGTERM)  # the wrapper passes it to the whole namespace
        else:
            os.killpg(pid, signal.SIGTERM)


def kill(pid: int) -> None:
    """End a completion now: its process group (``unshare`` and the namespace's init)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
