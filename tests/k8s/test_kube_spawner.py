"""PlatformKubeSpawner against the real control plane (tools/cluster, KWOK fleet).

Spawner instances are created with a minimal user and hub (as KubeSpawner's
own tests do) and talk to the test cluster's kube-apiserver: pods are really
created, really scheduled by kube-scheduler onto the fake nodes of
tools/cluster/fleet.yaml, and KWOK marks them Running with a 127.x pod IP.
No process listens there, which is fine: ``start()`` returns once the pod is
Running, before JupyterHub would poll the URL.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from jupyterhub.objects import Hub
from kubernetes_asyncio.config import kube_config
from kubespawner.clients import load_config
from labfleet_hub import contract
from labfleet_spawner.availability import compute_availability
from labfleet_spawner.catalogue import load_catalogue
from labfleet_spawner.kube import PlatformKubeSpawner
from tornado import web

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(REPO / "config" / "catalogue.yaml")
SHARED = {"hostPath": {"path": "/srv/labfleet", "type": "DirectoryOrCreate"}}


@pytest.fixture(scope="module")
def kube(k8s_cluster):
    """The cluster, with KubeSpawner's client configuration pointed at it."""
    with pytest.MonkeyPatch.context() as mp:
        # kubernetes_asyncio reads $KUBECONFIG once at import; KubeSpawner caches load_config.
        mp.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(k8s_cluster.kubeconfig))
        mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        load_config.cache_clear()
        yield k8s_cluster
        load_config.cache_clear()


@pytest.fixture
def namespace(kube):
    name = "nb-" + uuid.uuid4().hex[:8]
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(autouse=True)
async def _stop_watches():
    yield
    await PlatformKubeSpawner.stop_watches()


_ids = iter(range(100, 10_000))


def make_user(groups=("users", "ml", "fpga")):
    name = "u" + uuid.uuid4().hex[:6]
    return SimpleNamespace(
        name=name,
        id=next(_ids),
        escaped_name=name,
        url=f"/user/{name}/",
        groups=[SimpleNamespace(name=g, id=i + 10) for i, g in enumerate(groups)],
    )


def make_spawner(namespace, user=None, **kwargs):
    kwargs.setdefault("start_timeout", 60)
    kwargs.setdefault("shared_volume", SHARED)
    kwargs.setdefault("catalogue_data", CATALOGUE)
    return PlatformKubeSpawner(
        user=user or make_user(),
        hub=Hub(),
        api_token="test-token",
        oauth_client_id="jupyterhub-user-test",
        namespace=namespace,
        **kwargs,
    )


def choose(spawner, **options):
    spawner.user_options = options
    spawner.apply_selection(options)
    return spawner


def nodes_by_name(kube) -> dict[str, dict]:
    return {n["metadata"]["name"]: n for n in kube.kubectl_json("get", "nodes")["items"]}


def api_pod(kube, namespace, name) -> dict:
    return kube.kubectl_json("get", "pod", "-n", namespace, name)


