"""The platform on the real node: a browser reaches a JupyterLab that really runs in a pod,
a batch job submitted from that notebook runs as a real pod with the owner's ids, and
both see the same shared folders with the single-node owners and modes.

The hub, its proxy, the development identity provider and the batch service (Kubernetes
backend) run on this machine, as ``labfleet up`` starts them, against the test cluster:
the API server listens on 127.0.0.1 only, so nothing that talks to it can be a pod here.
Pods reach the hub's API and the batch service at ``hub.connect_ip`` = the bridge's host
address (10.244.0.1); the browser uses loopback. Notebook and job pods run labfleet's own
singleuser image (``labfleet_hub.images``, imported into the node's containerd) on the
real node: the notebook through ``spawner.kubernetes.node_selector``/``tolerations``,
CPU-only jobs through ``batch.queues.cpu_placement``.

The shared filesystem is a hostPath on the node (a folder under the cluster's state),
which the hub also sees (``spawner.kubernetes.storage_path``) and lays out before each
pod as single-node mode does. Production uses any ReadWriteMany volume the same way
(docs/kubernetes.md, "Storage").

Measured figures are printed (``-s``) and written to ``<tmp>/timings.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from k8s_helpers import clusterlib, delete_queue_layout, wait_for

from tests.integration.conftest import (  # noqa: F401  (browser: module fixture)
    browser,
    login,
    start_platform,
    stop_platform,
    write_config,
)
from tests.integration.test_first_hour import run_cell
from tests.integration.test_platform_login import api_token, wait_for_lab

node_lib = clusterlib.node_lib
ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
JOB_ID = re.compile(r"\bml/[a-z0-9-]+-[a-z0-9]{8}\b")


class PodTimeline:
    """When this machine saw each pod of some namespaces change (a ``kubectl get -w``
    stream; the API's own timestamps have whole seconds only)."""

    def __init__(self, cluster, namespaces: list[str]):
        self.events: list[tuple[float, str, dict]] = []
        self._procs = [
            subprocess.Popen(
                [
                    str(cluster.kubectl_bin),
                    "--kubeconfig",
                    str(cluster.kubeconfig),
                    "get",
                    "pods",
                    "-n",
                    ns,
                    "-w",
                    "-o",
                    "json",
                ],  # fmt: skip
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for ns in namespaces
        ]
        self._threads = [
            threading.Thread(target=self._read, args=(p,), daemon=True) for p in self._procs
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, proc) -> None:
        decoder, buffer = json.JSONDecoder(), ""
        for line in proc.stdout:
            buffer += line
            if line.rstrip() != "}":  # an object ends with a closing brace alone on a line
                continue
            try:
                pod, _ = decoder.raw_decode(buffer)
            except ValueError:
                continue
            buffer = ""
            self.events.append((time.time(), pod["metadata"]["name"], pod))

    def first(self, name_prefix: str, what) -> float | None:
        """When a pod whose name starts with ``name_prefix`` first satisfied ``what(pod)``."""
        for seen, name, pod in list(self.events):
            if name.startswith(name_prefix) and what(pod):
                return seen
        return None

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
            proc.wait(10)


def _state(pod: dict) -> dict:
    return ((pod.get("status") or {}).get("containerStatuses") or [{}])[0].get("state") or {}


def _ready(pod: dict) -> bool:
    return bool(((pod.get("status") or {}).get("containerStatuses") or [{}])[0].get("ready"))


class Lab:
    """One platform, one logged-in browser page with alice's notebook open."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def pods(self, namespace: str, selector: str = "") -> list[dict]:
        extra = ("-l", selector) if selector else ()
        return self.cluster.kubectl_json("get", "pods", "-n", namespace, *extra)["items"]

    def job_pods(self, job_name: str) -> list[dict]:
        return self.pods(self.group_ns, f"batch.kubernetes.io/job-name={job_name}")

    def batch_api(self, path: str) -> tuple[int, str]:
        req = urllib.request.Request(
            f"{self.platform.url}/services/batch/{path}",
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()

    def cell(self, code: str, expect: re.Pattern, timeout: float = 180) -> str:
        return run_cell(self.page, code, expect, timeout)


@pytest.fixture(scope="module")
def lab(k8s_cluster, k8s_real_node, k8s_real_images, browser, tmp_path_factory):  # noqa: F811
    image = k8s_real_images("singleuser")
    s = uuid.uuid4().hex[:6]
    tmp = tmp_path_factory.mktemp("real-platform")
    namespace = f"rn-{s}"
    shared = Path(k8s_cluster.state_dir) / f"shared-{s}"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    k8s_cluster.kubectl("create", "namespace", namespace)

    config_dir = tmp / "platform"
    values = write_config(config_dir)
    shutil.rmtree(values["spawner"]["storage_root"], ignore_errors=True)  # not used here
    catalogue = yaml.safe_load((config_dir / "catalogue.yaml").read_text())
    for entry in catalogue["images"]:  # every image is labfleet's own notebook image
        entry["image"] = image
    # a job size that leaves the 2-CPU node room for the notebook and the other tests
    catalogue["sizes"].append(
        {"name": "tiny", "display_name": "1/4 CPU", "cpu": 0.25, "memory": "512Mi"}
    )
    for profile in catalogue["profiles"]:
        if profile["name"] == "cpu":
            profile["sizes"] = [*profile["sizes"], "tiny"]
    (config_dir / "catalogue.yaml").write_text(yaml.safe_dump(catalogue))
    placement = node_lib.pod_placement()
    values["hub"]["connect_ip"] = k8s_real_node["node_ip"]
    values["spawner"] = {
        "kind": "kubernetes",
        "namespace": namespace,
        "start_timeout": 180,
        "kubernetes": {
            "shared_volume": {"hostPath": {"path": str(shared), "type": "Directory"}},
            "storage_path": str(shared),
            "node_selector": placement["nodeSelector"],
            "tolerations": placement["tolerations"],
            "availability": False,
            "unschedulable_grace_period": 60,
        },
    }
    values["accounting"] = {"enabled": False}  # another test's subject; 2 cores here
    values["batch"]["queues"] = {
        "name_prefix": f"rn{s}-",
        "namespace_prefix": f"rn{s}-",
        "cohort": f"rn{s}",
        "groups": {"ml": {"cpu": 2, "memory": "4Gi"}},
        "cpu_placement": {
            "node_selector": placement["nodeSelector"],
            "tolerations": placement["tolerations"],
        },
    }
    config = config_dir / "labfleet.yaml"
    config.write_text(yaml.safe_dump(values))
    # the hub, the batch service and sync-queues talk to the test cluster as its admin
    kubeconfig_before = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(k8s_cluster.kubeconfig)
    layout = subprocess.run(
        [str(VENV_BIN / "labfleet"), "sync-queues", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert layout.returncode == 0, layout.stderr
    from labfleet_batch.queues import parse_queue_config
    from labfleet_spawner.catalogue import load_catalogue

    catalogue_objects = load_catalogue(config_dir / "catalogue.yaml")
    queue_config = parse_queue_config(values["batch"]["queues"], catalogue_objects)
    timeline = PodTimeline(k8s_cluster, [namespace, queue_config.namespace("ml")])
    platform = start_platform(config_dir)
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    timings: dict[str, float] = {}
    try:
        login(page, platform, "alice", "alice-pass")
        page.goto(f"{platform.url}/hub/spawn")
        page.check("#profile-cpu")
        page.select_option("#cpu-size", "small")
        clicked = time.time()
        page.click("form#spawn_form input[type=submit], form#spawn_form button[type=submit]")
        wait_for_lab(page)
        ready = time.time()
        timings["notebook: spawn click -> JupyterLab ready (browser)"] = ready - clicked
        [pod] = wait_for("the notebook pod", lambda: lab_pods(k8s_cluster, namespace), 30)
        created = timeline.first("jupyter-", lambda p: True)
        running = timeline.first("jupyter-", lambda p: "running" in _state(p))
        if created and running:
            timings["notebook: spawn click -> pod seen"] = created - clicked
            timings["notebook: pod seen -> container running"] = running - created
            timings["notebook: container running -> JupyterLab ready (browser)"] = ready - running
        page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
        page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content")
        page.wait_for_selector(".jp-StatusBar-Widget:has-text('| Idle')", timeout=120_000)
        yield Lab(
            cluster=k8s_cluster,
            platform=platform,
            page=page,
            pod=pod,
            namespace=namespace,
            group_ns=queue_config.namespace("ml"),
            shared=shared,
            tmp=tmp,
            token=api_token_in_new_page(context, platform),
            timings=timings,
            timeline=timeline,
            state_dir=Path(k8s_cluster.state_dir),
        )
    finally:
        (tmp / "timings.json").write_text(json.dumps(timings, indent=1))
        print("\nreal-node platform timings (s):")
        for what, seconds in timings.items():
            print(f"  {what}: {seconds:.1f}")
        context.close()
        timeline.stop()
        stop_platform(platform.process)
        k8s_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        delete_queue_layout(k8s_cluster, queue_config, catalogue_objects)
        wait_for(
            "the platform's pods gone from the real node",
            lambda: (
                not any(
                    p["metadata"]["namespace"] in (namespace, queue_config.namespace("ml"))
                    for p in k8s_cluster.kubectl_json("get", "pods", "-A")["items"]
                )
            ),
            60,
        )
        shutil.rmtree(shared, ignore_errors=True)
        if kubeconfig_before is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = kubeconfig_before


def lab_pods(cluster, namespace: str) -> list[dict]:
    pods = cluster.kubectl_json("get", "pods", "-n", namespace)["items"]
    return [p for p in pods if (p["status"].get("containerStatuses") or [{}])[0].get("ready")]


def api_token_in_new_page(context, platform) -> str:
    page = context.new_page()
    try:
        return api_token(page, platform)
    finally:
        page.close()


# -- 1. the notebook --------------------------------------------------------------------------


def test_browser_reaches_jupyterlab_running_in_a_real_pod(lab):
    pod = lab.pod
    assert pod["spec"]["nodeName"] == node_lib.NODE_NAME
    assert pod["status"]["hostIP"] == node_lib.NODE_IP
    container = pod["spec"]["containers"][0]
    assert container["image"].startswith("localhost/labfleet-singleuser:")
    uid = pod["spec"]["securityContext"]["runAsUser"]
    assert uid > 200000
    # a cell run from the browser, in the pod's kernel: the pod's hostname and ids
    out = lab.cell(
        "import os, socket; print('HOST', socket.gethostname(), 'UID', os.getuid(), "
        "'GROUPS', sorted(os.getgroups()), "
        "'PID1', open('/proc/1/cmdline').read()[:80].replace(chr(0), ' '))",
        re.compile(r"HOST \S+ UID \d+ GROUPS .* PID1 .+"),
    )
    lab.page.screenshot(path=str(lab.tmp / "jupyterlab-real-node.png"))
    line = out.strip().splitlines()[-1]
    assert f"HOST {pod['metadata']['name']} UID {uid} " in line, line
    groups = sorted({*pod["spec"]["securityContext"]["supplementalGroups"], uid})
    assert f"GROUPS {groups}" in line, line
    # PID 1 is the image's jupyterhub-singleuser (a container, not a process on this machine)
    assert "jupyterhub-singleuser" in line.split("PID1", 1)[1], line
    # the container really runs in the node's containerd
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    tasks = node_lib.ctr(lab.state_dir, "tasks", "ls").stdout
    assert re.search(rf"^{container_id}\s+\d+\s+RUNNING$", tasks, re.M), tasks


# -- 2. a batch job from the notebook -------------------------------------------------------


def test_batch_job_from_the_notebook_runs_on_the_real_node(lab):
    token = uuid.uuid4().hex[:10]
    notebook_uid = lab.pod["spec"]["securityContext"]["runAsUser"]
    result = f"/shared/groups/ml/from-job-{token}.txt"
    submitted = time.time()
    out = lab.cell(
        f"%%batch --group ml --size tiny --name proof --wait --logs\n"
        f"echo job-line-1 {token}\n"
        "echo ids $(id -u) $(id -g) $(id -G)\n"
        f"echo written-by-job-{token} > {result}\n"
        "stat -c 'stat %n %a %u %g' $HOME /shared/groups/ml /shared/public /shared/envs\n"
        f"echo job-line-last {token}\n",
        re.compile(rf"job-line-last {token}|failed|no logs|batch:"),
        timeout=240,
    )
    lab.page.screenshot(path=str(lab.tmp / "batch-from-notebook.png"))
    job_id = JOB_ID.search(out).group(0)
    assert f"job-line-1 {token}" in out and f"job-line-last {token}" in out, out
    name = job_id.split("/")[1]
    [pod] = lab.job_pods(name)
    assert pod["spec"]["nodeName"] == node_lib.NODE_NAME, pod["spec"]
    assert pod["status"]["phase"] == "Succeeded"
    security = pod["spec"]["securityContext"]
    assert security["runAsUser"] == notebook_uid
    [group_gid] = security["supplementalGroups"]
    assert group_gid in lab.pod["spec"]["securityContext"]["supplementalGroups"]
    ids = re.search(r"^ids (.*)$", out, re.M).group(1).split()
    assert ids[:2] == [str(notebook_uid), str(notebook_uid)], out
    assert sorted(ids[2:]) == sorted({str(notebook_uid), str(group_gid)}), out

    # the timings, as this machine saw the pod (the cell was run at ``submitted``)
    seen = lab.timeline.first(name, lambda p: True)
    running = lab.timeline.first(name, lambda p: "running" in _state(p))
    done = lab.timeline.first(name, lambda p: p["status"].get("phase") == "Succeeded")
    if seen and done:
        lab.timings["job: cell run -> pod seen"] = seen - submitted
        if running:  # a short job may be seen only once it has ended
            lab.timings["job: pod seen -> container running"] = running - seen
        lab.timings["job: pod seen -> Succeeded"] = done - seen
    lab.timings["job: cell run -> logs in the cell (%%batch --wait --logs)"] = (
        time.time() - submitted
    )

    # the notebook reads what the job wrote to the shared folder
    out = lab.cell(f"print(open('{result}').read())", re.compile(rf"written-by-job-{token}"))
    # and on the node's side of the hostPath: the job's uid, the group's gid (setgid folder)
    written = lab.shared / "groups" / "ml" / f"from-job-{token}.txt"
    st = written.stat()
    assert (st.st_uid, st.st_gid) == (notebook_uid, group_gid)

    # the log lines through the batch API and through the CLI in the notebook
    status, text = lab.batch_api(f"api/jobs/{job_id}/logs?index=0")
    assert status == 200 and f"job-line-1 {token}" in text, text
    assert json.loads(lab.batch_api(f"api/jobs/{job_id}")[1])["state"] == "succeeded"
    out = lab.cell(f"!labfleet-batch logs {job_id}", re.compile(rf"job-line-last {token}"))
    assert f"job-line-1 {token}" in out
    lab.job_stats = out  # for the storage test


def test_cancel_from_the_notebook_ends_the_pod_on_the_node(lab):
    out = lab.cell(
        "!labfleet-batch submit --group ml --size tiny --name long -- sleep 600",
        JOB_ID,
    )
    job_id = JOB_ID.search(out).group(0)
    name = job_id.split("/")[1]

    def running():
        pods = lab.job_pods(name)
        statuses = pods[0]["status"].get("containerStatuses") if pods else None
        return pods[0] if statuses and "running" in statuses[0]["state"] else None

    pod = wait_for("the long job's container running", running, 120)
    assert pod["spec"]["nodeName"] == node_lib.NODE_NAME
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    assert container_id in node_lib.ctr(lab.state_dir, "tasks", "ls").stdout

    cancelled = time.time()
    out = lab.cell(f"!labfleet-batch cancel {job_id}", re.compile(r"cancel"))
    assert "cancelled" in out, out
    wait_for("the long job's pod gone", lambda: not lab.job_pods(name), 60)
    # on the node: no task, no container left for it in containerd
    wait_for(
        "the container gone from the node's containerd",
        lambda: container_id not in node_lib.ctr(lab.state_dir, "containers", "ls", "-q").stdout,
        60,
    )
    lab.timings["job: cancel -> pod and container gone"] = time.time() - cancelled
    assert container_id not in node_lib.ctr(lab.state_dir, "tasks", "ls").stdout
    status, body = 0, ""
    try:
        status, body = lab.batch_api(f"api/jobs/{job_id}")
    except urllib.error.HTTPError as e:
        status = e.code
    assert status == 404, body  # cancelled Jobs are deleted with their pods


# -- 3. the shared filesystem -------------------------------------------------------------


def test_same_folders_with_owners_and_modes_in_notebook_job_and_node(lab):
    uid = lab.pod["spec"]["securityContext"]["runAsUser"]
    supplemental = lab.pod["spec"]["securityContext"]["supplementalGroups"]
    tree = lab.shared
    expected = {
        "home/alice": (0o700, uid, uid),
        "groups/ml": (0o2770, os.geteuid(), None),
        "public": (0o1777, os.geteuid(), os.getegid()),
        "envs": (0o755, os.geteuid(), os.getegid()),
    }
    on_node = {}
    for rel, (mode, owner, group) in expected.items():
        st = (tree / rel).stat()
        on_node[rel] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        assert on_node[rel][:2] == (mode, owner), (rel, on_node[rel])
        if group is not None:
            assert st.st_gid == group, (rel, on_node[rel])
    ml_gid = on_node["groups/ml"][2]
    assert ml_gid in supplemental  # the folder's group is one the notebook runs with
    # the notebook sees the same folders (same inodes' owners and modes) at its mount points
    token = uuid.uuid4().hex[:8]
    mounts = {
        "/home/jovyan": "home/alice",
        "/shared/groups/ml": "groups/ml",
        "/shared/public": "public",
        "/shared/envs": "envs",
    }
    code = (
        "import os, stat\n"
        "print('\\n'.join(f'STAT {p} {oct(stat.S_IMODE(s.st_mode))} {s.st_uid} {s.st_gid}' "
        f"for p in {list(mounts)!r} for s in [os.stat(p)]))\n"
        f"open('/shared/public/nb-{token}', 'w').write('x')\n"
        f"open('/home/jovyan/nb-{token}', 'w').write('x')\n"
        "print('DONE')"
    )
    out = lab.cell(code, re.compile(r"^DONE$|Error", re.M))
    for path, rel in mounts.items():
        mode, owner, group = on_node[rel]
        assert f"STAT {path} {oct(mode)} {owner} {group}" in out, (path, out)
    # what the notebook writes lands in the node's tree, owned by the user
    for rel in (f"public/nb-{token}", f"home/alice/nb-{token}"):
        st = (tree / rel).stat()
        assert st.st_uid == uid, rel
    # the job saw the same: its home, the group folder, public and envs
    job_out = getattr(lab, "job_stats", None)
    if job_out is None:  # run alone: a job of its own
        job_out = lab.cell(
            "%%batch --group ml --size tiny --name stat --wait --logs\n"
            "stat -c 'stat %n %a %u %g' $HOME /shared/groups/ml /shared/public /shared/envs\n",
            re.compile(r"stat /shared/envs \d+|failed|no logs|batch:"),
            timeout=240,
        )
    for path, rel in (("/home/jovyan", "home/alice"), *[(p, r) for p, r in mounts.items()][1:]):
        mode, owner, group = on_node[rel]
        assert f"stat {path} {mode:o} {owner} {group}" in job_out, (path, job_out)


# -- 4. a terminal in the pod keeps the image's PATH ------------------------------------------


def test_terminal_in_the_pod_finds_labfleet_batch(lab):
    """A JupyterLab terminal is a login shell: without the image's terminal configuration
    (labfleet_spawner.terminal) Debian's /etc/profile drops /opt/labfleet/bin from PATH."""
    page = lab.page
    page.locator(".lm-MenuBar-itemLabel", has_text="File").click()
    page.locator(".lm-Menu-item[data-type='submenu']", has_text="New").first.hover()
    page.locator(".lm-Menu-item[data-command='terminal:create-new']").click()
    terminal = page.locator(".jp-Terminal").last
    terminal.wait_for()
    terminal.click()
    time.sleep(1.0)  # the shell reads its profile before it takes input
    token = uuid.uuid4().hex[:8]
    page.keyboard.type(
        f"{{ command -v labfleet-batch; id -u; labfleet-batch list; echo rc=$?; echo end; }} "
        f"> ~/term-{token}.txt 2>&1\n"
    )
    report = lab.shared / "home" / "alice" / f"term-{token}.txt"
    text = wait_for("the terminal's report", lambda: report.exists() and report.read_text(), 60)
    text = wait_for("the whole report", lambda: "end" in report.read_text() and report.read_text())
    page.screenshot(path=str(lab.tmp / "terminal-real-node.png"))
    lines = text.splitlines()
    assert lines[0] == "/opt/labfleet/bin/labfleet-batch", text
    assert lines[1] == str(lab.pod["spec"]["securityContext"]["runAsUser"]), text
    # and it reaches the batch service with the notebook's token
    assert "rc=0" in lines, text
