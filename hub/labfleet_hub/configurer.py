"""From the platform YAML to JupyterHub configuration.

Three steps, each testable alone:

1. :func:`load_values` reads and validates ``labfleet.yaml`` (and the catalogue
   it names), fills the defaults and makes paths absolute. Errors are
   :class:`ConfigError` naming the file and the field.
2. :func:`with_secrets` adds the secrets kept in the state directory (file
   reads only; :func:`ensure_secrets` creates them once, mode 0600).
3. :func:`apply_config` sets traitlets on a JupyterHub config object. It only
   sets; it reads nothing and mutates nothing else (as The Littlest
   JupyterHub's configurer does).

``jupyterhub_config.py`` is the three of them in a row.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import sys
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from labfleet_accounting.spool import SpoolHook
from labfleet_spawner.catalogue import CatalogueError, load_catalogue
from labfleet_spawner.storage import DEFAULT_GID_BASE, DEFAULT_UID_BASE

from .posix_ids import CUSTOM_SCOPES as POSIX_IDS_SCOPES
from .posix_ids import POSIX_IDS_SCOPE
from .private import ACCOUNTING_DB_URL_ENV, BUDGET_DB_URL_ENV, DIR_MODE
from .tokens import CUSTOM_SCOPES, IAM_TOKEN_SCOPE

DEFAULTS: dict[str, Any] = {
    "hub": {
        "ip": "127.0.0.1",
        "port": 8000,
        "hub_port": 8081,
        "base_url": "/",
        "state_dir": ".labfleet",
        "db_url": "",
        "admin_users": [],
        "log_level": "INFO",
    },
    "iam": {
        "client_secret_file": "",
        "scopes": ["openid", "profile", "email", "offline_access", "wlcg", "wlcg.groups"],
        "groups_claims": ["groups", "wlcg.groups"],
        "group_prefix": "",
        "allowed_groups": ["users"],
        "admin_groups": [],
        "refusal_contact": "",
        "token_refresh_margin": 300,
        "auth_refresh_age": 300,
        "validate_server_cert": True,
    },
    "spawner": {
        "kind": "local",
        # beside the state folder, never in it (private to the platform, see check_layout)
        "storage_root": ".labfleet-storage",
        "start_timeout": 120,
        "isolate_users": "auto",
        "allow_root_notebooks": False,
        "namespace": "labfleet",
        "unavailable_profiles": "collapse",
        "jupyter_news": "never",
    },
    "devidp": {"enabled": False, "port": 8900, "accounts": "accounts.yaml", "demo_admin": False},
    "proxy": {"api_port": 8001, "command": []},
    "accounting": {
        "enabled": False,
        "port": 0,
        "db_url": "",
        "spool": "",
        "admin_group_pattern": "{group}-admins",
        "group_admins": {},
        "mig_weighting": "fraction",
        "log_level": "INFO",
        "metrics_public": False,
    },
    "batch": {
        "enabled": False,
        "port": 0,
        "queues": {},
        "limits": {},
        "hub_admins_see_all": True,
        "budgets": {"enabled": False, "limit_cpu": False},
        "log_level": "INFO",
    },
}
_PATH_FIELDS = [
    ("hub", "state_dir"),
    ("spawner", "storage_root"),
    ("devidp", "accounts"),
    ("iam", "client_secret_file"),
    ("accounting", "spool"),
]


class ConfigError(ValueError):
    """The platform configuration is invalid; the message names file and field."""


@cache
def config_schema() -> dict:
    return json.loads(resources.files(__package__).joinpath("config.schema.json").read_text())


def _merge(defaults: dict, values: dict) -> dict:
    merged = copy.deepcopy(defaults)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_values(data: Any, source: str, base_dir: Path) -> dict:
    """Validate loaded YAML data, apply defaults, resolve paths against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the configuration must be a mapping (hub, iam, catalogue, ...)"
        )
    validator = jsonschema.Draft202012Validator(config_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        err = errors[0]
        where = ".".join(map(str, err.absolute_path)) or "(top level)"
        raise ConfigError(f"{source}: field {where}: {err.message}")
    values = _merge(DEFAULTS, data)
    for section, key in _PATH_FIELDS:
        if values[section][key]:
            values[section][key] = str((base_dir / values[section][key]).resolve())
    values["catalogue"] = str((base_dir / values["catalogue"]).resolve())
    hub = values["hub"]
    host = f"[{hub['ip']}]" if ":" in hub["ip"] else hub["ip"]  # an IPv6 address
    hub.setdefault("public_url", f"http://{host}:{hub['port']}")
    hub["public_url"] = hub["public_url"].rstrip("/")
    if not hub["db_url"]:
        hub["db_url"] = f"sqlite:///{Path(hub['state_dir']) / 'jupyterhub.sqlite'}"
    accounting = values["accounting"]
    if not accounting["db_url"]:
        accounting["db_url"] = f"sqlite:///{Path(hub['state_dir']) / 'accounting.sqlite'}"
    if not accounting["spool"]:
        accounting["spool"] = str(Path(hub["state_dir"]) / "accounting.spool")
    values["source"] = source
    check_layout(values)
    return values


def check_layout(values: dict) -> None:
    """User storage and the platform's private state folder must not contain each other.

    ``hub.state_dir`` is mode 0700 (``labfleet_hub.private``): homes inside it would be
    out of their owners' reach, and a state folder inside user storage would sit among
    folders users write to. Local mode only (Kubernetes mode has no storage_root).
    """
    if values["spawner"]["kind"] != "local":
        return
    state = Path(values["hub"]["state_dir"])
    storage = Path(values["spawner"]["storage_root"])
    source = values["source"]
    if storage.is_relative_to(state):
        raise ConfigError(
            f"{source}: field spawner.storage_root: {storage} is inside hub.state_dir "
            f"({state}), which is private to the platform (mode 0700): users could not "
            f"reach their homes there. Put user storage outside it, e.g. "
            f"{state.parent / (state.name + '-storage')}"
        )
    if state.is_relative_to(storage):
        raise ConfigError(
            f"{source}: field hub.state_dir: {state} is inside spawner.storage_root "
            f"({storage}), among the folders users write to; keep the platform's state "
            "outside user storage"
        )
    spool = Path(values["accounting"]["spool"])
    if values["accounting"]["enabled"] and spool.is_relative_to(storage):
        raise ConfigError(
            f"{source}: field accounting.spool: {spool} is inside spawner.storage_root "
            f"({storage}); keep it with the platform's state (default: in hub.state_dir)"
        )


def load_values(path: str | os.PathLike) -> dict:
    """Read, validate and complete ``labfleet.yaml``; the catalogue is validated too."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    values = parse_values(data, str(path), path.parent)
    try:
        load_catalogue(values["catalogue"])
    except CatalogueError as e:
        raise ConfigError(str(e)) from None
    # Hub-managed services do not inherit the hub's environment; the one thing
    # they need from it is where the cluster credentials are (Kubernetes mode
    # outside a cluster: a developer's or the test cluster's kubeconfig).
    values["service_environment"] = (
        {"KUBECONFIG": os.environ["KUBECONFIG"]}
        if values["spawner"]["kind"] == "kubernetes" and os.environ.get("KUBECONFIG")
        else {}
    )
    if values["accounting"]["enabled"] and not values["accounting"]["port"]:
        # port 0: a free loopback port, chosen once when the hub loads its configuration
        values["accounting"]["port"] = _free_loopback_port()
    if values["batch"]["enabled"]:
        _check_batch(values, path)
        if not values["batch"]["port"]:
            values["batch"]["port"] = _free_loopback_port(hub_bind_ip(values))
    if values["devidp"]["enabled"] and not Path(values["devidp"]["accounts"]).is_file():
        raise ConfigError(
            f"{path}: field devidp.accounts: no such file {values['devidp']['accounts']}"
        )
    if values["devidp"]["enabled"]:
        check_devidp(values, str(path))
    return values


def _check_batch(values: dict, path: Path) -> None:
    """The queue layout against the catalogue, so a typo fails here, not in the service."""
    from labfleet_batch.queues import QueueConfigError, parse_queue_config

    batch = values["batch"]
    try:
        parse_queue_config(
            batch["queues"], load_catalogue(values["catalogue"]), source=f"{path}: batch.queues"
        )
    except QueueConfigError as e:
        raise ConfigError(str(e)) from None
    if batch["budgets"]["enabled"] and not values["accounting"]["enabled"]:
        raise ConfigError(
            f"{path}: field batch.budgets.enabled: budgets are read from the accounting "
            "database; enable accounting too"
        )


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (the only places the development IdP may serve)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_devidp(values: dict, source: str) -> None:
    """The development IdP's demo accounts have public passwords: refuse it where anyone
    but this machine could reach the hub, and next to any issuer but its own."""
    from urllib.parse import urlsplit

    hub, iam, port = values["hub"], values["iam"], values["devidp"]["port"]
    why = (
        "the development identity provider (devidp.enabled) logs anyone in with the "
        "public demo passwords, so it runs only with a hub that only this machine reaches"
    )
    if not is_loopback_host(hub["ip"]):
        raise ConfigError(
            f"{source}: field hub.ip: {hub['ip']!r} is not a loopback address (127.0.0.0/8, "
            f"::1, localhost) while devidp.enabled is true: {why}. To serve a network, use "
            "a real identity provider (iam.issuer) and devidp.enabled: false"
        )
    if not is_loopback_host(urlsplit(hub["public_url"]).hostname or ""):
        raise ConfigError(
            f"{source}: field hub.public_url: {hub['public_url']!r} is not a loopback "
            f"address while devidp.enabled is true: {why}"
        )
    issuer = urlsplit(iam["issuer"])
    try:
        issuer_port = issuer.port
    except ValueError:
        issuer_port = None
    own = (
        issuer.scheme == "http"
        and is_loopback_host(issuer.hostname or "")
        and issuer_port == port
        and issuer.path in ("", "/")
        and not (issuer.query or issuer.fragment or issuer.username)
    )
    if not own:
        raise ConfigError(
            f"{source}: field iam.issuer: {iam['issuer']!r} is not the development identity "
            f"provider's own URL (http://127.0.0.1:{port}/, from devidp.port) while "
            "devidp.enabled is true: a hub that trusts another issuer must not run the "
            "development one too. Set devidp.enabled: false to use a real issuer"
        )


def devidp_withheld_groups(values: dict) -> list[str]:
    """IAM groups the development IdP gives nobody: those that make hub admins
    (``iam.admin_groups`` under ``iam.group_prefix``), unless ``devidp.demo_admin``."""
    if values["devidp"]["demo_admin"]:
        return []
    prefix = values["iam"]["group_prefix"]
    return sorted(f"{prefix}{group}" for group in values["iam"]["admin_groups"])


def _free_loopback_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def hub_bind_ip(values: dict) -> str:
    """Where the hub's API and the hub-managed batch service listen: 127.0.0.1, or
    ``hub.connect_ip`` -- an address of this machine that pods reach, for a hub run
    outside the cluster in Kubernetes mode (the test cluster's bridge, 10.244.0.1).
    Inside a cluster (the chart) the hub is a pod and its Service is the address."""
    return values["hub"].get("connect_ip") or "127.0.0.1"


# -- secrets -------------------------------------------------------------------

_SECRET_FILES = {
    "client_secret": "iam-client-secret",
    "crypt_key": "auth-state-crypt-key",
    # the bearer token of the accounting service's /metrics (Prometheus reads the file)
    "metrics_token": "accounting-metrics-token",
    # the bearer token of the GPU exporter's /metrics (single node: 127.0.0.1:9835)
    "exporter_token": "gpu-exporter-metrics-token",
}
#: The secrets the hub itself reads (with_secrets); the others are for services' files.
_HUB_SECRETS = ("client_secret", "crypt_key")


def _secret_path(values: dict, name: str) -> Path:
    if name == "client_secret" and values["iam"]["client_secret_file"]:
        return Path(values["iam"]["client_secret_file"])
    return Path(values["hub"]["state_dir"]) / "secrets" / _SECRET_FILES[name]


def ensure_secrets(values: dict) -> None:
    """Create the state directory and any missing secret (folders 0700, files 0600)."""
    state_dir = Path(values["hub"]["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    secret_dir = state_dir / "secrets"
    secret_dir.mkdir(exist_ok=True, mode=DIR_MODE)
    for name in _SECRET_FILES:
        path = _secret_path(values, name)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))


def with_secrets(values: dict) -> dict:
    """``values`` plus a ``secrets`` section read from the state directory."""
    found = {}
    for name in _HUB_SECRETS:
        path = _secret_path(values, name)
        try:
            found[name] = path.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"{values['source']}: secret {name} not readable at {path} ({e.strerror}); "
                "run `labfleet up` once or create it"
            ) from None
    return {**values, "secrets": found}


# -- applying ------------------------------------------------------------------


def spawner_class_name(values: dict) -> str:
    return {"local": "LocalGPUSpawner", "kubernetes": "PlatformKubeSpawner"}[
        values["spawner"]["kind"]
    ]


def apply_config(values: dict, c) -> None:
    """Set JupyterHub traitlets on ``c`` from completed values (see :func:`with_secrets`)."""
    hub, iam, spawner, proxy = values["hub"], values["iam"], values["spawner"], values["proxy"]
    state_dir = Path(hub["state_dir"])

    c.JupyterHub.ip = hub["ip"]
    c.JupyterHub.port = hub["port"]
    c.JupyterHub.base_url = hub["base_url"]
    # the hub's own API: loopback, or where pods reach this machine (hub.connect_ip)
    c.JupyterHub.hub_ip = hub_bind_ip(values)
    c.JupyterHub.hub_port = hub["hub_port"]
    c.JupyterHub.db_url = hub["db_url"]
    c.JupyterHub.cookie_secret_file = str(state_dir / "jupyterhub_cookie_secret")
    c.JupyterHub.log_level = hub["log_level"]
    c.JupyterHub.cleanup_servers = True
    c.JupyterHub.template_paths = [str(resources.files(__package__).joinpath("templates"))]

    c.JupyterHub.authenticator_class = "iam"
    a = c.IAMAuthenticator
    a.issuer = iam["issuer"]
    a.client_id = iam["client_id"]
    a.client_secret = values["secrets"]["client_secret"]
    a.scope = list(iam["scopes"])
    a.groups_claims = list(iam["groups_claims"])
    a.group_prefix = iam["group_prefix"]
    a.allowed_groups = set(iam["allowed_groups"])
    a.admin_groups = set(iam["admin_groups"])
    a.refusal_contact = iam["refusal_contact"]
    a.admin_users = set(hub["admin_users"])
    a.token_refresh_margin = iam["token_refresh_margin"]
    a.auth_refresh_age = iam["auth_refresh_age"]
    a.validate_server_cert = iam["validate_server_cert"]
    a.oauth_callback_url = f"{hub['public_url']}{hub['base_url'].rstrip('/')}/hub/oauth_callback"
    c.CryptKeeper.keys = [values["secrets"]["crypt_key"].encode()]

    # notebooks may fetch a fresh IAM token for their own user, nothing more
    c.JupyterHub.custom_scopes = {**CUSTOM_SCOPES, **POSIX_IDS_SCOPES}
    c.JupyterHub.load_roles = [{"name": "user", "scopes": ["self", f"{IAM_TOKEN_SCOPE}!user"]}]
    c.Spawner.server_token_scopes = [
        "access:servers!server",
        "users:activity!user",
        f"{IAM_TOKEN_SCOPE}!user",
    ]

    c.JupyterHub.spawner_class = {"local": "labfleet-local", "kubernetes": "labfleet-kube"}[
        spawner["kind"]
    ]
    s = getattr(c, spawner_class_name(values))
    s.catalogue_path = values["catalogue"]
    s.start_timeout = spawner["start_timeout"]
    s.http_timeout = spawner["start_timeout"]
    s.unavailable_profiles = spawner["unavailable_profiles"]
    if spawner["kind"] == "local":
        s.storage_root = spawner["storage_root"]
        s.accounts_dir = str(accounts_dir(values))
        s.isolate_users = {"auto": "auto", "yes": True, "no": False}[spawner["isolate_users"]]
        s.allow_root_notebooks = spawner["allow_root_notebooks"]
        # the single-user server of this very environment, found without PATH
        s.cmd = [str(Path(sys.executable).parent / "jupyterhub-singleuser")]
        s.default_url = "/lab"
        # written into that environment's JupyterLab settings (images: at build time)
        s.jupyter_news = spawner["jupyter_news"]
    else:
        s.namespace = spawner["namespace"]
        kube = spawner.get("kubernetes", {})
        s.home_storage = kube.get("home_storage", "shared")
        if "home_capacity" in kube:
            s.storage_capacity = kube["home_capacity"]
        if "storage_class" in kube:
            s.storage_class = kube["storage_class"]
        volume = kube_shared_volume(kube)
        if volume is not None:
            s.shared_volume = volume
        for key, trait in (
            ("envs_writer_group", "envs_writer_group"),
            ("uid_base", "uid_base"),
            ("gid_base", "gid_base"),
            ("unschedulable_grace_period", "unschedulable_grace_period"),
            ("availability", "availability_enabled"),
            ("kueue", "kueue_enabled"),
        ):
            if key in kube:
                setattr(s, trait, kube[key])
        if "accounting_group_exclude" in kube:
            s.accounting_group_exclude = list(kube["accounting_group_exclude"])
        if "storage_path" in kube:
            s.storage_path = kube["storage_path"]
        if "node_selector" in kube:
            s.node_selector = dict(kube["node_selector"])
        if "tolerations" in kube:
            s.tolerations = [dict(t) for t in kube["tolerations"]]

    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{proxy['api_port']}"
    if proxy["command"]:
        c.ConfigurableHTTPProxy.command = list(proxy["command"])

    if values.get("accounting", {}).get("enabled"):
        apply_accounting(values, c)
    if values.get("batch", {}).get("enabled"):
        apply_batch(values, c)


ACCOUNTING_SERVICE = "accounting"


def accounting_command(values: dict) -> list[str]:
    """The command line of the hub-managed accounting service (see docs/accounting.md).

    It holds no secret: every local user can read a command line (``ps``). The database
    URL, which may hold a password, is in :func:`accounting_environment`.
    """
    acc = values["accounting"]
    command = [
        sys.executable,
        "-m",
        "labfleet_accounting.app",
        "serve",
        f"--AccountingApp.admin_group_pattern={acc['admin_group_pattern']}",
        f"--AccountingApp.mig_weighting={acc['mig_weighting']}",
        f"--AccountingApp.log_level={acc['log_level']}",
        # the quota page's ClusterQueue names follow the batch layout
        f"--AccountingApp.catalogue_path={values['catalogue']}",
        f"--AccountingApp.hub_services={menu_services(values)!r}",
    ]
    # /metrics: only with the bearer token, read from its file (never on a command
    # line), unless accounting.metrics_public opens it deliberately
    if acc["metrics_public"]:
        command.append("--AccountingApp.metrics_public=True")
    else:
        command.append(f"--AccountingApp.metrics_token_file={metrics_token_path(values)}")
    admins = platform_group_admins(values)
    if admins:
        command.append(f"--AccountingApp.group_admins={json.dumps(admins)}")
    if values["spawner"]["kind"] == "local":
        command.append(f"--AccountingApp.spool_path={acc['spool']}")
        if values["batch"]["enabled"]:
            # the group quotas are the local batch service's limits, through its API
            command.append(f"--AccountingApp.batch_limits_url={batch_url(values)}")
    else:
        # the group admins' quota page patches the ClusterQueues the batch layout made
        from labfleet_batch.queues import QueueConfig

        prefix = values["batch"]["queues"].get("name_prefix", QueueConfig.name_prefix)
        command += [
            "--AccountingApp.kubernetes=True",
            f"--AccountingApp.queue_name_prefix={prefix}",
        ]
    return command


def platform_group_admins(values: dict) -> dict[str, list[str]]:
    """Every configured group admin, for both services (one rule, labfleet_hub.groupadmin):
    ``accounting.group_admins`` and, with batch, ``batch.queues.groups.<g>.admins``."""
    admins = {g: list(users) for g, users in values["accounting"]["group_admins"].items()}
    if values["batch"]["enabled"]:
        for group, quota in (values["batch"]["queues"].get("groups") or {}).items():
            for user in (quota or {}).get("admins") or ():
                if user not in admins.setdefault(group, []):
                    admins[group].append(user)
    return {g: users for g, users in sorted(admins.items()) if users}


def accounting_environment(values: dict) -> dict[str, str]:
    """The accounting service's environment: what it must know but ``ps`` must not show."""
    return {
        **values.get("service_environment", {}),
        ACCOUNTING_DB_URL_ENV: values["accounting"]["db_url"],
    }


def metrics_token_path(values: dict) -> Path:
    """The file holding the bearer token of the accounting service's ``/metrics``
    (created by :func:`ensure_secrets`, mode 0600)."""
    return _secret_path(values, "metrics_token")


def gpu_exporter_token_path(values: dict) -> Path:
    """The file holding the bearer token of the GPU exporter's ``/metrics`` (created by
    :func:`ensure_secrets`, mode 0600; the exporter's ``--GpuExporterApp.metrics_token_file``)."""
    return _secret_path(values, "exporter_token")


#: Where the single-node GPU exporter listens (GpuExporterApp.exporter_ip/exporter_port).
GPU_EXPORTER_TARGET = "127.0.0.1:9835"


def prometheus_config(
    values: dict,
    token_file: str | os.PathLike | None = None,
    exporter_token_file: str | os.PathLike | None = None,
) -> dict:
    """A Prometheus configuration that scrapes the accounting service's metrics
    and, on a single node, the GPU exporter's.

    The service through the proxy (``hub.public_url``), as its port may be chosen at
    start; with ``authorization: credentials_file`` (default: the generated token,
    :func:`metrics_token_path`; Prometheus must be able to read it) unless
    ``accounting.metrics_public``. The exporter (single node only: in Kubernetes it is
    a DaemonSet, scraped per pod) at :data:`GPU_EXPORTER_TARGET`, always with its own
    token's file (:func:`gpu_exporter_token_path`). ``labfleet prometheus-config``
    prints it.
    """
    from urllib.parse import urlsplit

    hub = values["hub"]
    url = urlsplit(
        f"{hub['public_url']}{hub['base_url'].rstrip('/')}/services/{ACCOUNTING_SERVICE}/metrics"
    )
    job: dict[str, Any] = {
        "job_name": "labfleet-accounting",
        "scheme": url.scheme,
        "metrics_path": url.path,
        "static_configs": [{"targets": [url.netloc]}],
    }
    if not values["accounting"]["metrics_public"]:
        path = token_file if token_file is not None else metrics_token_path(values)
        job["authorization"] = {"type": "Bearer", "credentials_file": str(path)}
    jobs = [job]
    if values["spawner"]["kind"] == "local":
        path = exporter_token_file or gpu_exporter_token_path(values)
        jobs.append(
            {
                "job_name": "labfleet-gpu-exporter",
                "static_configs": [{"targets": [GPU_EXPORTER_TARGET]}],
                "authorization": {"type": "Bearer", "credentials_file": str(path)},
            }
        )
    return {"scrape_configs": jobs}


def menu_services(values: dict) -> list[str]:
    """The services in the hub's Services menu, in its order: the services' own pages
    show the same menu (``hub_services``, see :mod:`labfleet_hub.service_page`)."""
    names = [ACCOUNTING_SERVICE] if values["accounting"]["enabled"] else []
    return names + ([BATCH_SERVICE] if values["batch"]["enabled"] else [])


def apply_accounting(values: dict, c) -> None:
    """The accounting service as a hub-managed service, and the local spawner's hook.

    Users reach its page at ``/services/accounting/`` (listed in the hub's
    Services menu); its OAuth "identify" token tells it each caller's name,
    admin flag and groups, which is all its authorization needs, so the
    service gets no hub API scopes of its own.
    """
    acc = values["accounting"]
    url = f"http://127.0.0.1:{acc['port']}"
    # append, not assign: other services configured elsewhere stay
    c.JupyterHub.services.append(
        {
            "name": ACCOUNTING_SERVICE,
            "url": url,
            "command": accounting_command(values),
            "environment": accounting_environment(values),
            "cwd": values["hub"]["state_dir"],
            "oauth_no_confirm": True,
            "display": True,
        }
    )
    roles = [dict(r) for r in (c.JupyterHub.load_roles if "load_roles" in c.JupyterHub else [])]
    user_role = next((r for r in roles if r["name"] == "user"), None)
    if user_role is None:
        user_role = {"name": "user", "scopes": ["self"]}
        roles.append(user_role)
    access = f"access:services!service={ACCOUNTING_SERVICE}"
    user_role["scopes"] = [*user_role["scopes"], access]
    if values["spawner"]["kind"] == "local" and values["batch"]["enabled"]:
        # the quota page changes the local batch service's group limits (api/limits)
        roles.append(
            {
                "name": "labfleet-accounting-limits",
                "scopes": [f"access:services!service={BATCH_SERVICE}"],
                "services": [ACCOUNTING_SERVICE],
            }
        )
    c.JupyterHub.load_roles = roles
    if values["spawner"]["kind"] == "local":
        c.LocalGPUSpawner.accounting_hook = SpoolHook(path=acc["spool"])
    # GPU sessions are checked against the charged group's GPU-hour budget
    getattr(c, spawner_class_name(values)).budget_db_url = acc["db_url"]


def kube_shared_volume(kube: dict) -> dict | None:
    """The shared filesystem's volume source from ``spawner.kubernetes``, or None if unset."""
    # shared_volume (any volume source) wins over the shorthand shared_claim
    if "shared_volume" in kube:
        return dict(kube["shared_volume"])
    if "shared_claim" in kube:
        return {"persistentVolumeClaim": {"claimName": kube["shared_claim"]}}
    return None


BATCH_SERVICE = "batch"


def batch_url(values: dict) -> str:
    """Where notebooks reach the batch service: through the proxy, like a browser would."""
    hub = values["hub"]
    return f"{hub['public_url']}{hub['base_url'].rstrip('/')}/services/{BATCH_SERVICE}/"


def notebook_batch_url(values: dict) -> str:
    """The batch service's URL for notebooks (``LABFLEET_BATCH_URL``): through the proxy
    (:func:`batch_url`), or, with ``hub.connect_ip``, the service's own URL at that
    address -- notebook pods cannot reach the proxy on the machine's loopback. The
    proxy forwards paths unchanged, so the service answers under the same prefix."""
    hub = values["hub"]
    if not hub.get("connect_ip"):
        return batch_url(values)
    prefix = f"{hub['base_url'].rstrip('/')}/services/{BATCH_SERVICE}/"
    return f"{_service_origin(values)}{prefix}"


def _service_origin(values: dict) -> str:
    host = hub_bind_ip(values)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{values['batch']['port']}"


def device_claims_path(values: dict) -> Path:
    """The registry through which the hub and the local batch service share device claims."""
    return Path(values["hub"]["state_dir"]) / "device-claims.json"


def accounts_dir(values: dict) -> Path:
    """Account names of the mapped uids (nss_wrapper files), shared by the hub and the
    batch service: beside the homes, where every user can read them."""
    return Path(values["spawner"]["storage_root"]) / ".accounts"


def batch_command(values: dict) -> list[str]:
    """The command line of the hub-managed batch service (see docs/batch.md).

    It holds no secret (see :func:`batch_environment` for the budget database's URL).
    """
    batch, spawner, hub = values["batch"], values["spawner"], values["hub"]
    # traitlets reads Dict values on the command line with ast.literal_eval:
    # Python literals (True/None), not JSON
    command = [
        sys.executable,
        "-m",
        "labfleet_batch.service",
        f"--BatchService.catalogue_path={values['catalogue']}",
        f"--BatchService.queue_config={batch['queues']!r}",
        f"--BatchService.hub_admins_see_all={batch['hub_admins_see_all']}",
        f"--BatchService.log_level={batch['log_level']}",
        f"--BatchService.hub_services={menu_services(values)!r}",
        # who administers a group: the platform's one rule, as the accounting service
        f"--BatchService.admin_group_pattern={values['accounting']['admin_group_pattern']}",
    ]
    if values["accounting"]["group_admins"]:
        command.append(f"--BatchService.group_admins={values['accounting']['group_admins']!r}")
    if batch["limits"]:
        command.append(f"--BatchService.limits={batch['limits']!r}")
    if spawner["kind"] == "local":
        command += [
            "--BatchService.backend=local",
            f"--BatchService.storage_root={spawner['storage_root']}",
            f"--BatchService.state_dir={Path(hub['state_dir']) / 'batch'}",
            f"--BatchService.device_claims_path={device_claims_path(values)}",
            f"--BatchService.accounts_dir={accounts_dir(values)}",
        ]
        # the hub's user and group ids give jobs the notebooks' uids (when root); as
        # notebooks, jobs are refused where they cannot be isolated (unless "no")
        command.append(f"--BatchService.isolate_users={spawner['isolate_users']}")
        if spawner["isolate_users"] != "no":
            command.append("--BatchService.job_ids_from_hub=True")
        elif spawner["allow_root_notebooks"]:
            command.append("--BatchService.allow_root_jobs=True")
        # jobs' usage into the spool the accounting service ingests, as the notebooks'
        # (on Kubernetes the accounting service sees the Jobs' pods itself)
        if values["accounting"]["enabled"]:
            command.append(f"--BatchService.accounting_spool={values['accounting']['spool']}")
    else:
        # Jobs run as their owner's notebook: same ids (read from the hub), same volume
        kube = spawner.get("kubernetes", {})
        command += [
            "--BatchService.backend=kubernetes",
            "--BatchService.job_ids_from_hub=True",
            f"--BatchService.uid_base={kube.get('uid_base', DEFAULT_UID_BASE)}",
            f"--BatchService.gid_base={kube.get('gid_base', DEFAULT_GID_BASE)}",
        ]
        volume = kube_shared_volume(kube)
        if volume is not None:
            pod_storage = {"volume": volume}
            command.append(f"--BatchService.pod_storage={pod_storage!r}")
    if batch["budgets"]["enabled"]:
        # budget_db_url: in the environment (batch_environment)
        command.append(f"--BatchService.budget_limit_cpu={batch['budgets']['limit_cpu']}")
    return command


def batch_environment(values: dict) -> dict[str, str]:
    """The batch service's environment: with budgets, the accounting database's URL."""
    environment = dict(values.get("service_environment", {}))
    if values["batch"]["budgets"]["enabled"]:
        environment[BUDGET_DB_URL_ENV] = values["accounting"]["db_url"]
    return environment


def apply_batch(values: dict, c) -> None:
    """The batch service as a hub-managed service; users and their notebooks may call it.

    The service authenticates every request with HubAuth; the caller's token
    needs ``access:services!service=batch``: the ``user`` role grants it (API
    tokens from the token page) and so do the notebook servers' own tokens, so
    ``JUPYTERHUB_API_TOKEN`` in a notebook works with ``LABFLEET_BATCH_URL``.
    Its queue page (``/services/batch/``) is in the Services menu; browsers
    sign in through the hub's OAuth.
    """
    c.JupyterHub.services.append(
        {
            "name": BATCH_SERVICE,
            "url": _service_origin(values),
            "command": batch_command(values),
            "environment": batch_environment(values),
            "cwd": values["hub"]["state_dir"],
            # the queue page in the Services menu; OAuth "identify" needs no consent
            "oauth_no_confirm": True,
            "display": True,
        }
    )
    access = f"access:services!service={BATCH_SERVICE}"
    roles = [dict(r) for r in (c.JupyterHub.load_roles if "load_roles" in c.JupyterHub else [])]
    user_role = next((r for r in roles if r["name"] == "user"), None)
    if user_role is None:
        user_role = {"name": "user", "scopes": ["self"]}
        roles.append(user_role)
    user_role["scopes"] = [*user_role["scopes"], access]
    # the service reads users' hub ids to run Jobs as their notebooks (posix_ids)
    roles.append(
        {"name": "labfleet-batch", "scopes": [POSIX_IDS_SCOPE], "services": [BATCH_SERVICE]}
    )
    c.JupyterHub.load_roles = roles
    scopes = list(c.Spawner.server_token_scopes if "server_token_scopes" in c.Spawner else [])
    c.Spawner.server_token_scopes = [*scopes, access]
    environment = dict(c.Spawner.environment if "environment" in c.Spawner else {})
    environment["LABFLEET_BATCH_URL"] = notebook_batch_url(values)
    c.Spawner.environment = environment
    if values["spawner"]["kind"] == "local":
        # The service hands out this machine's devices too: one claims registry for
        # both. Only with batch on: nobody would ever drop a disabled service's claims.
        c.LocalGPUSpawner.device_claims_path = str(device_claims_path(values))
