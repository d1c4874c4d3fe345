"""Fixtures for tests against the real Kubernetes control plane (tools/cluster).

Every test under tests/k8s gets the ``k8s`` marker.  The session fixture
``k8s_cluster`` starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok (fake fleet from tools/cluster/fleet.yaml) and the Kueue
manager on 127.0.0.1, and stops them at the end of the session.

Missing Go / binaries: skipped on a developer machine, a failure when
``CI=true``.  Binaries are built with tools/cluster/build.sh when missing.

``LABFLEET_CLUSTER_STATE=DIR`` reuses a cluster started with
``python tools/cluster/cluster.py up --state DIR`` (not stopped afterwards).

The cluster also gets a real node (containerd + kubelet + kube-proxy,
tools/cluster/node.py) where root and the kernel allow it
(``LABFLEET_REAL_NODE=auto``, the default; ``1`` must, ``0`` never).  Tests
that need it take ``k8s_real_node``: skipped with the reason where it cannot
run, a failure when ``CI=true``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # also works with --import-mode=importlib
    sys.path.insert(0, str(HERE))

from k8s_helpers import clusterlib  # noqa: E402


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"k8s test cluster unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"k8s test cluster unavailable: {reason}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.k8s)


@contextlib.contextmanager
def _live_output(config: pytest.Config) -> Iterator[None]:
    """Let progress lines through pytest's capture (cold builds take long)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        yield
        return
    with capman.global_and_fixture_disabled():
        yield


@pytest.fixture(scope="session")
def k8s_binaries(pytestconfig: pytest.Config):
    """The built component binaries (built with build.sh on first use)."""
    if shutil.which("openssl") is None:
        _unavailable("'openssl' is not on PATH")
    if clusterlib.find_binaries() is None and shutil.which("go") is None:
        _unavailable(
            f"binaries not built under {clusterlib.cache_root()} and Go is not installed; "
            "install Go >= 1.26 and run: bash tools/cluster/build.sh"
        )
    with _live_output(pytestconfig):
        try:
            return clusterlib.ensure_binaries(build=True)
        except clusterlib.BinariesMissing as e:
            _unavailable(str(e))


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A running cluster: ``.kubeconfig``, ``.server``, ``.kubectl(...)``, ``.apply(...)``."""
    reuse = os.environ.get("LABFLEET_CLUSTER_STATE")
    if reuse:
        state = Path(reuse)
        if not (state / "cluster.json").exists():
            _unavailable(f"LABFLEET_CLUSTER_STATE={reuse} holds no running cluster")
        yield clusterlib.Cluster.from_state(state)
        return

    request.getfixturevalue("k8s_binaries")
    state = tmp_path_factory.mktemp("k8s-cluster")
    with _live_output(request.config):
        cluster = clusterlib.start_cluster(state, die_with_parent=True)
    try:
        yield cluster
    finally:
        with _live_output(request.config):
            clusterlib.stop_cluster(state)
        left = clusterlib.cluster_pids(state)
        assert not left, f"cluster processes left after teardown: {left}"


@pytest.fixture(scope="session")
def k8s_real_node(k8s_cluster) -> dict:
    """The real node's facts (``name``, ``node_ip``, ``pod_cidr``, ``service_cidr``, ...)."""
    if k8s_cluster.real_node is None:
        reason = k8s_cluster.real_node_reason or "not started"
        if _in_ci():
            pytest.fail(f"the real node must run in CI: {reason}", pytrace=False)
        pytest.skip(f"no real node: {reason}")
    return k8s_cluster.real_node


@pytest.fixture(scope="session")
def k8s_real_images(k8s_cluster, k8s_real_node, pytestconfig: pytest.Config):
    """``image(name) -> ref``: labfleet's own image ``name`` (``"base"`` or one of
    :data:`labfleet_hub.images.NAMES`), built (or reused: images are cached by
    content) and imported into the real node's containerd once per session.
    Pods use the ref with ``imagePullPolicy: Never``."""
    from labfleet_hub import images

    node_lib = clusterlib.node_lib
    imported: dict[str, str] = {}

    def image(name: str) -> str:
        if name in imported:
            return imported[name]
        with _live_output(pytestconfig):
            try:
                if name == "base":
                    ref = images.ensure_base_image(progress=print)
                else:
                    ref = images.build_images([name], progress=print)[name]
                archive = images.save_archive(
                    ref, node_lib.node_dir(k8s_cluster.state_dir) / "images" / f"{name}.tar"
                )
            except (images.ImageError, OSError) as e:
                _unavailable(f"image {name!r} cannot be built: {e}")
            node_lib.import_image(k8s_cluster.state_dir, archive)
        archive.unlink(missing_ok=True)  # containerd holds it now
        listed = node_lib.ctr(k8s_cluster.state_dir, "images", "ls", "-q").stdout.split()
        assert ref in listed, (ref, listed)
        imported[name] = ref
        return ref

    return image


@pytest.fixture
def k8s_namespace(k8s_cluster) -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) after the test."""
    name = "t-" + uuid.uuid4().hex[:8]
    k8s_cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
