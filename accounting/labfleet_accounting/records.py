"""What collectors hand to the ledger: pure data, no I/O.

A :class:`Usage` describes one running thing (a pod, a local server) with
everything accounting needs; an :class:`Event` says it started or stopped.
Both carry the full description, so a stop seen without its start (the
service was down when the pod started) still yields a complete interval.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

START = "start"
STOP = "stop"


@dataclass(frozen=True)
class Usage:
    """One pod or local server. ``(source, uid, start)`` is its natural key."""

    source: str
    uid: str
    start: int  # epoch seconds
    user: str
    group: str
    kind: str  # labfleet_hub.contract.KIND_INTERACTIVE or KIND_BATCH
    profile: str = ""
    accelerator: str = ""
    accelerator_kind: str = ""  # gpu, mig, fpga; "" for CPU only
    accelerator_count: int = 0
    gpu_fraction: float = 1.0
    cpu: float = 0.0
    memory: int = 0
    namespace: str = ""
    name: str = ""

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.source, self.uid, self.start)

    def row(self) -> dict:
        """Column values of the ledger table (see :class:`models.UsageInterval`)."""
        data = asdict(self)
        data["start_s"] = data.pop("start")
        data["user_name"] = data.pop("user")
        data["group_name"] = data.pop("group")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Usage:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Event:
    """``type`` START (``at`` = start) or STOP (``at`` = end) of ``usage``."""

    type: str
    usage: Usage
    at: int

    def as_dict(self) -> dict:
        return {"type": self.type, "at": self.at, "usage": asdict(self.usage)}

    @classmethod
    def from_dict(cls, data: dict) -> Event:
        return cls(data["type"], Usage.from_dict(data["usage"]), int(data["at"]))


@dataclass
class Folded:
    """The net effect of a batch of events: intervals to open, intervals to close."""

    opened: dict[tuple, Usage] = field(default_factory=dict)
    closed: dict[tuple, tuple[Usage, int]] = field(default_factory=dict)


def fold(events: Iterable[Event]) -> Folded:
    """Collapse a batch into one write per key, whatever the order and duplicates.

    A key that stops in the batch is written closed (with the first end seen:
    a later duplicate stop must not move it); a key that only starts is opened.
    A start replayed after its stop does not reopen it.
    """
    result = Folded()
    for event in events:
        key = event.usage.key
        if event.type == STOP:
            result.opened.pop(key, None)
            if key not in result.closed:
                end = max(event.at, event.usage.start)  # clocks: never a negative interval
                result.closed[key] = (event.usage, end)
        elif event.type == START:
            if key not in result.closed:
                result.opened[key] = event.usage
        else:
            raise ValueError(f"unknown event type {event.type!r}; expected start or stop")
    return result


def with_source(usage: Usage, source: str) -> Usage:
    return replace(usage, source=source)
