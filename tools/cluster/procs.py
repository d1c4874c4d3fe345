"""Process supervision of the test cluster: start, record, stop, verify nothing is left.

Loaded by cluster.py from its folder (which re-exports what the tests use).
Every component runs in its own session (process group); ``pids.json`` in
the state directory records leader pid and start time, so ``stop_cluster``
works from another process and never signals a reused pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

Progress = Callable[[str], None]

#: Start order; stopped in reverse.
COMPONENT_ORDER = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kueue",
]


class ClusterError(RuntimeError):
    """Raised when the cluster cannot be started or stopped cleanly."""


def _print(msg: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _proc_starttime(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22 (starttime); the command name (field 2) may contain spaces
    rest = stat.rsplit(")", 1)[1].split()
    return rest[19]


def _proc_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _group_members(pgid: int) -> list[int]:
    """Live processes whose process group is pgid."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            continue
        if int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class _Procs:
    """Started processes of one cluster, persisted in <state>/pids.json."""

    def __init__(self, state_dir: Path, die_with_parent: bool):
        self.state_dir = state_dir
        self.logs = state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.die_with_parent = die_with_parent
        self.popen: dict[str, subprocess.Popen] = {}
        self.record: dict[str, dict] = {}

    def start(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        p = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.state_dir,
            env=env,
            start_new_session=True,  # own process group: killpg reaches all children
            preexec_fn=_set_pdeathsig if self.die_with_parent else None,
            pass_fds=pass_fds,
        )
        log.close()
        self.popen[name] = p
        _POPENS[p.pid] = p
        self.record[name] = {"pid": p.pid, "start": _proc_starttime(p.pid), "cmd": cmd[0]}
        self.save()
        return p

    def save(self) -> None:
        (self.state_dir / "pids.json").write_text(json.dumps(self.record, indent=1))

    def check_alive(self, name: str) -> None:
        p = self.popen[name]
        if p.poll() is not None:
            raise ClusterError(
                f"{name} exited with status {p.returncode}; last log lines:\n"
                + tail(self.logs / f"{name}.log")
            )


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait(
    what: str,
    cond: Callable[[], bool],
    timeout: float,
    procs: _Procs | None = None,
    name: str | None = None,
    interval: float = 0.25,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if procs is not None and name is not None:
            procs.check_alive(name)
        try:
            if cond():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            extra = ""
            if procs is not None and name is not None:
                extra = f"\nlast log lines of {name}:\n{tail(procs.logs / f'{name}.log')}"
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def stop_cluster(
    state_dir: Path | str, timeout: float = 15, progress: Progress | None = None
) -> None:
    """Stop every process of the cluster in state_dir; raise if any survives."""
    progress = progress or _print
    state_dir = Path(state_dir)
    pid_file = state_dir / "pids.json"
    if not pid_file.exists():
        return
    record: dict[str, dict] = json.loads(pid_file.read_text())
    groups: list[tuple[str, int]] = []
    for name in reversed(
        [n for n in COMPONENT_ORDER if n in record]
        + [n for n in record if n not in COMPONENT_ORDER]
    ):
        pid = record[name]["pid"]
        # guard against pid reuse: the leader must be the process we started,
        # or already gone (its group may still have members)
        start = _proc_starttime(pid)
        if start is not None and record[name].get("start") not in (None, start):
            continue
        groups.append((name, pid))
    for _name, pgid in groups:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap()
        if not any(_group_members(pgid) for _, pgid in groups):
            break
        time.sleep(0.1)
    leftovers = {name: _group_members(pgid) for name, pgid in groups}
    leftovers = {k: v for k, v in leftovers.items() if v}
    if leftovers:
        progress(f"killing unresponsive components: {', '.join(leftovers)}")
        for name, pgid in groups:
            if name in leftovers:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.5)
        _reap()
        leftovers = {name: _group_members(pgid) for name, pgid in groups}
        leftovers = {k: v for k, v in leftovers.items() if v}
    pid_file.rename(state_dir / "pids.stopped.json")
    if leftovers:
        raise ClusterError(f"processes survived teardown: {leftovers}")
    progress(f"cluster in {state_dir} stopped")


def stop_components(
    state_dir: Path | str, names: list[str], timeout: float = 15
) -> dict[str, list[int]]:
    """Stop some components (SIGTERM, then SIGKILL after ``timeout``); what survived.

    They stay in pids.json (a later ``stop_cluster`` finds their groups empty)."""
    pid_file = Path(state_dir) / "pids.json"
    if not pid_file.exists():
        return {}
    record: dict[str, dict] = json.loads(pid_file.read_text())
    groups = []
    for name in names:
        if name not in record:
            continue
        pid = record[name]["pid"]
        start = _proc_starttime(pid)
        if start is not None and record[name].get("start") not in (None, start):
            continue
        groups.append((name, pid))
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        for _name, pgid in groups:
            if _group_members(pgid):
                try:
                    os.killpg(pgid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_group_members(g) for _, g in groups):
            _reap()
            time.sleep(0.1)
        _reap()
    return {n: m for n, g in groups if (m := _group_members(g))}


_POPENS: dict[int, subprocess.Popen] = {}


def _reap() -> None:
    """Reap exited component processes started by this Python process."""
    for pid, p in list(_POPENS.items()):
        if p.poll() is not None:
            del _POPENS[pid]


def cluster_pids(state_dir: Path | str) -> list[int]:
    """Live pids belonging to the cluster's process groups (for tests)."""
    state_dir = Path(state_dir)
    for fname in ("pids.json", "pids.stopped.json"):
        f = state_dir / fname
        if f.exists():
            record = json.loads(f.read_text())
            out: list[int] = []
            for r in record.values():
                out += _group_members(r["pid"])
            return out
    return []
