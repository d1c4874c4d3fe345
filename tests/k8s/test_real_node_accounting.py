"""Accounting and failure reasons on the real node (issue 11, item 3): real pods, real kernel.

- A batch job submitted through the batch service's Kubernetes backend (Kueue,
  a least-privilege ServiceAccount, a real JupyterHub for the users' tokens)
  lands on the real node through the queue configuration's ``cpu_placement``;
  one that allocates beyond its 64Mi limit is OOM-killed by the kernel and the
  user reads why in a plain sentence through the API and ``labfleet-batch
  status``.
- The accounting collector (``labfleet-accounting serve``, a real process on
  the host) records those pods and a notebook-like pod exactly once, start =
  ``status.startTime``, end = the container's ``finishedAt`` (the job pods) or
  the deletion (the notebook), although it is SIGKILLed while they run and
  restarted after both jobs ended.
- The GPU exporter's pod-resources client talks gRPC to the real kubelet's
  socket: the answer names the node's pods with no devices, the kubelet
  counts the calls, and the exporter process serves metrics with no device
  holder and no error.

Figures (printed, ``-s`` shows them) go to docs/cluster.md, "The real node".
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from k8s_helpers import clusterlib, delete_queue_layout, wait_for
from kubernetes_asyncio import client as k8s
from labfleet_accounting import db
from labfleet_accounting.kube import parse_time
from labfleet_accounting.ledger import Ledger
from labfleet_accounting.pod_resources import list_pod_resources
from labfleet_batch.kube import KubeAPI, KubeBackend
from labfleet_batch.podspec import PodStorage
from labfleet_batch.queues import parse_queue_config, sync_queues
from labfleet_batch.rbac import rbac_objects
from labfleet_hub import contract
from labfleet_spawner.catalogue import load_catalogue

from tests.batch.conftest import hub  # noqa: F401  (session fixture: a real JupyterHub)
from tests.batch.harness import make_context, running_service
from tests.conftest import free_port

node_lib = clusterlib.node_lib
SA_NAMESPACE = "labfleet-system"
RUN_AS_UID = 1000  # PodStorage.run_as_uid: the jobs' identity without the hub's ids
#: Seconds between the test's clock around the notebook's deletion and its recorded end:
#: the 1 s grace period (its ``sleep`` ignores SIGTERM as PID 1), whole-second API times.
TOLERANCE = 3
OOM_SCRIPT = (
    "python3 -c 'import time\nb = []\nfor i in range(64):\n"
    '    b.append(bytearray(8 << 20)); time.sleep(0.01)\nprint("survived")\''
)


@pytest.fixture(scope="module")
def base_image(k8s_real_images) -> str:
    return k8s_real_images("base")


def write_catalogue(path: Path, image: str):
    path.write_text(
        yaml.safe_dump(
            {
                "images": [{"name": "base", "display_name": "Debian base", "image": image}],
                "sizes": [
                    {
                        "name": "small",
                        "display_name": "1/4 CPU, 128 MiB",
                        "cpu": 0.25,
                        "memory": "128Mi",
                    },
                    {
                        "name": "tight",
                        "display_name": "1/4 CPU, 64 MiB",
                        "cpu": 0.25,
                        "memory": "64Mi",
                    },
                ],  # fmt: skip
                "profiles": [
                    {
                        "name": "cpu",
                        "display_name": "CPU only",
                        "images": ["base"],
                        "sizes": ["small", "tight"],
                        "default": True,
                    },
                ],  # fmt: skip
            }
        )
    )
    return load_catalogue(path)


def api_client(cluster, token: str) -> k8s.ApiClient:
    conf = k8s.Configuration(host=cluster.server)
    conf.api_key = {"BearerToken": f"Bearer {token}"}
    conf.ssl_ca_cert = str(cluster.ca_file)
    return k8s.ApiClient(conf)


class Platform:
    """Queues with cpu_placement on the real node, the batch service, a user, a ledger."""

    def __init__(self, cluster, the_hub, catalogue, shared: Path):
        self.s = uuid.uuid4().hex[:5]
        self.cluster, self.hub, self.catalogue = cluster, the_hub, catalogue
        self.group, self.user = f"acct{self.s}", f"ann{self.s}"
        placement = node_lib.pod_placement()
        self.config = parse_queue_config(
            {
                "name_prefix": f"ra{self.s}-",
                "namespace_prefix": f"ra{self.s}-",
                "cohort": f"ra{self.s}",
                "groups": {self.group: {"cpu": 2, "memory": "1Gi"}},
                "cpu_placement": {
                    "node_selector": placement["nodeSelector"],
                    "tolerations": placement["tolerations"],
                },
            },
            catalogue,
        )
        self.ns = self.config.namespace(self.group)
        # The shared tree on the machine (the real node is this machine): the home
        # belongs to the jobs' uid, so the bootstrap can make its work folder.
        home = shared / "home" / self.user
        home.mkdir(parents=True)
        os.chown(home, RUN_AS_UID, 100)
        self.storage = PodStorage(volume={"hostPath": {"path": str(shared), "type": "Directory"}})

    async def __aenter__(self):
        self.admin = api_client(self.cluster, self.cluster.token)
        await sync_queues(KubeAPI(self.admin), self.config, self.catalogue)
        sa = f"batch{self.s}"
        self.cluster.kubectl("create", "namespace", SA_NAMESPACE, check=False)
        self.cluster.kubectl("create", "serviceaccount", sa, "-n", SA_NAMESPACE)
        self.cluster.apply(rbac_objects(self.config, sa, SA_NAMESPACE))
        token = self.cluster.kubectl("create", "token", sa, "-n", SA_NAMESPACE).stdout.strip()
        self.sa_client = api_client(self.cluster, token)
        backend = KubeBackend(KubeAPI(self.sa_client), self.config, self.storage)
        lq = self.config.local_queue(self.group)
        wait_for(
            f"LocalQueue {lq} active",
            lambda: any(
                c["type"] == "Active" and c["status"] == "True"
                for c in self.cluster.kubectl_json(
                    "get", "localqueues.kueue.x-k8s.io", lq, "-n", self.ns
                )
                .get("status", {})
                .get("conditions", [])
            ),
            30,
        )
        self.token = self.hub.add_user(self.user, [self.group])
        self._service = running_service(
            make_context(backend, self.catalogue, self.config, self.hub)
        )
        self.service = await self._service.__aenter__()
        return self

    async def __aexit__(self, *exc):
        await self._service.__aexit__(*exc)
        await self.sa_client.close()
        await self.admin.close()
        self.cluster.kubectl("delete", "serviceaccount", f"batch{self.s}", "-n", SA_NAMESPACE,
                             "--wait=false", check=False)  # fmt: skip
        delete_queue_layout(self.cluster, self.config, self.catalogue)

    async def submit(self, name: str, script: str, size: str) -> dict:
        r = await self.service.call(
            "POST", "api/jobs", self.token, {"name": name, "script": script, "size": size}
        )
        assert r.status == 201, r.text
        return r.body

    async def job(self, job_id: str) -> dict:
        r = await self.service.call("GET", f"api/jobs/{job_id}", self.token)
        assert r.status == 200, r.text
        return r.body

    async def pod_of(self, job_name: str) -> dict | None:
        pods = await asyncio.to_thread(
            self.cluster.kubectl_json,
            "get", "pods", "-n", self.ns, "-l", f"batch.kubernetes.io/job-name={job_name}",
        )  # fmt: skip
        return pods["items"][0] if pods["items"] else None


async def until(what: str, fn, timeout: float = 90, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await fn()
        if last:
            return last
        await asyncio.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class Collector:
    """``labfleet-accounting serve --AccountingApp.kubernetes=True``: a process on the host."""

    def __init__(self, cluster, db_url: str, log: Path):
        self.cluster, self.db_url, self.log = cluster, db_url, log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**self.cluster.env, "JUPYTERHUB_SERVICE_PREFIX": "/"}
        env.pop("JUPYTERHUB_API_TOKEN", None)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "labfleet_accounting.app", "serve",
                 f"--db-url={self.db_url}", f"--port={free_port()}",
                 "--AccountingApp.kubernetes=True", "--KubeCollector.batch_delay=0.2",
                 "--Application.log_level=INFO"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip

    def resyncs(self) -> int:
        return self.log.read_text(errors="replace").count("Resynced ") if self.log.exists() else 0

    def alive(self) -> None:
        assert self.process.poll() is None, self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        self.alive()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        assert self.process.returncode == -signal.SIGKILL

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(15)


def notebook_pod(name: str, image: str, user: str, group: str) -> dict:
    """A notebook-like pod: the spawner's contract labels, a long-running process."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                contract.LABEL_KIND: contract.KIND_INTERACTIVE,
                contract.LABEL_USER: user,
                contract.LABEL_GROUP: group,
                contract.LABEL_PROFILE: "cpu",
            },
            "annotations": {contract.ANNOTATION_USER: user},
        },  # fmt: skip
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsUser": RUN_AS_UID, "runAsGroup": 100},
            "containers": [
                {
                    "name": "notebook",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "600"],
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "32Mi"},
                        "limits": {"cpu": "100m", "memory": "32Mi"},
                    },
                }
            ],
            **node_lib.pod_placement(),
        },
    }


