"""Pure builders: from a catalogue selection to the pieces of a notebook pod.

Everything here takes plain data (the :class:`~.catalogue.Selection`, names,
numbers, dicts) and returns plain dicts in Kubernetes' camelCase, like
KubeSpawner's own ``objects.py``; nothing talks to a cluster. The Kubernetes
spawner (:mod:`.kube`) feeds the results to KubeSpawner's traits, so an admin's
``modify_pod_hook`` still sees a normal ``V1Pod``.

Placement rules (see docs/kubernetes.md):

- an accelerator's extended resource is both limit and request, and its
  ``node_labels`` are a *required* node affinity, so a T4 request can never
  land on an A100 even when the A100s are idle;
- the taints every node of that accelerator kind carries are tolerated
  (``nvidia.com/gpu`` for GPUs and MIG, ``amd.com/fpga`` for FPGA boards, plus
  the catalogue entry's own ``tolerations``);
- CPU-only sessions get a required ``NotIn`` on every accelerator node label
  of the catalogue, unless the profile sets ``allow_accelerator_nodes``;
- interactive sessions never go to interLink virtual nodes;
- a node tainted ``reserved=<group>`` is tolerated only for members of that
  group, and preferred for them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from labfleet_hub.contract import (
    ANNOTATION_ACCELERATOR_COUNT,
    ANNOTATION_GROUPS,
    ANNOTATION_USER,
    KIND_INTERACTIVE,
    KUEUE_ADMISSION_GATE,
    KUEUE_MANAGED_LABEL,
    KUEUE_QUEUE_LABEL,
    LABEL_ACCELERATOR,
    LABEL_GROUP,
    LABEL_KIND,
    LABEL_PROFILE,
    LABEL_USER,
    RESERVED_TAINT_KEY,
    VIRTUAL_NODE_LABEL,
    is_valid_group_name,
)

from .catalogue import Catalogue, Selection
from .storage import USERNAME_PATTERN

#: Taints carried by every node of an accelerator kind in a labfleet fleet
#: (the NVIDIA GPU operator's and the AMD/Xilinx device plugin's convention).
DEFAULT_KIND_TOLERATIONS: dict[str, list[dict]] = {
    "gpu": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "mig": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "fpga": [{"key": "amd.com/fpga", "operator": "Exists", "effect": "NoSchedule"}],
}

#: Weight of the preference for a group's reserved nodes (1-100; high, so
#: members use what their group paid for before the common pool).
RESERVED_PREFERENCE_WEIGHT = 80

_USERNAME_RE = re.compile(USERNAME_PATTERN)
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")


class PodSpecError(ValueError):
    """A name cannot be used in a pod (label value, path, volume); says what is allowed."""


# -- names ----------------------------------------------------------------------


def check_username(name: Any) -> str:
    """The user name, if it can be a home directory name and an annotation value."""
    if not isinstance(name, str) or not _USERNAME_RE.match(name) or ".." in name:
        raise PodSpecError(
            f"user name {str(name)[:64]!r} cannot be used for a notebook pod; allowed: "
            "letters, digits and . _ @ + - (not first: . or -), at most 128 characters"
        )
    return name


def check_groups(groups: Iterable[Any]) -> list[str]:
    """Sorted group names, if every one can be a label value and a directory name."""
    checked = []
    for group in groups:
        if not isinstance(group, str) or not is_valid_group_name(group):
            raise PodSpecError(
                f"group name {str(group)[:64]!r} cannot be used for a notebook pod; allowed: "
                "lower-case letters, digits and . _ - (a letter or digit first and last), "
                "at most 63 characters"
            )
        checked.append(group)
    return sorted(set(checked))


def label_value(value: str) -> str:
    """``value`` if it is a valid label value (callers escape user names first)."""
    if not _LABEL_VALUE_RE.match(value):
        raise PodSpecError(f"{value[:64]!r} is not a valid Kubernetes label value")
    return value


# -- the accounting group ---------------------------------------------------------


def accounting_group(
    selection: Selection, groups: Sequence[str], exclude: Iterable[str] = ()
) -> str:
    """The one group a session is accounted to, by a fixed rule the user cannot steer.

    1. Start from the user's groups.
    2. Narrow to those that grant the session: each non-empty ``groups`` list of
       the accelerator, then the profile, then the image, in that order, keeps
       only the candidates in it (a list that would leave none is skipped, which
       happens when the user got the profile through another list).
    3. Drop the ``exclude`` groups (umbrella groups such as ``users`` that
       everybody is in) unless that would leave none.
    4. The first remaining name in alphabetical order.

    A user in no group at all is accounted to ``""`` (the label is then left off).
    """
    candidates = set(groups)
    restricting = (
        selection.accelerator.groups if selection.accelerator else (),
        selection.profile.groups,
        selection.image.groups,
    )
    for allowed in restricting:
        narrowed = candidates.intersection(allowed)
        if allowed and narrowed:
            candidates = narrowed
    preferred = candidates - set(exclude)
    if preferred:
        candidates = preferred
    return min(candidates) if candidates else ""


# -- resources ------------------------------------------------------------------------


def resource_requirements(selection: Selection) -> dict[str, dict[str, str]]:
    """CPU, memory and the accelerator's extended resource, as ``{limits, requests}``.

    Extended resources cannot be overcommitted: Kubernetes requires the request
    to equal the limit, so both are set explicitly (the reference platform set
    only a limit for GPUs and nothing at all for FPGAs).
    """
    size = selection.size
    cpu = f"{size.cpu:g}"
    limits = {"cpu": cpu, "memory": size.memory}
    requests = {"cpu": cpu, "memory": size.memory}
    if selection.accelerator is not None and selection.count > 0:
        limits[selection.accelerator.resource] = str(selection.count)
        requests[selection.accelerator.resource] = str(selection.count)
    return {"limits": limits, "requests": requests}


# -- placement --------------------------------------------------------------------------


def accelerator_label_values(catalogue: Catalogue) -> dict[str, list[str]]:
    """Every node label key used by an accelerator, with the values that mark one."""
    values: dict[str, set[str]] = {}
    for accelerator in catalogue.accelerators.values():
        for key, value in accelerator.node_labels.items():
            values.setdefault(key, set()).add(str(value))
    return {key: sorted(v) for key, v in sorted(values.items())}


def node_selector_term(selection: Selection, catalogue: Catalogue) -> dict:
    """The one required NodeSelectorTerm: all expressions must hold (they are ANDed)."""
    expressions: list[dict] = []
    accelerator = selection.accelerator
    if accelerator is not None:
        for key, value in sorted(accelerator.node_labels.items()):
            expressions.append({"key": key, "operator": "In", "values": [str(value)]})
    elif not selection.profile.allow_accelerator_nodes:
        # NotIn also matches nodes without the label, i.e. every CPU node.
        for key, values in accelerator_label_values(catalogue).items():
            expressions.append({"key": key, "operator": "NotIn", "values": values})
    virtual_key, virtual_value = VIRTUAL_NODE_LABEL
    expressions.append({"key": virtual_key, "operator": "NotIn", "values": [virtual_value]})
    return {"matchExpressions": expressions}


def required_node_terms(selection: Selection, catalogue: Catalogue, extra_terms=()) -> list[dict]:
    """NodeSelectorTerms for ``requiredDuringScheduling``.

    Kubernetes ORs the terms of a node selector, so labfleet's expressions are
    added to *each* admin-configured term rather than appended as a new term
    (which would let a pod satisfy the admin's term alone and skip ours).
    """
    ours = node_selector_term(selection, catalogue)["matchExpressions"]
    if not extra_terms:
        return [{"matchExpressions": ours}]
    terms = []
    for term in extra_terms:
        term = dict(term)
        term["matchExpressions"] = list(term.get("matchExpressions", [])) + ours
        terms.append(term)
    return terms


def tolerations(
    selection: Selection,
    groups: Sequence[str],
    kind_tolerations: Mapping[str, Sequence[dict]] = DEFAULT_KIND_TOLERATIONS,
) -> list[dict]:
    """The taints this session may ignore: its accelerator's and its groups' reserved nodes."""
    result: list[dict] = []
    accelerator = selection.accelerator
    if accelerator is not None:
        result.extend(dict(t) for t in kind_tolerations.get(accelerator.kind, ()))
        result.extend(dict(t) for t in accelerator.tolerations)
    for group in groups:
        result.append(
            {
                "key": RESERVED_TAINT_KEY,
                "operator": "Equal",
                "value": group,
                "effect": "NoSchedule",
            }
        )
    unique = []
    for item in result:
        if item not in unique:
            unique.append(item)
    return unique


def preferred_node_terms(groups: Sequence[str]) -> list[dict]:
    """PreferredSchedulingTerms: members go to their group's reserved nodes first."""
    if not groups:
        return []
    return [
        {
            "weight": RESERVED_PREFERENCE_WEIGHT,
            "preference": {
                "matchExpressions": [
                    {"key": RESERVED_TAINT_KEY, "operator": "In", "values": list(groups)}
                ]
            },
        }
    ]


# -- storage ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageOptions:
    """Where a user's data comes from and where it appears in the pod.

    ``shared_volume`` is a Kubernetes volume source (``{"persistentVolumeClaim":
    {"claimName": ...}}``, ``{"nfs": ...}``, ``{"hostPath": ...}``) of the shared
    filesystem laid out like single-node mode: ``home/<user>``,
    ``groups/<group>``, ``public``, ``envs``. With ``home_mode="pvc"`` the home
    is instead the per-user claim ``home_claim``.
    """

    shared_volume: Mapping[str, Any] | None
    home_mode: str = "shared"  # or "pvc"
    home_claim: str = ""
    home_path: str = "/home/jovyan"
    groups_path: str = "/shared/groups"
    public_path: str = "/shared/public"
    envs_path: str = "/shared/envs"
    shm_default: str = "64Mi"


def storage_env(options: StorageOptions, groups: Sequence[str]) -> dict[str, str]:
    """The same LABFLEET_* variables as single-node mode, with the pod's paths."""
    env = {"LABFLEET_HOME": options.home_path}
    if options.shared_volume is not None:
        env["LABFLEET_GROUP_DIRS"] = ":".join(f"{options.groups_path}/{g}" for g in groups)
        env["LABFLEET_PUBLIC"] = options.public_path
        env["LABFLEET_ENVS"] = options.envs_path
    return env


def volumes_and_mounts(
    options: StorageOptions,
    username: str,
    groups: Sequence[str],
    envs_writable: bool,
    shm: str | None,
) -> tuple[list[dict], list[dict]]:
    """Volumes and the notebook container's mounts.

    One volume for the shared filesystem, mounted several times with a
    ``subPath`` each: the user's home, one read-write mount per group the user
    belongs to (and no other group's), ``public``, and ``envs`` (read-only
    unless ``envs_writable``). ``/dev/shm`` is a memory-backed emptyDir sized by
    ``shm`` (the size's ``shm``), since the container runtime's 64 MiB default
    breaks PyTorch data loaders.
    """
    check_username(username)
    groups = check_groups(groups)
    if options.home_mode not in ("shared", "pvc"):
        raise PodSpecError(f"home storage mode {options.home_mode!r}; allowed: shared, pvc")
    volumes: list[dict] = []
    mounts: list[dict] = []
    if options.shared_volume is not None:
        volumes.append({"name": "shared", **dict(options.shared_volume)})
    if options.home_mode == "pvc":
        if not options.home_claim:
            raise PodSpecError("home storage mode 'pvc' needs a claim name")
        volumes.append({"name": "home", "persistentVolumeClaim": {"claimName": options.home_claim}})
        mounts.append({"name": "home", "mountPath": options.home_path})
    elif options.shared_volume is not None:
        mounts.append(
            {"name": "shared", "mountPath": options.home_path, "subPath": f"home/{username}"}
        )
    else:
        raise PodSpecError("home storage mode 'shared' needs a shared volume")
    if options.shared_volume is not None:
        for group in groups:
            mounts.append(
                {
                    "name": "shared",
                    "mountPath": f"{options.groups_path}/{group}",
                    "subPath": f"groups/{group}",
                }
            )
        mounts.append({"name": "shared", "mountPath": options.public_path, "subPath": "public"})
        mounts.append(
            {
                "name": "shared",
                "mountPath": options.envs_path,
                "subPath": "envs",
                "readOnly": not envs_writable,
            }
        )
    volumes.append(
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm or options.shm_default}}
    )
    mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    return volumes, mounts


