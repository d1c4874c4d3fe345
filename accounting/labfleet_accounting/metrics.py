"""Prometheus metrics of the accounting service. Every metric name is listed here.

Naming rule: ``labfleet_<what>_<base unit>`` for gauges and
``labfleet_<what>_<base unit>_total`` for counters, base units only
(seconds, bytes, cores; never hours or GB), labels in snake_case. Labels:
``group`` (hub group charged), ``kind`` (interactive/batch), ``accelerator``
(catalogue name, "" for CPU-only), ``accelerator_kind`` (gpu/mig/fpga/"").

Allocation gauges (open intervals now):

- ``labfleet_running_sessions{group,kind}``: notebook servers and batch pods running
- ``labfleet_allocated_accelerators{group,kind,accelerator,accelerator_kind}``: devices held
- ``labfleet_allocated_gpu_equivalents{group,kind,accelerator}``: GPUs held, MIG weighted
- ``labfleet_allocated_cpu_cores{group,kind}``: requested cores
- ``labfleet_allocated_memory_bytes{group,kind}``: requested memory

Usage counters (every interval, closed and open, up to now; they only grow
because the ledger only grows):

- ``labfleet_accelerator_seconds_total{group,kind,accelerator,accelerator_kind}``
- ``labfleet_gpu_equivalent_seconds_total{group,kind,accelerator}``: MIG weighted
- ``labfleet_cpu_core_seconds_total{group,kind}``
- ``labfleet_memory_byte_seconds_total{group,kind}``

The GPU exporter (:mod:`labfleet_accounting.gpu_exporter`) adds, per device
or MIG instance (labels ``uuid``, ``model``, ``mig_profile``, ``parent_uuid``,
``user``, ``group``, ``owner``):

- ``labfleet_gpu_utilization_ratio`` (0-1; whole GPUs only, NVML has no MIG utilisation)
- ``labfleet_gpu_memory_used_bytes``, ``labfleet_gpu_memory_total_bytes``
- ``labfleet_gpu_power_watts`` (whole GPUs only)
- ``labfleet_gpu_exporter_errors_total``: NVML calls that failed
"""

from __future__ import annotations

import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import Engine, case, func, select

from .models import UsageInterval
from .reports import Weights


class LedgerMetrics:
    """A prometheus_client collector that reads the ledger at scrape time (cached)."""

    def __init__(self, engine: Engine, weights: Weights | None = None, cache_seconds=15.0,
                 clock=time.time):  # fmt: skip
        self.engine = engine
        self.weights = weights or Weights()
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._cached: tuple[float, list] | None = None

    def _rows(self):
        now = self.clock()
        if self._cached and now - self._cached[0] < self.cache_seconds:
            return self._cached[1]
        t = UsageInterval
        keys = (t.group_name, t.kind, t.accelerator, t.accelerator_kind, t.gpu_fraction)
        seconds = func.coalesce(t.end_s, int(now)) - t.start_s
        is_open = t.end_s.is_(None)
        one_if_open = case((is_open, 1), else_=0)
        query = select(
            *keys,
            func.sum(one_if_open).label("running"),
            func.sum(one_if_open * t.accelerator_count).label("devices"),
            func.sum(one_if_open * t.cpu).label("cpu"),
            func.sum(one_if_open * t.memory).label("memory"),
            func.sum(seconds * t.accelerator_count).label("device_seconds"),
            func.sum(seconds * t.cpu).label("cpu_seconds"),
            func.sum(seconds * t.memory).label("memory_seconds"),
        ).group_by(*keys)
        with self.engine.connect() as connection:
            rows = [dict(r) for r in connection.execute(query).mappings()]
        self._cached = (now, rows)
        return rows

    def collect(self):
        rows = self._rows()
        g2 = ["group", "kind"]
        g4 = ["group", "kind", "accelerator", "accelerator_kind"]
        g3 = ["group", "kind", "accelerator"]
        running = GaugeMetricFamily(
            "labfleet_running_sessions", "Notebook servers and batch pods running now", labels=g2
        )
        devices = GaugeMetricFamily(
            "labfleet_allocated_accelerators", "Accelerator devices held now", labels=g4
        )
        gpus = GaugeMetricFamily(
            "labfleet_allocated_gpu_equivalents", "GPUs held now, MIG slices weighted", labels=g3
        )
        cpu = GaugeMetricFamily("labfleet_allocated_cpu_cores", "CPU cores requested", labels=g2)
        mem = GaugeMetricFamily(
            "labfleet_allocated_memory_bytes", "Memory requested, bytes", labels=g2
        )
        dev_s = CounterMetricFamily(
            "labfleet_accelerator_seconds", "Accelerator device-seconds used", labels=g4
        )
        gpu_s = CounterMetricFamily(
            "labfleet_gpu_equivalent_seconds", "GPU-seconds used, MIG slices weighted", labels=g3
        )
        cpu_s = CounterMetricFamily("labfleet_cpu_core_seconds", "CPU core-seconds", labels=g2)
        mem_s = CounterMetricFamily(
            "labfleet_memory_byte_seconds", "Memory byte-seconds requested", labels=g2
        )
        # Sum first: rows differing only in gpu_fraction must not become duplicate samples.
        sums: dict[tuple, dict[tuple, float]] = {}

        def add(family, labels, value):
            per = sums.setdefault(id(family), {})
            per[tuple(labels)] = per.get(tuple(labels), 0.0) + (value or 0)

        for r in rows:
            k2 = (r["group_name"], r["kind"])
            add(running, k2, r["running"])
            add(cpu, k2, r["cpu"])
            add(mem, k2, r["memory"])
            add(cpu_s, k2, r["cpu_seconds"])
            add(mem_s, k2, r["memory_seconds"])
            if r["accelerator"]:
                k4 = (*k2, r["accelerator"], r["accelerator_kind"])
                add(devices, k4, r["devices"])
                add(dev_s, k4, r["device_seconds"])
                if r["accelerator_kind"] in ("gpu", "mig"):
                    w = self.weights.gpu_weight(
                        r["accelerator"], r["accelerator_kind"], r["gpu_fraction"]
                    )
                    add(gpus, k4[:3], (r["devices"] or 0) * w)
                    add(gpu_s, k4[:3], (r["device_seconds"] or 0) * w)
        families = (running, devices, gpus, cpu, mem, dev_s, gpu_s, cpu_s, mem_s)
        for family in families:
            for labels, value in sorted(sums.get(id(family), {}).items()):
                family.add_metric(list(labels), value)
        yield from families
