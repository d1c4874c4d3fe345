"""Single-node hook and spool collector (the local spawner's side of accounting)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from labfleet_accounting import db
from labfleet_accounting.ledger import Ledger
from labfleet_accounting.spool import STATE_START, SpoolCollector, SpoolHook


def spawner(name=""):
    accel = SimpleNamespace(name="a100-1g", kind="mig", gpu_fraction=0.125, groups=("ml",))
    selection = SimpleNamespace(
        profile=SimpleNamespace(name="gpu-small", groups=()), accelerator=accel, count=2
    )
    user = SimpleNamespace(
        name="alice", groups=[SimpleNamespace(name="cms"), SimpleNamespace(name="ml")]
    )
    # the spawner decides the charged group (one rule with Kubernetes and budgets)
    return SimpleNamespace(user=user, name=name, selection=selection, cpu_limit=2.0,
                           mem_limit=4 << 30, charged_group=lambda: "ml")  # fmt: skip


def test_hook_and_collector_roundtrip(tmp_path):
    clock = SimpleNamespace(now=1000)
    hook = SpoolHook(path=str(tmp_path / "spool"), clock=lambda: clock.now)
    s = spawner()
    assert hook.started(s) == 1000 and getattr(s, STATE_START) == 1000
    clock.now = 4600
    hook.stopped(s)
    hook.stopped(s)  # a second stop without a start is ignored, not written
    lines = (tmp_path / "spool").read_text().splitlines()
    assert [json.loads(x)["type"] for x in lines] == ["start", "stop"]

    engine = db.make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    db.upgrade(engine)
    ledger = Ledger(engine)
    collector = SpoolCollector(ledger, path=str(tmp_path / "spool"), batch_lines=1)
    # A half-written line at the end is left for later.
    with open(tmp_path / "spool", "a") as f:
        f.write('{"type": "start"')
    assert collector.ingest_available() == 2
    assert collector.ingest_available() == 0
    [row] = ledger.intervals()
    assert (row["uid"], row["start_s"], row["end_s"], row["group_name"]) == (
        "alice/",
        1000,
        4600,
        "ml",
    )
    assert (row["accelerator_kind"], row["accelerator_count"], row["gpu_fraction"]) == (
        "mig",
        2,
        0.125,
    )
    assert ledger.checkpoint("local") == str(sum(len(x) + 1 for x in lines))


def test_hook_never_raises_into_the_hub(tmp_path):
    (tmp_path / "dir").mkdir()
    hook = SpoolHook(path=str(tmp_path / "dir"))  # a directory: cannot be opened for append
    hook.started(spawner())  # logged, not raised
