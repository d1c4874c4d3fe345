"""Usage reports: per user or group and period, computed in the database, weighted in Python.

:func:`query_usage` asks the database for the overlap of every interval
with the period, summed per (user, group, kind, accelerator); that is the
part that must scale with the ledger. :func:`summarize` is pure: it turns
those sums into GPU-hours per model (MIG slices weighted by their fraction
of a GPU, configurable), FPGA-hours, CPU-core-hours and memory-GB-hours,
interactive and batch apart. :func:`to_csv` and :func:`series_svg` render;
:func:`format_hours` is how every page writes hours.

:func:`query_recent` lists single intervals (the usage page's "Recent sessions
and jobs"), newest first, through the same :class:`Filter`;
:func:`describe_interval` (pure) says what each one was and what it used.
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from labfleet_hub.contract import KIND_BATCH
from sqlalchemy import Engine, case, func, literal, select

from .kube import SOURCE as KUBE_SOURCE
from .models import UsageInterval
from .spool import SOURCE as LOCAL_SOURCE

GB = 10**9  # memory-GB-hours use decimal gigabytes, like cloud billing


class PeriodError(ValueError):
    pass


def parse_period(text: str) -> tuple[int, int]:
    """``2025-03`` (month), ``2025-Q1``, ``2025`` (year) or ``2025-03-01`` (day) -> [start, end)."""

    def ts(y, m, d=1):
        return int(datetime(y, m, d, tzinfo=UTC).timestamp())

    def next_month(y, m):
        return (y + 1, 1) if m == 12 else (y, m + 1)

    text = (text or "").strip()
    try:
        if len(text) == 4:
            y = int(text)
            return ts(y, 1), ts(y + 1, 1)
        if len(text) == 7 and text[5] == "Q":
            y, q = int(text[:4]), int(text[6])
            if not 1 <= q <= 4:
                raise ValueError
            m = 3 * (q - 1) + 1
            return ts(y, m), ts(*next_month(y, m + 2))
        if len(text) == 7:
            y, m = int(text[:4]), int(text[5:])
            return ts(y, m), ts(*next_month(y, m))
        if len(text) == 10:
            day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
            return int(day.timestamp()), int(day.timestamp()) + 86400
    except ValueError:
        pass
    raise PeriodError(
        f"period {text[:32]!r} is not understood; use YYYY, YYYY-Qn, YYYY-MM or YYYY-MM-DD"
    )


def period_of(kind: str, at: int) -> tuple[int, int]:
    """The calendar ``month``/``quarter``/``year`` containing ``at``."""
    day = datetime.fromtimestamp(at, UTC)
    if kind == "month":
        return parse_period(f"{day.year:04d}-{day.month:02d}")
    if kind == "quarter":
        return parse_period(f"{day.year:04d}-Q{(day.month - 1) // 3 + 1}")
    if kind == "year":
        return parse_period(f"{day.year:04d}")
    raise PeriodError(f"period kind {kind!r} is not month, quarter or year")


@dataclass(frozen=True)
class Filter:
    users: tuple[str, ...] | None = None  # None: any
    groups: tuple[str, ...] | None = None
    kinds: tuple[str, ...] | None = None
    accelerator_kinds: tuple[str, ...] | None = None


def _overlap(start: int, end: int, now: int):
    """SQL for the seconds an interval overlaps [start, end); open intervals run to ``now``."""
    t = UsageInterval
    stop = func.coalesce(t.end_s, literal(now))
    lo = case((t.start_s > start, t.start_s), else_=literal(start))
    hi = case((stop < end, stop), else_=literal(end))
    return hi - lo, stop


def _where(query, start: int, end: int, stop, flt: Filter):
    t = UsageInterval
    query = query.where(t.start_s < end, stop > start)
    if flt.users is not None:
        query = query.where(t.user_name.in_(flt.users))
    if flt.groups is not None:
        query = query.where(t.group_name.in_(flt.groups))
    if flt.kinds is not None:
        query = query.where(t.kind.in_(flt.kinds))
    if flt.accelerator_kinds is not None:
        query = query.where(t.accelerator_kind.in_(flt.accelerator_kinds))
    return query


def query_usage(engine: Engine, start: int, end: int, flt: Filter = Filter(), now: int = 0):
    """Rows of summed overlap per (user, group, kind, accelerator, accelerator kind, fraction)."""
    t = UsageInterval
    seconds, stop = _overlap(start, end, now or end)
    keys = (t.user_name, t.group_name, t.kind, t.accelerator, t.accelerator_kind, t.gpu_fraction)
    query = select(
        *keys,
        func.sum(seconds).label("seconds"),
        func.sum(seconds * t.accelerator_count).label("device_seconds"),
        func.sum(seconds * t.cpu).label("cpu_seconds"),
        func.sum(seconds * t.memory).label("memory_byte_seconds"),
        func.count().label("intervals"),
    ).group_by(*keys)
    with engine.connect() as connection:
        return [
            dict(r) for r in connection.execute(_where(query, start, end, stop, flt)).mappings()
        ]


@dataclass
class Weights:
    """How accelerator time becomes GPU-hours."""

    mig: str = "fraction"  # "fraction": a slice counts its gpu_fraction; "whole": as one GPU
    overrides: Mapping[str, float] = field(default_factory=dict)  # accelerator name -> weight

    def gpu_weight(self, accelerator: str, kind: str, fraction: float) -> float:
        if accelerator in self.overrides:
            return float(self.overrides[accelerator])
        if kind == "mig" and self.mig == "fraction":
            return float(fraction)
        return 1.0


def _empty() -> dict:
    return {
        "gpu_hours": {},
        "gpu_hours_total": 0.0,
        "fpga_hours": {},
        "cpu_core_hours": 0.0,
        "memory_gb_hours": 0.0,
        "wall_hours": 0.0,
        "intervals": 0,
    }


def summarize(rows: Iterable[Mapping], by: str = "user", weights: Weights | None = None):
    """Per ``by`` (``user`` or ``group``) and kind: hours of each resource. Pure.

    Returns ``{name: {"interactive": {...}, "batch": {...}, "total": {...}}}``.
    """
    if by not in ("user", "group"):
        raise ValueError("by must be 'user' or 'group'")
    weights = weights or Weights()
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        name = row["user_name"] if by == "user" else row["group_name"]
        per = out.setdefault(name, {})
        # PostgreSQL sums integers as numeric (Decimal in Python): floats from here on.
        seconds, device_seconds = float(row["seconds"]), float(row["device_seconds"])
        cpu_seconds, byte_seconds = float(row["cpu_seconds"]), float(row["memory_byte_seconds"])
        for bucket in (row["kind"], "total"):
            acc = per.setdefault(bucket, _empty())
            acc["wall_hours"] += seconds / 3600
            acc["cpu_core_hours"] += cpu_seconds / 3600
            acc["memory_gb_hours"] += byte_seconds / GB / 3600
            acc["intervals"] += int(row["intervals"])
            kind, model = row["accelerator_kind"], row["accelerator"]
            device_hours = device_seconds / 3600
            if kind in ("gpu", "mig"):
                hours = device_hours * weights.gpu_weight(model, kind, row["gpu_fraction"])
                acc["gpu_hours"][model] = acc["gpu_hours"].get(model, 0.0) + hours
                acc["gpu_hours_total"] += hours
            elif kind == "fpga":
                acc["fpga_hours"][model] = acc["fpga_hours"].get(model, 0.0) + device_hours
    for per in out.values():
        for acc in per.values():
            for key in ("wall_hours", "cpu_core_hours", "memory_gb_hours", "gpu_hours_total"):
                acc[key] = round(acc[key], 6)
            for key in ("gpu_hours", "fpga_hours"):
                acc[key] = {k: round(v, 6) for k, v in sorted(acc[key].items())}
    return out


def to_csv(summary: Mapping, by: str) -> str:
    """One line per (name, kind, resource, model): easy to pivot in a spreadsheet."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([by, "kind", "resource", "model", "hours"])
    for name in sorted(summary):
        for kind in ("interactive", "batch", "total"):
            acc = summary[name].get(kind)
            if not acc:
                continue
            for model, hours in acc["gpu_hours"].items():
                writer.writerow([name, kind, "gpu", model, hours])
            for model, hours in acc["fpga_hours"].items():
                writer.writerow([name, kind, "fpga", model, hours])
            writer.writerow([name, kind, "cpu_core", "", acc["cpu_core_hours"]])
            writer.writerow([name, kind, "memory_gb", "", acc["memory_gb_hours"]])
    return buffer.getvalue()


