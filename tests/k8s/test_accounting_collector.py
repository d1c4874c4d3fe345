"""The Kubernetes accounting collector against the real control plane (KWOK fleet).

Pods carrying the label contract of ``labfleet_hub.contract`` are created on
fake GPU, MIG and CPU nodes: interactive sessions in one namespace, a batch
Job in another (its pod carries the batch labels). The real collector (list +
watch over the cluster's kubeconfig) writes into a SQLite or PostgreSQL
ledger while pods are deleted and the Job's pod completes; it is stopped in
the middle (its task cancelled, or the ``labfleet-accounting serve`` process
SIGKILLed), pods come and go while it is down, and the restarted collector
resumes from its checkpoint. The ledger must then equal the ground truth
exactly: one interval per pod, every attribute right, ends within a second or
two of the deletion (exactly the container's ``finishedAt`` for the
completed Job pod), running pods open.

No pod carries Kueue's queue-name label: the pod webhook lets them through
unmanaged.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from k8s_helpers import wait_for
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from labfleet_accounting import db
from labfleet_accounting.kube import KubeCollector, KubePodSource, parse_time
from labfleet_accounting.ledger import Ledger
from labfleet_hub.contract import (
    ANNOTATION_ACCELERATOR_COUNT,
    ANNOTATION_USER,
    KIND_BATCH,
    KIND_INTERACTIVE,
    LABEL_ACCELERATOR,
    LABEL_GROUP,
    LABEL_KIND,
    LABEL_PROFILE,
    LABEL_USER,
)
from labfleet_spawner.catalogue import load_catalogue

from tests.accounting.conftest import db_url, postgres_server  # noqa: F401 (fixtures)
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE_PATH = ROOT / "config" / "catalogue.yaml"
CATALOGUE = load_catalogue(CATALOGUE_PATH)
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
#: Seconds between the test's clock around a deletion and the end the ledger records.
TOLERANCE = 2
FIELDS = ("user_name", "group_name", "kind", "profile", "accelerator", "accelerator_kind",
          "accelerator_count", "gpu_fraction", "cpu", "memory", "namespace", "name")  # fmt: skip


@dataclass
class Spec:
    """What a pod is and what the ledger must say about it."""

    name: str
    user: str
    group: str
    kind: str
    profile: str = ""
    accelerator: str = ""
    resource: str = ""  # extended resource requested
    count: int = 0
    annotate_count: bool = True  # else the collector counts the resource requests
    cpu: str = "1"
    memory: str = "1Gi"
    node_selector: dict = field(default_factory=lambda: {"labfleet.io/node-class": "cpu"})

    def expected(self, namespace: str) -> dict:
        entry = CATALOGUE.accelerators.get(self.accelerator)
        cores = float(self.cpu[:-1]) / 1000 if self.cpu.endswith("m") else float(self.cpu)
        return {
            "user_name": self.user, "group_name": self.group, "kind": self.kind,
            "profile": self.profile, "accelerator": self.accelerator,
            "accelerator_kind": entry.kind if entry else "",
            "accelerator_count": self.count,
            "gpu_fraction": float(entry.gpu_fraction) if entry else 1.0,
            "cpu": cores, "memory": int(self.memory[:-2]) << 30,
            "namespace": namespace, "name": self.name,
        }  # fmt: skip

    def pod_template(self) -> dict:
        labels = {LABEL_KIND: self.kind, LABEL_USER: _label_value(self.user),
                  LABEL_GROUP: self.group, LABEL_PROFILE: self.profile}  # fmt: skip
        annotations = {ANNOTATION_USER: self.user}
        if self.accelerator:
            labels[LABEL_ACCELERATOR] = self.accelerator
            if self.annotate_count:
                annotations[ANNOTATION_ACCELERATOR_COUNT] = str(self.count)
        requests = {"cpu": self.cpu, "memory": self.memory}
        if self.resource:
            requests[self.resource] = str(self.count)
        limits = {k: v for k, v in requests.items() if k != "cpu"}
        container = {"name": "notebook", "image": "quay.io/jupyter/scipy-notebook",
                     "resources": {"requests": requests, "limits": limits}}  # fmt: skip
        spec = {"containers": [container], "nodeSelector": self.node_selector,
                "tolerations": [GPU_TOLERATION] if self.resource else []}  # fmt: skip
        return {"metadata": {"labels": labels, "annotations": annotations}, "spec": spec}


def _label_value(user: str) -> str:
    # the spawners escape user names for labels; the annotation keeps the real one
    return user.replace(".", "-2e")


def gpu(product: str) -> dict:
    return {"nvidia.com/gpu.product": product}


class Fleet:
    """Pods and a Job on the KWOK fleet, with the ground truth of their usage."""

    def __init__(self, cluster, interactive_ns: str, batch_ns: str):
        self.cluster = cluster
        self.interactive_ns, self.batch_ns = interactive_ns, batch_ns
        self.truth: dict[str, dict] = {}  # pod uid -> expected row
        self.deleted_at: dict[str, float] = {}  # pod uid -> wall time of the deletion
        self.uids: dict[str, str] = {}  # pod name -> uid

    async def kubectl(self, *args, **kwargs):
        return await asyncio.to_thread(self.cluster.kubectl, *args, **kwargs)

    async def pod(self, namespace: str, name: str) -> dict:
        return await asyncio.to_thread(
            self.cluster.kubectl_json, "get", "pod", "-n", namespace, name
        )

    async def running(self, namespace: str, name: str, spec: Spec) -> dict:
        """Wait until the pod runs; record its expected interval (start = status.startTime)."""
        deadline = time.monotonic() + 60
        while True:
            pod = await self.pod(namespace, name)
            if pod["status"].get("phase") == "Running" and pod["status"].get("startTime"):
                break
            assert time.monotonic() < deadline, f"pod {name} never ran: {pod['status']}"
            await asyncio.sleep(0.3)
        uid = pod["metadata"]["uid"]
        self.uids[spec.name] = uid
        self.truth[uid] = {
            **spec.expected(namespace), "name": name,
            "start_s": parse_time(pod["status"]["startTime"]), "end_s": None,
        }  # fmt: skip
        return pod

    async def start_session(self, spec: Spec) -> dict:
        manifest = {"apiVersion": "v1", "kind": "Pod", **spec.pod_template()}
        manifest["metadata"].update(name=spec.name, namespace=self.interactive_ns)
        await asyncio.to_thread(self.cluster.apply, manifest)
        return await self.running(self.interactive_ns, spec.name, spec)

    async def start_job(self, spec: Spec) -> dict:
        template = spec.pod_template()
        template["spec"]["restartPolicy"] = "Never"
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": spec.name, "namespace": self.batch_ns,
                            "labels": dict(template["metadata"]["labels"])},
               "spec": {"backoffLimit": 0, "template": template}}  # fmt: skip
        await asyncio.to_thread(self.cluster.apply, job)
        pods = await asyncio.to_thread(
            wait_for, f"the pod of Job {spec.name}",
            lambda: self.cluster.kubectl_json(
                "get", "pods", "-n", self.batch_ns, "-l", f"job-name={spec.name}")["items"],
        )  # fmt: skip
        name = pods[0]["metadata"]["name"]
        pod = await self.running(self.batch_ns, name, spec)
        assert pod["metadata"]["labels"][LABEL_KIND] == KIND_BATCH
        return pod

    async def delete(self, spec: Spec) -> None:
        uid = self.uids[spec.name]
        namespace = self.truth[uid]["namespace"]
        before = time.time()
        await self.kubectl("delete", "pod", "-n", namespace, spec.name, "--wait=false")
        self.deleted_at[uid] = (before + time.time()) / 2

    async def complete(self, spec: Spec) -> None:
        """The Job's pod succeeds (KWOK, through the annotation); its end is finishedAt."""
        uid = self.uids[spec.name]
        name = self.truth[uid]["name"]
        asked = time.time()
        await self.kubectl("annotate", "pod", "-n", self.batch_ns, name,
                           "labfleet.io/fake-complete-after=0s")  # fmt: skip
        deadline = time.monotonic() + 60
        while (pod := await self.pod(self.batch_ns, name))["status"]["phase"] != "Succeeded":
            assert time.monotonic() < deadline, f"Job pod {name} did not complete"
            await asyncio.sleep(0.3)
        finished = max(
            parse_time(s["state"]["terminated"]["finishedAt"])
            for s in pod["status"]["containerStatuses"]
        )
        assert abs(finished - asked) <= TOLERANCE + 1
        self.truth[uid]["end_s"] = finished

    def mismatches(self, ledger: Ledger) -> list[str]:
        """Differences between the ledger and the ground truth (empty: they agree)."""
        rows = ledger.intervals("k8s")
        problems = []
        keys = [(r["uid"], r["start_s"]) for r in rows]
        if len(keys) != len(set(keys)) or len({r["uid"] for r in rows}) != len(rows):
            problems.append(f"duplicate intervals: {sorted(keys)}")
        mine = {r["uid"]: r for r in rows if r["namespace"] in (self.interactive_ns, self.batch_ns)}
        for uid in sorted(set(mine) - set(self.truth)):
            problems.append(f"unexpected interval {mine[uid]['name']}")
        for uid, want in self.truth.items():
            got = mine.get(uid)
            if got is None:
                problems.append(f"no interval for {want['name']}")
                continue
            for key in (*FIELDS, "start_s"):
                if got[key] != want[key]:
                    problems.append(f"{want['name']}.{key}: {got[key]!r} != {want[key]!r}")
            if uid in self.deleted_at:
                at = self.deleted_at[uid]
                if got["end_s"] is None or abs(got["end_s"] - at) > TOLERANCE:
                    problems.append(f"{want['name']}: end {got['end_s']} not within "
                                    f"{TOLERANCE} s of its deletion at {at:.1f}")  # fmt: skip
            elif got["end_s"] != want["end_s"]:
                problems.append(f"{want['name']}.end_s: {got['end_s']} != {want['end_s']}")
        return problems

    async def listed(self, ledger: Ledger, collector, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(ledger.checkpoint, "k8s"):
            collector.alive()
            assert time.monotonic() < deadline, "the collector never listed the pods"
            await asyncio.sleep(0.1)

    async def agrees(self, ledger: Ledger, collector, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while problems := await asyncio.to_thread(self.mismatches, ledger):
            collector.alive()
            if time.monotonic() > deadline:
                pytest.fail("the ledger differs from the ground truth:\n" + "\n".join(problems))
            await asyncio.sleep(0.2)


ALICE_GPU = Spec("alice-rtx", "alice", "ml", KIND_INTERACTIVE, "gpu-rtx5000", "rtx5000",
                 "nvidia.com/gpu", 1, cpu="2", memory="8Gi",
                 node_selector=gpu("Quadro-RTX-5000"))  # fmt: skip
BOB_CPU = Spec("bob-cpu", "bob", "cms", KIND_INTERACTIVE, "small", cpu="500m", memory="2Gi")
CAROL_MIG = Spec("carol-mig", "carol", "ml", KIND_INTERACTIVE, "mig", "mig-1g.10gb",
                 "nvidia.com/mig-1g.10gb", 1,
                 node_selector={"nvidia.com/mig.strategy": "mixed"})  # fmt: skip
# The Job pod's GPU count comes from its resource requests (no count annotation).
TRAIN_JOB = Spec("train", "alice", "ml", KIND_BATCH, "", "a100", "nvidia.com/gpu", 2,
                 annotate_count=False, cpu="4", memory="16Gi",
                 node_selector=gpu("NVIDIA-A100-PCIE-40GB"))  # fmt: skip
DOT_USER = Spec("d-smith", "d.smith", "cms", KIND_INTERACTIVE, "medium", cpu="4", memory="16Gi")
SHORT = Spec("short", "erin", "ml", KIND_INTERACTIVE, "small")
LATE = Spec("late", "frank", "cms", KIND_INTERACTIVE, "small")


@pytest.fixture
def fleet(k8s_cluster, k8s_namespace):
    batch_ns = "tb-" + uuid.uuid4().hex[:8]
    k8s_cluster.kubectl("create", "namespace", batch_ns)
    try:
        yield Fleet(k8s_cluster, k8s_namespace, batch_ns)
    finally:
        k8s_cluster.kubectl("delete", "namespace", batch_ns, "--wait=false", check=False)


@pytest.fixture
def ledger(db_url):  # noqa: F811 (the fixture imported above)
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    yield Ledger(engine)
    engine.dispose()


class InProcess:
    """The collector as a task in this event loop, over the cluster's kubeconfig."""

    def __init__(self, cluster, ledger):
        self.cluster, self.ledger = cluster, ledger
        self.task = self.api = self.collector = None
        self.listed = 0

    async def start(self):
        self.api = await k8s_config.new_client_from_config(config_file=str(self.cluster.kubeconfig))
        self.collector = KubeCollector(
            KubePodSource(k8s.CoreV1Api(self.api)), self.ledger, batch_delay=0.2
        )
        self.collector.accelerators = dict(CATALOGUE.accelerators)
        resync = self.collector.resync

        async def counted():
            self.listed += 1
            return await resync()

        self.collector.resync = counted
        self.task = asyncio.create_task(self.collector.run())

    def resyncs(self) -> int:
        """Full lists (instead of a resumed watch) since this collector started."""
        return self.listed

    def alive(self):
        if self.task.done():
            self.task.result()  # raises what stopped it
            pytest.fail("the collector task ended")

    async def kill(self):
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        await self.api.close()

    async def stop(self):
        await self.kill()


class Service:
    """``labfleet-accounting serve --AccountingApp.kubernetes=True`` as a process."""

    def __init__(self, cluster, db_url, log: Path):  # noqa: F811
        self.cluster, self.db_url, self.log = cluster, db_url, log
        self.process = None
        self.listed_before = 0

    async def start(self):
        self.listed_before = self.count_resyncs()
        env = {**self.cluster.env, "JUPYTERHUB_SERVICE_PREFIX": "/"}
        env.pop("JUPYTERHUB_API_TOKEN", None)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "labfleet_accounting.app", "serve",
                 f"--db-url={self.db_url}", f"--port={free_port()}",
                 "--AccountingApp.kubernetes=True",
                 f"--AccountingApp.catalogue_path={CATALOGUE_PATH}",
                 "--KubeCollector.batch_delay=0.2", "--Application.log_level=INFO"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip

    def count_resyncs(self) -> int:
        if not self.log.exists():
            return 0
        return self.log.read_text(errors="replace").count("Resynced ")

    def resyncs(self) -> int:
        """Full lists (instead of a resumed watch) since this process started."""
        return self.count_resyncs() - self.listed_before

    def alive(self):
        assert self.process.poll() is None, self.log.read_text(errors="replace")[-3000:]

    async def kill(self):
        self.alive()
        self.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, 10)
        assert self.process.returncode == -signal.SIGKILL

    async def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.process.wait, 15)


