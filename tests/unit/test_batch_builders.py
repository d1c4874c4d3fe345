"""Batch: request validation, Job builder, queue layout, authorization (pure, no network)."""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path

import pytest
from kubespawner.slugs import is_valid_label, safe_slug
from labfleet_batch import jobs, podspec, queues
from labfleet_batch.authz import Caller, Policy
from labfleet_batch.validation import Limits, RequestError, validate_request
from labfleet_hub import contract
from labfleet_spawner.catalogue import load_catalogue
from labfleet_spawner.kube import PlatformKubeSpawner
from labfleet_spawner.storage import StorageError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def catalogue():
    return load_catalogue(ROOT / "config" / "catalogue.yaml")


@pytest.fixture(scope="module")
def qconfig(catalogue):
    return queues.parse_queue_config(
        {
            "cohort": "co",
            "offload": {"enabled": True},
            "groups": {
                "ml": {"cpu": 32, "memory": "128Gi", "accelerators": {"a100": 2, "t4": 4}},
                "cms": {"cpu": 16, "memory": "64Gi", "accelerators": {"t4": 1}, "admins": ["dan"]},
            },
        },
        catalogue,
    )


def validate(raw, catalogue, qconfig, groups=("ml", "users"), **kw):
    return validate_request(
        raw,
        catalogue=catalogue,
        user_groups=groups,
        queue_groups=qconfig.covered_accelerators(),
        priorities=qconfig.priorities,
        offload_available=qconfig.offload_enabled,
        **kw,
    )


# -- validation -------------------------------------------------------------------


def test_minimal_request_gets_defaults(catalogue, qconfig):
    req = validate({"command": ["echo", "hi"]}, catalogue, qconfig)
    assert req.group == "ml"  # the only group of the user with a queue
    assert req.selection.profile.name == "cpu" and req.selection.count == 0
    assert (req.completions, req.parallelism, req.priority) == (1, 1, "normal")
    assert req.max_run_time == Limits().default_run_time


def test_gpu_shortcut_picks_profile(catalogue, qconfig):
    req = validate({"script": "nvidia-smi", "accelerator": "a100", "count": 2}, catalogue, qconfig)
    assert req.selection.profile.name == "gpu-a100"
    assert req.selection.accelerator.resource == "nvidia.com/gpu" and req.selection.count == 2