def query_series(
    engine: Engine,
    start: int,
    end: int,
    bucket: int,
    flt: Filter = Filter(),
    weights: Weights | None = None,
    now: int = 0,
) -> list[dict]:
    """GPU-hours and CPU-core-hours per time bucket, interactive and batch apart."""
    if bucket <= 0 or (end - start) / bucket > 400:
        raise PeriodError("at most 400 buckets per series; choose a larger bucket")
    series = []
    for lo in range(start, end, bucket):
        hi = min(lo + bucket, end)
        summary = summarize(query_usage(engine, lo, hi, flt, now), "group", weights)
        point = {"start": lo, "end": hi}
        for kind in ("interactive", "batch"):
            point[f"gpu_hours_{kind}"] = round(
                sum(g.get(kind, _empty())["gpu_hours_total"] for g in summary.values()), 6
            )
            point[f"cpu_core_hours_{kind}"] = round(
                sum(g.get(kind, _empty())["cpu_core_hours"] for g in summary.values()), 6
            )
        series.append(point)
    return series


#: What :func:`query_recent` reads of an interval (and :func:`describe_interval` uses).
RECENT_COLUMNS = (
    "source", "uid", "kind", "user_name", "group_name", "profile", "accelerator",
    "accelerator_kind", "accelerator_count", "gpu_fraction", "cpu", "memory",
    "namespace", "name", "start_s", "end_s",
)  # fmt: skip


