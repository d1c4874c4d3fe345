"""PlatformKubeSpawner without a cluster: manifests, refusals, progress messages, the form.

KubeSpawner loads a kubeconfig on construction; these tests point it at a
dummy one whose server is https://127.0.0.1:1 (nothing listens there, and no
test here makes a request: anything that would is injected).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from jupyterhub.objects import Hub
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.config import kube_config
from kubespawner.clients import load_config
from labfleet_hub import contract
from labfleet_spawner.catalogue import load_catalogue
from labfleet_spawner.kube import PlatformKubeSpawner, pending_message, unschedulable_reason
from tornado import web
from traitlets.config import Config

from tests.unit.test_kube_availability import FakeApi, FakeWatch, fleet_nodes, pod

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(REPO / "config" / "catalogue.yaml")

DUMMY_KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: dummy, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: dummy, user: {token: dummy}}]
contexts: [{name: dummy, context: {cluster: dummy, user: dummy}}]
current-context: dummy
"""


@pytest.fixture(autouse=True)
def dummy_kubeconfig(tmp_path, monkeypatch):
    path = tmp_path / "kubeconfig"
    path.write_text(DUMMY_KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(path))
    # kubernetes_asyncio reads $KUBECONFIG once, at import
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    load_config.cache_clear()
    yield
    load_config.cache_clear()


@pytest.fixture(autouse=True)
async def _stop_watches():
    yield
    await PlatformKubeSpawner.stop_watches()


def fake_user(name="alice", id=3, groups=("users", "ml")):
    return SimpleNamespace(
        name=name,
        id=id,
        escaped_name=name,
        url=f"/user/{name}/",
        groups=[SimpleNamespace(name=g, id=i + 10) for i, g in enumerate(groups)],
    )


def make_spawner(user=None, **kwargs):
    kwargs.setdefault("namespace", "labfleet")
    kwargs.setdefault("catalogue_data", CATALOGUE)
    return PlatformKubeSpawner(
        user=user or fake_user(),
        hub=Hub(),
        api_token="the-api-token",
        oauth_client_id="jupyterhub-user-alice",
        **kwargs,
    )


async def manifest(spawner, options) -> dict:
    spawner.user_options = options
    spawner.apply_selection(options)
    await spawner.load_user_options()
    pod_model = await spawner.get_pod_manifest()
    return ApiClient().sanitize_for_serialization(pod_model)


def container(pod_dict):
    assert len(pod_dict["spec"]["containers"]) == 1
    return pod_dict["spec"]["containers"][0]


def required_exprs(pod_dict):
    terms = pod_dict["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert len(terms) == 1
    return {(e["key"], e["operator"], tuple(e["values"])) for e in terms[0]["matchExpressions"]}


# -- manifests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, resource, count, label",
    [
        ({"profile": "gpu-t4", "count": 2}, "nvidia.com/gpu", "2",
         ("nvidia.com/gpu.product", "In", ("Tesla-T4",))),
        ({"profile": "gpu-a100", "size": "large", "count": 4}, "nvidia.com/gpu", "4",
         ("nvidia.com/gpu.product", "In", ("NVIDIA-A100-PCIE-40GB",))),
        ({"profile": "mig-small"}, "nvidia.com/mig-1g.10gb", "1",
         ("nvidia.com/mig.strategy", "In", ("mixed",))),
        ({"profile": "fpga-u55c"}, "amd.com/xilinx_u55c_gen3x16_xdma_base_3-0", "1",
         ("labfleet.io/fpga-board", "In", ("u55c",))),
    ],
)  # fmt: skip
async def test_manifest_per_accelerator_kind(options, resource, count, label):
    spawner = make_spawner(user=fake_user(groups=("users", "ml", "fpga")))
    p = await manifest(spawner, options)
    c = container(p)
    assert c["resources"]["limits"][resource] == count
    assert c["resources"]["requests"][resource] == count
    assert label in required_exprs(p)
    taint_key = "amd.com/fpga" if "fpga" in options["profile"] else "nvidia.com/gpu"
    assert {"key": taint_key, "operator": "Exists", "effect": "NoSchedule"} in p["spec"][
        "tolerations"
    ]
    # the image is the catalogue's, never something the user typed
    image_name = spawner.selection.image.name
    assert c["image"] == CATALOGUE.images[image_name].image
    labels = p["metadata"]["labels"]
    assert labels[contract.LABEL_ACCELERATOR] == spawner.selection.accelerator.name
    assert labels[contract.LABEL_PROFILE] == options["profile"]
    assert labels[contract.LABEL_KIND] == contract.KIND_INTERACTIVE
    assert p["metadata"]["annotations"][contract.ANNOTATION_ACCELERATOR_COUNT] == count


