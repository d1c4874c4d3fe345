"""The ``labfleet`` command: ``up`` runs the platform, ``check-config`` validates,
``sync-queues`` applies the batch queue layout to a Kubernetes cluster.

``labfleet up`` validates the configuration and the catalogue, makes the state
folder private to the platform (folders 0700, files 0600), creates the
secrets, installs the Node.js pieces it needs (configurable-http-proxy and,
when enabled, the development identity provider) into a cache outside the
repository, starts the identity provider, then JupyterHub, and prints the URL
and the demo accounts once the hub answers. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

import yaml

from . import images, subject_binding
from .configurer import ConfigError, ensure_secrets, hub_bind_ip, load_values, with_secrets
from .node_pieces import NodePiecesError, ensure_proxy, install_all
from .private import StateError, prepare_state_dir, private_file
from .procs import die_with_parent, port_in_use

DEFAULT_CONFIG = "config/labfleet.yaml"


def step(message: str) -> None:
    """Progress for a person waiting at a terminal."""
    print(f"==> {message}", flush=True)


def demo_accounts(accounts_path: str, withheld=()) -> list[tuple[str, str, list[str]]]:
    """The accounts' names, passwords and groups as the development IdP gives them:
    without the ``withheld`` groups (:func:`.configurer.devidp_withheld_groups`)."""
    data = yaml.safe_load(Path(accounts_path).read_text()) or {}
    hidden = {g.lstrip("/") for g in withheld}
    return [
        (u["username"], u.get("password", ""),
         [g for g in u.get("groups", []) if g.lstrip("/") not in hidden])
        for u in data.get("users", [])
    ]  # fmt: skip


def wait_for_health(url: str, process: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


def stop_stray_proxy(pid_file: Path) -> None:
    """Stop the proxy a hub left behind (its own session: a killed hub cannot stop it)."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"configurable-http-proxy" in cmdline:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def config_values(path: str) -> dict | None:
    """The platform YAML's values, or None after saying what is wrong with it."""
    try:
        return load_values(path)
    except ConfigError as e:
        print(f"labfleet: invalid configuration: {e}", file=sys.stderr)
        return None


def cmd_check_config(args) -> int:
    values = config_values(args.config)
    if values is None:
        return 1
    print(f"{args.config}: valid (catalogue {values['catalogue']}: valid)")
    return live_limits_report(values)


def live_limits_report(values: dict) -> int:
    """Where the single node's live group limits (set through the quota API, kept in the
    batch service's state) differ from ``batch.queues``: printed, they apply."""
    if not values["batch"]["enabled"] or values["spawner"]["kind"] != "local":
        return 0
    from labfleet_batch.local_limits import LimitsStore, LimitsStoreError, differences
    from labfleet_batch.queues import parse_queue_config
    from labfleet_spawner.catalogue import load_catalogue

    store = LimitsStore(Path(values["hub"]["state_dir"]) / "batch")
    try:
        live = store.load()
    except PermissionError:
        print(f"{store.path}: cannot read the live group limits (run as the platform's user)")
        return 0
    except LimitsStoreError as e:
        print(f"labfleet: {e}", file=sys.stderr)
        return 1
    config = parse_queue_config(values["batch"]["queues"], load_catalogue(values["catalogue"]))
    lines = differences(config, live)
    if lines:
        print(
            f"live group limits differ from the YAML (set by group admins through the quota "
            f"API, kept in {store.path}; the live values apply):"
        )
        for line in lines:
            print(f"  {line}")
    return 0


def cmd_release_name(args) -> int:
    """``labfleet release-name NAME``: give a hub name to the next account that logs in."""
    from jupyterhub import orm

    values = config_values(args.config)
    if values is None:
        return 1
    name = args.name.strip().lower()  # JupyterHub's own normalisation of user names
    session = orm.new_session_factory(values["hub"]["db_url"])()
    try:
        old = subject_binding.release(session, name)
    finally:
        session.close()
    if old is None:
        print(f"hub user {name!r} is bound to no account; nothing to release")
        return 0
    print(
        f"released hub user {name!r} (it was bound to subject {old!r}); the next login of "
        f"that name binds it again. It keeps its uid and home: if they are not the new "
        f"account's, move the home aside (single node: {values['spawner']['storage_root']}"
        f"/home/{name}) before that login"
    )
    return 0