def query_recent(
    engine: Engine, start: int, end: int, flt: Filter = Filter(), now: int = 0, limit: int = 50
) -> list[dict]:
    """The ``limit`` intervals overlapping [start, end) that ``flt`` lets through, newest first.

    Newest = latest start (the ledger's id breaks ties); ``flt`` is the report's
    (:func:`labfleet_accounting.authz.scope_for`), so the list shows exactly the
    intervals the totals add up. Open intervals run to ``now``.
    """
    if limit <= 0:
        return []
    t = UsageInterval
    stop = func.coalesce(t.end_s, literal(now or end))
    query = select(*(getattr(t, c) for c in RECENT_COLUMNS))
    query = _where(query, start, end, stop, flt)
    query = query.order_by(t.start_s.desc(), t.id.desc()).limit(limit)
    with engine.connect() as connection:
        return [dict(r) for r in connection.execute(query).mappings()]


# The Job controller names the pods of an Indexed Job (every labfleet Job is)
# "<job>-<completion index>-<5 random characters>", truncating only Job names
# longer than labfleet's (at most 41 characters: labfleet_batch.jobs.new_job_name).
_INDEXED_JOB_POD = re.compile(r"^(?P<job>.+)-\d+-[a-z0-9]{5}$")


def kube_job_name(pod_name: str) -> str:
    """The Kubernetes Job of a batch pod, from the pod's name (the name itself if not a Job's)."""
    match = _INDEXED_JOB_POD.match(pod_name or "")
    return match.group("job") if match else pod_name or ""


def interval_what(row: Mapping) -> str:
    """What an interval was, as its owner knows it.

    Batch: the job id ``<group>/<name>`` the batch service uses (``labfleet-batch
    status``): a local job's ledger uid, a Kubernetes Job's name from its pod's.
    Interactive: the notebook server (its name; ``default server`` for the unnamed
    one), on Kubernetes its pod.
    """
    source, uid, name = row["source"], row["uid"] or "", row["name"] or ""
    if row["kind"] == KIND_BATCH:
        if source == KUBE_SOURCE:
            job = kube_job_name(name) or uid
            return f"{row['group_name']}/{job}" if row["group_name"] else job
        return uid
    if source == LOCAL_SOURCE:
        return name or "default server"
    return name or uid


def describe_interval(row: Mapping, weights: Weights | None = None, now: int = 0) -> dict:
    """One row of :func:`query_recent` as the page and the API show it. Pure.

    Hours are those of the whole interval (an open one up to ``now``), not only
    its part in the period; GPU-hours weighted as in :func:`summarize`.
    """
    weights = weights or Weights()
    start, end = int(row["start_s"]), row["end_s"]
    stop = int(end) if end is not None else max(int(now), start)
    hours = max(stop - start, 0) / 3600
    kind, model = row["accelerator_kind"] or "", row["accelerator"] or ""
    count = int(row["accelerator_count"] or 0)
    device_hours = hours * count if model else 0.0
    gpu_hours = fpga_hours = 0.0
    if kind in ("gpu", "mig"):
        gpu_hours = device_hours * weights.gpu_weight(model, kind, row["gpu_fraction"])
    elif kind == "fpga":
        fpga_hours = device_hours
    return {
        "kind": row["kind"],
        "what": interval_what(row),
        "user": row["user_name"],
        "group": row["group_name"],
        "profile": row["profile"] or "",
        "accelerator": model,
        "accelerator_kind": kind,
        "accelerator_count": count if model else 0,
        "start": start,
        "end": int(end) if end is not None else None,
        "running": end is None,
        "seconds": max(stop - start, 0),
        "cpu_core_hours": round(hours * float(row["cpu"] or 0), 6),
        "memory_gb_hours": round(hours * float(row["memory"] or 0) / GB, 6),
        "gpu_hours": round(gpu_hours, 6),
        "fpga_hours": round(fpga_hours, 6),
        "source": row["source"],
        "uid": row["uid"],
    }


