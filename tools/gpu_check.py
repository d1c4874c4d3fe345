#!/usr/bin/env python3
"""Check labfleet's GPU discovery and exclusive allocation on a machine with NVIDIA GPUs.

Run from a checkout, no install needed (only nvidia-ml-py, pyyaml, jsonschema
and jinja2)::

    python3 tools/gpu_check.py [--catalogue config/catalogue.yaml]

It discovers GPUs and MIG instances through NVML, derives a small catalogue
from what it finds (one accelerator per GPU model and per MIG profile), hands
every device out exclusively to two owners, checks that a third request is
refused with the user-facing message and that a failed request holds nothing,
releases everything, and starts a child process with ``CUDA_VISIBLE_DEVICES``
set to the first owner's UUIDs to show what a notebook would get. NVML itself
ignores ``CUDA_VISIBLE_DEVICES``, so the child reports its environment (and,
if PyTorch is installed, what CUDA sees).

Prints a JSON summary. Exit status: 0 when every check passed or there is no
GPU (with a clear message), 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What a notebook process sees: run in a child with the allocated devices' environment.
CHILD = r"""
import json, os
seen = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")}
try:
    import torch
    count = torch.cuda.device_count()
    seen["torch_device_count"] = count
    seen["torch_devices"] = [torch.cuda.get_device_name(i) for i in range(count)]
except Exception as e:  # PyTorch is optional here
    seen["torch"] = f"not checked: {type(e).__name__}"
