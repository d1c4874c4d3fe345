#!/usr/bin/env python3
"""Local Kubernetes control plane for the labfleet test suite.

Starts, on 127.0.0.1 only and on random free ports:

    etcd -> kube-apiserver -> kube-controller-manager + kube-scheduler
         -> Kueue CRDs -> kwok (fake nodes from fleet.yaml) -> Kueue manager
         -> Kueue webhooks (https://127.0.0.1:<port>)
         -> the real node (containerd, kubelet, kube-proxy on a host-only
            bridge; node.py), where root and the kernel allow

Every process runs in its own process group (session); ``down`` / ``stop``
signals the groups and verifies that nothing is left.  Binaries come from
``tools/cluster/build.sh`` (cached under ``$LABFLEET_CACHE/cluster``).

CLI::

    python tools/cluster/cluster.py up   --state DIR [--fleet FILE] [--no-webhooks]
                                         [--real-node auto|1|0]
    python tools/cluster/cluster.py down --state DIR [--purge]
    python tools/cluster/cluster.py status --state DIR

Library::

    from cluster import start_cluster, stop_cluster
    c = start_cluster(state_dir)        # -> Cluster(kubeconfig, server, ...)
    c.kubectl("get", "nodes")
    stop_cluster(state_dir)

Only the standard library and PyYAML are needed (plus ``openssl`` on PATH).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import ipaddress
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_FLEET = HERE / "fleet.yaml"
STAGES_FILE = HERE / "kwok-stages.yaml"
BUILD_SH = HERE / "build.sh"


def _load_sibling(name: str):
    """Import tools/cluster/<name>.py whatever sys.path is (tests load this file by path)."""
    modname = f"labfleet_cluster_{name}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


procs_lib = _load_sibling("procs")
# re-exported: the tests and the fixture use these through this module
ClusterError = procs_lib.ClusterError
COMPONENT_ORDER = procs_lib.COMPONENT_ORDER
_Procs = procs_lib._Procs
_wait = procs_lib._wait
_proc_alive = procs_lib._proc_alive
_group_members = procs_lib._group_members
cluster_pids = procs_lib.cluster_pids
tail = procs_lib.tail
kueue_parts = _load_sibling("kueue_parts")
pki_lib = _load_sibling("pki")
write_kubeconfig = pki_lib.write_kubeconfig
kueue_webhook_manifests = kueue_parts.kueue_webhook_manifests
node_lib = _load_sibling("node")

#: Pod IPs handed out by kwok (must stay inside 127.0.0.0/8).
POD_CIDR = "127.100.0.1/16"
#: Required by kube-apiserver; nothing ever dials a service IP here.
SERVICE_CIDR = "127.96.0.0/16"
#: kwok's fallback node IP for nodes without status.addresses.
KWOK_NODE_IP = "127.0.9.1"
#: Nodes with this annotation are managed by kwok.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")


Progress = Callable[[str], None]


binaries_lib = _load_sibling("binaries")
BinariesMissing = binaries_lib.BinariesMissing
versions = binaries_lib.versions
cache_root = binaries_lib.cache_root
component_dirs = binaries_lib.component_dirs
node_binaries = binaries_lib.node_binaries
helm_binary = binaries_lib.helm_binary
Binaries = binaries_lib.Binaries
find_binaries = binaries_lib.find_binaries
ensure_binaries = binaries_lib.ensure_binaries

# --------------------------------------------------------------------------
# small helpers


def _print(msg: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# fleet


def load_fleet(path: Path | str = DEFAULT_FLEET) -> list[dict]:
    """Node manifests (v1 Node dicts, with status) described by fleet.yaml."""
    spec = yaml.safe_load(Path(path).read_text())
    defaults = spec.get("defaults", {})
    nodes = []
    for n in spec["nodes"]:
        ip = n["ip"]
        if ipaddress.ip_address(ip) not in ipaddress.ip_network("127.0.0.0/8"):
            raise ClusterError(f"fleet node {n['name']}: ip {ip} is outside 127.0.0.0/8")
        labels = {
            **defaults.get("labels", {}),
            "kubernetes.io/hostname": n["name"],
            **n.get("labels", {}),
        }
        capacity = {**defaults.get("capacity", {}), **n.get("capacity", {})}
        allocatable = {**capacity, **n.get("allocatable", {})}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": n["name"],
                "labels": {k: str(v) for k, v in labels.items()},
                "annotations": {
                    KWOK_NODE_ANNOTATION[0]: KWOK_NODE_ANNOTATION[1],
                    "node.alpha.kubernetes.io/ttl": "0",
                    **n.get("annotations", {}),
                },
            },
            "spec": {"taints": n.get("taints", [])},
            "status": {
                "capacity": {k: str(v) for k, v in capacity.items()},
                "allocatable": {k: str(v) for k, v in allocatable.items()},
                "addresses": [
                    {"type": "InternalIP", "address": ip},
                    {"type": "Hostname", "address": n["name"]},
                ],
            },
        }
        nodes.append(node)
    return nodes


# --------------------------------------------------------------------------
# the cluster object


@dataclasses.dataclass
class Cluster:
    state_dir: Path
    kubeconfig: Path
    server: str
    token: str
    ca_file: Path
    kubectl_bin: Path
    ports: dict[str, int]
    webhooks: bool
    #: versions of visibility.kueue.x-k8s.io served through the aggregator ([] if off)
    visibility: list[str] = dataclasses.field(default_factory=list)
    #: the real node's facts (name, node_ip, pod_cidr, service_cidr, ...), None without one
    real_node: dict | None = None
    #: why there is no real node ("" when there is one)
    real_node_reason: str = ""

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses that should talk to this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        cmd = [str(self.kubectl_bin), "--kubeconfig", str(self.kubeconfig), *args]
        r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise ClusterError(
                f"kubectl {' '.join(args)} failed ({r.returncode}):\n{r.stderr.strip()}"
            )
        return r

    def kubectl_json(self, *args: str, timeout: float = 60) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json", timeout=timeout).stdout)

    def apply(self, manifest: str | dict | list, *extra: str) -> str:
        """kubectl apply -f - ; accepts YAML text, a dict, or a list of dicts."""
        if isinstance(manifest, dict):
            manifest = [manifest]
        if isinstance(manifest, list):
            manifest = yaml.safe_dump_all(manifest, sort_keys=False)
        return self.kubectl("apply", "-f", "-", *extra, input=manifest).stdout

    def api_get(self, path: str) -> Any:
        """GET a raw API path (e.g. '/readyz' or '/api/v1/nodes'); JSON or text."""
        return _api_get(self.server, path, self.token, self.ca_file)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}

    @classmethod
    def from_state(cls, state_dir: Path | str) -> Cluster:
        state_dir = Path(state_dir)
        d = json.loads((state_dir / "cluster.json").read_text())
        return cls(
            state_dir=state_dir,
            kubeconfig=Path(d["kubeconfig"]),
            server=d["server"],
            token=d["token"],
            ca_file=Path(d["ca_file"]),
            kubectl_bin=Path(d["kubectl_bin"]),
            ports=d["ports"],
            webhooks=d["webhooks"],
            visibility=d.get("visibility", []),
            real_node=d.get("real_node"),
            real_node_reason=d.get("real_node_reason", ""),
        )


def _api_get(server: str, path: str, token: str, ca: Path, timeout: float = 5) -> Any:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(server + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
        body = r.read().decode()
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return body


def _http_ok(url: str, timeout: float = 2, insecure: bool = True) -> bool:
    ctx = None
    if url.startswith("https://"):
        ctx = ssl.create_default_context()
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


# --------------------------------------------------------------------------
# start


def start_cluster(
    state_dir: Path | str,
    *,
    fleet: Path | str | None = DEFAULT_FLEET,
    webhooks: bool = True,
    kueue: bool = True,
    build: bool = True,
    die_with_parent: bool = False,
    progress: Progress | None = None,
    timeout: float = 180,
    real_node: str | None = None,
) -> Cluster:
    """Start the whole cluster; on any failure, stop what was started and raise.

    ``real_node``: ``"auto"`` (start one where root and the kernel allow, else
    say why in ``Cluster.real_node_reason``), ``"1"`` (must start), ``"0"``
    (KWOK only); default from ``$LABFLEET_REAL_NODE``, else ``"auto"``."""
    progress = progress or _print
    state_dir = Path(state_dir).resolve()
    if (state_dir / "pids.json").exists():
        raise ClusterError(
            f"{state_dir} already holds a running cluster (pids.json); run 'down' first"
        )
    b = ensure_binaries(build=build, progress=progress)
    state_dir.mkdir(parents=True, exist_ok=True)
    mode = real_node if real_node is not None else node_lib.requested_mode()
    plan, reason = _plan_real_node(state_dir, mode, build, progress)
    procs = _Procs(state_dir, die_with_parent)
    try:
        return _start(
            state_dir, b, procs, fleet, webhooks, kueue, progress, timeout, (plan, reason, mode)
        )
    except BaseException:
        if plan is not None:
            node_lib.release(plan)
        progress("start failed; tearing down")
        try:
            stop_cluster(state_dir, progress=progress)
        except Exception as e:  # pragma: no cover - reported, original error wins
            progress(f"teardown after failed start: {e}")
        raise


def _start(
    state_dir: Path,
    b: Binaries,
    procs: _Procs,
    fleet: Path | str | None,
    webhooks: bool,
    kueue: bool,
    progress: Progress,
    timeout: float,
    node: tuple = (None, "", "0"),
) -> Cluster:
    t0 = time.monotonic()
    plan, no_node_reason, node_mode = node
    pki = state_dir / "pki"
    progress(f"state dir {state_dir}; generating certificates")
    ns, svc = kueue_parts.VISIBILITY_SERVICE
    try:
        # the extra name is what the aggregator verifies for Kueue's visibility API
        pki_lib.make_pki(pki, extra_dns=(f"{svc}.{ns}.svc",))
    except pki_lib.PkiError as e:
        raise ClusterError(str(e)) from None
    token = secrets.token_hex(24)
    (pki / "tokens.csv").write_text(f'{token},labfleet-admin,labfleet-admin,"system:masters"\n')
    (pki / "tokens.csv").chmod(0o600)

    names = [
        "etcd-client",
        "etcd-peer",
        "apiserver",
        "kcm",
        "scheduler",
        "kwok",
        "kueue-webhook",
        "kueue-metrics",
        "kueue-health",
        "kueue-visibility",
    ]
    ports: dict[str, int] = {}
    while len(set(ports.values())) != len(names):
        ports = {n: free_port() for n in names}
    server = f"https://127.0.0.1:{ports['apiserver']}"
    kubeconfig = state_dir / "kubeconfig"
    write_kubeconfig(kubeconfig, server, pki / "ca.crt", token)
    cluster = Cluster(
        state_dir=state_dir,
        kubeconfig=kubeconfig,
        server=server,
        token=token,
        ca_file=pki / "ca.crt",
        kubectl_bin=b.kubectl,
        ports=ports,
        webhooks=webhooks and kueue,
        real_node_reason=no_node_reason,
    )

    # etcd ---------------------------------------------------------------
    etcd_url = f"http://127.0.0.1:{ports['etcd-client']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    progress(f"starting etcd on {etcd_url}")
    procs.start(
        "etcd",
        [
            str(b.etcd),
            "--name",
            "labfleet",
            "--data-dir",
            str(state_dir / "etcd"),
            "--listen-client-urls",
            etcd_url,
            "--advertise-client-urls",
            etcd_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            f"labfleet={peer_url}",
            "--initial-cluster-state",
            "new",
            "--unsafe-no-fsync",
            "--quota-backend-bytes",
            str(2 * 1024**3),
            "--log-level",
            "warn",
        ],
    )
    _wait("etcd /health", lambda: _http_ok(etcd_url + "/health"), 30, procs, "etcd")

    # kube-apiserver ---------------------------------------------------------
    progress(f"starting kube-apiserver on {server}")
    procs.start(
        "kube-apiserver",
        [
            str(b.kube_apiserver),
            "--etcd-servers",
            etcd_url,
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            "--secure-port",
            str(ports["apiserver"]),
            "--tls-cert-file",
            str(pki / "server.crt"),
            "--tls-private-key-file",
            str(pki / "server.key"),
            "--client-ca-file",
            str(pki / "ca.crt"),
            "--token-auth-file",
            str(pki / "tokens.csv"),
            "--authorization-mode",
            "Node,RBAC",
            "--service-account-issuer",
            "https://kubernetes.default.svc",
            "--service-account-key-file",
            str(pki / "sa.pub"),
            "--service-account-signing-key-file",
            str(pki / "sa.key"),
            "--service-cluster-ip-range",
            # pods on the real node reach services through kube-proxy on its bridge
            node_lib.SERVICE_CIDR if plan is not None else SERVICE_CIDR,
            # logs/exec on the real node: the apiserver calls kubelet at its InternalIP
            "--kubelet-client-certificate",
            str(pki / "server.crt"),
            "--kubelet-client-key",
            str(pki / "server.key"),
            "--kubelet-preferred-address-types",
            "InternalIP",
            # API aggregation (Kueue's visibility API): the aggregator's client
            # certificate and the request-header identity it forwards.
            "--requestheader-client-ca-file",
            str(pki / "front-proxy-ca.crt"),
            "--requestheader-allowed-names",
            pki_lib.FRONT_PROXY_CLIENT,
            "--requestheader-username-headers",
            "X-Remote-User",
            "--requestheader-group-headers",
            "X-Remote-Group",
            "--requestheader-extra-headers-prefix",
            "X-Remote-Extra-",
            "--proxy-client-cert-file",
            str(pki / "front-proxy-client.crt"),
            "--proxy-client-key-file",
            str(pki / "front-proxy-client.key"),
            "--endpoint-reconciler-type",
            "none",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ],
    )
    _wait(
        "kube-apiserver /readyz",
        lambda: _api_get(server, "/readyz", token, pki / "ca.crt") == "ok",
        60,
        procs,
        "kube-apiserver",
        interval=0.5,
    )
    progress(f"kube-apiserver ready ({time.monotonic() - t0:.0f}s)")

    # controller-manager + scheduler -----------------------------------------
    progress("starting kube-controller-manager and kube-scheduler")
    procs.start(
        "kube-controller-manager",
        [
            str(b.kube_controller_manager),
            "--kubeconfig",
            str(kubeconfig),
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            str(ports["kcm"]),
            "--cert-dir",
            str(state_dir / "kcm-certs"),
            "--leader-elect=false",
            "--service-account-private-key-file",
            str(pki / "sa.key"),
            "--root-ca-file",
            str(pki / "ca.crt"),
            "--use-service-account-credentials=false",
            "--controllers",
            "*",
            "--node-monitor-grace-period",
            "60s",
            "--v=1",
        ],
    )
    procs.start(
        "kube-scheduler",
        [
            str(b.kube_scheduler),
            "--kubeconfig",
            str(kubeconfig),
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            str(ports["scheduler"]),
            "--cert-dir",
            str(state_dir / "scheduler-certs"),
            "--leader-elect=false",
            "--v=1",
        ],
    )

    # CRDs while the controllers come up ---------------------------------------
    if kueue:
        progress("installing Kueue CRDs")
        cluster.kubectl("apply", "--server-side", "-f", str(b.kueue_crds), timeout=120)
        cluster.apply(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kueue-system"}}
        )

    _wait(
        "kube-controller-manager /healthz",
        lambda: _http_ok(f"https://127.0.0.1:{ports['kcm']}/healthz"),
        60,
        procs,
        "kube-controller-manager",
    )
    _wait(
        "kube-scheduler /healthz",
        lambda: _http_ok(f"https://127.0.0.1:{ports['scheduler']}/healthz"),
        60,
        procs,
        "kube-scheduler",
    )

    # kwok + fleet -------------------------------------------------------------
    progress(f"starting kwok (pod CIDR {POD_CIDR})")
    procs.start(
        "kwok",
        [
            str(b.kwok),
            "-c",
            str(STAGES_FILE),
            "--kubeconfig",
            str(kubeconfig),
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector",
            "=".join(KWOK_NODE_ANNOTATION),
            "--cidr",
            POD_CIDR,
            "--node-ip",
            KWOK_NODE_IP,
            "--server-address",
            f"127.0.0.1:{ports['kwok']}",
            "--node-lease-duration-seconds",
            "40",
        ],
    )
    _wait(
        "kwok /healthz",
        lambda: _http_ok(f"http://127.0.0.1:{ports['kwok']}/healthz"),
        30,
        procs,
        "kwok",
    )

    nodes: list[dict] = []
    if fleet:
        nodes = load_fleet(fleet)
        progress(f"creating {len(nodes)} fake nodes from {fleet}")
        cluster.kubectl("create", "-f", "-", input=yaml.safe_dump_all(nodes))

    # Kueue ----------------------------------------------------------------------
    if kueue:
        certdir = state_dir / "kueue-certs"
        certdir.mkdir(exist_ok=True)
        shutil.copy(pki / "server.crt", certdir / "tls.crt")
        shutil.copy(pki / "server.key", certdir / "tls.key")
        # build.sh points the visibility server at <cwd>/visibility-certs
        shutil.copytree(certdir, state_dir / "visibility-certs", dirs_exist_ok=True)
        (state_dir / "kueue-config.yaml").write_text(
            yaml.safe_dump(kueue_parts.kueue_config(ports, certdir), sort_keys=False)
        )
        cluster.kubectl(
            "wait", "--for", "condition=Established", "crd", "--all", "--timeout", "60s", timeout=90
        )
        progress("starting Kueue manager")
        procs.start(
            "kueue",
            [
                str(b.kueue),
                "--config",
                str(state_dir / "kueue-config.yaml"),
                # also what the visibility server uses for delegated authn/authz
                "--kubeconfig",
                str(kubeconfig),
            ],
            env={
                **os.environ,
                "KUBECONFIG": str(kubeconfig),
                "KUEUE_METRICS_CERT_DIR": str(certdir),
            },
        )
        _wait(
            "Kueue /readyz",
            lambda: _http_ok(f"http://127.0.0.1:{ports['kueue-health']}/readyz"),
            90,
            procs,
            "kueue",
            interval=0.5,
        )
        if webhooks:
            progress(f"registering Kueue webhooks at https://127.0.0.1:{ports['kueue-webhook']}")
            cluster.apply(
                kueue_webhook_manifests(
                    b.kueue_webhooks,
                    f"https://127.0.0.1:{ports['kueue-webhook']}",
                    (pki / "ca.crt").read_bytes(),
                )
            )
        cluster.visibility = _register_visibility(cluster, b, ports, pki, procs, progress)

    # readiness ------------------------------------------------------------------
    if nodes:
        progress("waiting for the fleet to be Ready")
        cluster.kubectl(
            "wait", "--for", "condition=Ready", "node", "--all", "--timeout", "60s", timeout=90
        )
    _wait(
        "default service account",
        lambda: (
            cluster.kubectl(
                "get", "serviceaccount", "default", "-n", "default", check=False
            ).returncode
            == 0
        ),
        60,
    )
    if plan is not None:
        try:
            cluster.real_node = node_lib.start(plan, cluster, procs, free_port, _wait, progress)
        except (node_lib.NodeError, ClusterError, subprocess.SubprocessError, OSError) as e:
            if node_mode == "1":
                raise
            progress(f"the real node failed to start; continuing with KWOK only: {e}")
            _stop_real_node(state_dir, 15, progress)
            cluster.real_node_reason = f"the real node failed to start: {e}"
    for name in procs.popen:
        procs.check_alive(name)

    (state_dir / "cluster.json").write_text(json.dumps(cluster.to_json(), indent=1))
    progress(f"cluster ready in {time.monotonic() - t0:.0f}s: KUBECONFIG={kubeconfig}")
    return cluster


def _register_visibility(
    cluster: Cluster, b: Binaries, ports: dict[str, int], pki: Path, procs: _Procs, progress
) -> list[str]:
    """Register Kueue's visibility APIServices; the versions that became Available.

    Never fatal: a cluster without the visibility API is still useful (clients
    fall back to Workload status), so a failure is logged with the
    APIService's condition and [] returned."""
    versions = kueue_parts.visibility_versions(b.kueue_visibility)
    port = ports["kueue-visibility"]
    progress(f"registering Kueue visibility API {versions} at https://127.0.0.1:{port}")
    cluster.apply(
        kueue_parts.visibility_manifests(b.kueue_visibility, port, (pki / "ca.crt").read_bytes())
    )
    names = [f"{v}.visibility.kueue.x-k8s.io" for v in versions]

    def available() -> bool:
        for name in names:
            svc = cluster.kubectl_json("get", "apiservice", name)
            conds = {c["type"]: c for c in svc.get("status", {}).get("conditions", [])}
            if conds.get("Available", {}).get("status") != "True":
                return False
        return True

    try:
        _wait("Kueue visibility APIServices Available", available, 45, procs, "kueue")
    except ClusterError as e:
        progress(f"visibility API unavailable, continuing without it: {e}")
        return []
    return versions


