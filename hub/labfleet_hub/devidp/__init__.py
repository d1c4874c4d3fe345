"""Launcher for labfleet's development identity provider (DEVELOPMENT ONLY).

The identity provider itself is ``server.mjs`` next to this file: a real
OpenID Connect provider built on the npm package ``oidc-provider``, shaped like
INDIGO IAM (``/authorize``, ``/token``, ``/userinfo``, ``/jwk``, ``/revoke``,
``/introspect``, ``/logout``; claims ``groups`` and ``wlcg.groups``). Its npm
dependencies are installed with ``npm ci`` into a cache directory outside the
source tree (``$LABFLEET_CACHE`` or ``~/.cache/labfleet``), keyed by a hash of
``package.json`` and ``package-lock.json``; the server script is copied there
too because ES modules resolve ``import`` relative to the importing file
(``NODE_PATH`` is ignored for ESM).

Nothing here does I/O at import time.

Example::

    from labfleet_hub import devidp
    idp = devidp.start(
        port=9080,
        accounts_path="config/accounts.yaml",
        clients=[{"client_id": "hub", "client_secret": "s3cret",
                  "redirect_uris": ["http://127.0.0.1:8000/hub/oauth_callback"]}],
    )
    try:
        ...  # idp.issuer, idp.discovery_url
    finally:
        idp.stop()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from labfleet_hub.procs import die_with_parent, port_in_use

__all__ = [
    "BANNER",
    "DevIdP",
    "DevIdPError",
    "PACKAGE_DIR",
    "default_cache_dir",
    "ensure_installed",
    "free_port",
    "install_dir_name",
    "lock_hash",
    "log_tail",
    "normalize_clients",
    "server_command",
    "start",
]

PACKAGE_DIR = Path(__file__).resolve().parent
BANNER = "DEVELOPMENT IDENTITY PROVIDER — NOT FOR PRODUCTION"
_INSTALL_FILES = ("package.json", "package-lock.json")
_SERVER_FILE = "server.mjs"
_INSTALL_MARKER = ".labfleet-installed"


class DevIdPError(RuntimeError):
    """The development identity provider could not be installed or started."""


# ------------------------------------------------------------------ helpers --


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$LABFLEET_CACHE`` if set, else ``$XDG_CACHE_HOME/labfleet`` or ``~/.cache/labfleet``."""
    env = os.environ if env is None else env
    if env.get("LABFLEET_CACHE"):
        return Path(env["LABFLEET_CACHE"]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "labfleet"
    return Path.home() / ".cache" / "labfleet"


def lock_hash(source_dir: Path = PACKAGE_DIR) -> str:
    """A short hash of package.json + package-lock.json (what ``npm ci`` installs)."""
    h = hashlib.sha256()
    for name in _INSTALL_FILES:
        path = Path(source_dir) / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DevIdPError(f"{path} is missing: the devidp package is incomplete") from None
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16]


def install_dir_name(source_dir: Path = PACKAGE_DIR) -> str:
    return f"devidp-{lock_hash(source_dir)}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (loopback by default)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path | None, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' when it is missing)."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


_CLIENT_KEYS = {
    "client_id",
    "client_secret",
    "redirect_uris",
    "post_logout_redirect_uris",
    "token_endpoint_auth_method",
    "client_name",
}
_AUTH_METHODS = {"client_secret_basic", "client_secret_post", "none"}


