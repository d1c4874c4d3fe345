"""The batch namespaces' NetworkPolicies (labfleet_batch.netpol) on the real API server.

``labfleet sync-queues`` (the CLI, with the shipped platform configuration
given unique names and a ``network`` section) applies them; a real batch Job,
created by the Kubernetes backend and admitted by Kueue, runs a pod that every
policy's ``podSelector`` selects.

The test cluster runs no network plugin, so nothing here enforces the
policies (docs/cluster.md, docs/security.md): this proves what is stored and
what it selects, not packets dropped.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import yaml
from k8s_helpers import delete_queue_layout, wait_for
from labfleet_batch import netpol
from labfleet_batch.kube import KubeAPI, KubeBackend
from labfleet_batch.queues import parse_queue_config
from labfleet_batch.validation import validate_request
from labfleet_hub.cli import main
from labfleet_spawner.catalogue import load_catalogue
from test_batch_kueue import STORAGE, api_client

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(ROOT / "config" / "catalogue.yaml")
NETWORK = {"dns": True, "egress": ["0.0.0.0/0"]}


def platform_config(folder: Path, s: str) -> Path:
    """The shipped labfleet.yaml with this test's own names and the network section."""
    for name in ("labfleet.yaml", "catalogue.yaml", "accounts.yaml"):
        shutil.copy(ROOT / "config" / name, folder / name)
    path = folder / "labfleet.yaml"
    data = yaml.safe_load(path.read_text())
    queues = data["batch"]["queues"]
    queues.update(name_prefix=f"np{s}-", namespace_prefix=f"np{s}-", cohort=f"np{s}")
    queues["groups"] = {f"ml{s}": {"cpu": 4, "memory": "16Gi"}}
    queues["network"] = NETWORK
    path.write_text(yaml.safe_dump(data))
    return path


def selected(cluster, ns: str, selector: dict) -> set[str]:
    """Names of the pods of ``ns`` a NetworkPolicy's podSelector selects (the API server's
    own label-selector evaluation; ``{}`` selects every pod of the namespace)."""
    terms = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for e in selector.get("matchExpressions") or []:
        op = e["operator"]
        if op in ("In", "NotIn"):
            terms.append(f"{e['key']} {op.lower()} ({','.join(e['values'])})")
        else:
            terms.append(e["key"] if op == "Exists" else f"!{e['key']}")
    extra = ("-l", ",".join(terms)) if terms else ()
    pods = cluster.kubectl_json("get", "pods", "-n", ns, *extra)["items"]
    return {p["metadata"]["name"] for p in pods}


async def test_sync_queues_applies_policies_that_select_a_real_jobs_pods(k8s_cluster, tmp_path):
    s = uuid.uuid4().hex[:5]
    path = platform_config(tmp_path, s)
    argv = ["sync-queues", "--config", str(path), "--kubeconfig", str(k8s_cluster.kubeconfig)]
    assert await asyncio.to_thread(main, argv) == 0  # the CLI runs its own event loop
    data = yaml.safe_load(path.read_text())
    config = parse_queue_config(data["batch"]["queues"], CATALOGUE)
    group = f"ml{s}"
    ns = config.namespace(group)
    admin = api_client(k8s_cluster, k8s_cluster.token)
    try:
        stored = {
            p["metadata"]["name"]: p
            for p in k8s_cluster.kubectl_json("get", "networkpolicies", "-n", ns)["items"]
        }
        assert set(stored) == {netpol.DENY_NAME, netpol.DNS_NAME, netpol.EGRESS_NAME}
        # what the API server kept is what the builder made (nothing dropped or defaulted away)
        for built in netpol.batch_network_policies(ns, config.network):
            assert stored[built["metadata"]["name"]]["spec"] == built["spec"]
        deny = stored[netpol.DENY_NAME]["spec"]
        assert deny["policyTypes"] == ["Ingress", "Egress"]
        assert "ingress" not in deny and "egress" not in deny
        (rule,) = stored[netpol.EGRESS_NAME]["spec"]["egress"]
        (block,) = [peer["ipBlock"] for peer in rule["to"]]
        assert block["cidr"] == "0.0.0.0/0" and "169.254.0.0/16" in block["except"]
        assert "10.0.0.0/8" in block["except"]  # pods, nodes, exporters of a typical cluster

        # a real batch Job, through the Kubernetes backend, admitted by Kueue
        backend = KubeBackend(KubeAPI(admin), config, STORAGE, catalogue=CATALOGUE)
        request = validate_request(
            {"name": "net", "command": ["sleep", "60"]},
            catalogue=CATALOGUE,
            user_groups=[group],
            queue_groups=config.covered_accelerators(),
            priorities=config.priorities,
        )
        record = await backend.submit(request, "alice")

        def running_pods():
            pods = k8s_cluster.kubectl_json(
                "get", "pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={record.name}"
            )["items"]
            return {p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running"}

        pods = wait_for("the job's pod running", running_pods, timeout=60)
        for name, policy in stored.items():
            chosen = selected(k8s_cluster, ns, policy["spec"]["podSelector"])
            assert pods <= chosen, (name, pods, chosen)
    finally:
        await admin.close()
        delete_queue_layout(k8s_cluster, config, CATALOGUE)
