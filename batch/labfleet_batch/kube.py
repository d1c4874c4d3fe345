"""The Kubernetes/Kueue backend: Jobs in group namespaces, state from Kueue Workloads.

:class:`~labfleet_hub.kubeclient.KubeAPI` (shared with the hub and the
accounting service) is a thin JSON-in/JSON-out layer over an injected
``kubernetes_asyncio`` ``ApiClient``; :class:`KubeBackend` implements the
service's backend interface with it.

Queue position: Kueue's visibility API (``visibility.kueue.x-k8s.io``,
``v1beta2`` then ``v1beta1``) when the cluster serves it; otherwise the
position is computed from the namespace's pending Workloads in Kueue's
BestEffortFIFO order (priority, then creation time) and marked
``"position_source": "estimate"``. The estimate ignores other namespaces of a
shared ClusterQueue, which labfleet's one-namespace-per-ClusterQueue layout
does not have.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import quote

from labfleet_hub import contract
from labfleet_hub.kubeclient import KubeAPI, KubeError, object_path  # noqa: F401  (re-exported)
from labfleet_hub.posix_ids import HubIds
from labfleet_hub.quantities import parse_cpu, parse_memory
from labfleet_spawner.catalogue import Catalogue
from labfleet_spawner.kueue import pending_in_order
from labfleet_spawner.storage import DEFAULT_GID_BASE, DEFAULT_UID_BASE

from . import jobs as jobbuilder
from .model import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord, LogsUnavailable
from .podspec import PodStorage, posix_ids
from .queues import QueueConfig
from .validation import BatchRequest

log = logging.getLogger(__name__)

KUEUE = "/apis/kueue.x-k8s.io/v1beta2"
VISIBILITY_VERSIONS = ("v1beta2", "v1beta1")
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"


def _condition(obj: dict | None, ctype: str) -> dict | None:
    for cnd in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cnd.get("type") == ctype:
            return cnd
    return None


def _true(obj: dict | None, ctype: str) -> bool:
    cnd = _condition(obj, ctype)
    return bool(cnd and cnd.get("status") == "True")


def job_state(job: dict) -> tuple[str, str]:
    """``(state, message)`` from the Job's own status."""
    status = job.get("status") or {}
    for ctype, state in (("Complete", SUCCEEDED), ("Failed", FAILED)):
        cnd = _condition(job, ctype)
        if cnd and cnd.get("status") == "True":
            return state, cnd.get("message") or cnd.get("reason") or ""
    if job["spec"].get("suspend"):
        return QUEUED, ""
    if status.get("active") or status.get("ready") or status.get("startTime"):
        return RUNNING, ""
    return QUEUED, ""


def record_from_job(job: dict, priority_names: dict[str, str] | None = None) -> JobRecord:
    meta, spec = job["metadata"], job["spec"]
    labels, ann = meta.get("labels") or {}, meta.get("annotations") or {}
    status = job.get("status") or {}
    state, message = job_state(job)
    if meta.get("deletionTimestamp"):
        state = CANCELLED
    pclass = labels.get(contract.KUEUE_PRIORITY_LABEL)
    env = {
        e["name"]: e.get("value")
        for e in spec["template"]["spec"]["containers"][0].get("env") or []
    }
    return JobRecord(
        name=meta["name"],
        group=labels.get(contract.LABEL_GROUP, ""),
        user=ann.get(contract.ANNOTATION_USER, ""),
        state=state,
        display_name=ann.get(jobbuilder.ANNOTATION_BATCH_NAME, ""),
        created=meta.get("creationTimestamp"),
        profile=labels.get(contract.LABEL_PROFILE),
        accelerator=labels.get(contract.LABEL_ACCELERATOR),
        count=int(ann.get(contract.ANNOTATION_ACCELERATOR_COUNT, "0") or 0),
        priority=(priority_names or {}).get(pclass, pclass),
        completions=spec.get("completions") or 1,
        parallelism=spec.get("parallelism") or 1,
        succeeded=status.get("succeeded", 0),
        failed=status.get("failed", 0),
        active=status.get("active", 0),
        offload=labels.get(jobbuilder.LABEL_OFFLOAD) == "true",
        workdir=env.get("LABFLEET_BATCH_WORKDIR"),
        message=message,
    )


#: Job failure reasons whose own message ("Job has reached the specified backoff limit")
#: says less than the pods do: with backoffLimit 0 a failed completion fails the Job.
POD_EXPLAINED_REASONS = ("BackoffLimitExceeded", "FailedIndexes", "PodFailurePolicy", "")
#: At most this many completions are named in a failed job's message.
MAX_FAILURES_NAMED = 5


