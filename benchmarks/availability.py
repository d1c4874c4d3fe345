"""Spawn-form availability at fleet scale: labfleet's watch cache vs list-per-render.

Same process, same synthetic data (2,000 nodes, 20,000 pods by default):

- **reference** (what AI_INFN's hub does): every form render lists all nodes
  and all pods from the API server, then computes free/total. The API server
  is a fake client that serialises its objects to JSON and the caller parses
  them, so the cost of moving 20,000 pods through the client is real (network
  and the API server's own work are *not* included: the true reference cost is
  higher).
- **labfleet**: the index is filled once from a list (as
  :class:`~labfleet_spawner.availability.ClusterWatch` does on start), then each
  render reads it. Two cases: a render right after a watch event (memo
  invalidated, full recomputation over the indexed nodes) and a steady-state
  render (memoised until the next event).

Both use the same free/total rules (``AvailabilityIndex``), so the difference
is the listing and parsing per render. Reported: p50/p95 per render, API calls
per render, ratios.

    .venv/bin/python -m benchmarks.availability [--nodes 2000 --pods 20000]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from labfleet_spawner.availability import AvailabilityIndex, compute_availability
from labfleet_spawner.catalogue import load_catalogue

ROOT = Path(__file__).resolve().parents[1]


def synthetic_fleet(catalogue, n_nodes: int, n_pods: int, seed: int = 4):
    """Nodes shaped like the test fleet (GPU, MIG, FPGA, CPU, reserved, virtual) and pods."""
    rng = random.Random(seed)
    accelerators = list(catalogue.accelerators.values())
    nodes = []
    for i in range(n_nodes):
        labels = {"kubernetes.io/hostname": f"node-{i}", "kubernetes.io/os": "linux"}
        taints, allocatable = [], {"cpu": "64", "memory": "512Gi", "pods": "110"}
        roll = rng.random()
        if roll < 0.45:  # accelerator node
            acc = accelerators[i % len(accelerators)]
            labels.update(acc.node_labels)
            allocatable[acc.resource] = str(rng.choice([1, 2, 4, 7, 8]))
            taint = "amd.com/fpga" if acc.kind == "fpga" else "nvidia.com/gpu"
            taints.append({"key": taint, "value": "present", "effect": "NoSchedule"})
        elif roll < 0.50:  # reserved to a group
            group = rng.choice(["cms", "atlas", "lhcb"])
            labels["reserved"] = group
            taints.append({"key": "reserved", "value": group, "effect": "NoSchedule"})
        elif roll < 0.51:  # interLink virtual node
            labels["type"] = "virtual-kubelet"
            taints.append(
                {
                    "key": "virtual-node.interlink/no-schedule",
                    "value": "true",
                    "effect": "NoSchedule",
                }
            )
        nodes.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": f"node-{i}", "labels": labels, "resourceVersion": str(i)},
                "spec": {"taints": taints},
                "status": {
                    "capacity": dict(allocatable),
                    "allocatable": allocatable,
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "addresses": [{"type": "InternalIP", "address": f"127.1.{i // 250}.{i % 250}"}],
                },
            }
        )
    pods = []
    for j in range(n_pods):
        node = nodes[rng.randrange(n_nodes)]
        extended = [k for k in node["status"]["allocatable"] if "/" in k]
        resources = {"cpu": "1", "memory": "2Gi"}
        if extended and rng.random() < 0.3:
            resources[extended[0]] = "1"
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"pod-{j}",
                    "namespace": f"ns-{j % 200}",
                    "labels": {
                        "app": "x",
                        "labfleet.io/kind": rng.choice(["batch", "interactive"]),
                    },
                    "resourceVersion": str(n_nodes + j),
                },
                "spec": {
                    "nodeName": node["metadata"]["name"],
                    "containers": [
                        {
                            "name": "main",
                            "image": "example.org/image:1",
                            "resources": {"requests": resources, "limits": resources},
                            "env": [{"name": "A", "value": "b" * 40}],
                        }
                    ],
                },
                "status": {
                    "phase": "Succeeded" if rng.random() < 0.1 else "Running",
                    "podIP": f"127.2.{j // 250 % 250}.{j % 250}",
                },
            }
        )
    return nodes, pods


class FakeApiServer:
    """Answers list calls with JSON text, as a real client receives them; counts calls."""

    def __init__(self, nodes, pods):
        self.nodes, self.pods, self.calls = nodes, pods, 0

    def _list(self, kind, items) -> bytes:
        self.calls += 1
        body = {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}}
        body["items"] = items
        return json.dumps(body).encode()

    def list_node(self) -> bytes:
        return self._list("NodeList", self.nodes)

    def list_pod_for_all_namespaces(self) -> bytes:
        return self._list("PodList", self.pods)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summary(times_s, calls, renders):
    ms = [t * 1000 for t in times_s]
    return {
        "renders": renders,
        "p50_ms": round(statistics.median(ms), 4),
        "p95_ms": round(percentile(ms, 0.95), 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        "api_calls_per_render": calls / renders,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--pods", type=int, default=20000)
    parser.add_argument("--reference-renders", type=int, default=15)
    parser.add_argument("--cached-renders", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/availability.json"))
    args = parser.parse_args(argv)

    catalogue = load_catalogue(ROOT / "config" / "catalogue.yaml")
    nodes, pods = synthetic_fleet(catalogue, args.nodes, args.pods)
    api = FakeApiServer(nodes, pods)
    groups = ["users", "ml"]

    # reference: list everything on every render
    ref_times, ref_result = [], None
    before = api.calls
    for _ in range(args.reference_renders):
        t0 = time.perf_counter()
        listed_nodes = json.loads(api.list_node())["items"]
        listed_pods = json.loads(api.list_pod_for_all_namespaces())["items"]
        ref_result = compute_availability(listed_nodes, listed_pods, catalogue, groups)
        ref_times.append(time.perf_counter() - t0)
    reference = summary(ref_times, api.calls - before, args.reference_renders)

    # labfleet: one list to fill the index (as the watch does on start) ...
    t0 = time.perf_counter()
    before = api.calls
    index = AvailabilityIndex()
    index.replace_nodes(json.loads(api.list_node())["items"])
    index.replace_pods(json.loads(api.list_pod_for_all_namespaces())["items"])
    initial_list_s = time.perf_counter() - t0
    initial_calls = api.calls - before
    assert index.availability(catalogue, groups) == ref_result, "both must agree"

    # ... then renders, each right after a pod watch event (no memo)
    rng = random.Random(7)
    before = api.calls
    event_times, after_event_times = [], []
    for _ in range(args.cached_renders):
        pod = pods[rng.randrange(len(pods))]
        t0 = time.perf_counter()
        index.pod_event("MODIFIED", pod)
        t1 = time.perf_counter()
        index.availability(catalogue, groups)
        after_event_times.append(time.perf_counter() - t1)
        event_times.append(t1 - t0)
    after_event = summary(after_event_times, api.calls - before, args.cached_renders)

    # ... and steady-state renders (no event since the last render)
    before = api.calls
    steady_times = []
    for _ in range(args.cached_renders):
        t0 = time.perf_counter()
        index.availability(catalogue, groups)
        steady_times.append(time.perf_counter() - t0)
    steady = summary(steady_times, api.calls - before, args.cached_renders)

    result = {
        "benchmark": "availability",
        "fleet": {
            "nodes": args.nodes,
            "pods": args.pods,
            "accelerators": len(catalogue.accelerators),
        },
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "reference_list_per_render": reference,
        "labfleet_after_watch_event": after_event,
        "labfleet_steady_state": steady,
        "labfleet_initial_list": {
            "seconds": round(initial_list_s, 4),
            "api_calls": initial_calls,
            "note": "once per hub process, then watches",
        },
        "watch_event_apply_us": {
            "p50": round(statistics.median(event_times) * 1e6, 2),
            "p95": round(percentile(event_times, 0.95) * 1e6, 2),
        },
        "ratio_p50_reference_over_after_event": round(
            reference["p50_ms"] / after_event["p50_ms"], 1
        ),
        "ratio_p50_reference_over_steady": round(reference["p50_ms"] / steady["p50_ms"], 1),
        "note": "fake API server: JSON serialise + parse per list; no network, no API-server "
        "work, so the reference is flattered",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
