"""The kubelet pod-resources client: wire-format reader, errors, and a real gRPC round trip.

The bytes are built by the minimal protobuf encoder below, written from the
encoding spec independently of the production reader, with the field
numbers of k8s.io/kubelet/pkg/apis/podresources/v1/api.proto.
"""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest
from labfleet_accounting.app import GpuExporterApp
from labfleet_accounting.gpu_exporter import NodeOwners, Owner, pod_resources_owners
from labfleet_accounting.pod_resources import (
    KUBELET_SOCKET,
    PodResourcesError,
    decode_list_response,
    list_pod_resources,
)

GPU_0 = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
GPU_1 = "GPU-aaaaaaaa-0000-0000-0000-000000000001"
MIG_1G = "MIG-11111111-0000-0000-0000-000000000000"


# -- an independent minimal encoder -----------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def length(number: int, payload: bytes | str) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return key(number, 2) + varint(len(payload)) + payload


def device(resource: str, *ids: str, topology: bool = True) -> bytes:
    # ContainerDevices: resource_name 1, device_ids 2, topology 3 (TopologyInfo{NUMANode{ID 1}})
    numa = length(1, key(1, 0) + varint(1)) if topology else b""
    return length(1, resource) + b"".join(length(2, i) for i in ids) + length(3, numa)


def container(name: str, *devices: bytes) -> bytes:
    # ContainerResources: name 1, devices 2; cpu_ids 3 (packed int64), memory 4 (unread)
    cpu_ids = length(3, varint(2) + varint(3))
    memory = length(4, length(1, "memory") + key(2, 0) + varint(2**34))
    return length(1, name) + b"".join(length(2, d) for d in devices) + cpu_ids + memory


def pod(name: str, namespace: str, *containers: bytes) -> bytes:
    return length(1, name) + length(2, namespace) + b"".join(length(3, c) for c in containers)


def response(*pods: bytes) -> bytes:
    return b"".join(length(1, p) for p in pods)


def future_fields() -> bytes:
    """Fields of every wire type that no kubelet sends today: must be skipped."""
    return (
        key(20, 0) + varint(300)  # varint
        + key(21, 1) + (7).to_bytes(8, "little")  # fixed64
        + key(22, 5) + (7).to_bytes(4, "little")  # fixed32
        + length(23, length(1, "nested"))  # a message
    )  # fmt: skip


NODE_ANSWER = response(
    pod(
        "jupyter-alice",
        "labfleet",
        container(
            "notebook",
            device("nvidia.com/gpu", GPU_0, GPU_1),
            device("amd.com/xilinx_u55c", "fpga0", topology=False),
        ),
        container("sidecar"),
    ),
    pod("train-0", "labfleet-cms", container("main", device("nvidia.com/mig-1g.10gb", MIG_1G))),
    pod("kube-proxy-x", "kube-system"),
)
EXPECTED = {
    "podResources": [
        {
            "name": "jupyter-alice",
            "namespace": "labfleet",
            "containers": [
                {
                    "name": "notebook",
                    "devices": [
                        {"resourceName": "nvidia.com/gpu", "deviceIds": [GPU_0, GPU_1]},
                        {"resourceName": "amd.com/xilinx_u55c", "deviceIds": ["fpga0"]},
                    ],
                },
                {"name": "sidecar", "devices": []},
            ],
        },
        {
            "name": "train-0",
            "namespace": "labfleet-cms",
            "containers": [
                {
                    "name": "main",
                    "devices": [{"resourceName": "nvidia.com/mig-1g.10gb", "deviceIds": [MIG_1G]}],
                }
            ],
        },
        {"name": "kube-proxy-x", "namespace": "kube-system", "containers": []},
    ]
}
PODS = [
    {
        "metadata": {
            "name": "jupyter-alice",
            "namespace": "labfleet",
            "labels": {"labfleet.io/user": "alice", "labfleet.io/group": "ml"},
        }
    },
    {
        "metadata": {
            "name": "train-0",
            "namespace": "labfleet-cms",
            "labels": {"labfleet.io/user": "bob", "labfleet.io/group": "cms"},
        }
    },
]
ALICE = Owner("alice", "ml", "labfleet/jupyter-alice")
BOB = Owner("bob", "cms", "labfleet-cms/train-0")


# -- the reader ---------------------------------------------------------------------------


def test_decodes_pods_containers_and_devices_skipping_unread_fields():
    assert decode_list_response(NODE_ANSWER) == EXPECTED


def test_unknown_fields_of_every_wire_type_are_skipped_at_every_level():
    extra = future_fields()
    gpu = device("nvidia.com/gpu", GPU_0) + extra
    data = response(pod("p", "ns", container("c", gpu) + extra) + extra) + extra
    assert decode_list_response(data) == {
        "podResources": [
            {
                "name": "p",
                "namespace": "ns",
                "containers": [
                    {
                        "name": "c",
                        "devices": [{"resourceName": "nvidia.com/gpu", "deviceIds": [GPU_0]}],
                    }
                ],
            }
        ]
    }