def normalize_clients(clients: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate client registrations and return them as plain JSON-able dicts.

    Each client: ``client_id`` (str), ``redirect_uris`` (non-empty list of
    URLs, a single string is accepted), optional ``client_secret`` (a
    confidential client using HTTP basic auth at the token endpoint; without a
    secret the client is public and must use PKCE), optional
    ``token_endpoint_auth_method`` (``client_secret_basic``,
    ``client_secret_post`` or ``none``), ``post_logout_redirect_uris``,
    ``client_name``.
    """
    if isinstance(clients, Mapping):
        raise DevIdPError("clients must be a list of client registrations, not a single mapping")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, client in enumerate(clients):
        where = f"clients[{i}]"
        if not isinstance(client, Mapping):
            raise DevIdPError(f"{where}: expected a mapping, got {type(client).__name__}")
        unknown = set(client) - _CLIENT_KEYS
        if unknown:
            raise DevIdPError(
                f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_CLIENT_KEYS)}"
            )
        cid = client.get("client_id")
        if not isinstance(cid, str) or not cid:
            raise DevIdPError(f"{where}: client_id must be a non-empty string")
        if cid in seen:
            raise DevIdPError(f"{where}: duplicate client_id {cid!r}")
        seen.add(cid)
        uris = client.get("redirect_uris")
        if isinstance(uris, str):
            uris = [uris]
        if (
            not isinstance(uris, list | tuple)
            or not uris
            or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in uris)
        ):
            raise DevIdPError(
                f"{where} ({cid}): redirect_uris must be a non-empty list of http(s) URLs"
            )
        entry: dict[str, Any] = {"client_id": cid, "redirect_uris": list(uris)}
        secret = client.get("client_secret")
        if secret is not None:
            if not isinstance(secret, str) or not secret:
                raise DevIdPError(f"{where} ({cid}): client_secret must be a non-empty string")
            entry["client_secret"] = secret
        method = client.get("token_endpoint_auth_method")
        if method is not None:
            if method not in _AUTH_METHODS:
                raise DevIdPError(
                    f"{where} ({cid}): token_endpoint_auth_method {method!r} is not one of "
                    f"{sorted(_AUTH_METHODS)}"
                )
            if method != "none" and secret is None:
                raise DevIdPError(f"{where} ({cid}): {method} needs a client_secret")
            entry["token_endpoint_auth_method"] = method
        for key in ("post_logout_redirect_uris",):
            if key in client:
                entry[key] = list(client[key])
        if "client_name" in client:
            entry["client_name"] = str(client["client_name"])
        out.append(entry)
    return out


def server_command(
    install_dir: Path,
    *,
    node: str,
    host: str,
    port: int,
    issuer: str,
    accounts_path: Path,
    clients_path: Path | None,
    state_dir: Path | None = None,
    access_token_ttl: int | None = None,
    refresh_token_ttl: int | None = None,
    server_file: str = _SERVER_FILE,
    withhold_groups: Iterable[str] = (),
) -> list[str]:
    """The command line that runs the server from ``install_dir``."""
    cmd = [
        node,
        str(Path(install_dir) / server_file),
        "--host",
        host,
        "--port",
        str(port),
        "--issuer",
        issuer,
        "--accounts",
        str(accounts_path),
    ]
    if clients_path is not None:
        cmd += ["--clients", str(clients_path)]
    if state_dir is not None:
        cmd += ["--state-dir", str(state_dir)]
    if access_token_ttl is not None:
        cmd += ["--access-token-ttl", str(int(access_token_ttl))]
    if refresh_token_ttl is not None:
        cmd += ["--refresh-token-ttl", str(int(refresh_token_ttl))]
    withheld = ",".join(withhold_groups)
    if withheld:
        cmd += ["--withhold-groups", withheld]
    return cmd


def _which(name: str, override_env: str) -> str:
    found = os.environ.get(override_env) or shutil.which(name)
    if not found:
        raise DevIdPError(
            f"{name!r} was not found on PATH; the development identity provider needs "
            f"Node.js >= 20 and npm (install them, or set {override_env} to the {name} binary)"
        )
    return found


def _progress(message: str) -> None:
    print(f"[labfleet devidp] {message}", file=sys.stderr, flush=True)


def _copy_if_changed(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    with contextlib.suppress(OSError):
        if dst.read_bytes() == data:
            return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dst)


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_installed(
    cache_dir: Path | str | None = None,
    *,
    npm: str | None = None,
    source_dir: Path = PACKAGE_DIR,
    progress: Callable[[str], None] = _progress,
    timeout: float = 600,
) -> Path:
    """Install the IdP's npm dependencies once; return the directory to run it from.

    The directory is ``<cache_dir>/devidp-<hash of package.json + lock>/`` and
    holds ``node_modules`` plus a copy of the server script(s). ``npm ci`` runs
    only when that directory is not complete yet; concurrent callers wait on a
    file lock. Raises :class:`DevIdPError` when npm is missing or fails.
    """
    source_dir = Path(source_dir)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / install_dir_name(source_dir)
    scripts = sorted(p for p in source_dir.glob("*.mjs"))
    if not scripts:
        raise DevIdPError(f"no server script (*.mjs) in {source_dir}")

    if not (target / _INSTALL_MARKER).exists():
        with _file_lock(cache / f".{target.name}.lock"):
            if not (target / _INSTALL_MARKER).exists():
                _npm_ci(source_dir, target, npm=npm, progress=progress, timeout=timeout)
    for script in scripts:
        _copy_if_changed(script, target / script.name)
    return target


def _npm_ci(
    source_dir: Path,
    target: Path,
    *,
    npm: str | None,
    progress: Callable[[str], None],
    timeout: float,
) -> None:
    npm = npm or _which("npm", "LABFLEET_NPM")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)
    try:
        for name in _INSTALL_FILES:
            shutil.copy2(source_dir / name, staging / name)
        progress(
            f"installing the development identity provider's npm packages into {target} "
            "(npm ci, once; this can take a minute)..."
        )
        started = time.monotonic()
        try:
            proc = subprocess.run(
                [npm, "ci", "--omit=dev", "--no-audit", "--no-fund", "--prefix", str(staging)],
                cwd=staging,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise DevIdPError(f"npm ci did not finish within {timeout:.0f}s") from exc
        except OSError as exc:
            raise DevIdPError(f"cannot run npm ({npm}): {exc}") from exc
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-30:])
            raise DevIdPError(f"npm ci failed with exit code {proc.returncode}:\n{tail}")
        (staging / _INSTALL_MARKER).write_text(lock_hash(source_dir) + "\n")
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(staging, target)
        progress(f"npm packages installed in {time.monotonic() - started:.1f}s")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------- server --


@dataclass
class DevIdP:
    """A running development identity provider (see :func:`start`)."""

    issuer: str
    host: str
    port: int
    process: subprocess.Popen
    log_path: Path
    accounts_path: Path
    _cleanup: list[Path] = field(default_factory=list, repr=False)
    _log_file: TextIO | None = field(default=None, repr=False)

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def local_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def running(self) -> bool:
        return self.process.poll() is None

    def reload_accounts(self) -> None:
        """Ask the server to re-read the accounts file now (it also does so on change)."""
        if self.running():
            self.process.send_signal(signal.SIGHUP)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout: float = 5) -> None:
        """Stop the server (its whole process group) and remove temporary files."""
        try:
            if self.process.poll() is None:
                _signal_group(self.process, signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(self.process, signal.SIGKILL)
                    self.process.wait(timeout=timeout)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            for path in self._cleanup:
                with contextlib.suppress(OSError):
                    path.unlink()
            self._cleanup.clear()

    def __enter__(self) -> DevIdP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _write_clients_file(clients: list[dict[str, Any]], directory: Path | None) -> Path:
    fd, name = tempfile.mkstemp(prefix="devidp-clients-", suffix=".json", dir=directory)
    with os.fdopen(fd, "w") as fh:  # mkstemp creates it 0600: it holds client secrets
        json.dump(clients, fh)
    return Path(name)


def start(
    port: int | None = None,
    issuer: str | None = None,
    accounts_path: Path | str = "config/accounts.yaml",
    clients: Iterable[Mapping[str, Any]] | Path | str = (),
    log_path: Path | str | None = None,
    *,
    host: str = "127.0.0.1",
    state_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    access_token_ttl: int | None = None,
    refresh_token_ttl: int | None = None,
    node: str | None = None,
    timeout: float = 60,
    withhold_groups: Iterable[str] = (),
) -> DevIdP:
    """Start the development IdP and wait until its discovery document answers.

    ``port`` None picks a free port. ``issuer`` defaults to
    ``http://<host>:<port>``. ``clients`` is a list of registrations (see
    :func:`normalize_clients`) or the path of a JSON file holding such a list.
    Output goes to ``log_path`` (a temporary file when None; see
    ``DevIdP.log_path``). ``state_dir`` keeps signing keys, sessions and
    refresh tokens across restarts; without it they live in memory.
    ``withhold_groups``: IAM groups no account gets, whatever the accounts file says
    (``labfleet up`` withholds the hub's admin groups unless ``devidp.demo_admin``).

    Raises :class:`DevIdPError` (with the log tail) when node/npm is missing,
    the configuration is rejected, or the server does not come up in time.
    """
    if port is None:
        port = free_port(host)
    elif port_in_use(host, port):
        raise DevIdPError(
            f"port {port} on {host} is already in use (a previous identity provider still "
            "stopping, or another program); stop it or choose another devidp.port"
        )
    url_host = f"[{host}]" if ":" in host else host
    issuer = (issuer or f"http://{url_host}:{port}").rstrip("/")
    accounts_path = Path(accounts_path).resolve()
    if not accounts_path.is_file():
        raise DevIdPError(f"accounts file {accounts_path} does not exist")
    node = node or _which("node", "LABFLEET_NODE")
    install_dir = ensure_installed(cache_dir)

    cleanup: list[Path] = []
    if isinstance(clients, str | Path):
        clients_path = Path(clients).resolve()
        if not clients_path.is_file():
            raise DevIdPError(f"clients file {clients_path} does not exist")
    else:
        clients_path = _write_clients_file(normalize_clients(clients), None)
        cleanup.append(clients_path)

    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="devidp-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    cmd = server_command(
        install_dir,
        node=node,
        host=host,
        port=port,
        issuer=issuer,
        accounts_path=accounts_path,
        clients_path=clients_path,
        state_dir=Path(state_dir).resolve() if state_dir is not None else None,
        access_token_ttl=access_token_ttl,
        refresh_token_ttl=refresh_token_ttl,
        withhold_groups=withhold_groups,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVIDP_")}
    env.setdefault("NODE_ENV", "development")
    log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by DevIdP.stop
    # A start that stalls (alive, never listening; seen once in ~200 starts, with
    # the event loop blocked before the banner) is killed and tried once more:
    # each attempt gets half of ``timeout``, a normal start takes well under 1 s.
    for attempt in (1, 2):
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=install_dir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        except OSError as exc:
            log_file.close()
            for p in cleanup:
                p.unlink(missing_ok=True)
            raise DevIdPError(f"cannot run node ({node}): {exc}") from exc

        idp = DevIdP(
            issuer=issuer,
            host=host,
            port=port,
            process=proc,
            log_path=log_path,
            accounts_path=accounts_path,
            _cleanup=cleanup,
            _log_file=log_file,
        )
        try:
            _wait_ready(idp, timeout / 2)
            return idp
        except StartupStalled:
            if attempt == 2:
                idp.stop()
                raise
            # SIGKILL: a blocked event loop never runs the SIGTERM handler
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            log_file.write(f"[launcher] no answer in {timeout / 2:.0f}s; killed, starting again\n")
            log_file.flush()
        except BaseException:
            idp.stop()
            raise
    raise AssertionError("unreachable")


class StartupStalled(DevIdPError):
    """The server is running but did not answer in time."""


def _wait_ready(idp: DevIdP, timeout: float) -> None:
    url = f"{idp.local_url}/.well-known/openid-configuration"
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while True:
        code = idp.process.poll()
        if code is not None:
            raise DevIdPError(
                f"the development identity provider exited with code {code} during startup; "
                f"log {idp.log_path}:\n{idp.log_tail()}"
            )
        try:
            # no proxies: the IdP is on loopback and nothing else may be contacted
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(url, timeout=2) as resp:
                doc = json.load(resp)
            if doc.get("issuer") == idp.issuer:
                return
            last_error = f"discovery names issuer {doc.get('issuer')!r}, expected {idp.issuer!r}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last_error = str(exc)
        if time.monotonic() > deadline:
            raise StartupStalled(
                f"the development identity provider did not answer {url} within {timeout:.0f}s "
                f"({last_error}); log {idp.log_path}:\n{idp.log_tail()}"
            )
        time.sleep(0.1)
