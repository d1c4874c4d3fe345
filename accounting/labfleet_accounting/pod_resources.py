"""The kubelet's pod-resources API: which device ids each pod on this node holds.

The kubelet serves ``v1.PodResourcesLister`` over gRPC on a unix socket
(``/var/lib/kubelet/pod-resources/kubelet.sock``). Only ``List`` is called.
Its messages (k8s.io/kubelet/pkg/apis/podresources/v1/api.proto) are decoded
by the small protobuf wire-format reader below instead of generated code: the
exporter reads four string fields in three nested messages, which does not
justify protoc output or a protobuf runtime. Fields it does not read (CPU ids,
memory, topology, DRA resources, anything a newer kubelet adds) are skipped
by their wire type.

``grpc`` is imported when the socket is first called: only the GPU exporter
needs it, not the accounting service or the tests that never touch a socket.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

KUBELET_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
LIST_METHOD = "/v1.PodResourcesLister/List"
#: The kubelet's own limit for this API (podresources.DefaultMaxMsgSize); grpc's 4 MiB
#: default would refuse the answer of a node with many pods and devices.
MAX_MESSAGE = 16 * 1024 * 1024

# wire types (https://protobuf.dev/programming-guides/encoding/)
VARINT, I64, LEN, I32 = 0, 1, 2, 5


class PodResourcesError(RuntimeError):
    """The pod-resources API could not be read; the message names the socket."""


# -- protobuf wire format -------------------------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise ValueError("varint longer than 10 bytes")


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` of one message; LEN values as bytes.

    Fixed-width values are returned as their raw bytes (nothing here reads
    them). Groups (wire types 3 and 4) are not proto3 and are refused.
    """
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == VARINT:
            value, pos = _varint(data, pos)
        elif wire in (I64, I32):
            size = 8 if wire == I64 else 4
            value, pos = data[pos : pos + size], pos + size
        elif wire == LEN:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire} (field {number})")
        if pos > len(data):
            raise ValueError(f"truncated field {number}")
        yield number, wire, value


def _messages(data: bytes, number: int) -> Iterator[bytes]:
    for n, wire, value in fields(data):
        if n == number and wire == LEN:
            yield value


def _strings(data: bytes, number: int) -> list[str]:
    return [v.decode("utf-8", errors="replace") for v in _messages(data, number)]


def _string(data: bytes, number: int) -> str:
    values = _strings(data, number)
    return values[-1] if values else ""  # protobuf: the last occurrence wins


def decode_list_response(data: bytes) -> dict:
    """``ListPodResourcesResponse`` bytes -> its JSON form (only the fields used).

    ``{"podResources": [{"name", "namespace", "containers": [{"name",
    "devices": [{"resourceName", "deviceIds"}]}]}]}``, the shape
    :func:`labfleet_accounting.gpu_exporter.pod_resources_owners` reads.
    Raises ValueError on malformed bytes.
    """
    pods = []
    for pod in _messages(data, 1):  # repeated PodResources pod_resources = 1
        containers = []
        for container in _messages(pod, 3):  # repeated ContainerResources containers = 3
            devices = [
                # ContainerDevices: string resource_name = 1; repeated string device_ids = 2
                {"resourceName": _string(device, 1), "deviceIds": _strings(device, 2)}
                for device in _messages(container, 2)  # repeated ContainerDevices devices = 2
            ]
            containers.append({"name": _string(container, 1), "devices": devices})
        # PodResources: string name = 1; string namespace = 2
        pods.append(
            {"name": _string(pod, 1), "namespace": _string(pod, 2), "containers": containers}
        )
    return {"podResources": pods}


# -- the gRPC call ----------------------------------------------------------------------


def _check_socket(path: str) -> None:
    """Fail early with a clear message: grpc would only report 'unavailable' and retry."""
    if not os.path.exists(path):
        raise PodResourcesError(
            f"kubelet pod-resources socket {path} does not exist: mount the host's "
            f"{os.path.dirname(path)} into the exporter (is this a kubelet node?)"
        )
    # connect() on a unix socket needs write permission on the socket file
    if not os.access(path, os.R_OK | os.W_OK):
        raise PodResourcesError(
            f"permission denied on kubelet pod-resources socket {path}: it belongs to "
            "root, so the exporter must run as uid 0 (see accounting/manifests/gpu-exporter.yaml)"
        )


def list_pod_resources(socket_path: str = KUBELET_SOCKET, timeout: float = 10.0) -> dict:
    """Call ``List`` on the kubelet's socket; the answer as :func:`decode_list_response`."""
    _check_socket(socket_path)
    import grpc

    target = "unix://" + os.path.abspath(socket_path)
    options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
    try:
        with grpc.insecure_channel(target, options=options) as channel:
            # Raw bytes out of grpc, decoded here: a decoding error in a response
            # deserializer would surface as an opaque INTERNAL status.
            call = channel.unary_unary(
                LIST_METHOD,
                request_serializer=lambda _request: b"",  # ListPodResourcesRequest is empty
                response_deserializer=None,
            )
            raw = call(None, timeout=timeout)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        if code == grpc.StatusCode.UNAVAILABLE:
            raise PodResourcesError(
                f"kubelet unavailable on pod-resources socket {socket_path}: {details}"
            ) from None
        name = code.name if code is not None else "error"
        raise PodResourcesError(
            f"{LIST_METHOD} on {socket_path} failed: {name}: {details}"
        ) from None
    try:
        return decode_list_response(raw)
    except ValueError as e:
        raise PodResourcesError(
            f"malformed ListPodResourcesResponse from {socket_path}: {e}"
        ) from None
