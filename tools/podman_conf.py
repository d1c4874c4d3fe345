"""Podman's host settings for labfleet's image builds, written only when missing
or different (tools/bootstrap.sh runs it as root; idempotent).

These machines (a VM without systemd as PID 1, cgroup v1/hybrid, rlimits that
cannot be raised) need in ``/etc/containers/containers.conf``:

- ``cgroup_manager = "cgroupfs"`` and ``events_logger = "file"`` (no systemd);
- ``default_ulimits``: podman otherwise asks for limits the VM refuses;
- ``runtime = "runc"``: crun refuses the hybrid cgroup layout ("cgroups in
  hybrid mode not supported").

Other keys of an existing file are kept: a key is replaced in its table, a
missing key or table is added. ``python3 tools/podman_conf.py [PATH]``;
prints what it did. Standard library only (runs before the virtualenv exists).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PATH = "/etc/containers/containers.conf"

SETTINGS: dict[str, dict[str, object]] = {
    "containers": {"default_ulimits": ["nofile=20000:20000", "nproc=32768:32768"]},
    "engine": {"cgroup_manager": "cgroupfs", "events_logger": "file", "runtime": "runc"},
}


def toml_value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def differences(text: str) -> dict[str, dict[str, object]]:
    """The settings whose values the file lacks or has otherwise."""
    current = tomllib.loads(text) if text.strip() else {}
    out: dict[str, dict[str, object]] = {}
    for table, keys in SETTINGS.items():
        have = current.get(table, {})
        for key, value in keys.items():
            if have.get(key) != value:
                out.setdefault(table, {})[key] = value
    return out


def merged(text: str, wanted: dict[str, dict[str, object]]) -> str:
    """``text`` with the ``wanted`` keys set: replaced in place, or added to their table."""
    lines = text.splitlines()
    for table, keys in wanted.items():
        header = next((i for i, line in enumerate(lines) if line.strip() == f"[{table}]"), None)
        if header is None:
            if lines and lines[-1].strip():
                lines.append("")
            lines.append(f"[{table}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
            continue
        end = next(
            (i for i in range(header + 1, len(lines)) if lines[i].lstrip().startswith("[")
             and not re.match(r"\s*\w+\s*=", lines[i])),
            len(lines),
        )  # fmt: skip
        for key, value in keys.items():
            setting = f"{key} = {toml_value(value)}"
            pattern = re.compile(rf"\s*{re.escape(key)}\s*=")
            at = next((i for i in range(header + 1, end) if pattern.match(lines[i])), None)
            if at is None:
                lines.insert(header + 1, setting)
                end += 1
            else:
                # a multi-line array ends at its closing bracket
                stop = at
                if "[" in lines[at] and "]" not in lines[at]:
                    while stop + 1 < end and "]" not in lines[stop]:
                        stop += 1
                lines[at : stop + 1] = [setting]
                end -= stop - at
    return "\n".join(lines) + "\n"


def ensure(path: str | Path = PATH) -> str:
    """Bring ``path`` to :data:`SETTINGS`; returns "unchanged", "written" or "updated"."""
    target = Path(path)
    text = target.read_text() if target.exists() else ""
    wanted = differences(text)
    if not wanted:
        return "unchanged"
    if not text.strip():
        text = "# labfleet (tools/podman_conf.py): podman on VMs without systemd\n"
    new = merged(text, wanted)
    assert not differences(new), "merge left differences"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".labfleet-partial")
    partial.write_text(new)
    partial.chmod(0o644)
    existed = target.exists()
    partial.replace(target)
    return "updated" if existed else "written"


if __name__ == "__main__":
    where = sys.argv[1] if len(sys.argv) > 1 else PATH
    print(f"{where}: {ensure(where)}")