def cmd_prometheus_config(args) -> int:
    """Print a Prometheus configuration that scrapes the accounting service's metrics."""
    from .configurer import prometheus_config

    values = config_values(args.config)
    if values is None:
        return 1
    print(
        "# labfleet accounting metrics (docs/accounting.md). Prometheus must be able to read\n"
        "# the credentials file (the token `labfleet up` generated), or point it at a copy.",
    )
    config = prometheus_config(values, args.token_file, args.exporter_token_file)
    yaml.safe_dump(config, sys.stdout, sort_keys=False)
    return 0


def cmd_sync_queues(args) -> int:
    """Apply the batch queue layout to the cluster (or print it with ``--dry-run``)."""
    import asyncio

    from labfleet_batch.queues import parse_queue_config, queue_objects, sync_queues
    from labfleet_spawner.catalogue import load_catalogue

    values = config_values(args.config)
    if values is None:
        return 1
    catalogue = load_catalogue(values["catalogue"])
    config = parse_queue_config(
        values["batch"]["queues"], catalogue, source=f"{args.config}: batch.queues"
    )
    if args.dry_run:
        yaml.safe_dump_all(queue_objects(config, catalogue), sys.stdout, sort_keys=False)
        return 0

    async def apply() -> list[str]:
        from .kubeclient import KubeAPI, KubeError, api_client

        client = await api_client(args.kubeconfig)
        try:
            return await sync_queues(
                KubeAPI(client), config, catalogue, progress=lambda name: step(f"applied {name}")
            )
        except KubeError as e:
            raise SystemExit(f"labfleet: the API server refused the queue layout: {e}") from None
        finally:
            await client.close()

    applied = asyncio.run(apply())
    print(f"{len(applied)} objects applied (server-side apply; nothing deleted)")
    return 0


def cmd_setup(args) -> int:
    """Install the Node.js pieces now, so nothing installs them on first use."""
    try:
        for what, where in install_all(progress=step).items():
            print(f"{what}: {where}")
    except NodePiecesError as e:
        print(f"labfleet: {e}", file=sys.stderr)
        return 1
    return 0


def isolation_notice(values: dict, euid: int) -> str:
    """What a non-root ``labfleet up`` must say before anyone tries to start a notebook:
    without root, users cannot be isolated, and the spawner refuses rather than run
    everyone as this user (unless the admin said it is a one-person installation)."""
    spawner = values["spawner"]
    if spawner["kind"] != "local" or euid == 0 or spawner["isolate_users"] == "no":
        return ""
    return (
        "not running as root, so notebooks and jobs cannot run as their users and will be "
        "refused; run as root, or for a one-person installation set "
        "spawner.isolate_users: no in the platform YAML"
    )


