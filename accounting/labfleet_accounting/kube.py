"""Kubernetes collector: pods of notebook servers and batch Jobs -> usage intervals.

The pure half, :func:`pod_usage`, reads one pod (the raw JSON dict the API
returns) through the label contract of :mod:`labfleet_hub.contract`. The I/O
half, :class:`KubeCollector`, lists and watches pods with a label selector on
``LABEL_KIND`` and feeds the ledger:

- on start, with a saved resourceVersion it resumes the watch from there (the
  API server replays what happened while the service was down, including
  deletions, with their exact times); without one, or when the API answers
  410 Gone (the version was compacted away), it lists every pod and
  :meth:`Ledger.reconcile` s the open intervals against the listing;
- events are applied in batches, each in one transaction with the
  resourceVersion of its last event, so a crash replays at most one batch
  and the idempotent ledger absorbs the replay;
- while watching it periodically marks the open intervals as seen, which
  bounds the error on a pod deleted while nobody watched (closed at its last
  sighting).

Pods are never kept in memory: each is turned into a small :class:`Usage` as
it arrives, and lists are paginated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime

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
from labfleet_hub.quantities import parse_cpu, parse_memory
from traitlets import Any, Float, Integer, Unicode
from traitlets.config import LoggingConfigurable

from .records import START, STOP, Event, Usage

SOURCE = "k8s"
LABEL_SELECTOR = f"{LABEL_KIND} in ({KIND_INTERACTIVE},{KIND_BATCH})"


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list and reconcile."""


def parse_time(value: str | None) -> int | None:
    """Epoch seconds of an RFC 3339 time as the API writes it (``2024-01-01T00:00:00Z``)."""
    if not value:
        return None
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())


def _accelerator_kind(resource: str) -> str:
    if resource == "nvidia.com/gpu":
        return "gpu"
    if resource.startswith("nvidia.com/mig-"):
        return "mig"
    if "fpga" in resource or "xilinx" in resource:
        return "fpga"
    return ""


def _requests(pod: Mapping) -> dict[str, list[str]]:
    """Requests per resource of the pod's app containers (init containers run before)."""
    found: dict[str, list[str]] = {}
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        # A container with only limits gets requests equal to them.
        amounts = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        for name, amount in amounts.items():
            found.setdefault(name, []).append(amount)
    return found


def pod_end(pod: Mapping) -> int | None:
    """When the pod stopped using its resources: last container finish, else deletion."""
    status = pod.get("status") or {}
    finished = [
        parse_time(((s.get("state") or {}).get("terminated") or {}).get("finishedAt"))
        for s in status.get("containerStatuses") or []
    ]
    finished = [f for f in finished if f is not None]
    if status.get("phase") in ("Succeeded", "Failed") and finished:
        return max(finished)
    return parse_time((pod.get("metadata") or {}).get("deletionTimestamp"))


def pod_usage(pod: Mapping, accelerators: Mapping | None = None) -> Usage | None:
    """The :class:`Usage` of a labfleet pod, or None for a pod that never started.

    ``accelerators`` maps catalogue accelerator names to objects with ``kind``
    and ``gpu_fraction`` (the catalogue's :class:`Accelerator`); without an
    entry, kind comes from the extended resource the pod requests and the
    fraction is 1.
    """
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    kind = labels.get(LABEL_KIND)
    start = parse_time((pod.get("status") or {}).get("startTime"))
    if kind not in (KIND_INTERACTIVE, KIND_BATCH) or start is None:
        return None
    requests = _requests(pod)
    accelerator = labels.get(LABEL_ACCELERATOR, "")
    entry = (accelerators or {}).get(accelerator) if accelerator else None
    extended = {r: v for r, v in requests.items() if _accelerator_kind(r)}
    accel_kind = getattr(entry, "kind", "") or next((_accelerator_kind(r) for r in extended), "")
    try:
        count = int(annotations[ANNOTATION_ACCELERATOR_COUNT])
    except (KeyError, ValueError):
        count = sum(int(parse_cpu(v)) for values in extended.values() for v in values)
    if not accelerator:
        count, accel_kind = 0, ""
    return Usage(
        source=SOURCE,
        uid=meta.get("uid", ""),
        start=start,
        user=annotations.get(ANNOTATION_USER) or labels.get(LABEL_USER, ""),
        group=labels.get(LABEL_GROUP, ""),
        kind=kind,
        profile=labels.get(LABEL_PROFILE, ""),
        accelerator=accelerator,
        accelerator_kind=accel_kind,
        accelerator_count=count,
        gpu_fraction=float(getattr(entry, "gpu_fraction", 1.0)),
        cpu=sum(parse_cpu(v) for v in requests.get("cpu", [])),
        memory=sum(parse_memory(v) for v in requests.get("memory", [])),
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
    )