@pytest.mark.parametrize(
    "raw, groups, fragment",
    [
        ({"command": ["x"], "bogus": 1}, ("ml",), "unknown field(s) bogus"),
        ({}, ("ml",), "exactly one of command"),
        ({"command": ["x"], "script": "y"}, ("ml",), "exactly one of command"),
        ({"command": "echo hi"}, ("ml",), "list of arguments"),
        ({"script": "   "}, ("ml",), "script is empty"),
        ({"script": "x" * 70000}, ("ml",), "allowed: at most 65536 bytes"),
        ({"command": ["x"], "group": "cms"}, ("ml",), "allowed: ml"),
        ({"command": ["x"]}, ("ml", "cms"), "group is required; allowed: cms, ml"),
        ({"command": ["x"]}, ("nobody",), "no group with a batch queue"),
        ({"command": ["x"], "name": "Bad_Name"}, ("ml",), "lower-case letters"),
        ({"command": ["x"], "profile": "fpga-u55c"}, ("ml",), "not available to you"),
        ({"command": ["x"], "accelerator": "v70"}, ("ml",), "accelerator 'v70' is not available"),
        ({"command": ["x"], "profile": "gpu-t4", "count": 9}, ("ml",), "allowed: 1 to 2"),
        ({"command": ["x"], "completions": 0}, ("ml",), "allowed: 1 to 1000"),
        ({"command": ["x"], "completions": 4, "parallelism": 5}, ("ml",), "allowed: 1 to 4"),
        ({"command": ["x"], "max_run_time": 5}, ("ml",), "allowed: 10 to 604800"),
        ({"command": ["x"], "max_run_time": True}, ("ml",), "whole number"),
        ({"command": ["x"], "priority": "urgent"}, ("ml",), "allowed: low, normal, high"),
        ({"command": ["x"], "files": {"../etc": "x"}}, ("ml",), "input file name"),
        ({"command": ["x"], "files": {".hidden": "x"}}, ("ml",), "no leading dot"),
        ({"command": ["x"], "files": {"a": "x" * 70000}}, ("ml",), "at most 65536 bytes"),
        ({"command": ["x"], "env": {"LABFLEET_HOME": "/"}}, ("ml",), "is reserved"),
        ({"command": ["x"], "env": {"1X": "a"}}, ("ml",), "not starting with a digit"),
        ({"command": ["x"], "offload": "yes"}, ("ml",), "true or false"),
        ({"command": ["x"], "offload": True, "profile": "gpu-t4"}, ("ml",), "CPU profiles"),
        ({"command": ["x"], "profile": "gpu-rtx5000"}, ("ml",), "no batch quota for rtx5000"),
        ([1, 2], ("ml",), "JSON object"),
        # the devices a job sees are the platform's to set (issue 10)
        (
            {"command": ["x"], "env": {"NVIDIA_VISIBLE_DEVICES": "all"}},
            ("ml",),
            "'NVIDIA_VISIBLE_DEVICES' is not allowed",
        ),
        ({"command": ["x"], "env": {"cuda_visible_devices": "0"}}, ("ml",), "is not allowed"),
        # strict: a trailing newline is not part of a name, a string is not a number
        ({"command": ["x"], "name": "job\n"}, ("ml",), "name"),
        ({"command": ["x"], "completions": "5"}, ("ml",), "completions '5' is not a whole number"),
        ({"command": ["x"], "completions": 2.5}, ("ml",), "is not a whole number"),
        (
            {"command": ["x"], "accelerator": "t4", "count": float("inf")},
            ("ml",),
            "count 'inf' is not a whole number",
        ),
        ({"command": ["x"], "files": {"in.txt\n": "x"}}, ("ml",), "in.txt"),
    ],
)
def test_rejections_say_what_and_what_is_allowed(catalogue, qconfig, raw, groups, fragment):
    with pytest.raises(RequestError) as err:
        validate(raw, catalogue, qconfig, groups=groups)
    assert fragment in str(err.value)


def test_offload_needs_platform_support(catalogue, qconfig):
    with pytest.raises(RequestError, match="not available on this platform"):
        validate_request(
            {"command": ["x"], "offload": True},
            catalogue=catalogue,
            user_groups=["ml"],
            queue_groups=qconfig.covered_accelerators(),
            priorities=qconfig.priorities,
            offload_available=False,
        )


# -- the Job ------------------------------------------------------------------------


def make(catalogue, qconfig, raw, user="alice@example.org", ids=None):
    req = validate(raw, catalogue, qconfig)
    ctx = jobs.JobContext(
        ids=ids,
        user=user,
        namespace=qconfig.namespace(req.group),
        queue=qconfig.offload_local_queue(req.group)
        if req.offload
        else qconfig.local_queue(req.group),
        priority_class=qconfig.priority_class(req.priority),
        kind_tolerations=qconfig.kind_tolerations,
    )
    return req, jobs.make_job(req, ctx, jobs.new_job_name(req.name, "abc12345"))


