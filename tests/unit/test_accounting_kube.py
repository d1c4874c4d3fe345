"""Kubernetes collector: pods through the label contract, and list/watch/410 against a fake API."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from labfleet_accounting import db
from labfleet_accounting.kube import (
    Gone,
    KubeCollector,
    parse_cpu,
    parse_memory,
    parse_time,
    pod_event,
    pod_usage,
)
from labfleet_accounting.ledger import Ledger
from labfleet_accounting.records import START, STOP
from labfleet_hub.contract import (
    ANNOTATION_ACCELERATOR_COUNT,
    ANNOTATION_USER,
    KIND_BATCH,
    KIND_INTERACTIVE,
    LABEL_ACCELERATOR,
    LABEL_GROUP,
    LABEL_KIND,
    LABEL_PROFILE,
    LABEL_USER,
)

T0 = "2025-03-01T10:00:00Z"
T0_S = parse_time(T0)


def pod(uid="u1", kind=KIND_BATCH, phase="Running", accelerator="a100-1g", count="2",
        start=T0, deleted=None, finished=None, rv="1"):  # fmt: skip
    labels = {LABEL_KIND: kind, LABEL_USER: "alice-40x", LABEL_GROUP: "ml", LABEL_PROFILE: "p"}
    annotations = {ANNOTATION_USER: "alice@x"}
    resources = {"requests": {"cpu": "1500m", "memory": "2Gi"}}
    if accelerator:
        labels[LABEL_ACCELERATOR] = accelerator
        annotations[ANNOTATION_ACCELERATOR_COUNT] = count
        resources["limits"] = {"nvidia.com/mig-1g.10gb": count}
    status = {"phase": phase}
    if start:
        status["startTime"] = start
    if finished:
        status["containerStatuses"] = [{"state": {"terminated": {"finishedAt": finished}}}]
    meta = {"uid": uid, "name": f"pod-{uid}", "namespace": "labfleet-ml", "labels": labels,
            "annotations": annotations, "resourceVersion": rv}  # fmt: skip
    if deleted:
        meta["deletionTimestamp"] = deleted
    return {
        "metadata": meta,
        "spec": {
            "containers": [{"resources": resources}, {"resources": {"requests": {"cpu": "500m"}}}]
        },
        "status": status,
    }


ACCELERATORS = {"a100-1g": SimpleNamespace(kind="mig", gpu_fraction=1 / 7)}


def test_quantities():
    assert parse_cpu("250m") == 0.25 and parse_cpu("2") == 2.0 and parse_cpu(3) == 3.0
    assert parse_memory("2Gi") == 2 * 2**30 and parse_memory("500M") == 500 * 10**6
    assert parse_memory("1e3") == 1000 and parse_memory("128974848") == 128974848
    assert parse_time("2025-03-01T10:00:00Z") == 1740823200


def test_pod_usage_reads_the_contract():
    u = pod_usage(pod(), ACCELERATORS)
    assert (u.source, u.uid, u.start, u.user, u.group, u.kind, u.profile) == (
        "k8s", "u1", T0_S, "alice@x", "ml", KIND_BATCH, "p",
    )  # fmt: skip
    assert (u.accelerator, u.accelerator_kind, u.accelerator_count) == ("a100-1g", "mig", 2)
    assert u.gpu_fraction == pytest.approx(1 / 7)
    assert u.cpu == 2.0 and u.memory == 2 * 2**30  # both containers' requests


def test_pod_usage_without_catalogue_entry_or_annotation_falls_back_to_resources():
    p = pod(accelerator="unknown")
    del p["metadata"]["annotations"][ANNOTATION_ACCELERATOR_COUNT]
    u = pod_usage(p, ACCELERATORS)
    assert (u.accelerator_kind, u.accelerator_count, u.gpu_fraction) == ("mig", 2, 1.0)


def test_cpu_only_and_unlabelled_and_unstarted_pods():
    assert pod_usage(pod(accelerator=None, kind=KIND_INTERACTIVE)).accelerator_count == 0
    assert pod_usage(pod(kind="other")) is None
    assert pod_usage(pod(start=None, phase="Pending")) is None  # gated by Kueue: no usage yet


def test_pod_events():
    assert pod_event("ADDED", pod()).type == START
    done = pod_event(
        "MODIFIED", pod(phase="Succeeded", finished="2025-03-01T11:00:00Z", deleted=None)
    )
    assert (done.type, done.at) == (STOP, T0_S + 3600)
    gone = pod_event("DELETED", pod(deleted="2025-03-01T10:30:00Z"))
    assert (gone.type, gone.at) == (STOP, T0_S + 1800)
    assert pod_event("DELETED", pod(), now=T0_S + 99).at == T0_S + 99


class FakePods:
    """list pages and watch streams scripted by the test."""

    def __init__(self):
        self.items: list[dict] = []
        self.list_version = "10"
        self.watches: list = []  # each: list of raw events, or an exception to raise
        self.watched_from: list[str] = []
        self.lists = 0

    async def list_page(self, limit, token):
        self.lists += 1
        start = int(token or 0)
        page = self.items[start : start + limit]
        meta = {"resourceVersion": self.list_version}
        if start + limit < len(self.items):
            meta["continue"] = str(start + limit)
        return {"items": page, "metadata": meta}

    async def watch(self, version, timeout):
        self.watched_from.append(version)
        script = self.watches.pop(0) if self.watches else []
        if isinstance(script, Exception):
            raise script
        for event in script:
            yield event


@pytest.fixture
def ledger(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    db.upgrade(engine)
    return Ledger(engine, clock=lambda: T0_S + 5000)


def collector(pods, ledger):
    return KubeCollector(pods, ledger, clock=lambda: T0_S + 5000, page_size=2, batch_delay=0)


async def test_resync_lists_all_pages_and_reconciles(ledger):
    pods = FakePods()
    pods.items = [pod(f"p{i}") for i in range(5)]
    pods.items.append(pod("done", phase="Failed", finished="2025-03-01T10:10:00Z"))
    version = await collector(pods, ledger).resync()
    assert version == "10" and ledger.checkpoint("k8s") == "10"
    rows = {r["uid"]: r["end_s"] for r in ledger.intervals()}
    assert rows == {**{f"p{i}": None for i in range(5)}, "done": T0_S + 600}


async def test_watch_applies_events_idempotently_and_checkpoints(ledger):
    pods = FakePods()
    p = pod("w1", rv="11")
    events = [
        {"type": "ADDED", "object": p},
        {"type": "ADDED", "object": p},  # duplicate
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}},
        {"type": "DELETED", "object": pod("w1", rv="13", deleted="2025-03-01T10:20:00Z")},
        {"type": "DELETED", "object": pod("w1", rv="14", deleted="2025-03-01T10:59:00Z")},
    ]
    pods.watches = [events]
    version = await collector(pods, ledger).watch_once("10")
    assert version == "14" and ledger.checkpoint("k8s") == "14"
    [row] = ledger.intervals()
    assert (row["start_s"], row["end_s"]) == (T0_S, T0_S + 1200)


async def test_run_resumes_from_checkpoint_and_resyncs_on_410(ledger):
    ledger.save_checkpoint("k8s", "7")
    ledger.start(pod_usage(pod("vanished")))
    pods = FakePods()
    pods.items = [pod("alive")]
    stop = asyncio.Event()
    expired = [{"type": "ERROR", "object": {"code": 410, "message": "too old"}}]

    async def then_stop():
        stop.set()
        return
        yield  # pragma: no cover

    c = collector(pods, ledger)
    pods.watches = [expired, [{"type": "ADDED", "object": pod("new", rv="21")}]]
    original = pods.watch

    def watch(version, timeout):
        if not pods.watches:
            return then_stop()
        return original(version, timeout)

    pods.watch = watch
    await asyncio.wait_for(c.run(stop), 10)
    assert pods.watched_from[:2] == ["7", "10"], "resumes from the checkpoint, then the list"
    assert pods.lists == 1
    rows = {r["uid"]: r["end_s"] for r in ledger.intervals()}
    assert set(rows) == {"vanished", "alive", "new"}
    assert rows["vanished"] is not None and rows["alive"] is None and rows["new"] is None
    assert ledger.checkpoint("k8s") == "21"


def test_gone_is_an_exception():
    assert issubclass(Gone, Exception)
