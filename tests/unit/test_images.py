"""labfleet_hub.images without podman: content hashes, the Containerfiles' rules,
the base image's cache and the build command line (a fake podman and mmdebstrap)."""

import os
import re
import shutil
import stat
from pathlib import Path

import pytest
from labfleet_hub import cli, images

ROOT = Path(__file__).resolve().parents[2]


# -- content hashes -------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """A small checkout: the context paths and one image folder."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "README.md").write_text("x\n")
    for pkg in ("hub", "spawner", "batch", "accounting"):
        (tmp_path / pkg / f"labfleet_{pkg}").mkdir(parents=True)
        (tmp_path / pkg / f"labfleet_{pkg}" / "__init__.py").write_text(f"# {pkg}\n")
    (tmp_path / "images" / "hub").mkdir(parents=True)
    (tmp_path / "images" / "hub" / "Containerfile").write_text("ARG BASE=x\nFROM ${BASE}\n")
    (tmp_path / "images" / "singleuser").mkdir()
    (tmp_path / "images" / "singleuser" / "Containerfile").write_text("FROM y\n")
    (tmp_path / "images" / "build-env.sh").write_text("# env\n")
    return tmp_path


def test_context_holds_sources_shared_files_and_its_own_folder(tree):
    (tree / "hub" / "labfleet_hub" / "__pycache__").mkdir()
    (tree / "hub" / "labfleet_hub" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"x")
    (tree / "batch" / "labfleet_batch" / "stale.pyc").write_bytes(b"x")
    files = images.context_files(tree, "hub")
    assert "images/hub/Containerfile" in files
    assert "images/build-env.sh" in files
    assert "hub/labfleet_hub/__init__.py" in files
    assert "images/singleuser/Containerfile" not in files  # another image's folder
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert files == sorted(files)


def test_context_misses_a_path(tree):
    (tree / "README.md").unlink()
    with pytest.raises(images.ImageError, match="README.md is missing"):
        images.context_files(tree, "hub")


def test_hash_is_stable_and_follows_every_input(tree):
    first = images.content_hash(tree, "hub", "sha256:base1")
    assert first == images.content_hash(tree, "hub", "sha256:base1")
    # bytecode and caches do not count
    (tree / "spawner" / "labfleet_spawner" / "__pycache__").mkdir()
    (tree / "spawner" / "labfleet_spawner" / "__pycache__" / "a.pyc").write_bytes(b"1")
    assert images.content_hash(tree, "hub", "sha256:base1") == first
    # another image's Containerfile does not count either
    (tree / "images" / "singleuser" / "Containerfile").write_text("FROM z\n")
    assert images.content_hash(tree, "hub", "sha256:base1") == first
    # an image's Containerfile may copy from another's folder
    (tree / "images" / "singleuser-cuda").mkdir()
    (tree / "images" / "singleuser-cuda" / "Containerfile").write_text("FROM w\n")
    assert "images/singleuser/Containerfile" in images.context_files(tree, "singleuser-cuda")
    changes = {
        "base": images.content_hash(tree, "hub", "sha256:base2"),
        "arg": images.content_hash(tree, "hub", "sha256:base1", {"X": "1"}),
        "name": images.content_hash(tree, "singleuser", "sha256:base1"),
    }
    (tree / "images" / "hub" / "Containerfile").write_text("ARG BASE=x\nFROM ${BASE}\nUSER 1\n")
    changes["containerfile"] = images.content_hash(tree, "hub", "sha256:base1")
    source = tree / "batch" / "labfleet_batch" / "__init__.py"
    source.write_text("# changed\n")
    changes["source"] = images.content_hash(tree, "hub", "sha256:base1")
    source.chmod(source.stat().st_mode | stat.S_IXUSR)
    changes["mode"] = images.content_hash(tree, "hub", "sha256:base1")
    (tree / "accounting" / "labfleet_accounting" / "new.py").write_text("")
    changes["new file"] = images.content_hash(tree, "hub", "sha256:base1")
    digests = [first, *changes.values()]
    assert len(set(digests)) == len(digests), changes


