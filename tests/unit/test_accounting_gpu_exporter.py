"""GPU exporter against a fake NVML: per-GPU and per-MIG readings, attribution, exposition."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from labfleet_accounting import db
from labfleet_accounting.gpu_exporter import (
    GpuCollector,
    GpuSampler,
    HubStateOwners,
    NodeOwners,
    Owner,
    pod_resources_owners,
)
from labfleet_accounting.ledger import Ledger
from labfleet_accounting.records import Usage
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from tests.unit.test_nvml import A100_UUID, FakeNvml, GiB, mixed_machine

T4_0 = "GPU-t4t4t4t4-0000-0000-0000-000000000000"
T4_1 = "GPU-t4t4t4t4-0000-0000-0000-000000000001"
MIG_1G = "MIG-11111111-0000-0000-0000-000000000000"
MIG_3G = "MIG-33333333-0000-0000-0000-000000000003"


class LiveNvml(FakeNvml):
    """FakeNvml plus the live readings the exporter asks for."""

    def __init__(self, *args, util=None, used=None, power=None, broken=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.util = util or {}
        self.used = used or {}
        self.power = power or {}
        self.broken = set(broken)
        self.by_uuid = {}

    def _index(self):
        for i, gpu in enumerate(self.gpus):
            self.by_uuid[gpu["uuid"]] = ("gpu", i)
            for slot, mig in enumerate(gpu.get("mig") or []):
                if mig:
                    self.by_uuid[mig[0]] = ("mig", i, slot)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self._index()
        if uuid not in self.by_uuid:
            raise self.NVMLError_NotFound("Not Found")
        return self.by_uuid[uuid]

    def _uuid(self, handle):
        return self._entry(handle)[0]

    def nvmlDeviceGetMemoryInfo(self, handle):
        uuid, _, total = self._entry(handle)
        if uuid in self.broken:
            raise self.NVMLError_GpuIsLost("GPU is lost")
        used = self.used.get(uuid, 0)
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle):
        if handle[0] == "mig":
            raise self.NVMLError_NotSupported("Not Supported")
        return SimpleNamespace(gpu=self.util.get(self._uuid(handle), 0), memory=0)

    def nvmlDeviceGetPowerUsage(self, handle):
        if handle[0] == "mig":
            raise self.NVMLError_NotSupported("Not Supported")
        return self.power.get(self._uuid(handle), 70_000)


def machine(**kwargs) -> LiveNvml:
    return LiveNvml(mixed_machine().gpus, **kwargs)


def families(collector) -> dict[str, list]:
    registry = CollectorRegistry()
    registry.register(collector)
    text_ = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text_)}


def test_samples_per_gpu_and_mig_instance():
    nvml = machine(util={T4_0: 85}, used={T4_0: 3 * GiB, MIG_1G: GiB}, power={T4_0: 55_500})
    samples = {s.uuid: s for s in GpuSampler(nvml).sample()}
    # two T4, the A100 (MIG mode) with its three instances, the RTX 5000
    assert len(samples) == 7
    t4 = samples[T4_0]
    assert (t4.utilization, t4.memory_used, t4.power_watts) == (0.85, 3 * GiB, 55.5)
    assert t4.memory_total == 16 * GiB and t4.mig_profile == "" and t4.parent_uuid == ""
    mig = samples[MIG_1G]
    assert (mig.mig_profile, mig.parent_uuid, mig.memory_used) == ("1g.10gb", A100_UUID, GiB)
    assert mig.memory_total == 10 * GiB
    # NVML has no utilisation or power for MIG instances, and none for a GPU in MIG mode
    assert mig.utilization is None and mig.power_watts is None
    assert samples[A100_UUID].utilization is None and samples[A100_UUID].power_watts == 70.0
    assert samples[MIG_3G].mig_profile == "3g.40gb"


def test_topology_is_cached_and_refreshed():
    nvml = machine()
    clock = SimpleNamespace(t=0.0)
    sampler = GpuSampler(nvml, topology_seconds=60, clock=lambda: clock.t)
    sampler.sample()
    sampler.sample()
    inits_for_two = nvml.initialised
    assert inits_for_two == 3  # one discovery, two readings
    clock.t = 61
    sampler.sample()
    assert nvml.initialised == inits_for_two + 2


def test_no_driver_gives_no_samples_and_no_error():
    nvml = LiveNvml(init_error=FakeNvml.NVMLError_LibraryNotFound("libnvidia-ml.so.1"))
    sampler = GpuSampler(nvml)
    assert sampler.sample() == []
    fams = families(GpuCollector(sampler, None))
    assert fams["labfleet_gpu_memory_used_bytes"] == []


def test_failing_device_counts_an_error_and_the_rest_is_exported():
    nvml = machine(broken={T4_1})
    sampler = GpuSampler(nvml)
    samples = {s.uuid: s for s in sampler.sample()}
    assert samples[T4_1].memory_used is None and samples[T4_0].memory_used == 0
    assert sampler.errors == 1  # NotSupported (MIG) does not count


def test_collector_attributes_devices_to_owners():
    nvml = machine(util={T4_0: 40}, used={MIG_1G: 2 * GiB})
    owners = {T4_0: Owner("alice", "ml", "alice/"), MIG_1G: Owner("bob", "cms", "lf-cms/job-0")}
    fams = families(GpuCollector(GpuSampler(nvml), lambda: owners))
    util = {s.labels["uuid"]: s for s in fams["labfleet_gpu_utilization_ratio"]}
    assert util[T4_0].value == 0.4
    assert (util[T4_0].labels["user"], util[T4_0].labels["group"]) == ("alice", "ml")
    assert util[T4_1].labels["user"] == "" and util[T4_1].labels["owner"] == ""
    assert MIG_1G not in util
    used = {s.labels["uuid"]: s for s in fams["labfleet_gpu_memory_used_bytes"]}
    assert used[MIG_1G].value == 2 * GiB
    assert used[MIG_1G].labels["mig_profile"] == "1g.10gb"
    assert used[MIG_1G].labels["parent_uuid"] == A100_UUID
    assert used[MIG_1G].labels["owner"] == "lf-cms/job-0"
    assert {s.labels["uuid"] for s in fams["labfleet_gpu_power_watts"]} == {
        T4_0,
        T4_1,
        A100_UUID,
        "GPU-rtx5000-0000-0000-0000-000000000003",
    }
    assert fams["labfleet_gpu_exporter_errors"][0].value == 0


def test_owners_failure_keeps_device_metrics():
    def broken():
        raise RuntimeError("database is locked")

    sampler = GpuSampler(machine())
    fams = families(GpuCollector(sampler, broken))
    assert len(fams["labfleet_gpu_memory_total_bytes"]) == 7
    assert fams["labfleet_gpu_exporter_errors"][0].value == 1


def test_hub_state_owners_single_node(tmp_path):
    hub = create_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    with hub.begin() as c:
        c.execute(text("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)"))
        c.execute(
            text(
                "CREATE TABLE spawners (id INTEGER PRIMARY KEY, user_id INTEGER, name TEXT, "
                "server_id INTEGER, state TEXT)"
            )
        )
        c.execute(text("INSERT INTO users VALUES (1, 'alice'), (2, 'bob')"))
        running = json.dumps({"labfleet_devices": [T4_0, MIG_1G]})
        stopped = json.dumps({"labfleet_devices": [T4_1]})  # stale state of a stopped server
        c.execute(
            text("INSERT INTO spawners VALUES (1, 1, '', 7, :a), (2, 2, 'gpu', NULL, :b)"),
            {"a": running, "b": stopped},
        )
    ledger_engine = db.make_engine(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    db.upgrade(ledger_engine)
    Ledger(ledger_engine).start(Usage("local", "alice/", 100, "alice", "ml", "interactive"))
    owners = HubStateOwners(hub, ledger_engine)()
    assert owners == {T4_0: Owner("alice", "ml", "alice/"), MIG_1G: Owner("alice", "ml", "alice/")}
    assert HubStateOwners(hub)()[T4_0].group == ""


def test_pod_resources_owners_kubernetes():
    answer = {
        "podResources": [
            {
                "name": "jupyter-alice",
                "namespace": "labfleet",
                "containers": [
                    {
                        "name": "notebook",
                        "devices": [
                            {"resourceName": "nvidia.com/gpu", "deviceIds": [T4_0, T4_1]},
                            {"resourceName": "amd.com/xilinx_u55c", "deviceIds": ["fpga0"]},
                        ],
                    }
                ],
            },
            {
                "name": "train-0",
                "namespace": "labfleet-cms",
                "containers": [
                    {"devices": [{"resourceName": "nvidia.com/mig-1g.10gb", "deviceIds": [MIG_1G]}]}
                ],
            },
        ]
    }
    pods = [
        {
            "metadata": {
                "name": "jupyter-alice",
                "namespace": "labfleet",
                "labels": {"labfleet.io/user": "alice", "labfleet.io/group": "ml"},
                "annotations": {"labfleet.io/username": "alice@example.org"},
            }
        }
    ]
    owners = pod_resources_owners(answer, pods)
    assert owners[T4_0] == Owner("alice@example.org", "ml", "labfleet/jupyter-alice")
    assert owners[T4_1] == owners[T4_0]
    assert owners[MIG_1G] == Owner("", "", "labfleet-cms/train-0")
    assert "fpga0" not in owners


def test_owners_failures_are_logged_once_per_change(caplog):
    failures = [OSError("kubelet socket gone")] * 3 + [RuntimeError("kubelet unavailable"), None]

    def owners():
        error = failures.pop(0)
        if error is not None:
            raise error
        return {T4_0: Owner("alice", "ml", "labfleet/jupyter-alice")}

    sampler = GpuSampler(machine())
    collector = GpuCollector(sampler, owners)
    with caplog.at_level(logging.WARNING, logger="labfleet_accounting.gpu_exporter"):
        for _ in range(4):
            fams = families(collector)
            # every scrape still exports every device, unattributed
            assert len(fams["labfleet_gpu_memory_total_bytes"]) == 7
            assert {s.labels["user"] for s in fams["labfleet_gpu_memory_total_bytes"]} == {""}
        fams = families(collector)  # the kubelet is back
    used = {s.labels["uuid"]: s for s in fams["labfleet_gpu_memory_used_bytes"]}
    assert used[T4_0].labels["user"] == "alice"
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "GPU exporter: owners unavailable, devices unattributed: OSError: kubelet socket gone",
        "GPU exporter: owners unavailable, devices unattributed: RuntimeError: kubelet unavailable",
        "GPU exporter: owners available again",
    ]
    assert sampler.errors == 4  # the counter still counts every failed scrape


def test_node_owners_list_pods_again_only_when_holders_change():
    answers = {
        "one": {"podResources": [{"name": "a", "namespace": "ns", "containers": [
            {"devices": [{"resourceName": "nvidia.com/gpu", "deviceIds": [T4_0]}]}]}]},
        "none": {"podResources": []},
    }  # fmt: skip
    state = SimpleNamespace(answer="one", listings=0, fail=True)

    def list_pods():
        state.listings += 1
        if state.fail:
            raise RuntimeError("API server unavailable")
        labels = {"labfleet.io/user": "alice", "labfleet.io/group": "ml"}
        return [{"metadata": {"name": "a", "namespace": "ns", "labels": labels}}]

    owners = NodeOwners(lambda: answers[state.answer], list_pods)
    with pytest.raises(RuntimeError):
        owners()
    state.fail = False
    assert owners() == {T4_0: Owner("alice", "ml", "ns/a")}  # a failed listing is retried
    assert owners() == {T4_0: Owner("alice", "ml", "ns/a")}
    assert state.listings == 2
    state.answer = "none"
    assert owners() == {}
    assert state.listings == 3
    # without a pod lister (the JSON file, a test): attributed by namespace/name only
    assert NodeOwners(lambda: answers["one"])() == {T4_0: Owner("", "", "ns/a")}