async def scenario(fleet: Fleet, ledger: Ledger, make_collector) -> None:
    # Two sessions run before the collector starts: its first list finds them.
    await fleet.start_session(ALICE_GPU)
    await fleet.start_session(BOB_CPU)
    collector = make_collector()
    await collector.start()
    try:
        # Its first list (no checkpoint yet) must have seen those two: a pod
        # deleted before the collector ever ran cannot be accounted.
        await fleet.listed(ledger, collector)
        # While it watches: a MIG session and a batch Job start, a session is
        # deleted, the Job's pod completes.
        await fleet.start_session(CAROL_MIG)
        await fleet.start_job(TRAIN_JOB)
        await fleet.delete(BOB_CPU)
        await fleet.complete(TRAIN_JOB)
        await fleet.agrees(ledger, collector)
        first_checkpoint = ledger.checkpoint("k8s")
        assert first_checkpoint
        assert collector.resyncs() == 1, "without a checkpoint the collector lists first"

        # Stopped in the middle of a deletion's events.
        await fleet.delete(ALICE_GPU)
        await collector.kill()
        # While nobody watches: a session starts and stays, one starts and ends.
        await fleet.start_session(DOT_USER)
        await fleet.start_session(SHORT)
        await fleet.delete(SHORT)
        await fleet.start_session(LATE)

        # Restarted from its checkpoint: the watch replays what happened,
        # with the deletions' own times (a resync could only close them at
        # their last sighting, and would never see SHORT at all).
        collector = make_collector()
        await collector.start()
        await fleet.agrees(ledger, collector)
        await fleet.delete(LATE)
        await fleet.agrees(ledger, collector)
        assert collector.resyncs() == 0, "the restart listed instead of resuming"
        assert int(ledger.checkpoint("k8s")) > int(first_checkpoint)
    finally:
        await collector.stop()

    rows = [r for r in ledger.intervals("k8s") if r["uid"] in fleet.truth]
    assert len(rows) == 7 == len(fleet.truth)
    still_open = {r["name"] for r in rows if r["end_s"] is None}
    assert still_open == {CAROL_MIG.name, DOT_USER.name}
    assert not fleet.mismatches(ledger)


async def test_collector_cancelled_and_resumed_matches_ground_truth(k8s_cluster, fleet, ledger):
    def make():
        return InProcess(k8s_cluster, ledger)

    await scenario(fleet, ledger, make)


async def test_service_sigkilled_and_restarted_matches_ground_truth(
    k8s_cluster,
    fleet,
    ledger,
    db_url,  # noqa: F811
    tmp_path,
):
    log = tmp_path / "service.log"

    def make():
        return Service(k8s_cluster, db_url, log)

    try:
        await scenario(fleet, ledger, make)
    except BaseException:
        if log.exists():
            print(log.read_text(errors="replace")[-4000:])
        raise
    assert log.read_text(errors="replace").count("Resynced ") == 1  # the first start only
