"""Per-group batch queues from configuration: the Kueue objects, and keeping them in sync.

One configuration (plain data, usually YAML) describes every group's quota::

    name_prefix: labfleet-          # cluster-scoped objects: flavors, ClusterQueues, ...
    namespace_prefix: labfleet-     # group namespaces (contract.group_namespace)
    cohort: labfleet                # groups lend idle quota to each other
    priorities: {low: 100, normal: 1000, high: 10000}
    default_priority: normal
    offload: {enabled: true, cpu: 1000, memory: 4Ti}
    groups:
      ml:
        cpu: 64
        memory: 256Gi
        accelerators: {a100: 4, t4: 2}
        borrowing_limit: {nvidia.com/gpu: 2}   # optional, per resource
        max_running: 8                          # local backend: jobs at once
        admins: [carol]                         # group admins besides <group>-admins
    network: {dns: false, egress: []}           # batch NetworkPolicies (labfleet_batch.netpol)
    cpu_placement:                              # optional: where CPU-only jobs go
      node_selector: {node-pool: cpu-batch}
      tolerations: [{key: dedicated, operator: Equal, value: batch, effect: NoSchedule}]

The Kubernetes backend turns it into: per group a Namespace (labelled with the
group) and a LocalQueue, a ClusterQueue selecting only that namespace, in the
cohort; one ResourceFlavor per catalogue accelerator (its ``node_labels`` and
tolerations) plus a default CPU flavor; WorkloadPriorityClasses; optionally an
interLink offload ClusterQueue and per-group offload LocalQueues; and per group
namespace the NetworkPolicies of :mod:`.netpol` (deny everything, then allow
what ``network`` says). ``cpu_placement`` adds a node selector and tolerations
to the pods of CPU-only jobs (no accelerator, not offloaded), e.g. to send them
to a tainted CPU pool; it is applied to the Job, not to the default flavor,
because the default flavor also holds the CPU of GPU jobs. The local backend
reads the same quotas as concurrency limits.

:func:`sync_queues` applies all of it with server-side apply: re-running it
changes only what changed and never deletes (removing a group from the
configuration leaves its objects for an admin to drain and delete).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from labfleet_hub import contract
from labfleet_spawner.catalogue import Accelerator, Catalogue, parse_quantity

from .netpol import NetworkConfig, NetworkConfigError, batch_network_policies, parse_network
from .podspec import DEFAULT_KIND_TOLERATIONS, OFFLOAD_TOLERATION

KUEUE_API = "kueue.x-k8s.io/v1beta2"
DEFAULT_PRIORITIES = {"low": 100, "normal": 1000, "high": 10000}


class QueueConfigError(ValueError):
    """The queue configuration is invalid; the message names the group and field."""


@dataclass(frozen=True)
class GroupQuota:
    name: str
    cpu: float = 0
    memory: str = "0"
    accelerators: dict[str, int] = field(default_factory=dict)
    borrowing_limit: dict[str, Any] = field(default_factory=dict)
    lending_limit: dict[str, Any] = field(default_factory=dict)
    max_running: int = 0  # 0: no limit besides the quota
    admins: tuple[str, ...] = ()

    def __hash__(self):
        return hash(self.name)


@dataclass(frozen=True)
class QueueConfig:
    groups: dict[str, GroupQuota]
    name_prefix: str = "labfleet-"
    namespace_prefix: str = "labfleet-"
    cohort: str = "labfleet"
    priorities: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PRIORITIES))
    default_priority: str = "normal"
    preemption: dict[str, Any] = field(
        default_factory=lambda: {
            "withinClusterQueue": "LowerPriority",
            "reclaimWithinCohort": "Any",
        }
    )
    offload_enabled: bool = False
    offload_cpu: float = 1000
    offload_memory: str = "4Ti"
    kind_tolerations: dict[str, tuple[dict, ...]] = field(
        default_factory=lambda: dict(DEFAULT_KIND_TOLERATIONS)
    )
    network: NetworkConfig = field(default_factory=NetworkConfig)
    # CPU-only, not offloaded jobs: merged into the pod's nodeSelector and tolerations
    cpu_node_selector: dict[str, str] = field(default_factory=dict)
    cpu_tolerations: tuple[dict, ...] = ()

    # -- names ---------------------------------------------------------------

    def namespace(self, group: str) -> str:
        return contract.group_namespace(group, prefix=self.namespace_prefix)

    def local_queue(self, group: str) -> str:
        return contract.group_local_queue(group)

    def offload_local_queue(self, group: str) -> str:
        return f"{group}-offload"

    def cluster_queue(self, group: str) -> str:
        return f"{self.name_prefix}{group}"

    def offload_cluster_queue(self) -> str:
        return f"{self.name_prefix}offload"

    def flavor(self, accelerator: str) -> str:
        return f"{self.name_prefix}{accelerator}"

    def default_flavor(self) -> str:
        return f"{self.name_prefix}default"

    def offload_flavor(self) -> str:
        return f"{self.name_prefix}interlink"

    def priority_class(self, priority: str) -> str:
        return f"{self.name_prefix}{priority}"

    def covered_accelerators(self) -> dict[str, list[str]]:
        """``{group: [accelerator names its quota covers]}`` for request validation."""
        return {name: sorted(g.accelerators) for name, g in self.groups.items()}

    def group_admins(self, group: str) -> tuple[str, ...]:
        quota = self.groups.get(group)
        return quota.admins if quota else ()


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise QueueConfigError(f"{where}: must be a number >= 0, not {value!r}")
    return value


def parse_queue_config(data: Any, catalogue: Catalogue, source: str = "<queues>") -> QueueConfig:
    """Validate plain data against the catalogue; errors name the group and field."""
    if not isinstance(data, dict):
        raise QueueConfigError(f"{source}: must be a mapping with a 'groups' entry")
    known = {
        "groups",
        "name_prefix",
        "namespace_prefix",
        "cohort",
        "priorities",
        "default_priority",
        "preemption",
        "offload",
        "kind_tolerations",
        "network",
        "cpu_placement",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise QueueConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
    groups = {}
    raw_groups = data.get("groups") or {}
    if not isinstance(raw_groups, dict):
        raise QueueConfigError(f"{source}: groups must be a mapping {{group: quota}}")
    for name, raw in raw_groups.items():
        where = f"{source}: groups.{name}"
        if not contract.is_valid_group_name(str(name)):
            raise QueueConfigError(
                f"{where}: not a valid group name ({contract.GROUP_NAME_PATTERN})"
            )
        raw = raw or {}
        extra = sorted(
            set(raw)
            - {
                "cpu",
                "memory",
                "accelerators",
                "borrowing_limit",
                "lending_limit",
                "max_running",
                "admins",
            }
        )
        if extra:
            raise QueueConfigError(f"{where}: unknown field(s) {', '.join(extra)}")
        try:
            parse_quantity(str(raw.get("memory", "0")))
        except ValueError as e:
            raise QueueConfigError(f"{where}.memory: {e}") from None
        accelerators = dict(raw.get("accelerators") or {})
        for acc, count in accelerators.items():
            if acc not in catalogue.accelerators:
                raise QueueConfigError(
                    f"{where}.accelerators: {acc!r} is not in the catalogue; "
                    f"defined: {', '.join(catalogue.accelerators) or '(none)'}"
                )
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise QueueConfigError(f"{where}.accelerators.{acc}: must be a whole number >= 0")
        groups[name] = GroupQuota(
            name=name,
            cpu=_number(raw.get("cpu", 0), f"{where}.cpu"),
            memory=str(raw.get("memory", "0")),
            accelerators=accelerators,
            borrowing_limit=dict(raw.get("borrowing_limit") or {}),
            lending_limit=dict(raw.get("lending_limit") or {}),
            max_running=int(_number(raw.get("max_running", 0), f"{where}.max_running")),
            admins=tuple(raw.get("admins") or ()),
        )
    priorities = dict(data.get("priorities") or DEFAULT_PRIORITIES)
    default_priority = data.get("default_priority", "normal")
    if default_priority not in priorities:
        raise QueueConfigError(
            f"{source}: default_priority {default_priority!r} is not one of {', '.join(priorities)}"
        )
    offload = data.get("offload") or {}
    kwargs: dict[str, Any] = {}
    for key in ("name_prefix", "namespace_prefix", "cohort", "preemption"):
        if key in data:
            kwargs[key] = data[key]
    if "kind_tolerations" in data:
        kwargs["kind_tolerations"] = {
            k: tuple(v) for k, v in (data["kind_tolerations"] or {}).items()
        }
    if data.get("cpu_placement") is not None:
        selector, tolerations = parse_placement(data["cpu_placement"], f"{source}: cpu_placement")
        kwargs["cpu_node_selector"], kwargs["cpu_tolerations"] = selector, tolerations
    try:
        kwargs["network"] = parse_network(data.get("network"), f"{source}: network")
    except NetworkConfigError as e:
        raise QueueConfigError(str(e)) from None
    return QueueConfig(
        groups=groups,
        priorities=priorities,
        default_priority=default_priority,
        offload_enabled=bool(offload.get("enabled", False)),
        offload_cpu=offload.get("cpu", 1000),
        offload_memory=str(offload.get("memory", "4Ti")),
        **kwargs,
    )


_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
TOLERATION_FIELDS = ("key", "operator", "value", "effect", "tolerationSeconds")
TOLERATION_OPERATORS = ("Equal", "Exists")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def _label_key(key: Any) -> bool:
    if not isinstance(key, str) or not key:
        return False
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return bool(name) and len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _toleration(raw: Any, where: str) -> dict:
    if not isinstance(raw, dict):
        raise QueueConfigError(f"{where}: must be a mapping with {', '.join(TOLERATION_FIELDS)}")
    extra = sorted(set(raw) - set(TOLERATION_FIELDS))
    if extra:
        raise QueueConfigError(
            f"{where}: unknown field(s) {', '.join(extra)}; allowed: {', '.join(TOLERATION_FIELDS)}"
        )
    operator = raw.get("operator", "Equal")
    if operator not in TOLERATION_OPERATORS:
        raise QueueConfigError(
            f"{where}.operator: {operator!r} is not one of {', '.join(TOLERATION_OPERATORS)}"
        )
    key = raw.get("key", "")
    if key and not _label_key(key):
        raise QueueConfigError(f"{where}.key: {key!r} is not a valid taint key")
    if not key and operator != "Exists":
        raise QueueConfigError(f"{where}: a toleration without a key needs operator Exists")
    value = raw.get("value", "")
    if operator == "Exists" and value:
        raise QueueConfigError(f"{where}.value: operator Exists takes no value")
    if not isinstance(value, str) or not _LABEL_NAME.match(value):
        raise QueueConfigError(f"{where}.value: {value!r} is not a valid taint value")
    effect = raw.get("effect", "")
    if effect and effect not in TOLERATION_EFFECTS:
        raise QueueConfigError(
            f"{where}.effect: {effect!r} is not one of {', '.join(TOLERATION_EFFECTS)} "
            "(or empty: every effect)"
        )
    seconds = raw.get("tolerationSeconds")
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, int) or effect != "NoExecute"
    ):
        raise QueueConfigError(
            f"{where}.tolerationSeconds: a whole number, and only with effect NoExecute"
        )
    out = {"key": key, "operator": operator} if key else {"operator": operator}
    if value:
        out["value"] = value
    if effect:
        out["effect"] = effect
    if seconds is not None:
        out["tolerationSeconds"] = seconds
    return out


def parse_placement(raw: Any, where: str) -> tuple[dict[str, str], tuple[dict, ...]]:
    """``{node_selector: {label: value}, tolerations: [...]}`` -> ``(selector, tolerations)``.

    Errors name the field and what is allowed: label keys and values as
    Kubernetes accepts them, tolerations with only the fields, operators and
    effects of a pod's ``tolerations``.
    """
    if not isinstance(raw, dict):
        raise QueueConfigError(f"{where}: must be a mapping with node_selector and/or tolerations")
    extra = sorted(set(raw) - {"node_selector", "tolerations"})
    if extra:
        raise QueueConfigError(
            f"{where}: unknown field(s) {', '.join(extra)}; allowed: node_selector, tolerations"
        )
    selector = raw.get("node_selector") or {}
    if not isinstance(selector, dict):
        raise QueueConfigError(f"{where}.node_selector: must be a mapping {{label: value}}")
    for key, value in selector.items():
        if not _label_key(key):
            raise QueueConfigError(f"{where}.node_selector: {key!r} is not a valid label key")
        if not isinstance(value, str) or not _LABEL_NAME.match(value):
            raise QueueConfigError(
                f"{where}.node_selector.{key}: {value!r} is not a valid label value "
                "(a string of at most 63 letters, digits, '-', '_', '.'; quote true/false)"
            )
    tolerations = raw.get("tolerations") or []
    if not isinstance(tolerations, list):
        raise QueueConfigError(f"{where}.tolerations: must be a list")
    parsed = tuple(_toleration(t, f"{where}.tolerations[{i}]") for i, t in enumerate(tolerations))
    return dict(selector), parsed


# -- builders (pure) ---------------------------------------------------------------


def _quota(name: str, nominal: Any, group: GroupQuota) -> dict:
    entry: dict[str, Any] = {"name": name, "nominalQuota": nominal}
    if name in group.borrowing_limit:
        entry["borrowingLimit"] = group.borrowing_limit[name]
    if name in group.lending_limit:
        entry["lendingLimit"] = group.lending_limit[name]
    return entry


def _cpu(value: float) -> Any:
    return int(value) if float(value).is_integer() else str(value)


def namespace_object(config: QueueConfig, group: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": config.namespace(group),
            "labels": {contract.LABEL_GROUP: group, contract.LABEL_KIND: contract.KIND_BATCH},
        },
    }


def flavor_objects(config: QueueConfig, catalogue: Catalogue) -> list[dict]:
    used = sorted({a for g in config.groups.values() for a in g.accelerators})
    flavors = [
        {
            "apiVersion": KUEUE_API,
            "kind": "ResourceFlavor",
            "metadata": {"name": config.default_flavor()},
            "spec": {},
        }
    ]
    for name in used:
        acc: Accelerator = catalogue.accelerators[name]
        tolerations = []
        for tol in (*config.kind_tolerations.get(acc.kind, ()), *acc.tolerations):
            if tol not in tolerations:
                tolerations.append(dict(tol))
        spec: dict[str, Any] = {"nodeLabels": dict(acc.node_labels)}
        if tolerations:
            spec["tolerations"] = tolerations
        flavors.append(
            {
                "apiVersion": KUEUE_API,
                "kind": "ResourceFlavor",
                "metadata": {"name": config.flavor(name)},
                "spec": spec,
            }
        )
    if config.offload_enabled:
        key, value = contract.VIRTUAL_NODE_LABEL
        flavors.append(
            {
                "apiVersion": KUEUE_API,
                "kind": "ResourceFlavor",
                "metadata": {"name": config.offload_flavor()},
                "spec": {"nodeLabels": {key: value}, "tolerations": [dict(OFFLOAD_TOLERATION)]},
            }
        )
    return flavors


def cluster_queue_object(config: QueueConfig, catalogue: Catalogue, group: GroupQuota) -> dict:
    """The group's ClusterQueue: only its namespace, its quotas, in the cohort."""
    resource_groups = [
        {
            "coveredResources": ["cpu", "memory"],
            "flavors": [
                {
                    "name": config.default_flavor(),
                    "resources": [
                        _quota("cpu", _cpu(group.cpu), group),
                        _quota("memory", group.memory, group),
                    ],
                }
            ],
        }
    ]
    # Kueue: one resource belongs to one resource group; several GPU models
    # sharing nvidia.com/gpu are flavors of the same group, tried in order.
    by_resource: dict[str, list[str]] = {}
    for name in sorted(group.accelerators):
        by_resource.setdefault(catalogue.accelerators[name].resource, []).append(name)
    for resource, names in sorted(by_resource.items()):
        resource_groups.append(
            {
                "coveredResources": [resource],
                "flavors": [
                    {
                        "name": config.flavor(n),
                        "resources": [_quota(resource, group.accelerators[n], group)],
                    }
                    for n in names
                ],
            }
        )
    spec: dict[str, Any] = {
        "namespaceSelector": {"matchLabels": {contract.LABEL_GROUP: group.name}},
        "resourceGroups": resource_groups,
        "queueingStrategy": "BestEffortFIFO",
        "preemption": dict(config.preemption),
    }
    if config.cohort:
        spec["cohortName"] = config.cohort
    return {
        "apiVersion": KUEUE_API,
        "kind": "ClusterQueue",
        "metadata": {
            "name": config.cluster_queue(group.name),
            "labels": {contract.LABEL_GROUP: group.name},
        },
        "spec": spec,
    }