async def test_cpu_manifest_security_volumes_labels():
    spawner = make_spawner(
        user=fake_user("bob", id=7, groups=("users", "cms")), envs_writer_group="admins"
    )
    p = await manifest(spawner, {"profile": "cpu", "size": "medium"})
    spec, c = p["spec"], container(p)
    exprs = required_exprs(p)
    assert any(k == "nvidia.com/gpu.product" and op == "NotIn" for k, op, _ in exprs)
    assert ("type", "NotIn", ("virtual-kubelet",)) in exprs
    assert not any(t["key"] in ("nvidia.com/gpu", "amd.com/fpga") for t in spec["tolerations"])
    assert {"key": "reserved", "operator": "Equal", "value": "cms", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    preferred = spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["preference"]["matchExpressions"][0]["values"] == ["cms", "users"]

    assert set(c["resources"]["limits"]) == {"cpu", "memory"}
    assert float(c["resources"]["limits"]["cpu"]) == 4.0

    # security
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsUser"] == 200007
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["supplementalGroups"] == [300010, 300011]
    assert "fsGroup" not in spec["securityContext"]
    csc = c["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["runAsUser"] == 200007 and csc["runAsGroup"] == 200007

    # volumes
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/home/jovyan"]["subPath"] == "home/bob"
    assert mounts["/shared/groups/cms"]["subPath"] == "groups/cms"
    assert "/shared/groups/ml" not in mounts
    assert mounts["/shared/envs"]["readOnly"] is True
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}

    # accounting contract
    labels = p["metadata"]["labels"]
    assert labels[contract.LABEL_USER] == "bob"
    assert labels[contract.LABEL_GROUP] == "cms"
    assert contract.LABEL_ACCELERATOR not in labels
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LABFLEET_ACCOUNTING_GROUP"] == "cms"
    assert env["LABFLEET_GROUP_DIRS"] == "/shared/groups/cms:/shared/groups/users"
    assert "gate" not in str(spec.get("schedulingGates"))


async def test_envs_writable_for_writer_group_and_home_pvc():
    spawner = make_spawner(
        user=fake_user("carol", groups=("admins", "users")),
        envs_writer_group="admins",
        home_storage="pvc",
        storage_capacity="10Gi",
    )
    p = await manifest(spawner, {"profile": "cpu"})
    mounts = {m["mountPath"]: m for m in container(p)["volumeMounts"]}
    assert mounts["/shared/envs"]["readOnly"] is False
    home = next(v for v in p["spec"]["volumes"] if v["name"] == "home")
    assert home["persistentVolumeClaim"]["claimName"] == spawner.pvc_name
    assert spawner.storage_pvc_ensure is True


async def test_admin_config_is_merged_not_replaced_and_not_accumulated():
    config = Config()
    config.PlatformKubeSpawner.volumes = [{"name": "extra", "emptyDir": {}}]
    config.PlatformKubeSpawner.tolerations = [{"key": "x", "operator": "Exists"}]
    config.PlatformKubeSpawner.node_affinity_required = [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
    ]
    spawner = make_spawner(config=config)
    for _ in range(2):  # a restart must not pile up volumes
        p = await manifest(spawner, {"profile": "gpu-t4"})
    names = [v["name"] for v in p["spec"]["volumes"]]
    assert names.count("extra") == 1 and names.count("shm") == 1
    assert {"key": "x", "operator": "Exists"} in p["spec"]["tolerations"]
    exprs = required_exprs(p)
    assert ("zone", "In", ("a",)) in exprs
    assert ("nvidia.com/gpu.product", "In", ("Tesla-T4",)) in exprs


async def test_tokens_and_secret_named_variables_are_references_to_the_servers_secret():
    config = Config()
    config.PlatformKubeSpawner.environment = {
        "S3_SECRET_KEY": "admin-s3-secret",
        "HF_TOKEN": "admin-hf-token",
        "PLAIN": "visible",
    }
    spawner = make_spawner(config=config)
    p = await manifest(spawner, {"profile": "cpu"})
    text = str(p)
    for value in ("the-api-token", "admin-s3-secret", "admin-hf-token"):
        assert value not in text  # nowhere in the pod: env, annotations, anything
    env = {e["name"]: e for e in container(p)["env"]}
    secret = f"{spawner.pod_name}-env"
    for name in ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "S3_SECRET_KEY", "HF_TOKEN"):
        assert env[name] == {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": name}},
        }
    assert env["PLAIN"] == {"name": "PLAIN", "value": "visible"}
    assert env["JUPYTERHUB_USER"]["value"] == "alice"  # the rest stays as it was
    # what the Secret will hold: exactly the moved values
    assert spawner._env_secret_data == {
        "JUPYTERHUB_API_TOKEN": "the-api-token",
        "JPY_API_TOKEN": "the-api-token",
        "S3_SECRET_KEY": "admin-s3-secret",
        "HF_TOKEN": "admin-hf-token",
    }


