"""Accounting benchmark: ingestion rate, report latency over a large ledger, collector memory.

    .venv/bin/python -m benchmarks.accounting [--intervals 20000] [--ledger 1000000] [--pods 20000]

- ingestion: closed intervals per second through ``Ledger.apply`` (idempotent
  upserts, batches of 500) into SQLite and PostgreSQL, against a plain
  ``INSERT`` loop (executemany, same batches, no conflict handling) in the same run;
- report latency: one month's per-group report and a user's report over a
  synthetic ledger of ``--ledger`` intervals (500 users, one year), SQLite;
- collector memory: peak Python allocation (tracemalloc) of one resync over
  ``--pods`` synthetic pods served page by page.

PostgreSQL is a throwaway server (tests/accounting/pg.py); skipped if absent.
Results: benchmarks/results/accounting.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

from labfleet_accounting import db
from labfleet_accounting.kube import KubeCollector
from labfleet_accounting.ledger import Ledger
from labfleet_accounting.records import STOP, Event, Usage
from labfleet_accounting.reports import Filter, parse_period, query_usage, summarize
from labfleet_hub.contract import KIND_BATCH, LABEL_GROUP, LABEL_KIND, LABEL_USER
from sqlalchemy import text

RESULTS = Path(__file__).parent / "results" / "accounting.json"
YEAR = parse_period("2025")


def synthetic(n: int, seed=1, source="bench"):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        start = rng.randrange(YEAR[0], YEAR[1] - 86400)
        u = Usage(source, f"uid-{i}", start, f"user{rng.randrange(500)}", f"g{rng.randrange(20)}",
                  rng.choice(["interactive", "batch"]), accelerator=rng.choice(["", "a100", "t4"]),
                  accelerator_kind="gpu", accelerator_count=rng.randint(0, 2),
                  cpu=rng.choice([1, 2, 4]), memory=4 << 30)  # fmt: skip
        out.append(Event(STOP, u, start + rng.randrange(60, 86400)))
    return out


def fresh(url):
    engine = db.make_engine(url)
    db.upgrade(engine)
    return engine


def bench_ingest(url, events, batch=500):
    engine = fresh(url)
    ledger = Ledger(engine)
    t = time.perf_counter()
    for i in range(0, len(events), batch):
        ledger.apply(events[i : i + batch])
    ledger_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(events), batch):  # replay: every row conflicts, nothing changes
        ledger.apply(events[i : i + batch])
    replay_s = time.perf_counter() - t
    with engine.begin() as c:
        c.execute(text("DELETE FROM usage_interval"))
    cols = ["source", "uid", "start_s", "end_s", "last_seen_s", "user_name", "group_name", "kind",
            "profile", "accelerator", "accelerator_kind", "accelerator_count", "gpu_fraction",
            "cpu", "memory", "namespace", "name"]  # fmt: skip
    sql = text(f"INSERT INTO usage_interval ({', '.join(cols)}) VALUES "
               f"({', '.join(':' + c for c in cols)})")  # fmt: skip
    t = time.perf_counter()
    for i in range(0, len(events), batch):
        rows = [
            {**e.usage.row(), "end_s": e.at, "last_seen_s": e.at} for e in events[i : i + batch]
        ]
        with engine.begin() as c:
            c.execute(sql, rows)
    plain_s = time.perf_counter() - t
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM usage_interval")).scalar_one() == len(events)
    engine.dispose()
    n = len(events)
    return {
        "intervals": n,
        "ledger_per_s": round(n / ledger_s),
        "replay_per_s": round(n / replay_s),
        "plain_insert_per_s": round(n / plain_s),
        "ratio_to_plain": round(plain_s / ledger_s, 3),
    }


def bench_reports(url, size):
    engine = fresh(url)
    ledger = Ledger(engine)
    t = time.perf_counter()
    for i in range(0, size, 20000):
        ledger.apply(synthetic(min(20000, size - i), seed=i, source=f"s{i}"), seen=YEAR[1])
    fill_s = time.perf_counter() - t
    march = parse_period("2025-03")
    timings = {}
    for name, flt in (("month_all_groups", Filter()), ("month_one_user", Filter(users=("user7",))),
                      ("month_one_group", Filter(groups=("g3",)))):  # fmt: skip
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            summarize(query_usage(engine, *march, flt, YEAR[1]), "group")
            runs.append(time.perf_counter() - t)
        timings[name + "_ms"] = round(min(runs) * 1000, 1)
    engine.dispose()
    return {"ledger_intervals": size, "fill_s": round(fill_s, 1), **timings}


class SyntheticPods:
    def __init__(self, n):
        self.n = n

    async def list_page(self, limit, token):
        start = int(token or 0)
        items = []
        for i in range(start, min(start + limit, self.n)):
            labels = {LABEL_KIND: KIND_BATCH, LABEL_USER: f"u{i % 500}", LABEL_GROUP: f"g{i % 20}"}
            requests = {"cpu": "1", "memory": "1Gi"}
            items.append(
                {
                    "metadata": {
                        "uid": f"pod-{i}",
                        "name": f"p{i}",
                        "namespace": "ns",
                        "labels": labels,
                    },  # fmt: skip
                    "spec": {"containers": [{"resources": {"requests": requests}}]},
                    "status": {"phase": "Running", "startTime": "2025-03-01T00:00:00Z"},
                }
            )
        meta = {"resourceVersion": "1"}
        if start + limit < self.n:
            meta["continue"] = str(start + limit)
        return {"items": items, "metadata": meta}


def bench_collector_memory(pods):
    with tempfile.TemporaryDirectory() as tmp:
        engine = fresh(f"sqlite:///{tmp}/m.db")
        collector = KubeCollector(SyntheticPods(pods), Ledger(engine))
        tracemalloc.start()
        t = time.perf_counter()
        asyncio.run(collector.resync())
        elapsed = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        engine.dispose()
    return {"pods": pods, "resync_s": round(elapsed, 2), "peak_python_mib": round(peak / 2**20, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=int, default=20000)
    parser.add_argument("--ledger", type=int, default=1_000_000)
    parser.add_argument("--pods", type=int, default=20000)
    args = parser.parse_args(argv)
    results = {"machine": platform.platform(), "python": platform.python_version()}
    events = synthetic(args.intervals)
    with tempfile.TemporaryDirectory() as tmp:
        print("==> ingestion, SQLite", flush=True)
        results["ingest_sqlite"] = bench_ingest(f"sqlite:///{tmp}/i.db", events)
        print(results["ingest_sqlite"], flush=True)
        try:
            from tests.accounting.pg import PostgresUnavailable, start_postgres
            from tests.conftest import free_port

            server = start_postgres(free_port())
        except (ImportError, PostgresUnavailable) as e:
            results["ingest_postgresql"] = {"skipped": str(e)}
        else:
            try:
                print("==> ingestion, PostgreSQL", flush=True)
                results["ingest_postgresql"] = bench_ingest(server.url, events)
            finally:
                server.stop()
        print(results["ingest_postgresql"], flush=True)
        print(f"==> report latency over {args.ledger} intervals (SQLite)", flush=True)
        results["reports_sqlite"] = bench_reports(f"sqlite:///{tmp}/r.db", args.ledger)
        print(results["reports_sqlite"], flush=True)
    print(f"==> collector memory, {args.pods} pods", flush=True)
    results["collector_memory"] = bench_collector_memory(args.pods)
    print(results["collector_memory"], flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