print(json.dumps(seen))
"""


def _use_checkout() -> None:
    # Import labfleet_spawner / labfleet_hub from this checkout without installing it.
    for folder in ("spawner", "hub"):
        path = str(REPO / folder)
        if path not in sys.path:
            sys.path.insert(0, path)


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63].strip("-")
    return slug or "gpu"


def derived_catalogue_data(discovery) -> tuple[dict, list[str]]:
    """Catalogue data with one accelerator per GPU model and per MIG profile found."""
    from labfleet_spawner.nvml import GpuDevice

    notes = []
    accelerators: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for unit in discovery.allocatable():
        if isinstance(unit, GpuDevice):
            name = _slug(unit.name)
            entry = {"kind": "gpu", "resource": "nvidia.com/gpu", "nvml_models": [unit.name]}
        elif unit.profile and re.fullmatch(r"[0-9]+g\.[0-9]+gb", unit.profile):
            name = _slug(f"mig-{unit.profile}")
            entry = {
                "kind": "mig",
                "resource": f"nvidia.com/mig-{unit.profile}",
                "mig_profile": unit.profile,
            }
        else:
            notes.append(
                f"MIG device {unit.uuid} ({unit.name}) has a profile the catalogue cannot name"
            )
            continue
        accelerators.setdefault(name, {"name": name, "display_name": unit.name, **entry})
        counts[name] = counts.get(name, 0) + 1
    for name, entry in accelerators.items():
        entry["max_count"] = min(counts[name], 16)
    profiles = [
        {
            "name": f"p-{name}"[:63].rstrip("-."),
            "images": ["any"],
            "sizes": ["any"],
            "accelerator": name,
        }
        for name in accelerators
    ]
    data = {
        "images": [{"name": "any", "image": "none"}],
        "sizes": [{"name": "any", "cpu": 1, "memory": "1Gi"}],
        "accelerators": list(accelerators.values()),
        "profiles": profiles or [{"name": "cpu", "images": ["any"], "sizes": ["any"]}],
    }
    return data, notes


def _run_child(env_update: dict[str, str]) -> dict:
    import os

    env = {**os.environ, **env_update}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_accelerator(allocator, accelerator, run_child=_run_child) -> dict:
    """Exclusive hand-out of every device of ``accelerator`` to two owners, then refusals."""
    from labfleet_spawner.devices import NoFreeDevice, cuda_visible_devices

    result: dict = {"accelerator": accelerator.name, "failures": []}
    fail = result["failures"].append
    matching = {d.uuid for d in allocator.matching(accelerator)}
    total = len(matching)
    result["total"] = total
    first, second = math.ceil(total / 2), total - math.ceil(total / 2)

    alice = allocator.allocate("alice/", accelerator, first)
    bob = allocator.allocate("bob/", accelerator, second) if second else []
    a_ids, b_ids = [d.uuid for d in alice], [d.uuid for d in bob]
    result["alice"], result["bob"] = a_ids, b_ids
    if set(a_ids) & set(b_ids):
        fail(f"a device was given twice: {sorted(set(a_ids) & set(b_ids))}")
    if set(a_ids) | set(b_ids) != matching:
        fail("the two owners do not hold exactly the matching devices")
    try:
        got = allocator.allocate("carol/", accelerator, 1)
        fail(f"a third request got {[d.uuid for d in got]} although everything was in use")
    except NoFreeDevice as e:
        result["refusal"] = str(e)
        if "is free" not in str(e) or f"{total} in total" not in str(e):
            fail(f"unexpected refusal message: {e}")
    if allocator.held_by("carol/"):
        fail("a refused request holds devices")

    if bob:
        allocator.release("bob/")
        try:
            allocator.allocate("carol/", accelerator, len(bob) + 1)
            fail("a request for more than is free was granted")
        except NoFreeDevice as e:
            result["partial_refusal"] = str(e)
        if allocator.held_by("carol/") or allocator.free_and_total(accelerator)[0] != len(bob):
            fail("a refused request was not all-or-nothing")

    env = {"CUDA_VISIBLE_DEVICES": cuda_visible_devices(alice)}
    env["NVIDIA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"]
    child = run_child(env)
    result["child"] = child
    if child.get("CUDA_VISIBLE_DEVICES") != env["CUDA_VISIBLE_DEVICES"]:
        fail(f"the child saw CUDA_VISIBLE_DEVICES={child.get('CUDA_VISIBLE_DEVICES')!r}")
    if "torch_device_count" in child and child["torch_device_count"] != len(alice):
        # CUDA enumerates at most one MIG instance per process; more would be a surprise.
        fail(f"CUDA saw {child['torch_device_count']} devices, {len(alice)} were allocated")

    for owner in ("alice/", "bob/", "carol/"):
        allocator.release(owner)
    if allocator.free_and_total(accelerator) != (total, total):
        fail("devices are still held after release")
    return result


def run(catalogue_path: Path | None, run_child=_run_child, nvml=None) -> dict:
    from labfleet_spawner.catalogue import CatalogueError, load_catalogue, parse_catalogue
    from labfleet_spawner.devices import DeviceAllocator
    from labfleet_spawner.nvml import discover

    started = time.monotonic()
    discovery = discover(nvml)
    summary: dict = {
        "discovery_seconds": round(time.monotonic() - started, 3),
        "reason": discovery.reason,
        "warnings": list(discovery.warnings),
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "memory_total": g.memory_total,
                "mig_enabled": g.mig_enabled,
                "mig": [
                    {"uuid": m.uuid, "name": m.name, "profile": m.profile, "slot": m.index}
                    for m in g.mig_devices
                ],
            }
            for g in discovery.devices
        ],
    }
    if not discovery.allocatable():
        summary["ok"] = True
        summary["message"] = f"no GPU to check: {discovery.reason or 'nothing allocatable'}"
        return summary

    data, notes = derived_catalogue_data(discovery)
    summary["notes"] = notes
    catalogue = parse_catalogue(data, source="<derived from NVML>")
    allocator = DeviceAllocator.from_discovery(discovery)
    summary["checks"] = [
        check_accelerator(allocator, a, run_child) for a in catalogue.accelerators.values()
    ]
    if catalogue_path and catalogue_path.exists():
        try:
            configured = load_catalogue(catalogue_path)
            summary["catalogue_availability"] = {
                name: list(ft)
                for name, ft in allocator.availability(configured.accelerators.values()).items()
            }
        except CatalogueError as e:
            summary["catalogue_error"] = str(e)
    summary["ok"] = not any(c["failures"] for c in summary["checks"])
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--catalogue",
        type=Path,
        default=REPO / "config" / "catalogue.yaml",
        help="also report which of this catalogue's accelerators this machine has",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    _use_checkout()
    summary = run(args.catalogue)
    print(json.dumps(summary, indent=2))
    if "message" in summary:
        print(summary["message"], file=sys.stderr)
    else:
        print("gpu_check: " + ("all checks passed" if summary["ok"] else "FAILED"), file=sys.stderr)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
