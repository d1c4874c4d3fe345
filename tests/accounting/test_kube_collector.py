"""KubeCollector timing against a scripted watch: nothing held back, stop ends a watch.

Both were found by tests/k8s/test_accounting_collector.py against the real
control plane: the last events of a burst (a deletion's final DELETED, the
replay after a restart) stayed in memory until the next event or the end of
the watch request (up to ``watch_timeout``, 300 s), and ``serve`` ignored
SIGTERM for as long.
"""

from __future__ import annotations

import asyncio
import time

from labfleet_accounting.kube import KubeCollector

from tests.unit.test_accounting_kube import T0_S, FakePods, pod


class OpenWatch(FakePods):
    """Each watch yields its scripted events, then stays open (no event) until released."""

    def __init__(self):
        super().__init__()
        self.release = asyncio.Event()

    async def watch(self, version, timeout):
        self.watched_from.append(version)
        for event in self.watches.pop(0) if self.watches else []:
            yield event
        await self.release.wait()


def burst():
    return [
        {"type": "ADDED", "object": pod("b1", rv="11")},
        {"type": "ADDED", "object": pod("b2", rv="12")},
        {"type": "DELETED", "object": pod("b1", rv="13", deleted="2025-03-01T10:20:00Z")},
    ]


async def wait_until(what, fn, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_burst_is_written_when_the_watch_goes_quiet(ledger):
    pods = OpenWatch()
    pods.watches = [burst()]
    collector = KubeCollector(pods, ledger, batch_delay=0.3, touch_interval=1e9)
    watching = asyncio.create_task(collector.watch_once("10"))
    try:
        # The watch is still open and silent: the batch must not wait for it.
        await wait_until("the burst in the ledger", lambda: ledger.checkpoint("k8s") == "13")
        assert not watching.done()
        rows = {r["uid"]: r["end_s"] for r in ledger.intervals()}
        assert rows == {"b1": T0_S + 1200, "b2": None}
    finally:
        pods.release.set()
        assert await asyncio.wait_for(watching, 5) == "13"


async def test_stop_ends_a_watch_in_flight(ledger):
    pods = OpenWatch()
    pods.watches = [burst()]
    ledger.save_checkpoint("k8s", "10")  # resumes: watches without listing
    collector = KubeCollector(pods, ledger, batch_delay=0.05, touch_interval=1e9)
    stop = asyncio.Event()
    running = asyncio.create_task(collector.run(stop))
    await wait_until("the burst in the ledger", lambda: ledger.checkpoint("k8s") == "13")
    began = time.monotonic()
    stop.set()
    await asyncio.wait_for(running, 5)  # the open watch would last watch_timeout (300 s)
    assert time.monotonic() - began < 2
    assert not pods.release.is_set() and pods.lists == 0 and pods.watched_from == ["10"]
    assert ledger.checkpoint("k8s") == "13"


async def test_stop_ends_the_wait_after_a_failed_list(ledger):
    class Broken(OpenWatch):
        async def list_page(self, limit, token):
            raise ValueError("not an API error")

    collector = KubeCollector(Broken(), ledger)
    # The list fails; run logs it and waits 5 s before retrying: stop ends that wait.
    stop = asyncio.Event()
    running = asyncio.create_task(collector.run(stop))
    await asyncio.sleep(0.1)
    assert not running.done()
    stop.set()
    await asyncio.wait_for(running, 2)
