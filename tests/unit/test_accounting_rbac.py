"""The accounting service's RBAC: least privilege as plain data, and the shipped manifest."""

import os
from pathlib import Path

import pytest
import yaml
from labfleet_accounting.pod_resources import KUBELET_SOCKET
from labfleet_accounting.rbac import (
    ROLE_NAME,
    accounting_rbac_objects,
    cluster_queue_names,
    gpu_exporter_daemonset,
    gpu_exporter_objects,
    gpu_exporter_rbac_objects,
    main,
)
from labfleet_batch.queues import parse_queue_config
from labfleet_spawner.catalogue import load_catalogue
from labfleet_spawner.objects import DEFAULT_KIND_TOLERATIONS

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(ROOT / "config" / "catalogue.yaml")
MANIFEST = ROOT / "accounting" / "manifests" / "rbac.yaml"
EXPORTER_MANIFEST = ROOT / "accounting" / "manifests" / "gpu-exporter.yaml"
READ_VERBS = {"get", "list", "watch"}
# verbs resourceNames cannot restrict: a rule naming objects must not carry them
UNNAMEABLE = {"list", "watch", "create", "deletecollection"}


def bundled_queues() -> list[str]:
    # The bundled platform file's batch queues, read as plain YAML (load_values
    # would also pick free ports for the services).
    data = yaml.safe_load((ROOT / "config" / "labfleet.yaml").read_text())
    return cluster_queue_names(parse_queue_config(data["batch"]["queues"], CATALOGUE))


def rules_of(objects: list[dict]) -> list[dict]:
    (role,) = [o for o in objects if o["kind"] == "ClusterRole"]
    return role["rules"]


def check_least_privilege(objects: list[dict], queues: list[str]) -> None:
    rules = rules_of(objects)
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(key, []), f"wildcard in {key}: {rule}"
        assert not {"secrets", "pods/exec", "pods/log", "serviceaccounts/token"} & set(
            rule["resources"]
        ), rule
        writes = set(rule["verbs"]) - READ_VERBS
        if writes or "resourceNames" in rule:
            # every write names exactly the configured queues, and only ClusterQueues
            assert rule["apiGroups"] == ["kueue.x-k8s.io"], rule
            assert rule["resources"] == ["clusterqueues"], rule
            assert rule.get("resourceNames") == queues, rule
            assert not UNNAMEABLE & set(rule["verbs"]), rule
            assert writes == {"patch"}, rule


def test_shipped_manifest_is_the_builders_output_for_the_bundled_config():
    queues = bundled_queues()
    assert queues == ["labfleet-cms", "labfleet-ml"]
    shipped = list(yaml.safe_load_all(MANIFEST.read_text()))
    assert shipped == accounting_rbac_objects("labfleet-accounting", "labfleet", queues)
    check_least_privilege(shipped, queues)


def test_rules_are_exactly_the_calls_the_service_makes():
    objects = accounting_rbac_objects("acct", "ns", ["q-b", "q-a", "q-b"])
    assert rules_of(objects) == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        {
            "apiGroups": ["kueue.x-k8s.io"],
            "resources": ["clusterqueues"],
            "resourceNames": ["q-a", "q-b"],  # sorted, once each
            "verbs": ["get", "patch"],
        },
    ]
    check_least_privilege(objects, ["q-a", "q-b"])
    role, binding = objects
    assert (role["kind"], binding["kind"]) == ("ClusterRole", "ClusterRoleBinding")
    assert role["metadata"] == binding["metadata"] == {"name": ROLE_NAME}
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": ROLE_NAME,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "acct", "namespace": "ns"}]


def test_the_checks_catch_what_they_guard_against():
    queues = ["labfleet-ml"]
    good = accounting_rbac_objects("a", "ns", queues)
    check_least_privilege(good, queues)
    broken = [
        {"apiGroups": ["*"], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "delete"]},
        {"apiGroups": ["kueue.x-k8s.io"], "resources": ["clusterqueues"], "verbs": ["patch"]},
        {"apiGroups": ["kueue.x-k8s.io"], "resources": ["clusterqueues"],
         "resourceNames": ["labfleet-ml", "other"], "verbs": ["patch"]},
        {"apiGroups": ["kueue.x-k8s.io"], "resources": ["clusterqueues"],
         "resourceNames": queues, "verbs": ["patch", "list"]},
    ]  # fmt: skip
    for rule in broken:
        bad = [dict(good[0], rules=[*good[0]["rules"], rule]), good[1]]
        with pytest.raises(AssertionError):
            check_least_privilege(bad, queues)


