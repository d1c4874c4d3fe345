"""The batch service: a JupyterHub service with a small REST API.

Routes (under the service prefix, e.g. ``/services/batch/``)::

    GET    api/info                         what the caller may submit (groups, priorities, limits)
    POST   api/jobs                         submit (JSON body, see validation.FIELDS) -> 201
    GET    api/jobs[?group=g]               own jobs; with ?group, a group admin sees the group's
    GET    api/jobs/<group>/<name>          status, with Kueue admission state and queue position
    GET    api/jobs/<group>/<name>/logs?index=0[&follow=1]   text/plain
    DELETE api/jobs/<group>/<name>          cancel
    GET    health                           no authentication
    GET    (the prefix itself)              the queue page (labfleet_batch.page), hub OAuth login
    GET    jobs/<group>/<name>[?index=i]    a job's page: details, reason, a completion's log

Every API request carries a hub API token (``Authorization: token ...``;
cookies are never read for the API, so it needs no XSRF checks);
:class:`jupyterhub.services.auth.HubOAuth` (a HubAuth; OAuth is for the
page's browser login only) asks the hub who it
belongs to, with the user's groups (the hub always includes them for the
token's owner). The token needs ``access:services!service=<this service>``
(see docs/batch.md for the hub configuration). A
job the caller may not see answers 404, exactly as a job that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from typing import Any
from urllib.parse import urlparse

import yaml
from jupyterhub.services.auth import HubAuth, HubOAuth, HubOAuthCallbackHandler, check_scopes
from jupyterhub.utils import url_path_join
from labfleet_hub.bodylimit import HARD_CAP_BYTES, BodyLimit, OpenAPIHandler
from labfleet_hub.hubauth import AuthCacheConfig, reads
from labfleet_hub.posix_ids import HubIdsUnavailable, hub_api_ids
from labfleet_hub.private import BUDGET_DB_URL_ENV
from labfleet_hub.procs import stop_event
from labfleet_hub.service_page import HubNav
from labfleet_spawner.catalogue import Catalogue, load_catalogue
from labfleet_spawner.isolation import IsolationRefused
from labfleet_spawner.storage import DEFAULT_GID_BASE, DEFAULT_UID_BASE
from tornado import httpserver, web
from tornado.ioloop import IOLoop
from traitlets import Bool, Dict, Enum, Float, Instance, Integer, List, Unicode, default
from traitlets.config import Application

from . import openapi
from .authz import Caller, Policy
from .budget import BudgetGate, BudgetUnavailable, budget_gate_from_url
from .model import FINAL_STATES, QUEUED, LogsUnavailable, completion_index
from .queues import QueueConfig, parse_queue_config
from .validation import Limits, RequestError, validate_request

log = logging.getLogger("labfleet.batch")


class Context:
    """What the handlers share: backend, catalogue, queue config, policy, auth."""

    def __init__(
        self,
        backend,
        catalogue: Catalogue,
        config: QueueConfig,
        hub_auth: HubAuth,
        policy: Policy | None = None,
        limits: Limits | None = None,
        log_poll_interval: float = 1.0,
        budget: BudgetGate | None = None,
        nav: HubNav | None = None,
        configured: QueueConfig | None = None,
        limits_store=None,
        limit_managers: tuple[str, ...] = ("accounting",),
    ):
        self.backend = backend
        #: the YAML's queue configuration (config: with the live limits, local backend)
        self.configured = configured or config
        #: where the live group limits are kept (local_limits.LimitsStore); None: memory
        self.limits_store = limits_store
        #: hub services that may read and change the local limits (api/limits)
        self.limit_managers = tuple(limit_managers)
        self.catalogue = catalogue
        self.config = config
        self.hub_auth = hub_auth
        self.policy = policy or Policy(configured_admins=config_admins(config))
        self.limits = limits or Limits()
        self.log_poll_interval = log_poll_interval
        self.budget = budget
        #: one submission at a time: the waiting-jobs caps are counted and kept together
        self.submit_lock = asyncio.Lock()
        #: the hub's navigation bar on the pages; None: from hub_auth, no Services menu
        self.nav = nav


def config_admins(config: QueueConfig) -> dict[str, tuple[str, ...]]:
    return {name: g.admins for name, g in config.groups.items()}


def caller_from_model(model: dict | None, hub_auth: HubAuth) -> Caller:
    """The caller of a hub user model, or 403: the API's checks, shared with the queue page."""
    if not model:
        raise web.HTTPError(403, "the hub does not accept this token")
    if model.get("kind", "user") != "user":
        raise web.HTTPError(403, "only users may use the batch service")
    if hub_auth.access_scopes and not check_scopes(
        hub_auth.access_scopes, set(model.get("scopes") or ())
    ):
        raise web.HTTPError(
            403,
            f"this token lacks the scope {' or '.join(sorted(hub_auth.access_scopes))}",
        )
    if "groups" not in model:
        raise web.HTTPError(
            403, "this token cannot show your groups; it needs read:users:groups!user"
        )
    return Caller.from_hub_model(model)


