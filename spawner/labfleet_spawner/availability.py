"""Free and total accelerators per catalogue entry, from watch-based caches.

Free = allocatable minus what non-terminated pods in *all* namespaces request
(notebooks and batch jobs alike), on the nodes a given user could be placed
on: nodes reserved to another group (taint ``reserved=<group>``), interLink
virtual nodes and cordoned nodes are left out.

Three layers, each testable alone:

- :class:`AvailabilityIndex`: plain-dict Node and Pod objects in, per-node
  usage kept up to date incrementally (one pod event costs O(containers)),
  answers memoised until the next event. No I/O.
- :func:`compute_availability`: the same on lists (what a one-shot caller or a
  test wants).
- :class:`ClusterWatch`: lists nodes and pods once, then watches them and feeds
  the index; a form render reads the index and makes no API call.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from labfleet_hub.contract import RESERVED_TAINT_KEY, VIRTUAL_NODE_LABEL, VIRTUAL_NODE_TAINT_KEY

from .catalogue import Catalogue, parse_quantity

#: Pods in these phases hold nothing any more.
TERMINATED_PHASES = frozenset({"Succeeded", "Failed"})
#: Field selector of the pod watch: only pods that are bound and not finished matter.
POD_FIELD_SELECTOR = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"


def _count(value: Any) -> int:
    """Whole units of an extended resource (``"8"``, ``8``, ``"1k"``)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return parse_quantity(str(value))
        except ValueError:
            return 0


def _is_extended(resource: str) -> bool:
    # cpu, memory, pods, ephemeral-storage, hugepages-* have no domain prefix.
    return "/" in resource


@dataclass(frozen=True)
class NodeInfo:
    """What availability needs from a Node object."""

    name: str
    labels: Mapping[str, str]
    allocatable: Mapping[str, int]
    reserved_for: frozenset[str] = frozenset()
    virtual: bool = False
    schedulable: bool = True

    @classmethod
    def from_object(cls, node: Mapping[str, Any]) -> NodeInfo:
        meta = node.get("metadata") or {}
        spec = node.get("spec") or {}
        status = node.get("status") or {}
        labels = dict(meta.get("labels") or {})
        taints = spec.get("taints") or []
        virtual_key, virtual_value = VIRTUAL_NODE_LABEL
        virtual = labels.get(virtual_key) == virtual_value or any(
            t.get("key") == VIRTUAL_NODE_TAINT_KEY for t in taints
        )
        reserved = frozenset(
            str(t.get("value", ""))
            for t in taints
            if t.get("key") == RESERVED_TAINT_KEY and t.get("effect") in ("NoSchedule", "NoExecute")
        )
        ready = True
        for condition in status.get("conditions") or []:
            if condition.get("type") == "Ready":
                ready = condition.get("status") == "True"
        allocatable = {
            k: _count(v) for k, v in (status.get("allocatable") or {}).items() if _is_extended(k)
        }
        return cls(
            name=meta.get("name", ""),
            labels=labels,
            allocatable=allocatable,
            reserved_for=reserved,
            virtual=virtual,
            schedulable=ready and not spec.get("unschedulable", False),
        )

    def usable_by(self, groups: frozenset[str]) -> bool:
        if self.virtual or not self.schedulable:
            return False
        # A node reserved to several groups (several taints) needs all of them tolerated.
        return self.reserved_for <= groups

    def matches(self, node_labels: Mapping[str, str]) -> bool:
        return all(self.labels.get(k) == str(v) for k, v in node_labels.items())


def pod_usage(pod: Mapping[str, Any]) -> tuple[str, dict[str, int]]:
    """``(node name, {extended resource: count})`` a pod holds; empty when it holds none.

    Effective request as the scheduler computes it: the larger of the sum over
    containers and the largest init container. An extended resource given only
    as a limit is requested at the limit (Kubernetes defaults it so).
    """
    spec = pod.get("spec") or {}
    phase = (pod.get("status") or {}).get("phase")
    node = spec.get("nodeName") or ""
    if not node or phase in TERMINATED_PHASES:
        return "", {}

    def requests(container) -> dict[str, int]:
        resources = container.get("resources") or {}
        merged = dict(resources.get("limits") or {})
        merged.update(resources.get("requests") or {})
        return {k: _count(v) for k, v in merged.items() if _is_extended(k)}

    total: dict[str, int] = {}
    for container in spec.get("containers") or []:
        for k, v in requests(container).items():
            total[k] = total.get(k, 0) + v
    for container in spec.get("initContainers") or []:
        for k, v in requests(container).items():
            total[k] = max(total.get(k, 0), v)
    return node, {k: v for k, v in total.items() if v}


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


