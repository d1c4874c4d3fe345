"""Pure builders: a validated :class:`~.validation.BatchRequest` -> a ``batch/v1`` Job.

The Job is created suspended in the group's namespace with the group's
LocalQueue label; Kueue unsuspends it when the group's quota admits it. Script
and input files travel inside the Job (environment variables unpacked by a
small POSIX shell bootstrap), so one API call creates everything and a
refused request leaves nothing behind.
"""

from __future__ import annotations

import base64
import io
import secrets
import tarfile
from dataclasses import dataclass, field

from labfleet_hub import contract
from labfleet_spawner import objects
from labfleet_spawner.catalogue import Catalogue

from . import podspec
from .validation import BatchRequest

#: Batch-only keys, derived from the contract's domain (not copied strings).
ANNOTATION_BATCH_NAME = f"{contract.DOMAIN}/batch-name"
ANNOTATION_MAX_RUN_TIME = f"{contract.DOMAIN}/max-run-time"
LABEL_OFFLOAD = f"{contract.DOMAIN}/offload"
LABEL_CANCELLED = f"{contract.DOMAIN}/cancelled"
CONTAINER_NAME = "job"

_SUFFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"

# Runs in the job's image with /bin/sh; only coreutils' base64 and tar needed,
# and only when input files were sent.
BOOTSTRAP = r"""set -eu
mkdir -p "$LABFLEET_BATCH_WORKDIR"
cd "$LABFLEET_BATCH_WORKDIR"
if [ -n "${LABFLEET_BATCH_FILES:-}" ]; then
  printf '%s' "$LABFLEET_BATCH_FILES" | base64 -d | tar -xzf -
fi
unset LABFLEET_BATCH_FILES
if [ -n "${LABFLEET_BATCH_SCRIPT:-}" ]; then
  script=".labfleet-job-${JOB_COMPLETION_INDEX:-0}.sh"
  printf '%s\n' "$LABFLEET_BATCH_SCRIPT" > "$script"
  unset LABFLEET_BATCH_SCRIPT
  chmod 700 "$script"
  case "$(head -c 2 "$script")" in
    '#!') exec "./$script" ;;
    *) exec /bin/sh "./$script" ;;
  esac
fi
exec "$@"
"""


def label_value(text: str) -> str:
    """A user name as a label value: the Kubernetes spawner's escaping (see podspec.user_label).

    Label values allow 63 characters of ``[A-Za-z0-9._-]``; user names may hold
    ``@`` or ``+``. The unescaped name always goes into an annotation too.
    """
    return podspec.user_label(text)


def new_job_name(display_name: str, token: str | None = None) -> str:
    """``<display name>-<8 random characters>``; the random part keeps names unique."""
    if token is None:
        # one urandom read, not eight secrets.choice calls (a hot path under load)
        raw = secrets.token_bytes(8)
        token = "".join(_SUFFIX_ALPHABET[b % 36] for b in raw)
    return f"{display_name}-{token}"


def pack_files(files: dict[str, str]) -> str:
    """Input files as a base64 tar.gz (deterministic: sorted, fixed mtime and owner)."""
    if not files:
        return ""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as tar:
        for name in sorted(files):
            data = files[name].encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, 0
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


def workdir_for(home: str, job_name: str) -> str:
    """Where a job runs and leaves its results: a folder in the user's home."""
    return f"{home.rstrip('/')}/batch/{job_name}"


@dataclass(frozen=True)
class JobContext:
    """Where and as whom a Job is created (decided by the service, not the user)."""

    user: str
    namespace: str
    queue: str
    priority_class: str
    storage: podspec.PodStorage = field(default_factory=podspec.PodStorage)
    # the owner's notebook ids; None: the storage's fixed identity
    ids: podspec.PosixIds | None = None
    kind_tolerations: dict | None = None
    # CPU jobs are kept off accelerator nodes (as notebooks are) when it is known
    catalogue: Catalogue | None = None
    extra_labels: dict[str, str] = field(default_factory=dict)
    # CPU-only, not offloaded jobs (QueueConfig.cpu_node_selector / cpu_tolerations)
    cpu_node_selector: dict[str, str] = field(default_factory=dict)
    cpu_tolerations: tuple[dict, ...] = ()


