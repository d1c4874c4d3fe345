"""Pod pieces of a batch Job: the Kubernetes spawner's own builders, with thin batch adapters.

A Job's pod must look like the user's notebook pod where it matters (same
shared volume and sub-paths, same environment variables, same security
context, same placement rules, same accounting labels), so the pieces come
from :mod:`labfleet_spawner.objects`, the notebook pod's pure builders, and
are not copied here. What stays in this module is only where a batch pod
differs on purpose or ``objects`` has no function for it:

- :class:`PodStorage`: the service's configuration (one shared volume and the
  mount points), turned into ``objects.StorageOptions``;
- :class:`PosixIds`: the notebook's uid/gids for a Job, from the hub's ids;
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
from labfleet_spawner.storage import check_id_ranges, mapped_gid, mapped_uid

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
    # the notebook's mount points (objects.StorageOptions), so paths in a
    # notebook's code mean the same in its Jobs
    home_mount: str = objects.StorageOptions.home_path
    groups_mount: str = objects.StorageOptions.groups_path
    public_mount: str = objects.StorageOptions.public_path
    envs_mount: str = objects.StorageOptions.envs_path
    # Used only when the hub's ids are not looked up (see PosixIds): then every
    # Job runs as this one non-root identity.
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


@dataclass(frozen=True)
class PosixIds:
    """The ids a user's notebook runs with: uid, private gid, the group's gid."""

    uid: int
    gid: int
    supplemental: tuple[int, ...] = ()


def posix_ids(
    user_id: int, group_ids: Mapping[str, int], group: str, uid_base: int, gid_base: int
) -> PosixIds:
    """The notebook's ids (see labfleet_hub.posix_ids) for a Job charged to ``group``.

    Only the charged group's gid is added: a Job reaches that group's folder,
    not every folder its owner could open from a notebook.
    """
    check_id_ranges(uid_base, gid_base, user_id, group_ids.values())
    uid = mapped_uid(user_id, uid_base)
    gids = (mapped_gid(group_ids[group], gid_base),) if group in group_ids else ()
    return PosixIds(uid, uid, gids)


def security_context(storage: PodStorage, ids: PosixIds | None = None) -> tuple[dict, dict]:
    """``(pod securityContext, container securityContext)``: the notebook's, non-root.

    With ``ids`` the Job runs exactly as its owner's notebook; without, as the
    storage's configured identity.
    """
    if ids is None:
        supplemental = [storage.fs_group] if storage.fs_group else []
        ids = PosixIds(storage.run_as_uid, storage.run_as_gid, tuple(supplemental))
    return (
        objects.pod_security_context(ids.uid, ids.gid, list(ids.supplemental)),
        objects.container_security_context(ids.uid, ids.gid),
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
