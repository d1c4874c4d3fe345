"""A reader of pods learns no notebook token (issue 10), on the real API server.

Notebooks are started by the real ``PlatformKubeSpawner`` with the hub's own
ServiceAccount (``hub_sa``: only ``hub_rbac_objects``' rights), so the Secret
handling is proven within the hub's least privilege. The pods are then listed
cluster-wide with the token of a ServiceAccount bound by the accounting
service's own RBAC (``accounting_rbac_objects``), exactly what the accounting
service reads; the notebook's token must appear nowhere in that JSON, while
the pod spec references the server's Secret, which holds the token, belongs
to the pod (ownerReference with its uid) and goes with it.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid

import pytest
from k8s_helpers import service_account_view, wait_for
from labfleet_accounting.rbac import accounting_rbac_objects
from test_hub_rbac import hub_sa, make_user  # noqa: F401 (fixture)
from test_kube_spawner import api_pod, choose, make_spawner

TOKEN_VARS = ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN")


@pytest.fixture
def accounting_reader(k8s_cluster, tmp_path):
    """The cluster as the accounting service's ServiceAccount sees it (its token only)."""
    s = uuid.uuid4().hex[:6]
    ns, role = f"acct-{s}", f"labfleet-accounting-{s}"
    k8s_cluster.kubectl("create", "namespace", ns)
    try:
        k8s_cluster.kubectl("create", "serviceaccount", "labfleet-accounting", "-n", ns)
        k8s_cluster.apply(accounting_rbac_objects("labfleet-accounting", ns, [], name=role))
        yield service_account_view(
            k8s_cluster,
            ns,
            "labfleet-accounting",
            tmp_path / "accounting.kubeconfig",
            *("list", "pods", "--all-namespaces"),
        )
    finally:
        k8s_cluster.kubectl("delete", "clusterrolebinding,clusterrole", role, check=False)
        k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def secret_of(cluster, ns: str, name: str) -> dict | None:
    got = cluster.kubectl("get", "secret", "-n", ns, name, "-o", "json", check=False)
    if got.returncode != 0:
        assert "NotFound" in got.stderr, got.stderr
        return None
    return json.loads(got.stdout)


def started(ns: str, token: str, **extra):
    spawner = choose(make_spawner(ns, user=make_user(), **extra), profile="cpu")
    spawner.api_token = token
    return spawner


async def test_pod_readers_see_a_reference_never_the_token(hub_sa, accounting_reader):  # noqa: F811
    c, ns = hub_sa.cluster, hub_sa.namespace
    token = secrets.token_hex(24)
    spawner = started(ns, token, environment={"HF_TOKEN": "hf-" + token})
    secret_name = f"{spawner.pod_name}-env"
    # a Secret of that name left by an earlier start, with an old token: replaced
    c.kubectl(
        "create", "secret", "generic", secret_name, "-n", ns, "--from-literal=JPY_API_TOKEN=old"
    )
    await spawner.start()
    try:
        pod = api_pod(c, ns, spawner.pod_name)
        assert pod["status"]["phase"] == "Running"

        # what the accounting service reads: every pod, cluster-wide, as JSON
        listed = accounting_reader.kubectl("get", "pods", "--all-namespaces", "-o", "json").stdout
        names = {
            (p["metadata"]["namespace"], p["metadata"]["name"]) for p in json.loads(listed)["items"]
        }
        assert (ns, spawner.pod_name) in names  # the notebook is in what it read
        assert token not in listed
        # nor any encoding of it an API answer might carry
        assert base64.b64encode(token.encode()).decode() not in listed
        # and it may not read the Secret the pod points to
        refused = accounting_reader.kubectl("get", "secret", "-n", ns, secret_name, check=False)
        assert refused.returncode != 0 and "Forbidden" in refused.stderr, refused.stderr

        # the pod spec references the server's Secret, key by key
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        for name in (*TOKEN_VARS, "HF_TOKEN"):
            assert env[name] == {
                "name": name,
                "valueFrom": {"secretKeyRef": {"name": secret_name, "key": name}},
            }
        assert env["JUPYTERHUB_USER"]["value"] == spawner.user.name

        # the Secret (read by the admin): the values, owned by this very pod
        secret = secret_of(c, ns, secret_name)
        decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert decoded == {
            "JUPYTERHUB_API_TOKEN": token,
            "JPY_API_TOKEN": token,
            "HF_TOKEN": "hf-" + token,
        }
        assert secret["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "Pod", "name": spawner.pod_name,
             "uid": pod["metadata"]["uid"]}
        ]  # fmt: skip
    finally:
        await spawner.stop(now=True)
    assert secret_of(c, ns, secret_name) is None  # stop deletes it


async def test_the_secret_goes_with_its_pod_without_the_hub(hub_sa):  # noqa: F811
    c, ns = hub_sa.cluster, hub_sa.namespace
    spawner = started(ns, secrets.token_hex(24))
    await spawner.start()
    secret_name = f"{spawner.pod_name}-env"
    try:
        assert secret_of(c, ns, secret_name) is not None
        # the pod removed behind the hub's back (a node drained, an admin's kubectl)
        c.kubectl("delete", "pod", "-n", ns, spawner.pod_name, "--wait=false")
        wait_for(
            "the garbage collector to delete the pod's Secret",
            lambda: secret_of(c, ns, secret_name) is None,
            timeout=60,
        )
    finally:
        await spawner.stop(now=True)  # nothing left to delete: no error either
