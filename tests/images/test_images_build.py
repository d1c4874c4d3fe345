"""The images really built with podman, on the local mmdebstrap Debian base.

Every image builds (the CUDA one without its CUDA libraries: the base has
none), runs its entry points as a non-root uid, the hub answers its own
HEALTHCHECK, no layer keeps the host's pip configuration or CA bundle, and a
second build with nothing changed is a cache lookup. Needs root (or rootless
podman), podman and mmdebstrap (tools/bootstrap.sh); with CI=true nothing skips.
The first run builds for minutes; later runs find the images cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from labfleet_hub import images

NOTEBOOKS = ("singleuser", "singleuser-cuda")


def _missing() -> str | None:
    for tool in ("podman", "mmdebstrap"):
        if not shutil.which(tool):
            return f"{tool} is not installed (tools/bootstrap.sh installs it as root)"
    proc = subprocess.run(["podman", "info"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"podman does not work here: {proc.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def built():
    why = _missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: the image tests cannot run: {why}")
        pytest.skip(why)
    said: list[str] = []
    started = time.monotonic()
    refs = images.build_images(images.NAMES, progress=said.append)
    print(f"\nimages ready in {time.monotonic() - started:.0f} s: {refs}")
    return refs


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
    return proc


def run_in(ref: str, script: str, *extra: str) -> str:
    """``sh -c script`` in a throw-away container without network; its output."""
    proc = podman(
        "run", "--rm", "--network=none", "--no-healthcheck", *extra, ref, "sh", "-c", script
    )
    return proc.stdout


def config(ref: str) -> dict:
    return json.loads(podman("image", "inspect", ref).stdout)[0]


def test_every_image_is_built_and_tagged_by_content(built):
    assert set(built) == set(images.NAMES)
    for name, ref in built.items():
        assert ref.startswith(f"localhost/labfleet-{name}:"), ref
        labels = config(ref)["Config"]["Labels"]
        assert labels["org.opencontainers.image.title"] == f"labfleet-{name}"
        assert labels["org.opencontainers.image.base.name"] == images.base_tag()
        assert labels["io.labfleet.content-hash"] == ref.rsplit(":", 1)[1]
        for key in ("description", "licenses", "vendor", "version"):
            assert labels.get(f"org.opencontainers.image.{key}"), (name, key)


def test_numeric_non_root_user_and_path(built):
    for name, ref in built.items():
        cfg = config(ref)["Config"]
        uid = cfg["User"].split(":")[0]
        assert uid.isdigit() and uid != "0", (name, cfg["User"])
        assert any(e.startswith("PATH=/opt/labfleet/bin:") for e in cfg["Env"]), name
        assert run_in(ref, "id -u").strip() == uid
        # nothing of the build's secrets survives as configuration
        for env in cfg["Env"]:
            assert not env.startswith(
                ("PIP_CERT=", "PIP_CONFIG_FILE=", "APT_CONFIG=", "SSL_CERT_FILE=")
            ), (name, env)


def test_hub_entry_points(built):
    out = run_in(
        built["hub"],
        "jupyterhub --version && configurable-http-proxy --version && node --version"
        " && labfleet images --help >/dev/null && ! command -v npm && echo ok",
    ).split()
    assert out[0] == "6.1.1" and out[1] == "5.3.0" and out[2].startswith("v")
    assert out[-1] == "ok"


def wait_healthy(name: str, timeout: float = 90) -> None:
    """Until the container's own HEALTHCHECK passes (``podman healthcheck run``)."""
    deadline = time.monotonic() + timeout
    while podman("healthcheck", "run", name, check=False).returncode != 0:
        if time.monotonic() > deadline:
            logs = podman("logs", name, check=False)
            raise AssertionError(f"{name} never healthy:\n{logs.stdout}{logs.stderr}"[-3000:])
        time.sleep(1)


def start(ref: str, name: str, options: list[str], *command: str) -> str:
    """A detached container without network, removed when it stops."""
    podman("run", "-d", "--rm", "--network=none", "--name", name, *options, ref, *command)
    return name


