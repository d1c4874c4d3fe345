"""The test cluster's real node (tools/cluster/node.py): real containers beside the KWOK fleet.

containerd + kubelet + kube-proxy on the host-only bridge ``lfrn0``; pods reach
it only with the toleration and node selector of ``node.pod_placement()``.
The base image comes from labfleet_hub.images (mmdebstrap + podman), saved and
imported into the node's containerd.  The last test stops the node, checks
that nothing of it is left on the machine, and starts it again.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from k8s_helpers import clusterlib, wait_for

node_lib = clusterlib.node_lib
#: TEST-NET-2 (RFC 5737): never routed anywhere.  (192.0.2.0/24, TEST-NET-1, is
#: this machine's own uplink here, so it is not used.)
OFF_MACHINE = "198.51.100.1"


@pytest.fixture(scope="module")
def base_image(k8s_real_images) -> str:
    """The local Debian base image (labfleet_hub.images), imported into the node."""
    return k8s_real_images("base")


def real_pod(name: str, image: str, command: list[str] | None = None, **spec) -> dict:
    container = {"name": "main", "image": image, "imagePullPolicy": "Never"}
    if command:
        container["command"] = command
    labels = spec.pop("labels", {"app": name})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
            **node_lib.pod_placement(),
            **spec,
        },
    }


def pod(cluster, ns: str, name: str) -> dict:
    return cluster.kubectl_json("get", "pod", name, "-n", ns)


def wait_phase(cluster, ns: str, name: str, phases: tuple[str, ...], timeout: float = 60) -> dict:
    def done():
        p = pod(cluster, ns, name)
        return p if p["status"].get("phase") in phases else None

    return wait_for(f"pod {ns}/{name} in {phases}", done, timeout)


def logs(cluster, ns: str, name: str) -> str:
    return cluster.kubectl("logs", name, "-n", ns).stdout


def run_to_end(cluster, ns: str, manifest: dict, timeout: float = 60) -> tuple[dict, str]:
    cluster.apply(manifest, "-n", ns)
    p = wait_phase(cluster, ns, manifest["metadata"]["name"], ("Succeeded", "Failed"), timeout)
    return p, logs(cluster, ns, manifest["metadata"]["name"])


# -- the node --------------------------------------------------------------------------------


def test_real_node_ready_beside_the_kwok_fleet(k8s_cluster, k8s_real_node):
    nodes = {n["metadata"]["name"]: n for n in k8s_cluster.kubectl_json("get", "nodes")["items"]}
    real = nodes.pop(node_lib.NODE_NAME)
    ready = {c["type"]: c["status"] for c in real["status"]["conditions"]}
    assert ready["Ready"] == "True", real["status"]["conditions"]
    info = real["status"]["nodeInfo"]
    assert info["kubeletVersion"] == clusterlib.versions()["K8S_VERSION"]
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert [a["address"] for a in real["status"]["addresses"] if a["type"] == "InternalIP"] == [
        node_lib.NODE_IP
    ]
    assert node_lib.TAINT in real["spec"]["taints"]
    assert real["metadata"]["labels"][node_lib.NODE_LABEL[0]] == node_lib.NODE_LABEL[1]
    assert "kwok.x-k8s.io/node" not in real["metadata"].get("annotations", {})
    # the fake fleet is all still there and Ready, and is KWOK's
    fleet = {n["metadata"]["name"] for n in clusterlib.load_fleet()}
    assert set(nodes) == fleet
    for n in nodes.values():
        assert n["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        conds = {c["type"]: c["status"] for c in n["status"]["conditions"]}
        assert conds["Ready"] == "True", n["metadata"]["name"]


def test_untolerating_pod_never_lands_on_the_real_node(k8s_cluster, k8s_real_node, k8s_namespace):
    """The taint keeps ordinary (KWOK-bound) pods off the node."""
    spec = real_pod("plain", node_lib.PAUSE_IMAGE)
    for key in ("nodeSelector", "tolerations"):
        spec["spec"].pop(key)
    spec["spec"]["affinity"] = {  # prefer the real node: the taint must still win
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "preference": {
                        "matchExpressions": [
                            {"key": node_lib.NODE_LABEL[0], "operator": "In", "values": ["true"]}
                        ]
                    },
                }
            ]
        }
    }
    k8s_cluster.apply(spec, "-n", k8s_namespace)
    p = wait_for(
        "pod scheduled",
        lambda: (q := pod(k8s_cluster, k8s_namespace, "plain"))["spec"].get("nodeName") and q,
    )
    assert p["spec"]["nodeName"] != node_lib.NODE_NAME


# -- pods ------------------------------------------------------------------------------------


def test_pause_image_command_log_through_the_api(k8s_cluster, k8s_real_node, k8s_namespace):
    """Needs no image build: the node's own pause binary prints its version and exits."""
    p, out = run_to_end(
        k8s_cluster, k8s_namespace, real_pod("pause-v", node_lib.PAUSE_IMAGE, ["/pause", "-v"])
    )
    assert p["status"]["phase"] == "Succeeded"
    assert p["spec"]["nodeName"] == node_lib.NODE_NAME
    assert out.strip() == f"pause.c {clusterlib.versions()['K8S_VERSION']}-labfleet"