def cmd_up(args) -> int:
    step(f"checking {args.config}")
    values = config_values(args.config)
    if values is None:
        return 1
    hub = values["hub"]
    notice = isolation_notice(values, os.geteuid())
    if notice:
        print(f"labfleet: note: {notice}", file=sys.stderr)
    wanted = [(hub["ip"], hub["port"]), (hub_bind_ip(values), hub["hub_port"]),
              ("127.0.0.1", values["proxy"]["api_port"])]  # fmt: skip
    busy = [port for host, port in wanted if port_in_use(host, port)]
    if busy:
        print(
            f"labfleet: port(s) {', '.join(map(str, busy))} already in use: "
            "is another labfleet (or JupyterHub) running, or still stopping?",
            file=sys.stderr,
        )
        return 1
    # before anything writes there: what users must not read (the hub database,
    # the ledger, the logs, secrets) is the platform's alone (labfleet_hub.private)
    try:
        tightened = prepare_state_dir(values)
    except StateError as e:
        print(f"labfleet: {e}", file=sys.stderr)
        return 1
    if tightened:
        step(f"made {len(tightened)} state file(s) and folder(s) private (0600/0700)")
    ensure_secrets(values)
    values = with_secrets(values)
    state_dir = Path(hub["state_dir"])
    log_dir = state_dir / "logs"

    try:
        proxy = ensure_proxy(progress=step)
    except NodePiecesError as e:
        print(f"labfleet: {e}", file=sys.stderr)
        return 1
    env = {
        **os.environ,
        "LABFLEET_CONFIG": str(Path(args.config).resolve()),
        "PATH": f"{Path(proxy).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }

    idp = None
    withheld: list[str] = []
    if values["devidp"]["enabled"]:
        from . import devidp
        from .configurer import devidp_withheld_groups

        step("starting the development identity provider")
        # no demo account is a hub admin unless devidp.demo_admin asks for one
        withheld = devidp_withheld_groups(values)
        devidp.ensure_installed()
        idp = devidp.start(
            port=values["devidp"]["port"],
            issuer=values["iam"]["issuer"],
            accounts_path=values["devidp"]["accounts"],
            clients=[
                {
                    "client_id": values["iam"]["client_id"],
                    "client_secret": values["secrets"]["client_secret"],
                    "redirect_uris": [
                        f"{hub['public_url']}{hub['base_url'].rstrip('/')}/hub/oauth_callback"
                    ],
                }
            ],
            log_path=log_dir / "devidp.log",
            withhold_groups=withheld,
        )

    config_file = str(resources.files(__package__).joinpath("jupyterhub_config.py"))
    step(f"starting JupyterHub (log: {log_dir / 'jupyterhub.log'})")
    with open(log_dir / "jupyterhub.log", "ab") as log:
        hub_process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", config_file],
            cwd=state_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def stop(*_):
        if hub_process.poll() is None:
            os.killpg(hub_process.pid, signal.SIGTERM)
            try:
                hub_process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(hub_process.pid, signal.SIGKILL)
        stop_stray_proxy(state_dir / "jupyterhub-proxy.pid")
        if idp is not None:
            idp.stop()

    signal.signal(signal.SIGTERM, lambda *a: (stop(), sys.exit(0)))
    try:
        url = f"{hub['public_url']}{hub['base_url'].rstrip('/')}/hub/health"
        if not wait_for_health(url, hub_process):
            print(
                f"labfleet: JupyterHub did not start; see {log_dir / 'jupyterhub.log'}",
                file=sys.stderr,
            )
            stop()
            return 1
        # JupyterHub writes the proxy's pid file with the default umask
        pid_file = state_dir / "jupyterhub-proxy.pid"
        with contextlib.suppress(StateError, OSError):
            if pid_file.is_file():
                private_file(pid_file)
        print()
        print(f"labfleet is up: {hub['public_url']}{hub['base_url']}")
        if values["devidp"]["enabled"]:
            print("Demo accounts (development identity provider, NOT for production):")
            for name, password, groups in demo_accounts(values["devidp"]["accounts"], withheld):
                print(f"  {name:10} password {password:14} groups {', '.join(groups)}")
            if withheld:
                print(
                    f"  (nobody is in {', '.join(withheld)}: no demo account is a hub admin; "
                    "devidp.demo_admin: true gives the accounts file's admins)"
                )
        print("Press Ctrl-C to stop.", flush=True)
        return hub_process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="labfleet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the single-node platform in the foreground")
    up.add_argument("--config", default=DEFAULT_CONFIG, help="platform YAML (default: %(default)s)")
    up.set_defaults(func=cmd_up)
    setup = sub.add_parser(
        "setup",
        help="install the Node.js pieces (configurable-http-proxy, development identity "
        "provider) into the cache; make run and make test do this first",
    )
    setup.set_defaults(func=cmd_setup)
    check = sub.add_parser("check-config", help="validate the platform YAML and its catalogue")
    check.add_argument("--config", default=DEFAULT_CONFIG)
    check.set_defaults(func=cmd_check_config)
    prom = sub.add_parser(
        "prometheus-config",
        help="print a Prometheus scrape configuration for the accounting service's /metrics "
        "and, on a single node, the GPU exporter's (with the generated bearer tokens' files)",
    )
    prom.add_argument("--config", default=DEFAULT_CONFIG)
    prom.add_argument(
        "--token-file",
        default=None,
        help="credentials_file to name (default: the generated token in hub.state_dir/secrets)",
    )
    prom.add_argument(
        "--exporter-token-file",
        default=None,
        help="single node: the GPU exporter job's credentials_file (default: the generated "
        "hub.state_dir/secrets/gpu-exporter-metrics-token)",
    )
    prom.set_defaults(func=cmd_prometheus_config)
    sync = sub.add_parser(
        "sync-queues",
        help="Kubernetes mode: apply the batch queue layout (namespaces, Kueue queues, "
        "flavors, priorities) with server-side apply; run as the platform admin",
    )
    sync.add_argument("--config", default=DEFAULT_CONFIG)
    sync.add_argument(
        "--kubeconfig", default="", help="default: in-cluster, else $KUBECONFIG / ~/.kube/config"
    )
    sync.add_argument(
        "--dry-run", action="store_true", help="print the objects as YAML; apply nothing"
    )
    sync.set_defaults(func=cmd_sync_queues)
    images.add_parser(sub)
    release = sub.add_parser(
        "release-name",
        help="hand a hub user name to another identity-provider account (a recreated IAM "
        "account): delete the name's subject binding; run as the platform admin",
    )
    release.add_argument("name", help="the hub user name")
    release.add_argument("--config", default=DEFAULT_CONFIG)
    release.set_defaults(func=cmd_release_name)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
