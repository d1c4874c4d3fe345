"""Pod pieces of a batch Job: the Kubernetes spawner's own builders, with thin batch adapters.

A Job's pod must look like the user's notebook pod where it matters (same
shared volume and sub-paths, same environment variables, same security
context, same placement rules, same accounting labels), so the pieces come
from :mod:`labfleet_spawner.objects`, the notebook pod's pure builders, and
are not copied here. What stays in this module is only where a batch pod
differs on purpose or ``objects`` has no function for it:

- :class:`PodStorage`: the service's configuration (one shared volume and the
  mount points), turned into ``objects.StorageOptions``;
- the mounts: one group folder (the group charged), not all of the user's
  groups, and ``envs`` always read-only;
- ``HOME`` in the environment (the notebook gets it from its image);
- interLink offload: ``objects`` keeps interactive pods *off* virtual nodes,
  a batch job with ``offload`` goes *only* there;
- :func:`user_label`: ``objects.contract_metadata`` takes an already escaped
  user label; the Kubernetes spawner escapes with KubeSpawner's ``safe_slug``
  (``labfleet_spawner.kube``), so this does exactly the same, or accounting
  would see one user under two label values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubespawner.slugs import is_valid_label, safe_slug
from labfleet_hub import contract
from labfleet_spawner import objects
from labfleet_spawner.catalogue import Catalogue, Selection

#: Tolerations every accelerator kind needs for the taints of its nodes: the spawner's.
DEFAULT_KIND_TOLERATIONS: dict[str, tuple[dict, ...]] = {
    kind: tuple(tols) for kind, tols in objects.DEFAULT_KIND_TOLERATIONS.items()
}

OFFLOAD_TOLERATION = {
    "key": contract.VIRTUAL_NODE_TAINT_KEY,
    "operator": "Exists",
    "effect": "NoSchedule",
}

PodSpecError = objects.PodSpecError


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
    # a supplementary group of the job's process (not fsGroup: on a shared
    # filesystem the kubelet would chown the whole volume, see objects)
    fs_group: int = 100

    def options(self) -> objects.StorageOptions:
        return objects.StorageOptions(
            shared_volume=self.volume,
            home_path=self.home_mount,
            groups_path=self.groups_mount,
            public_path=self.public_mount,
            envs_path=self.envs_mount,
        )


def user_label(username: str) -> str:
    """The user's label value, escaped exactly as the Kubernetes spawner escapes it."""
    return safe_slug(username, is_valid=is_valid_label)


def storage_volumes(
    storage: PodStorage, username: str, group: str, shm: str | None = None
) -> tuple[list, list]:
    """``(volumes, volumeMounts)``: home, the charged group's folder, public, envs (read-only),
    ``/dev/shm`` -- the notebook's builder, with one group."""
    return objects.volumes_and_mounts(
        storage.options(), username, [group], envs_writable=False, shm=shm
    )


def storage_env(storage: PodStorage, group: str) -> dict[str, str]:
    """The notebook's LABFLEET_* variables, plus HOME (a Job's image may not set it)."""
    return {"HOME": storage.home_mount, **objects.storage_env(storage.options(), [group])}


def security_context(storage: PodStorage) -> tuple[dict, dict]:
    """``(pod securityContext, container securityContext)``: the notebook's, non-root."""
    supplemental = [storage.fs_group] if storage.fs_group else []
    return (
        objects.pod_security_context(storage.run_as_uid, storage.run_as_gid, supplemental),
        objects.container_security_context(storage.run_as_uid, storage.run_as_gid),
    )


_NO_CATALOGUE = Catalogue(images={}, sizes={}, accelerators={}, profiles={})


def node_affinity(
    selection: Selection, catalogue: Catalogue | None = None, offload: bool = False
) -> dict:
    """A *required* node affinity, as for notebooks (or to interLink virtual nodes).

    Required, not preferred: Kueue only picks a ResourceFlavor whose node
    labels agree with it, and the scheduler cannot land on another model.
    Without ``catalogue`` a CPU job is not kept off accelerator nodes.
    """
    if offload:
        key, value = contract.VIRTUAL_NODE_LABEL
        expressions = [{"key": key, "operator": "In", "values": [value]}]
        if selection.accelerator is not None:
            expressions += [
                {"key": k, "operator": "In", "values": [str(v)]}
                for k, v in sorted(selection.accelerator.node_labels.items())
            ]
        terms = [{"matchExpressions": expressions}]
    else:
        terms = objects.required_node_terms(selection, catalogue or _NO_CATALOGUE)
    required = {"nodeSelectorTerms": terms}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}


def tolerations(
    selection: Selection,
    group: str,
    offload: bool = False,
    kind_tolerations: Mapping[str, Sequence[dict]] | None = None,
) -> list[dict]:
    """The notebook's tolerations (accelerator kind, catalogue, the group's reserved nodes)."""
    kinds = DEFAULT_KIND_TOLERATIONS if kind_tolerations is None else kind_tolerations
    out = objects.tolerations(selection, [group], kinds)
    if offload:
        out.insert(0, dict(OFFLOAD_TOLERATION))
    return out


def resources(selection: Selection) -> dict[str, Any]:
    """CPU, memory and the accelerator's extended resource: the notebook's requirements."""
    return objects.resource_requirements(selection)
