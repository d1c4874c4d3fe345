"""GPU exporter: NVML readings per GPU and MIG instance, attributed to who holds the device.

Three parts, each replaceable:

- :class:`GpuSampler` reads NVML (the ``pynvml`` module is injected; tests pass
  a fake). The topology -- which GPUs, which MIG instances, their UUIDs --
  comes from :func:`labfleet_spawner.nvml.discover`, the same discovery the
  local spawner allocates from, so both agree on UUIDs. Values are read per
  UUID (``nvmlDeviceGetHandleByUUID`` accepts GPU and MIG UUIDs);
- an *owners* function ``() -> {uuid: Owner}`` says who holds each device.
  Single node: :class:`HubStateOwners` reads the device UUIDs the local
  spawner keeps in each running server's state in the hub database, and the
  group from the ledger's open interval of that server. Kubernetes
  (DaemonSet): :class:`NodeOwners` reads the kubelet's pod-resources socket
  (:mod:`labfleet_accounting.pod_resources`) and the node's labfleet pods
  (:func:`list_node_pods`); :func:`pod_resources_owners`, the one place that
  maps device ids to holders, joins the two;
- :class:`GpuCollector`, a prometheus_client collector that joins the two at
  scrape time. Metric names are listed in :mod:`labfleet_accounting.metrics`.

NVML has no utilisation or power reading for a MIG instance (its utilisation
is a profiling counter, ``DCGM_FI_PROF_GR_ENGINE_ACTIVE`` in DCGM): MIG
instances export memory only; their parent GPU exports power.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from labfleet_hub.contract import ANNOTATION_USER, LABEL_GROUP, LABEL_USER
from labfleet_spawner.nvml import discover
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

LABELS = ["uuid", "model", "mig_profile", "parent_uuid", "user", "group", "owner"]
#: The local spawner's state key holding the UUIDs a server holds (labfleet_spawner.local).
STATE_DEVICES = "labfleet_devices"
#: Extended resources whose device ids are GPU or MIG UUIDs (NVIDIA device plugin).
GPU_RESOURCE_PREFIXES = ("nvidia.com/gpu", "nvidia.com/mig-")


@dataclass(frozen=True)
class Owner:
    user: str = ""
    group: str = ""
    owner: str = ""  # "alice/" (local server) or "namespace/pod"


@dataclass(frozen=True)
class Sample:
    """One GPU or MIG instance at one moment. None: NVML could not say."""

    uuid: str
    model: str
    mig_profile: str = ""
    parent_uuid: str = ""
    utilization: float | None = None  # 0-1
    memory_used: int | None = None  # bytes
    memory_total: int | None = None
    power_watts: float | None = None


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class GpuSampler:
    """Readings of every GPU and MIG instance through an injected pynvml module."""

    def __init__(self, nvml=None, topology_seconds: float = 60.0, clock=time.monotonic):
        self.nvml = nvml
        self.topology_seconds = topology_seconds
        self.clock = clock
        self.errors = 0  # NVML calls that failed, for labfleet_gpu_exporter_errors_total
        self._topology = None
        self._topology_at = 0.0

    def _module(self):
        if self.nvml is None:
            import pynvml

            self.nvml = pynvml
        return self.nvml

    def topology(self):
        """GPUs and MIG instances (cached: MIG layouts change rarely and discovery costs)."""
        now = self.clock()
        if self._topology is None or now - self._topology_at >= self.topology_seconds:
            self._topology = discover(self._module(), logger=log)
            self._topology_at = now
        return self._topology

    def _read(self, fn, *args):
        nvml = self.nvml
        try:
            return fn(*args)
        except nvml.NVMLError as e:
            # NotSupported (MIG utilisation, power on some boards) is expected, not an error.
            if not isinstance(e, getattr(nvml, "NVMLError_NotSupported", ())):
                self.errors += 1
                log.debug("NVML %s failed: %s", getattr(fn, "__name__", fn), e)
            return None

    def sample(self) -> list[Sample]:
        discovery = self.topology()
        if not discovery.available:
            return []
        nvml = self._module()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            self.errors += 1
            log.warning("NVML could not be initialised: %s", e)
            return []
        samples = []
        try:
            for gpu in discovery.devices:
                samples.append(self._sample_gpu(gpu))
                for mig in gpu.mig_devices:
                    samples.append(self._sample_mig(gpu, mig))
        finally:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError:
                pass
        return [s for s in samples if s is not None]

    def _handle(self, uuid: str):
        return self._read(self.nvml.nvmlDeviceGetHandleByUUID, uuid)

    def _sample_gpu(self, gpu) -> Sample | None:
        nvml = self.nvml
        handle = self._handle(gpu.uuid)
        if handle is None:
            return None
        memory = self._read(nvml.nvmlDeviceGetMemoryInfo, handle)
        util = None if gpu.mig_enabled else self._read(nvml.nvmlDeviceGetUtilizationRates, handle)
        power = self._read(nvml.nvmlDeviceGetPowerUsage, handle)  # milliwatts
        return Sample(
            uuid=gpu.uuid,
            model=gpu.name,
            utilization=None if util is None else util.gpu / 100.0,
            memory_used=None if memory is None else int(memory.used),
            memory_total=int(memory.total) if memory is not None else gpu.memory_total or None,
            power_watts=None if power is None else power / 1000.0,
        )

    def _sample_mig(self, gpu, mig) -> Sample | None:
        handle = self._handle(mig.uuid)
        if handle is None:
            return None
        memory = self._read(self.nvml.nvmlDeviceGetMemoryInfo, handle)
        return Sample(
            uuid=mig.uuid,
            model=gpu.name,
            mig_profile=mig.profile or "",
            parent_uuid=gpu.uuid,
            memory_used=None if memory is None else int(memory.used),
            memory_total=int(memory.total) if memory is not None else mig.memory_total or None,
        )


# -- owners ------------------------------------------------------------------------


class HubStateOwners:
    """Single node: who holds which device, from the hub database and the ledger.

    The local spawner keeps the UUIDs a running server holds in its state
    (``labfleet_devices``); the group charged is that of the server's open
    interval in the ledger (source ``local``, uid ``<user>/<server>``).
    Both are read-only queries, run at scrape time.
    """

    def __init__(self, hub_engine, ledger_engine=None):
        self.hub_engine = hub_engine
        self.ledger_engine = ledger_engine

    def __call__(self) -> dict[str, Owner]:
        from sqlalchemy import text

        query = text(
            "SELECT u.name AS user, s.name AS server, s.state AS state FROM spawners s "
            "JOIN users u ON u.id = s.user_id WHERE s.server_id IS NOT NULL"
        )
        with self.hub_engine.connect() as connection:
            rows = connection.execute(query).mappings().all()
        groups = self._groups()
        owners = {}
        for row in rows:
            state = row["state"]
            if isinstance(state, str):
                state = json.loads(state or "{}")
            owner = f"{row['user']}/{row['server'] or ''}"
            for uuid in (state or {}).get(STATE_DEVICES) or []:
                owners[uuid] = Owner(row["user"], groups.get(owner, ""), owner)
        return owners

    def _groups(self) -> dict[str, str]:
        if self.ledger_engine is None:
            return {}
        from sqlalchemy import select

        from .models import UsageInterval as t

        query = select(t.uid, t.group_name).where(t.source == "local", t.end_s.is_(None))
        with self.ledger_engine.connect() as connection:
            return dict(connection.execute(query).all())


def pod_resources_owners(pod_resources: Mapping, pods: Iterable[Mapping] = ()) -> dict[str, Owner]:
    """Kubernetes: ``{uuid: Owner}`` from the kubelet's pod-resources answer. Pure.

    ``pod_resources``: ``ListPodResourcesResponse`` as JSON (``podResources``:
    ``[{name, namespace, containers: [{devices: [{resourceName, deviceIds}]}]}]``).
    ``pods``: the node's pods (raw API JSON) for their labfleet user and group
    labels; a pod not among them is still attributed by ``namespace/name``.
    """
    by_key = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        by_key[(meta.get("namespace"), meta.get("name"))] = meta
    owners = {}
    entries = pod_resources.get("podResources") or pod_resources.get("pod_resources") or []
    for entry in entries:
        key = (entry.get("namespace"), entry.get("name"))
        meta = by_key.get(key, {})
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        owner = Owner(
            user=annotations.get(ANNOTATION_USER) or labels.get(LABEL_USER, ""),
            group=labels.get(LABEL_GROUP, ""),
            owner=f"{key[0]}/{key[1]}",
        )
        for container in entry.get("containers") or []:
            for device in container.get("devices") or []:
                resource = device.get("resourceName") or device.get("resource_name") or ""
                if resource.startswith(GPU_RESOURCE_PREFIXES):
                    for uuid in device.get("deviceIds") or device.get("device_ids") or []:
                        owners[uuid] = owner
    return owners


async def list_node_pods(core_v1, node_name: str) -> list[dict]:
    """The labfleet pods of one node (raw API JSON), through a ``kubernetes_asyncio`` CoreV1Api.

    Cluster-wide ``list`` narrowed by ``spec.nodeName`` (RBAC cannot narrow
    it: the selector is the exporter's own restraint) and by the collector's
    label selector, so the answer is the few pods whose labels matter.
    """
    from .kube import LABEL_SELECTOR

    response = await core_v1.list_pod_for_all_namespaces(
        field_selector=f"spec.nodeName={node_name}",
        label_selector=LABEL_SELECTOR,
        _preload_content=False,
    )
    return json.loads(await response.read()).get("items") or []


def threadsafe(coroutine_fn, loop: asyncio.AbstractEventLoop, timeout: float = 30.0):
    """A blocking callable running ``coroutine_fn()`` on ``loop``.

    The scrape runs in prometheus_client's server thread; the API client
    lives on the exporter's event loop (aiohttp sessions are bound to theirs).
    """

    def call():
        return asyncio.run_coroutine_threadsafe(coroutine_fn(), loop).result(timeout)

    return call


class NodeOwners:
    """Kubernetes (DaemonSet): ``{uuid: Owner}`` of this node, at scrape time.

    ``read_pod_resources() -> dict`` is the kubelet's answer (the socket, or a
    JSON file when debugging); ``list_pods() -> [pod]`` the node's labfleet
    pods. The pods are listed again only when the set of pods holding GPUs
    changes: their labels are set at creation, and a DaemonSet that listed on
    every scrape would cost the API server one list per node per scrape.
    """

    def __init__(self, read_pod_resources: Callable[[], Mapping], list_pods=None):
        self.read_pod_resources = read_pod_resources
        self.list_pods = list_pods
        self._pods: list = []
        self._listed_for: frozenset | None = None  # the holders at the last listing

    def __call__(self) -> dict[str, Owner]:
        answer = self.read_pod_resources()
        holders = frozenset(o.owner for o in pod_resources_owners(answer).values())
        if self.list_pods is not None and holders != self._listed_for:
            self._pods = list(self.list_pods())
            self._listed_for = holders  # after the listing: a failed one is retried
        return pod_resources_owners(answer, self._pods)


# -- prometheus ------------------------------------------------------------------------


class GpuCollector:
    """prometheus_client collector: one sample per device per scrape, with its owner."""

    def __init__(self, sampler: GpuSampler, owners: Callable[[], Mapping[str, Owner]] | None):
        self.sampler = sampler
        self.owners = owners
        self._owners_error: str | None = None  # the last failure logged

    def _owners(self) -> Mapping[str, Owner]:
        if self.owners is None:
            return {}
        try:
            owners = self.owners()
        except Exception as e:  # a locked database or a restarting kubelet must not
            self.sampler.errors += 1  # cost the device metrics: they go out unattributed
            message = f"{type(e).__name__}: {e}"
            # logged once per change: Prometheus scrapes every few seconds
            if message != self._owners_error:
                log.warning("GPU exporter: owners unavailable, devices unattributed: %s", message)
                self._owners_error = message
            return {}
        if self._owners_error is not None:
            log.warning("GPU exporter: owners available again")
            self._owners_error = None
        return owners

    def collect(self):
        samples = self.sampler.sample()
        owners = self._owners()
        util = GaugeMetricFamily(
            "labfleet_gpu_utilization_ratio",
            "GPU busy fraction over the last sample period (DCGM_FI_DEV_GPU_UTIL / 100); "
            "whole GPUs only",
            labels=LABELS,
        )
        used = GaugeMetricFamily(
            "labfleet_gpu_memory_used_bytes",
            "Framebuffer memory used (DCGM_FI_DEV_FB_USED, in bytes)",
            labels=LABELS,
        )
        total = GaugeMetricFamily(
            "labfleet_gpu_memory_total_bytes", "Framebuffer memory of the device", labels=LABELS
        )
        power = GaugeMetricFamily(
            "labfleet_gpu_power_watts",
            "Power draw (DCGM_FI_DEV_POWER_USAGE); whole GPUs only",
            labels=LABELS,
        )
        for s in samples:
            who = owners.get(s.uuid, Owner())
            labels = [s.uuid, s.model, s.mig_profile, s.parent_uuid, who.user, who.group, who.owner]
            for family, value in (
                (util, s.utilization),
                (used, s.memory_used),
                (total, s.memory_total),
                (power, s.power_watts),
            ):
                if value is not None:
                    family.add_metric(labels, value)
        errors = CounterMetricFamily(
            "labfleet_gpu_exporter_errors", "NVML calls that failed", value=self.sampler.errors
        )
        yield from (util, used, total, power, errors)
