"""JupyterLab terminals with the notebook's environment.

jupyter-server starts terminals as login shells when it has no terminal of its
own (as under a spawner), and a login shell's ``/etc/profile`` replaces PATH:
``labfleet-batch`` and the notebook's Python are then not found. The default
terminal command here is an interactive bash that reads ``terminal_profile.sh``
instead, which reads the same profiles but keeps the notebook's PATH first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PROFILE = Path(__file__).resolve().parent / "terminal_profile.sh"


def shell_command(bash: str | None = None) -> list[str]:
    """The terminal command, or ``[]`` (jupyter-server's default) without bash."""
    bash = bash or shutil.which("bash") or ""
    if not bash:
        return []
    return [bash, "--init-file", str(PROFILE), "-i"]


def server_arg(command: list[str]) -> str:
    """The single-user server option that makes terminals run ``command``."""
    return f"--ServerApp.terminado_settings=shell_command={json.dumps(command)}"


def server_config(command: list[str]) -> dict:
    """The same as :func:`server_arg`, as a jupyter-server configuration file's content
    (for images, whose servers start from the image's command with no arguments)."""
    return {"ServerApp": {"terminado_settings": {"shell_command": list(command)}}}


#: jupyter-server reads this name in every Jupyter configuration folder (the ``.d``
#: folders beside it only enable extensions).
CONFIG_FILE = "jupyter_server_config.json"


def write_server_config(config_dir: str | Path, bash: str | None = None) -> Path | None:
    """Merge :func:`server_config` into ``config_dir``'s :data:`CONFIG_FILE` (e.g. a notebook
    image's ``<prefix>/etc/jupyter``), keeping what else is there; None without bash."""
    command = shell_command(bash)
    if not command:
        return None
    path = Path(config_dir) / CONFIG_FILE
    data = json.loads(path.read_text()) if path.exists() else {}
    server = data.setdefault("ServerApp", {})
    server["terminado_settings"] = {
        **server.get("terminado_settings", {}),
        **server_config(command)["ServerApp"]["terminado_settings"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m labfleet_spawner.terminal DIR``: what the notebook images run at build
    time, so their JupyterLab terminals keep the image's PATH (Kubernetes mode)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m labfleet_spawner.terminal CONFIG_DIR", file=sys.stderr)
        return 2
    path = write_server_config(args[0])
    if path is None:
        print("labfleet: no bash: terminals keep jupyter-server's default", file=sys.stderr)
        return 0
    print(f"labfleet: terminals start {shell_command()} ({path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
