"""The hub's least-privilege RBAC (labfleet_spawner.rbac) on the real API server.

Each test makes a ServiceAccount, applies ``hub_rbac_objects`` for it, gets a
token (TokenRequest) and writes a kubeconfig holding only that token, the
server and the CA. KubeSpawner's client configuration is pointed at that
kubeconfig, so every call of ``PlatformKubeSpawner`` (pod and event
reflectors, pod and claim creation, the availability watches, Kueue queue
positions) is made as the hub's ServiceAccount; the admin identity only sets
up, looks and cleans up. Refusals are asked of the API server itself: real
requests answered 403, and SelfSubjectAccessReviews for the wider matrix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_helpers import wait_for
from kubernetes_asyncio.client import AuthenticationV1Api, Configuration
from kubernetes_asyncio.config import kube_config
from kubespawner.clients import load_config
from labfleet_spawner.availability import compute_availability
from labfleet_spawner.kube import PlatformKubeSpawner
from labfleet_spawner.rbac import hub_rbac_objects
from test_kube_kueue import GROUP, Progress, kueue_catalogue, quota_for_t4, told_their_places
from test_kube_spawner import CATALOGUE, api_pod, batch_pod, choose, eventually, make_spawner
from test_kube_spawner import make_user as _make_user

SA = "labfleet-hub"


@dataclass
class HubIdentity:
    """The hub's ServiceAccount in one test: its namespaces, token and kubeconfig."""

    cluster: Any
    sa_namespace: str
    namespace: str  # the notebook namespace
    rbac_name: str
    token: str
    kubeconfig: Path

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.sa_namespace}:{SA}"

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """One request to the API server with the ServiceAccount's token: (status, JSON)."""
        kind = "merge-patch+json" if method == "PATCH" else "json"
        request = urllib.request.Request(
            self.cluster.server + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": f"application/{kind}",
            },
        )
        context = ssl.create_default_context(cafile=str(self.cluster.ca_file))
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def allowed(self, verb: str, resource: str, namespace: str | None = None) -> bool:
        """The API server's answer (SelfSubjectAccessReview) for ``resource`` [group/]res[/sub]."""
        group, _, rest = resource.rpartition(":")
        res, _, sub = rest.partition("/")
        attributes = {"verb": verb, "group": group, "resource": res, "subresource": sub}
        if namespace:
            attributes["namespace"] = namespace
        status, review = self.call(
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": attributes},
            },
        )
        assert status == 201, review
        return review["status"].get("allowed", False)


def _kubeconfig(cluster, token: str, namespace: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "labfleet-test",
                "cluster": {
                    "server": cluster.server,
                    "certificate-authority": str(cluster.ca_file),
                },
            }
        ],
        "users": [{"name": SA, "user": {"token": token}}],
        "contexts": [
            {
                "name": SA,
                "context": {"cluster": "labfleet-test", "user": SA, "namespace": namespace},
            }
        ],
        "current-context": SA,
    }


@contextlib.contextmanager
def hub_identity(cluster, folder: Path, **rbac_options):
    """A ServiceAccount bound by ``hub_rbac_objects(...)``; namespaces and RBAC removed after."""
    s = uuid.uuid4().hex[:6]
    sa_namespace, namespace, name = f"hub-{s}", f"nb-{s}", f"labfleet-hub-{s}"
    for ns in (sa_namespace, namespace):
        cluster.kubectl("create", "namespace", ns)
    try:
        cluster.kubectl("create", "serviceaccount", SA, "-n", sa_namespace)
        cluster.apply(hub_rbac_objects(SA, sa_namespace, namespace, name=name, **rbac_options))
        token = cluster.kubectl("create", "token", SA, "-n", sa_namespace).stdout.strip()
        path = folder / f"hub-{s}.kubeconfig"
        path.write_text(yaml.safe_dump(_kubeconfig(cluster, token, namespace)))
        path.chmod(0o600)
        ident = HubIdentity(cluster, sa_namespace, namespace, name, token, path)
        # The RBAC authorizer reads bindings from an informer: wait until they count.
        wait_for("the hub's Role in effect", lambda: ident.allowed("create", "pods", namespace))
        yield ident
    finally:
        for ns in (sa_namespace, namespace):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        for kind in ("clusterrolebinding", "clusterrole"):
            cluster.kubectl(
                "delete", kind, f"{name}-availability", "--ignore-not-found", check=False
            )


@contextlib.contextmanager
def kubespawner_credentials(kubeconfig: Path):
    """Point KubeSpawner's (global, cached) client configuration at ``kubeconfig``."""
    saved = Configuration.get_default_copy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        load_config.cache_clear()
        try:
            yield
        finally:
            load_config.cache_clear()
            Configuration.set_default(saved)  # later modules must not inherit this token