def test_hub_answers_its_healthcheck(built):
    """JupyterHub and configurable-http-proxy really run in the image: the
    container's own HEALTHCHECK (GET /hub/health) turns healthy."""
    assert "/hub/health" in json.dumps(config(built["hub"])["Healthcheck"])
    name = f"labfleet-hub-health-{os.getpid()}"
    podman("run", "-d", "--rm", "--network=none", "--name", name, built["hub"], "jupyterhub")
    try:
        wait_healthy(name)
    finally:
        podman("rm", "-f", "-t", "2", name, check=False)


def _service_env(port: int, service: str, health: str) -> list[str]:
    url = f"http://127.0.0.1:{port}/services/{service}/"
    env = {
        "JUPYTERHUB_SERVICE_URL": url,
        "JUPYTERHUB_SERVICE_PREFIX": f"/services/{service}/",
        "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
        "JUPYTERHUB_API_TOKEN": "not-a-real-token",
        "JUPYTERHUB_CLIENT_ID": f"service-{service}",
        "LABFLEET_HEALTH_URL": url + health,
    }
    return [f"--env={key}={value}" for key, value in env.items()]


def test_services_run_in_the_image(built):
    """The batch service, the accounting service and the GPU exporter start from
    the services image as uid 10001; the first two pass the image's HEALTHCHECK
    pointed at their own URLs (no hub: only their unauthenticated endpoints)."""
    ref, pid = built["services"], os.getpid()
    config_dir = Path(images.repo_root(), "config")
    names = []
    try:
        batch = [*_service_env(10101, "batch", "health"), f"--volume={config_dir}:/config:ro"]
        names.append(start(
            ref, f"labfleet-batch-{pid}", batch, "labfleet-batch-service",
            "--BatchService.catalogue_path=/config/catalogue.yaml",
            "--BatchService.state_dir=/tmp/batch-state",
        ))  # fmt: skip
        accounting = _service_env(10102, "accounting", "api/openapi.json")
        names.append(
            start(ref, f"labfleet-accounting-{pid}", accounting, "labfleet-accounting", "serve")
        )
        names.append(
            start(ref, f"labfleet-exporter-{pid}", [], "labfleet-accounting", "gpu-exporter")
        )
        for name in names[:2]:
            wait_healthy(name)
        state = json.loads(podman("inspect", names[2]).stdout)[0]["State"]
        assert state["Running"], podman("logs", names[2], check=False).stderr[-2000:]
    finally:
        for name in names:
            podman("rm", "-f", "-t", "2", name, check=False)


def test_services_entry_points(built):
    out = run_in(
        built["services"],
        "labfleet-batch-service --version && labfleet-accounting --version"
        " && labfleet-accounting gpu-exporter --help >/dev/null && labfleet-batch --help"
        " >/dev/null && echo ok",
    )
    assert out.split()[-1] == "ok"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_entry_points_for_any_uid(built, name):
    """Kubernetes runs a notebook under its owner's uid, not the image's."""
    script = (
        "id -u && jupyter lab --version && jupyterhub-singleuser --version"
        " && labfleet-batch --help >/dev/null"
        " && ipython -c \"print('batch' in get_ipython().magics_manager.magics['cell'])\""
    )
    for extra in ((), ("--user", "4242:4242")):
        out = run_in(built[name], script, *extra).split()
        assert out[0] == ("4242" if extra else "1000")
        assert out[1].startswith("4.") and out[2].startswith("6.1"), out
        assert out[-1] == "True", "the %%batch magic is loaded in every kernel"


def _layer_digests(archive: Path) -> tuple[list[str], tarfile.TarFile]:
    tar = tarfile.open(archive)
    manifest = json.load(tar.extractfile("manifest.json"))
    return manifest[0]["Layers"], tar


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FORBIDDEN_PATHS = (
    "etc/pip.conf",
    "etc/xdg/pip/pip.conf",
    "root/.config/pip/pip.conf",
    "root/.npmrc",
)