def running(cluster, namespace: str, name: str) -> dict | None:
    pod = cluster.kubectl_json("get", "pod", name, "-n", namespace)
    return pod if pod["status"].get("phase") == "Running" else None


def finished_at(pod: dict) -> int:
    return max(
        parse_time(s["state"]["terminated"]["finishedAt"])
        for s in pod["status"]["containerStatuses"]
    )


def mismatches(ledger: Ledger, truth: dict[str, dict], namespaces: set[str]) -> list[str]:
    """Differences between the ledger's rows of ``namespaces`` and ``truth`` (by pod uid)."""
    rows = [r for r in ledger.intervals("k8s") if r["namespace"] in namespaces]
    problems = []
    uids = [r["uid"] for r in rows]
    if len(uids) != len(set(uids)):
        problems.append(f"duplicate intervals: {sorted(uids)}")
    mine = {r["uid"]: r for r in rows}
    for uid in sorted(set(mine) - set(truth)):
        problems.append(f"unexpected interval {mine[uid]['name']}")
    for uid, want in truth.items():
        got = mine.get(uid)
        if got is None:
            problems.append(f"no interval for {want['name']}")
            continue
        for key, value in want.items():
            if key == "end_near":
                if got["end_s"] is None or abs(got["end_s"] - value) > TOLERANCE:
                    problems.append(f"{want['name']}: end {got['end_s']} not near {value:.1f}")
            elif got[key] != value:
                problems.append(f"{want['name']}.{key}: {got[key]!r} != {value!r}")
    return problems


