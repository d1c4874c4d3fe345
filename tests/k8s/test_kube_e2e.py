"""End to end in Kubernetes mode: browser login -> profile -> pod in the real API server
-> scheduled onto the right fake node -> JupyterLab opens.

The hub is the real platform (``labfleet up`` with ``spawner.kind: kubernetes``,
the development identity provider, configurable-http-proxy, Debian Chromium),
pointed at the test cluster's kube-apiserver. Pods are really created, and
really scheduled by kube-scheduler onto KWOK's fake nodes.

KWOK nodes have no container runtime, so **this test runs a small node agent
that stands in for the container runtime**: for each pod that is bound to a
node and Running, it starts the pod's command (``jupyterhub-singleuser``, from
this virtualenv, not the catalogue's image) with the pod's environment,
listening on the pod's loopback IP (KWOK's pod CIDR is 127.100.0.0/16), and
stops it when the pod goes away. A pod without a command gets
``jupyterhub-singleuser``, which is what the catalogue's Jupyter docker-stacks
images run under a hub. Everything else -- the pod spec, placement,
the hub's route to the pod IP -- is what production does. The agent does not
enforce the pod's uid, volumes or resources (a real kubelet does).
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import (  # noqa: F401  (browser: session fixture)
    browser,
    login,
    start_platform,
    stop_platform,
    write_config,
)
from tests.integration.test_platform_login import api_token

VENV_BIN = Path(sys.executable).parent


class NodeAgent(threading.Thread):
    """Stand-in for the kubelet's container runtime on the KWOK nodes (see module doc)."""

    def __init__(self, cluster, namespace: str, log_dir: Path):
        super().__init__(daemon=True)
        self.cluster, self.namespace, self.log_dir = cluster, namespace, log_dir
        self.processes: dict[str, subprocess.Popen] = {}
        self.started: dict[str, dict] = {}
        self._halt = threading.Event()

    def run(self):
        while not self._halt.wait(0.5):
            try:
                pods = self.cluster.kubectl_json("get", "pods", "-n", self.namespace)["items"]
            except Exception:
                continue
            live = set()
            for pod in pods:
                name = pod["metadata"]["name"]
                ip = (pod.get("status") or {}).get("podIP")
                if pod["status"].get("phase") != "Running" or not ip:
                    continue
                if pod["metadata"].get("deletionTimestamp"):
                    continue
                live.add(name)
                if name not in self.processes:
                    self._start(pod, ip)
            for name in set(self.processes) - live:
                self._terminate(name)

    def _start(self, pod: dict, ip: str) -> None:
        container = pod["spec"]["containers"][0]
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        # No command: the image's entrypoint runs, which in the Jupyter docker stacks
        # images (the catalogue's) is jupyterhub-singleuser under a hub.
        argv = argv or ["jupyterhub-singleuser"]
        assert Path(argv[0]).name == "jupyterhub-singleuser", argv
        port = container["ports"][0]["containerPort"]
        env = self._environment(container, pod["metadata"]["namespace"])
        home = tempfile.mkdtemp(prefix="nodeagent-home-")
        env.update(
            PATH=f"{VENV_BIN}:/usr/bin:/bin",
            HOME=home,
            # the pod's own address, as a container would see it
            JUPYTERHUB_SERVICE_URL=f"http://{ip}:{port}/",
        )
        argv = [str(VENV_BIN / "jupyterhub-singleuser"), *argv[1:]]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        log = open(self.log_dir / f"{pod['metadata']['name']}.log", "wb")
        self.processes[pod["metadata"]["name"]] = subprocess.Popen(
            argv, env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started[pod["metadata"]["name"]] = pod

    def _environment(self, container: dict, namespace: str) -> dict[str, str]:
        """The container's environment as the kubelet makes it: values, and the
        server's Secret for ``secretKeyRef`` (its token is not in the pod spec)."""
        env = {}
        for e in container.get("env", []):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                env[e["name"]] = e.get("value", "")
                continue
            secret = self.cluster.kubectl_json("get", "secret", ref["name"], "-n", namespace)
            env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env

    def _terminate(self, name: str) -> None:
        process = self.processes.pop(name)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self):
        self._halt.set()
        self.join(10)
        for name in list(self.processes):
            self._terminate(name)