def _completion(pod: dict) -> int:
    meta = pod.get("metadata") or {}
    raw = (meta.get("labels") or {}).get(COMPLETION_INDEX_LABEL) or (
        meta.get("annotations") or {}
    ).get(COMPLETION_INDEX_LABEL, "0")
    try:
        return int(raw)
    except ValueError:
        return 0


def _failure(index: int, pod: dict) -> str | None:
    """One plain sentence on why completion ``index``'s pod failed, or None."""
    status = pod.get("status") or {}
    limits = {
        c.get("name"): ((c.get("resources") or {}).get("limits") or {}).get("memory")
        for c in (pod.get("spec") or {}).get("containers") or []
    }
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get(
            "terminated"
        )
        if not term:
            continue
        if term.get("reason") == "OOMKilled":
            limit = limits.get(cs.get("name"))
            if limit:
                return (
                    f"completion {index} was killed: it used more than its {limit} "
                    "memory limit (OOMKilled)"
                )
            return f"completion {index} was killed by the kernel: out of memory (OOMKilled)"
        code = term.get("exitCode", 0)
        if code:
            reason = term.get("reason") or ""
            extra = f" ({reason})" if reason and reason != "Error" else ""
            if code > 128:
                return f"completion {index} was ended by signal {code - 128}{extra}"
            return f"completion {index} exited with code {code}{extra}"
    if status.get("phase") == "Failed" and (status.get("message") or status.get("reason")):
        return f"completion {index} failed: {status.get('message') or status.get('reason')}"
    return None


def failure_message(job: dict, pods: list[dict]) -> str | None:
    """A failed Job's message from its pods, in plain sentences; None: keep the Job's own.

    ``"completion 0 was killed: it used more than its 64Mi memory limit
    (OOMKilled)"``: the kernel's reason, read from the last pod of each
    completion, instead of Kubernetes' "Job has reached the specified backoff
    limit". A Job that failed for its own reason (its deadline) keeps its message.
    """
    cnd = _condition(job, "Failed") or {}
    if cnd.get("reason", "") not in POD_EXPLAINED_REASONS:
        return None
    latest: dict[int, dict] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", "")):
        latest[_completion(pod)] = pod
    sentences = [s for i in sorted(latest) if (s := _failure(i, latest[i]))]
    if not sentences:
        return None
    more = len(sentences) - MAX_FAILURES_NAMED
    text = "; ".join(sentences[:MAX_FAILURES_NAMED])
    return text + (f"; and {more} more failed" if more > 0 else "")


def queue_info(workload: dict | None) -> dict[str, Any]:
    """Kueue's view: admitted or not, why not, where (ClusterQueue and flavors)."""
    if workload is None:
        return {"workload": None, "admitted": False, "reason": "NoWorkload", "message": ""}
    status = workload.get("status") or {}
    info: dict[str, Any] = {
        "workload": workload["metadata"]["name"],
        "admitted": _true(workload, "Admitted"),
        "finished": _true(workload, "Finished"),
        "reason": "",
        "message": "",
    }
    admission = status.get("admission")
    if admission:
        info["cluster_queue"] = admission.get("clusterQueue")
        flavors: dict[str, str] = {}
        for ps in admission.get("podSetAssignments") or []:
            flavors.update(ps.get("flavors") or {})
        info["flavors"] = flavors
    evicted = _condition(workload, "Evicted")
    if evicted and evicted.get("status") == "True":
        info["reason"], info["message"] = evicted.get("reason", ""), evicted.get("message", "")
    elif not info["admitted"]:
        cnd = _condition(workload, "QuotaReserved")
        if cnd and cnd.get("status") == "False":
            info["reason"], info["message"] = cnd.get("reason", ""), cnd.get("message", "")
    return info


def usage_from_local_queue(queue: dict, config: QueueConfig, group: str) -> dict[str, float]:
    """A LocalQueue's ``status.flavorsUsage`` as cpu, memory, ``acc:<name>`` and ``jobs``."""
    status = queue.get("status") or {}
    if "flavorsUsage" not in status:
        return {}
    # each accelerator has its own flavor; CPU and memory are counted in every flavor
    accelerator_of = {config.flavor(a): a for a in config.groups[group].accelerators}
    used: dict[str, float] = {"cpu": 0.0, "memory": 0.0}
    for flavor in status["flavorsUsage"]:
        for resource in flavor.get("resources") or []:
            name, total = resource["name"], resource.get("total", "0")
            if name == "cpu":
                used["cpu"] += parse_cpu(total)
            elif name == "memory":
                used["memory"] += parse_memory(total)
            elif flavor["name"] in accelerator_of:
                key = f"acc:{accelerator_of[flavor['name']]}"
                used[key] = used.get(key, 0.0) + parse_cpu(total)
    used["jobs"] = float(status.get("admittedWorkloads", 0))
    return used