def job_metadata(request: BatchRequest, ctx: JobContext) -> tuple[dict, dict]:
    """Labels and annotations of the accounting contract: the notebook's, with kind=batch."""
    selection = request.selection
    labels, annotations = objects.contract_metadata(
        selection, ctx.user, label_value(ctx.user), [request.group], request.group
    )
    labels[contract.LABEL_KIND] = contract.KIND_BATCH
    labels.update(ctx.extra_labels)
    if request.offload:
        labels[LABEL_OFFLOAD] = "true"
    annotations.update(
        {
            contract.ANNOTATION_ACCELERATOR_COUNT: str(selection.count),
            ANNOTATION_BATCH_NAME: request.name,
            ANNOTATION_MAX_RUN_TIME: str(request.max_run_time),
        }
    )
    return labels, annotations


def container_env(request: BatchRequest, ctx: JobContext, job_name: str) -> list[dict]:
    storage = ctx.storage
    env = {
        **request.env,
        **podspec.storage_env(storage, request.group),
        "LABFLEET_BATCH_JOB": job_name,
        "LABFLEET_BATCH_GROUP": request.group,
        "LABFLEET_BATCH_WORKDIR": workdir_for(storage.home_mount, job_name),
    }
    files = pack_files(request.files)
    if files:
        env["LABFLEET_BATCH_FILES"] = files
    if request.script is not None:
        env["LABFLEET_BATCH_SCRIPT"] = request.script
    return [{"name": k, "value": v} for k, v in env.items()]


def make_job(request: BatchRequest, ctx: JobContext, job_name: str) -> dict:
    """The ``batch/v1`` Job for ``request`` (pure; no defaults read from anywhere else)."""
    selection = request.selection
    volumes, mounts = podspec.storage_volumes(
        ctx.storage, ctx.user, request.group, shm=selection.size.shm
    )
    pod_sc, container_sc = podspec.security_context(ctx.storage, ctx.ids)
    labels, annotations = job_metadata(request, ctx)
    queue_labels = {
        contract.KUEUE_QUEUE_LABEL: ctx.queue,
        contract.KUEUE_PRIORITY_LABEL: ctx.priority_class,
    }
    container = {
        "name": CONTAINER_NAME,
        "image": selection.image.image,
        "command": ["/bin/sh", "-c", BOOTSTRAP, "labfleet-batch"],
        "args": list(request.command),
        "env": container_env(request, ctx, job_name),
        "resources": podspec.resources(selection),
        "securityContext": container_sc,
        "volumeMounts": mounts,
    }
    pod_spec: dict = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_sc,
        "containers": [container],
        "volumes": volumes,
        "affinity": podspec.node_affinity(selection, ctx.catalogue, request.offload),
    }
    tols = podspec.tolerations(selection, request.group, request.offload, ctx.kind_tolerations)
    if selection.accelerator is None and not request.offload:
        # the queue configuration's cpu_placement: e.g. a tainted pool of CPU nodes
        if ctx.cpu_node_selector:
            pod_spec["nodeSelector"] = dict(ctx.cpu_node_selector)
        tols += [dict(t) for t in ctx.cpu_tolerations if t not in tols]
    if tols:
        pod_spec["tolerations"] = tols
    spec: dict = {
        # Kueue admits it by unsuspending; never start before admission.
        "suspend": True,
        "completions": request.completions,
        "parallelism": request.parallelism,
        "completionMode": "Indexed",
        "backoffLimit": 0,
        "activeDeadlineSeconds": request.max_run_time,
        # Finished Jobs stay a week for status and logs, then go.
        "ttlSecondsAfterFinished": 7 * 24 * 3600,
        "template": {
            "metadata": {"labels": dict(labels), "annotations": dict(annotations)},
            "spec": pod_spec,
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name,
            "namespace": ctx.namespace,
            "labels": {**labels, **queue_labels},
            "annotations": annotations,
        },
        "spec": spec,
    }