async def eventually(what, fn, timeout=20.0, interval=0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        await asyncio.sleep(interval)
    pytest.fail(f"timed out waiting for {what}; last value: {last!r}")


def batch_pod(name, node, resource, count):
    """A pod of a batch job, created directly (not by the hub), pinned to ``node``."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {contract.LABEL_KIND: contract.KIND_BATCH}},
        "spec": {
            "nodeName": node,
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "train",
                    "image": "example.org/train:1",
                    "resources": {"limits": {resource: str(count)}},
                }
            ],
        },
    }


# -- placement -------------------------------------------------------------------------------

CASES = [
    ("cpu", {}),
    ("gpu-t4", {"count": 2}),
    ("gpu-rtx5000", {}),
    ("gpu-a100", {"size": "large", "count": 2}),
    ("mig-small", {}),
    ("fpga-u55c", {}),
]


async def test_each_accelerator_kind_lands_on_nodes_of_exactly_that_kind(kube, namespace):
    spawners = [
        choose(make_spawner(namespace), profile=profile, **options) for profile, options in CASES
    ]
    urls = await asyncio.gather(*(s.start() for s in spawners))
    nodes = nodes_by_name(kube)
    try:
        for spawner, url, (profile, _) in zip(spawners, urls, CASES, strict=True):
            assert url.startswith("http://127."), url  # KWOK's pod CIDR is loopback
            pod = api_pod(kube, namespace, spawner.pod_name)
            node = nodes[pod["spec"]["nodeName"]]
            labels = node["metadata"]["labels"]
            accelerator = spawner.selection.accelerator
            if accelerator is None:
                assert labels["labfleet.io/node-class"] == "cpu", (profile, node["metadata"])
                assert "reserved" not in labels  # nobody here is in cms
            else:
                for key, value in accelerator.node_labels.items():
                    assert labels.get(key) == value, (profile, key, labels)
                assert int(node["status"]["allocatable"][accelerator.resource]) >= 1
                limits = pod["spec"]["containers"][0]["resources"]["limits"]
                assert limits[accelerator.resource] == str(spawner.selection.count)
            assert labels.get("type") != "virtual-kubelet"
    finally:
        await asyncio.gather(*(s.stop(now=True) for s in spawners))
    for spawner in spawners:
        assert spawner.current_pod() is None


# -- nothing free: pending with a reason, then a clear failure ---------------------------------


async def test_model_with_none_free_stays_pending_and_reason_is_reported(kube, namespace):
    other = "batch-" + uuid.uuid4().hex[:6]
    kube.kubectl("create", "namespace", other)
    try:
        kube.apply(batch_pod("hog", "gpu-a30-01", "nvidia.com/gpu", 1), "-n", other)
        spawner = choose(
            make_spawner(namespace, unschedulable_grace_period=4, progress_interval=0.2),
            profile="gpu-a30",
        )
        await eventually(
            "the watch to see the A30 taken", lambda: spawner.availability().get("a30") == (0, 1)
        )
        messages = []

        async def follow():
            while spawner._start_future is None:
                await asyncio.sleep(0.05)
            async for event in spawner.progress():
                messages.append(event["message"])

        start = spawner.start()
        follower = asyncio.ensure_future(follow())
        await asyncio.sleep(2)
        # pending, on no node, while the grace period runs
        pod = api_pod(kube, namespace, spawner.pod_name)
        assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
        with pytest.raises(web.HTTPError) as err:
            await start
        await asyncio.wait_for(follower, 10)
    finally:
        kube.kubectl("delete", "namespace", other, "--wait=false", check=False)
    assert err.value.status_code == 503
    assert "Insufficient nvidia.com/gpu" in err.value.jupyterhub_message
    assert any("Waiting for a node" in m and "Insufficient nvidia.com/gpu" in m for m in messages)
    # the unschedulable pod is gone: no orphan waits for the GPU
    r = kube.kubectl("get", "pod", "-n", namespace, spawner.pod_name, check=False)
    assert r.returncode != 0 and "NotFound" in r.stderr


# -- reserved nodes ------------------------------------------------------------------------------


async def test_reserved_node_used_by_its_group_only(kube, namespace):
    member = choose(make_spawner(namespace, user=make_user(("users", "cms"))), profile="cpu")
    await member.start()
    try:
        pod = api_pod(kube, namespace, member.pod_name)
        assert pod["spec"]["nodeName"] == "cms-01"  # preferred for its members
    finally:
        await member.stop(now=True)

    # A non-member pinned (by admin config) to the reserved node cannot get there.
    outsider = choose(
        make_spawner(
            namespace,
            user=make_user(("users", "ml")),
            unschedulable_grace_period=2,
            progress_interval=0.2,
            node_affinity_required=[
                {
                    "matchExpressions": [
                        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["cms-01"]}
                    ]
                }
            ],
        ),
        profile="cpu",
    )
    with pytest.raises(web.HTTPError) as err:
        await outsider.start()
    # the scheduler counts cms-01 among the nodes whose taints the pod does not tolerate
    assert "untolerated taint" in err.value.jupyterhub_message


async def test_non_members_never_land_on_reserved_node(kube, namespace):
    spawners = [
        choose(make_spawner(namespace, user=make_user(("users", "ml"))), profile="cpu")
        for _ in range(4)
    ]
    await asyncio.gather(*(s.start() for s in spawners))
    try:
        placed = {api_pod(kube, namespace, s.pod_name)["spec"]["nodeName"] for s in spawners}
    finally:
        await asyncio.gather(*(s.stop(now=True) for s in spawners))
    assert placed and placed <= {"cpu-01", "cpu-02", "cpu-03"}


# -- volumes, security, labels as stored by the API server -------------------------------------


async def test_pod_volumes_security_and_contract_labels(kube, namespace):
    user = make_user(("users", "ml", "admins"))
    spawner = choose(
        make_spawner(
            namespace,
            user=user,
            envs_writer_group="admins",
            accounting_group_exclude=["users", "admins"],
        ),
        profile="gpu-t4",
        size="medium",
    )
    await spawner.start()
    try:
        pod = api_pod(kube, namespace, spawner.pod_name)
    finally:
        await spawner.stop(now=True)
    spec = pod["spec"]
    container = spec["containers"][0]
    assert container["image"] == CATALOGUE.images["pytorch-cuda"].image
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/home/jovyan"]["subPath"] == f"home/{user.name}"
    assert {p for p in mounts if p.startswith("/shared/groups/")} == {
        "/shared/groups/admins",
        "/shared/groups/ml",
        "/shared/groups/users",
    }
    assert mounts["/shared/public"]["subPath"] == "public"
    assert not mounts["/shared/envs"].get("readOnly")  # admins may write envs (false is omitted)
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}  # catalogue size medium
    shared = next(v for v in spec["volumes"] if v["name"] == "shared")
    assert shared["hostPath"]["path"] == "/srv/labfleet"

    uid = spawner.uid_base + user.id
    assert spec["securityContext"]["runAsUser"] == uid
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    assert not any(
        m["mountPath"].startswith("/var/run/secrets/kubernetes.io") for m in mounts.values()
    )
    csc = container["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]

    labels = pod["metadata"]["labels"]
    assert labels[contract.LABEL_USER] == user.name
    # first group alphabetically once the configured umbrella groups are left out
    assert labels[contract.LABEL_GROUP] == "ml"
    assert labels[contract.LABEL_PROFILE] == "gpu-t4"
    assert labels[contract.LABEL_ACCELERATOR] == "t4"
    assert labels[contract.LABEL_KIND] == contract.KIND_INTERACTIVE
    assert pod["metadata"]["annotations"][contract.ANNOTATION_USER] == user.name


async def test_bad_input_creates_no_object(kube, namespace):
    spawner = make_spawner(namespace, user=make_user(("users", "Not A Group")))
    with pytest.raises(web.HTTPError) as err:
        choose(spawner, profile="cpu")
    assert err.value.status_code == 400 and "group name" in err.value.log_message % err.value.args
    spawner.user_options = {"profile": "cpu"}
    with pytest.raises(web.HTTPError):
        await spawner.start()
    assert kube.kubectl_json("get", "pods", "-n", namespace)["items"] == []


# -- availability ------------------------------------------------------------------------------


async def test_availability_follows_spawns_stops_and_batch_pods(kube, namespace):
    def from_api():
        nodes = kube.kubectl_json("get", "nodes")["items"]
        pods = kube.kubectl_json("get", "pods", "-A")["items"]
        return compute_availability(nodes, pods, CATALOGUE, ["users", "ml"])

    def watch_matches_api():
        # The watch is eventually consistent: pods of earlier tests may still be
        # terminating, so compare once the cluster is quiet and the watch caught up.
        pods = kube.kubectl_json("get", "pods", "-A")["items"]
        leaving = {
            ns["metadata"]["name"]
            for ns in kube.kubectl_json("get", "namespaces")["items"]
            if ns["status"].get("phase") == "Terminating"
        }
        if any(
            p["metadata"].get("deletionTimestamp") or p["metadata"]["namespace"] in leaving
            for p in pods
        ):
            return None
        api = from_api()
        return api if spawner.availability() == api else None

    spawner = choose(make_spawner(namespace), profile="gpu-t4", count=2)
    before = await eventually("the watch to match the API", watch_matches_api)
    free, total = before["t4"]
    assert total == 8

    await spawner.start()
    await eventually("notebook counted", lambda: spawner.availability()["t4"] == (free - 2, 8))

    other = "batch-" + uuid.uuid4().hex[:6]
    kube.kubectl("create", "namespace", other)
    try:
        kube.apply(batch_pod("train", "gpu-t4-01", "nvidia.com/gpu", 3), "-n", other)
        await eventually(
            "batch pod in another namespace counted",
            lambda: spawner.availability()["t4"] == (free - 5, 8),
        )
        await eventually("the watch to match the API", watch_matches_api)

        await spawner.stop(now=True)
        await eventually("notebook released", lambda: spawner.availability()["t4"] == (free - 3, 8))
        # a finished batch pod holds nothing any more
        kube.kubectl("annotate", "pod", "train", "-n", other, "labfleet.io/fake-complete-after=0s")
        await eventually("batch pod finished", lambda: spawner.availability()["t4"] == (free, 8))
        await eventually("the watch to match the API", watch_matches_api)
    finally:
        kube.kubectl("delete", "namespace", other, "--wait=false", check=False)

    # another user's spawner reads the same watch (no second list); cms-01, the node
    # reserved to cms, has no accelerators, so a cms member sees the same numbers
    cms = make_spawner(namespace, user=make_user(("users", "cms")))
    assert cms.availability() == spawner.availability()
    assert len(PlatformKubeSpawner._cluster_watches) == 1