class BaseHandler(BodyLimit, web.RequestHandler):
    ctx: Context
    caller: Caller

    def initialize(self, ctx: Context):
        self.ctx = ctx

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def check_xsrf_cookie(self):
        # token-authenticated API; no cookies are read
        return

    async def prepare(self):
        hub_auth = self.ctx.hub_auth
        token = hub_auth.get_token(self, in_cookie=False)
        if not token:
            raise web.HTTPError(401, "send a hub API token: Authorization: token <token>")
        # A request that changes something (submit, cancel) asks the hub every time, so a
        # token revoked there (deleted, or its server stopped) stops working at once;
        # reads may use HubAuth's cache, kept auth_cache_seconds (labfleet_hub.hubauth).
        use_cache = reads(self.request.method)
        model = await hub_auth.user_for_token(token, use_cache=use_cache, sync=False)
        self.caller = caller_from_model(model, hub_auth)

    def write_error(self, status_code: int, **kwargs):
        message = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": message}))

    def write_json(self, data: Any, status: int = 200):
        self.set_status(status)
        self.finish(json.dumps(data))

    async def visible_job(self, group: str, name: str):
        """The job if the caller may see it; else 404, exactly like a missing job."""
        record = await self.ctx.backend.get(group, name)
        if record is None or not self.ctx.policy.can_access(self.caller, record.user, group):
            raise web.HTTPError(404, f"no job {group}/{name} that you may see")
        return record


class InfoHandler(BaseHandler):
    async def get(self):
        cfg, caller = self.ctx.config, self.caller
        groups = sorted(g for g in cfg.groups if self.ctx.policy.can_submit(caller, g))
        self.write_json(
            {
                "user": caller.name,
                "groups": {g: {"accelerators": sorted(cfg.groups[g].accelerators)} for g in groups},
                "admin_of": [g for g in groups if self.ctx.policy.is_group_admin(caller, g)],
                "priorities": list(cfg.priorities),
                "default_priority": cfg.default_priority,
                "offload": cfg.offload_enabled,
                "limits": vars(self.ctx.limits),
            }
        )


