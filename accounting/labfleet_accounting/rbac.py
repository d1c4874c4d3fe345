"""RBAC for the accounting service's ServiceAccount in Kubernetes mode: one ClusterRole.

Exactly the API calls the service makes, nothing more:

1. ``pods`` (core group), ``list`` + ``watch``, cluster-wide: the collector
   (:class:`labfleet_accounting.kube.KubePodSource`) lists and watches
   labfleet pods in every namespace (``list_pod_for_all_namespaces``, with and
   without ``watch=True``). It never reads a single pod by name, so no ``get``.
   Notebook pods live in user namespaces the service cannot know in advance,
   hence a ClusterRole rather than per-namespace Roles.
2. ``clusterqueues`` (``kueue.x-k8s.io``), ``get`` + ``patch``, limited by
   ``resourceNames`` to the platform's group ClusterQueues: the
   :class:`~labfleet_accounting.quotas.QuotaManager` reads a group's queue by
   name and writes it back with a merge patch. On a shared cluster a
   compromised service can therefore not touch other tenants' queues, and it
   can never create, replace (``update``) or delete any queue. No ``list``:
   ``resourceNames`` cannot restrict it, and the code does not need it.

No secrets, no Jobs or Kueue Workloads (the collector sees batch usage through
the Jobs' pods), no namespaced writes. An empty ClusterQueue list leaves rule
2 out: an empty ``resourceNames`` would mean *every* name.

The GPU exporter (a DaemonSet on GPU nodes, ``labfleet-accounting
gpu-exporter --GpuExporterApp.kubernetes=True``) has its own ServiceAccount
and ClusterRole, :func:`gpu_exporter_rbac_objects`: ``pods`` ``list`` only,
which it narrows itself to its node (``fieldSelector=spec.nodeName``). RBAC
cannot restrict a list by field selector or node, so the grant is
cluster-wide: a compromised exporter can read every pod (specs, labels, env
values), nothing else. :func:`gpu_exporter_daemonset` builds the DaemonSet;
``accounting/manifests/gpu-exporter.yaml`` is both, printed by
``python -m labfleet_accounting.rbac --gpu-exporter``.

The ClusterQueue names come from the batch queue configuration
(:func:`cluster_queue_names`, ``<name_prefix><group>`` as
:meth:`labfleet_batch.queues.QueueConfig.cluster_queue` names them, the same
names the service's ``queue_name_prefix`` makes). ``accounting/manifests/rbac.yaml``
is this module's output for the bundled ``config/labfleet.yaml``; regenerate
it for your groups with ``python -m labfleet_accounting.rbac CONFIG``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

ROLE_NAME = "labfleet-accounting"
RBAC_API = "rbac.authorization.k8s.io"

POD_RULE = {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}
CLUSTER_QUEUE_VERBS = ["get", "patch"]


def cluster_queue_names(config) -> list[str]:
    """The groups' ClusterQueues of a :class:`labfleet_batch.queues.QueueConfig`, sorted.

    Only the group queues: the quota manager never touches the offload queue.
    """
    return sorted(config.cluster_queue(group) for group in config.groups)


def _role_and_binding(name: str, rules: list[dict], service_account: str, sa_namespace: str):
    """A ClusterRole with ``rules`` and its binding to one ServiceAccount."""
    return [
        {
            "apiVersion": f"{RBAC_API}/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": rules,
        },
        {
            "apiVersion": f"{RBAC_API}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": RBAC_API, "kind": "ClusterRole", "name": name},
            "subjects": [
                {"kind": "ServiceAccount", "name": service_account, "namespace": sa_namespace}
            ],
        },
    ]


def accounting_rbac_objects(
    service_account: str,
    sa_namespace: str,
    cluster_queues: Iterable[str],
    name: str = ROLE_NAME,
) -> list[dict]:
    """The ClusterRole and ClusterRoleBinding of the accounting service (pure)."""
    queues = sorted(set(cluster_queues))
    if any(not isinstance(q, str) or not q for q in queues):
        raise ValueError(f"ClusterQueue names must be non-empty strings: {queues!r}")
    rules = [dict(POD_RULE)]
    if queues:
        rules.append(
            {
                "apiGroups": ["kueue.x-k8s.io"],
                "resources": ["clusterqueues"],
                "resourceNames": queues,
                "verbs": list(CLUSTER_QUEUE_VERBS),
            }
        )
    return _role_and_binding(name, rules, service_account, sa_namespace)


# -- GPU exporter ----------------------------------------------------------------------

EXPORTER_NAME = "labfleet-gpu-exporter"
EXPORTER_IMAGE = "labfleet/services:0.1.0"  # images/services: the accounting package
EXPORTER_PORT = 9835
#: Nodes with an NVIDIA GPU, as NVIDIA's GPU feature discovery labels them.
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
#: The exporter's only rule: it lists the pods of its node (field selector).
EXPORTER_POD_RULE = {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}
POD_RESOURCES_DIR = "/var/lib/kubelet/pod-resources"
#: The Secret holding the bearer token of the exporter's /metrics (key ``token``); the
#: admin creates it, and Prometheus' scrape job reads the same token.
EXPORTER_TOKEN_SECRET = "labfleet-gpu-exporter-metrics-token"
EXPORTER_TOKEN_DIR = "/etc/labfleet/gpu-exporter"


def gpu_exporter_rbac_objects(
    service_account: str = EXPORTER_NAME,
    namespace: str = "labfleet",
    name: str = EXPORTER_NAME,
) -> list[dict]:
    """The exporter's ServiceAccount, ClusterRole (``pods`` ``list``) and binding (pure).

    Cluster-wide because RBAC cannot restrict a list to a node: the exporter
    narrows its own listing with ``fieldSelector=spec.nodeName``.
    """
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": service_account, "namespace": namespace},
    }
    return [
        account,
        *_role_and_binding(name, [dict(EXPORTER_POD_RULE)], service_account, namespace),
    ]


def _gpu_tolerations() -> list[dict]:
    """The GPU taints the spawner's sessions tolerate, and any group's reserved nodes."""
    from labfleet_hub.contract import RESERVED_TAINT_KEY
    from labfleet_spawner.objects import DEFAULT_KIND_TOLERATIONS

    result: list[dict] = []
    for kind in ("gpu", "mig"):
        for toleration in DEFAULT_KIND_TOLERATIONS[kind]:
            if toleration not in result:
                result.append(dict(toleration))
    # a GPU node reserved to a group still needs its exporter, whichever the group
    result.append({"key": RESERVED_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"})
    return result


def gpu_exporter_daemonset(
    image: str = EXPORTER_IMAGE,
    namespace: str = "labfleet",
    service_account: str = EXPORTER_NAME,
    node_selector: dict | None = None,
    name: str = EXPORTER_NAME,
    token_secret: str = EXPORTER_TOKEN_SECRET,
) -> dict:
    """The exporter's DaemonSet on GPU nodes (pure).

    ``/metrics`` (who holds which GPU) answers only the bearer token in the Secret
    ``token_secret`` (key ``token``), mounted read-only as the exporter's
    ``metrics_token_file``; the pod does not start until that Secret exists.

    Runs as root: the kubelet creates its pod-resources socket owned by root
    with no access for others, and connecting to a unix socket needs write
    permission on it. Everything else is taken away: no privilege escalation,
    every capability dropped (root needs none to open a socket it owns, nor
    the world-accessible ``/dev/nvidia*``), read-only root filesystem, the
    runtime's seccomp profile, the socket's directory mounted read-only.
    The GPUs are made visible by the NVIDIA container runtime
    (``NVIDIA_VISIBLE_DEVICES=all``, ``utility`` is all NVML needs) without
    requesting ``nvidia.com/gpu``, which would take a GPU away from users.
    """
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "labfleet"}
    container = {
        "name": "gpu-exporter",
        "image": image,
        "command": ["labfleet-accounting", "gpu-exporter"],
        "args": [
            "--GpuExporterApp.kubernetes=True",
            "--GpuExporterApp.exporter_ip=0.0.0.0",  # Prometheus scrapes the pod's IP
            f"--GpuExporterApp.exporter_port={EXPORTER_PORT}",
            f"--GpuExporterApp.metrics_token_file={EXPORTER_TOKEN_DIR}/token",
        ],
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
            {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "utility"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},  # read-only root filesystem
        ],
        "ports": [{"name": "metrics", "containerPort": EXPORTER_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "pod-resources", "mountPath": POD_RESOURCES_DIR, "readOnly": True},
            {"name": "metrics-token", "mountPath": EXPORTER_TOKEN_DIR, "readOnly": True},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {
                    "labels": dict(labels),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(EXPORTER_PORT),
                    },
                },
                "spec": {
                    "serviceAccountName": service_account,
                    "nodeSelector": dict(
                        GPU_NODE_SELECTOR if node_selector is None else node_selector
                    ),
                    "tolerations": _gpu_tolerations(),
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "pod-resources",
                            "hostPath": {"path": POD_RESOURCES_DIR, "type": "Directory"},
                        },
                        {
                            "name": "metrics-token",
                            "secret": {
                                "secretName": token_secret,
                                "items": [{"key": "token", "path": "token"}],
                                "defaultMode": 0o400,
                            },
                        },
                    ],
                },
            },
        },
    }


def gpu_exporter_objects(namespace: str = "labfleet", image: str = EXPORTER_IMAGE) -> list[dict]:
    """Everything the exporter needs: its RBAC, then the DaemonSet."""
    return [
        *gpu_exporter_rbac_objects(EXPORTER_NAME, namespace),
        gpu_exporter_daemonset(image, namespace, EXPORTER_NAME),
    ]


def _print_gpu_exporter(namespace: str, image: str) -> int:
    import yaml

    print(
        f"# The GPU exporter as a DaemonSet on GPU nodes ({namespace}/{EXPORTER_NAME}):\n"
        "# ServiceAccount + ClusterRole (list pods; RBAC cannot restrict it to the node,\n"
        "# the exporter selects spec.nodeName itself) + DaemonSet. Runs as root with every\n"
        "# capability dropped (the kubelet's socket is root's); its namespace must allow\n"
        "# hostPath (Pod Security 'privileged'). Its /metrics wants the bearer token of the\n"
        f"# Secret {EXPORTER_TOKEN_SECRET} (key token), which you create, e.g.\n"
        f"#   kubectl -n {namespace} create secret generic {EXPORTER_TOKEN_SECRET} \\\n"
        "#     --from-literal=token=$(openssl rand -hex 32)\n"
        "# and give to Prometheus' scrape job (authorization.credentials_file). Generated by\n"
        "#   python -m labfleet_accounting.rbac --gpu-exporter\n"
        "# See docs/accounting.md (GPU exporter)."
    )
    yaml.safe_dump_all(
        gpu_exporter_objects(namespace, image), sys.stdout, sort_keys=False, explicit_start=True
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Print the manifest for a platform configuration (``labfleet.yaml``)."""
    import yaml
    from labfleet_batch.queues import parse_queue_config
    from labfleet_hub.configurer import ConfigError, load_values
    from labfleet_spawner.catalogue import load_catalogue

    parser = argparse.ArgumentParser(prog="python -m labfleet_accounting.rbac")
    parser.add_argument(
        "config", nargs="?", help="labfleet.yaml; its batch.queues name the ClusterQueues"
    )
    parser.add_argument("--service-account", default=ROLE_NAME)
    parser.add_argument("--namespace", default="labfleet", help="of the ServiceAccount")
    parser.add_argument(
        "--gpu-exporter", action="store_true", help="print the GPU exporter's DaemonSet and RBAC"
    )
    parser.add_argument("--image", default=EXPORTER_IMAGE, help="the GPU exporter's image")
    args = parser.parse_args(argv)
    if args.gpu_exporter:
        return _print_gpu_exporter(args.namespace, args.image)
    if not args.config:
        parser.error("the configuration file is required (or --gpu-exporter)")
    try:
        values = load_values(args.config)
    except ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 1
    config = parse_queue_config(values["batch"]["queues"], load_catalogue(values["catalogue"]))
    queues = cluster_queue_names(config)
    print(
        f"# RBAC of the accounting service's ServiceAccount ({args.namespace}/"
        f"{args.service_account}):\n"
        "# list/watch pods cluster-wide (the collector), get/patch only the groups'\n"
        f"# ClusterQueues ({', '.join(queues) or 'none'}: quota management). Generated by\n"
        f"#   python -m labfleet_accounting.rbac {args.config}\n"
        "# Regenerate when the groups in batch.queues change (docs/accounting.md)."
    )
    objects = accounting_rbac_objects(args.service_account, args.namespace, queues)
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False, explicit_start=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
