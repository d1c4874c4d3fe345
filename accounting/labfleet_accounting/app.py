"""``labfleet-accounting``: migrate the database, or run the service with its collectors.

    LABFLEET_ACCOUNTING_DB_URL=postgresql+psycopg://... labfleet-accounting migrate
    labfleet-accounting serve --config accounting_config.py

Configuration is traitlets (a Python config file or ``--Class.trait=value``).
Database URLs may hold passwords: give them in the environment
(``LABFLEET_ACCOUNTING_DB_URL``, ``LABFLEET_HUB_DB_URL``) or in the config file,
never on the command line, which every local user can read (``ps``).
As a hub-managed service, the hub's environment (``JUPYTERHUB_API_TOKEN``,
``JUPYTERHUB_SERVICE_PREFIX``, ...) configures the OAuth client; it is read
when the service starts, never at import.
"""

from __future__ import annotations

import asyncio
import os
import sys

from labfleet_hub.bodylimit import HARD_CAP_BYTES
from labfleet_hub.hubauth import AuthCacheConfig
from labfleet_hub.private import ACCOUNTING_DB_URL_ENV, HUB_DB_URL_ENV
from labfleet_hub.procs import stop_event
from labfleet_hub.service_page import HubNav
from prometheus_client import CollectorRegistry
from traitlets import Bool, Dict, Enum, Float, Integer, List, Unicode, default
from traitlets.config import Application, catch_config_error

from . import db
from .budgets import BudgetChecker
from .ledger import Ledger
from .metrics import LedgerMetrics
from .pod_resources import KUBELET_SOCKET
from .reports import Weights
from .service import Context, make_app
from .spool import SpoolCollector