@dataclass
class AvailabilityIndex:
    """Nodes and per-node usage, updated by events; availability answers memoised."""

    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    pods: dict[str, tuple[str, dict[str, int]]] = field(default_factory=dict)
    used: dict[str, dict[str, int]] = field(default_factory=dict)
    generation: int = 0
    _memo: dict = field(default_factory=dict, repr=False)
    _matching: dict = field(default_factory=dict, repr=False)

    # -- updates (from a list or a watch event) --------------------------------

    def replace_nodes(self, nodes: Iterable[Mapping[str, Any]]) -> None:
        self.nodes = {}
        for node in nodes:
            info = NodeInfo.from_object(node)
            self.nodes[info.name] = info
        self._changed(nodes_changed=True)

    def replace_pods(self, pods: Iterable[Mapping[str, Any]]) -> None:
        self.pods, self.used = {}, {}
        for pod in pods:
            self._add_pod(_key(pod), pod)
        self._changed()

    def node_event(self, event_type: str, node: Mapping[str, Any]) -> None:
        name = (node.get("metadata") or {}).get("name", "")
        if event_type == "DELETED":
            self.nodes.pop(name, None)
        else:
            self.nodes[name] = NodeInfo.from_object(node)
        self._changed(nodes_changed=True)

    def pod_event(self, event_type: str, pod: Mapping[str, Any]) -> None:
        key = _key(pod)
        self._remove_pod(key)
        if event_type != "DELETED":
            self._add_pod(key, pod)
        self._changed()

    def _add_pod(self, key: str, pod: Mapping[str, Any]) -> None:
        node, usage = pod_usage(pod)
        if not usage:
            return
        self.pods[key] = (node, usage)
        on_node = self.used.setdefault(node, {})
        for resource, count in usage.items():
            on_node[resource] = on_node.get(resource, 0) + count

    def _remove_pod(self, key: str) -> None:
        held = self.pods.pop(key, None)
        if held is None:
            return
        node, usage = held
        on_node = self.used.get(node, {})
        for resource, count in usage.items():
            on_node[resource] = on_node.get(resource, 0) - count

    def _changed(self, nodes_changed: bool = False) -> None:
        self.generation += 1
        self._memo.clear()
        if nodes_changed:
            self._matching.clear()

    # -- queries --------------------------------------------------------------

    def _nodes_of(self, node_labels: Mapping[str, str]) -> list[NodeInfo]:
        key = tuple(sorted((k, str(v)) for k, v in node_labels.items()))
        found = self._matching.get(key)
        if found is None:
            found = [n for n in self.nodes.values() if n.matches(node_labels)]
            self._matching[key] = found
        return found

    def availability(
        self, catalogue: Catalogue, groups: Iterable[str]
    ) -> dict[str, tuple[int, int]]:
        """``{accelerator name: (free, total)}`` for a user in ``groups``."""
        groups = frozenset(groups)
        memo_key = (id(catalogue), groups)
        cached = self._memo.get(memo_key)
        if cached is not None:
            return dict(cached)
        result = {}
        for accelerator in catalogue.accelerators.values():
            free = total = 0
            resource = accelerator.resource
            for node in self._nodes_of(accelerator.node_labels):
                if not node.usable_by(groups):
                    continue
                capacity = node.allocatable.get(resource, 0)
                if capacity <= 0:
                    continue
                total += capacity
                free += max(0, capacity - self.used.get(node.name, {}).get(resource, 0))
            result[accelerator.name] = (free, total)
        self._memo[memo_key] = result
        return dict(result)