def test_tags_and_sizes():
    assert images.image_tag("hub", "ab" * 32) == "localhost/labfleet-hub:" + "ab" * 8
    assert images.human_size(999) == "999 B"
    assert images.human_size(784_400_000) == "784.4 MB"
    assert re.fullmatch(r"localhost/labfleet-base:bookworm-[0-9a-f]{12}", images.base_tag())


def test_base_tag_follows_the_recipe(monkeypatch):
    tag = images.base_tag()
    monkeypatch.setattr(images, "BASE_PACKAGES", (*images.BASE_PACKAGES, "curl"))
    assert images.base_tag() != tag


def test_build_args():
    assert images.build_args_for("hub", "localhost/b:1", True) == {"BASE": "localhost/b:1"}
    assert images.build_args_for("hub", None, False) == {}
    # the CUDA image on the local base: everything but the CUDA libraries
    assert images.build_args_for("singleuser-cuda", "localhost/b:1", True) == {
        "BASE": "localhost/b:1",
        "CUDA_PACKAGES": "",
    }
    assert images.build_args_for("singleuser-cuda", None, False) == {}


def test_unknown_names_are_refused():
    with pytest.raises(images.ImageError, match="unknown image 'nope'"):
        images._check_names(["hub", "nope"])
    assert images._check_names(None) == list(images.DEFAULT_NAMES)
    assert images._check_names(["singleuser", "hub", "hub"]) == ["hub", "singleuser"]


def test_host_secrets(tmp_path, monkeypatch):
    ca = tmp_path / "ca.crt"
    ca.write_text("---CERT---\n")
    monkeypatch.setenv("LABFLEET_BUILD_CA", str(ca))
    monkeypatch.setenv("LABFLEET_BUILD_PIP_CONF", "")
    secrets = images.host_secrets(tmp_path)
    assert secrets["ca"] == str(ca)
    assert "pipconf" not in secrets
    if "aptconf" in secrets:  # apt's Acquire settings, private to the builder
        path = Path(secrets["aptconf"])
        assert path.parent == tmp_path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert all(line.startswith("Acquire::") for line in path.read_text().splitlines())


# -- the Containerfiles' rules --------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += " " + line.rstrip("\\").strip() if pending else line.rstrip("\\").strip()
        if not raw.rstrip().endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


CONTAINERFILES = {name: ROOT / "images" / name / "Containerfile" for name in images.NAMES}
HOST_CONFIG = re.compile(
    r"pip\.conf|ca-certificates\.crt|/etc/ssl|/etc/apt|apt\.conf|\.npmrc|/run/secrets|\.\./"
)


