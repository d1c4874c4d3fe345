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

    .venv/bin/python -m benchmarks.accounting --report-intervals 10000000

runs only the report latency at full scale, on SQLite and PostgreSQL: a
ledger of that many closed intervals (500 users in 20 groups, one year,
written in time order as a collector would) bulk-loaded through the migrated
schema (executemany into SQLite, COPY into PostgreSQL), then four reports:
one month of every group, one month of one group, one month of one user, one
year of one group. Results: benchmarks/results/accounting_reports.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import resource
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
REPORT_RESULTS = RESULTS.with_name("accounting_reports.json")
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


@contextlib.contextmanager
def postgres():
    """A throwaway PostgreSQL server's URL (tests/accounting/pg.py), or the reason there is none."""
    try:
        from tests.accounting.pg import PostgresUnavailable, start_postgres
        from tests.conftest import free_port

        server = start_postgres(free_port())
    except (ImportError, PostgresUnavailable) as e:
        yield None, str(e)
        return
    try:
        yield server.url, None
    finally:
        server.stop()


COLUMNS = ["source", "uid", "start_s", "end_s", "last_seen_s", "user_name", "group_name", "kind",
           "profile", "accelerator", "accelerator_kind", "accelerator_count", "gpu_fraction",
           "cpu", "memory", "namespace", "name"]  # fmt: skip
_ACCELERATORS = [("", "", 0, 1.0), ("a100", "gpu", 1, 1.0), ("t4", "gpu", 2, 1.0),
                 ("mig-1g.10gb", "mig", 1, 0.142857)]  # fmt: skip


def ledger_rows(n: int, seed: int = 10):
    """``n`` closed intervals over one year in start order (as a collector appends them).

    500 users, user ``k`` in group ``g{k % 20}``; 1 minute to 1 day long; a
    quarter each CPU-only, A100, 2x T4 and MIG slices; interactive and batch.
    """
    rng = random.Random(seed)
    span = YEAR[1] - YEAR[0] - 86400
    for i in range(n):
        start = YEAR[0] + i * span // n
        end = start + rng.randrange(60, 86400)
        user = rng.randrange(500)
        accel, accel_kind, count, fraction = _ACCELERATORS[i & 3]
        yield ("bench", f"uid-{i}", start, end, end, f"user{user}", f"g{user % 20}",
               "batch" if i % 3 == 0 else "interactive", "", accel, accel_kind, count, fraction,
               float(1 << (i % 3)), 4 << 30, "ns", f"p{i}")  # fmt: skip


def bulk_load(engine, n: int, chunk: int = 100_000) -> None:
    """Fill the migrated ``usage_interval`` table with ``ledger_rows(n)``, fast."""
    raw = engine.raw_connection()
    try:
        connection = raw.driver_connection
        rows = ledger_rows(n)
        if engine.dialect.name == "postgresql":
            columns = ", ".join(COLUMNS)
            with connection.cursor() as cursor:
                with cursor.copy(f"COPY usage_interval ({columns}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                cursor.execute("ANALYZE usage_interval")  # what autovacuum does after a load
            connection.commit()
        else:
            sql = (f"INSERT INTO usage_interval ({', '.join(COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(COLUMNS))})")  # fmt: skip
            while batch := list(itertools.islice(rows, chunk)):
                connection.executemany(sql, batch)
                connection.commit()
    finally:
        raw.close()


def _rss_mib(pid: int | str = "self", field: str = "VmHWM") -> float | None:
    """Peak (VmHWM) or current (VmRSS) resident memory of a process, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _db_size_mib(engine) -> float:
    with engine.connect() as c:
        if engine.dialect.name == "postgresql":
            size = c.execute(text("SELECT pg_total_relation_size('usage_interval')")).scalar_one()
        else:
            size = os.path.getsize(engine.url.database)
    return round(size / 2**20, 1)


REPORTS = (
    ("month_all_groups", "2025-03", Filter(), "group"),
    ("month_one_group", "2025-03", Filter(groups=("g3",)), "user"),
    ("month_one_user", "2025-03", Filter(users=("user7",)), "group"),
    ("year_one_group", "2025", Filter(groups=("g3",)), "user"),
)


def bench_reports_bulk(url: str, size: int, runs: int = 3) -> dict:
    """Report latency over a bulk-loaded ledger of ``size`` intervals; RSS of both ends."""
    with contextlib.suppress(OSError):  # reset this process's VmHWM: the peak of this run only
        Path("/proc/self/clear_refs").write_text("5")
    engine = fresh(url)
    t = time.perf_counter()
    bulk_load(engine, size)
    fill_s = time.perf_counter() - t
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM usage_interval")).scalar_one() == size
    out = {"ledger_intervals": size, "fill_s": round(fill_s, 1),
           "fill_per_s": round(size / fill_s), "db_mib": _db_size_mib(engine)}  # fmt: skip
    backend = None
    if engine.dialect.name == "postgresql":
        with engine.connect() as c:
            backend = c.execute(text("SELECT pg_backend_pid()")).scalar_one()
    for name, period, flt, by in REPORTS:
        start, end = parse_period(period)
        times, rows = [], 0
        for _ in range(runs):
            t = time.perf_counter()
            rows = len(summarize(query_usage(engine, start, end, flt, YEAR[1]), by))
            times.append(time.perf_counter() - t)
        out[name] = {"first_ms": round(times[0] * 1000, 1), "best_ms": round(min(times) * 1000, 1),
                     "rows": rows}  # fmt: skip
        print(f"    {name}: {out[name]}", flush=True)
    out["bench_process_peak_rss_mib"] = _rss_mib()
    if backend is not None:  # the pool keeps one connection: the one that ran the reports
        out["postgres_backend_peak_rss_mib"] = _rss_mib(backend)
    engine.dispose()
    return out


def main_reports(size: int) -> dict:
    results = {"machine": platform.platform(), "python": platform.python_version(),
               "cpus": os.cpu_count()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        print(f"==> report latency over {size} intervals, SQLite (bulk load)", flush=True)
        results["reports_sqlite"] = bench_reports_bulk(f"sqlite:///{tmp}/r.db", size)
        print(results["reports_sqlite"], flush=True)
    with postgres() as (url, why):
        print(f"==> report latency over {size} intervals, PostgreSQL (COPY)", flush=True)
        results["reports_postgresql"] = bench_reports_bulk(url, size) if url else {"skipped": why}
        print(results["reports_postgresql"], flush=True)
    results["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    REPORT_RESULTS.parent.mkdir(exist_ok=True)
    REPORT_RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return results


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
    parser.add_argument(
        "--report-intervals",
        type=int,
        default=None,
        help="only report latency, over a bulk-loaded ledger of this many intervals, "
        "on SQLite and PostgreSQL (e.g. 10000000)",
    )
    args = parser.parse_args(argv)
    if args.report_intervals:
        return main_reports(args.report_intervals)
    results = {"machine": platform.platform(), "python": platform.python_version()}
    events = synthetic(args.intervals)
    with tempfile.TemporaryDirectory() as tmp:
        print("==> ingestion, SQLite", flush=True)
        results["ingest_sqlite"] = bench_ingest(f"sqlite:///{tmp}/i.db", events)
        print(results["ingest_sqlite"], flush=True)
        with postgres() as (url, why):
            print("==> ingestion, PostgreSQL", flush=True)
            results["ingest_postgresql"] = bench_ingest(url, events) if url else {"skipped": why}
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