class AccountingApp(AuthCacheConfig, Application):
    name = "labfleet-accounting"
    description = "labfleet accounting: usage ledger, collectors, reports, budgets, metrics."

    db_url = Unicode(
        config=True,
        help="""Ledger database: sqlite:///path (single node) or
        postgresql+psycopg://user@host/db (production). Migrated at start. Default:
        $LABFLEET_ACCOUNTING_DB_URL (how labfleet up passes it: a URL with a password
        does not belong on a command line), else sqlite:///labfleet-accounting.sqlite.""",
    )
    auto_migrate = Bool(
        True, config=True, help="Run the Alembic migrations to head when the service starts."
    )
    ip = Unicode("127.0.0.1", config=True, help="Address the service listens on.")
    port = Integer(0, config=True, help="Port; 0: the port of JUPYTERHUB_SERVICE_URL, else 10101.")
    spool_path = Unicode(
        "",
        config=True,
        help="Single-node mode: ingest this spool written by the local spawner's SpoolHook.",
    )
    kubernetes = Bool(
        False, config=True, help="Kubernetes mode: list and watch labfleet pods (in-cluster)."
    )
    mig_weighting = Enum(
        ("fraction", "whole"),
        default_value="fraction",
        config=True,
        help="""How a MIG slice counts in GPU-hours: "fraction" (its catalogue
        gpu_fraction of a GPU) or "whole" (as one GPU).""",
    )
    gpu_weights = Dict(
        value_trait=Float(),
        config=True,
        help="Per-accelerator GPU-hour weights overriding the above, e.g. {'a100-1g': 0.125}.",
    )
    admin_group_pattern = Unicode(
        "{group}-admins",
        config=True,
        help="""Hub group whose members administer <group>: they see its usage
        and manage its quota. "{group}-admins" makes "ml-admins" admins of "ml".""",
    )
    group_admins = Dict(
        value_trait=List(Unicode()),
        config=True,
        help="Extra group admins: {group: [user, ...]}, in addition to admin_group_pattern.",
    )
    metrics_token = Unicode(
        "",
        config=True,
        help="""The bearer token /metrics requires ('Authorization: Bearer <token>', Prometheus'
        authorization.credentials). Prefer metrics_token_file: a command line is public.""",
    )
    metrics_token_file = Unicode(
        "",
        config=True,
        help="""A file holding the bearer token /metrics requires (read at start; ``labfleet
        up`` generates <state_dir>/secrets/accounting-metrics-token, mode 0600). Without a
        token /metrics answers nobody (403), unless metrics_public.""",
    )
    metrics_public = Bool(
        False,
        config=True,
        help="""Open /metrics to anyone who can reach the service, without a token: every
        group's usage. Only deliberately (accounting.metrics_public: true).""",
    )
    catalogue_path = Unicode(
        "",
        config=True,
        help="""The profile catalogue (catalogue.yaml): accelerator kinds and MIG
        fractions for the Kubernetes collector, flavor names for quotas.""",
    )
    queue_name_prefix = Unicode(
        "labfleet-",
        config=True,
        help="""Prefix of the groups' Kueue ClusterQueues (<prefix><group>), as in the
        batch queue configuration's name_prefix (labfleet_batch.queues).""",
    )
    batch_limits_url = Unicode(
        "",
        config=True,
        help="""Single node: the batch service's URL (e.g.
        http://127.0.0.1:8000/services/batch/). The quota API and page then manage the
        local batch backend's group limits through its api/limits/<group>, with this
        service's hub API token (which needs access:services!service=batch); caps and
        the audit log stay here, as in Kubernetes mode. Empty: no local quotas.""",
    )
    budget_limits_cpu = Bool(
        False, config=True, help="Also refuse CPU-only sessions of a group over its GPU budget."
    )
    recent_limit = Integer(
        50,
        min=0,
        config=True,
        help="""How many sessions and jobs the usage page's "Recent sessions and jobs"
        table (and api/usage/recent) lists at most: the latest the viewer may see in the
        period, newest first. 0 hides them.""",
    )
    hub_services = List(
        Unicode(),
        config=True,
        help="""The hub services listed in the Services menu of the usage page, as the hub
        lists them in its own (``labfleet up`` passes the services it starts). Empty:
        this service only ($JUPYTERHUB_SERVICE_NAME).""",
    )

    subcommands = {
        "migrate": (
            "labfleet_accounting.app.MigrateApp",
            "Migrate the database to the latest schema.",
        ),
        "serve": ("labfleet_accounting.app.ServeApp", "Run the service and its collectors."),
        "gpu-exporter": (
            "labfleet_accounting.app.GpuExporterApp",
            "Export NVML GPU/MIG metrics attributed to their holders (Prometheus).",
        ),
    }
    aliases = {"db-url": "AccountingApp.db_url", "spool": "AccountingApp.spool_path",
               "port": "AccountingApp.port", "config": "AccountingApp.config_file"}  # fmt: skip
    config_file = Unicode("", config=True, help="Python configuration file to load.")

    @default("db_url")
    def _db_url_default(self):
        return os.environ.get(ACCOUNTING_DB_URL_ENV) or "sqlite:///labfleet-accounting.sqlite"

    @catch_config_error
    def initialize(self, argv=None):
        super().initialize(argv)
        if self.subapp is None and self.config_file:
            self.load_config_file(self.config_file)

    def catalogue(self):
        if not self.catalogue_path:
            return None
        from labfleet_spawner.catalogue import load_catalogue

        return load_catalogue(self.catalogue_path)

    def weights(self) -> Weights:
        return Weights(self.mig_weighting, dict(self.gpu_weights))

    def start(self):
        if self.subapp is not None:
            return self.subapp.start()
        self.print_subcommands()
        self.exit(2)

    def metrics_token_value(self) -> str:
        """The metrics token (from metrics_token_file if set); "" keeps /metrics closed.

        The accounting service's and the GPU exporter's (each reads its own file)."""
        token = self.metrics_token
        if self.metrics_token_file:
            try:
                with open(self.metrics_token_file) as f:
                    token = f.read().strip()
            except OSError as e:
                self.log.error(
                    "Metrics closed: cannot read the metrics token %s (%s)",
                    self.metrics_token_file,
                    e.strerror,
                )
                return ""
        if self.metrics_public:
            self.log.warning("/metrics is open to anyone (metrics_public): every group's usage")
        elif not token:
            self.log.warning("/metrics answers nobody: no metrics_token_file or metrics_token")
        return token


class MigrateApp(AccountingApp):
    subcommands = {}

    def start(self):
        engine = db.make_engine(self.db_url)
        revision = db.upgrade(engine)
        print(f"accounting database at revision {revision}")


