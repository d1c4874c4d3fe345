"""The GPU exporter's DaemonSet and RBAC (``labfleet_accounting.rbac``) on the real API server.

In a fresh namespace the builders' ServiceAccount, ClusterRole, binding and
DaemonSet are created: the API server validates them, and the DaemonSet
controller places one exporter pod on each GPU node of the KWOK fleet (node
selector and tolerations right), none elsewhere.

The exporter's owners path then runs as in the DaemonSet, through a
kubeconfig holding only the exporter account's token: :class:`NodeOwners`
reads a stand-in kubelet (a real gRPC server on a unix socket, as in
tests/unit/test_pod_resources.py: KWOK nodes have no kubelet) and lists its
node's pods (``list_node_pods`` on the service's client factory, bridged
from a scrape thread as the app does). The GPU holders come out with their
labfleet labels, pods of other nodes are not listed, and the account cannot
list secrets, nor get or watch pods.
"""

from __future__ import annotations

import asyncio
import uuid

from k8s_helpers import service_account_view, wait_for
from kubernetes_asyncio import client
from labfleet_accounting.gpu_exporter import NodeOwners, Owner, list_node_pods, threadsafe
from labfleet_accounting.pod_resources import list_pod_resources
from labfleet_accounting.rbac import (
    EXPORTER_TOKEN_SECRET,
    gpu_exporter_daemonset,
    gpu_exporter_rbac_objects,
)
from labfleet_hub.contract import KIND_INTERACTIVE, LABEL_GROUP, LABEL_KIND, LABEL_USER
from labfleet_hub.kubeclient import api_client

from tests.unit.test_pod_resources import FakeKubelet, container, device, pod, response

ACCOUNT = "labfleet-gpu-exporter"
NODE, OTHER_NODE = "gpu-t4-01", "gpu-rtx5000-01"
GPU_0 = "GPU-t4t4t4t4-0000-0000-0000-000000000000"


def labfleet_pod(name: str, ns: str, node: str, user: str | None) -> dict:
    labels = {LABEL_KIND: KIND_INTERACTIVE, LABEL_USER: user, LABEL_GROUP: "ml"} if user else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        # bound directly, as the scheduler would: the test is about the listing, not placement
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
    }


async def test_daemonset_on_gpu_nodes_and_node_listing_with_only_its_rights(k8s_cluster, tmp_path):
    s = uuid.uuid4().hex[:6]
    ns, name = f"gpux-{s}", f"labfleet-gpu-exporter-{s}"  # ClusterRole: a unique name
    k8s_cluster.kubectl("create", "namespace", ns)
    try:
        # the /metrics bearer token, as the manifest's header tells the admin to create it
        k8s_cluster.kubectl(
            "create", "secret", "generic", EXPORTER_TOKEN_SECRET, "-n", ns,
            "--from-literal=token=" + uuid.uuid4().hex,
        )  # fmt: skip
        k8s_cluster.apply(
            [
                *gpu_exporter_rbac_objects(ACCOUNT, ns, name=name),
                gpu_exporter_daemonset("labfleet/services:0.1.0", ns, ACCOUNT, name=name),
            ]
        )
        nodes = k8s_cluster.kubectl_json("get", "nodes")["items"]
        gpu_nodes = {
            n["metadata"]["name"]
            for n in nodes
            if n["metadata"].get("labels", {}).get("nvidia.com/gpu.present") == "true"
        }
        assert NODE in gpu_nodes and OTHER_NODE in gpu_nodes and len(gpu_nodes) < len(nodes)

        def placed():
            pods = k8s_cluster.kubectl_json("get", "pods", "-n", ns)["items"]
            return {p["spec"].get("nodeName") for p in pods} == gpu_nodes and pods

        exporters = wait_for("an exporter pod on every GPU node, none elsewhere", placed, 60)
        for exporter in exporters:  # the token is a file from the Secret, not in the spec
            volumes = {v["name"]: v for v in exporter["spec"]["volumes"]}
            assert volumes["metrics-token"]["secret"]["secretName"] == EXPORTER_TOKEN_SECRET
            (c,) = exporter["spec"]["containers"]
            assert (
                "--GpuExporterApp.metrics_token_file=/etc/labfleet/gpu-exporter/token" in c["args"]
            )
        ds = k8s_cluster.kubectl_json("get", "daemonset", name, "-n", ns)
        assert ds["status"]["desiredNumberScheduled"] == len(gpu_nodes)

        for pod_name, node, user in [
            ("jupyter-alice", NODE, "alice"),
            ("jupyter-bob", OTHER_NODE, "bob"),  # holds a GPU elsewhere: not this node's
            ("plain", NODE, None),  # not labfleet's: not listed
        ]:
            k8s_cluster.apply(labfleet_pod(pod_name, ns, node, user))

        kubeconfig = tmp_path / "exporter.kubeconfig"
        view = service_account_view(
            k8s_cluster, ns, ACCOUNT, kubeconfig, "list", "pods", "--all-namespaces"
        )

        api = await api_client(str(kubeconfig))
        try:
            core = client.CoreV1Api(api)
            listed = await list_node_pods(core, NODE)
            assert {p["spec"]["nodeName"] for p in listed} == {NODE}
            mine = {p["metadata"]["name"]: p for p in listed if p["metadata"]["namespace"] == ns}
            assert set(mine) == {"jupyter-alice"}
            assert mine["jupyter-alice"]["metadata"]["labels"][LABEL_USER] == "alice"

            answer = response(
                pod("jupyter-alice", ns, container("notebook", device("nvidia.com/gpu", GPU_0)))
            )
            loop = asyncio.get_running_loop()
            with FakeKubelet(tmp_path / "kubelet.sock", answer) as kubelet:
                owners = NodeOwners(
                    lambda: list_pod_resources(kubelet.path),
                    threadsafe(lambda: list_node_pods(core, NODE), loop),
                )
                # a scrape runs in prometheus_client's thread, the API client on this loop
                result = await asyncio.to_thread(owners)
            assert result == {GPU_0: Owner("alice", "ml", f"{ns}/jupyter-alice")}
        finally:
            await api.close()

        secrets = view.kubectl("get", "secrets", "-n", ns, check=False)
        assert secrets.returncode != 0
        assert 'cannot list resource "secrets"' in secrets.stderr, secrets.stderr
        for verb in ("get", "watch"):
            can = view.kubectl("auth", "can-i", verb, "pods", "-n", ns, check=False)
            assert can.stdout.strip() == "no", (verb, can.stdout)
    finally:
        k8s_cluster.kubectl("delete", "clusterrolebinding,clusterrole", name, check=False)
        k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