@pytest.fixture
async def hub_sa(k8s_cluster, tmp_path):
    with hub_identity(k8s_cluster, tmp_path) as ident, kubespawner_credentials(ident.kubeconfig):
        try:
            yield ident
        finally:
            # before the RBAC goes: watches must not spin on 403s meanwhile
            await PlatformKubeSpawner.stop_watches()


def make_user(groups=("users", GROUP)):
    return _make_user(groups)


async def whoami(spawner) -> str:
    """The identity KubeSpawner's own API client authenticates as (SelfSubjectReview)."""
    review = await AuthenticationV1Api(spawner.api.api_client).create_self_subject_review(
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    )
    return review.status.user_info.username


# -- spawning as the hub's ServiceAccount -----------------------------------------------------


async def test_gpu_spawn_runs_and_stop_deletes_with_the_hubs_rights(hub_sa):
    c, ns = hub_sa.cluster, hub_sa.namespace
    spawner = choose(make_spawner(ns, user=make_user()), profile="gpu-t4", count=1)
    assert await whoami(spawner) == hub_sa.username  # not the admin's token
    url = await spawner.start()
    try:
        assert url.startswith("http://127.")
        pod = api_pod(c, ns, spawner.pod_name)  # as the admin sees it
        assert pod["status"]["phase"] == "Running"
        assert pod["spec"]["nodeName"] == "gpu-t4-01"
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert await spawner.poll() is None  # running, read from the pod reflector
        # the event reflector (list/watch events) delivers the scheduler's event
        await eventually(
            "the Scheduled event",
            lambda: any(e.get("reason") == "Scheduled" for e in spawner.events),
        )
    finally:
        await spawner.stop(now=True)
    assert spawner.current_pod() is None
    gone = c.kubectl("get", "pod", "-n", ns, spawner.pod_name, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


async def test_pvc_home_created_bound_and_deleted_with_the_hubs_rights(hub_sa):
    c, ns = hub_sa.cluster, hub_sa.namespace
    s = uuid.uuid4().hex[:6]
    storage_class, volume = f"lf-manual-{s}", f"lf-home-{s}"
    # no provisioner here: a pre-made volume of a class of its own, which only this claim can bind
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": storage_class,
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": f"/srv/labfleet-pv/{s}"},
            },
        }
    )
    try:
        spawner = choose(
            make_spawner(
                ns,
                user=make_user(),
                home_storage="pvc",
                storage_capacity="1Gi",
                storage_class=storage_class,
            ),
            profile="cpu",
        )
        await spawner.start()
        try:
            claim = c.kubectl_json("get", "pvc", "-n", ns, spawner.pvc_name)
            assert claim["spec"]["storageClassName"] == storage_class
            assert claim["status"]["phase"] == "Bound" and claim["spec"]["volumeName"] == volume
            pod = api_pod(c, ns, spawner.pod_name)
            assert pod["status"]["phase"] == "Running"
            claims = [
                v["persistentVolumeClaim"]["claimName"]
                for v in pod["spec"]["volumes"]
                if "persistentVolumeClaim" in v
            ]
            assert claims == [spawner.pvc_name]
        finally:
            await spawner.stop(now=True)
        await spawner.delete_forever()  # what the hub does when the user is removed
        wait_for(
            "the home claim deleted",
            lambda: (
                "NotFound"
                in c.kubectl("get", "pvc", "-n", ns, spawner.pvc_name, check=False).stderr
            ),
        )
    finally:
        c.kubectl("delete", "pv", volume, "--wait=false", "--ignore-not-found", check=False)


# -- availability: cluster-wide, read-only ----------------------------------------------------


def admin_view(cluster, groups) -> dict | None:
    """Availability from the admin's lists, or None while pods or namespaces are going away."""
    leaving = {
        n["metadata"]["name"]
        for n in cluster.kubectl_json("get", "namespaces")["items"]
        if n["status"].get("phase") == "Terminating"
    }
    pods = cluster.kubectl_json("get", "pods", "-A")["items"]
    if any(
        p["metadata"].get("deletionTimestamp") or p["metadata"]["namespace"] in leaving
        for p in pods
    ):
        return None
    return compute_availability(
        cluster.kubectl_json("get", "nodes")["items"], pods, CATALOGUE, groups
    )


def form_availability(html: str, profile: str) -> str:
    """The availability text the form shows next to ``profile``."""
    found = re.search(rf'id="availability-{re.escape(profile)}">(.*?)</span>', html, re.S)
    assert found, html
    return " ".join(found.group(1).split())