def expected(pod: dict, user: str, group: str, kind: str, memory: int, end: int | None) -> dict:
    meta = pod["metadata"]
    return {"name": meta["name"], "namespace": meta["namespace"], "user_name": user,
            "group_name": group, "kind": kind, "profile": "cpu", "memory": memory,
            "start_s": parse_time(pod["status"]["startTime"]), "end_s": end}  # fmt: skip


async def test_oom_reason_and_collector_restart_on_the_real_node(
    k8s_cluster,
    k8s_real_node,
    k8s_namespace,
    base_image,
    hub,  # noqa: F811
    tmp_path,
):
    catalogue = write_catalogue(tmp_path / "catalogue.yaml", base_image)
    (tmp_path / "shared").mkdir()
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    ledger = Ledger(engine)
    collector = Collector(k8s_cluster, db_url, tmp_path / "collector.log")
    figures: dict[str, float] = {}
    truth: dict[str, dict] = {}
    try:
        async with Platform(k8s_cluster, hub, catalogue, tmp_path / "shared") as p:
            namespaces = {p.ns, k8s_namespace}
            collector.start()
            await until("the collector's first list", lambda: asyncio.to_thread(
                ledger.checkpoint, "k8s"))  # fmt: skip

            # a notebook-like pod and a normal job run on the real node
            k8s_cluster.apply(notebook_pod("nb", base_image, p.user, p.group), "-n", k8s_namespace)
            job = await p.submit("fit", "echo fitting; sleep 10; echo fitted", "small")

            async def running_pod():
                pod = await p.pod_of(job["name"])
                return pod if pod and pod["status"].get("phase") == "Running" else None

            job_pod = await until("the job's pod running", running_pod)
            assert job_pod["spec"]["nodeName"] == k8s_real_node["name"]
            assert job_pod["spec"]["nodeSelector"] == node_lib.pod_placement()["nodeSelector"]
            nb = wait_for(
                "the notebook pod running", lambda: running(k8s_cluster, k8s_namespace, "nb")
            )
            assert nb["spec"]["nodeName"] == k8s_real_node["name"]
            await until("the collector to open both", lambda: asyncio.to_thread(
                lambda: {nb["metadata"]["uid"], job_pod["metadata"]["uid"]}
                <= {r["uid"] for r in ledger.intervals("k8s") if r["end_s"] is None}))  # fmt: skip

            # SIGKILLed while both run; the job ends and the OOM job lives and dies unwatched
            collector.kill()
            submitted = time.monotonic()
            oom = await p.submit("hog", OOM_SCRIPT, "tight")

            async def failed_with_reason():
                body = await p.job(oom["id"])
                if body["state"] == "failed" and "OOMKilled" in body["message"]:
                    return body, time.monotonic(), time.time()
                return None

            body, found, seen = await until(
                "the OOM job failed with its reason", failed_with_reason
            )
            figures["oom: submit -> reason in the API (s)"] = found - submitted
            oom_pod = await p.pod_of(oom["name"])
            term = oom_pod["status"]["containerStatuses"][0]["state"]["terminated"]
            assert (term["reason"], term["exitCode"]) == ("OOMKilled", 137), term
            assert oom_pod["spec"]["nodeName"] == k8s_real_node["name"]
            assert body["message"] == (
                "completion 0 was killed: it used more than its 64Mi memory limit (OOMKilled)"
            )
            started = parse_time(oom_pod["status"]["startTime"])
            # the API's times have whole seconds: each figure is +-1 s
            figures["oom: pod start -> reason in the API (s, +-1)"] = seen - started
            figures["oom: container killed -> reason in the API (s, +-1)"] = seen - finished_at(
                oom_pod
            )
            # the CLI a notebook user runs: the word for Snakemake, the reason for a person
            cli = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "labfleet_batch.client", "status", oom["id"]],
                env={**os.environ, "LABFLEET_BATCH_URL": p.service.url,
                     "JUPYTERHUB_API_TOKEN": p.token},
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert cli.returncode == 0, cli.stderr
            assert cli.stdout == "failed\n"
            assert cli.stderr == f"{oom['id']}: failed ({body['message']})\n"
            # its log (through the API: a real kubelet serves it) never reached the end
            r = await p.service.call("GET", f"api/jobs/{oom['id']}/logs?index=0", p.token)
            assert r.status == 200 and "survived" not in r.text

            async def succeeded():
                body = await p.job(job["id"])
                return body if body["state"] == "succeeded" else None

            await until("the normal job succeeded", succeeded)
            job_pod = await p.pod_of(job["name"])
            r = await p.service.call("GET", f"api/jobs/{job['id']}/logs?index=0", p.token)
            assert r.text == "fitting\nfitted\n", r.text

            truth[nb["metadata"]["uid"]] = expected(
                nb, p.user, p.group, contract.KIND_INTERACTIVE, 32 << 20, None
            )
            truth[job_pod["metadata"]["uid"]] = expected(
                job_pod, p.user, p.group, contract.KIND_BATCH, 128 << 20, finished_at(job_pod)
            )
            truth[oom_pod["metadata"]["uid"]] = expected(
                oom_pod, p.user, p.group, contract.KIND_BATCH, 64 << 20, finished_at(oom_pod)
            )
            # while it was down: the job pod's interval is still open, the OOM pod unknown
            rows = {r["uid"]: r for r in ledger.intervals("k8s")}
            assert rows[job_pod["metadata"]["uid"]]["end_s"] is None
            assert oom_pod["metadata"]["uid"] not in rows

            # restarted: it resumes the watch from its checkpoint and catches up
            restarted = time.monotonic()
            collector.start()

            async def agrees():
                collector.alive()
                return not await asyncio.to_thread(mismatches, ledger, truth, namespaces)

            await until("the ledger to agree after the restart", agrees, 60, 0.1)
            figures["collector restart -> ledger caught up (s)"] = time.monotonic() - restarted

            # the notebook stops while the new collector watches
            before = time.time()
            k8s_cluster.kubectl("delete", "pod", "nb", "-n", k8s_namespace, "--wait=false")
            truth[nb["metadata"]["uid"]]["end_near"] = (before + time.time()) / 2
            del truth[nb["metadata"]["uid"]]["end_s"]
            await until("the notebook's end in the ledger", agrees, 60, 0.1)
            assert collector.resyncs() == 1, "the restart listed instead of resuming"
    finally:
        collector.stop()
        engine_rows = ledger.intervals("k8s") if truth else []
        engine.dispose()
        for name, value in figures.items():
            print(f"FIGURE {name}: {value:.2f}")
    rows = [r for r in engine_rows if r["uid"] in truth]
    assert len(rows) == 3 and all(r["end_s"] is not None for r in rows)