def offload_cluster_queue_object(config: QueueConfig) -> dict:
    # Outside the cohort: local queues must never borrow remote capacity by accident.
    return {
        "apiVersion": KUEUE_API,
        "kind": "ClusterQueue",
        "metadata": {"name": config.offload_cluster_queue()},
        "spec": {
            "namespaceSelector": {
                "matchExpressions": [{"key": contract.LABEL_GROUP, "operator": "Exists"}]
            },
            "resourceGroups": [
                {
                    "coveredResources": ["cpu", "memory"],
                    "flavors": [
                        {
                            "name": config.offload_flavor(),
                            "resources": [
                                {"name": "cpu", "nominalQuota": _cpu(config.offload_cpu)},
                                {"name": "memory", "nominalQuota": config.offload_memory},
                            ],
                        }
                    ],
                }
            ],
        },
    }


def local_queue_objects(config: QueueConfig, group: str) -> list[dict]:
    queues = [
        {
            "apiVersion": KUEUE_API,
            "kind": "LocalQueue",
            "metadata": {"name": config.local_queue(group), "namespace": config.namespace(group)},
            "spec": {"clusterQueue": config.cluster_queue(group)},
        }
    ]
    if config.offload_enabled:
        queues.append(
            {
                "apiVersion": KUEUE_API,
                "kind": "LocalQueue",
                "metadata": {
                    "name": config.offload_local_queue(group),
                    "namespace": config.namespace(group),
                },
                "spec": {"clusterQueue": config.offload_cluster_queue()},
            }
        )
    return queues