@pytest.fixture
def kube_platform(k8s_cluster, tmp_path, monkeypatch):
    namespace = "e2e-" + uuid.uuid4().hex[:6]
    k8s_cluster.kubectl("create", "namespace", namespace)
    config_dir = tmp_path / "platform"
    values = write_config(config_dir)
    values["spawner"] = {
        "kind": "kubernetes",
        "namespace": namespace,
        "start_timeout": 120,
        "kubernetes": {
            "shared_volume": {"hostPath": {"path": "/srv/labfleet", "type": "DirectoryOrCreate"}},
            "unschedulable_grace_period": 30,
        },
    }
    (config_dir / "labfleet.yaml").write_text(yaml.safe_dump(values))
    # the hub process talks to the test cluster as its admin
    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    agent = NodeAgent(k8s_cluster, namespace, tmp_path)
    agent.start()
    platform = start_platform(config_dir)
    try:
        yield platform, agent, namespace
    finally:
        stop_platform(platform.process)
        agent.stop()
        k8s_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_browser_login_to_jupyterlab_on_the_right_fake_node(
    kube_platform,
    browser,  # noqa: F811  (the session fixture imported above)
    k8s_cluster,
):
    platform, agent, namespace = kube_platform
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        login(page, platform, "alice", "alice-pass")
        page.goto(f"{platform.url}/hub/spawn")
        # live availability from the watch: the whole T4 node is free
        assert "8 of 8 free" in page.locator("#availability-gpu-t4").inner_text()
        page.check("#profile-gpu-t4")
        page.click("form#spawn_form input[type=submit], form#spawn_form button[type=submit]")
        page.wait_for_url(re.compile(r"/user/alice/lab"), timeout=120_000)
        page.wait_for_selector("#jupyterlab-splash", state="detached", timeout=120_000)

        pods = k8s_cluster.kubectl_json("get", "pods", "-n", namespace)["items"]
        assert len(pods) == 1
        pod = pods[0]
        assert pod["spec"]["nodeName"] == "gpu-t4-01"
        assert pod["metadata"]["labels"]["labfleet.io/profile"] == "gpu-t4"
        assert pod["metadata"]["labels"]["labfleet.io/group"] == "ml"
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
        assert pod["metadata"]["name"] in agent.started

        check_batch_job_runs_as_the_notebook(platform, page, k8s_cluster, pod)

        page.goto(f"{platform.url}/hub/home")
        page.locator("#stop").click()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            platform.running_servers("alice")
            or k8s_cluster.kubectl_json("get", "pods", "-n", namespace)["items"]
        ):
            time.sleep(0.5)
        assert platform.running_servers("alice") == 0
        assert k8s_cluster.kubectl_json("get", "pods", "-n", namespace)["items"] == []
    finally:
        context.close()


def check_batch_job_runs_as_the_notebook(platform, page, cluster, notebook_pod):
    """``labfleet sync-queues`` lays out the queues; a job submitted with the real
    ``labfleet-batch`` CLI through the platform's batch service becomes a Job in
    the group's namespace that runs with the notebook's uid and the group's gid."""
    config = str(platform.config_dir / "labfleet.yaml")
    layout = subprocess.run(
        [str(VENV_BIN / "labfleet"), "sync-queues", "--config", config, "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    layout_file = platform.config_dir / "queues.yaml"
    layout_file.write_text(layout)
    try:
        synced = subprocess.run(
            [str(VENV_BIN / "labfleet"), "sync-queues", "--config", config],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert synced.returncode == 0, synced.stderr
        assert "applied LocalQueue/labfleet-ml/ml-queue" in synced.stdout, synced.stdout
        assert "nothing deleted" in synced.stdout

        token = api_token(page, platform)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")},
            "JUPYTERHUB_API_TOKEN": token,
            "LABFLEET_BATCH_URL": f"{platform.url}/services/batch/",
        }
        submitted = subprocess.run(
            [str(VENV_BIN / "labfleet-batch"), "submit", "--group", "ml", "--name", "e2e", "-"],
            input="echo hello\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert submitted.returncode == 0, submitted.stderr
        group, name = submitted.stdout.strip().split("/")
        job = cluster.kubectl_json("get", "job", name, "-n", f"labfleet-{group}")
        job_security = job["spec"]["template"]["spec"]["securityContext"]
        notebook_security = notebook_pod["spec"]["securityContext"]
        assert job_security["runAsUser"] == notebook_security["runAsUser"] >= 200001
        assert job_security["runAsGroup"] == notebook_security["runAsGroup"]
        # one supplementary group, the charged group's, which the notebook has too
        [group_gid] = job_security["supplementalGroups"]
        assert group_gid in notebook_security["supplementalGroups"]
        # the notebook's shared volume and mount points
        job_pod = job["spec"]["template"]["spec"]
        [shared] = [v for v in job_pod["volumes"] if "hostPath" in v]
        assert shared["hostPath"]["path"] == "/srv/labfleet"
        mounts = {m["mountPath"] for m in job_pod["containers"][0]["volumeMounts"]}
        notebook_container = notebook_pod["spec"]["containers"][0]
        notebook_mounts = {m["mountPath"] for m in notebook_container["volumeMounts"]}
        assert {"/home/jovyan", "/shared/groups/ml", "/shared/public"} <= mounts & notebook_mounts
        cancelled = subprocess.run(
            [str(VENV_BIN / "labfleet-batch"), "cancel", f"{group}/{name}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert cancelled.returncode == 0, cancelled.stderr
    finally:
        cluster.kubectl("delete", "-f", str(layout_file), "--wait=false", check=False)