def test_queue_names_follow_the_batch_configuration():
    config = parse_queue_config(
        {"name_prefix": "site-", "groups": {"ml": {}, "cms": {}}, "offload": {"enabled": True}},
        CATALOGUE,
    )
    # the group queues only: the quota manager never patches the offload queue
    assert cluster_queue_names(config) == ["site-cms", "site-ml"]
    assert config.offload_cluster_queue() not in cluster_queue_names(config)


def test_no_queues_means_no_queue_rule_never_an_unrestricted_one():
    # an empty resourceNames would grant every ClusterQueue: the rule is left out
    assert rules_of(accounting_rbac_objects("a", "ns", [])) == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}
    ]
    with pytest.raises(ValueError, match="non-empty"):
        accounting_rbac_objects("a", "ns", ["labfleet-ml", ""])


def test_command_prints_the_shipped_manifest(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["config/labfleet.yaml"]) == 0
    assert capsys.readouterr().out == MANIFEST.read_text()


# -- GPU exporter ------------------------------------------------------------------------


def test_shipped_gpu_exporter_manifest_is_the_builders_output(capsys):
    shipped = list(yaml.safe_load_all(EXPORTER_MANIFEST.read_text()))
    assert shipped == gpu_exporter_objects()
    assert [o["kind"] for o in shipped] == [
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"
    ]  # fmt: skip
    assert main(["--gpu-exporter"]) == 0
    assert capsys.readouterr().out == EXPORTER_MANIFEST.read_text()


def test_gpu_exporter_may_only_list_pods():
    account, role, binding = gpu_exporter_rbac_objects("gx", "ns", name="gx-role")
    assert account == {"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": {"name": "gx", "namespace": "ns"}}  # fmt: skip
    # no watch, no get: one list per change of the GPU holders (NodeOwners)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == "gx-role"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gx", "namespace": "ns"}]
    check_least_privilege([role, binding], [])


def test_gpu_exporter_daemonset():
    ds = gpu_exporter_daemonset("registry.example/labfleet/services:1", "mon", "gx")
    assert (ds["kind"], ds["metadata"]["namespace"]) == ("DaemonSet", "mon")
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"] == ds["spec"]["template"]["metadata"]["labels"]
    assert spec["serviceAccountName"] == "gx"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # the GPU taints the spawner's sessions tolerate, and reserved nodes of any group
    for kind in ("gpu", "mig"):
        for toleration in DEFAULT_KIND_TOLERATIONS[kind]:
            assert toleration in spec["tolerations"]
    assert {"key": "reserved", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    (container,) = spec["containers"]
    assert container["image"] == "registry.example/labfleet/services:1"
    assert container["command"] == ["labfleet-accounting", "gpu-exporter"]
    assert "--GpuExporterApp.kubernetes=True" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert container["ports"] == [{"name": "metrics", "containerPort": 9835, "protocol": "TCP"}]
    assert container["resources"]["limits"]["memory"]
    # the socket's directory from the host, read-only, where the client looks by default
    mount, token_mount = container["volumeMounts"]
    volume, token_volume = spec["volumes"]
    assert mount == {"name": volume["name"], "mountPath": os.path.dirname(KUBELET_SOCKET),
                     "readOnly": True}  # fmt: skip
    assert volume["hostPath"] == {"path": os.path.dirname(KUBELET_SOCKET), "type": "Directory"}
    # /metrics wants the bearer token of a Secret, mounted read-only as the token file
    assert token_volume == {
        "name": token_mount["name"],
        "secret": {
            "secretName": "labfleet-gpu-exporter-metrics-token",
            "items": [{"key": "token", "path": "token"}],
            "defaultMode": 0o400,
        },
    }
    assert token_mount["readOnly"] is True
    token_arg = f"--GpuExporterApp.metrics_token_file={token_mount['mountPath']}/token"
    assert token_arg in container["args"]
    assert not any("metrics_public" in arg for arg in container["args"])
    assert "metrics-token" not in str(env)  # a file, not an environment variable
    # root only for the root-owned socket; nothing else
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]} and "add" not in security["capabilities"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec)
    other = gpu_exporter_daemonset("i", "n", "s", node_selector={"nvidia.com/gpu.product": "T4"})
    assert other["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "T4"}


def test_command_needs_a_configuration_without_gpu_exporter(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "--gpu-exporter" in capsys.readouterr().err