async def test_form_availability_with_the_hubs_rights_matches_the_admins_view(hub_sa):
    c, ns = hub_sa.cluster, hub_sa.namespace
    user = make_user()
    groups = [g.name for g in user.groups]
    spawner = choose(make_spawner(ns, user=user), profile="gpu-t4", count=2)
    assert await whoami(spawner) == hub_sa.username  # the watches share this client

    def settled():
        view = admin_view(c, groups)
        return view if view and spawner.availability() == view else None

    before = await eventually("the hub's watch to match the admin's view", settled, 30, 0.5)
    free, total = before["t4"]
    assert total == 8 and free >= 5, before  # the fleet's T4 node, not busy with other tests
    assert form_availability(await spawner.get_options_form(), "gpu-t4") == f"{free} of 8 free"

    await spawner.start()
    other = "batch-" + uuid.uuid4().hex[:6]  # a namespace the hub has no Role in
    c.kubectl("create", "namespace", other)
    try:
        c.apply(batch_pod("train", "gpu-t4-01", "nvidia.com/gpu", 3), "-n", other)
        await eventually(
            "the notebook and the other namespace's batch pod counted",
            lambda: spawner.availability()["t4"] == (free - 5, 8),
        )
        after = await eventually("the watch to match the admin's view", settled, 30, 0.5)
        assert after["t4"] == (free - 5, 8)
        shown = form_availability(await spawner.get_options_form(), "gpu-t4")
        assert shown == (f"{free - 5} of 8 free" if free > 5 else "none free (8 in total)")
    finally:
        await spawner.stop(now=True)
        c.kubectl("delete", "namespace", other, "--wait=false", check=False)
    await eventually("the notebook released", lambda: spawner.availability()["t4"][0] >= free - 3)


# -- Kueue: queue positions with the hub's rights --------------------------------------------


async def test_kueue_queue_positions_with_the_hubs_rights(hub_sa):
    c, ns = hub_sa.cluster, hub_sa.namespace
    if not c.webhooks:
        pytest.skip("cluster started without Kueue webhooks (pod integration needs them)")
    cq = quota_for_t4(c, ns, gpus=1)
    flavor = c.kubectl_json("get", "clusterqueues.kueue.x-k8s.io", cq)["spec"]["resourceGroups"]
    flavor = flavor[0]["flavors"][0]["name"]
    catalogue = kueue_catalogue()
    fast = {"progress_interval": 0.2, "queue_position_interval": 0.5, "events_enabled": False}

    def spawner(**extra):
        return choose(
            make_spawner(ns, user=make_user(), catalogue_data=catalogue, **fast, **extra),
            profile="gpu-t4",
        )

    # the third asks the Workloads only: the fallback's own right (list workloads) is proven too
    first, second, third = spawner(), spawner(), spawner(kueue_visibility_version="")
    starts: list[asyncio.Future] = []
    followers: list[Progress] = []
    try:
        await first.start()
        assert api_pod(c, ns, first.pod_name)["spec"]["nodeName"] == "gpu-t4-01"
        for s in (second, third):
            starts.append(asyncio.ensure_future(s.start()))
            followers.append(Progress(s))
            await eventually(
                "the gated pod",
                lambda s=s: (
                    c.kubectl("get", "pod", "-n", ns, s.pod_name, check=False).returncode == 0
                ),
            )
            await asyncio.sleep(1.1)  # distinct creation seconds: an unambiguous FIFO order
        await told_their_places(followers)
        # the visibility API answered the hub (a refusal would fall back to Workloads);
        # the third's position could only come from listing the Workloads
        assert second._position_source == ("visibility" if c.visibility else "workloads")
        assert not any(task.done() for task in starts)
    finally:
        for task in starts:
            task.cancel()
        for f in followers:
            f.task.cancel()
        await asyncio.gather(*(s.stop(now=True) for s in (first, second, third)))
        c.kubectl("delete", "localqueues.kueue.x-k8s.io", "--all", "-n", ns, check=False)
        c.kubectl("delete", "clusterqueues.kueue.x-k8s.io", cq, "--wait=false", check=False)
        c.kubectl("delete", "resourceflavors.kueue.x-k8s.io", flavor, "--wait=false", check=False)


# -- refusals -------------------------------------------------------------------------------


def probe_pod(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "example.org/x:1"}]},
    }