# --------------------------------------------------------------------------
# the real node (tools/cluster/node.py)


def _plan_real_node(state_dir: Path, mode: str, build: bool, progress: Progress):
    """(the lock-holding plan, or None; why not) for ``mode`` auto/1/0."""
    if mode == "0":
        return None, f"switched off ({node_lib.ENV_VAR}=0)"
    if node_binaries() is None and build and shutil.which("gcc") and shutil.which("go"):
        subprocess.run(["bash", str(BUILD_SH), "kubernetes", "pause"], stdout=sys.stderr)
    plan, reason = None, node_lib.unavailable_reason(node_binaries()) or ""
    if not reason:
        try:
            plan = node_lib.acquire(state_dir, node_binaries(), 60, progress)
        except node_lib.NodeError as e:
            reason = str(e)
    if reason and mode == "1":
        raise ClusterError(f"real node requested but unavailable: {reason}")
    if reason:
        progress(f"no real node: {reason}")
    return plan, reason


def _stop_real_node(state_dir: Path, timeout: float, progress: Progress) -> None:
    kubectl = None
    if (state_dir / "cluster.json").exists():
        c = Cluster.from_state(state_dir)

        def kubectl(*args, check=False, timeout=30):
            return c.kubectl(*args, check=check, timeout=timeout)

    try:
        node_lib.stop(
            state_dir,
            kubectl,
            lambda names: procs_lib.stop_components(state_dir, names, timeout),
            progress,
        )
    except (node_lib.NodeError, subprocess.SubprocessError, OSError) as e:
        raise ClusterError(str(e)) from None


