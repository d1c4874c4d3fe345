"""Smoke tests of the local control plane: fleet, Kueue admission, quota,
borrowing, preemption, kwok pod lifecycle, teardown."""

from __future__ import annotations

import ipaddress
import json
import socket
import time
import uuid
from fractions import Fraction

import pytest
from k8s_helpers import clusterlib, wait_for

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
POD_CIDR = ipaddress.ip_network(clusterlib.POD_CIDR, strict=False)
GPU_TAINT_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
KUEUE = "kueue.x-k8s.io/v1beta2"


# --------------------------------------------------------------------------
# helpers


_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "m": Fraction(1, 1000),
    "": 1,
}


def quantity(q: str) -> Fraction:
    """Parse a Kubernetes quantity ('1k', '384Gi', '500m') exactly."""
    for suf in sorted(_SUFFIX, key=len, reverse=True):
        if suf and q.endswith(suf):
            return Fraction(q[: -len(suf)]) * _SUFFIX[suf]
    return Fraction(q)


def uid() -> str:
    return uuid.uuid4().hex[:6]


def flavor(name: str, product: str) -> dict:
    return {
        "apiVersion": KUEUE,
        "kind": "ResourceFlavor",
        "metadata": {"name": name},
        "spec": {
            "nodeLabels": {"nvidia.com/gpu.product": product},
            "tolerations": [GPU_TAINT_TOLERATION],
        },
    }


def cluster_queue(
    name: str,
    rf: str,
    gpus: int,
    *,
    cohort: str | None = None,
    preemption: dict | None = None,
    borrowing_limit: int | None = None,
) -> dict:
    gpu_quota: dict = {"name": "nvidia.com/gpu", "nominalQuota": gpus}
    if borrowing_limit is not None:
        gpu_quota["borrowingLimit"] = borrowing_limit
    spec: dict = {
        "namespaceSelector": {},
        "resourceGroups": [
            {
                "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                "flavors": [
                    {
                        "name": rf,
                        "resources": [
                            {"name": "cpu", "nominalQuota": 16},
                            {"name": "memory", "nominalQuota": "64Gi"},
                            gpu_quota,
                        ],
                    }
                ],
            }
        ],
    }
    if cohort:
        spec["cohortName"] = cohort
    if preemption:
        spec["preemption"] = preemption
    return {"apiVersion": KUEUE, "kind": "ClusterQueue", "metadata": {"name": name}, "spec": spec}


def local_queue(name: str, ns: str, cq: str) -> dict:
    return {
        "apiVersion": KUEUE,
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterQueue": cq},
    }


def job(
    name: str,
    ns: str,
    queue: str,
    gpus: int,
    *,
    priority_class: str | None = None,
    pod_annotations: dict | None = None,
    suspend: bool = True,
) -> dict:
    labels = {"kueue.x-k8s.io/queue-name": queue}
    if priority_class:
        labels["kueue.x-k8s.io/priority-class"] = priority_class
    res = {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "suspend": suspend,
            "parallelism": 1,
            "completions": 1,
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": pod_annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.invalid/labfleet/test:0",
                            "resources": {"requests": res, "limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ],
                },
            },
        },
    }


def get(c, *args) -> dict:
    return c.kubectl_json("get", *args)


def workload_of(c, ns: str, job_name: str) -> dict | None:
    for wl in get(c, "workloads.kueue.x-k8s.io", "-n", ns)["items"]:
        if any(
            o.get("kind") == "Job" and o.get("name") == job_name
            for o in wl["metadata"].get("ownerReferences", [])
        ):
            return wl
    return None


def condition(obj: dict | None, ctype: str) -> dict | None:
    if not obj:
        return None
    for cnd in obj.get("status", {}).get("conditions", []) or []:
        if cnd["type"] == ctype:
            return cnd
    return None


def is_true(obj: dict | None, ctype: str) -> bool:
    cnd = condition(obj, ctype)
    return bool(cnd and cnd["status"] == "True")