async def test_everything_outside_the_rules_is_refused(hub_sa):
    c, ns, other = hub_sa.cluster, hub_sa.namespace, hub_sa.sa_namespace
    c.kubectl("create", "secret", "generic", "hub-must-not-read", "-n", ns, "--from-literal=k=v")

    # Real requests (server-side dry run where they would change something).
    # A control first: the same token and body are accepted where the Role allows.
    status, _ = hub_sa.call("POST", f"/api/v1/namespaces/{ns}/pods?dryRun=All", probe_pod("ok"))
    assert status == 201
    refused_requests = {
        "create a pod in another namespace": (
            "POST",
            f"/api/v1/namespaces/{other}/pods?dryRun=All",
            probe_pod("x"),
        ),
        "list secrets in the notebook namespace": ("GET", f"/api/v1/namespaces/{ns}/secrets", None),
        "read a secret in the notebook namespace": (
            "GET",
            f"/api/v1/namespaces/{ns}/secrets/hub-must-not-read",
            None,
        ),
        "delete a node": ("DELETE", "/api/v1/nodes/gpu-t4-01?dryRun=All", None),
        "label a node": (
            "PATCH",
            "/api/v1/nodes/gpu-t4-01?dryRun=All",
            {"metadata": {"labels": {"reserved": "ml"}}},
        ),
    }
    answers = {what: hub_sa.call(*request)[0] for what, request in refused_requests.items()}
    assert answers == dict.fromkeys(refused_requests, 403)

    # The wider matrix, asked of the authorizer: (verb, [group:]resource[/sub], namespace).
    probes = [
        ("create", "pods", other),
        ("delete", "pods", other),
        ("update", "pods", ns),
        ("patch", "pods", ns),
        ("get", "pods", ns),  # KubeSpawner never reads one pod: the reflector lists
        ("create", "pods/exec", ns),  # no shell in anybody's notebook
        ("create", "pods/portforward", ns),
        ("get", "pods/log", ns),
        ("get", "secrets", ns),  # the servers' Secrets are written, never read
        ("list", "secrets", None),
        ("watch", "secrets", ns),
        ("update", "secrets", ns),
        ("create", "secrets", other),
        ("delete", "secrets", other),
        ("create", "serviceaccounts/token", ns),
        ("create", "services", ns),
        ("create", "configmaps", ns),
        ("create", "apps:deployments", ns),
        ("create", "batch:jobs", ns),
        ("create", "rbac.authorization.k8s.io:rolebindings", ns),
        ("create", "rbac.authorization.k8s.io:clusterroles", None),
        ("create", "namespaces", None),
        ("delete", "nodes", None),
        ("patch", "nodes", None),
        ("update", "nodes/status", None),
        ("get", "nodes", None),  # the watch lists; single reads are not needed
        ("delete", "persistentvolumeclaims", other),
        ("create", "persistentvolumes", None),
        ("list", "kueue.x-k8s.io:workloads", other),
        ("update", "kueue.x-k8s.io:workloads", ns),
        ("create", "kueue.x-k8s.io:localqueues", ns),
        ("get", "visibility.kueue.x-k8s.io:localqueues/pendingworkloads", other),
        ("get", "visibility.kueue.x-k8s.io:clusterqueues/pendingworkloads", None),
        ("impersonate", "users", None),
    ]
    refused = [p for p in probes if not hub_sa.allowed(*p)]
    assert refused == probes, f"allowed: {sorted(set(probes) - set(refused))}"

    # Every granted (group, resource, verb) is allowed where it is granted, and only there.
    granted = [
        (verb, f"{group}:{resource}" if group else resource, obj["metadata"].get("namespace"))
        for obj in hub_rbac_objects(SA, other, ns, name=hub_sa.rbac_name)
        if obj["kind"] in ("Role", "ClusterRole")
        for rule in obj["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    ]
    assert len(granted) == 18  # 14 in the notebook namespace, 4 cluster-wide
    assert [g for g in granted if not hub_sa.allowed(*g)] == []
    cluster_wide = {(verb, res) for verb, res, where in granted if where is None}
    namespaced = [(v, r) for v, r, where in granted if where and (v, r) not in cluster_wide]
    assert len(namespaced) == 12  # pods list/watch are also cluster-wide (availability)
    assert [(v, r) for v, r in namespaced if hub_sa.allowed(v, r, other)] == []


async def test_disabled_options_grant_nothing_for_them(k8s_cluster, tmp_path):
    options = {"kueue": False, "pvc_homes": False, "availability": False}
    with hub_identity(k8s_cluster, tmp_path, **options) as ident:
        ns = ident.namespace
        probes = [
            ("list", "kueue.x-k8s.io:workloads", ns),
            ("get", "visibility.kueue.x-k8s.io:localqueues/pendingworkloads", ns),
            ("create", "persistentvolumeclaims", ns),
            ("get", "persistentvolumeclaims", ns),
            ("list", "nodes", None),
            ("watch", "pods", None),
        ]
        assert [p for p in probes if ident.allowed(*p)] == []
        # what KubeSpawner itself needs stays
        kept = [("create", "pods", ns), ("watch", "pods", ns), ("list", "events", ns)]
        assert all(ident.allowed(*p) for p in kept)
        # and the visibility API really answers 403 (not only the authorizer's opinion)
        status, _ = ident.call(
            "GET",
            f"/apis/visibility.kueue.x-k8s.io/v1beta2/namespaces/{ns}/localqueues/q/pendingworkloads",
        )
        assert (status == 403) if k8s_cluster.visibility else (status in (403, 404))