class JobsHandler(BaseHandler):
    async def get(self):
        group = self.get_argument("group", None)
        caller, policy = self.caller, self.ctx.policy
        if group is not None:
            if not policy.can_list_group(caller, group):
                raise web.HTTPError(
                    403, f"only admins of group {group[:64]!r} may list all of its jobs"
                )
            records = await self.ctx.backend.list_jobs([group])
        else:
            # own jobs, also in groups the caller has left since
            records = await self.ctx.backend.list_jobs(sorted(self.ctx.config.groups), caller.name)
        self.write_json({"jobs": [r.to_json() for r in records]})

    async def post(self):
        try:
            raw = json.loads(self.request.body or b"null")
        except ValueError as e:
            raise web.HTTPError(400, f"the body is not JSON: {e}") from None
        cfg = self.ctx.config
        submittable = {
            g: acc
            for g, acc in cfg.covered_accelerators().items()
            if self.ctx.policy.can_submit(self.caller, g)
        }
        try:
            request = validate_request(
                raw,
                catalogue=self.ctx.catalogue,
                user_groups=self.caller.groups,
                queue_groups=submittable,
                priorities=cfg.priorities,
                default_priority=cfg.default_priority,
                offload_available=cfg.offload_enabled,
                limits=self.ctx.limits,
            )
        except RequestError as e:
            raise web.HTTPError(400, "%s", str(e)) from None
        decision = await self.check_budget(request)
        limits = self.ctx.limits
        capped = limits.max_waiting_per_user > 0 or limits.max_waiting_per_group > 0
        # with caps, one submission at a time: counted and created together
        async with self.ctx.submit_lock if capped else contextlib.nullcontext():
            await self.check_waiting(request.group)
            try:
                record = await self.ctx.backend.submit(request, self.caller.name)
            except (HubIdsUnavailable, IsolationRefused) as e:
                # nothing was created: the Job would otherwise run as the wrong user
                raise web.HTTPError(503, "%s", str(e)) from None
            except RequestError as e:  # what the backend found in the way (the job folder)
                raise web.HTTPError(400, "%s", str(e)) from None
        log.info(
            "%s submitted %s (%s)", self.caller.name, record.id, request.selection.profile.name
        )
        body = record.to_json()
        if decision is not None:
            body["budget"] = decision.as_dict()
            if decision.verdict != "allow":
                body["warning"] = decision.message
        self.write_json(body, status=201)

    async def check_waiting(self, group: str) -> None:
        """The caps on waiting (queued) jobs per user and per group: 429 before anything
        is created, saying the cap and how many are waiting."""
        limits, backend, user = self.ctx.limits, self.ctx.backend, self.caller.name
        if limits.max_waiting_per_user > 0:
            own = await backend.list_jobs(sorted(self.ctx.config.groups), user)
            waiting = sum(1 for r in own if r.state == QUEUED)
            if waiting >= limits.max_waiting_per_user:
                raise web.HTTPError(
                    429,
                    "%s",
                    f"you have {waiting} jobs waiting; the cap is {limits.max_waiting_per_user} "
                    "waiting jobs per user (max_waiting_per_user): submit again once one "
                    "has started or you cancelled one",
                )
        if limits.max_waiting_per_group > 0:
            jobs = await backend.list_jobs([group])
            waiting = sum(1 for r in jobs if r.state == QUEUED)
            if waiting >= limits.max_waiting_per_group:
                raise web.HTTPError(
                    429,
                    "%s",
                    f"group {group} has {waiting} jobs waiting; the cap is "
                    f"{limits.max_waiting_per_group} waiting jobs per group "
                    "(max_waiting_per_group): submit again once one has started or "
                    "was cancelled",
                )

    async def check_budget(self, request):
        """The group's GPU-hour budget: refuse (403) before anything is created, or warn."""
        gate = self.ctx.budget
        accelerator = request.selection.accelerator
        kind = accelerator.kind if accelerator is not None else ""
        if gate is None or not gate.applies(kind):
            return None
        try:
            decision = await gate.check(request.group, kind)
        except BudgetUnavailable as e:
            raise web.HTTPError(503, "%s", str(e)) from None
        if not decision.allowed:
            raise web.HTTPError(403, "%s", decision.message)
        return decision


class JobHandler(BaseHandler):
    async def get(self, group: str, name: str):
        record = await self.visible_job(group, name)
        self.write_json(record.to_json())

    async def delete(self, group: str, name: str):
        await self.visible_job(group, name)
        try:
            record = await self.ctx.backend.cancel(group, name)
        except KeyError:
            raise web.HTTPError(404, f"no job {group}/{name} that you may see") from None
        log.info("%s cancelled %s", self.caller.name, record.id)
        self.write_json(record.to_json())


class LogsHandler(BaseHandler):
    async def get(self, group: str, name: str):
        record = await self.visible_job(group, name)
        try:
            index = completion_index(self.get_argument("index", "0"), record.completions)
        except ValueError as e:
            raise web.HTTPError(400, "%s", str(e)) from None
        follow = self.get_argument("follow", "0") in ("1", "true", "yes")
        backend = self.ctx.backend
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        sent = 0
        while True:
            try:
                text = await backend.logs(group, name, index)
            except LogsUnavailable as e:
                if not follow or sent or record.state in FINAL_STATES:
                    raise web.HTTPError(409, "%s", str(e)) from None
                text = ""
            except KeyError:
                raise web.HTTPError(404, f"no job {group}/{name} that you may see") from None
            if len(text) > sent:
                self.write(text[sent:])
                await self.flush()
                sent = len(text)
            if not follow:
                break
            current = await backend.get(group, name)
            if current is None or current.state in FINAL_STATES:
                # one last read: output written just before the end
                try:
                    text = await backend.logs(group, name, index)
                    self.write(text[sent:])
                except (LogsUnavailable, KeyError):
                    pass
                break
            await asyncio.sleep(self.ctx.log_poll_interval)
        self.finish()