# -- security ---------------------------------------------------------------------------


def pod_security_context(uid: int, gid: int, supplemental_gids: Sequence[int]) -> dict:
    """Pod-level identity. No ``fsGroup``: on a shared filesystem it would make the
    kubelet chown every file of the volume to one group."""
    if uid <= 0 or gid <= 0:
        raise PodSpecError(f"notebooks must not run as root (uid {uid}, gid {gid})")
    context = {
        "runAsUser": int(uid),
        "runAsGroup": int(gid),
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if supplemental_gids:
        context["supplementalGroups"] = sorted({int(g) for g in supplemental_gids})
    return context


def container_security_context(uid: int, gid: int) -> dict:
    return {
        "runAsUser": int(uid),
        "runAsGroup": int(gid),
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }


# -- labels ------------------------------------------------------------------------------


def contract_metadata(
    selection: Selection,
    username: str,
    user_label: str,
    groups: Sequence[str],
    group: str,
) -> tuple[dict[str, str], dict[str, str]]:
    """Labels and annotations of the accounting contract (labfleet_hub.contract).

    ``user_label`` is the user name escaped for a label value (KubeSpawner's
    ``safe_slug``); the exact name is in an annotation.
    """
    labels = {
        LABEL_USER: label_value(user_label),
        LABEL_PROFILE: label_value(selection.profile.name),
        LABEL_KIND: KIND_INTERACTIVE,
    }
    if group:
        labels[LABEL_GROUP] = label_value(group)
    annotations = {
        ANNOTATION_USER: check_username(username),
        ANNOTATION_GROUPS: ",".join(groups),
    }
    if selection.accelerator is not None:
        labels[LABEL_ACCELERATOR] = label_value(selection.accelerator.name)
        annotations[ANNOTATION_ACCELERATOR_COUNT] = str(selection.count)
    return labels, annotations


def kueue_labels(queue: str) -> dict[str, str]:
    """Plain-pod Kueue integration: the pod waits behind a scheduling gate until admitted."""
    return {KUEUE_QUEUE_LABEL: label_value(queue), KUEUE_MANAGED_LABEL: "true"}


KUEUE_SCHEDULING_GATES = [{"name": KUEUE_ADMISSION_GATE}]