def host_files() -> dict[tuple[int, str], str]:
    """(size, sha256) -> path of the host files no layer may hold."""
    host = {}
    for path in (images.HOST_CA, images.HOST_PIP_CONF):
        if Path(path).is_file():
            data = Path(path).read_bytes()
            host[(len(data), _sha(data))] = path
    return host


def host_files_in_layers(ref: str, workdir: Path) -> tuple[list[str], int]:
    """What the image's own layers (above the base) hold of the host's
    configuration: its pip.conf and CA bundle by path or by content, files
    under /run/secrets where the build mounted them. (findings, files seen)"""
    host = host_files()
    base_layers = len(config(images.base_tag())["RootFS"]["Layers"])
    base_ca = run_in(images.base_tag(), f"sha256sum {images.HOST_CA} || true").split()[:1]
    archive = images.save_archive(ref, workdir / "image.tar")
    found: list[str] = []
    checked = 0
    try:
        layers, tar = _layer_digests(archive)
        with tar:
            assert layers[base_layers:], ref
            for layer in layers[base_layers:]:
                with tarfile.open(fileobj=tar.extractfile(layer)) as inner:
                    for member in inner:
                        path = member.name.lstrip("./")
                        if path in FORBIDDEN_PATHS:
                            found.append(path)
                        if not member.isfile():
                            continue
                        checked += 1
                        if path.startswith("run/secrets/"):
                            found.append(path)
                        if not any(size == member.size for size, _ in host):
                            continue
                        digest = _sha(inner.extractfile(member).read())
                        origin = host.get((member.size, digest))
                        if origin == images.HOST_CA and path == images.HOST_CA.lstrip("/"):
                            # the image's own bundle, as its base's ca-certificates made it
                            if base_ca != [digest]:
                                found.append(f"{path} (the host's CA bundle)")
                        elif origin:
                            found.append(f"{path} (the host's {origin})")
    finally:
        archive.unlink(missing_ok=True)
    return found, checked


@pytest.mark.parametrize("name", ["hub", "services", "singleuser"])
def test_layers_keep_no_host_configuration(built, tmp_path, name):
    """The saved image's own layers hold neither the host's pip.conf nor its
    CA bundle (by path or by content), nor anything under /run/secrets."""
    assert host_files(), "nothing of the host's to look for"
    found, checked = host_files_in_layers(built[name], tmp_path)
    assert not found, f"{name}: {found}"
    assert checked > 100, (name, checked)


def test_the_layer_check_finds_a_leak(built, tmp_path):
    """The check above on an image that does copy the host's files in."""
    context = tmp_path / "context"
    context.mkdir()
    shutil.copy(images.HOST_CA, context / "bundle.pem")
    if Path(images.HOST_PIP_CONF).is_file():
        shutil.copy(images.HOST_PIP_CONF, context / "pip.conf")
    else:
        (context / "pip.conf").write_text("[global]\n")
    (context / "Containerfile").write_text(
        f"FROM {images.base_tag()}\n"
        "COPY pip.conf /etc/pip.conf\n"
        "COPY bundle.pem /usr/local/share/leak/bundle.pem\n"
    )
    ref = f"localhost/labfleet-leak-test:{os.getpid()}"
    podman("build", "--pull=never", "-t", ref, str(context))
    try:
        found, _ = host_files_in_layers(ref, tmp_path)
    finally:
        podman("rmi", "-f", ref, check=False)
    assert "etc/pip.conf" in found
    assert any(f.startswith("usr/local/share/leak/bundle.pem (the host's") for f in found), found


def test_second_build_is_cached(built):
    """Nothing changed: every image is a lookup, in seconds. (A first call
    catches up with edits made to the working tree since the fixture built.)"""
    first = images.build_images(images.NAMES)
    said: list[str] = []
    started = time.monotonic()
    again = images.build_images(images.NAMES, progress=said.append)
    elapsed = time.monotonic() - started
    assert again == first
    assert len([m for m in said if "cached" in m]) == len(images.NAMES) + 1  # and the base
    assert not [m for m in said if "building" in m or "mmdebstrap" in m]
    assert elapsed < 30, f"a cached build took {elapsed:.0f} s"