class HealthHandler(BodyLimit, web.RequestHandler):
    def get(self):
        self.finish({"status": "ok"})


class OAuthCallbackHandler(BodyLimit, HubOAuthCallbackHandler):
    """The hub's OAuth callback with the application's HubOAuth: the one that started
    the login holds its PKCE code verifier (``HubOAuth.instance()`` would not)."""

    def initialize(self, hub_auth: HubOAuth):
        self.hub_auth = hub_auth


def make_app(ctx: Context, prefix: str = "/") -> web.Application:
    from .limits_api import LimitsHandler  # these import from here
    from .page import JobPageHandler, QueuePageHandler

    job = r"([a-z0-9][a-z0-9._-]{0,62})/([a-z0-9][-a-z0-9]{0,62})"
    args = {"ctx": ctx}
    routes = [
        (url_path_join(prefix, "health"), HealthHandler),
        (
            url_path_join(prefix, "api/openapi.json"),
            OpenAPIHandler,
            {"prefix": prefix, "document": openapi.DOCUMENT},
        ),  # fmt: skip
        (url_path_join(prefix, "api/info"), InfoHandler, args),
        (url_path_join(prefix, "api/jobs"), JobsHandler, args),
        (url_path_join(prefix, f"api/jobs/{job}"), JobHandler, args),
        (url_path_join(prefix, f"api/jobs/{job}/logs"), LogsHandler, args),
        (url_path_join(prefix, f"jobs/{job}"), JobPageHandler, args),
        (url_path_join(prefix, r"api/limits/([a-z0-9][a-z0-9._-]{0,62})"), LimitsHandler, args),
        (prefix.rstrip("/") + "/?", QueuePageHandler, args),
    ]
    if isinstance(ctx.hub_auth, HubOAuth):
        # browsers sign in for the page; without OAuth the page takes tokens only
        routes.append(
            (
                url_path_join(prefix, "oauth_callback"),
                OAuthCallbackHandler,
                {"hub_auth": ctx.hub_auth},
            )
        )
    return web.Application(
        routes,
        cookie_secret=os.urandom(32),  # the OAuth state and login cookies; a restart signs in again
        hub_auth=ctx.hub_auth,
        login_url=ctx.hub_auth.login_url,
        service_prefix=url_path_join(prefix, ""),  # the pages' links
        # HubOAuth checks XSRF on cookie-authenticated requests; the API reads no cookies
        xsrf_cookies=False,
    )


