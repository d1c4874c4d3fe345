"""Helpers shared by the k8s tests: the cluster library and polling."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
_CLUSTER_PY = ROOT / "tools" / "cluster" / "cluster.py"


def _load_cluster_module():
    name = "labfleet_test_cluster"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _CLUSTER_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


clusterlib = _load_cluster_module()


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 30, interval: float = 0.5) -> Any:
    """Poll fn until it returns something truthy; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (subprocess.SubprocessError, json.JSONDecodeError, clusterlib.ClusterError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def delete_queue_layout(cluster, config, catalogue) -> None:
    """Remove what ``sync_queues`` applied for ``config`` (namespaces and cluster-scoped
    flavors, ClusterQueues, priority classes), so tests leave the shared cluster clean."""
    import yaml
    from labfleet_batch.queues import queue_objects

    cluster.kubectl(
        "delete",
        "-f",
        "-",
        "--wait=false",
        "--ignore-not-found",
        input=yaml.safe_dump_all(queue_objects(config, catalogue)),
        check=False,
    )


def service_account_view(cluster, namespace: str, account: str, kubeconfig: Path, *can: str):
    """The cluster as ``account`` sees it: a kubeconfig holding only its token.

    Returns the cluster object with that kubeconfig and token (``.kubectl`` then runs
    as the account). ``can`` (e.g. ``"list", "pods", "--all-namespaces"``) is waited
    for: the authorizer learns new bindings through an informer, not at once.
    """
    import dataclasses

    token = cluster.kubectl("create", "token", account, "-n", namespace).stdout.strip()
    clusterlib.write_kubeconfig(kubeconfig, cluster.server, cluster.ca_file, token)
    view = dataclasses.replace(cluster, kubeconfig=kubeconfig, token=token)
    if can:
        wait_for(
            f"{account} may {' '.join(can)}",
            lambda: view.kubectl("auth", "can-i", *can, check=False).stdout.strip() == "yes",
        )
    return view