class ServeApp(AccountingApp):
    subcommands = {}

    def start(self):
        asyncio.run(self.serve())

    async def serve(self):
        # first: a stop (the hub's SIGINT, Ctrl-C, SIGTERM) during migrations counts too
        stop = stop_event()
        engine = db.make_engine(self.db_url)
        if self.auto_migrate:
            db.upgrade(engine)
        ledger = Ledger(engine)
        weights = self.weights()
        registry = CollectorRegistry()
        registry.register(LedgerMetrics(engine, weights))
        api = await self._kube_client() if self.kubernetes else None
        quotas = None
        if api is not None:
            from labfleet_batch.queues import QueueConfig
            from labfleet_hub.kubeclient import KubeAPI

            from .quotas import QuotaManager

            names = QueueConfig(groups={}, name_prefix=self.queue_name_prefix)
            quotas = QuotaManager(KubeAPI(api), engine, names.cluster_queue)
        # a short cache for reads, none for changes (labfleet_hub.hubauth)
        hub_auth = self.make_hub_auth()
        if quotas is None and self.batch_limits_url:
            from .local_quotas import BatchLimits, LocalQuotaManager

            limits = BatchLimits(self.batch_limits_url, hub_auth.api_token)
            quotas = LocalQuotaManager(limits, engine)
        services = self.hub_services or [os.environ.get("JUPYTERHUB_SERVICE_NAME", "")]
        context = Context(
            engine, weights, self.admin_group_pattern, dict(self.group_admins),
            BudgetChecker(engine, weights, self.budget_limits_cpu), registry, quotas=quotas,
            nav=HubNav.from_hub_auth(hub_auth, [s for s in services if s]),
            recent_limit=self.recent_limit,
        )  # fmt: skip
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")
        port = self.port or _service_port() or 10101
        app = make_app(
            context,
            hub_auth,
            prefix,
            self.metrics_token_value(),
            metrics_public=self.metrics_public,
        )
        server = app.listen(port, self.ip, xheaders=True, max_body_size=HARD_CAP_BYTES)
        self.log.info("Accounting service on http://%s:%d%s", self.ip, port, prefix)
        tasks = []
        if self.spool_path:
            tasks.append(SpoolCollector(ledger, path=self.spool_path, parent=self).run(stop))
        if api is not None:
            tasks.append(self._kube(api, ledger, stop))
        await asyncio.gather(stop.wait(), *tasks)
        server.stop()
        if api is not None:
            await api.close()
        engine.dispose()

    async def _kube_client(self):
        from labfleet_hub.kubeclient import api_client

        return await api_client()

    async def _kube(self, api, ledger, stop):
        from kubernetes_asyncio import client

        from .kube import KubeCollector, KubePodSource

        # the client is serve()'s: shared with the quota manager, closed there
        collector = KubeCollector(KubePodSource(client.CoreV1Api(api)), ledger, parent=self)
        catalogue = self.catalogue()
        if catalogue is not None:
            collector.accelerators = dict(catalogue.accelerators)
        await collector.run(stop)