def format_hours(value: float) -> str:
    """Hours as every page shows them: three significant digits, never an exponent.

    ``0``, ``0.00222``, ``0.0417``, ``1.25``, ``12.5``, ``1250``: a short session
    (a few core-seconds) is not rounded to "0.00", and the chart's axis, its bars'
    tooltips and the totals table say the same number the same way.
    """
    value = float(value)
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    decimals = min(2 - math.floor(math.log10(abs(value))), 9)
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (> 0): an axis top."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        top = step * power
        # a float's log10 may land a hair below: 0.3 -> 0.5, not 0.3000000001 -> 0.5
        if top >= value * (1 - 1e-9):
            return float(f"{top:.12g}")
    return 10 * power


def series_total(series: list[dict], metric: str) -> float:
    """All of ``metric`` (interactive and batch) over the series: 0 means nothing to draw."""
    return sum(p[f"{metric}_interactive"] + p[f"{metric}_batch"] for p in series)


def series_svg(
    series: list[dict], metric: str = "gpu_hours", width=640, height=220, unit: str = "h"
) -> str:
    """A stacked bar chart (interactive below, batch above) as inline SVG; no scripts, no CDN.

    The y axis runs from 0 to a round number at or above the largest bar (ticks at
    0, half and top), labelled with :func:`format_hours` and ``unit`` as a tables'
    column header says it ("CPU core-h"): the axis and the table agree.
    """
    pad_l, pad_b, pad_t = 56, 24, 18
    plot_w, plot_h = width - pad_l - 8, height - pad_b - pad_t
    totals = [p[f"{metric}_interactive"] + p[f"{metric}_batch"] for p in series] or [0]
    top = nice_ceiling(max(totals))
    bar_w = plot_w / max(len(series), 1)
    base_y = pad_t + plot_h
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 14}" '
        f'role="img" aria-label="{metric} per period" data-metric="{metric}">',
        # the unit over the axis, from its left end: as wide as it needs
        f'<text class="unit" x="{pad_l}" y="10" font-size="10" font-weight="bold">'
        f"{html.escape(unit)}</text>",
    ]
    for fraction in (0, 0.5, 1):
        y = base_y - plot_h * fraction
        css = "axis" if fraction == 0 else "grid"
        dash = "" if fraction == 0 else ' stroke-dasharray="3 3"'
        parts.append(
            f'<line class="{css}" x1="{pad_l}" y1="{y:.1f}" x2="{width - 8}" y2="{y:.1f}" '
            f'stroke="#888"{dash}/>'
            f'<text class="tick" x="{pad_l - 6}" y="{y + 3:.1f}" font-size="10" '
            f'text-anchor="end">{format_hours(top * fraction)}</text>'
        )
    for i, point in enumerate(series):
        x = pad_l + i * bar_w
        base = base_y
        label = datetime.fromtimestamp(point["start"], UTC).strftime("%Y-%m-%d")
        for kind, colour in (("interactive", "#4878d0"), ("batch", "#ee854a")):
            value = point[f"{metric}_{kind}"]
            h = plot_h * value / top
            base -= h
            w = max(bar_w - 2, 1)
            parts.append(
                f'<rect class="{kind}" x="{x + 1:.1f}" y="{base:.1f}" width="{w:.1f}" '
                f'height="{h:.1f}" fill="{colour}">'
                f"<title>{label} {kind}: {format_hours(value)} {html.escape(unit)}</title></rect>"
            )
    # about five dates along the axis, the last period always
    step = max(1, round(len(series) / 5))
    for i, point in enumerate(series):
        if i % step == 0 or i == len(series) - 1:
            x = pad_l + i * bar_w + bar_w / 2
            day = datetime.fromtimestamp(point["start"], UTC).strftime("%m-%d")
            parts.append(
                f'<text x="{x:.1f}" y="{base_y + 14}" font-size="10" '
                f'text-anchor="middle">{day}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)
