"""The pure pod builders of the Kubernetes spawner, on plain dicts (no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
from labfleet_hub import contract
from labfleet_spawner import objects
from labfleet_spawner.catalogue import load_catalogue, validate_selection

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(REPO / "config" / "catalogue.yaml")
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
FPGA_TAINT = {"key": "amd.com/fpga", "operator": "Exists", "effect": "NoSchedule"}


def select(profile, groups=("users", "ml", "fpga"), **options):
    return validate_selection(CATALOGUE, groups, {"profile": profile, **options})


def expressions(term):
    return {(e["key"], e["operator"], tuple(e["values"])) for e in term["matchExpressions"]}


# -- resources and placement, one case per accelerator kind ---------------------------


@pytest.mark.parametrize(
    "profile, count, resource, label, taint",
    [
        ("gpu-t4", 2, "nvidia.com/gpu", ("nvidia.com/gpu.product", "Tesla-T4"), GPU_TAINT),
        ("gpu-a100", 3, "nvidia.com/gpu", ("nvidia.com/gpu.product", "NVIDIA-A100-PCIE-40GB"),
         GPU_TAINT),
        ("mig-small", 1, "nvidia.com/mig-1g.10gb", ("nvidia.com/mig.strategy", "mixed"), GPU_TAINT),
        ("fpga-u55c", 1, "amd.com/xilinx_u55c_gen3x16_xdma_base_3-0",
         ("labfleet.io/fpga-board", "u55c"), FPGA_TAINT),
    ],
)  # fmt: skip
def test_accelerator_placement(profile, count, resource, label, taint):
    sel = select(profile, count=count)
    res = objects.resource_requirements(sel)
    # extended resource is both limit and request, with the chosen count
    assert res["limits"][resource] == res["requests"][resource] == str(count)
    assert (
        res["limits"]["cpu"] == f"{sel.size.cpu:g}" and res["limits"]["memory"] == sel.size.memory
    )

    terms = objects.required_node_terms(sel, CATALOGUE)
    assert len(terms) == 1  # one term: its expressions are ANDed
    exprs = expressions(terms[0])
    assert (label[0], "In", (label[1],)) in exprs
    assert ("type", "NotIn", ("virtual-kubelet",)) in exprs
    assert not any(op == "NotIn" and key == label[0] for key, op, _ in exprs)

    tols = objects.tolerations(sel, [])
    assert tols == [taint]


def test_t4_and_a100_affinities_exclude_each_other():
    t4 = expressions(objects.required_node_terms(select("gpu-t4"), CATALOGUE)[0])
    a100 = expressions(objects.required_node_terms(select("gpu-a100"), CATALOGUE)[0])
    # a required In on different values of the same key: no node satisfies both
    assert ("nvidia.com/gpu.product", "In", ("Tesla-T4",)) in t4
    assert ("nvidia.com/gpu.product", "In", ("NVIDIA-A100-PCIE-40GB",)) in a100


def test_cpu_session_kept_off_accelerator_nodes():
    sel = select("cpu")
    res = objects.resource_requirements(sel)
    assert set(res["limits"]) == {"cpu", "memory"}
    exprs = expressions(objects.required_node_terms(sel, CATALOGUE)[0])
    assert (
        "nvidia.com/gpu.product",
        "NotIn",
        ("NVIDIA-A100-PCIE-40GB", "NVIDIA-A30", "Quadro-RTX-5000", "Tesla-T4"),
    ) in exprs
    assert ("nvidia.com/mig.strategy", "NotIn", ("mixed",)) in exprs
    assert ("labfleet.io/fpga-board", "NotIn", ("u55c", "v70")) in exprs
    assert objects.tolerations(sel, []) == []


def test_cpu_profile_may_allow_accelerator_nodes():
    from dataclasses import replace

    sel = select("cpu")
    sel = replace(sel, profile=replace(sel.profile, allow_accelerator_nodes=True))
    exprs = expressions(objects.required_node_terms(sel, CATALOGUE)[0])
    assert exprs == {("type", "NotIn", ("virtual-kubelet",))}


def test_admin_terms_get_our_expressions_in_each_term():
    admin = [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
    ]
    terms = objects.required_node_terms(select("gpu-t4"), CATALOGUE, admin)
    assert len(terms) == 2
    for term, zone in zip(terms, "ab", strict=True):
        exprs = expressions(term)
        assert ("zone", "In", (zone,)) in exprs
        assert ("nvidia.com/gpu.product", "In", ("Tesla-T4",)) in exprs
    assert len(admin[0]["matchExpressions"]) == 1  # the admin's config is not mutated


def test_catalogue_tolerations_added_and_kind_defaults_configurable():
    from dataclasses import replace

    sel = select("gpu-t4")
    extra = {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoExecute"}
    sel = replace(sel, accelerator=replace(sel.accelerator, tolerations=(extra,)))
    assert objects.tolerations(sel, []) == [GPU_TAINT, extra]
    assert objects.tolerations(sel, [], kind_tolerations={}) == [extra]


# -- reserved nodes -------------------------------------------------------------------------


def test_reserved_nodes_tolerated_and_preferred_only_for_members():
    member = objects.tolerations(select("cpu", groups=("users", "cms")), ["cms", "users"])
    assert {
        "key": "reserved",
        "operator": "Equal",
        "value": "cms",
        "effect": "NoSchedule",
    } in member
    outsider = objects.tolerations(select("cpu", groups=("users", "ml")), ["ml", "users"])
    assert not any(t.get("value") == "cms" for t in outsider)
    # never an Exists toleration on the reserved key: that would open every reserved node
    assert not any(t["key"] == "reserved" and t["operator"] == "Exists" for t in member + outsider)

    preferred = objects.preferred_node_terms(["cms", "users"])
    assert preferred[0]["weight"] > 0
    assert expressions(preferred[0]["preference"]) == {("reserved", "In", ("cms", "users"))}
    assert objects.preferred_node_terms([]) == []


# -- volumes ----------------------------------------------------------------------------------

SHARED = {"persistentVolumeClaim": {"claimName": "labfleet-shared"}}


def mounts_by_path(mounts):
    return {m["mountPath"]: m for m in mounts}


def test_volumes_shared_home_groups_public_envs_shm():
    opts = objects.StorageOptions(shared_volume=SHARED)
    volumes, mounts = objects.volumes_and_mounts(opts, "alice", ["ml", "cms"], False, "2Gi")
    assert {"name": "shared", **SHARED} in volumes
    by_path = mounts_by_path(mounts)
    assert by_path["/home/jovyan"]["subPath"] == "home/alice"
    assert by_path["/shared/groups/ml"]["subPath"] == "groups/ml"
    assert by_path["/shared/groups/cms"]["subPath"] == "groups/cms"
    assert not by_path["/shared/groups/ml"].get("readOnly")
    assert by_path["/shared/public"]["subPath"] == "public"
    assert by_path["/shared/envs"] == {
        "name": "shared",
        "mountPath": "/shared/envs",
        "subPath": "envs",
        "readOnly": True,
    }
    # exactly the user's groups: no mount of any other group
    assert sorted(p for p in by_path if p.startswith("/shared/groups/")) == [
        "/shared/groups/cms",
        "/shared/groups/ml",
    ]
    shm = next(v for v in volumes if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert by_path["/dev/shm"]["name"] == "shm"


def test_envs_writable_for_privileged_group_and_shm_default():
    opts = objects.StorageOptions(shared_volume=SHARED, shm_default="128Mi")
    volumes, mounts = objects.volumes_and_mounts(opts, "carol", ["admins"], True, None)
    assert mounts_by_path(mounts)["/shared/envs"]["readOnly"] is False
    assert next(v for v in volumes if v["name"] == "shm")["emptyDir"]["sizeLimit"] == "128Mi"


def test_home_on_pvc():
    opts = objects.StorageOptions(shared_volume=SHARED, home_mode="pvc", home_claim="claim-bob")
    volumes, mounts = objects.volumes_and_mounts(opts, "bob", [], False, None)
    assert {"name": "home", "persistentVolumeClaim": {"claimName": "claim-bob"}} in volumes
    home = mounts_by_path(mounts)["/home/jovyan"]
    assert home == {"name": "home", "mountPath": "/home/jovyan"}


def test_home_on_pvc_without_shared_volume():
    opts = objects.StorageOptions(shared_volume=None, home_mode="pvc", home_claim="claim-bob")
    volumes, mounts = objects.volumes_and_mounts(opts, "bob", ["ml"], False, None)
    assert [v["name"] for v in volumes] == ["home", "shm"]
    assert set(mounts_by_path(mounts)) == {"/home/jovyan", "/dev/shm"}
    assert objects.storage_env(opts, ["ml"]) == {"LABFLEET_HOME": "/home/jovyan"}


@pytest.mark.parametrize(
    "opts, message",
    [
        (objects.StorageOptions(shared_volume=None), "needs a shared volume"),
        (objects.StorageOptions(shared_volume=SHARED, home_mode="pvc"), "needs a claim"),
        (objects.StorageOptions(shared_volume=SHARED, home_mode="nfs"), "allowed: shared, pvc"),
    ],
)
def test_storage_misconfiguration(opts, message):
    with pytest.raises(objects.PodSpecError, match=message):
        objects.volumes_and_mounts(opts, "bob", [], False, None)


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "../etc", "-rf", ".hidden", "a" * 129, "bob/../alice", "eve{x}", "a b", 7]
)
def test_bad_usernames_rejected(name):
    with pytest.raises(objects.PodSpecError, match="allowed: letters, digits"):
        objects.check_username(name)


@pytest.mark.parametrize("group", ["CMS", "a" * 64, "-x", "x-", "a/b", "", "x y", None])
def test_bad_group_names_rejected(group):
    with pytest.raises(objects.PodSpecError, match="allowed: lower-case letters"):
        objects.check_groups(["ml", group])


def test_good_names_accepted():
    assert objects.check_username("alice.smith@infn.it") == "alice.smith@infn.it"
    assert objects.check_groups(["ml", "cms", "ml", "a" * 63]) == ["a" * 63, "cms", "ml"]


# -- security ----------------------------------------------------------------------------------


def test_security_contexts():
    pod = objects.pod_security_context(200003, 200003, [300011, 300010, 300011])
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 200003
    assert pod["supplementalGroups"] == [300010, 300011]
    assert "fsGroup" not in pod
    container = objects.container_security_context(200003, 200003)
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert container["privileged"] is False
    with pytest.raises(objects.PodSpecError, match="root"):
        objects.pod_security_context(0, 0, [])


# -- the accounting contract ----------------------------------------------------------------


def test_contract_metadata_gpu():
    sel = select("gpu-a100", count=2)
    labels, annotations = objects.contract_metadata(
        sel, "alice@infn.it", "alice-infn-it-1234", ["ml", "users"], "ml"
    )
    assert labels == {
        contract.LABEL_USER: "alice-infn-it-1234",
        contract.LABEL_GROUP: "ml",
        contract.LABEL_PROFILE: "gpu-a100",
        contract.LABEL_ACCELERATOR: "a100",
        contract.LABEL_KIND: contract.KIND_INTERACTIVE,
    }
    assert annotations == {
        contract.ANNOTATION_USER: "alice@infn.it",
        contract.ANNOTATION_GROUPS: "ml,users",
        contract.ANNOTATION_ACCELERATOR_COUNT: "2",
    }


def test_contract_metadata_cpu_no_accelerator_and_no_group():
    labels, annotations = objects.contract_metadata(select("cpu"), "bob", "bob", [], "")
    assert contract.LABEL_ACCELERATOR not in labels and contract.LABEL_GROUP not in labels
    assert contract.ANNOTATION_ACCELERATOR_COUNT not in annotations
    with pytest.raises(objects.PodSpecError, match="label value"):
        objects.contract_metadata(select("cpu"), "bob", "bob@x", [], "")


def test_kueue_labels():
    assert objects.kueue_labels("ml-queue") == {
        contract.KUEUE_QUEUE_LABEL: "ml-queue",
        contract.KUEUE_MANAGED_LABEL: "true",
    }
    assert objects.KUEUE_SCHEDULING_GATES == [{"name": contract.KUEUE_ADMISSION_GATE}]


# -- which group pays -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "profile, groups, exclude, expected",
    [
        # the A100 is granted through ml (or admins): ml, whatever else the user is in
        ("gpu-a100", ["users", "ml", "cms"], ["users"], "ml"),
        ("gpu-a100", ["admins", "ml", "users"], ["users", "admins"], "ml"),
        ("gpu-a100", ["admins", "ml", "users"], ["users"], "admins"),
        # unrestricted profile: first alphabetically, umbrella groups skipped
        ("cpu", ["users", "zeta", "cms"], ["users"], "cms"),
        ("cpu", ["users"], ["users"], "users"),
        ("cpu", [], ["users"], ""),
        # FPGA: granted by fpga, even though "cms" sorts first
        ("fpga-u55c", ["cms", "fpga", "users"], ["users"], "fpga"),
    ],
)
def test_accounting_group_rule(profile, groups, exclude, expected):
    sel = select(profile, groups=groups or ("users",))
    assert objects.accounting_group(sel, groups, exclude) == expected


def test_accounting_group_ignores_order_of_groups():
    sel = select("cpu")
    assert objects.accounting_group(sel, ["ml", "cms", "users"], ["users"]) == "cms"
    assert objects.accounting_group(sel, ["cms", "users", "ml"], ["users"]) == "cms"