class GpuExporterApp(AccountingApp):
    """``labfleet-accounting gpu-exporter``: NVML metrics per GPU/MIG instance, with owners.

    Single node: ``LABFLEET_HUB_DB_URL=sqlite:///.labfleet/jupyterhub.sqlite`` (or
    ``--GpuExporterApp.hub_db_url``; URLs with passwords only in the environment or a
    config file) and ``LABFLEET_ACCOUNTING_DB_URL`` for the groups. Kubernetes, as the DaemonSet of
    ``accounting/manifests/gpu-exporter.yaml``: ``--GpuExporterApp.kubernetes=True``
    (the kubelet's pod-resources socket and the node's pods, see gpu_exporter).

    ``/metrics`` (every GPU's holder) answers only ``Authorization: Bearer <token>``
    with the token of ``metrics_token_file``, like the accounting service's.
    """

    subcommands = {}
    metrics_token_file = Unicode(
        "",
        config=True,
        help="""A file holding the bearer token the exporter's /metrics requires (read at
        start). Single node: ``labfleet up`` generates
        <state_dir>/secrets/gpu-exporter-metrics-token (0600) and ``labfleet
        prometheus-config`` names it; Kubernetes: the DaemonSet mounts it from the Secret
        labfleet-gpu-exporter-metrics-token. Without a token /metrics answers nobody
        (403), unless metrics_public.""",
    )
    metrics_public = Bool(
        False,
        config=True,
        help="""Open the exporter's /metrics to anyone who can reach it, without a token
        (who holds which GPU). Only deliberately.""",
    )
    exporter_ip = Unicode("127.0.0.1", config=True, help="Address the exporter listens on.")
    exporter_port = Integer(9835, config=True, help="Port of the exporter's /metrics.")
    hub_db_url = Unicode(
        config=True,
        help="""Single node: the hub database, whose spawner states name the devices held.
        Default: $LABFLEET_HUB_DB_URL.""",
    )
    kubernetes = Bool(
        False,
        config=True,
        help="""Kubernetes (DaemonSet) mode: devices held per pod from the kubelet's
        pod-resources socket (pod_resources_socket), users and groups from the labels
        of this node's pods (node_name), listed with the in-cluster service account.""",
    )
    pod_resources_socket = Unicode(
        KUBELET_SOCKET,
        config=True,
        help="Kubernetes mode: the kubelet's pod-resources gRPC socket (mounted from the host).",
    )
    node_name = Unicode(
        config=True,
        help="""Kubernetes mode: the node this exporter runs on, whose pods are listed
        (spec.nodeName). Default: $NODE_NAME, set by the DaemonSet (downward API).""",
    )
    pod_resources_json = Unicode(
        "",
        config=True,
        help="""Debugging and tests: read the kubelet's ListPodResourcesResponse from
        this JSON file (with optionally "pods": the node's pods) instead of the socket.""",
    )

    @default("hub_db_url")
    def _hub_db_url_default(self):
        return os.environ.get(HUB_DB_URL_ENV, "")

    @default("node_name")
    def _node_name_default(self):
        return os.environ.get("NODE_NAME", "")

    def owners(self, list_pods=None):
        """The owners function for the mode; ``list_pods``: the node's pods (Kubernetes mode)."""
        from .gpu_exporter import HubStateOwners, NodeOwners, pod_resources_owners

        if self.hub_db_url:
            ledger = db.make_engine(self.db_url) if self.db_url else None
            return HubStateOwners(db.make_engine(self.hub_db_url), ledger)
        if self.pod_resources_json:
            import json
            from pathlib import Path

            def from_file():
                data = json.loads(Path(self.pod_resources_json).read_text())
                return pod_resources_owners(data, data.get("pods") or [])

            return from_file
        if self.kubernetes:
            from functools import partial

            from .pod_resources import list_pod_resources

            return NodeOwners(partial(list_pod_resources, self.pod_resources_socket), list_pods)
        return None

    def start(self):
        if self.kubernetes and not self.pod_resources_json and not self.node_name:
            self.log.critical(
                "Kubernetes mode needs the node's name: NODE_NAME (downward API "
                "spec.nodeName) or --GpuExporterApp.node_name"
            )
            self.exit(2)
        asyncio.run(self.serve())

    async def serve(self):
        from tornado import web

        from .gpu_exporter import GpuCollector, GpuSampler, list_node_pods, threadsafe
        from .metrics_http import MetricsHandler

        stopped = stop_event()
        api = list_pods = None
        if self.kubernetes and not self.pod_resources_json:
            from kubernetes_asyncio import client
            from labfleet_hub.kubeclient import api_client

            api = await api_client()  # in-cluster: the DaemonSet's service account
            core = client.CoreV1Api(api)
            loop = asyncio.get_running_loop()
            list_pods = threadsafe(lambda: list_node_pods(core, self.node_name), loop)
        registry = CollectorRegistry()
        registry.register(GpuCollector(GpuSampler(), self.owners(list_pods)))
        # the accounting service's own handler: the same bearer check (metrics_token_file)
        handler_args = {
            "registry": registry,
            "token": self.metrics_token_value(),
            "public": self.metrics_public,
            "realm": "labfleet GPU exporter",
            "token_setting": "GpuExporterApp.metrics_token_file",
        }
        app = web.Application([("/metrics", MetricsHandler, handler_args)])
        server = app.listen(self.exporter_port, self.exporter_ip)
        self.log.info("GPU exporter on http://%s:%d/metrics", self.exporter_ip, self.exporter_port)
        await stopped.wait()
        server.stop()
        if api is not None:
            await api.close()


def _service_port() -> int | None:
    from urllib.parse import urlparse

    url = os.environ.get("JUPYTERHUB_SERVICE_URL")
    return urlparse(url).port if url else None


def main(argv=None) -> int:
    from labfleet_hub.procs import die_with_hub

    die_with_hub()
    try:
        AccountingApp.launch_instance(argv)
    except KeyboardInterrupt:
        # interrupted before its loop ran (imports, configuration): a stop all the same
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