class KubeBackend:
    """Batch jobs as Kueue-managed Jobs in each group's namespace."""

    def __init__(
        self,
        api: KubeAPI,
        config: QueueConfig,
        storage: PodStorage | None = None,
        visibility_retry: float = 300,
        catalogue: Catalogue | None = None,
        hub_ids: HubIds | None = None,
        uid_base: int = DEFAULT_UID_BASE,
        gid_base: int = DEFAULT_GID_BASE,
    ):
        self.api = api
        self.catalogue = catalogue
        self.config = config
        self.storage = storage or PodStorage()
        # With the hub's ids a Job runs as its owner's notebook (see podspec.PosixIds);
        # without, every Job runs as the storage's one configured identity.
        self.hub_ids = hub_ids
        self.uid_base, self.gid_base = uid_base, gid_base
        self.visibility_retry = visibility_retry
        # None: not probed yet; "": none served (until _visibility_checked + retry)
        self._visibility: str | None = None
        self._visibility_checked = 0.0
        self._priority_names = {config.priority_class(p): p for p in config.priorities}

    def _ns(self, group: str) -> str:
        return self.config.namespace(group)

    async def submit(self, request: BatchRequest, user: str) -> JobRecord:
        queue = (
            self.config.offload_local_queue(request.group)
            if request.offload
            else self.config.local_queue(request.group)
        )
        ids = None
        if self.hub_ids is not None:
            user_id, group_ids = await self.hub_ids(user)
            ids = posix_ids(user_id, group_ids, request.group, self.uid_base, self.gid_base)
        ctx = jobbuilder.JobContext(
            user=user,
            namespace=self._ns(request.group),
            queue=queue,
            priority_class=self.config.priority_class(request.priority),
            storage=self.storage,
            ids=ids,
            kind_tolerations=self.config.kind_tolerations,
            catalogue=self.catalogue,
            cpu_node_selector=self.config.cpu_node_selector,
            cpu_tolerations=self.config.cpu_tolerations,
        )
        body = jobbuilder.make_job(request, ctx, jobbuilder.new_job_name(request.name))
        created = await self.api.request(
            "POST", f"/apis/batch/v1/namespaces/{ctx.namespace}/jobs", body=body
        )
        record = record_from_job(created, self._priority_names)
        record.queue = {"admitted": False, "reason": "Created", "message": "waiting for Kueue"}
        return record

    async def _get_job(self, group: str, name: str) -> dict | None:
        try:
            return await self.api.request(
                "GET", f"/apis/batch/v1/namespaces/{self._ns(group)}/jobs/{quote(name)}"
            )
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    async def usage(self, group: str) -> dict[str, float]:
        """What ``group``'s admitted workloads hold: Kueue's own sums on its LocalQueue.

        Keys as the local backend's: ``cpu`` (cores), ``memory`` (bytes),
        ``acc:<accelerator>`` and ``jobs``; empty when Kueue has not counted yet.
        """
        queue = await self.api.request(
            "GET",
            f"{KUEUE}/namespaces/{self._ns(group)}/localqueues/{self.config.local_queue(group)}",
        )
        return usage_from_local_queue(queue, self.config, group)

    async def list_jobs(self, groups: list[str], owner: str | None = None) -> list[JobRecord]:
        selector = f"{contract.LABEL_KIND}={contract.KIND_BATCH}"
        if owner is not None:
            selector += f",{contract.LABEL_USER}={jobbuilder.label_value(owner)}"
        records = []
        for group in groups:
            if group not in self.config.groups:
                continue
            data = await self.api.request(
                "GET",
                f"/apis/batch/v1/namespaces/{self._ns(group)}/jobs",
                query={"labelSelector": selector},
            )
            for job in data.get("items", []):
                record = record_from_job(job, self._priority_names)
                # labels are escaped: the annotation is the exact owner
                if owner is None or record.user == owner:
                    records.append(record)
        records.sort(key=lambda r: r.created or "")
        return records

    async def _workloads(self, ns: str) -> list[dict]:
        data = await self.api.request("GET", f"{KUEUE}/namespaces/{ns}/workloads")
        return data.get("items", [])

    @staticmethod
    def _workload_of(workloads: list[dict], job: dict) -> dict | None:
        uid = job["metadata"].get("uid")
        for wl in workloads:
            if (wl["metadata"].get("labels") or {}).get(JOB_UID_LABEL) == uid:
                return wl
            for ref in wl["metadata"].get("ownerReferences") or []:
                if ref.get("kind") == "Job" and ref.get("uid") == uid:
                    return wl
        return None

    async def get(self, group: str, name: str) -> JobRecord | None:
        job = await self._get_job(group, name)
        if job is None:
            return None
        record = record_from_job(job, self._priority_names)
        ns = self._ns(group)
        if record.state == FAILED:
            data = await self.api.request(
                "GET",
                f"/api/v1/namespaces/{ns}/pods",
                query={"labelSelector": f"{JOB_NAME_LABEL}={name}"},
            )
            record.message = failure_message(job, data.get("items", [])) or record.message
        workloads = await self._workloads(ns)
        wl = self._workload_of(workloads, job)
        record.queue = queue_info(wl)
        if record.queue.get("finished") is False and record.state == QUEUED and wl:
            record.queue.update(await self.position(ns, job, wl, workloads))
        return record

    async def position(
        self, ns: str, job: dict, workload: dict, workloads: list[dict]
    ) -> dict[str, Any]:
        """``{"position": n (1 = next), "position_source": ...}``; see the module docstring."""
        if _true(workload, "QuotaReserved") or _true(workload, "Admitted"):
            return {"position": 0, "position_source": "admitted"}
        lq = (job["metadata"].get("labels") or {}).get(contract.KUEUE_QUEUE_LABEL, "")
        version = await self._visibility_version(ns, lq)
        if version:
            try:
                data = await self.api.request(
                    "GET",
                    f"/apis/visibility.kueue.x-k8s.io/{version}/namespaces/{ns}"
                    f"/localqueues/{quote(lq)}/pendingworkloads",
                )
                for item in data.get("items", []):
                    if item["metadata"]["name"] == workload["metadata"]["name"]:
                        return {
                            "position": item.get("positionInLocalQueue", 0) + 1,
                            "position_source": f"visibility/{version}",
                        }
            except KubeError as e:
                log.warning("visibility API %s failed: %s", version, e)
        names = [wl["metadata"]["name"] for wl in pending_in_order(workloads, lq)]
        name = workload["metadata"]["name"]
        return {
            "position": names.index(name) + 1 if name in names else None,
            "position_source": "estimate",
            "pending_in_queue": len(names),
        }

    async def _visibility_version(self, ns: str, lq: str) -> str:
        now = time.monotonic()
        if self._visibility is not None and (
            self._visibility or now - self._visibility_checked < self.visibility_retry
        ):
            return self._visibility
        self._visibility_checked = now
        for version in VISIBILITY_VERSIONS:
            try:
                await self.api.request(
                    "GET",
                    f"/apis/visibility.kueue.x-k8s.io/{version}/namespaces/{ns}"
                    f"/localqueues/{quote(lq)}/pendingworkloads",
                    query={"limit": "1"},
                )
            except KubeError as e:
                log.info("Kueue visibility API %s not usable: %s", version, e.status)
                continue
            self._visibility = version
            return version
        self._visibility = ""
        return ""

    async def _pod_for_index(self, group: str, name: str, index: int) -> dict | None:
        selector = f"{JOB_NAME_LABEL}={name},{COMPLETION_INDEX_LABEL}={index}"
        data = await self.api.request(
            "GET", f"/api/v1/namespaces/{self._ns(group)}/pods", query={"labelSelector": selector}
        )
        pods = sorted(
            data.get("items", []), key=lambda p: p["metadata"].get("creationTimestamp", "")
        )
        return pods[-1] if pods else None

    async def logs(self, group: str, name: str, index: int) -> str:
        pod = await self._pod_for_index(group, name, index)
        if pod is None:
            raise LogsUnavailable(f"completion {index} has no pod yet (queued or not started)")
        pod_name = pod["metadata"]["name"]
        try:
            return await self.api.request(
                "GET",
                f"/api/v1/namespaces/{self._ns(group)}/pods/{quote(pod_name)}/log",
                query={"container": jobbuilder.CONTAINER_NAME},
                raw=True,
            )
        except KubeError as e:
            # e.g. no kubelet answering on the node (virtual or fake nodes)
            raise LogsUnavailable(f"the cluster could not read pod {pod_name}'s log: {e}") from e

    async def cancel(self, group: str, name: str) -> JobRecord:
        job = await self._get_job(group, name)
        if job is None:
            raise KeyError(name)
        record = record_from_job(job, self._priority_names)
        # Background propagation: pods and the Workload go with the Job, and the
        # quota is released as soon as Kueue sees the Workload gone.
        await self.api.request(
            "DELETE",
            f"/apis/batch/v1/namespaces/{self._ns(group)}/jobs/{quote(name)}",
            body={"propagationPolicy": "Background"},
        )
        if record.state not in (SUCCEEDED, FAILED):
            record.state = CANCELLED
        return record
