"""The local spawner of single-node mode: catalogue profiles, real GPUs, no system users.

:class:`LocalGPUSpawner` is JupyterHub's ``LocalProcessSpawner`` plus:

- the catalogue form and server-side check of :class:`CatalogueSpawnerMixin`;
- exclusive accelerators: the devices of the chosen profile are taken from
  one allocator per hub process (GPUs and MIG instances found through NVML,
  FPGA boards from configuration) *before* any process starts, and given back
  when the server stops or fails to start. A request that cannot be met is
  refused with HTTP 503 and a sentence the user can act on; nothing is held.
  With ``device_claims_path`` the claims are shared with the local batch
  service, so a notebook and a batch job never get the same device;
- ``CUDA_VISIBLE_DEVICES`` set to the allocated GPU/MIG UUIDs ("" for CPU
  profiles). This is cooperative, not enforced: a local process can still
  open any ``/dev/nvidia*``. Use the Kubernetes spawner where users must not
  be able to reach each other's GPUs;
- storage under ``storage_root`` (see :mod:`labfleet_spawner.storage`) and
  the server running as a uid/gid mapped from the hub database (no
  ``/etc/passwd`` entries needed), with the user's hub groups as supplementary
  groups. That needs a root hub; without one spawns are refused unless
  ``isolate_users`` is False (see :mod:`labfleet_spawner.isolation`);
- an environment scrubbed of secrets other than the server's own API token.

CPU and memory of the chosen size are advisory here: they are published
through JupyterHub's ``cpu_limit``/``mem_limit`` (``CPU_LIMIT``/``MEM_LIMIT``,
which jupyter-resource-usage displays), not enforced.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import ClassVar

from jupyterhub.spawner import LocalProcessSpawner
from labfleet_accounting.spool import STATE_START as STATE_ACCOUNTING_START
from labfleet_accounting.spool import SpoolHook
from labfleet_hub.posix_registry import posix_ids
from tornado import web
from traitlets import Any, Bool, Dict, Enum, Float, Instance, Integer, List, Unicode, default

from . import accounts, safefs, terminal
from .base import CatalogueSpawnerMixin
from .devices import (
    DeviceAllocator,
    DeviceClaimsError,
    FpgaDevice,
    NoFreeDevice,
    cuda_visible_devices,
)
from .isolation import IsolationRefused, decide
from .lab_settings import LabSettingsMixin
from .nvml import discover
from .secretenv import DEFAULT_SECRET_PATTERN, SERVER_TOKENS
from .storage import (
    DEFAULT_GID_BASE,
    DEFAULT_UID_BASE,
    StorageError,
    StorageLayout,
    apply_storage,
    check_group_name,
    check_id_ranges,
    mapped_gid,
    mapped_uid,
    plan_storage,
)

#: The notebook server's own credentials, which it needs to talk to the hub.
DEFAULT_SECRET_ALLOWED = SERVER_TOKENS

STATE_DEVICES = "labfleet_devices"
#: This hub's side in the device claims registry shared with the batch service.
CLAIMS_COMPONENT = "notebooks"


def filter_secret_env(
    env: Mapping[str, str],
    pattern: str = DEFAULT_SECRET_PATTERN,
    allowed: Iterable[str] = DEFAULT_SECRET_ALLOWED,
    secret_values: Iterable[str] = (),
) -> tuple[dict[str, str], list[str]]:
    """Drop variables named like secrets, or holding a known secret value.

    Returns ``(kept, dropped_names)``. ``secret_values`` catches a secret under
    an innocent name (e.g. the hub's OAuth client secret copied into ``FOO``).
    """
    name_re = re.compile(pattern, re.IGNORECASE) if pattern else None
    allowed = set(allowed)
    values = {v for v in secret_values if v}
    kept, dropped = {}, []
    for name, value in env.items():
        if name not in allowed and (
            (name_re is not None and name_re.search(name)) or value in values
        ):
            dropped.append(name)
        else:
            kept[name] = value
    return kept, sorted(dropped)


def _http_error(status: int, message: str, reason: str) -> web.HTTPError:
    # jupyterhub_message is what the spawn-progress page and the REST API show.
    error = web.HTTPError(status, "%s", message, reason=reason)
    error.jupyterhub_message = message
    return error


def _drop_privileges(uid: int, gid: int, groups: list[int], home: str | None):
    """A ``preexec_fn`` that becomes ``uid``/``gid``; any failure aborts the start."""

    def preexec():
        # Order matters: groups and gid can only be changed while still root.
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        if home:
            os.chdir(home)

    return preexec


def _chdir_only(home: str | None):
    def preexec():
        if home:
            os.chdir(home)

    return preexec


CERTS_DIR = (".jupyterhub", "jupyterhub-certs")


def install_certs(
    home: str | os.PathLike, paths: Mapping[str, str], owner: tuple[int, int] | None
) -> dict[str, str]:
    """Put a server's key, certificate and CA into ``~/.jupyterhub/jupyterhub-certs``.

    Runs as root in a folder the user can change at any moment, so nothing there is
    used by path: the home is opened (its parent is the platform's), then
    ``.jupyterhub`` and ``jupyterhub-certs`` from their parents' descriptors with
    ``O_NOFOLLOW`` (a link in their place is refused, an existing folder must be the
    home owner's, or, not isolated, the hub's); each file is written new with
    ``O_EXCL | O_NOFOLLOW`` after whatever had its name is unlinked, mode 0600,
    given to ``owner`` with ``fchown``.
    The hub's copies (its own files) are then removed, except the shared CA.
    """
    sources = {key: paths[key] for key in ("keyfile", "certfile", "cafile")}
    data = {}
    for key, source in sources.items():
        with open(source, "rb") as f:  # the hub's internal_certs_location: not the user's
            data[key] = f.read()
    with contextlib.ExitStack() as fds:
        fd = fds.enter_context(safefs.closing(safefs.open_dir(None, os.fspath(home), "your home")))
        home_owner = os.fstat(fd).st_uid
        if owner is not None and home_owner != owner[0]:
            raise safefs.UnsafePathError(errno.EPERM, f"{home} does not belong to uid {owner[0]}")
        # folders in it: the home owner's (or, not isolated, the hub's, which writes them)
        expect = {home_owner} if owner is not None else {home_owner, os.geteuid()}
        what = "~"
        for name in CERTS_DIR:
            what = f"{what}/{name}"
            mode = 0o700 if name == CERTS_DIR[-1] else None
            fd = fds.enter_context(
                safefs.closing(
                    safefs.ensure_dir(fd, name, mode, owner, what=what, expect_uid=expect)
                )
            )
        moved = {}
        for key, source in sources.items():
            name = os.path.basename(source)
            safefs.replace_file(fd, name, data[key], 0o600, owner)
            moved[key] = os.path.join(os.fspath(home), *CERTS_DIR, name)
    for key in ("keyfile", "certfile"):  # the CA is shared by every server
        os.unlink(sources[key])
    return moved


class LocalGPUSpawner(CatalogueSpawnerMixin, LabSettingsMixin, LocalProcessSpawner):
    """Single-node spawner: catalogue profiles, exclusive local GPUs, mapped uids."""

    # One allocator and one isolation probe per hub process, shared by every
    # spawner instance (each user's server has its own instance).
    _shared_allocator: ClassVar[DeviceAllocator | None] = None
    _isolation_probes: ClassVar[dict[tuple[str, int, int], bool]] = {}
    _isolation_probe_failures: ClassVar[dict[tuple[str, int, int], str]] = {}
    _logged_unisolated: ClassVar[bool] = False
    _warned_no_nss_wrapper: ClassVar[bool] = False

    storage_root = Unicode(
        "/srv/labfleet",
        config=True,
        help="""Root of the shared filesystem: home/<user>, groups/<group>, public, envs.

        Created on first spawn. Homes are 0700, group directories 2770 (setgid),
        public 1777, envs 0755 (read-only for users).
        """,
    )

    uid_base = Integer(
        DEFAULT_UID_BASE,
        config=True,
        help="""A user's notebook runs as uid ``uid_base + <hub user id>``, with a private
        group of the same number. Choose a range no local account uses.
        """,
    )

    gid_base = Integer(
        DEFAULT_GID_BASE,
        config=True,
        help="""A hub group's directory belongs to gid ``gid_base + <hub group id>``.

        Must not overlap the user range (uid_base + user ids); spawns are refused
        with a message saying which base to raise if it does.
        """,
    )

    isolate_users = Enum(
        ("auto", True, False),
        default_value="auto",
        config=True,
        help="""Run each notebook as its mapped uid/gid instead of as the hub's user.

        "auto" and True: always; when that is impossible (the hub is not root, or an
        unprivileged uid cannot run this Python, checked once per process) the spawn
        is refused with HTTP 500 and a message saying why, and nothing runs as the
        hub's user instead (see :mod:`labfleet_spawner.isolation`). False: never, for a
        single-user installation: notebooks run as the hub's user; a root hub then
        also needs ``allow_root_notebooks`` (notebooks run as root, ``--allow-root``).
        """,
    )

    allow_root_notebooks = Bool(
        False,
        config=True,
        help="""With ``isolate_users`` False and a hub running as root: accept that
        notebooks run as root (jupyter-server's ``--allow-root``). Without it such a
        spawn is refused. Only for a one-person machine.""",
    )

    isolation_probe_timeout = Float(
        30,
        config=True,
        help="Seconds to wait for the check that an unprivileged uid can run Python.",
    )

    fpga_devices = Dict(
        value_trait=List(Unicode()),
        key_trait=Unicode(),
        config=True,
        help="""FPGA boards per catalogue accelerator name; NVML does not see FPGAs.

        For example ``{"u55c": ["/dev/xclmgmt4352"]}``. Each path is one exclusive
        board; the allocated paths reach the notebook as LABFLEET_FPGA_DEVICES.
        Read when the process-wide allocator is created (first spawn).
        """,
    )

    device_claims_path = Unicode(
        "",
        config=True,
        help="""A file through which the hub and the local batch service share their claims
        on this machine's accelerators, so that a notebook and a batch job never get the
        same device. Give the batch service the same path (BatchService.device_claims_path);
        keep it in the hub's state directory (``labfleet up`` uses
        ``<state_dir>/device-claims.json``). Created on first use, with ``<path>.lock``
        beside it.

        Empty: claims live in the hub's memory only, and a batch service on this
        machine must be given other devices. Read when the process-wide allocator is
        created (first use).
        """,
    )

    accounts_dir = Unicode(
        "",
        config=True,
        help="""A folder, owned by the hub's user and writable by no one else, where the
        platform keeps account entries (``passwd``, ``group``) for the mapped uids, so that
        notebooks and terminals see user and group names (``whoami``, the prompt,
        ``ls -l``, ``ssh``, ``git``) without entries in ``/etc/passwd``. Give the batch
        service the same folder (BatchService.accounts_dir); ``labfleet up`` uses
        ``<state_dir>/accounts``. Needs ``nss_wrapper_library``. Empty: no names.
        """,
    )

    nss_wrapper_library = Unicode(
        config=True,
        help="""Path of nss_wrapper's ``libnss_wrapper.so`` (Debian package
        ``libnss-wrapper``), preloaded into isolated notebooks to resolve the names kept
        in ``accounts_dir``. Default: found in the usual library folders; empty when it
        is not installed (then notebooks have numbers, not names, and the hub says so
        once in its log).
        """,
    )

    @default("nss_wrapper_library")
    def _default_nss_wrapper_library(self):
        return accounts.find_nss_wrapper() or ""

    terminal_shell = List(
        Unicode(),
        config=True,
        help="""The command JupyterLab terminals run. Default: bash reading the system and
        personal profiles as a login shell does, but keeping the notebook's environment
        first on PATH (a login shell's /etc/profile would put the system's PATH back, so
        ``labfleet-batch`` and the notebook's Python would not be found). Empty list:
        jupyter-server's own choice (a login shell).
        """,
    )

    @default("terminal_shell")
    def _default_terminal_shell(self):
        return terminal.shell_command()

    nvml_module = Any(
        None,
        allow_none=True,
        config=True,
        help="The pynvml module to discover GPUs with (None: import pynvml); tests pass a fake.",
    )

    device_allocator = Instance(
        DeviceAllocator,
        allow_none=True,
        config=True,
        help="""An allocator to use instead of the process-wide one built from NVML discovery.

        The same object is shared by every spawner given it (tests, embedding).
        """,
    )

    env_secret_pattern = Unicode(
        DEFAULT_SECRET_PATTERN,
        config=True,
        help="""Regular expression (case-insensitive, matched anywhere in the name) of
        environment variables never passed to a notebook, whatever their source.
        """,
    )

    env_secret_allowed = List(
        Unicode(),
        list(DEFAULT_SECRET_ALLOWED),
        config=True,
        help="Variable names exempt from env_secret_pattern: the server's own hub API token.",
    )

    accounting_hook = Instance(
        SpoolHook,
        allow_none=True,
        config=True,
        help="""Record server starts and stops for accounting (None: not recorded).

        A ``labfleet_accounting.spool.SpoolHook``: it appends to a spool file that
        the accounting service ingests, and never raises into the hub.
        """,
    )

    devices = List(help="Devices held by this server (GPU, MIG or FPGA); not configuration.")

    storage = Instance(StorageLayout, allow_none=True, help="This server's storage layout.")

    isolated = Any(None, allow_none=True, help="Whether this server runs as its mapped uid.")

    # -- the allocator --------------------------------------------------------

    @classmethod
    def use_allocator(cls, allocator: DeviceAllocator | None) -> None:
        """Replace (or, with None, forget) the process-wide allocator."""
        LocalGPUSpawner._shared_allocator = allocator

    @property
    def allocator(self) -> DeviceAllocator:
        if self.device_allocator is not None:
            return self.device_allocator
        if LocalGPUSpawner._shared_allocator is None:
            discovery = discover(self.nvml_module, logger=self.log)
            allocator = DeviceAllocator.from_discovery(
                discovery,
                self.fpga_devices,
                claims_path=self.device_claims_path or None,
                component=CLAIMS_COMPONENT,
            )
            self.log.info(
                "Local accelerators: %s%s",
                ", ".join(f"{d.kind} {d.uuid} ({d.name})" for d in allocator.devices) or "none",
                f"; claims shared through {allocator.claims_path}" if allocator.claims_path else "",
            )
            LocalGPUSpawner._shared_allocator = allocator
            # At startup JupyterHub restores every running server (load_state, the
            # first use of the allocator) before its first await, so a callback runs
            # only once all of them are restored: then the claims an earlier hub left
            # for servers that are gone can go, without waiting for the first spawn.
            # Without a running loop (tools, tests) the first hand-out does it.
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon(self._reconcile_claims)
        return LocalGPUSpawner._shared_allocator

    @property
    def device_owner(self) -> str:
        return f"{self.user.name}/{self.name}"

    def availability(self) -> dict[str, tuple[int, int]]:
        """Free/total per catalogue accelerator (NVML is asked once per process).

        Devices the batch service holds count as taken (``device_claims_path``).
        """
        accelerators = self.catalogue.accelerators.values()
        self._reconcile_claims()
        try:
            return self.allocator.availability(accelerators)
        except DeviceClaimsError as e:
            # The form still works for CPU profiles; a start would be refused anyway.
            self.log.error("Spawn form shows no accelerator free: %s", e)
            return {a.name: (0, len(self.allocator.matching(a))) for a in accelerators}

    def _reconcile_claims(self) -> None:
        """Once per allocator: drop the shared claims an earlier hub left for gone servers.

        Only safe once every running server is restored (see ``allocator``);
        the batch service's claims are never touched.
        """
        allocator = self.allocator
        if allocator.reconciled:
            return
        try:
            stale = allocator.reconcile()
        except DeviceClaimsError as e:
            self.log.error("Cannot reconcile device claims: %s", e)  # tried again next time
            return
        for uuid, owner in stale:
            self.log.warning(
                "Dropped stale device claim: %s was held by %s, which this hub no longer runs",
                uuid,
                owner,
            )

    def _release_devices(self) -> None:
        try:
            released = self.allocator.release(self.device_owner)
        except DeviceClaimsError as e:
            # Stopping must go on; the claim stays until the registry is repaired.
            self.log.error("Cannot release devices of %s: %s", self._log_name, e)
            released = []
        if released:
            self.log.info("Released %s from %s", ", ".join(released), self._log_name)
        self.devices = []

    # -- state across hub restarts ----------------------------------------------

    def get_state(self):
        state = super().get_state()
        if self.devices:
            state[STATE_DEVICES] = [d.uuid for d in self.devices]
        # Kept across hub restarts so that the stop closes the interval the start opened.
        if getattr(self, STATE_ACCOUNTING_START, None) is not None:
            state[STATE_ACCOUNTING_START] = getattr(self, STATE_ACCOUNTING_START)
        return state

    def load_state(self, state):
        super().load_state(state)
        setattr(self, STATE_ACCOUNTING_START, state.get(STATE_ACCOUNTING_START))
        uuids = state.get(STATE_DEVICES) or []
        if uuids:
            try:
                restored, problems = self.allocator.restore(self.device_owner, uuids)
            except DeviceClaimsError as e:
                # Keep the record, so that a hub start after the repair claims them again.
                restored, problems = self.allocator.known_devices(uuids), [str(e)]
            self.devices = restored
            for problem in problems:
                self.log.warning("Restoring devices of %s: %s", self._log_name, problem)

    def clear_state(self):
        super().clear_state()
        # A server found dead (hub restart, crash) is cleared without stop(): record it here.
        self._record_stop()
        # Called before each new start, when the process is found dead and after
        # every stop: the devices go back and the next start decides afresh.
        self._release_devices()
        self.storage = None
        self.isolated = None

    # -- identity and storage -------------------------------------------------

    def _posix_ids(self) -> tuple[int, dict[str, int]]:
        """The user's number and those of its hub groups that can be directories
        (never reused: labfleet_hub.posix_registry)."""
        user_number, numbers = posix_ids(self.user)
        groups = {}
        for name, number in numbers.items():
            try:
                groups[check_group_name(name)] = number
            except StorageError as e:
                self.log.warning("No group directory for %s: %s", self._log_name, e)
        return user_number, groups

    def plan_layout(self) -> StorageLayout:
        """This user's storage layout (raises StorageError on unusable names or ids)."""
        user_number, groups = self._posix_ids()
        check_id_ranges(self.uid_base, self.gid_base, user_number, groups.values())
        uid = mapped_uid(user_number, self.uid_base)
        return plan_storage(
            self.storage_root,
            self.user.name,
            uid=uid,
            gid=uid,  # a private group per user, numbered like the uid
            groups={name: mapped_gid(gid, self.gid_base) for name, gid in groups.items()},
        )

    async def _should_isolate(self) -> bool:
        """Isolate, or run as the hub's user only when ``isolate_users`` is False (and,
        for a root hub, ``allow_root_notebooks``); anything else is refused (HTTP 500)."""
        uid = os.geteuid()
        mode = {True: "yes", False: "no"}.get(self.isolate_users, "auto")
        can_isolate, why_not = True, ""
        if uid == 0 and mode != "no":
            can_isolate = await self._python_usable_unprivileged()
            key = (sys.executable, self.uid_base, self.gid_base)
            why_not = LocalGPUSpawner._isolation_probe_failures.get(key, "")
        try:
            isolate = decide(
                mode, uid=uid, can_isolate=can_isolate, why_not=why_not,
                allow_root=self.allow_root_notebooks, what="notebooks",
            )  # fmt: skip
        except IsolationRefused as e:
            self.log.error("Not starting the server of %s: %s", self._log_name, e)
            raise _http_error(500, str(e), reason="Cannot isolate users") from None
        if not isolate and not LocalGPUSpawner._logged_unisolated:
            LocalGPUSpawner._logged_unisolated = True
            self.log.warning(
                "isolate_users is False (a single-user installation): every notebook runs "
                "as the hub's own uid %d%s",
                uid,
                ", root, with --allow-root (allow_root_notebooks)" if uid == 0 else "",
            )
        return isolate

    async def _python_usable_unprivileged(self) -> bool:
        """Can a uid with no privileges run this Python? Checked once per process."""
        # uid_base itself is nobody's uid (hub ids start at 1): a safe probe identity.
        key = (sys.executable, self.uid_base, self.gid_base)
        cache = LocalGPUSpawner._isolation_probes
        if key not in cache:
            preexec = _drop_privileges(self.uid_base, self.gid_base, [], "/")
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    "import jupyterhub",
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    preexec_fn=preexec,
                )
                _, err = await asyncio.wait_for(proc.communicate(), self.isolation_probe_timeout)
                ok, detail = proc.returncode == 0, err.decode(errors="replace").strip()[-300:]
            except (OSError, subprocess.SubprocessError, TimeoutError) as e:
                ok, detail = False, str(e)
            cache[key] = ok
            if ok:
                self.log.info("Notebooks run as mapped uids (from %d)", self.uid_base + 1)
            else:
                why = f"uid {self.uid_base} cannot run {sys.executable} ({detail or 'no detail'})"
                LocalGPUSpawner._isolation_probe_failures[key] = why
                self.log.error(
                    "Notebooks cannot be isolated: %s. Every spawn is refused until this "
                    "Python is readable by every uid (or isolate_users is False on a "
                    "single-user installation).",
                    why,
                )
        return cache[key]

    async def _prepare(self) -> None:
        """Decide isolation and create the storage; idempotent within one start."""
        if self.isolated is None:
            self.isolated = await self._should_isolate()
        if self.storage is None:
            try:
                layout = self.plan_layout()
                apply_storage(layout, as_root=os.geteuid() == 0)
            except (StorageError, OSError) as e:
                self.log.error("Storage for %s: %s", self._log_name, e)
                raise _http_error(500, f"cannot prepare your storage: {e}", "Storage error") from e
            self.storage = layout
            if self.isolated:
                await asyncio.to_thread(self._register_account, layout)

    def _register_account(self, layout: StorageLayout) -> None:
        """Give the mapped uid a name (see :mod:`labfleet_spawner.accounts`)."""
        if not self.accounts_dir:
            return
        if not self.nss_wrapper_library:
            if not LocalGPUSpawner._warned_no_nss_wrapper:
                LocalGPUSpawner._warned_no_nss_wrapper = True
                self.log.warning(
                    "nss_wrapper is not installed (Debian: libnss-wrapper): notebooks run "
                    "under uids without names (the prompt says 'I have no name!')"
                )
            return
        try:
            accounts.AccountsRegistry(self.accounts_dir).register(
                accounts.Account.from_layout(layout)
            )
        except OSError as e:  # names are a comfort, not a reason to refuse the server
            self.log.error("Cannot record the account of %s: %s", self._log_name, e)

    def account_env(self) -> dict[str, str]:
        if self.isolated and self.accounts_dir and self.nss_wrapper_library:
            return accounts.nss_env(self.accounts_dir, self.nss_wrapper_library)
        return {}

    async def move_certs(self, paths):
        """Internal SSL: copy the certificates into the user's home, readable by the user.

        The home is the user's: nothing in it is used by path (see :func:`install_certs`).
        """
        await self._prepare()
        layout = self.storage
        owner = (layout.uid, layout.gid) if self.isolated else None
        try:
            return await asyncio.to_thread(install_certs, layout.home, paths, owner)
        except OSError as e:
            self.log.error("Certificates for %s: %s", self._log_name, e)
            raise _http_error(
                500, f"cannot put the server's certificates into your home: {e}", "Storage error"
            ) from e

    # -- process --------------------------------------------------------------

    def make_preexec_fn(self, name):
        home = str(self.storage.home) if self.storage else None
        if self.isolated and self.storage:
            layout = self.storage
            return _drop_privileges(layout.uid, layout.gid, layout.supplementary_gids, home)
        return _chdir_only(home)

    def user_env(self, env):
        # LocalProcessSpawner looks the user up with pwd; labfleet users have no passwd entry.
        env["USER"] = self.user.name
        if self.storage:
            env["HOME"] = str(self.storage.home)
        env["SHELL"] = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
        return env

    def get_args(self):
        args = list(super().get_args())
        # jupyter-server refuses to run as root without it; given only when the admin
        # accepted root notebooks (_should_isolate refuses the start otherwise)
        if (
            os.geteuid() == 0
            and not self.isolated
            and self.allow_root_notebooks
            and "--allow-root" not in args
        ):
            args.append("--allow-root")
        if self.terminal_shell:
            args.append(terminal.server_arg(self.terminal_shell))
        return args

    def secret_values(self) -> list[str]:
        """Known secret values that must not appear in a notebook under any name."""
        auth = self.authenticator
        return [str(v) for v in (getattr(auth, "client_secret", None),) if v]

    def get_env(self):
        env = super().get_env()
        if self.selection is not None:
            env.update(self.selection_env())
        if self.storage is not None:
            env.update(self.storage.env())
            if not self.notebook_dir:
                env["JUPYTERHUB_ROOT_DIR"] = str(self.storage.home)
        visible = cuda_visible_devices(self.devices)
        # "" hides every GPU from CUDA; "none" is the container toolkit's word for no GPU.
        env["CUDA_VISIBLE_DEVICES"] = visible
        env["NVIDIA_VISIBLE_DEVICES"] = visible or "none"
        fpgas = [d.uuid for d in self.devices if isinstance(d, FpgaDevice)]
        if fpgas:
            env["LABFLEET_FPGA_DEVICES"] = ",".join(fpgas)
        if self.cpu_limit:
            env["LABFLEET_CPU_LIMIT"] = str(self.cpu_limit)
        if self.mem_limit:
            env["LABFLEET_MEM_LIMIT"] = str(self.mem_limit)
        # the server's own environment first on PATH, so the terminal and `!labfleet-batch`
        # find the tools installed beside jupyterhub-singleuser (the hub's PATH may not)
        if self.cmd and os.path.isabs(self.cmd[0]):
            bindir = os.path.dirname(self.cmd[0])
            rest = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p != bindir]
            env["PATH"] = os.pathsep.join([bindir, *rest])
        env, dropped = filter_secret_env(
            env, self.env_secret_pattern, self.env_secret_allowed, self.secret_values()
        )
        if dropped:
            self.log.warning(
                "Not passing secret-looking variables to %s: %s", self._log_name, ", ".join(dropped)
            )
        # after the filter: NSS_WRAPPER_PASSWD names a file of names, not a password
        env.update(self.account_env())
        return env

    async def start(self):
        selection = self.selection or self.apply_selection(self.user_options)
        # Advisory locally; published as CPU_LIMIT/MEM_LIMIT by Spawner.get_env.
        self.cpu_limit = float(selection.size.cpu)
        self.mem_limit = selection.size.memory_bytes
        self.devices = []
        if selection.accelerator is not None:
            self._reconcile_claims()
            try:
                self.devices = self.allocator.allocate(
                    self.device_owner, selection.accelerator, selection.count
                )
            except NoFreeDevice as e:
                self.log.warning("Refused %s: %s", self._log_name, e)
                raise _http_error(503, str(e), reason="No free accelerator") from None
            self.log.info(
                "Allocated %s to %s", ", ".join(d.uuid for d in self.devices), self._log_name
            )
        try:
            await self._prepare()
            result = await super().start()
        except BaseException:
            # Nothing may stay held by a server that did not start.
            self._release_devices()
            raise
        if self.accounting_hook is not None:
            self.accounting_hook.started(self)
        return result

    def _record_stop(self) -> None:
        if self.accounting_hook is not None and getattr(self, STATE_ACCOUNTING_START, None):
            self.accounting_hook.stopped(self)  # clears the recorded start

    async def stop(self, now=False):
        try:
            await super().stop(now=now)
        finally:
            self._record_stop()
            self._release_devices()
