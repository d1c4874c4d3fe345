"""The Kubernetes spawner: catalogue profiles with exact placement, live availability.

:class:`PlatformKubeSpawner` is KubeSpawner plus:

- the catalogue form and server-side check of :class:`CatalogueSpawnerMixin`
  (KubeSpawner's own ``profile_list`` is not used): the image, CPU, memory,
  accelerator and count come only from the validated selection;
- the pod pieces built by the pure functions of :mod:`.objects` (extended
  resource as limit and request, required node affinity, tolerations,
  reserved nodes, volumes, security context, the accounting labels), given to
  KubeSpawner through its own traits before it builds the pod, so an admin's
  ``modify_pod_hook`` still sees an ordinary ``V1Pod``;
- free/total accelerators in the form from watch-based caches
  (:mod:`.availability`): no API call per form render;
- spawn progress that says why a pod waits (the scheduler's message, a
  Kueue admission gate), and a spawn that fails with that reason once the pod
  has been unschedulable for ``unschedulable_grace_period`` seconds;
- optional Kueue plain-pod integration for profiles with ``kueue: true``, with
  the pod's place in its queue in the progress messages (Kueue's visibility
  API, else an estimate from the namespace's Workloads);
- no secret in the pod spec: the server's API token and every variable named
  like a secret live in a per-server Secret (``<pod>-env``, created before the
  pod, owned by it once it exists, deleted at stop) that the pod references
  with ``secretKeyRef`` (:mod:`.secretenv`), so readers of pods learn no token.

Bad names (a user or group name that cannot be a label value or a directory)
are refused with HTTP 400 before any Kubernetes object exists.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar
from urllib.parse import quote

from jupyterhub.utils import exponential_backoff
from kubernetes_asyncio.client import (
    V1EnvVar,
    V1EnvVarSource,
    V1PodSchedulingGate,
    V1SecretKeySelector,
)
from kubespawner import KubeSpawner
from kubespawner.slugs import is_valid_label, safe_slug
from labfleet_hub.contract import KUEUE_ADMISSION_GATE, KUEUE_QUEUE_LABEL, group_local_queue
from labfleet_hub.kubeclient import KubeAPI, KubeError
from labfleet_hub.posix_registry import posix_ids
from tornado import web
from traitlets import Any as AnyTrait
from traitlets import Bool, Dict, Enum, Float, Integer, List, Unicode, default

from . import objects, secretenv
from .availability import ClusterWatch
from .base import CatalogueSpawnerMixin
from .catalogue import Selection
from .kueue import condition_true, pending_in_order
from .storage import (
    DEFAULT_GID_BASE,
    DEFAULT_UID_BASE,
    StorageError,
    StorageLayout,
    apply_storage,
    plan_storage,
)

#: Traits labfleet sets from the selection on every start, merged with what an
#: admin configured (kept from construction time so restarts do not pile up).
_MERGED_TRAITS = ("volumes", "volume_mounts", "tolerations", "node_affinity_preferred")


def _http_error(status: int, message: str, reason: str) -> web.HTTPError:
    # jupyterhub_message is what the spawn-progress page and the REST API show.
    error = web.HTTPError(status, "%s", message, reason=reason)
    error.jupyterhub_message = message
    return error


# -- why is my pod waiting? (pure) ----------------------------------------------------


def _condition(pod: dict, kind: str) -> dict | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return None


def unschedulable_reason(pod: dict | None) -> str | None:
    """The scheduler's message when it found no node for ``pod`` (not for gated pods)."""
    if not pod or (pod.get("spec") or {}).get("nodeName"):
        return None
    condition = _condition(pod, "PodScheduled")
    if (
        condition
        and condition.get("status") == "False"
        and condition.get("reason") == "Unschedulable"
    ):
        return condition.get("message") or "no node can run it"
    return None


def kueue_gated(pod: dict | None) -> bool:
    """Whether ``pod`` still waits behind Kueue's admission gate."""
    gates = ((pod or {}).get("spec") or {}).get("schedulingGates") or []
    return any(g.get("name") == KUEUE_ADMISSION_GATE for g in gates)


def _owned_by(obj: dict, pod: dict) -> bool:
    """Whether ``obj`` (a Workload or a visibility API entry) belongs to ``pod``.

    By uid; by name only for a pod dict without one (names are reused, uids not).
    """
    meta = pod.get("metadata") or {}
    key, want = ("uid", meta["uid"]) if meta.get("uid") else ("name", meta.get("name"))
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("kind") == "Pod" and ref.get(key) == want for ref in refs)