def test_empty_answers():
    assert decode_list_response(b"") == {"podResources": []}
    # a pod with no fields set: proto3 defaults
    assert decode_list_response(length(1, b"")) == {
        "podResources": [{"name": "", "namespace": "", "containers": []}]
    }


@pytest.mark.parametrize(
    "data",
    [
        length(1, pod("p", "ns"))[:-1],  # truncated payload
        key(1, 2) + b"\xff",  # truncated length varint
        key(1, 3),  # a group (not proto3)
        b"\x00\x00",  # field number 0
    ],
)
def test_malformed_bytes_are_refused(data):
    with pytest.raises(ValueError):
        decode_list_response(data)


# -- errors before and from the call --------------------------------------------------


def test_missing_socket_names_the_path(tmp_path):
    path = tmp_path / "pod-resources" / "kubelet.sock"
    with pytest.raises(PodResourcesError, match=f"socket {path} does not exist"):
        list_pod_resources(str(path))
    assert KUBELET_SOCKET == "/var/lib/kubelet/pod-resources/kubelet.sock"


def test_permission_denied_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "kubelet.sock"
    path.touch()
    # tests run as root, which os.access never refuses: the check's answer is faked
    monkeypatch.setattr("labfleet_accounting.pod_resources.os.access", lambda p, mode: False)
    with pytest.raises(PodResourcesError, match=f"permission denied on .* socket {path}"):
        list_pod_resources(str(path))


def test_nobody_listening_is_kubelet_unavailable(tmp_path):
    path = tmp_path / "kubelet.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # the file exists, nothing accepts: a kubelet restarting
        with pytest.raises(PodResourcesError, match=f"kubelet unavailable on .* socket {path}"):
            list_pod_resources(str(path), timeout=5)


# -- a real gRPC round trip -------------------------------------------------------------


class FakeKubelet:
    """A stand-in for the kubelet: a real ``grpc.server`` on a unix socket serving
    ``/v1.PodResourcesLister/List`` with hand-encoded bytes (the KWOK test nodes
    have no kubelet, so nothing else answers this API in the tests)."""

    def __init__(self, path, answer: bytes):
        self.path, self.answer, self.requests = str(path), answer, []
        handler = grpc.method_handlers_generic_handler(
            "v1.PodResourcesLister",
            {"List": grpc.unary_unary_rpc_method_handler(self.list)},  # raw bytes both ways
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((handler,))
        assert self.server.add_insecure_port(f"unix://{self.path}") != 0

    def list(self, request: bytes, context) -> bytes:
        self.requests.append(request)
        return self.answer

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(None)


def test_round_trip_over_a_real_grpc_server_attributes_gpus_and_mig(tmp_path):
    with FakeKubelet(tmp_path / "kubelet.sock", NODE_ANSWER) as kubelet:
        answer = list_pod_resources(kubelet.path)
    assert kubelet.requests == [b""]  # ListPodResourcesRequest is empty
    assert answer == EXPECTED
    owners = pod_resources_owners(answer, PODS)
    assert owners == {GPU_0: ALICE, GPU_1: ALICE, MIG_1G: BOB}  # no FPGA, no device-less pod


def test_malformed_answer_is_a_clear_error(tmp_path):
    with FakeKubelet(tmp_path / "kubelet.sock", key(1, 2) + varint(50)) as kubelet:
        with pytest.raises(PodResourcesError, match="malformed ListPodResourcesResponse from"):
            list_pod_resources(kubelet.path)


def test_exporter_app_in_kubernetes_mode_reads_the_socket(tmp_path, monkeypatch):
    monkeypatch.setenv("NODE_NAME", "gpu-t4-01")
    listings = []

    def list_pods():
        listings.append(1)
        return PODS

    app = GpuExporterApp(kubernetes=True, pod_resources_socket=str(tmp_path / "kubelet.sock"))
    assert app.node_name == "gpu-t4-01"  # from the downward API's variable
    owners = app.owners(list_pods)
    assert isinstance(owners, NodeOwners)
    with FakeKubelet(app.pod_resources_socket, NODE_ANSWER) as kubelet:
        assert owners() == {GPU_0: ALICE, GPU_1: ALICE, MIG_1G: BOB}
        assert owners()[MIG_1G] == BOB
        # the same pods hold the devices: listed once; one holder leaves: listed again
        assert len(listings) == 1
        kubelet.answer = response(pod("train-0", "labfleet-cms", container("main",
                                      device("nvidia.com/mig-1g.10gb", MIG_1G))))  # fmt: skip
        assert owners() == {MIG_1G: BOB}
        assert len(listings) == 2
    with pytest.raises(PodResourcesError, match="does not exist|unavailable"):
        owners()  # the kubelet gone: the collector turns this into unattributed devices