def stop_real_node(cluster: Cluster, progress: Progress | None = None) -> None:
    """Stop only the real node and sweep what it made; the control plane keeps running."""
    _stop_real_node(cluster.state_dir, 15, progress or _print)
    cluster.real_node = None


def start_real_node(
    cluster: Cluster, die_with_parent: bool = False, progress: Progress | None = None
) -> dict:
    """Start the real node again on a running cluster that was started with one."""
    progress = progress or _print
    plan, reason = _plan_real_node(cluster.state_dir, "1", True, progress)
    procs = _Procs(cluster.state_dir, die_with_parent)
    procs.record = json.loads((cluster.state_dir / "pids.json").read_text())
    try:
        cluster.real_node = node_lib.start(plan, cluster, procs, free_port, _wait, progress)
    except BaseException:
        node_lib.release(plan)
        _stop_real_node(cluster.state_dir, 15, progress)
        raise
    cluster.kubectl("uncordon", node_lib.NODE_NAME)
    (cluster.state_dir / "cluster.json").write_text(json.dumps(cluster.to_json(), indent=1))
    return cluster.real_node


def stop_cluster(
    state_dir: Path | str, timeout: float = 15, progress: Progress | None = None
) -> None:
    """Stop the cluster in state_dir (the real node first, swept clean); raise on leftovers."""
    progress = progress or _print
    state_dir = Path(state_dir)
    error: Exception | None = None
    if (state_dir / "pids.json").exists() and node_lib.present(state_dir):
        try:
            _stop_real_node(state_dir, timeout, progress)
        except ClusterError as e:
            error = e
    procs_lib.stop_cluster(state_dir, timeout, progress)
    if error is not None:
        raise error