# -- the GPU exporter and the real kubelet ---------------------------------------------------


def pod_resources_socket(cluster) -> Path:
    return node_lib.node_dir(cluster.state_dir) / "kubelet" / "pod-resources" / "kubelet.sock"


def kubelet_list_calls(cluster) -> int:
    """The kubelet's own count of pod-resources ``List`` calls (through the API server)."""
    text = cluster.kubectl(
        "get", "--raw", f"/api/v1/nodes/{node_lib.NODE_NAME}/proxy/metrics"
    ).stdout
    found = re.search(r"^kubelet_pod_resources_endpoint_requests_list\{[^}]*\} (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else 0


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_gpu_exporter_talks_to_the_real_kubelet(
    k8s_cluster, k8s_real_node, k8s_namespace, base_image, tmp_path
):
    socket = pod_resources_socket(k8s_cluster)
    assert socket.is_socket(), socket
    k8s_cluster.apply(notebook_pod("nb-gpu-less", base_image, "zoe", "ml"), "-n", k8s_namespace)
    plain = notebook_pod("plain", base_image, "zoe", "ml")
    plain["metadata"]["labels"] = {"app": "plain"}
    k8s_cluster.apply(plain, "-n", k8s_namespace)
    for name in ("nb-gpu-less", "plain"):
        wait_for(f"{name} running", lambda n=name: running(k8s_cluster, k8s_namespace, n))

    calls = kubelet_list_calls(k8s_cluster)
    answer = list_pod_resources(str(socket))
    assert kubelet_list_calls(k8s_cluster) == calls + 1  # the kubelet answered this one
    mine = {p["name"]: p for p in answer["podResources"] if p["namespace"] == k8s_namespace}
    assert set(mine) == {"nb-gpu-less", "plain"}, answer
    for entry in mine.values():
        assert [c["name"] for c in entry["containers"]] == ["notebook"]
        assert entry["containers"][0]["devices"] == []  # the real node has no devices
    assert all(c["devices"] == [] for p in answer["podResources"] for c in p["containers"])

    # the exporter process in Kubernetes mode against the same socket and the API server
    port = free_port()
    log = tmp_path / "exporter.log"
    env = {**k8s_cluster.env}
    with open(log, "wb") as out:
        exporter = subprocess.Popen(
            [sys.executable, "-m", "labfleet_accounting.app", "gpu-exporter",
             "--GpuExporterApp.kubernetes=True", f"--GpuExporterApp.pod_resources_socket={socket}",
             f"--GpuExporterApp.node_name={node_lib.NODE_NAME}",
             "--GpuExporterApp.metrics_public=True", f"--GpuExporterApp.exporter_port={port}"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for("the exporter's /metrics", lambda: exporter.poll() is None and _try(scrape, url))
        calls = kubelet_list_calls(k8s_cluster)
        text = scrape(url)
        text = scrape(url)
        assert kubelet_list_calls(k8s_cluster) == calls + 2  # one List per scrape
        assert exporter.poll() is None
    finally:
        exporter.send_signal(signal.SIGTERM)
        exporter.wait(15)
    output = log.read_text(errors="replace")
    assert "owners unavailable" not in output, output
    assert re.search(r"^labfleet_gpu_exporter_errors_total 0\.0$", text, re.M), text
    series = [line for line in text.splitlines() if line.startswith("labfleet_gpu_")]
    assert series == ["labfleet_gpu_exporter_errors_total 0.0"], series
    assert 'owner="' not in text and 'user="' not in text


def _try(fn, *args):
    try:
        return fn(*args)
    except OSError:
        return None