def pod_event(event_type: str, pod: Mapping, accelerators=None, now=None) -> Event | None:
    """A watch event (ADDED/MODIFIED/DELETED) as a ledger event, or None to ignore it."""
    usage = pod_usage(pod, accelerators)
    if usage is None:
        return None
    end = pod_end(pod)
    phase = (pod.get("status") or {}).get("phase")
    if event_type == "DELETED":
        return Event(STOP, usage, end if end is not None else int(now or time.time()))
    if phase in ("Succeeded", "Failed"):
        return Event(STOP, usage, end if end is not None else int(now or time.time()))
    return Event(START, usage, usage.start)


class KubePodSource:
    """Raw pod lists and watches through an injected ``kubernetes_asyncio`` CoreV1Api.

    Raw JSON (``_preload_content=False``) instead of model objects: a V1Pod
    costs far more memory and CPU than the few fields accounting reads.
    """

    def __init__(self, core_v1, label_selector: str = LABEL_SELECTOR):
        self.api = core_v1
        self.label_selector = label_selector

    async def list_page(self, limit: int, continue_token: str | None) -> dict:
        kwargs = {"label_selector": self.label_selector, "limit": limit}
        if continue_token:
            kwargs["_continue"] = continue_token
        response = await self.api.list_pod_for_all_namespaces(_preload_content=False, **kwargs)
        return json.loads(await response.read())

    async def watch(self, resource_version: str, timeout: int) -> AsyncIterator[dict]:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            response = await self.api.list_pod_for_all_namespaces(
                label_selector=self.label_selector,
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                _preload_content=False,
            )
        except ApiException as e:
            if e.status == 410:
                raise Gone(str(e)) from e
            raise
        async with response:
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)