def test_base_image_pod_runs_a_command(k8s_cluster, k8s_real_node, k8s_namespace, base_image):
    token = uuid.uuid4().hex
    script = f"echo hello-{token} from $(hostname); cat /etc/debian_version; id -u"
    p, out = run_to_end(
        k8s_cluster, k8s_namespace, real_pod("hello", base_image, ["sh", "-c", script])
    )
    assert p["status"]["phase"] == "Succeeded", p["status"]
    assert p["spec"]["nodeName"] == node_lib.NODE_NAME
    lines = out.splitlines()
    assert lines[0] == f"hello-{token} from hello"
    assert lines[1].startswith("12.")  # bookworm, from the image, not the host's file
    ip = p["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(node_lib.POD_CIDR)


# -- network ---------------------------------------------------------------------------------

SERVER = (
    "import http.server, socket\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = ('served-by ' + socket.gethostname()).encode()\n"
    "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
    "http.server.HTTPServer(('0.0.0.0', 8080), H).serve_forever()\n"
)


@pytest.fixture
def web_service(k8s_cluster, k8s_namespace, base_image) -> str:
    """A pod serving HTTP on 8080 behind Service ``web`` (port 80); its ClusterIP."""
    server = real_pod("web", base_image, ["python3", "-c", SERVER])
    server["spec"]["restartPolicy"] = "Always"
    server["spec"]["containers"][0]["readinessProbe"] = {
        "tcpSocket": {"port": 8080},
        "periodSeconds": 1,
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    k8s_cluster.apply([server, service], "-n", k8s_namespace)

    def ready():
        s = pod(k8s_cluster, k8s_namespace, "web")["status"]
        return any(c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions", []))

    wait_for("web pod Ready", ready, 60)
    ip = k8s_cluster.kubectl_json("get", "service", "web", "-n", k8s_namespace)["spec"]["clusterIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(node_lib.SERVICE_CIDR)
    return ip


def test_service_reaches_a_pod(k8s_cluster, k8s_namespace, web_service):
    # from the machine (kube-proxy's OUTPUT rules, the service route on the bridge) ...
    def get():
        try:
            with urllib.request.urlopen(f"http://{web_service}/", timeout=3) as r:
                return r.read().decode()
        except OSError:  # refused until kube-proxy has the endpoint
            return None

    assert wait_for("service answers", get, 30) == "served-by web"
    # ... and from another pod on the bridge (pod -> service -> pod)
    client = (
        "import os, urllib.request\n"
        "h, p = os.environ['WEB_SERVICE_HOST'], os.environ['WEB_SERVICE_PORT']\n"
        "print(urllib.request.urlopen(f'http://{h}:{p}/', timeout=5).read().decode())\n"
    )
    image = pod(k8s_cluster, k8s_namespace, "web")["spec"]["containers"][0]["image"]
    p, out = run_to_end(
        k8s_cluster, k8s_namespace, real_pod("client", image, ["python3", "-c", client])
    )
    assert p["status"]["phase"] == "Succeeded", out
    assert out.strip() == "served-by web"


def test_pod_cannot_reach_off_the_machine(k8s_cluster, k8s_real_node, k8s_namespace, base_image):
    probe = (
        "import socket\n"
        "print(open('/proc/net/route').read().strip())\n"
        f"s = socket.socket(); s.settimeout(3)\n"
        "try:\n"
        f"    s.connect(('{OFF_MACHINE}', 80)); print('CONNECTED')\n"
        "except OSError as e:\n"
        "    print('ERRNO', e.errno, e.strerror)\n"
    )
    p, out = run_to_end(
        k8s_cluster, k8s_namespace, real_pod("offnet", base_image, ["python3", "-c", probe])
    )
    assert p["status"]["phase"] == "Succeeded", out
    # refused by the pod's own routing table: no packet is ever sent
    assert out.splitlines()[-1] == f"ERRNO {errno.ENETUNREACH} Network is unreachable", out
    routes = [ln.split() for ln in out.splitlines()[1:-1]]
    assert routes and all(r[1] != "00000000" for r in routes), "a default route in the pod"
    # the host side of the rule: forwarding switched on for the bridge alone (the global
    # ip_forward is left as it was: 0 on a clean machine, but podman's netavark turns it
    # on for its own networks), and drops from the bridge to any other interface
    before = json.loads(
        (node_lib.node_dir(k8s_cluster.state_dir) / "sysctl-before.json").read_text()
    )
    assert node_lib._sysctl_read("net/ipv4/ip_forward") == before["net/ipv4/ip_forward"]
    fwd = Path(f"/proc/sys/net/ipv4/conf/{node_lib.BRIDGE}/forwarding").read_text().strip()
    assert fwd == "1"
    rule = "-A FORWARD " + " ".join(node_lib.FORWARD_RULE)
    mangle = subprocess.run(
        ["iptables", "-w", "-t", "mangle", "-S", "FORWARD"], capture_output=True, text=True
    ).stdout.splitlines()
    assert [r for r in mangle if r.startswith("-A ")][0] == rule, mangle
    filt = subprocess.run(["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True)
    assert rule in filt.stdout.splitlines()
    bridge_cfg = json.loads(
        next((node_lib.node_dir(k8s_cluster.state_dir) / "cni" / "net.d").glob("*")).read_text()
    )["plugins"][0]
    assert (bridge_cfg["isGateway"], bridge_cfg["ipMasq"]) == (False, False)


def _mangle_drop_packets() -> int:
    out = subprocess.run(
        ["iptables", "-w", "-t", "mangle", "-L", "FORWARD", "1", "-v", "-x", "-n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def test_bridge_drops_what_a_pod_routes_elsewhere(k8s_cluster, k8s_real_node, k8s_namespace):
    """Even a pod that has a route off the bridge gets nothing through: the drop rule.

    The pod's network namespace gets a route to TEST-NET-2 via the node (from the host,
    with nsenter; pods themselves cannot add routes).  On the host that range goes to
    a sink made for this test: one end of a veth pair whose other end is down, which
    discards whatever it is given (this kernel has no dummy interfaces), so nothing
    could leave the machine even if the rule were missing; the test then checks that
    the rule counted the packets and the sink saw none (not even an ARP request)."""
    k8s_cluster.apply(real_pod("router", node_lib.PAUSE_IMAGE), "-n", k8s_namespace)
    p = wait_phase(k8s_cluster, k8s_namespace, "router", ("Running",))
    cid = p["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    tasks = node_lib.ctr(k8s_cluster.state_dir, "tasks", "ls").stdout.splitlines()
    pid = next(line.split()[1] for line in tasks if line.startswith(cid))
    sink = "lfrnsink0"
    subprocess.run(
        ["ip", "link", "add", sink, "type", "veth", "peer", "name", "lfrnsink1"], check=True
    )

    def sink_tx() -> int:
        stats = Path(f"/sys/class/net/{sink}/statistics")
        return sum(int((stats / f).read_text()) for f in ("tx_packets", "tx_dropped"))

    try:
        subprocess.run(["ip", "link", "set", sink, "up"], check=True)
        subprocess.run(["ip", "route", "add", "198.51.100.0/24", "dev", sink], check=True)
        in_pod = ["nsenter", "-t", pid, "-n"]
        subprocess.run(
            [*in_pod, "ip", "route", "add", "198.51.100.0/24", "via", node_lib.NODE_IP],
            check=True,
        )
        dropped = _mangle_drop_packets()
        sent = sink_tx()
        probe = (
            "import socket\n"
            "s = socket.socket(); s.settimeout(2)\n"
            "try:\n"
            f"    s.connect(('{OFF_MACHINE}', 80)); print('CONNECTED')\n"
            "except OSError as e:\n"
            "    print(type(e).__name__)\n"
        )
        out = subprocess.run(
            [*in_pod, sys.executable, "-c", probe], capture_output=True, text=True, timeout=30
        )
        assert out.stdout.strip() == "TimeoutError", out  # dropped silently, not refused
        assert _mangle_drop_packets() > dropped  # the SYN and its retries hit the rule
        assert sink_tx() == sent
    finally:
        subprocess.run(["ip", "link", "del", sink], check=False)


# -- tear-down (last: it restarts the node) --------------------------------------------------


def test_teardown_leaves_nothing_and_node_restarts(
    k8s_cluster, k8s_real_node, k8s_namespace, base_image
):
    state = k8s_cluster.state_dir
    rn = node_lib.node_dir(state)
    k8s_cluster.apply(real_pod("sleeper", base_image, ["sleep", "600"]), "-n", k8s_namespace)
    wait_phase(k8s_cluster, k8s_namespace, "sleeper", ("Running",))
    # while it runs, every check below has something to find
    before = node_lib.leftovers(state)
    assert {"processes", "mounts", "netns", "bridge", "veths", "iptables", "forward_rule"} <= set(
        before
    ), before
    record = json.loads((state / "pids.json").read_text())
    pids = [record[n]["pid"] for n in ("containerd", "kubelet", "kube-proxy", "real-node-lock")]
    pids += before["processes"]

    clusterlib.stop_real_node(k8s_cluster)
    try:
        assert node_lib.leftovers(state) == {}
        assert not [p for p in pids if clusterlib._proc_alive(p)]
        mounts = Path("/proc/mounts").read_text()
        assert str(rn) not in mounts
        assert not Path("/sys/class/net", node_lib.BRIDGE).exists()
        assert node_lib.kube_chain_names() == []
        for tool in ("iptables-save", "ip6tables-save"):
            dump = subprocess.run([tool], capture_output=True, text=True).stdout
            assert "KUBE-" not in dump and node_lib.BRIDGE not in dump, tool
        saved = json.loads((rn / "sysctl-before.json").read_text())
        now = {k: node_lib._sysctl_read(k) for k in saved}
        assert now == saved
        assert not node_lib.OWNER_FILE.exists()
    finally:
        # later tests (other files) share this cluster: bring the node back
        clusterlib.start_real_node(k8s_cluster, die_with_parent=True)
    p, out = run_to_end(
        k8s_cluster, k8s_namespace, real_pod("again", node_lib.PAUSE_IMAGE, ["/pause", "-v"])
    )
    assert p["status"]["phase"] == "Succeeded" and out.startswith("pause.c")