def position_from_visibility(pending: dict, pod: dict) -> int | None:
    """0-based place of ``pod``'s Workload in a visibility API ``pendingworkloads`` answer."""
    for item in pending.get("items") or []:
        if _owned_by(item, pod):
            return int(item.get("positionInLocalQueue", 0))
    return None


def position_from_workloads(workloads: list[dict], pod: dict) -> int | None:
    """0-based place of ``pod``'s Workload among the pending Workloads of its LocalQueue.

    An estimate for clusters without the visibility API: Kueue's order within
    one LocalQueue (priority, then creation time), blind to other LocalQueues
    of the ClusterQueue and to workloads that cannot fit at all.
    """
    mine = next((wl for wl in workloads if _owned_by(wl, pod)), None)
    if mine is None or condition_true(mine, "QuotaReserved"):
        return None
    pending = pending_in_order(workloads, (mine.get("spec") or {}).get("queueName"))
    return pending.index(mine)


def queue_phrase(position: int | None) -> str:
    """``position`` (0-based, as Kueue counts) in words; empty when unknown."""
    if position is None:
        return ""
    if position == 0:
        return "you are next in line"
    ahead = "1 session or job" if position == 1 else f"{position} sessions or jobs"
    return f"position {position + 1} in line ({ahead} ahead of you)"


