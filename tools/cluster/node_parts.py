"""The real node's fixed names and ranges, and its configuration files (pure; no I/O but
``pause_archive`` writing its output).  Loaded by node.py; see its docstring."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import tarfile
from pathlib import Path

NODE_NAME = "labfleet-real-node"
BRIDGE = "lfrn0"
#: The pods' addresses (on the bridge only) and the node's own address on it.
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"
#: The cluster's service range when a real node runs (kube-proxy routes it to the bridge).
SERVICE_CIDR = "10.96.0.0/24"
CNI_NETWORK = "labfleet-real-node"
NODE_LABEL = ("labfleet.io/real-node", "true")
TAINT = {"key": "labfleet.io/real-node", "value": "true", "effect": "NoSchedule"}
PAUSE_IMAGE = "localhost/labfleet/pause:3.10"
CGROUP_ROOT = "/labfleet-real-node"
LOCK_FILE = Path("/run/labfleet-real-node.lock")
OWNER_FILE = Path("/run/labfleet-real-node.owner")
#: Started in this order (after the control plane), stopped in reverse.
COMPONENTS = ["real-node-lock", "containerd", "kubelet", "kube-proxy"]
#: Host settings kubelet or kube-proxy may change; restored at tear-down.
SYSCTLS = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/netfilter/nf_conntrack_max",
]
FORWARD_RULE = ["-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP"]
#: The drop rule sits in filter FORWARD (where kube-proxy later puts its own
#: jumps above it, one of which ACCEPTs service traffic) and in mangle FORWARD,
#: which runs first and which no Kubernetes component writes to.
FORWARD_TABLES = ("mangle", "filter")
CNI_BIN = Path("/usr/lib/cni")
ENV_VAR = "LABFLEET_REAL_NODE"


class NodeError(RuntimeError):
    """The real node could not be started or stopped cleanly."""


def pod_placement() -> dict:
    """What a pod spec needs to run on the real node (merge into ``spec``)."""
    return {
        "nodeSelector": {NODE_LABEL[0]: NODE_LABEL[1]},
        "tolerations": [{"operator": "Equal", **TAINT}],
    }


# --------------------------------------------------------------------------
# configuration files


def containerd_config(rn: Path) -> str:
    sock = rn / "containerd.sock"
    return f"""\
# Private containerd of the labfleet test cluster's real node (tools/cluster/node.py).
version = 2
root = "{rn}/containerd/root"
state = "{rn}/containerd/state"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{sock}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{rn}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # no CAP_SYS_RESOURCE on these VMs: runc cannot set an oom_score_adj below
  # containerd's own, so clamp instead of failing every sandbox
  restrict_oom_score_adj = true
  disable_apparmor = true
  # pod network namespaces under containerd's state dir, found by tear-down
  netns_mounts_under_state_dir = true
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  enable_unprivileged_ports = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{rn}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{rn}/cni/net.d"
    max_conf_num = 1
"""


def cni_config(rn: Path) -> dict:
    net = ipaddress.ip_network(POD_CIDR)
    hosts = list(net.hosts())
    return {
        "cniVersion": "0.4.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                # host-only: the bridge is no gateway to anywhere, nothing is masqueraded
                "isGateway": False,
                "isDefaultGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(rn / "cni" / "ipam"),
                    "ranges": [
                        [
                            {
                                "subnet": POD_CIDR,
                                "rangeStart": str(hosts[9]),
                                "rangeEnd": str(hosts[-5]),
                                "gateway": NODE_IP,
                            }
                        ]
                    ],
                    # the pod subnet is on-link; the only route is to the services
                    "routes": [{"dst": SERVICE_CIDR, "gw": NODE_IP}],
                },
            }
        ],
    }


def kubelet_config(rn: Path, ca: Path, healthz_port: int) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "containerRuntimeEndpoint": f"unix://{rn / 'containerd.sock'}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": CGROUP_ROOT,
        "failSwapOn": False,
        # kubelet >= 1.35 refuses cgroup v1 hosts unless told otherwise
        "failCgroupV1": False,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDomain": "cluster.local",
        # no cluster DNS; and no host resolver either (it is off the machine)
        "resolvConf": "",
        "registerNode": True,
        "registerWithTaints": [TAINT],
        "podLogsDir": str(rn / "pod-logs"),
        "serializeImagePulls": False,
        "maxPods": 50,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
    }


def kube_proxy_config(kubeconfig: Path, healthz: int, metrics: int) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "bindAddress": NODE_IP,
        "healthzBindAddress": f"127.0.0.1:{healthz}",
        "metricsBindAddress": f"127.0.0.1:{metrics}",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        # leave the host's conntrack settings alone
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        # pod -> service -> pod on the same bridge answers through the node
        # (no reliance on br_netfilter); nodePorts never on 127.0.0.1
        "iptables": {"localhostNodePorts": False, "masqueradeAll": True},
    }


def pause_archive(pause: Path, out: Path) -> None:
    """An OCI image archive (one layer: /pause) that ``ctr images import`` reads."""

    def blob(data: bytes) -> tuple[str, bytes]:
        return "sha256:" + hashlib.sha256(data).hexdigest(), data

    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("pause")
        info.size = pause.stat().st_size
        info.mode = 0o755
        with pause.open("rb") as f:
            t.addfile(info, f)
    layer_d, layer = blob(layer_buf.getvalue())
    config_d, config = blob(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
                "rootfs": {"type": "layers", "diff_ids": [layer_d]},
            }
        ).encode()
    )
    manifest_d, manifest = blob(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_d,
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_d,
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
    )
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_d,
                "size": len(manifest),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": PAUSE_IMAGE,
                    "org.opencontainers.image.ref.name": PAUSE_IMAGE.rsplit(":", 1)[1],
                },
            }
        ],
    }
    with tarfile.open(out, "w") as t:
        for name, data in [
            ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
            ("index.json", json.dumps(index).encode()),
            *[
                (f"blobs/sha256/{d.split(':')[1]}", b)
                for d, b in ((layer_d, layer), (config_d, config), (manifest_d, manifest))
            ],
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
