"""The Node.js pieces labfleet runs: configurable-http-proxy and the development
identity provider, installed from npm into the cache (``$LABFLEET_CACHE`` or
``~/.cache/labfleet``), never into the repository.

``labfleet setup`` (run by ``tools/bootstrap.sh``) installs both before anything
else needs them, so no test and no command depends on another having installed
them first. ``labfleet up`` and the test harnesses call the same functions and
get the cached copies.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from . import devidp

CHP_VERSION = "5.3.0"


class NodePiecesError(RuntimeError):
    """npm is missing or failed."""


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def proxy_path(cache: Path | None = None) -> Path:
    """Where configurable-http-proxy lives once installed (it may not exist yet)."""
    cache = cache or devidp.default_cache_dir()
    prefix = cache / f"configurable-http-proxy-{CHP_VERSION}"
    return prefix / "node_modules" / ".bin" / "configurable-http-proxy"


def ensure_proxy(
    cache: Path | None = None,
    *,
    npm: str | None = None,
    progress: Callable[[str], None] = _say,
) -> str:
    """Path of configurable-http-proxy, installed once from npm into the cache.

    The install goes into a staging folder renamed into place, so an
    interrupted install is never mistaken for a finished one.
    """
    binary = proxy_path(cache)
    if binary.exists():
        return str(binary)
    npm = npm or shutil.which("npm")
    if not npm:
        raise NodePiecesError("npm is not installed; the proxy needs Node.js and npm")
    prefix = binary.parent.parent.parent
    prefix.parent.mkdir(parents=True, exist_ok=True)
    staging = prefix.with_name(prefix.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    progress(f"installing configurable-http-proxy {CHP_VERSION} into {prefix} (once)")
    proc = subprocess.run(
        [
            npm,
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(staging),
            f"configurable-http-proxy@{CHP_VERSION}",
        ],  # fmt: skip
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        raise NodePiecesError(f"npm install configurable-http-proxy failed:\n{tail}")
    shutil.rmtree(prefix, ignore_errors=True)
    staging.rename(prefix)
    return str(binary)


def install_all(progress: Callable[[str], None] = _say) -> dict[str, str]:
    """Install every Node.js piece; returns what is where (for ``labfleet setup``)."""
    try:
        proxy = ensure_proxy(progress=progress)
        idp = devidp.ensure_installed(progress=progress)
    except devidp.DevIdPError as e:
        raise NodePiecesError(str(e)) from e
    return {"configurable-http-proxy": proxy, "development identity provider": str(idp)}