def pending_message(pod: dict | None, position: int | None = None) -> str | None:
    """A sentence for the progress page while ``pod`` waits to be scheduled, else None.

    ``position``: the pod's 0-based place in its Kueue queue, when known.
    """
    if not pod:
        return None
    gates = [g.get("name") for g in (pod.get("spec") or {}).get("schedulingGates") or []]
    if KUEUE_ADMISSION_GATE in gates:
        queue = ((pod.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL, "?")
        where = queue_phrase(position)
        return (
            f"Waiting for admission by Kueue in queue {queue}: your group's quota for this "
            "accelerator is in use; "
            + (f"{where}; " if where else "")
            + "the session starts when quota frees up"
        )
    if gates:
        return f"Waiting for scheduling gates: {', '.join(map(str, gates))}"
    reason = unschedulable_reason(pod)
    if reason:
        return f"Waiting for a node: {reason}"
    return None


# -- the spawner -----------------------------------------------------------------------


class PlatformKubeSpawner(CatalogueSpawnerMixin, KubeSpawner):
    """KubeSpawner driven by the labfleet catalogue, with exact accelerator placement."""

    # Our own reflector registry: KubeSpawner's is a class attribute shared by
    # every subclass, and tests stop ours without touching anybody else's.
    reflectors: ClassVar[dict] = {}
    _cluster_watches: ClassVar[dict[Any, ClusterWatch]] = {}

    # -- storage --------------------------------------------------------------

    home_storage = Enum(
        ("shared", "pvc"),
        default_value="shared",
        config=True,
        help="""Where a user's home comes from.

        "shared": ``home/<user>`` on the shared filesystem (``shared_volume``),
        mounted with a subPath. "pvc": a per-user PersistentVolumeClaim named by
        KubeSpawner's ``pvc_name_template``, created on first start
        (``storage_pvc_ensure``); set ``storage_capacity`` and, if needed,
        ``storage_class``.
        """,
    )

    shared_volume = Dict(
        {"persistentVolumeClaim": {"claimName": "labfleet-shared"}},
        config=True,
        help="""Volume source of the shared filesystem (without ``name``).

        Laid out as in single-node mode: ``home/<user>``, ``groups/<group>``,
        ``public``, ``envs``. For example ``{"nfs": {"server": ..., "path": ...}}``
        or a ReadWriteMany claim. An empty dict disables group, public and envs
        mounts (and requires ``home_storage = "pvc"``).
        """,
    )

    storage_path = Unicode(
        "",
        config=True,
        help="""Where this hub sees the tree of ``shared_volume`` (an absolute path; empty:
        nowhere).

        When set, every start first makes the user's ``home/<user>`` (0700, the
        user's uid and private gid), ``groups/<group>`` for each of the user's
        groups (2770, the group's gid), ``public`` (1777) and ``envs`` (0755) there,
        exactly as single-node mode does (:func:`.storage.apply_storage`: no link
        followed), so the pod finds its folders with their owners. Owners are set
        only when the hub runs as root (or with CAP_CHOWN); without, the site makes
        the folders. Without it, the kubelet creates a missing ``subPath`` as root.
        """,
    )

    home_mount_path = Unicode("/home/jovyan", config=True, help="Where the home appears.")
    group_mount_root = Unicode(
        "/shared/groups",
        config=True,
        help="Each of the user's groups appears read-write at ``<group_mount_root>/<group>``.",
    )
    public_mount_path = Unicode(
        "/shared/public", config=True, help="Where the public area (anyone writes) appears."
    )
    envs_mount_path = Unicode(
        "/shared/envs", config=True, help="Where the shared software environments appear."
    )
    envs_writer_group = Unicode(
        "",
        config=True,
        help="""Hub group whose members get the software-environments area read-write.

        Everybody else mounts it read-only. Empty: read-only for all.
        """,
    )
    default_shm_size = Unicode(
        "64Mi",
        config=True,
        help="Size of /dev/shm for catalogue sizes without ``shm`` (memory-backed, counts "
        "against the memory limit).",
    )

    # -- identity -------------------------------------------------------------

    uid_base = Integer(
        DEFAULT_UID_BASE,
        config=True,
        help="""The notebook runs as uid ``uid_base + <hub user id>`` with a private gid of
        the same number, as in single-node mode, so files on the shared filesystem
        keep one owner whichever mode wrote them.
        """,
    )
    gid_base = Integer(
        DEFAULT_GID_BASE,
        config=True,
        help="A hub group is gid ``gid_base + <hub group id>`` (supplementary groups).",
    )

    # -- placement ------------------------------------------------------------

    accelerator_kind_tolerations = Dict(
        objects.DEFAULT_KIND_TOLERATIONS,
        config=True,
        help="""Tolerations per accelerator kind (gpu, mig, fpga), added to the catalogue
        entry's own ``tolerations``: the taints every node of that kind carries.
        """,
    )

    accounting_group_exclude = List(
        Unicode(),
        ["users"],
        config=True,
        help="""Groups never chosen as the accounting group while another candidate exists
        (umbrella groups every user is in). See docs/kubernetes.md for the rule.
        """,
    )

    # -- availability ---------------------------------------------------------

    availability_enabled = Bool(
        True,
        config=True,
        help="Show free/total accelerators in the spawn form (watches nodes and all pods; "
        "needs cluster-wide list/watch on nodes and pods).",
    )
    availability_wait = Float(
        3.0,
        config=True,
        help="Seconds the first form render after hub start waits for the first node and "
        "pod lists; later renders never wait.",
    )
    watch_api = AnyTrait(
        None,
        allow_none=True,
        help="CoreV1Api-like client for the availability watch (None: KubeSpawner's "
        "shared client). Tests inject fakes.",
    ).tag(config=True)

    # -- progress -------------------------------------------------------------

    unschedulable_grace_period = Float(
        120,
        config=True,
        help="""Seconds a pod may stay unschedulable (no node fits, as the scheduler
        reports) before the spawn fails with the scheduler's reason and the pod is
        deleted. 0: wait until start_timeout. Pods waiting for Kueue admission are
        not unschedulable: they wait for quota.
        """,
    )
    progress_interval = Float(
        1.0, config=True, help="Seconds between checks of a pending pod (progress, grace)."
    )

    # -- Kueue ----------------------------------------------------------------

    kueue_enabled = Bool(
        True,
        config=True,
        help="""Let profiles with ``kueue: true`` queue in the accounting group's
        LocalQueue (``<group>-queue`` in the spawner's namespace) through Kueue's
        plain-pod integration. False: such profiles start like any other.
        """,
    )

    kueue_visibility_version = Unicode(
        "v1beta2",
        config=True,
        help="""Version of Kueue's visibility API (``visibility.kueue.x-k8s.io``) asked for
        the queue position shown while a session waits for admission. Needs ``get`` on
        ``localqueues/pendingworkloads`` in that group. Empty, or when the API answers
        with an error: the position is estimated from the namespace's Workloads
        (needs ``list`` on ``workloads.kueue.x-k8s.io``).
        """,
    )
    queue_position_interval = Float(
        5.0,
        config=True,
        help="Seconds between queue-position checks (one API call each) while a session "
        "waits for Kueue admission. 0: do not show the position.",
    )

    # -- secrets ----------------------------------------------------------------

    env_secret_pattern = Unicode(
        secretenv.DEFAULT_SECRET_PATTERN,
        config=True,
        help="""Environment variables whose names match this regular expression (any
        case, anywhere in the name) are put into the server's own Secret
        (``<pod name>-env``) and referenced with ``valueFrom.secretKeyRef`` instead
        of being written into the pod spec, where every reader of pods would see
        them. The server's ``JUPYTERHUB_API_TOKEN``/``JPY_API_TOKEN`` always are;
        empty: only those. Needs ``create``, ``patch`` and ``delete`` on ``secrets``
        in the notebook namespace (spawner/manifests/rbac.yaml).
        """,
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._env_secret_data: dict[str, str] = {}
        self._position_source = ""
        self._queue_position: int | None = None  # last one shown, for a timeout's message
        self._configured = {name: self._as_list(getattr(self, name)) for name in _MERGED_TRAITS}
        self._configured["node_affinity_required"] = self._as_list(self.node_affinity_required)
        self._pod_metadata: tuple[dict, dict] = ({}, {})
        self._gates: list[dict] = []
        self._storage_env: dict[str, str] = {}
        self._storage_layout: StorageLayout | None = None
        self.accounting_group_name = ""

    def _as_list(self, value) -> list:
        return list(self._sorted_dict_values(value) if isinstance(value, dict) else value or [])

    # -- identity checks ---------------------------------------------------------

    def checked_identity(self) -> tuple[str, list[str]]:
        """User and group names usable in a pod, or HTTP 400 saying what is allowed."""
        try:
            name = objects.check_username(self.user.name)
            groups = objects.check_groups(self.user_group_names())
        except objects.PodSpecError as e:
            self.log.warning("Refused spawn for %s: %s", self._log_name, e)
            raise _http_error(400, f"Rejected: {e}", "Invalid name") from None
        return name, groups

    def apply_selection(self, user_options) -> Selection:
        selection = super().apply_selection(user_options)
        self.checked_identity()  # before anything reaches the API server
        return selection

    # -- from the selection to KubeSpawner's traits ----------------------------------

    def plan(self, selection: Selection) -> None:
        """Set every pod-shaping trait from ``selection`` (pure builders; the ids are
        the hub's never-reused numbers, labfleet_hub.posix_registry)."""
        username, groups = self.checked_identity()
        catalogue = self.catalogue
        user_number, group_numbers = posix_ids(self.user)
        uid = self.uid_base + user_number
        gids = [self.gid_base + gid for name, gid in group_numbers.items() if name in groups]

        self.image = selection.image.image
        size = selection.size
        self.cpu_limit = self.cpu_guarantee = float(size.cpu)
        self.mem_limit = self.mem_guarantee = size.memory_bytes
        resources = objects.resource_requirements(selection)
        extended = {k: v for k, v in resources["limits"].items() if k not in ("cpu", "memory")}
        self.extra_resource_limits = dict(extended)
        self.extra_resource_guarantees = dict(extended)

        self.node_affinity_required = objects.required_node_terms(
            selection, catalogue, self._configured["node_affinity_required"]
        )
        self.node_affinity_preferred = self._configured[
            "node_affinity_preferred"
        ] + objects.preferred_node_terms(groups)
        self.tolerations = self._configured["tolerations"] + objects.tolerations(
            selection, groups, self.accelerator_kind_tolerations
        )

        if self.home_storage == "pvc":
            self.storage_pvc_ensure = True
        storage = objects.StorageOptions(
            shared_volume=self.shared_volume or None,
            home_mode=self.home_storage,
            home_claim=self.pvc_name if self.home_storage == "pvc" else "",
            home_path=self.home_mount_path,
            groups_path=self.group_mount_root,
            public_path=self.public_mount_path,
            envs_path=self.envs_mount_path,
            shm_default=self.default_shm_size,
        )
        try:
            volumes, mounts = objects.volumes_and_mounts(
                storage,
                username,
                groups,
                envs_writable=bool(self.envs_writer_group) and self.envs_writer_group in groups,
                shm=size.shm,
            )
            self.pod_security_context = objects.pod_security_context(uid, uid, gids)
            self.container_security_context = objects.container_security_context(uid, uid)
        except objects.PodSpecError as e:
            raise _http_error(
                500, f"cannot build your notebook pod: {e}", "Bad configuration"
            ) from None
        self._storage_layout = None
        if self.storage_path:
            try:
                self._storage_layout = plan_storage(
                    self.storage_path,
                    username,
                    uid,
                    uid,
                    {n: self.gid_base + g for n, g in group_numbers.items() if n in groups},
                )
            except StorageError as e:
                raise _http_error(500, f"cannot plan your storage: {e}", "Storage error") from None
        self.volumes = self._configured["volumes"] + volumes
        self.volume_mounts = self._configured["volume_mounts"] + mounts
        self._storage_env = objects.storage_env(storage, groups)
        self.working_dir = self.home_mount_path
        self.uid, self.gid, self.fs_gid = uid, uid, None
        self.supplemental_gids = sorted(set(gids))
        self.privileged = False
        self.allow_privilege_escalation = False
        # Notebooks need no Kubernetes API access; a configured service account opts in.
        self.automount_service_account_token = bool(self.service_account) and bool(
            self.automount_service_account_token
        )

        group = objects.accounting_group(selection, groups, self.accounting_group_exclude)
        self.accounting_group_name = group
        user_label = safe_slug(username, is_valid=is_valid_label)
        labels, annotations = objects.contract_metadata(
            selection, username, user_label, groups, group
        )
        self._gates = []
        if self.kueue_enabled and selection.profile.kueue and group:
            labels.update(objects.kueue_labels(group_local_queue(group)))
            self._gates = list(objects.KUEUE_SCHEDULING_GATES)
        self._pod_metadata = (labels, annotations)

    async def load_user_options(self):
        # Replaces KubeSpawner's profile_list handling: the catalogue is the only source.
        selection = self.selection or self.apply_selection(self.user_options)
        self.plan(selection)
        if self._storage_layout is not None:
            await self.prepare_storage(self._storage_layout)

    async def prepare_storage(self, layout: StorageLayout) -> None:
        """Make the user's folders on the shared tree (``storage_path``) before the pod."""
        try:
            await asyncio.to_thread(apply_storage, layout)
        except (StorageError, OSError) as e:
            self.log.error("Storage for %s: %s", self._log_name, e)
            raise _http_error(500, f"cannot prepare your storage: {e}", "Storage error") from e

    async def get_pod_manifest(self):
        pod = await super().get_pod_manifest()
        # Set on the model, not through extra_labels, which KubeSpawner would
        # run through str.format (a "{" in a value would break it).
        labels, annotations = self._pod_metadata
        pod.metadata.labels = {**(pod.metadata.labels or {}), **labels}
        pod.metadata.annotations = {**(pod.metadata.annotations or {}), **annotations}
        if self._gates:
            pod.spec.scheduling_gates = [V1PodSchedulingGate(name=g["name"]) for g in self._gates]
        self._move_secret_env(pod.spec.containers[0])
        return pod

    # -- the server's Secret -------------------------------------------------------

    @property
    def env_secret_name(self) -> str:
        return secretenv.env_secret_name(self.pod_name)

    def _move_secret_env(self, container) -> None:
        """Replace the notebook container's secret values by references to the Secret."""
        plain = {e.name: e.value for e in container.env or [] if e.value_from is None and e.value}
        refs, self._env_secret_data = secretenv.split_env(
            plain, self.env_secret_name, self.env_secret_pattern
        )
        moved = []
        for e in container.env or []:
            ref = refs.get(e.name) if e.value_from is None else None
            if ref is None:
                moved.append(e)
                continue
            key = ref["valueFrom"]["secretKeyRef"]
            source = V1SecretKeySelector(name=key["name"], key=key["key"])
            moved.append(V1EnvVar(name=e.name, value_from=V1EnvVarSource(secret_key_ref=source)))
        container.env = moved

    def _kube(self) -> KubeAPI:
        return KubeAPI(self.api.api_client)

    async def _put_env_secret(self) -> None:
        """Create the server's Secret, replacing one left by an earlier start."""
        labels = self._build_common_labels(self._expand_all(self.extra_labels))
        body = secretenv.env_secret(
            self.env_secret_name, self.namespace, self._env_secret_data, labels
        )
        path = f"/api/v1/namespaces/{quote(self.namespace)}/secrets"
        try:
            try:
                await self._kube().request("POST", path, body=body)
            except KubeError as e:
                if e.status != 409:
                    raise
                await self._delete_env_secret()
                await self._kube().request("POST", path, body=body)
        except KubeError as e:
            raise _http_error(
                500,
                f"cannot create your server's secret {self.env_secret_name} in namespace "
                f"{self.namespace} ({e}); the hub needs create, patch and delete on secrets "
                "there (spawner/manifests/rbac.yaml)",
                "Secret refused",
            ) from None

    async def _own_env_secret(self) -> None:
        """Make the running pod the Secret's owner (the garbage collector then removes it
        with the pod, even if the hub never calls stop)."""
        ref_key = f"{self.namespace}/{self.pod_name}"
        try:
            await exponential_backoff(
                lambda: self.pod_has_uid(self.pod_reflector.pods.get(ref_key)),
                f"pod/{ref_key} does not have a uid",
                timeout=self.k8s_api_request_retry_timeout,
            )
            uid = self.pod_reflector.pods[ref_key]["metadata"]["uid"]
            await self._kube().request(
                "PATCH",
                f"/api/v1/namespaces/{quote(self.namespace)}/secrets/{quote(self.env_secret_name)}",
                body=secretenv.pod_owner(self.pod_name, uid),
                content_type="application/merge-patch+json",
            )
        except (KubeError, TimeoutError) as e:
            # the server still works; stop deletes the Secret
            self.log.warning("Secret %s not owned by its pod: %s", self.env_secret_name, e)

    async def _delete_env_secret(self) -> None:
        try:
            await self._kube().request(
                "DELETE",
                f"/api/v1/namespaces/{quote(self.namespace)}/secrets/{quote(self.env_secret_name)}",
            )
        except KubeError as e:
            if e.status != 404:
                raise

    async def _make_create_pod_request(self, pod, request_timeout):
        # KubeSpawner 7.1's own step (private; tests/k8s/test_notebook_token_secret.py
        # breaks if a new KubeSpawner stops calling it, since the pod would then wait).
        # The Secret first: a container whose secretKeyRef is missing cannot start.
        # Every attempt, since a conflicting old pod is stopped (Secret included) between.
        await self._put_env_secret()
        created = await super()._make_create_pod_request(pod, request_timeout)
        if created:
            await self._own_env_secret()
        return created

    async def stop(self, now=False):
        try:
            await super().stop(now=now)
        finally:
            try:
                await self._delete_env_secret()
            except KubeError as e:
                self.log.error("Cannot delete %s: %s", self.env_secret_name, e)

    def get_env(self):
        env = super().get_env()
        if self.selection is not None:
            env.update(self.selection_env())
        env.update(self._storage_env)
        if self.accounting_group_name:
            env["LABFLEET_ACCOUNTING_GROUP"] = self.accounting_group_name
        return env

    # -- availability ------------------------------------------------------------

    def _cluster_watch(self, start: bool = True) -> ClusterWatch | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        watches = PlatformKubeSpawner._cluster_watches
        watch = watches.get(loop)
        if watch is None and start:
            from kubespawner.clients import shared_client

            api = self.watch_api if self.watch_api is not None else shared_client("CoreV1Api")
            watch = watches[loop] = ClusterWatch(api, log=self.log)
            watch.start()
        return watch

    def availability(self) -> dict[str, tuple[int, int]]:
        """Free/total per accelerator for this user's groups, from memory only."""
        if not self.availability_enabled:
            return {}
        watch = self._cluster_watch()
        if watch is None or not watch.ready:
            return {}
        return watch.index.availability(self.catalogue, self.user_group_names())

    @default("options_form")
    def _kube_options_form(self):
        async def render(spawner):
            if spawner.availability_enabled:
                watch = spawner._cluster_watch()
                if watch is not None and not watch.ready:
                    await watch.wait_ready(spawner.availability_wait)
            return spawner.render_options_form()

        return render

    @classmethod
    async def stop_watches(cls) -> None:
        """Stop the availability watches and pod/event reflectors (tests, shutdown)."""
        watches, cls._cluster_watches = dict(cls._cluster_watches), {}
        for watch in watches.values():
            await watch.stop()
        await cls._stop_all_reflectors()

    # -- progress and failing with a reason ----------------------------------------------

    def current_pod(self) -> dict | None:
        reflector = self.pod_reflector
        if reflector is None:
            return None
        return reflector.pods.get(f"{self.namespace}/{self.pod_name}")

    async def _wait_unschedulable(self) -> str:
        """Return the scheduler's reason once the pod stayed unschedulable for the grace period."""
        since = None
        while True:
            await asyncio.sleep(self.progress_interval)
            reason = unschedulable_reason(self.current_pod())
            if reason is None:
                since = None
                continue
            since = since or time.monotonic()
            if time.monotonic() - since >= self.unschedulable_grace_period:
                return reason

    async def _start(self):
        inner = asyncio.ensure_future(super()._start())
        if self.unschedulable_grace_period <= 0:
            return await self._with_reason(inner)
        guard = asyncio.ensure_future(self._wait_unschedulable())
        try:
            await asyncio.wait({inner, guard}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            inner.cancel()
            guard.cancel()
            raise
        if inner.done():
            guard.cancel()
            return await self._with_reason(inner)
        reason = guard.result()
        inner.cancel()
        self.log.warning("Giving up on %s: unschedulable: %s", self._log_name, reason)
        try:
            await self.stop(now=True)
        except Exception:
            self.log.exception("Deleting the unschedulable pod of %s", self._log_name)
        raise _http_error(
            503,
            f"No node can run your server right now: {reason.rstrip('. ')}. "
            "Choose another profile or try again later.",
            "Unschedulable",
        )

    async def _with_reason(self, inner):
        try:
            return await inner
        except TimeoutError:
            message = pending_message(self.current_pod(), self._queue_position)
            if message:
                raise _http_error(
                    503, f"Your server did not start in time. {message}", "Start timeout"
                ) from None
            raise

    # -- queue position -----------------------------------------------------------

    async def _api_get(self, path: str) -> dict:
        """GET ``path`` (JSON) with KubeSpawner's API client; KubeError on an HTTP error."""
        return await KubeAPI(self.api.api_client).request("GET", path)

    async def kueue_position(self, pod: dict) -> int | None:
        """The 0-based place of ``pod`` in its LocalQueue, or None when unknown.

        Kueue's visibility API first; where it is not served (or refuses), the
        estimate from the namespace's Workloads. Never raises: the position is a
        courtesy, and the spawn goes on without it."""
        ns = (pod.get("metadata") or {}).get("namespace") or self.namespace
        queue = ((pod.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
        if not queue:
            return None
        if self.kueue_visibility_version and self._position_source != "workloads":
            try:
                pending = await self._api_get(
                    f"/apis/visibility.kueue.x-k8s.io/{self.kueue_visibility_version}"
                    f"/namespaces/{quote(ns)}/localqueues/{quote(queue)}/pendingworkloads"
                )
                self._position_source = "visibility"
                return position_from_visibility(pending, pod)
            except Exception as e:
                self.log.info("Kueue visibility API not usable (%s); estimating from Workloads", e)
                self._position_source = "workloads"
        try:
            workloads = await self._api_get(
                f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{quote(ns)}/workloads"
            )
        except Exception as e:
            self.log.info("Cannot list Kueue Workloads for the queue position: %s", e)
            return None
        return position_from_workloads(workloads.get("items") or [], pod)

    async def progress(self):
        """KubeSpawner's pod events, plus why the pod waits while it is pending."""
        if self.events_enabled:
            await self._start_watching_events()
        start_future = self._start_future
        seen, last, percent = 0, None, 0.0
        position, asked = None, float("-inf")
        while True:
            if start_future is None:
                start_future = self._start_future
            finished = start_future is not None and start_future.done()
            pod = self.current_pod()
            if not kueue_gated(pod):
                position = None
            elif (
                self.queue_position_interval > 0
                and time.monotonic() - asked >= self.queue_position_interval
            ):
                asked = time.monotonic()
                position = self._queue_position = await self.kueue_position(pod)
            message = pending_message(pod, position)
            if message and message != last:
                percent += (90 - percent) / 3
                yield {"progress": int(percent), "message": message}
            last = message or last
            events = self.events
            for event in events[seen:]:
                stamp = event.get("lastTimestamp") or event.get("eventTime")
                percent += (90 - percent) / 3
                yield {
                    "progress": int(percent),
                    "raw_event": event,
                    "message": f"{stamp} [{event.get('type')}] {event.get('message')}",
                }
            seen = max(seen, len(events))
            if finished:
                break
            await asyncio.sleep(self.progress_interval)