async def test_empty_pattern_moves_only_the_servers_tokens():
    config = Config()
    config.PlatformKubeSpawner.environment = {"HF_TOKEN": "admin-hf-token"}
    config.PlatformKubeSpawner.env_secret_pattern = ""
    spawner = make_spawner(config=config)
    p = await manifest(spawner, {"profile": "cpu"})
    env = {e["name"]: e for e in container(p)["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "value": "admin-hf-token"}
    assert "valueFrom" in env["JUPYTERHUB_API_TOKEN"] and "the-api-token" not in str(p)
    assert set(spawner._env_secret_data) == {"JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN"}


async def test_kueue_profile_gets_queue_label_and_gate():
    from dataclasses import replace

    profiles = dict(CATALOGUE.profiles)
    profiles["gpu-t4"] = replace(profiles["gpu-t4"], kueue=True)
    catalogue = replace(CATALOGUE, profiles=profiles)
    spawner = make_spawner(catalogue_data=catalogue)
    p = await manifest(spawner, {"profile": "gpu-t4"})
    assert p["metadata"]["labels"][contract.KUEUE_QUEUE_LABEL] == contract.group_local_queue("ml")
    assert p["metadata"]["labels"][contract.KUEUE_MANAGED_LABEL] == "true"
    assert p["spec"]["schedulingGates"] == [{"name": contract.KUEUE_ADMISSION_GATE}]
    spawner.kueue_enabled = False
    p = await manifest(spawner, {"profile": "gpu-t4"})
    assert "schedulingGates" not in p["spec"]
    assert contract.KUEUE_QUEUE_LABEL not in p["metadata"]["labels"]


# -- refusals: nothing reaches the API server ----------------------------------------------


class RecordingApi:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        async def method(*args, **kwargs):
            self.calls.append(name)
            raise AssertionError(f"API call {name} after a refusal")

        return method


@pytest.mark.parametrize(
    "user, options, message",
    [
        (fake_user(name="x" * 200), {"profile": "cpu"}, "user name"),
        (fake_user(name="../../etc"), {"profile": "cpu"}, "user name"),
        (fake_user(name="eve{0}"), {"profile": "cpu"}, "user name"),
        (fake_user(groups=("users", "Bad Group")), {"profile": "cpu"}, "group name"),
        (fake_user(groups=("users", "g" * 70)), {"profile": "cpu"}, "group name"),
        (fake_user(), {"profile": "gpu-a30", "count": 5}, "count"),
        (fake_user(), {"profile": "gpu-t4", "image": "evil/miner:latest"}, "image"),
        (fake_user(groups=("users",)), {"profile": "gpu-a100"}, "not available"),
        (fake_user(), {"profile": "cpu", "image_override": "x"}, "unknown option"),
    ],
)
async def test_bad_input_rejected_before_any_api_call(user, options, message):
    spawner = make_spawner(user=user)
    spawner.api = api = RecordingApi()
    with pytest.raises(web.HTTPError) as err:
        spawner.apply_selection(options)
    assert err.value.status_code == 400
    assert message in str(err.value.log_message % err.value.args)
    # and the start path (REST API with stale state) refuses too, before creating anything
    spawner.user_options = options
    spawner.selection = None
    with pytest.raises(web.HTTPError):
        await spawner.load_user_options()
    assert api.calls == []


# -- progress messages ----------------------------------------------------------------------

UNSCHEDULABLE = {
    "metadata": {"name": "jupyter-alice", "labels": {}},
    "spec": {},
    "status": {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/12 nodes are available: 1 Insufficient nvidia.com/gpu, "
                "11 node(s) didn't match Pod's node affinity/selector.",
            }
        ],
    },
}


def test_unschedulable_reason_and_message():
    assert "Insufficient nvidia.com/gpu" in unschedulable_reason(UNSCHEDULABLE)
    assert pending_message(UNSCHEDULABLE).startswith("Waiting for a node: 0/12 nodes")
    scheduled = {**UNSCHEDULABLE, "spec": {"nodeName": "gpu-a30-01"}}
    assert unschedulable_reason(scheduled) is None
    assert pending_message(None) is None
    running = {"spec": {"nodeName": "n"}, "status": {"phase": "Running"}}
    assert pending_message(running) is None