def admitted_workload(c, ns: str, job_name: str, timeout: float = 30) -> dict:
    return wait_for(
        f"workload of job {ns}/{job_name} to be admitted",
        lambda: (wl := workload_of(c, ns, job_name)) and is_true(wl, "Admitted") and wl,
        timeout,
    )


def running_pod(c, ns: str, job_name: str, timeout: float = 30) -> dict:
    def find():
        pods = get(c, "pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={job_name}")["items"]
        running = [
            p for p in pods if p["status"].get("phase") == "Running" and p["status"].get("podIP")
        ]
        return running[0] if running else None

    return wait_for(f"a Running pod of job {ns}/{job_name}", find, timeout)


def wait_cq_active(c, name: str) -> None:
    wait_for(
        f"ClusterQueue {name} Active",
        lambda: is_true(get(c, "clusterqueues.kueue.x-k8s.io", name), "Active"),
        30,
    )


def wait_lq_active(c, ns: str, name: str) -> None:
    wait_for(
        f"LocalQueue {ns}/{name} Active",
        lambda: is_true(get(c, "localqueues.kueue.x-k8s.io", "-n", ns, name), "Active"),
        30,
    )


def gpu_usage(c, cq: str) -> dict:
    """status.flavorsUsage entry of nvidia.com/gpu of a ClusterQueue (total, borrowed)."""
    status = get(c, "clusterqueues.kueue.x-k8s.io", cq).get("status", {})
    for fl in status.get("flavorsUsage", []):
        for r in fl["resources"]:
            if r["name"] == "nvidia.com/gpu":
                return {"total": "0", "borrowed": "0", **r}
    return {"total": "0", "borrowed": "0"}


def node_of_product(fleet: list[dict], product: str) -> str:
    names = [
        n["metadata"]["name"]
        for n in fleet
        if n["metadata"]["labels"].get("nvidia.com/gpu.product") == product
    ]
    assert len(names) == 1, names
    return names[0]


@pytest.fixture(scope="module")
def fleet() -> list[dict]:
    return clusterlib.load_fleet()


# --------------------------------------------------------------------------
# tests


def test_versions(k8s_cluster):
    v = k8s_cluster.api_get("/version")
    assert v["gitVersion"] == clusterlib.versions()["K8S_VERSION"]
    out = k8s_cluster.kubectl("version", "--client", "-o", "json").stdout
    assert json.loads(out)["clientVersion"]["gitVersion"] == v["gitVersion"]


