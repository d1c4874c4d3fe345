"""Kueue pieces of the test cluster: configuration, webhooks, visibility API.

Pure functions from the module's own manifests (copied by build.sh next to
the CRDs) to the dicts cluster.py applies. Loaded by cluster.py from its
folder; only the standard library and PyYAML.
"""

from __future__ import annotations

import base64
from pathlib import Path

import yaml

#: The Kueue integrations the test cluster enables (Jobs and plain pods).
FRAMEWORKS = ["batch/job", "pod"]

#: Where Kueue's own manifests send the visibility APIServices.
VISIBILITY_SERVICE = ("kueue-system", "visibility-server")

#: Kueue's kustomization adds this to the pod webhooks so kube-system and
#: Kueue's own namespace are never intercepted; the copied manifests lack it.
_SYSTEM_NAMESPACES_EXCLUDED = {
    "matchExpressions": [
        {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", "kueue-system"],
        }
    ]
}


def kueue_config(ports: dict[str, int], certdir: Path) -> dict:
    """Kueue's Configuration for an out-of-cluster manager on 127.0.0.1."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['kueue-health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['kueue-metrics']}"},
        "webhook": {"host": "127.0.0.1", "port": ports["kueue-webhook"], "certDir": str(certdir)},
        # Without this the visibility server listens on every interface.
        "visibilityServer": {"bindAddress": "127.0.0.1", "bindPort": ports["kueue-visibility"]},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(FRAMEWORKS)},
        "clientConnection": {"qps": 100, "burst": 200},
    }


def _wanted_hook(path: str) -> bool:
    return (
        "-kueue-x-k8s-io-" in path
        or path.endswith("-batch-v1-job")
        or path in ("/mutate--v1-pod", "/validate--v1-pod")
    )


def kueue_webhook_manifests(manifests: Path, base_url: str, ca_pem: bytes) -> list[dict]:
    """Kueue's webhook configurations, rewritten to call base_url directly.

    Kept: the hooks of Kueue's own API group, batch/v1 Jobs and v1 Pods (the
    integrations enabled here); the pod hooks get the namespace exclusion
    Kueue's kustomization adds, so kube-system pods never wait on Kueue."""
    ca = base64.b64encode(ca_pem).decode()
    out = []
    for doc in yaml.safe_load_all(manifests.read_text()):
        if not doc or doc.get("kind") not in (
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        ):
            continue
        hooks = []
        for h in doc.get("webhooks", []):
            path = h["clientConfig"]["service"]["path"]
            if not _wanted_hook(path):
                continue
            h["clientConfig"] = {"url": base_url + path, "caBundle": ca}
            if path.endswith("--v1-pod"):
                h["namespaceSelector"] = _SYSTEM_NAMESPACES_EXCLUDED
            hooks.append(h)
        kind = doc["kind"]
        out.append(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": kind,
                "metadata": {
                    "name": "labfleet-kueue-"
                    + ("mutating" if kind.startswith("Mutating") else "validating")
                },
                "webhooks": hooks,
            }
        )
    return out


def visibility_manifests(apiservice_dir: Path, port: int, ca_pem: bytes) -> list[dict]:
    """Service + Kueue's APIServices (every version it ships) for a server on 127.0.0.1:port.

    The aggregator resolves an ExternalName Service to ``https://<externalName>:<port>``
    (``--enable-aggregator-routing=false``, the default), so no ClusterIP or
    endpoint is ever dialled. It verifies the serving certificate against
    ``caBundle`` for the name ``<service>.<namespace>.svc``, which the test
    certificate carries; Kueue's manifests skip verification instead.
    """
    ns, name = VISIBILITY_SERVICE
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": "ExternalName",
            "externalName": "127.0.0.1",
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        },
    }
    ca = base64.b64encode(ca_pem).decode()
    out: list[dict] = [service]
    for f in sorted(apiservice_dir.glob("apiservice_*.yaml")):
        doc = yaml.safe_load(f.read_text())
        spec = doc["spec"]
        spec.pop("insecureSkipTLSVerify", None)
        spec["caBundle"] = ca
        spec["service"] = {"namespace": ns, "name": name, "port": port}
        out.append(doc)
    return out


def visibility_versions(apiservice_dir: Path) -> list[str]:
    """Versions of visibility.kueue.x-k8s.io that Kueue's manifests register."""
    return [
        yaml.safe_load(f.read_text())["spec"]["version"]
        for f in sorted(apiservice_dir.glob("apiservice_*.yaml"))
    ]
