"""Fault test: SIGKILL the accounting service in the middle of a stream of starts and stops.

A writer (standing in for the hub's SpoolHook) appends start/stop events to
the spool while the real service process (``labfleet-accounting serve``)
ingests them. The service is killed twice without warning, mid-stream, and
restarted; at the end the ledger must equal the ground truth exactly: every
interval once, with its exact start and end.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from labfleet_accounting import db
from labfleet_accounting.ledger import Ledger
from labfleet_accounting.records import START, STOP, Event, Usage
from labfleet_accounting.spool import append_events

from tests.conftest import free_port


def stream(seed=6, servers=120):
    """Interleaved start/stop events of ``servers`` servers, some restarted under the same uid."""
    rng = random.Random(seed)
    events, t = [], 1_700_000_000
    running: dict[str, Usage] = {}
    while servers or running:
        t += rng.randint(1, 30)
        if servers and (not running or rng.random() < 0.55):
            servers -= 1
            uid = f"user{rng.randint(0, 40)}/"
            if uid in running:
                continue
            group, count = f"g{rng.randint(0, 3)}", rng.randint(0, 2)
            usage = Usage("local", uid, t, uid[:-1], group, "interactive",
                          accelerator_count=count, cpu=rng.choice([1, 2, 4]))  # fmt: skip
            running[uid] = usage
            events.append(Event(START, usage, t))
        else:
            uid = rng.choice(sorted(running))
            events.append(Event(STOP, running.pop(uid), t))
    return events


def truth(events):
    out = {}
    for e in events:
        key = (e.usage.uid, e.usage.start)
        if e.type == START:
            out.setdefault(key, None)
        else:
            out[key] = e.at
    return out


def start_service(db_url, spool, log):
    return subprocess.Popen(
        [sys.executable, "-m", "labfleet_accounting.app", "serve", f"--db-url={db_url}",
         f"--spool={spool}", f"--port={free_port()}", "--SpoolCollector.poll_interval=0.02",
         "--SpoolCollector.batch_lines=7"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JUPYTERHUB_SERVICE_PREFIX": "/"},
    )  # fmt: skip


def test_sigkill_mid_stream_then_restart_gives_the_exact_ledger(db_url, tmp_path):
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    ledger = Ledger(engine)
    spool = tmp_path / "spool"
    spool.touch()
    events = stream()
    log = open(tmp_path / "service.log", "ab")
    service = start_service(db_url, spool, log)
    kills, restarts, i = 0, 0, 0

    def caught_up_to(size, timeout=60):
        deadline = time.monotonic() + timeout
        while int(ledger.checkpoint("local") or 0) < size:
            assert service.poll() is None, (tmp_path / "service.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the service did not reach {size} in {timeout} s"
            time.sleep(0.02)

    try:
        # Let the service come up and ingest a first batch.
        append_events(spool, events[:3])
        i = 3
        caught_up_to(spool.stat().st_size)
        while i < len(events):
            append_events(spool, events[i : i + 3])
            i += 3
            time.sleep(0.01)
            position = int(ledger.checkpoint("local") or 0)
            # Kill only while the service is behind the writer: mid-stream, not idle.
            behind = 0 < position < spool.stat().st_size
            if kills < 2 and i > (kills + 1) * len(events) // 3 and behind:
                service.send_signal(signal.SIGKILL)
                service.wait(10)
                kills += 1
                # Events keep coming while the service is down.
                append_events(spool, events[i : i + 6])
                i += 6
                service = start_service(db_url, spool, log)
                restarts += 1
        caught_up_to(spool.stat().st_size)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(15)
        log.close()
    assert kills == 2 and restarts == 2, "the service must have been killed mid-stream twice"
    rows = ledger.intervals("local")
    got = {(r["uid"], r["start_s"]): r["end_s"] for r in rows}
    assert len(rows) == len(got), "an interval was recorded twice"
    assert got == truth(events)
    assert all(v is not None for v in got.values()), "every server stopped in the stream"
    engine.dispose()
