"""Pod pieces of a batch Job that must match the user's notebook pod.

Volumes (home, group shared, public, environments), the security context,
the required node affinity of the accelerator and its tolerations. These are
pure functions of plain data. When the Kubernetes spawner's builders
(``labfleet_spawner.objects``, being written) provide the same functions,
these should become imports of them so a Job and a notebook cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from labfleet_hub import contract
from labfleet_spawner.catalogue import Accelerator, Selection

#: Tolerations every accelerator kind needs for the taints of its nodes.
DEFAULT_KIND_TOLERATIONS: dict[str, tuple[dict, ...]] = {
    "gpu": ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    "mig": ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    "fpga": ({"key": "amd.com/fpga", "operator": "Exists", "effect": "NoSchedule"},),
}

OFFLOAD_TOLERATION = {
    "key": contract.VIRTUAL_NODE_TAINT_KEY,
    "operator": "Exists",
    "effect": "NoSchedule",
}


@dataclass(frozen=True)
class PodStorage:
    """Where the shared filesystem is, as seen from a group namespace."""

    # One volume (e.g. a ReadWriteMany PVC on CephFS/NFS present in every group
    # namespace) with the platform's tree: home/<user>, groups/<group>, public, envs.
    volume: dict = field(
        default_factory=lambda: {"persistentVolumeClaim": {"claimName": "labfleet-shared"}}
    )
    home_mount: str = "/home/jovyan"
    groups_mount: str = "/srv/groups"
    public_mount: str = "/srv/public"
    envs_mount: str = "/srv/envs"
    run_as_uid: int = 1000
    run_as_gid: int = 100
    fs_group: int = 100


def storage_volumes(storage: PodStorage, username: str, group: str) -> tuple[list, list]:
    """``(volumes, volumeMounts)``: home, the charged group's folder, public, envs (read-only)."""
    volumes = [{"name": "labfleet-shared", **storage.volume}]
    mounts = [
        {"name": "labfleet-shared", "mountPath": storage.home_mount, "subPath": f"home/{username}"},
        {
            "name": "labfleet-shared",
            "mountPath": f"{storage.groups_mount}/{group}",
            "subPath": f"groups/{group}",
        },
        {"name": "labfleet-shared", "mountPath": storage.public_mount, "subPath": "public"},
        {
            "name": "labfleet-shared",
            "mountPath": storage.envs_mount,
            "subPath": "envs",
            "readOnly": True,
        },
    ]
    return volumes, mounts


def storage_env(storage: PodStorage, group: str) -> dict[str, str]:
    """The same variables the notebook gets (see ``labfleet_spawner.storage``)."""
    return {
        "HOME": storage.home_mount,
        "LABFLEET_HOME": storage.home_mount,
        "LABFLEET_GROUP_DIRS": f"{storage.groups_mount}/{group}",
        "LABFLEET_PUBLIC": storage.public_mount,
        "LABFLEET_ENVS": storage.envs_mount,
    }


def security_context(storage: PodStorage) -> tuple[dict, dict]:
    """``(pod securityContext, container securityContext)``: non-root, no escalation."""
    pod = {
        "runAsNonRoot": True,
        "runAsUser": storage.run_as_uid,
        "runAsGroup": storage.run_as_gid,
        "fsGroup": storage.fs_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
    }
    return pod, container


def node_affinity(accelerator: Accelerator | None, offload: bool = False) -> dict | None:
    """A *required* affinity to the accelerator's nodes (or to interLink virtual nodes).

    Required, not preferred: Kueue only picks a ResourceFlavor whose node
    labels agree with it, and the scheduler cannot land on another model.
    """
    labels: dict[str, str] = {}
    if accelerator is not None:
        labels.update(accelerator.node_labels)
    if offload:
        key, value = contract.VIRTUAL_NODE_LABEL
        labels[key] = value
    if not labels:
        return None
    expressions = [{"key": k, "operator": "In", "values": [v]} for k, v in sorted(labels.items())]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": expressions}]
            }
        }
    }


def tolerations(
    accelerator: Accelerator | None,
    offload: bool = False,
    kind_tolerations: dict[str, tuple[dict, ...]] | None = None,
) -> list[dict]:
    kind_tolerations = DEFAULT_KIND_TOLERATIONS if kind_tolerations is None else kind_tolerations
    out: list[dict] = []
    if accelerator is not None:
        for tol in (*kind_tolerations.get(accelerator.kind, ()), *accelerator.tolerations):
            if tol not in out:
                out.append(dict(tol))
    if offload:
        out.append(dict(OFFLOAD_TOLERATION))
    return out


def resources(selection: Selection) -> dict[str, Any]:
    """Requests = limits for memory and the accelerator; CPU requested, limited alike."""
    cpu = selection.size.cpu
    cpu_q = str(int(cpu)) if float(cpu).is_integer() else f"{int(float(cpu) * 1000)}m"
    requests = {"cpu": cpu_q, "memory": selection.size.memory}
    limits = {"cpu": cpu_q, "memory": selection.size.memory}
    if selection.accelerator is not None and selection.count:
        requests[selection.accelerator.resource] = str(selection.count)
        limits[selection.accelerator.resource] = str(selection.count)
    return {"requests": requests, "limits": limits}


def shm_volume(selection: Selection) -> tuple[list, list]:
    if not selection.size.shm:
        return [], []
    return (
        [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": selection.size.shm}}],
        [{"name": "dshm", "mountPath": "/dev/shm"}],
    )