class BatchService(AuthCacheConfig, Application):
    """``labfleet-batch-service``: run by the hub as a managed (or external) service."""

    name = "labfleet-batch-service"

    catalogue_path = Unicode(
        "", config=True, help="The profile catalogue YAML (the one the spawners use)."
    )
    queues_path = Unicode(
        "",
        config=True,
        help="The per-group queue/quota YAML (see labfleet_batch.queues); read at start.",
    )
    queue_config = Dict(
        {},
        config=True,
        help="""The queue configuration itself, as plain data (what ``labfleet up`` passes
        from the ``batch.queues`` section of labfleet.yaml). Used when queues_path is empty.""",
    )
    state_dir = Unicode(
        "",
        config=True,
        help="""Local backend: a folder of the service's own (mode 0700) where job records
        are kept, so a restart of the service still knows its jobs. Empty: in memory only.""",
    )
    budget_db_url = Unicode(
        config=True,
        help="""The accounting database (SQLAlchemy URL) whose GPU-hour budgets decide whether
        a group may submit GPU jobs (labfleet_accounting.budgets). Empty: no budget checks.
        Default: $LABFLEET_BUDGET_DB_URL (how labfleet up passes it: a URL with a password
        does not belong on a command line, which every local user can read).""",
    )
    budget_limit_cpu = Bool(
        False, config=True, help="Refuse CPU-only jobs too once a group's budget is spent."
    )
    budget_cache_seconds = Float(
        10.0,
        config=True,
        help="How long one budget decision per group and accelerator kind is reused.",
    )
    backend = Enum(
        ("kubernetes", "local"),
        default_value="local",
        config=True,
        help="kubernetes: Jobs into Kueue; local: processes on this machine (single node).",
    )
    kubeconfig = Unicode(
        "",
        config=True,
        help="Kubernetes backend: kubeconfig file; empty: the in-cluster service account.",
    )
    pod_storage = Dict(
        {},
        config=True,
        help="Kubernetes backend: labfleet_batch.podspec.PodStorage fields (volume, mounts, ids).",
    )
    storage_root = Unicode(
        "/srv/labfleet",
        config=True,
        help="Local backend: root of home/<user>, groups/<group>, public, envs (as the spawner).",
    )
    device_claims_path = Unicode(
        "",
        config=True,
        help="""Local backend: the file through which this service and the hub share their
        claims on this machine's accelerators (the hub's LocalGPUSpawner.device_claims_path),
        so that a job and a notebook never get the same device. Empty: claims in memory only.""",
    )
    accounting_spool = Unicode(
        "",
        config=True,
        help="""Local backend: the accounting spool (the hub's accounting.spool, which the
        local spawner's SpoolHook writes and the accounting service ingests). Every job that
        started is recorded there as batch usage, exactly once (labfleet_batch.local_accounting).
        Empty: local jobs are not accounted.""",
    )
    accounts_dir = Unicode(
        "",
        config=True,
        help="""Local backend: the folder of account names for the mapped uids (the hub's
        LocalGPUSpawner.accounts_dir), so that jobs, like notebooks, see user and group
        names. Empty: jobs run under uids without names.""",
    )
    uid_base = Integer(
        DEFAULT_UID_BASE,
        config=True,
        help="""A Job runs as uid ``uid_base + <hub user id>``, as the user's notebook: set
        it to the spawner's ``uid_base`` (LocalGPUSpawner or PlatformKubeSpawner).""",
    )
    gid_base = Integer(
        DEFAULT_GID_BASE,
        config=True,
        help="A Job's group folder is gid ``gid_base + <hub group id>``, as the spawner's.",
    )
    job_ids_from_hub = Bool(
        False,
        config=True,
        help="""Run each job with its owner's notebook ids (``uid_base`` + hub user id, the
        charged group's gid), read from the hub's ``/hub/api/labfleet/posix-ids/<user>``
        with this service's token (needs the scope ``custom:labfleet:posix-ids``).
        Off: Kubernetes Jobs run as ``pod_storage``'s ``run_as_uid``/``run_as_gid``;
        local jobs run as the service itself. Local jobs change uid only when the
        service runs as root.""",
    )
    isolate_users = Enum(
        ("auto", "yes", "no"),
        default_value="auto",
        config=True,
        help="""Local backend, as the spawner's ``isolate_users``: "auto" and "yes" run
        each job under its owner's mapped uid, which needs a root service and
        ``job_ids_from_hub``; without them every job is refused (HTTP 503, saying why),
        never run as the service's own user. "no": a single-user installation, jobs run
        as the service's user (if root, only with ``allow_root_jobs``).""",
    )
    allow_root_jobs = Bool(
        False,
        config=True,
        help="""Local backend with ``isolate_users`` "no" and a service running as root:
        accept that jobs run as root (the spawner's ``allow_root_notebooks``).""",
    )
    fpga_devices = Dict(
        {}, config=True, help="Local backend: FPGA boards per accelerator, as the spawner's."
    )
    admin_group_suffix = Unicode(
        "-admins",
        config=True,
        help="Members of hub groups <group><suffix> (and of <group>) are that group's admins.",
    )
    admin_group_pattern = Unicode(
        "",
        config=True,
        help="""The hub group whose members administer <group>, as the accounting
        service's admin_group_pattern ("{group}-admins"): one rule for the platform
        (labfleet_hub.groupadmin). Empty: <group> + admin_group_suffix.""",
    )
    group_admins = Dict(
        value_trait=List(Unicode()),
        config=True,
        help="""Extra group admins {group: [user, ...]} besides the pattern and the queue
        configuration's groups.<g>.admins (labfleet up passes accounting.group_admins, so
        that both services know the same admins).""",
    )
    hub_admins_see_all = Bool(
        True, config=True, help="Hub admins may see, read logs of and cancel every job."
    )
    limits = Dict(
        {},
        config=True,
        help="""Overrides of labfleet_batch.validation.Limits (field: value); ``labfleet up``
        passes the platform YAML's ``batch.limits``. Its max_waiting_per_user and
        max_waiting_per_group win over the traits of those names.""",
    )
    max_waiting_per_user = Integer(
        Limits.max_waiting_per_user,
        min=0,
        config=True,
        help="""How many jobs one user may have waiting (queued, not yet started) at once,
        in all groups together; one more is refused with HTTP 429 and nothing is created.
        0: no cap. The platform YAML's batch.limits.max_waiting_per_user sets it.""",
    )
    max_waiting_per_group = Integer(
        Limits.max_waiting_per_group,
        min=0,
        config=True,
        help="""How many jobs one group may have waiting (queued, not yet started) at once,
        all its users together; one more is refused with HTTP 429 and nothing is created.
        0: no cap. The platform YAML's batch.limits.max_waiting_per_group sets it.""",
    )
    log_poll_interval = Float(1.0, config=True, help="Seconds between reads when following logs.")
    service_url = Unicode(
        config=True, help="Where to listen; default $JUPYTERHUB_SERVICE_URL or 127.0.0.1:10101."
    )
    hub_auth = Instance(HubAuth, allow_none=True, help="Set by initialize (or by tests).")
    hub_services = List(
        Unicode(),
        config=True,
        help="""The hub services listed in the Services menu of this service's pages, as the
        hub lists them in its own (``labfleet up`` passes the services it starts). Empty:
        this service only ($JUPYTERHUB_SERVICE_NAME).""",
    )

    @default("service_url")
    def _default_url(self):
        return os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:10101")

    @default("budget_db_url")
    def _budget_db_url_default(self):
        return os.environ.get(BUDGET_DB_URL_ENV, "")

    aliases = {
        "config": "BatchService.config_file",
        "catalogue": "BatchService.catalogue_path",
        "queues": "BatchService.queues_path",
        "backend": "BatchService.backend",
    }
    limit_managers = List(
        Unicode(),
        ["accounting"],
        config=True,
        help="""Hub services whose own API token may read and change the local backend's
        group limits (api/limits/<group>): the accounting service, which serves the quota
        page and API of both modes and checks who may change what. Users never may.""",
    )
    config_file = Unicode("", config=True, help="A Python traitlets config file to load.")

    def initialize(self, argv=None):
        super().initialize(argv)
        if self.config_file:
            self.load_config_file(self.config_file)
        if self.hub_auth is None:
            # HubOAuth: tokens as HubAuth, and browser logins for the queue page;
            # reads JUPYTERHUB_* (client id, callback URL) from the environment
            self.hub_auth = self.make_hub_auth()

    async def make_context(self) -> Context:
        catalogue = load_catalogue(self.catalogue_path)
        if self.queues_path:
            with open(self.queues_path) as f:
                config = parse_queue_config(yaml.safe_load(f), catalogue, source=self.queues_path)
        else:
            config = parse_queue_config(
                self.queue_config, catalogue, source="BatchService.queue_config"
            )
        configured, store = config, None
        if self.backend == "local" and self.state_dir:
            # the limits group admins set through the quota API win over the YAML's
            from .local_limits import LimitsStore, differences, overlay

            store = LimitsStore(self.state_dir)
            live = store.load()
            config = overlay(config, live)
            for line in differences(configured, live):
                self.log.info("Live group limit (quota API): %s", line)
        backend = await self.make_backend(config, catalogue)
        admins = {g: list(a) for g, a in config_admins(config).items()}
        for group, users in self.group_admins.items():
            admins[group] = [*admins.get(group, []), *users]
        policy = Policy(
            admin_group_suffix=self.admin_group_suffix,
            hub_admins_see_all=self.hub_admins_see_all,
            configured_admins=admins,
            admin_group_pattern=self.admin_group_pattern,
        )
        budget = None
        if self.budget_db_url:
            budget = budget_gate_from_url(
                self.budget_db_url, self.budget_limit_cpu, self.budget_cache_seconds
            )
        return Context(
            backend,
            catalogue,
            config,
            self.hub_auth,
            policy,
            self.make_limits(),
            self.log_poll_interval,
            budget=budget,
            nav=self.hub_nav(),
            configured=configured,
            limits_store=store,
            limit_managers=tuple(self.limit_managers),
        )

    def make_limits(self) -> Limits:
        """Limits from the waiting caps' traits and the ``limits`` overrides."""
        caps = {
            "max_waiting_per_user": self.max_waiting_per_user,
            "max_waiting_per_group": self.max_waiting_per_group,
        }
        return Limits(**{**caps, **self.limits})

    def hub_nav(self) -> HubNav:
        """The hub's navigation bar for the pages: where the hub is, which services to list."""
        services = self.hub_services or [os.environ.get("JUPYTERHUB_SERVICE_NAME", "")]
        return HubNav.from_hub_auth(self.hub_auth, [s for s in services if s])

    def hub_ids(self):
        """The hub ids lookup (labfleet_hub.posix_ids) with this service's token, if enabled."""
        if not self.job_ids_from_hub:
            return None
        return hub_api_ids(self.hub_auth.api_url, self.hub_auth.api_token)

    async def make_backend(self, config: QueueConfig, catalogue: Catalogue | None = None):
        if self.backend == "kubernetes":
            from labfleet_hub.kubeclient import KubeAPI
            from labfleet_hub.kubeclient import api_client as make_api_client

            from .kube import KubeBackend
            from .podspec import PodStorage

            api_client = await make_api_client(self.kubeconfig)
            return KubeBackend(
                KubeAPI(api_client),
                config,
                PodStorage(**self.pod_storage),
                catalogue=catalogue,
                hub_ids=self.hub_ids(),
                uid_base=self.uid_base,
                gid_base=self.gid_base,
            )
        from labfleet_spawner.devices import DeviceAllocator
        from labfleet_spawner.nvml import discover

        from .local import LocalBackend
        from .local_accounting import JobAccounting
        from .store import JobStore

        allocator = DeviceAllocator.from_discovery(
            discover(None, logger=self.log), self.fpga_devices
        )
        backend = LocalBackend(
            config,
            self.storage_root,
            allocator=allocator,
            hub_ids=self.hub_ids(),
            isolate_users=self.isolate_users,
            allow_root=self.allow_root_jobs,
            uid_base=self.uid_base,
            gid_base=self.gid_base,
            store=JobStore(self.state_dir) if self.state_dir else None,
            device_claims_path=self.device_claims_path,
            accounts_dir=self.accounts_dir,
            accounting=JobAccounting(self.accounting_spool) if self.accounting_spool else None,
        )
        # waiting jobs are checked again as new submissions would be; what accounting is
        # owed (starts of running jobs, stops that did not reach the spool) is sent again
        await backend.restore(catalogue, Limits(**self.limits))
        return backend

    def start(self):
        url = urlparse(self.service_url)
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")

        async def run():
            # first: a stop (the hub's SIGINT, Ctrl-C, SIGTERM) during start-up counts too
            stop = stop_event()
            ctx = await self.make_context()
            server = httpserver.HTTPServer(make_app(ctx, prefix), max_body_size=HARD_CAP_BYTES)
            server.listen(url.port or 80, url.hostname or "127.0.0.1")
            self.log.info(
                "labfleet batch service (%s) on %s%s", self.backend, self.service_url, prefix
            )
            await stop.wait()
            # Local jobs run in their own sessions and are followed again by the next
            # service (see LocalBackend.restore): stopping the service leaves them be.
            self.log.info("labfleet batch service stopping")
            server.stop()

        IOLoop.current().run_sync(run)


def main(argv=None) -> int:
    from labfleet_hub.procs import die_with_hub

    die_with_hub()
    try:
        BatchService.launch_instance(argv)
    except KeyboardInterrupt:
        # interrupted before its loop ran (imports, configuration): a stop all the same
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