# --------------------------------------------------------------------------
# CLI


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the cluster (processes keep running after exit)")
    up.add_argument("--state", required=True, type=Path)
    up.add_argument("--fleet", default=str(DEFAULT_FLEET), help="fleet file ('' for no nodes)")
    up.add_argument("--no-webhooks", action="store_true", help="do not register Kueue webhooks")
    up.add_argument("--no-kueue", action="store_true", help="do not start Kueue")
    up.add_argument("--no-build", action="store_true", help="fail instead of running build.sh")
    up.add_argument(
        "--real-node",
        choices=["auto", "1", "0"],
        default=None,
        help="the real node: auto (default; where root and the kernel allow), 1 (must), 0 (none)",
    )
    down = sub.add_parser("down", help="stop the cluster")
    down.add_argument("--state", required=True, type=Path)
    down.add_argument("--purge", action="store_true", help="also delete the state dir")
    st = sub.add_parser("status", help="print cluster.json and live processes")
    st.add_argument("--state", required=True, type=Path)
    sub.add_parser("build", help="run build.sh")
    args = ap.parse_args(list(argv) if argv is not None else None)

    try:
        if args.cmd == "up":
            c = start_cluster(
                args.state,
                fleet=args.fleet or None,
                webhooks=not args.no_webhooks,
                kueue=not args.no_kueue,
                build=not args.no_build,
                real_node=args.real_node,
            )
            if c.real_node_reason:
                print(f"# no real node: {c.real_node_reason}", file=sys.stderr)
            print(f"export KUBECONFIG={c.kubeconfig}")
        elif args.cmd == "down":
            stop_cluster(args.state)
            if args.purge:
                shutil.rmtree(args.state, ignore_errors=True)
        elif args.cmd == "status":
            c = Cluster.from_state(args.state)
            print(json.dumps({**c.to_json(), "pids": cluster_pids(args.state)}, indent=1))
        elif args.cmd == "build":
            ensure_binaries(build=True)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