def priority_class_objects(config: QueueConfig) -> list[dict]:
    return [
        {
            "apiVersion": KUEUE_API,
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": config.priority_class(name)},
            "value": value,
            "description": f"labfleet batch priority {name!r}",
        }
        for name, value in config.priorities.items()
    ]


def queue_objects(config: QueueConfig, catalogue: Catalogue) -> list[dict]:
    """Everything, in the order it must be applied (namespaces and flavors first)."""
    objects: list[dict] = [namespace_object(config, g) for g in config.groups]
    for group in config.groups:
        objects += batch_network_policies(config.namespace(group), config.network)
    objects += flavor_objects(config, catalogue)
    objects += priority_class_objects(config)
    if config.offload_enabled:
        objects.append(offload_cluster_queue_object(config))
    objects += [cluster_queue_object(config, catalogue, g) for g in config.groups.values()]
    for group in config.groups:
        objects += local_queue_objects(config, group)
    return objects


# -- applying -----------------------------------------------------------------------


class Applier(Protocol):
    async def apply(self, obj: dict) -> dict: ...


async def sync_queues(
    client: Applier,
    config: QueueConfig,
    catalogue: Catalogue,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Apply the layout (server-side apply: idempotent, no delete). Returns ``kind/name``s.

    ``progress`` is called with each ``kind/name`` once it is applied.
    """
    applied = []
    for obj in queue_objects(config, catalogue):
        await client.apply(obj)
        meta = obj["metadata"]
        where = f"{meta['namespace']}/" if "namespace" in meta else ""
        applied.append(f"{obj['kind']}/{where}{meta['name']}")
        if progress is not None:
            progress(applied[-1])
    return applied


def group_names(config: QueueConfig) -> Iterable[str]:
    return sorted(config.groups)