def test_job_is_suspended_queued_and_labelled(catalogue, qconfig):
    raw = {
        "name": "train",
        "script": "#!/bin/bash\necho $JOB_COMPLETION_INDEX",
        "files": {"in.txt": "data"},
        "accelerator": "t4",
        "completions": 4,
        "parallelism": 2,
        "max_run_time": 600,
        "priority": "high",
        "env": {"SEED": "1"},
    }
    req, job = make(catalogue, qconfig, raw)
    meta, spec = job["metadata"], job["spec"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert meta["name"] == "train-abc12345"
    assert meta["namespace"] == contract.group_namespace("ml")
    assert spec["suspend"] is True
    labels = meta["labels"]
    assert labels[contract.KUEUE_QUEUE_LABEL] == contract.group_local_queue("ml")
    assert labels[contract.KUEUE_PRIORITY_LABEL] == "labfleet-high"
    assert labels[contract.LABEL_KIND] == contract.KIND_BATCH
    assert labels[contract.LABEL_GROUP] == "ml"
    assert labels[contract.LABEL_ACCELERATOR] == "t4"
    # "@" is not allowed in label values: escaped exactly as the Kubernetes spawner
    # escapes it (one user, one accounting key), the exact name in an annotation
    assert labels[contract.LABEL_USER] == safe_slug("alice@example.org", is_valid=is_valid_label)
    assert labels[contract.LABEL_USER] == "alice-example-org---7a64adf2"
    assert meta["annotations"][contract.ANNOTATION_USER] == "alice@example.org"
    assert meta["annotations"][contract.ANNOTATION_ACCELERATOR_COUNT] == "1"
    assert (spec["completions"], spec["parallelism"]) == (4, 2)
    assert spec["completionMode"] == "Indexed" and spec["activeDeadlineSeconds"] == 600
    pod = spec["template"]["spec"]
    # the pod carries the accounting labels too (collectors read pods)
    assert spec["template"]["metadata"]["labels"][contract.LABEL_KIND] == contract.KIND_BATCH
    container = pod["containers"][0]
    assert container["image"] == catalogue.images["pytorch-cuda"].image
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"] == {
        "cpu": "1",
        "memory": "2Gi",
        "nvidia.com/gpu": "1",
    }
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["Tesla-T4"]},
        # like a notebook, a local job never lands on an interLink virtual node
        {"key": "type", "operator": "NotIn", "values": ["virtual-kubelet"]},
    ]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SEED"] == "1"
    assert env["LABFLEET_BATCH_SCRIPT"].startswith("#!/bin/bash")
    assert env["LABFLEET_BATCH_WORKDIR"] == "/home/jovyan/batch/train-abc12345"
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(env["LABFLEET_BATCH_FILES"]))) as tar:
        assert tar.extractfile("in.txt").read() == b"data"
    # same storage and security as a notebook: home, group, public, envs read-only
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/home/jovyan"]["subPath"] == "home/alice@example.org"
    assert mounts["/shared/groups/ml"]["subPath"] == "groups/ml"
    assert mounts["/shared/envs"]["readOnly"] is True
    # /dev/shm as for the notebook: the spawner's 64Mi default when the size sets none
    assert mounts["/dev/shm"]["name"] == "shm"
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Mi"}
    # no fsGroup (the kubelet would chown the shared volume); a supplementary group
    assert "fsGroup" not in pod["securityContext"]
    assert pod["securityContext"]["supplementalGroups"] == [100]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False


def test_job_runs_with_its_owners_notebook_ids(catalogue, qconfig):
    # hub user 7 in ml (hub group 3) and users (1): the notebook's uid and private
    # gid, and only the charged group's gid (not every group of the user)
    ids = podspec.posix_ids(7, {"ml": 3, "users": 1}, "ml", 200000, 300000)
    assert ids == podspec.PosixIds(200007, 200007, (300003,))
    _, job = make(catalogue, qconfig, {"command": ["true"], "group": "ml"}, ids=ids)
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 200007
    assert pod["securityContext"]["runAsGroup"] == 200007
    assert pod["securityContext"]["supplementalGroups"] == [300003]
    container_sc = pod["containers"][0]["securityContext"]
    assert (container_sc["runAsUser"], container_sc["runAsGroup"]) == (200007, 200007)


def test_posix_ids_refuse_ranges_where_a_user_gid_is_a_group_gid():
    with pytest.raises(StorageError, match="uid_base and gid_base are both"):
        podspec.posix_ids(7, {"ml": 3}, "ml", 200000, 200000)
    with pytest.raises(StorageError, match="must be positive"):
        podspec.posix_ids(0, {"ml": 3}, "ml", 200000, 300000)


def test_job_mount_points_are_the_notebooks():
    # a path written in a notebook means the same inside its Jobs
    storage = podspec.PodStorage()
    traits = PlatformKubeSpawner.class_traits()
    assert storage.home_mount == traits["home_mount_path"].default_value
    assert storage.groups_mount == traits["group_mount_root"].default_value
    assert storage.public_mount == traits["public_mount_path"].default_value
    assert storage.envs_mount == traits["envs_mount_path"].default_value