def test_fleet_ready_with_loopback_addresses(k8s_cluster, fleet):
    nodes = {n["metadata"]["name"]: n for n in get(k8s_cluster, "nodes")["items"]}
    # the real node (tools/cluster/node.py), when there is one, is not KWOK's
    key, value = clusterlib.KWOK_NODE_ANNOTATION
    nodes = {k: n for k, n in nodes.items() if n["metadata"]["annotations"].get(key) == value}
    assert set(nodes) == {n["metadata"]["name"] for n in fleet}
    for want in fleet:
        name = want["metadata"]["name"]
        node = nodes[name]
        assert is_true(node, "Ready"), f"{name} not Ready: {node['status'].get('conditions')}"
        ips = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
        assert ips and all(ipaddress.ip_address(ip) in LOOPBACK for ip in ips), (name, ips)
        for key, value in want["metadata"]["labels"].items():
            assert node["metadata"]["labels"].get(key) == value, (name, key)
        for res, qty in want["status"]["allocatable"].items():
            got = node["status"]["allocatable"].get(res)
            assert got is not None and quantity(got) == quantity(qty), (name, res, got, qty)
        assert node["spec"].get("taints", []) == want["spec"]["taints"], name
    assert nodes["gpu-t4-01"]["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert nodes["gpu-a100-mig-01"]["status"]["allocatable"]["nvidia.com/mig-1g.10gb"] == "7"
    assert nodes["interlink-01"]["metadata"]["labels"]["type"] == "virtual-kubelet"


def test_job_admitted_and_placed_on_flavor_node(k8s_cluster, k8s_namespace, fleet):
    c, ns, s = k8s_cluster, k8s_namespace, uid()
    rf, cq, lq = f"t4-{s}", f"cq-t4-{s}", "team"
    c.apply([flavor(rf, "Tesla-T4"), cluster_queue(cq, rf, gpus=2)])
    c.apply(local_queue(lq, ns, cq))
    wait_cq_active(c, cq)
    wait_lq_active(c, ns, lq)

    c.apply(job("train", ns, lq, gpus=1, pod_annotations={"labfleet.io/fake-complete-after": "1h"}))
    wl = admitted_workload(c, ns, "train")
    assignment = wl["status"]["admission"]["podSetAssignments"][0]
    assert assignment["flavors"]["nvidia.com/gpu"] == rf
    assert wl["status"]["admission"]["clusterQueue"] == cq

    pod = running_pod(c, ns, "train")
    assert pod["spec"]["nodeName"] == node_of_product(fleet, "Tesla-T4")
    assert pod["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "Tesla-T4"
    assert ipaddress.ip_address(pod["status"]["podIP"]) in POD_CIDR
    assert ipaddress.ip_address(pod["status"]["podIP"]) in LOOPBACK
    assert pod["status"]["hostIP"] == "127.0.11.1"

    # pods keep running (holding quota) until told to complete
    wait_for("ClusterQueue usage of 1 GPU", lambda: gpu_usage(c, cq)["total"] == "1", 15)
    c.kubectl(
        "annotate",
        "pod",
        "-n",
        ns,
        pod["metadata"]["name"],
        "labfleet.io/fake-complete-after=0s",
        "--overwrite",
    )
    wait_for("job to complete", lambda: is_true(get(c, "job", "-n", ns, "train"), "Complete"), 30)
    wait_for("workload to finish", lambda: is_true(workload_of(c, ns, "train"), "Finished"), 30)


def test_job_beyond_quota_stays_pending(k8s_cluster, k8s_namespace):
    c, ns, s = k8s_cluster, k8s_namespace, uid()
    rf, cq, lq = f"a100-{s}", f"cq-a100-{s}", "team"
    c.apply([flavor(rf, "NVIDIA-A100-PCIE-40GB"), cluster_queue(cq, rf, gpus=2)])
    c.apply(local_queue(lq, ns, cq))
    wait_cq_active(c, cq)

    c.apply(job("big", ns, lq, gpus=2))
    admitted_workload(c, ns, "big")
    c.apply(job("extra", ns, lq, gpus=1))

    def pending_reason():
        wl = workload_of(c, ns, "extra")
        cnd = condition(wl, "QuotaReserved")
        return (
            cnd if cnd and cnd["status"] == "False" and "insufficient" in cnd["message"] else None
        )

    cnd = wait_for("workload 'extra' to report insufficient quota", pending_reason, 30)
    assert cnd["reason"] == "Pending"
    assert "nvidia.com/gpu" in cnd["message"], cnd["message"]
    assert get(c, "job", "-n", ns, "extra")["spec"]["suspend"] is True
    assert not is_true(workload_of(c, ns, "extra"), "Admitted")
    assert get(c, "pods", "-n", ns, "-l", "batch.kubernetes.io/job-name=extra")["items"] == []

    # freeing the quota admits it
    c.kubectl("delete", "job", "-n", ns, "big", "--cascade=foreground", "--wait=false")
    admitted_workload(c, ns, "extra")


def test_borrowing_within_cohort(k8s_cluster, k8s_namespace, fleet):
    c, ns, s = k8s_cluster, k8s_namespace, uid()
    rf, cohort = f"rtx-{s}", f"co-{s}"
    lender, borrower = f"cq-lend-{s}", f"cq-borrow-{s}"
    c.apply(
        [
            flavor(rf, "Quadro-RTX-5000"),
            cluster_queue(lender, rf, gpus=3, cohort=cohort),
            cluster_queue(borrower, rf, gpus=1, cohort=cohort),
        ]
    )
    c.apply([local_queue("lend", ns, lender), local_queue("borrow", ns, borrower)])
    wait_cq_active(c, lender)
    wait_cq_active(c, borrower)

    # the lender uses all of its own quota ...
    c.apply(job("lender-job", ns, "lend", gpus=3))
    admitted_workload(c, ns, "lender-job")
    lender_pod = running_pod(c, ns, "lender-job")

    # ... so the borrower's 3-GPU job (1 own + 2 borrowed) must wait
    c.apply(job("borrower-job", ns, "borrow", gpus=3))
    wait_for(
        "borrower workload pending",
        lambda: (
            (cnd := condition(workload_of(c, ns, "borrower-job"), "QuotaReserved"))
            and cnd["status"] == "False"
        ),
        30,
    )
    assert not is_true(workload_of(c, ns, "borrower-job"), "Admitted")

    # the lender's job finishes: its quota is lent to the borrower
    c.kubectl(
        "annotate",
        "pod",
        "-n",
        ns,
        lender_pod["metadata"]["name"],
        "labfleet.io/fake-complete-after=0s",
        "--overwrite",
    )
    wl = admitted_workload(c, ns, "borrower-job", timeout=45)
    assert wl["status"]["admission"]["clusterQueue"] == borrower
    gpu = wait_for(
        "borrower usage of 3 GPUs, 2 borrowed",
        lambda: (u := gpu_usage(c, borrower))["total"] == "3" and u,
        15,
    )
    assert gpu["borrowed"] == "2", gpu
    pod = running_pod(c, ns, "borrower-job")
    assert pod["spec"]["nodeName"] == node_of_product(fleet, "Quadro-RTX-5000")


def test_priority_preemption_within_cluster_queue(k8s_cluster, k8s_namespace, fleet):
    c, ns, s = k8s_cluster, k8s_namespace, uid()
    rf, cq, lq = f"a30-{s}", f"cq-a30-{s}", "team"
    low, high = f"low-{s}", f"high-{s}"
    c.apply(
        [
            flavor(rf, "NVIDIA-A30"),
            cluster_queue(cq, rf, gpus=1, preemption={"withinClusterQueue": "LowerPriority"}),
            {
                "apiVersion": KUEUE,
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": low},
                "value": 100,
            },
            {
                "apiVersion": KUEUE,
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": high},
                "value": 1000,
            },
        ]
    )
    c.apply(local_queue(lq, ns, cq))
    wait_cq_active(c, cq)

    c.apply(job("low", ns, lq, gpus=1, priority_class=low))
    wl_low = admitted_workload(c, ns, "low")
    assert wl_low["spec"]["priority"] == 100
    low_pod = running_pod(c, ns, "low")
    assert low_pod["spec"]["nodeName"] == node_of_product(fleet, "NVIDIA-A30")

    c.apply(job("high", ns, lq, gpus=1, priority_class=high))
    wl_high = admitted_workload(c, ns, "high", timeout=60)
    assert wl_high["spec"]["priority"] == 1000

    wl_low = workload_of(c, ns, "low")
    assert not is_true(wl_low, "Admitted")
    evicted = condition(wl_low, "Evicted")
    assert evicted and evicted["status"] == "True" and evicted["reason"] == "Preempted", evicted
    assert get(c, "job", "-n", ns, "low")["spec"]["suspend"] is True
    high_pod = running_pod(c, ns, "high", timeout=45)
    assert high_pod["spec"]["nodeName"] == node_of_product(fleet, "NVIDIA-A30")


def test_kueue_webhook_suspends_unsuspended_job(k8s_cluster, k8s_namespace):
    if not k8s_cluster.webhooks:
        pytest.skip("cluster started without Kueue webhooks")
    c, ns = k8s_cluster, k8s_namespace
    c.apply(job("eager", ns, "no-such-queue", gpus=1, suspend=False))
    assert get(c, "job", "-n", ns, "eager")["spec"]["suspend"] is True
    # admission went through Kueue's webhook over https://127.0.0.1:<port>
    hooks = get(c, "mutatingwebhookconfigurations", "labfleet-kueue-mutating")["webhooks"]
    assert any(h["clientConfig"]["url"].endswith("/mutate-batch-v1-job") for h in hooks)


def test_teardown_leaves_no_processes(k8s_binaries, tmp_path):
    """A second, bare cluster (no fleet, no Kueue) stops without leftovers."""
    c = clusterlib.start_cluster(tmp_path / "c2", fleet=None, kueue=False, die_with_parent=True)
    try:
        pids = clusterlib.cluster_pids(c.state_dir)
        assert len(pids) >= 5, pids
        assert c.api_get("/readyz") == "ok"
    finally:
        clusterlib.stop_cluster(c.state_dir)
    assert clusterlib.cluster_pids(c.state_dir) == []
    for pid in pids:
        assert not clusterlib._proc_alive(pid), pid
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", c.ports["apiserver"])) != 0


# --------------------------------------------------------------------------
# plain pods (Kueue's pod integration) and the visibility API


def cpu_queue(c, ns: str, s: str, cpus: int) -> str:
    """A flavor without node labels and a ClusterQueue of ``cpus`` CPUs; returns the LocalQueue."""
    rf, cq = f"cpu-{s}", f"cq-cpu-{s}"
    c.apply(
        [
            {"apiVersion": KUEUE, "kind": "ResourceFlavor", "metadata": {"name": rf}},
            {
                "apiVersion": KUEUE,
                "kind": "ClusterQueue",
                "metadata": {"name": cq},
                "spec": {
                    "namespaceSelector": {},
                    "queueingStrategy": "StrictFIFO",
                    "resourceGroups": [
                        {
                            "coveredResources": ["cpu", "memory"],
                            "flavors": [
                                {
                                    "name": rf,
                                    "resources": [
                                        {"name": "cpu", "nominalQuota": cpus},
                                        {"name": "memory", "nominalQuota": "64Gi"},
                                    ],
                                }
                            ],
                        }
                    ],
                },
            },
        ]
    )
    c.apply(local_queue("team", ns, cq))
    wait_cq_active(c, cq)
    wait_lq_active(c, ns, "team")
    return "team"


def plain_pod(name: str, ns: str, queue: str, cpu: str = "1") -> dict:
    """A pod joining ``queue`` with the queue label only: the webhook adds the rest."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kueue.x-k8s.io/queue-name": queue},
        },
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "registry.invalid/labfleet/test:0",
                    "resources": {"requests": {"cpu": cpu, "memory": "1Gi"}},
                }
            ],
        },
    }


def test_plain_pod_gated_until_admitted_by_kueue(k8s_cluster, k8s_namespace):
    if not k8s_cluster.webhooks:
        pytest.skip("cluster started without Kueue webhooks")
    c, ns = k8s_cluster, k8s_namespace
    lq = cpu_queue(c, ns, uid(), cpus=1)
    c.apply(plain_pod("first", ns, lq))
    c.apply(plain_pod("second", ns, lq))

    # the pod webhook marked both as managed and gated them (as in production)
    second = get(c, "pod", "-n", ns, "second")
    assert second["metadata"]["labels"]["kueue.x-k8s.io/managed"] == "true"
    first = wait_for(
        "pod 'first' admitted (gate removed) and Running",
        lambda: (p := get(c, "pod", "-n", ns, "first"))["status"].get("phase") == "Running" and p,
        30,
    )
    assert not first["spec"].get("schedulingGates")
    assert first["spec"]["nodeName"].startswith("cpu-")

    # the second exceeds the 1-CPU quota: it keeps its gate, unscheduled
    def pending_second():
        wls = get(c, "workloads.kueue.x-k8s.io", "-n", ns)["items"]
        for wl in wls:
            refs = wl["metadata"].get("ownerReferences", [])
            if any(r["kind"] == "Pod" and r["name"] == "second" for r in refs):
                cnd = condition(wl, "QuotaReserved")
                return cnd and cnd["status"] == "False" and wl
        return None

    wait_for("a pending Workload owned by pod 'second'", pending_second, 30)
    second = get(c, "pod", "-n", ns, "second")
    gates = [g["name"] for g in second["spec"].get("schedulingGates", [])]
    # Kueue 0.17's webhook also adds kueue.x-k8s.io/topology (removed on admission)
    assert "kueue.x-k8s.io/admission" in gates, gates
    assert not second["spec"].get("nodeName")

    # the first finishes: its quota goes to the second
    c.kubectl("delete", "pod", "-n", ns, "first", "--wait=false")
    wait_for(
        "pod 'second' admitted and Running",
        lambda: get(c, "pod", "-n", ns, "second")["status"].get("phase") == "Running",
        30,
    )


def test_pod_webhooks_leave_system_namespaces_alone(k8s_cluster):
    """As Kueue's kustomization does: kube-system pods never wait on Kueue."""
    if not k8s_cluster.webhooks:
        pytest.skip("cluster started without Kueue webhooks")
    c = k8s_cluster
    hooks = get(c, "mutatingwebhookconfigurations", "labfleet-kueue-mutating")["webhooks"]
    pod_hook = next(h for h in hooks if h["clientConfig"]["url"].endswith("/mutate--v1-pod"))
    assert pod_hook["clientConfig"]["url"].startswith("https://127.0.0.1:")
    expr = pod_hook["namespaceSelector"]["matchExpressions"][0]
    assert expr["operator"] == "NotIn" and set(expr["values"]) == {"kube-system", "kueue-system"}
    name = f"sys-{uid()}"
    c.apply(plain_pod(name, "kube-system", "no-such-queue"))
    try:
        pod = get(c, "pod", "-n", "kube-system", name)
        assert not pod["spec"].get("schedulingGates")
        assert "kueue.x-k8s.io/managed" not in pod["metadata"]["labels"]
    finally:
        c.kubectl("delete", "pod", "-n", "kube-system", name, "--wait=false")


def test_visibility_api_pending_positions(k8s_cluster, k8s_namespace):
    if not k8s_cluster.visibility:
        pytest.skip("cluster started without Kueue's visibility API")
    c, ns = k8s_cluster, k8s_namespace
    assert "v1beta2" in k8s_cluster.visibility
    lq = cpu_queue(c, ns, uid(), cpus=1)
    c.apply(plain_pod("running", ns, lq))
    wait_for(
        "pod 'running' Running",
        lambda: get(c, "pod", "-n", ns, "running")["status"].get("phase") == "Running",
        30,
    )
    c.apply(plain_pod("next", ns, lq))
    # creation timestamps have 1 s resolution: keep the FIFO order unambiguous
    wait_for(
        "a Workload for pod 'next'",
        lambda: len(get(c, "workloads.kueue.x-k8s.io", "-n", ns)["items"]) == 2,
    )
    time.sleep(1.1)
    c.apply(plain_pod("after", ns, lq))

    base = "/apis/visibility.kueue.x-k8s.io/v1beta2"

    def positions():
        data = c.api_get(f"{base}/namespaces/{ns}/localqueues/{lq}/pendingworkloads")
        items = data.get("items", [])
        return len(items) == 2 and items

    items = wait_for("two pending workloads in the visibility API", positions, 30)
    owners = {
        item["metadata"]["ownerReferences"][0]["name"]: item["positionInLocalQueue"]
        for item in items
    }
    assert owners == {"next": 0, "after": 1}, items
    assert {i["localQueueName"] for i in items} == {lq}
    # the same through the ClusterQueue, and through the older version
    cq = get(c, "localqueues.kueue.x-k8s.io", "-n", ns, lq)["spec"]["clusterQueue"]
    data = c.api_get(f"{base}/clusterqueues/{cq}/pendingworkloads")
    assert sorted(i["positionInClusterQueue"] for i in data["items"]) == [0, 1]
    if "v1beta1" in k8s_cluster.visibility:
        old = c.api_get(
            f"/apis/visibility.kueue.x-k8s.io/v1beta1/namespaces/{ns}/localqueues/{lq}"
            "/pendingworkloads"
        )
        assert len(old["items"]) == 2