@pytest.mark.parametrize("name", images.NAMES)
def test_containerfile_rules(name):
    steps = instructions(CONTAINERFILES[name])
    # the base is a build argument with a public default
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE="), steps[0]
    default = steps[0][1].split("=", 1)[1]
    assert "/" in default and ":" in default and not default.startswith("localhost/")
    assert steps[1] == ("FROM", "${BASE}")
    assert [s for s in steps if s[0] == "FROM"] == [steps[1]], "one stage"
    # a numeric, non-root user, the last word on users
    users = [args for word, args in steps if word == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    # OCI labels
    labels = " ".join(args for word, args in steps if word == "LABEL")
    for key in ("title", "description", "licenses", "vendor", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    # containerd adds no PATH
    assert any(w == "ENV" and a.startswith("PATH=") for w, a in steps)
    for word, args in steps:
        if word in ("COPY", "ADD"):
            # only the build context, nothing of the host's configuration
            assert word == "COPY", "ADD can fetch URLs and unpack archives: use COPY"
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in sources:
                assert not src.startswith("/"), src
                assert not HOST_CONFIG.search(src), src
        if word == "RUN":
            # host files reach a step only as secrets (never kept in a layer)
            for mount in re.findall(r"--mount=(\S+)", args):
                assert mount.startswith("type=secret,id="), mount
        if word in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"PIP_CERT|PIP_CONFIG_FILE|APT_CONFIG|SSL_CERT", args), args


@pytest.mark.parametrize("name", ["hub", "services"])
def test_services_have_a_healthcheck(name):
    assert any(word == "HEALTHCHECK" for word, _ in instructions(CONTAINERFILES[name]))


def test_images_share_their_dependency_layer():
    """The same steps, word for word, from FROM to the Python dependencies: one build,
    shared (only the public default of BASE differs)."""
    prefixes = []
    for name in images.NAMES:
        steps = instructions(CONTAINERFILES[name])
        prefixes.append(
            steps[1 : next(i for i, s in enumerate(steps) if "requirements" in s[1]) + 1]
        )
    assert all(prefix == prefixes[0] for prefix in prefixes)


def test_build_env_uses_secrets_only_when_given():
    text = (ROOT / "images" / "build-env.sh").read_text()
    for sid in ("ca", "pipconf", "aptconf"):
        assert f"[ -s /run/secrets/{sid} ]" in text


# -- base image and builds with a fake podman -----------------------------------------------

FAKE = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$(basename "$0") $1 $2" in
  "podman image exists") [ -e "$FAKE_STATE/exists-$(echo "$3" | tr '/:' '__')" ]; exit $? ;;
  "podman image inspect") case "$5" in docker.io/*) exit 125 ;; esac; echo 123000000 ;;
  "podman import"*) for a; do last=$a; done
    touch "$FAKE_STATE/exists-$(echo "$last" | tr '/:' '__')" ;;
  "podman images"*) for r in $FAKE_IMAGES; do echo "$r"; done ;;
  "podman build"*) echo "STEP 1/2: FROM x"; echo "STEP 2/2: RUN y"; echo noise ;;
  "podman save"*) while [ $# -gt 0 ]; do [ "$1" = -o ] && echo archive > "$2"; shift; done ;;
  mmdebstrap*) for a; do last=$a; done; echo "epoch=$SOURCE_DATE_EPOCH" > "$last" ;;
esac
exit 0
"""


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("podman", "mmdebstrap"):
        (bin_dir / tool).write_text(FAKE)
        (bin_dir / tool).chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "calls.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_STATE", str(state))
    monkeypatch.setenv("LABFLEET_CACHE", str(tmp_path / "cache"))
    return log


def test_base_image_made_once_then_cached(fake_tools, tmp_path):
    said = []
    ref = images.ensure_base_image(progress=said.append)
    assert ref == images.base_tag()
    calls = fake_tools.read_text()
    assert "mmdebstrap --quiet --variant=minbase" in calls
    assert "--include=python3,python3-pip,python3-venv,ca-certificates" in calls
    assert f"podman import --change ENV PATH={images.BASE_PATH}" in calls
    tarball = tmp_path / "cache" / "images" / f"{ref.rsplit(':', 1)[1]}.tar"
    assert tarball.read_text() == f"epoch={images.BASE_EPOCH}\n"  # reproducible file times
    assert not list(tarball.parent.glob("*.partial"))
    # in podman's storage: nothing to do
    fake_tools.write_text("")
    assert images.ensure_base_image(progress=said.append) == ref
    calls = fake_tools.read_text()
    assert "mmdebstrap --" not in calls and " import " not in calls
    assert said[-1].endswith("cached")
    # storage emptied, tarball kept: imported again, not bootstrapped again
    shutil.rmtree(tmp_path / "state")
    (tmp_path / "state").mkdir()
    fake_tools.write_text("")
    assert images.ensure_base_image() == ref
    assert "mmdebstrap --" not in fake_tools.read_text()
    assert "podman import" in fake_tools.read_text()


def test_build_command_and_cache(fake_tools, tmp_path, monkeypatch):
    ca = tmp_path / "ca.crt"
    ca.write_text("cert\n")
    monkeypatch.setenv("LABFLEET_BUILD_CA", str(ca))
    monkeypatch.setenv("LABFLEET_BUILD_PIP_CONF", "")
    # an earlier build of services and another image's build
    monkeypatch.setenv(
        "FAKE_IMAGES", "localhost/labfleet-services:0ld localhost/labfleet-servicesx:1"
    )
    said = []
    refs = images.build_images(["services"], progress=said.append)
    ref = refs["services"]
    calls = fake_tools.read_text()
    assert "podman rmi localhost/labfleet-services:0ld" in calls  # untagged, not piling up
    assert "labfleet-servicesx" not in calls.split("rmi", 1)[1]
    assert re.fullmatch(r"localhost/labfleet-services:[0-9a-f]{16}", ref)
    build = next(line for line in fake_tools.read_text().splitlines() if " build " in line)
    assert f"--build-arg BASE={images.base_tag()}" in build
    assert f"--secret id=ca,src={ca}" in build
    assert "--pull=never" in build and "--network=host" in build
    assert f"-t {ref}" in build
    assert "services: STEP 2/2: RUN y" in said and "noise" not in " ".join(said)
    log = tmp_path / "cache" / "images" / "logs" / "services.log"
    assert "noise" in log.read_text()
    # tagged: the next build is a lookup
    (tmp_path / "state" / f"exists-{ref.replace('/', '_').replace(':', '_')}").touch()
    fake_tools.write_text("")
    assert images.build_images(["services"], progress=said.append) == refs
    assert " build " not in fake_tools.read_text()
    assert said[-1].startswith(f"services: cached {ref}")


def test_a_base_not_here_is_pulled(fake_tools):
    ref, cached = images.build_image("hub", "docker.io/library/python:3.11-slim-bookworm")
    assert not cached
    build = next(line for line in fake_tools.read_text().splitlines() if " build " in line)
    assert "--pull=missing" in build
    assert "--build-arg BASE=docker.io/library/python:3.11-slim-bookworm" in build
    # public defaults: no BASE argument at all
    fake_tools.write_text("")
    images.build_image("services", None)
    build = next(line for line in fake_tools.read_text().splitlines() if " build " in line)
    assert "--pull=missing" in build and "BASE=" not in build


def test_save_archive(fake_tools, tmp_path):
    out = images.save_archive("localhost/labfleet-hub:1", tmp_path / "a" / "hub.tar")
    assert out.read_text() == "archive\n"
    assert "podman save --format docker-archive -o" in fake_tools.read_text()
    with pytest.raises(images.ImageError, match="unsupported archive format"):
        images.save_archive("x", tmp_path / "b.tar", format="zip")


def test_cli_dispatches(monkeypatch, capsys):
    seen = []

    def fake_build(name, base, *, local_base, root, progress):
        seen.append((name, base, local_base))
        return f"localhost/labfleet-{name}:0", name == "hub"

    monkeypatch.setattr(images, "build_image", fake_build)
    monkeypatch.setattr(images, "image_size", lambda ref: 5_000_000)
    assert cli.main(["images", "build", "services", "hub", "--base", "localhost/b:1"]) == 0
    assert seen == [("hub", "localhost/b:1", False), ("services", "localhost/b:1", False)]
    out = capsys.readouterr().out
    assert re.search(r"hub\s+localhost/labfleet-hub:0\s+5.0 MB\s+cached", out)
    assert re.search(r"services\s+localhost/labfleet-services:0\s+5.0 MB\s+built in", out)
    assert cli.main(["images", "build", "nope", "--base", "public"]) == 1
    assert "unknown image 'nope'" in capsys.readouterr().err


def test_containerignore_lets_in_the_same_context():
    """A build from the repository root (podman/docker build -f images/...
    .) sees what labfleet images build assembles, not .venv or state."""
    lines = [
        line.strip()
        for line in (ROOT / ".containerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {*images.CONTEXT_PATHS, "images"}
    assert {"**/__pycache__", "**/node_modules"} <= set(lines)