def test_pending_message_for_kueue_gate_and_other_gates():
    gated = {
        "metadata": {"labels": {contract.KUEUE_QUEUE_LABEL: "ml-queue"}},
        "spec": {"schedulingGates": [{"name": contract.KUEUE_ADMISSION_GATE}]},
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}
            ],
        },
    }
    assert "Kueue" in pending_message(gated) and "ml-queue" in pending_message(gated)
    assert unschedulable_reason(gated) is None  # waiting for quota is not a failure
    other = {"spec": {"schedulingGates": [{"name": "example.com/wait"}]}}
    assert pending_message(other) == "Waiting for scheduling gates: example.com/wait"


class FakeReflector:
    def __init__(self, pods):
        self.pods = pods


async def test_progress_reports_scheduler_reason_then_ends():
    spawner = make_spawner(events_enabled=False, progress_interval=0.01)
    key = f"{spawner.namespace}/{spawner.pod_name}"
    PlatformKubeSpawner.reflectors[("pods", spawner.namespace)] = FakeReflector(
        {key: UNSCHEDULABLE}
    )
    spawner._start_future = asyncio.get_running_loop().create_future()
    messages = []
    async for event in spawner.progress():
        messages.append(event["message"])
        if len(messages) == 1:
            spawner._start_future.set_result("http://127.0.0.1:8888")
    PlatformKubeSpawner.reflectors.clear()
    assert len(messages) == 1  # said once, not every second
    assert "Insufficient nvidia.com/gpu" in messages[0]


async def test_unschedulable_beyond_grace_fails_with_reason(monkeypatch):
    spawner = make_spawner(unschedulable_grace_period=0.05, progress_interval=0.01)
    key = f"{spawner.namespace}/{spawner.pod_name}"
    PlatformKubeSpawner.reflectors[("pods", spawner.namespace)] = FakeReflector(
        {key: UNSCHEDULABLE}
    )
    stopped = []

    async def never_starts(self):
        await asyncio.sleep(3600)

    async def fake_stop(now=False):
        stopped.append(now)

    from kubespawner import KubeSpawner

    monkeypatch.setattr(KubeSpawner, "_start", never_starts)
    monkeypatch.setattr(spawner, "stop", fake_stop)
    with pytest.raises(web.HTTPError) as err:
        await asyncio.wait_for(spawner._start(), 5)
    PlatformKubeSpawner.reflectors.clear()
    assert err.value.status_code == 503
    assert "Insufficient nvidia.com/gpu" in err.value.jupyterhub_message
    assert stopped == [True]  # the pod that could not be placed is deleted


# -- availability in the form -----------------------------------------------------------------


async def test_form_shows_availability_from_the_watch_without_api_calls():
    api = FakeApi(fleet_nodes(), [pod("busy", "gpu-a30-01", {"nvidia.com/gpu": 1}, ns="batch")])
    spawner = make_spawner(watch_api=api)
    from labfleet_spawner import availability

    original = availability.ClusterWatch._new_watch
    availability.ClusterWatch._new_watch = lambda self: FakeWatch(api)
    try:
        html = await spawner.options_form(spawner)
        calls = len(api.calls)
        html = await spawner.options_form(spawner)
        assert len(api.calls) == calls  # second render: no API call at all
    finally:
        availability.ClusterWatch._new_watch = original
    assert "8 of 8 free" in html
    assert "none free (1 in total)" in html
    assert spawner.availability()["a30"] == (0, 1)
    # another spawner in the same hub shares the watch
    other = make_spawner(user=fake_user("bob", groups=("users", "cms")), watch_api=api)
    assert other.availability()["t4"] == (8, 8)
    assert len(api.calls) == calls


async def test_availability_disabled_means_no_watch():
    api = FakeApi(fleet_nodes(), [])
    spawner = make_spawner(availability_enabled=False, watch_api=api)
    assert spawner.availability() == {}
    assert "free" not in await spawner.options_form(spawner)
    assert api.calls == []


async def test_traits_are_configurable():
    config = Config()
    config.PlatformKubeSpawner.home_storage = "pvc"
    config.PlatformKubeSpawner.envs_writer_group = "admins"
    config.PlatformKubeSpawner.unschedulable_grace_period = 30.0
    config.PlatformKubeSpawner.shared_volume = {"nfs": {"server": "127.0.0.1", "path": "/srv"}}
    spawner = make_spawner(config=config)
    assert spawner.home_storage == "pvc"
    assert spawner.envs_writer_group == "admins"
    assert spawner.unschedulable_grace_period == 30.0
    assert spawner.shared_volume["nfs"]["path"] == "/srv"
    for name in (
        "home_storage",
        "shared_volume",
        "envs_writer_group",
        "availability_enabled",
        "env_secret_pattern",
    ):
        trait = PlatformKubeSpawner.class_traits()[name]
        assert trait.metadata.get("config") and trait.help.strip()


def test_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="jupyterhub.spawners") if e.name == "labfleet-kube"]
    assert ep.load() is PlatformKubeSpawner
