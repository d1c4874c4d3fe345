"""Queue position of a session waiting for Kueue admission: pure helpers and progress.

No cluster: the visibility API and Workload lists are scripted answers given
to the spawner's API client (the real path is tests/k8s/test_kube_kueue.py).
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from labfleet_hub import contract
from labfleet_spawner.kube import (
    PlatformKubeSpawner,
    kueue_gated,
    pending_message,
    position_from_visibility,
    position_from_workloads,
    queue_phrase,
)

from tests.unit.test_kube_spawner import (  # noqa: F401  (autouse fixtures)
    FakeReflector,
    _stop_watches,
    dummy_kubeconfig,
    make_spawner,
)


def gated_pod(name="jupyter-alice", uid="uid-alice", ns="labfleet", queue="ml-queue") -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": uid,
            "labels": {contract.KUEUE_QUEUE_LABEL: queue, contract.KUEUE_MANAGED_LABEL: "true"},
        },
        "spec": {"schedulingGates": [{"name": contract.KUEUE_ADMISSION_GATE}]},
        "status": {"phase": "Pending"},
    }


def owner(pod_name: str, uid: str) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": uid}]


def pending_entry(pod_name, uid, position) -> dict:
    return {
        "metadata": {"name": f"pod-{pod_name}-x", "ownerReferences": owner(pod_name, uid)},
        "localQueueName": "ml-queue",
        "positionInLocalQueue": position,
        "positionInClusterQueue": position + 5,
    }


def workload(pod_name, uid, *, queue="ml-queue", priority=0, created="2026-01-01T00:00:00Z",
             conditions=()) -> dict:  # fmt: skip
    return {
        "metadata": {
            "name": f"pod-{pod_name}-x",
            "creationTimestamp": created,
            "ownerReferences": owner(pod_name, uid),
        },
        "spec": {"queueName": queue, "priority": priority},
        "status": {"conditions": [{"type": t, "status": "True"} for t in conditions]},
    }


# -- pure helpers ------------------------------------------------------------------------------


def test_position_from_visibility_matches_the_pods_workload_by_uid():
    pending = {
        "items": [
            pending_entry("jupyter-bob", "uid-bob", 0),
            # same pod name, an older pod (other uid): must not match
            pending_entry("jupyter-alice", "uid-old", 1),
            pending_entry("jupyter-alice", "uid-alice", 2),
        ]
    }
    assert position_from_visibility(pending, gated_pod()) == 2
    assert position_from_visibility(pending, gated_pod(uid="uid-none")) is None
    assert position_from_visibility({}, gated_pod()) is None


def test_position_from_workloads_orders_by_priority_then_age_within_the_queue():
    workloads = [
        workload("old", "u1", created="2026-01-01T00:00:01Z"),
        workload("running", "u2", conditions=("QuotaReserved", "Admitted")),
        workload("urgent", "u3", priority=100, created="2026-01-01T00:00:09Z"),
        workload("done", "u4", conditions=("Finished",)),
        workload("elsewhere", "u5", queue="cms-queue"),
        workload("jupyter-alice", "uid-alice", created="2026-01-01T00:00:05Z"),
        workload("young", "u6", created="2026-01-01T00:00:07Z"),
    ]
    # urgent (priority), old (earlier), then alice; admitted/finished/other queue don't count
    assert position_from_workloads(workloads, gated_pod()) == 2
    admitted = [workload("jupyter-alice", "uid-alice", conditions=("QuotaReserved",))]
    assert position_from_workloads(admitted, gated_pod()) is None
    assert position_from_workloads(workloads[:2], gated_pod()) is None


@pytest.mark.parametrize(
    "position, phrase",
    [
        (None, ""),
        (0, "you are next in line"),
        (1, "position 2 in line (1 session or job ahead of you)"),
        (4, "position 5 in line (4 sessions or jobs ahead of you)"),
    ],
)
def test_queue_phrase(position, phrase):
    assert queue_phrase(position) == phrase


def test_pending_message_with_and_without_position():
    pod = gated_pod()
    assert kueue_gated(pod) and not kueue_gated({"spec": {}}) and not kueue_gated(None)
    plain = pending_message(pod)
    assert "queue ml-queue" in plain and "line" not in plain
    with_pos = pending_message(pod, 2)
    assert "queue ml-queue" in with_pos
    assert "position 3 in line (2 sessions or jobs ahead of you)" in with_pos
    assert with_pos.endswith("the session starts when quota frees up")


# -- the spawner asking the API ----------------------------------------------------------------


class FakeResponse:
    def __init__(self, status: int, body: dict | str):
        self.status = status
        self._body = body if isinstance(body, str) else json.dumps(body)
        self.released = False

    async def read(self) -> bytes:
        return self._body.encode()

    def release(self) -> None:
        self.released = True


class ScriptedClient:
    """An ApiClient (the surface KubeAPI uses) answering from ``routes``: path prefix ->
    list of answers."""

    default_headers: dict = {}
    configuration = SimpleNamespace(host="")

    def __init__(self, routes: dict[str, list[tuple[int, dict | str]]]):
        self.routes = routes
        self.calls: list[str] = []
        self.rest_client = self

    async def update_params_for_auth(self, headers, params, auth_settings):
        assert auth_settings == ["BearerToken"]

    async def request(self, method, path, **kwargs):
        assert method == "GET"
        assert kwargs["_preload_content"] is False
        self.calls.append(path)
        for prefix, answers in self.routes.items():
            if path.startswith(prefix):
                status, body = answers.pop(0) if len(answers) > 1 else answers[0]
                return FakeResponse(status, body)
        raise AssertionError(f"unexpected GET {path}")


VIS = "/apis/visibility.kueue.x-k8s.io/v1beta2/namespaces/labfleet/localqueues/ml-queue/"
WLS = "/apis/kueue.x-k8s.io/v1beta2/namespaces/labfleet/workloads"


async def follow_progress(spawner, pod: dict, until) -> list[str]:
    """Progress messages for ``pod`` until ``until(messages)`` holds (checked every 10 ms)."""
    key = f"{spawner.namespace}/{spawner.pod_name}"
    pod["metadata"]["name"] = spawner.pod_name
    PlatformKubeSpawner.reflectors[("pods", spawner.namespace)] = FakeReflector({key: pod})
    spawner._start_future = asyncio.get_running_loop().create_future()
    messages: list[str] = []

    async def collect():
        async for event in spawner.progress():
            messages.append(event["message"])

    try:
        async with asyncio.timeout(5):
            task = asyncio.ensure_future(collect())
            while not until(messages):
                await asyncio.sleep(0.01)
            spawner._start_future.set_result("http://127.0.0.1:8888")
            await task
    finally:
        PlatformKubeSpawner.reflectors.clear()
    return messages


async def test_progress_shows_position_from_the_visibility_api_as_it_moves():
    spawner = make_spawner(
        events_enabled=False, progress_interval=0.01, queue_position_interval=0.02
    )
    pod = gated_pod()
    uid = pod["metadata"]["uid"]
    client = ScriptedClient(
        {
            VIS: [
                (200, {"items": [pending_entry("a", "ua", 0), pending_entry("x", uid, 1)]}),
                (200, {"items": [pending_entry("x", uid, 1)]}),  # unchanged: said once
                (200, {"items": [pending_entry("x", uid, 0)]}),
            ]
        }
    )
    spawner.api = SimpleNamespace(api_client=client)
    messages = await follow_progress(spawner, pod, lambda m: m and "next in line" in m[-1])
    assert len(messages) == 2, messages
    assert "position 2 in line (1 session or job ahead of you)" in messages[0]
    assert "you are next in line" in messages[1]
    assert all(c.startswith(VIS + "pendingworkloads") for c in client.calls)
    # throttled: a handful of calls, not one per 10 ms progress tick
    assert 3 <= len(client.calls) < 40


async def test_progress_falls_back_to_workloads_when_visibility_is_not_served():
    spawner = make_spawner(
        events_enabled=False, progress_interval=0.01, queue_position_interval=0.02
    )
    pod = gated_pod()
    client = ScriptedClient(
        {
            VIS: [(404, {"kind": "Status", "message": "the server could not find it"})],
            WLS: [
                (
                    200,
                    {
                        "items": [
                            workload("first", "u1", created="2026-01-01T00:00:01Z"),
                            workload("a", "uid-alice", created="2026-01-01T00:00:05Z"),
                        ]
                    },
                )
            ],
        }
    )
    spawner.api = SimpleNamespace(api_client=client)
    messages = await follow_progress(spawner, pod, lambda m: len(client.calls) >= 3)
    assert "position 2 in line" in messages[0], messages
    # asked the visibility API once, then only the Workloads
    assert [c.startswith(VIS) for c in client.calls][:3] == [True, False, False]


async def test_position_errors_never_break_progress_and_can_be_turned_off():
    spawner = make_spawner(
        events_enabled=False, progress_interval=0.01, queue_position_interval=0.02
    )
    client = ScriptedClient({VIS: [(503, "unavailable")], WLS: [(403, "forbidden")]})
    spawner.api = SimpleNamespace(api_client=client)
    messages = await follow_progress(spawner, gated_pod(), lambda m: len(client.calls) >= 2)
    assert messages and "Kueue" in messages[0] and "line" not in messages[0]

    off = make_spawner(events_enabled=False, progress_interval=0.01, queue_position_interval=0)
    off.api = SimpleNamespace(api_client=ScriptedClient({}))
    messages = await follow_progress(off, gated_pod(), lambda m: m)
    assert "Kueue" in messages[0] and off.api.api_client.calls == []


async def test_start_timeout_while_queued_names_the_last_position(monkeypatch):
    from kubespawner import KubeSpawner
    from tornado import web

    spawner = make_spawner(unschedulable_grace_period=0, progress_interval=0.01)
    pod = gated_pod()
    pod["metadata"]["name"] = spawner.pod_name
    key = f"{spawner.namespace}/{spawner.pod_name}"
    PlatformKubeSpawner.reflectors[("pods", spawner.namespace)] = FakeReflector({key: pod})
    spawner._queue_position = 1  # what progress last showed

    async def times_out(self):
        raise TimeoutError

    monkeypatch.setattr(KubeSpawner, "_start", times_out)
    try:
        with pytest.raises(web.HTTPError) as err:
            await spawner._start()
    finally:
        PlatformKubeSpawner.reflectors.clear()
    assert err.value.status_code == 503
    message = err.value.jupyterhub_message
    assert message.startswith("Your server did not start in time.")
    assert "position 2 in line (1 session or job ahead of you)" in message
