"""labfleet's container images, built with podman (``labfleet images build``).

``images/<name>/Containerfile`` each take their base image as ``ARG BASE``:
a public base by default, for anyone building from a checkout, and here a
Debian base made with ``mmdebstrap`` and ``podman import``
(:func:`ensure_base_image`), because no container registry can be reached.

Every build is cached by content: the image's tag is a hash of its
Containerfile, the build context's files (the Python distribution's sources)
the base image's id and the build arguments, so ``localhost/labfleet-<name>:<hash>``
that already exists is simply reused ("cached"). The build context is
assembled in a temporary folder from an allow-list, so nothing else of the
checkout (virtualenvs, state, tests) can reach an image.

The host's CA bundle, pip configuration and apt ``Acquire`` settings reach the
build only as build-time secrets (``RUN --mount=type=secret``; see
``images/build-env.sh``): podman mounts them under ``/run/secrets`` while a
step runs and never keeps them in a layer.

Python API for the cluster code: :func:`ensure_base_image`,
:func:`build_images`, :func:`save_archive` (a ``docker-archive`` that
``ctr -n k8s.io images import`` reads).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

Progress = Callable[[str], None] | None

#: every image, in build order; ``singleuser-cuda`` is built only when named
NAMES = ("hub", "services", "singleuser", "singleuser-cuda")
DEFAULT_NAMES = ("hub", "services", "singleuser")

#: the repository paths an image's build context holds (the Python distribution)
CONTEXT_PATHS = ("pyproject.toml", "README.md", "hub", "spawner", "batch", "accounting")
#: files of images/ shared by every Containerfile (copied into each context)
SHARED_IMAGE_FILES = ("images/build-env.sh",)
#: other images' folders an image's Containerfile copies from
IMAGE_EXTRA_DIRS = {"singleuser-cuda": ("images/singleuser",)}
#: never part of a context
SKIP_NAMES = {"__pycache__", "node_modules", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")

#: the local Debian base: mmdebstrap recipe (its hash names the base image)
BASE_SUITE = "bookworm"
BASE_VARIANT = "minbase"
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_RECIPE_VERSION = "1"  # bump when the way the base is made changes
#: file times inside the base rootfs (mmdebstrap honours SOURCE_DATE_EPOCH)
BASE_EPOCH = "1700000000"

#: the host files handed to a build as secrets (id -> path), when present
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
HOST_PIP_CONF = "/etc/pip.conf"

VERSION = "0.1.0"


class ImageError(RuntimeError):
    """A build step failed; the message says which and where its log is."""


def _say(progress: Progress, message: str) -> None:
    if progress:
        progress(message)


def repo_root() -> Path:
    """The checkout holding images/ (``$LABFLEET_REPO`` or this file's checkout)."""
    root = Path(os.environ.get("LABFLEET_REPO") or Path(__file__).resolve().parents[2])
    if not (root / "images").is_dir() or not (root / "pyproject.toml").is_file():
        raise ImageError(f"{root} is not a labfleet checkout (images/ and pyproject.toml)")
    return root


def cache_dir() -> Path:
    """``$LABFLEET_CACHE/images`` (default ``~/.cache/labfleet/images``)."""
    base = os.environ.get("LABFLEET_CACHE") or Path.home() / ".cache" / "labfleet"
    return Path(base) / "images"


def podman() -> str:
    path = shutil.which("podman")
    if not path:
        raise ImageError("podman is not installed (tools/bootstrap.sh installs it as root)")
    return path


@contextlib.contextmanager
def _locked(name: str):
    """An exclusive lock in :func:`cache_dir` (two builders of the same thing
    on one machine wait for each other instead of racing)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, **kw)


# -- content hashes -------------------------------------------------------------------------


def _skipped(path: Path) -> bool:
    return path.name in SKIP_NAMES or path.name.endswith(SKIP_SUFFIXES)


def context_files(root: Path, name: str) -> list[str]:
    """The build context of image ``name``: relative paths, sorted.

    The distribution's sources (:data:`CONTEXT_PATHS`), the shared image files
    and everything in ``images/<name>/`` (and :data:`IMAGE_EXTRA_DIRS`);
    caches and bytecode left out.
    """
    found: list[str] = []
    extra = IMAGE_EXTRA_DIRS.get(name, ())
    for entry in (*CONTEXT_PATHS, *SHARED_IMAGE_FILES, f"images/{name}", *extra):
        path = root / entry
        if path.is_file():
            found.append(entry)
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not _skipped(Path(d)))
                for f in filenames:
                    p = Path(dirpath, f)
                    if not _skipped(p) and (p.is_file() and not p.is_symlink()):
                        found.append(p.relative_to(root).as_posix())
        else:
            raise ImageError(f"build context: {entry} is missing from {root}")
    return sorted(set(found))


def content_hash(
    root: Path, name: str, base_id: str, build_args: dict[str, str] | None = None
) -> str:
    """Hex digest of what image ``name`` is made of: the context's files (path,
    executable bit, bytes), the base image's id and the build arguments."""
    h = hashlib.sha256()
    h.update(f"labfleet-image {name}\0base {base_id}\0".encode())
    for key, value in sorted((build_args or {}).items()):
        h.update(f"arg {key}={value}\0".encode())
    for rel in context_files(root, name):
        path = root / rel
        executable = os.access(path, os.X_OK)
        h.update(f"file {rel} {'x' if executable else '-'}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def image_tag(name: str, digest: str) -> str:
    return f"localhost/labfleet-{name}:{digest[:16]}"


# -- podman queries -------------------------------------------------------------------------


def image_exists(ref: str) -> bool:
    return _run([podman(), "image", "exists", ref]).returncode == 0


def image_id(ref: str) -> str | None:
    proc = _run([podman(), "image", "inspect", "--format", "{{.Id}}", ref])
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_size(ref: str) -> int:
    proc = _run([podman(), "image", "inspect", "--format", "{{.Size}}", ref])
    return int(proc.stdout.strip()) if proc.returncode == 0 else 0


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# -- the local Debian base ------------------------------------------------------------------


def base_recipe() -> dict:
    """What the local base is made of; its hash names the image and the rootfs tarball."""
    return {
        "version": BASE_RECIPE_VERSION,
        "suite": BASE_SUITE,
        "variant": BASE_VARIANT,
        "packages": list(BASE_PACKAGES),
        "mirror": os.environ.get("LABFLEET_DEBIAN_MIRROR", ""),
        "path": BASE_PATH,
        "epoch": BASE_EPOCH,
    }


def base_tag() -> str:
    digest = hashlib.sha256(json.dumps(base_recipe(), sort_keys=True).encode()).hexdigest()
    return f"localhost/labfleet-base:{BASE_SUITE}-{digest[:12]}"


def ensure_base_image(progress: Progress = None) -> str:
    """The local Debian base image's ref, made once and reused.

    ``mmdebstrap --variant=minbase bookworm`` with python3, pip, venv and
    ca-certificates writes a rootfs tarball into :func:`cache_dir` (kept, so a
    machine whose podman storage was emptied only re-imports it, seconds);
    ``podman import`` turns it into ``localhost/labfleet-base:bookworm-<hash>``
    with ``ENV PATH`` set (containerd adds none).
    """
    ref = base_tag()
    if image_exists(ref):
        _say(progress, f"base {ref}: cached")
        return ref
    with _locked("base"):
        if image_exists(ref):  # made meanwhile by another builder
            return ref
        _make_base_image(ref, progress)
    return ref


def _make_base_image(ref: str, progress: Progress) -> None:
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{ref.rsplit(':', 1)[1]}.tar"
    if not tarball.exists():
        mmdebstrap = shutil.which("mmdebstrap")
        if not mmdebstrap:
            raise ImageError("mmdebstrap is not installed (tools/bootstrap.sh installs it as root)")
        partial = tarball.with_suffix(".tar.partial")
        partial.unlink(missing_ok=True)
        args = [
            mmdebstrap,
            "--quiet",
            f"--variant={BASE_VARIANT}",
            f"--include={','.join(BASE_PACKAGES)}",
            "--format=tar",
            BASE_SUITE,
            str(partial),
        ]
        if base_recipe()["mirror"]:
            args.append(base_recipe()["mirror"])
        _say(progress, f"base: mmdebstrap {BASE_VARIANT} {BASE_SUITE} + {' '.join(BASE_PACKAGES)}")
        started = time.monotonic()
        env = {**os.environ, "SOURCE_DATE_EPOCH": BASE_EPOCH}
        proc = _run(args, env=env)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise ImageError(f"mmdebstrap failed:\n{_tail(proc.stderr + proc.stdout)}")
        partial.rename(tarball)
        _say(progress, f"base: rootfs {human_size(tarball.stat().st_size)} "
                       f"in {time.monotonic() - started:.0f} s")  # fmt: skip
    started = time.monotonic()
    proc = _run(
        [
            podman(),
            "import",
            "--change",
            f"ENV PATH={BASE_PATH}",
            "--change",
            'CMD ["/bin/bash"]',
            "--message",
            f"labfleet base: mmdebstrap {BASE_VARIANT} {BASE_SUITE}",
            str(tarball),
            ref,
        ]
    )
    if proc.returncode != 0:
        raise ImageError(f"podman import failed:\n{_tail(proc.stderr + proc.stdout)}")
    _say(progress, f"base {ref}: imported in {time.monotonic() - started:.0f} s "
                   f"({human_size(image_size(ref))})")  # fmt: skip


# -- builds ---------------------------------------------------------------------------------


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def assemble_context(root: Path, name: str, dest: Path) -> None:
    """Copy image ``name``'s context (:func:`context_files`) into ``dest``."""
    for rel in context_files(root, name):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def host_secrets(workdir: Path) -> dict[str, str]:
    """Build-time secrets from this host (id -> file): the CA bundle, the pip
    configuration and apt's ``Acquire`` settings (proxies, mirrors' checks).

    ``$LABFLEET_BUILD_CA`` and ``$LABFLEET_BUILD_PIP_CONF`` name other files
    (an empty value: none). Files are read by podman at build time only.
    """
    secrets: dict[str, str] = {}
    ca = os.environ.get("LABFLEET_BUILD_CA", HOST_CA)
    if ca and Path(ca).is_file():
        secrets["ca"] = ca
    pip_conf = os.environ.get("LABFLEET_BUILD_PIP_CONF", HOST_PIP_CONF)
    if pip_conf and Path(pip_conf).is_file():
        secrets["pipconf"] = pip_conf
    apt_config = shutil.which("apt-config")
    if apt_config:
        proc = _run([apt_config, "dump", "Acquire"])
        lines = [line for line in proc.stdout.splitlines() if line.startswith("Acquire::")]
        if proc.returncode == 0 and lines:
            path = workdir / "apt.conf"
            path.write_text("\n".join(lines) + "\n")
            path.chmod(0o600)
            secrets["aptconf"] = str(path)
    return secrets


def build_args_for(name: str, base: str | None, local_base: bool) -> dict[str, str]:
    """The ``--build-arg`` values of one image: ``BASE`` (unless the Containerfile's
    public default is wanted) and, for the CUDA image on a base without CUDA,
    no CUDA Python packages (a test build of everything else)."""
    args: dict[str, str] = {}
    if base:
        args["BASE"] = base
    if name == "singleuser-cuda" and local_base:
        args["CUDA_PACKAGES"] = ""
    return args


def build_image(
    name: str,
    base: str | None,
    *,
    local_base: bool = False,
    root: Path | None = None,
    progress: Progress = None,
) -> tuple[str, bool]:
    """Build image ``name`` (or find it cached): ``(ref, cached)``."""
    root = root or repo_root()
    if name not in NAMES:
        raise ImageError(f"unknown image {name!r} (known: {', '.join(NAMES)})")
    args = build_args_for(name, base, local_base)
    local_id = image_id(base) if base else None
    base_id = local_id or base or "containerfile-default"
    ref = image_tag(name, content_hash(root, name, base_id, args))
    with _locked(f"build-{name}"):  # a second builder finds it cached
        if image_exists(ref):
            _say(progress, f"{name}: cached {ref} ({human_size(image_size(ref))})")
            return ref, True
        _podman_build(name, ref, args, pull="never" if local_id else "missing", root=root,
                      progress=progress)  # fmt: skip
    return ref, False


def _podman_build(
    name: str, ref: str, args: dict[str, str], *, pull: str, root: Path, progress: Progress
) -> None:
    """``podman build`` of image ``name`` as ``ref``; its output in the log file,
    its STEP lines as progress."""
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"labfleet-{name}-") as tmp:
        context = Path(tmp, "context")
        context.mkdir()
        assemble_context(root, name, context)
        secret_dir = Path(tmp, "secrets")
        secret_dir.mkdir(mode=0o700)
        command = [
            podman(),
            "build",
            "--layers",
            "--format=docker",  # keeps HEALTHCHECK (the OCI image format has none)
            "--network=host",
            f"--pull={pull}",
            "-f",
            str(context / "images" / name / "Containerfile"),
            "-t",
            ref,
            "--label",
            f"org.opencontainers.image.version={VERSION}",
            "--label",
            f"io.labfleet.content-hash={ref.rsplit(':', 1)[1]}",
        ]
        for key, value in args.items():
            command += ["--build-arg", f"{key}={value}"]
        for sid, path in host_secrets(secret_dir).items():
            command += ["--secret", f"id={sid},src={path}"]
        command.append(str(context))
        _say(progress, f"{name}: building {ref}")
        with open(log_path, "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if line.startswith("STEP "):
                    _say(progress, f"{name}: {line.strip()[:110]}")
            rc = proc.wait()
    if rc != 0:
        raise ImageError(
            f"{name}: podman build failed (exit {rc}); log {log_path}:\n"
            + _tail(log_path.read_text())
        )
    remove_older(name, ref)
    size = image_size(ref)
    _say(progress, f"{name}: built {ref} in {time.monotonic() - started:.0f} s "
                   f"({human_size(size)})")  # fmt: skip


def remove_older(name: str, keep: str) -> list[str]:
    """Untag this image's earlier builds (``localhost/labfleet-<name>:<other hash>``),
    so code changes do not pile up images; layers the new one shares stay, and
    an image a container still uses is left alone. The refs removed."""
    repo = keep.rsplit(":", 1)[0]
    proc = _run([podman(), "images", "--format", "{{.Repository}}:{{.Tag}}", repo])
    old = [r for r in proc.stdout.split() if r.startswith(repo + ":") and r != keep]
    removed = [r for r in old if _run([podman(), "rmi", r]).returncode == 0]
    return removed


def build_images(
    names: Iterable[str] | None = None, base: str | None = None, progress: Progress = None
) -> dict[str, str]:
    """Build (or reuse) the images: name -> image ref.

    ``names``: default :data:`DEFAULT_NAMES`. ``base``: ``None`` builds on the
    local Debian base (:func:`ensure_base_image`); ``"public"`` on each
    Containerfile's own public default (pulled by podman); anything else is an
    image ref to build on.
    """
    root = repo_root()
    wanted = _check_names(names)
    base, local_base = _resolve_base(base, progress)
    refs = {}
    for name in wanted:
        refs[name], _ = build_image(name, base, local_base=local_base, root=root, progress=progress)
    return refs


def _check_names(names: Iterable[str] | None) -> list[str]:
    """The names asked for, known and in build order (default :data:`DEFAULT_NAMES`)."""
    wanted = list(names) if names else list(DEFAULT_NAMES)
    for name in wanted:
        if name not in NAMES:
            raise ImageError(f"unknown image {name!r} (known: {', '.join(NAMES)})")
    return sorted(set(wanted), key=NAMES.index)


def _resolve_base(base: str | None, progress: Progress) -> tuple[str | None, bool]:
    """(the ``BASE`` build argument or None for the Containerfiles' defaults, local base?)"""
    if base is None:
        return ensure_base_image(progress), True
    if base == "public":
        return None, False
    return base, False


def save_archive(ref: str, path: str | os.PathLike, format: str = "docker-archive") -> Path:
    """``podman save`` image ``ref`` into ``path`` (``docker-archive``, which
    ``ctr -n k8s.io images import`` reads, or ``oci-archive``); written to a
    partial file first, so a present file is always complete."""
    if format not in ("docker-archive", "oci-archive"):
        raise ImageError(f"unsupported archive format {format!r}")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    proc = _run([podman(), "save", "--format", format, "-o", str(partial), ref])
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ImageError(f"podman save {ref} failed:\n{_tail(proc.stderr + proc.stdout)}")
    partial.rename(dest)
    return dest


# -- the command ----------------------------------------------------------------------------


def cmd_images(args) -> int:
    """``labfleet images build [NAME...]``: build (or reuse) the images, print refs and sizes."""
    started = time.monotonic()
    results: list[tuple[str, str, bool, float]] = []
    try:
        root = repo_root()
        names = _check_names(args.names)
        base, local_base = _resolve_base(args.base, _print)
        for name in names:
            t0 = time.monotonic()
            ref, cached = build_image(name, base, local_base=local_base, root=root, progress=_print)
            results.append((name, ref, cached, time.monotonic() - t0))
    except ImageError as e:
        print(f"labfleet images: {e}", file=sys.stderr)
        return 1
    print()
    for name, ref, cached, seconds in results:
        state = "cached" if cached else f"built in {seconds:.0f} s"
        print(f"  {name:16} {ref:54} {human_size(image_size(ref)):>9}  {state}")
    print(f"==> images ready in {time.monotonic() - started:.0f} s", flush=True)
    return 0


def _print(message: str) -> None:
    print(f"==> {message}", flush=True)


def add_parser(sub) -> None:
    """The ``images`` subcommand of ``labfleet``."""
    images = sub.add_parser(
        "images",
        help="build labfleet's container images with podman (cached by content)",
    )
    actions = images.add_subparsers(dest="images_command", required=True)
    build = actions.add_parser(
        "build",
        help=f"build the images (default: {', '.join(DEFAULT_NAMES)}) and print their sizes",
    )
    build.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(NAMES)}")
    build.add_argument(
        "--base",
        default=None,
        help="base image ref; 'public': each Containerfile's own default (pulled); "
        "default: a local Debian base made with mmdebstrap",
    )
    build.set_defaults(func=cmd_images)
