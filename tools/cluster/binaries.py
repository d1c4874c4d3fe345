"""The test cluster's binaries: pinned versions (versions.env), cache folders, build.sh.

Loaded by cluster.py from its folder (which re-exports everything here)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SH = HERE / "build.sh"

Progress = Callable[[str], None]


def _print(msg: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _procs_module():
    """procs.py under the name cluster.py loads it with (one ClusterError class)."""
    import importlib.util

    name = "labfleet_cluster_procs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "procs.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


ClusterError = _procs_module().ClusterError


class BinariesMissing(ClusterError):
    """Raised when the component binaries are not built and cannot be built."""


# --------------------------------------------------------------------------
# versions and binaries


def versions() -> dict[str, str]:
    out = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def cache_root() -> Path:
    base = os.environ.get("LABFLEET_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "labfleet"
    )
    return Path(base) / "cluster"


def component_dirs() -> dict[str, Path]:
    v = versions()
    root = cache_root()
    return {
        "etcd": root / f"etcd-{v['ETCD_VERSION']}",
        "kubernetes": root / f"kubernetes-{v['K8S_VERSION']}-r{v.get('K8S_BUILD_REV', '1')}",
        "kwok": root / f"kwok-{v['KWOK_VERSION']}",
        "kueue": root / f"kueue-{v['KUEUE_VERSION']}-r{v.get('KUEUE_BUILD_REV', '1')}",
    }


def node_binaries() -> dict[str, Path] | None:
    """kubelet, kube-proxy and pause for the real node, or None if not built."""
    v = versions()
    k = component_dirs()["kubernetes"]
    pause = cache_root() / f"pause-{v['K8S_VERSION']}-r{v.get('PAUSE_BUILD_REV', '1')}"
    if not ((k / ".complete").is_file() and (pause / ".complete").is_file()):
        return None
    return {"kubelet": k / "kubelet", "kube-proxy": k / "kube-proxy", "pause": pause / "pause"}


def helm_binary() -> Path | None:
    """The helm binary built by build.sh (optional component), if present."""
    d = cache_root() / f"helm-{versions()['HELM_VERSION']}"
    return d / "helm" if (d / ".complete").is_file() else None


@dataclasses.dataclass
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path
    kueue: Path
    kueue_crds: Path
    kueue_webhooks: Path
    kueue_visibility: Path


def find_binaries() -> Binaries | None:
    """Return the cached binaries, or None if any component is incomplete."""
    d = component_dirs()
    if not all((p / ".complete").is_file() for p in d.values()):
        return None
    k = d["kubernetes"]
    return Binaries(
        etcd=d["etcd"] / "etcd",
        kube_apiserver=k / "kube-apiserver",
        kube_controller_manager=k / "kube-controller-manager",
        kube_scheduler=k / "kube-scheduler",
        kubectl=k / "kubectl",
        kwok=d["kwok"] / "kwok",
        kueue=d["kueue"] / "kueue",
        kueue_crds=d["kueue"] / "crds",
        kueue_webhooks=d["kueue"] / "webhook-manifests.yaml",
        kueue_visibility=d["kueue"] / "visibility",
    )


def ensure_binaries(build: bool = True, progress: Progress | None = None) -> Binaries:
    """Return the binaries, building them with build.sh if missing."""
    progress = progress or _print
    b = find_binaries()
    if b is not None:
        return b
    if not build:
        raise BinariesMissing(
            f"cluster binaries not built under {cache_root()}; run: bash {BUILD_SH}"
        )
    if shutil.which("go") is None:
        raise BinariesMissing(
            f"cluster binaries missing under {cache_root()} and no 'go' on PATH "
            "to build them (need Go >= 1.26)"
        )
    progress(f"building cluster binaries with {BUILD_SH} (cold: ~30 min on 2 cores)")
    r = subprocess.run(["bash", str(BUILD_SH)], stdout=sys.stderr, stderr=sys.stderr)
    if r.returncode != 0:
        raise BinariesMissing(f"{BUILD_SH} failed with exit status {r.returncode}")
    b = find_binaries()
    if b is None:
        raise BinariesMissing(f"{BUILD_SH} finished but binaries are incomplete")
    return b
