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