def compute_availability(
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    catalogue: Catalogue,
    groups: Iterable[str],
) -> dict[str, tuple[int, int]]:
    """``{accelerator name: (free, total)}`` from Node and Pod objects as plain dicts."""
    index = AvailabilityIndex()
    index.replace_nodes(nodes)
    index.replace_pods(pods)
    return index.availability(catalogue, groups)


# -- keeping an index up to date from the API server ----------------------------------


class ListRefused(Exception):
    """The API server answered a list with an error (e.g. 403: the hub lacks RBAC)."""

    def __init__(self, kind: str, status: int, body: bytes):
        try:
            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = body[:200].decode(errors="replace")
        super().__init__(f"listing {kind} answered HTTP {status}: {message}")
        self.status = status


class ClusterWatch:
    """List nodes and pods once, then watch both, feeding an :class:`AvailabilityIndex`.

    ``api`` is a ``kubernetes_asyncio`` ``CoreV1Api`` (injected, so tests can
    pass a fake). A watch that ends or fails is resumed from the last
    resourceVersion; an expired version (410) or an error leads to a fresh
    list, with backoff. ``ready`` is set once both first lists have arrived.
    """

    def __init__(
        self,
        api: Any,
        index: AvailabilityIndex | None = None,
        log: logging.Logger | None = None,
        watch_timeout: int = 300,
        watch_factory: Callable[[], Any] | None = None,
    ):
        self.api = api
        self.index = index or AvailabilityIndex()
        self.log = log or logging.getLogger(__name__)
        self.watch_timeout = watch_timeout
        self._watch_factory = watch_factory
        self._tasks: list[asyncio.Task] = []
        self._loaded = {"nodes": asyncio.Event(), "pods": asyncio.Event()}
        self.api_calls = 0

    @property
    def ready(self) -> bool:
        return all(e.is_set() for e in self._loaded.values())

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(e.wait() for e in self._loaded.values())), timeout
            )
        except TimeoutError:
            return False
        return True

    def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.ensure_future(
                self._run("nodes", "list_node", {}, self.index.replace_nodes, self.index.node_event)
            ),
            asyncio.ensure_future(
                self._run(
                    "pods",
                    "list_pod_for_all_namespaces",
                    {"field_selector": POD_FIELD_SELECTOR},
                    self.index.replace_pods,
                    self.index.pod_event,
                )
            ),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    def _new_watch(self):
        if self._watch_factory is not None:
            return self._watch_factory()
        from kubernetes_asyncio import watch  # imported on use: no client at import time

        return watch.Watch()

    async def _run(self, kind, method_name, kwargs, replace, on_event) -> None:
        method = getattr(self.api, method_name)
        delay = 0.5
        resource_version = None
        while True:
            try:
                if resource_version is None:
                    self.api_calls += 1
                    response = await method(_preload_content=False, **kwargs)
                    body = await response.read()
                    # without preloading, the client does not raise on an HTTP error: a
                    # 403's Status body must not replace the index (as an empty list)
                    status = getattr(response, "status", 200)
                    if status >= 400:
                        raise ListRefused(kind, status, body)
                    listed = json.loads(body)
                    replace(listed.get("items") or [])
                    resource_version = listed["metadata"]["resourceVersion"]
                    self._loaded[kind].set()
                watch = self._new_watch()
                self.api_calls += 1
                # _preload_content=False on the method: events stay plain dicts
                # (no model deserialisation per event), as KubeSpawner does.
                async with watch.stream(
                    partial(method, _preload_content=False),
                    resource_version=resource_version,
                    timeout_seconds=self.watch_timeout,
                    allow_watch_bookmarks=True,
                    **kwargs,
                ) as stream:
                    async for event in stream:
                        obj = event.get("raw_object") or {}
                        rv = (obj.get("metadata") or {}).get("resourceVersion")
                        # (An ERROR event, e.g. 410 Gone, is raised by the client
                        # and handled below with a fresh list.)
                        if event["type"] != "BOOKMARK":
                            on_event(event["type"], obj)
                        if rv:
                            resource_version = rv
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep watching whatever happens; the form must not break
                self.log.warning("Watching %s for availability failed (%s); relisting", kind, e)
                resource_version = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)