def test_offload_job_targets_virtual_nodes(catalogue, qconfig):
    _, job = make(catalogue, qconfig, {"command": ["true"], "offload": True})
    assert job["metadata"]["labels"][contract.KUEUE_QUEUE_LABEL] == "ml-offload"
    pod = job["spec"]["template"]["spec"]
    expr = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert expr["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == "type"
    assert pod["tolerations"][0]["key"] == contract.VIRTUAL_NODE_TAINT_KEY


def test_bootstrap_unpacks_files_and_runs_script(tmp_path, catalogue, qconfig):
    """The shell bootstrap run for real with /bin/sh: files, script, completion index."""
    import subprocess

    req, job = make(
        catalogue,
        qconfig,
        {"script": "cat in.txt; echo idx=$JOB_COMPLETION_INDEX", "files": {"in.txt": "hello\n"}},
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    env["LABFLEET_BATCH_WORKDIR"] = str(tmp_path / "w")
    env["JOB_COMPLETION_INDEX"] = "3"
    env["PATH"] = "/usr/bin:/bin"
    out = subprocess.run(
        container["command"] + container["args"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello\nidx=3\n"


def test_label_value_escaping():
    assert jobs.label_value("alice") == "alice"
    escaped = jobs.label_value("a+b@c")
    assert escaped != jobs.label_value("a-b@c")  # distinct names stay distinct
    assert len(jobs.label_value("x" * 200)) <= 63
    for name in ("alice", "a+b@c", "Bob.Smith@cern.ch", "x" * 200):
        assert jobs.label_value(name) == safe_slug(name, is_valid=is_valid_label)


def test_pod_pieces_are_the_notebook_builders(catalogue, qconfig):
    """Resources, tolerations and storage env come from labfleet_spawner.objects."""
    from labfleet_batch import podspec
    from labfleet_spawner import objects

    req, job = make(catalogue, qconfig, {"command": ["true"], "accelerator": "t4"})
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"] == objects.resource_requirements(req.selection)
    assert pod["tolerations"] == objects.tolerations(req.selection, ["ml"])
    # the charged group's reserved nodes are tolerated, like the group's notebooks
    assert {"key": objects.RESERVED_TAINT_KEY, "operator": "Equal", "value": "ml",
            "effect": "NoSchedule"} in pod["tolerations"]  # fmt: skip
    env = {e["name"]: e["value"] for e in container["env"]}
    storage = podspec.PodStorage()
    for key, value in objects.storage_env(storage.options(), ["ml"]).items():
        assert env[key] == value
    assert env["HOME"] == storage.home_mount


def test_cpu_job_keeps_off_accelerator_nodes_with_the_catalogue(catalogue, qconfig):
    req = validate({"command": ["true"]}, catalogue, qconfig)
    ctx = jobs.JobContext(
        user="bob", namespace="labfleet-ml", queue="ml-queue", priority_class="labfleet-normal",
        catalogue=catalogue,
    )  # fmt: skip
    pod = jobs.make_job(req, ctx, "cpu-abc12345")["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    exprs = terms["nodeSelectorTerms"][0]["matchExpressions"]
    gpu = next(e for e in exprs if e["key"] == "nvidia.com/gpu.product")
    assert gpu["operator"] == "NotIn" and "Tesla-T4" in gpu["values"]


# -- queues -----------------------------------------------------------------------------


def test_queue_layout(catalogue, qconfig):
    objs = queues.queue_objects(qconfig, catalogue)
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    ns = by[("Namespace", "labfleet-ml")]
    assert ns["metadata"]["labels"][contract.LABEL_GROUP] == "ml"
    lq = by[("LocalQueue", contract.group_local_queue("ml"))]
    assert lq["metadata"]["namespace"] == "labfleet-ml"
    assert lq["spec"]["clusterQueue"] == "labfleet-ml"
    cq = by[("ClusterQueue", "labfleet-ml")]["spec"]
    assert cq["cohortName"] == "co"
    assert cq["namespaceSelector"] == {"matchLabels": {contract.LABEL_GROUP: "ml"}}
    gpu_group = next(g for g in cq["resourceGroups"] if g["coveredResources"] == ["nvidia.com/gpu"])
    assert [f["name"] for f in gpu_group["flavors"]] == ["labfleet-a100", "labfleet-t4"]
    t4 = by[("ResourceFlavor", "labfleet-t4")]["spec"]
    assert t4["nodeLabels"] == {"nvidia.com/gpu.product": "Tesla-T4"}
    assert t4["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert ("ResourceFlavor", "labfleet-rtx5000") not in by  # no group has quota for it
    assert by[("WorkloadPriorityClass", "labfleet-high")]["value"] == 10000
    assert by[("ClusterQueue", "labfleet-offload")]["spec"].get("cohortName") is None
    # namespaces and flavors before the queues that need them
    kinds = [o["kind"] for o in objs]
    assert kinds.index("ClusterQueue") > kinds.index("ResourceFlavor") > kinds.index("Namespace")


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"groups": {"ml": {"accelerators": {"h100": 1}}}}, "'h100' is not in the catalogue"),
        ({"groups": {"ml": {"memory": "lots"}}}, "groups.ml.memory"),
        ({"groups": {"ml": {"cpu": -1}}}, "groups.ml.cpu"),
        ({"groups": {"Bad": {}}}, "not a valid group name"),
        ({"groups": {}, "default_priority": "x"}, "default_priority 'x'"),
        ({"groups": {}, "colour": 1}, "unknown field(s) colour"),
    ],
)
def test_queue_config_errors(catalogue, data, fragment):
    with pytest.raises(queues.QueueConfigError) as err:
        queues.parse_queue_config(data, catalogue)
    assert fragment in str(err.value)


async def test_sync_queues_applies_everything_once_per_run(catalogue, qconfig):
    class Recorder:
        def __init__(self):
            self.applied = []

        async def apply(self, obj):
            self.applied.append(obj)
            return obj

    rec = Recorder()
    first = await queues.sync_queues(rec, qconfig, catalogue)
    second = await queues.sync_queues(rec, qconfig, catalogue)
    assert first == second and len(rec.applied) == 2 * len(first)
    assert rec.applied[: len(first)] == rec.applied[len(first) :]  # same objects: idempotent


# -- authorization -------------------------------------------------------------------


def test_policy():
    policy = Policy(configured_admins={"cms": ["dan"]})
    alice = Caller("alice", frozenset({"ml"}))
    carol = Caller("carol", frozenset({"ml", "ml-admins"}))
    dan = Caller("dan", frozenset({"cms"}))
    eve = Caller("eve", frozenset({"cms-admins"}))  # admin group without membership
    root = Caller("root", frozenset(), admin=True)
    assert policy.can_submit(alice, "ml") and not policy.can_submit(alice, "cms")
    assert policy.can_access(alice, "alice", "ml")
    assert not policy.can_access(alice, "bob", "ml")
    assert policy.can_access(carol, "bob", "ml") and policy.can_list_group(carol, "ml")
    assert not policy.can_access(carol, "bob", "cms")
    assert policy.can_access(dan, "bob", "cms")  # configured admin
    assert not policy.can_access(eve, "bob", "cms")
    assert policy.can_access(root, "bob", "cms")
    assert not Policy(hub_admins_see_all=False).can_access(root, "bob", "cms")


def test_kubernetes_job_runs_with_the_submitting_notebooks_software(catalogue, qconfig):
    """What the client sends (labfleet_batch.client.software_env) reaches the container."""
    from labfleet_batch.client import software_env

    env = software_env(
        {"PATH": "/usr/bin", "VIRTUAL_ENV": "/home/alice/venv"},
        executable="/home/alice/venv/bin/python",
    )
    _, job = make(catalogue, qconfig, {"command": ["python", "-c", "print(42)"], "env": env})
    container = job["spec"]["template"]["spec"]["containers"][0]
    got = {e["name"]: e["value"] for e in container["env"]}
    assert got["PATH"] == "/home/alice/venv/bin:/usr/bin"
    assert got["VIRTUAL_ENV"] == "/home/alice/venv"