class KubeCollector(LoggingConfigurable):
    """List + watch labfleet pods into the ledger, resuming from a checkpoint."""

    source_name = Unicode(SOURCE, config=True, help="Ledger source name of this collector.")
    page_size = Integer(500, config=True, help="Pods per page when listing.")
    watch_timeout = Integer(
        300, config=True, help="Seconds a watch request lasts before it is renewed."
    )
    batch_size = Integer(200, config=True, help="Most watch events written in one transaction.")
    batch_delay = Float(
        0.5,
        config=True,
        help="Seconds to wait for more events before writing a batch: fewer, larger commits.",
    )
    touch_interval = Float(
        60,
        config=True,
        help="""Seconds between marks of the open intervals as seen.

        A pod deleted while the collector was down is closed at its last mark,
        so this bounds the error on such pods.
        """,
    )
    accelerators = Any(
        None,
        allow_none=True,
        help="Catalogue accelerators by name (kind, gpu_fraction); not configuration.",
    )

    def __init__(self, pod_source, ledger, clock=time.time, **kwargs):
        super().__init__(**kwargs)
        self.pods = pod_source
        self.ledger = ledger
        self.clock = clock
        self._last_touch = 0.0

    async def _db(self, fn, *args, **kwargs):
        # The ledger is synchronous SQLAlchemy: keep the event loop free for the watch.
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def resync(self) -> str:
        """List every pod, reconcile the ledger with it; returns the list's resourceVersion."""
        running, finished, token, version = [], [], None, ""
        now = int(self.clock())
        while True:
            page = await self.pods.list_page(self.page_size, token)
            for pod in page.get("items") or []:
                event = pod_event("ADDED", pod, self.accelerators, now)
                if event is None:
                    continue
                if event.type == STOP:
                    finished.append((event.usage, event.at))
                else:
                    running.append(event.usage)
            meta = page.get("metadata") or {}
            version = meta.get("resourceVersion") or version
            token = meta.get("continue")
            if not token:
                break
        counts = await self._db(
            self.ledger.reconcile, self.source_name, running, finished, version, now
        )
        self.log.info("Resynced %d pods at resourceVersion %s: %s", len(running), version, counts)
        return version

    async def watch_once(self, version: str) -> str:
        """One watch request from ``version``; returns the version to continue from.

        A batch is written when it is full, when ``batch_delay`` has passed
        since the last write, or when no further event came for ``batch_delay``:
        the last events of a burst (a deletion's DELETED, the replay after a
        restart) are never held back until the next event or the end of the
        request.
        """
        batch: list[Event] = []
        last_flush = time.monotonic()

        async def flush(position: str):
            nonlocal batch, last_flush
            await self._db(
                self.ledger.apply, batch, (self.source_name, position), int(self.clock())
            )
            batch, last_flush = [], time.monotonic()

        events = aiter(self.pods.watch(version, self.watch_timeout))
        following: asyncio.Future | None = None
        try:
            while True:
                if following is None:
                    following = asyncio.ensure_future(anext(events))
                if batch:
                    # Wait for the next event no longer than the batch may wait.
                    left = max(0.0, self.batch_delay - (time.monotonic() - last_flush))
                    done, _ = await asyncio.wait({following}, timeout=left)
                    if not done:
                        await flush(version)
                        continue
                try:
                    raw = await following
                except StopAsyncIteration:
                    break
                finally:
                    following = None if following.done() else following
                kind = raw.get("type")
                obj = raw.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", "resource version too old"))
                    raise RuntimeError(f"watch error: {obj}")
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    event = pod_event(kind, obj, self.accelerators, self.clock())
                    if event is not None:
                        batch.append(event)
                # Bookmarks too move the checkpoint: fewer events to replay after a restart.
                if len(batch) >= self.batch_size or (
                    time.monotonic() - last_flush >= self.batch_delay
                ):
                    await flush(version)
                await self._maybe_touch()
        finally:
            if following is not None:
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                    await following
            with contextlib.suppress(Exception):
                await events.aclose()
        await flush(version)
        return version

    async def _maybe_touch(self) -> None:
        now = self.clock()
        if now - self._last_touch >= self.touch_interval:
            self._last_touch = now
            await self._db(self.ledger.touch, self.source_name, int(now))

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Collect until ``stop`` is set: resume, watch, resync on 410 or error.

        Setting ``stop`` ends a watch request in flight at once (a watch lasts
        up to ``watch_timeout``): whatever was not written yet is replayed from
        the checkpoint at the next start.
        """
        stop = stop or asyncio.Event()
        work = asyncio.ensure_future(self._collect(stop))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, stopped):
                task.cancel()
            await asyncio.gather(work, stopped, return_exceptions=True)
        if work.done() and not work.cancelled() and work.exception() is not None:
            raise work.exception()

    async def _collect(self, stop: asyncio.Event) -> None:
        version = await self._db(self.ledger.checkpoint, self.source_name)
        while not stop.is_set():
            try:
                if not version:
                    version = await self.resync()
                version = await self.watch_once(version)
                await self._maybe_touch()
            except Gone as e:
                self.log.info("Watch expired (%s); listing again", e)
                version = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the API server restarting, a network blip
                self.log.warning("Pod watch failed (%s); resyncing in 5 s", e)
                version = None
                try:
                    await asyncio.wait_for(stop.wait(), 5)
                except TimeoutError:
                    pass
