"""The hub's RBAC (labfleet_spawner.rbac) as plain dicts: scope, verbs, flags, shipped manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from labfleet_spawner.rbac import hub_rbac_objects, manifest_yaml

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "spawner" / "manifests" / "rbac.yaml"
READ_ONLY = {"get", "list", "watch"}


def by_kind(objects: list[dict]) -> dict[str, dict]:
    kinds = [o["kind"] for o in objects]
    assert len(kinds) == len(set(kinds)), kinds  # one object of each kind
    return {o["kind"]: o for o in objects}


def grants(role: dict) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, over all of a role's rules."""
    table: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames etc.
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                table.setdefault((group, resource), set()).update(rule["verbs"])
    return table


def test_shipped_manifest_is_the_builders_output():
    text = SHIPPED.read_text()
    assert text == manifest_yaml()  # byte for byte: regenerate with python -m labfleet_spawner.rbac
    assert list(yaml.safe_load_all(text)) == hub_rbac_objects(
        "labfleet-hub", "labfleet", "labfleet"
    )


def test_default_rules_exactly():
    objs = by_kind(hub_rbac_objects("labfleet-hub", "labfleet", "labfleet"))
    assert set(objs) == {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    assert grants(objs["Role"]) == {
        ("", "pods"): {"create", "delete", "list", "watch"},
        ("", "events"): {"list", "watch"},
        ("", "secrets"): {"create", "patch", "delete"},
        ("", "persistentvolumeclaims"): {"create", "get", "delete"},
        ("kueue.x-k8s.io", "workloads"): {"list"},
        ("visibility.kueue.x-k8s.io", "localqueues/pendingworkloads"): {"get"},
    }
    assert grants(objs["ClusterRole"]) == {
        ("", "nodes"): {"list", "watch"},
        ("", "pods"): {"list", "watch"},
    }


def test_no_wildcards_secrets_written_never_read_and_cluster_scope_read_only():
    objs = by_kind(hub_rbac_objects("labfleet-hub", "labfleet", "labfleet"))
    checked = 0
    for kind in ("Role", "ClusterRole"):
        for rule in objs[kind]["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert not any("*" in value for value in rule[field]), (kind, rule)
            assert "serviceaccounts" not in {r.split("/")[0] for r in rule["resources"]}
            assert not set(rule["verbs"]) & {"escalate", "bind", "impersonate", "update"}
            if "secrets" in rule["resources"]:
                # the servers' own Secrets: written, owned by their pods, deleted; never read
                assert kind == "Role" and rule["resources"] == ["secrets"], rule
                assert set(rule["verbs"]) == {"create", "patch", "delete"}, rule
            else:
                assert "patch" not in rule["verbs"], rule
            if kind == "ClusterRole":
                assert set(rule["verbs"]) <= READ_ONLY, rule
            checked += 1
    assert checked == 7  # six namespaced rules, one cluster-wide


def test_bindings_tie_the_service_account_to_its_roles_only():
    objs = by_kind(hub_rbac_objects("hub-sa", "platform", "notebooks", name="labfleet-hub-x"))
    subject = {"kind": "ServiceAccount", "name": "hub-sa", "namespace": "platform"}
    assert objs["Role"]["metadata"] == {"name": "labfleet-hub-x", "namespace": "notebooks"}
    assert objs["RoleBinding"]["metadata"] == objs["Role"]["metadata"]
    assert objs["RoleBinding"]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "labfleet-hub-x",
    }
    assert objs["ClusterRole"]["metadata"] == {"name": "labfleet-hub-x-availability"}
    assert objs["ClusterRoleBinding"]["roleRef"]["kind"] == "ClusterRole"
    assert objs["ClusterRoleBinding"]["roleRef"]["name"] == "labfleet-hub-x-availability"
    assert objs["RoleBinding"]["subjects"] == objs["ClusterRoleBinding"]["subjects"] == [subject]
    for obj in objs.values():
        assert obj["metadata"]["name"].startswith("labfleet-hub")


@pytest.mark.parametrize("kueue", [True, False])
@pytest.mark.parametrize("pvc_homes", [True, False])
def test_kueue_and_pvc_rules_only_when_enabled(kueue, pvc_homes):
    role = by_kind(hub_rbac_objects("s", "n", "n", kueue=kueue, pvc_homes=pvc_homes))["Role"]
    resources = {resource for _, resource in grants(role)}
    kueue_resources = {"workloads", "localqueues/pendingworkloads"}
    assert (kueue_resources <= resources) is kueue
    assert bool(kueue_resources & resources) is kueue
    assert ("persistentvolumeclaims" in resources) is pvc_homes
    assert {"pods", "events"} <= resources  # KubeSpawner's reflectors, always


def test_without_availability_nothing_cluster_wide():
    objs = hub_rbac_objects("s", "n", "n", availability=False)
    assert [o["kind"] for o in objs] == ["Role", "RoleBinding"]


def test_returned_objects_are_copies():
    first = hub_rbac_objects("s", "n", "n")
    first[0]["rules"][0]["verbs"].append("get")
    assert "get" not in hub_rbac_objects("s", "n", "n")[0]["rules"][0]["verbs"]
