"""RBAC for the hub's ServiceAccount in Kubernetes mode (``PlatformKubeSpawner``).

Exactly the API calls the spawner makes (KubeSpawner 7.1 plus labfleet's own),
nothing more. In the notebook namespace (Role ``labfleet-hub``):

- ``pods``: ``create`` and ``delete`` (start and stop a notebook), ``list`` and
  ``watch`` (KubeSpawner's pod reflector: ``poll``, ``stop`` and the progress
  page read pods from it, never with a single ``get``; without them no spawn
  can start);
- ``events``: ``list``, ``watch`` (KubeSpawner's event reflector, shown on the
  progress page; ``events_enabled``);
- ``secrets``: ``create`` (each server's ``<pod>-env`` Secret with its API token,
  before the pod: the pod spec only references it, so readers of pods learn no
  token), ``patch`` (make the pod its owner once the pod exists: garbage
  collected with it), ``delete`` (at stop). Never ``get``, ``list`` or ``watch``;
  ``patch`` and ``delete`` answer with the object, so keep other Secrets out of
  the notebook namespace (labfleet_spawner.secretenv);
- ``persistentvolumeclaims``: ``create`` (home claim on first start), ``get``
  (KubeSpawner checks an existing claim after a 403 on create, and for
  legacy-named claims), ``delete`` (``delete_forever`` when a user is removed);
  only with ``home_storage: pvc``;
- ``kueue.x-k8s.io`` ``workloads``: ``list`` (queue-position estimate where the
  visibility API is not served) and ``visibility.kueue.x-k8s.io``
  ``localqueues/pendingworkloads``: ``get`` (the position from Kueue itself);
  only with ``kueue_enabled``.

Cluster-wide (ClusterRole ``labfleet-hub-availability``), read-only:
``list`` and ``watch`` on ``nodes`` and ``pods`` for the live availability in
the spawn form (``ClusterWatch``: free = allocatable minus what pods in *all*
namespaces request, batch jobs included); leave it out with
``availability_enabled: false``.

Not granted: reading secrets, services, namespaces, any write outside the
notebook namespace. KubeSpawner's ``internal_ssl``, ``services_enabled`` and
``enable_user_namespaces`` (which would need them) are not used by labfleet.
Run ``python -m labfleet_spawner.rbac`` to print the shipped manifest
(``spawner/manifests/rbac.yaml``).
"""

from __future__ import annotations

import copy

import yaml

NAME = "labfleet-hub"
RBAC_API = "rbac.authorization.k8s.io"

POD_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "delete", "list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "patch", "delete"]},
]
PVC_RULES = [
    {
        "apiGroups": [""],
        "resources": ["persistentvolumeclaims"],
        "verbs": ["create", "get", "delete"],
    },
]
KUEUE_RULES = [
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list"]},
    {
        "apiGroups": ["visibility.kueue.x-k8s.io"],
        "resources": ["localqueues/pendingworkloads"],
        "verbs": ["get"],
    },
]
AVAILABILITY_RULES = [
    {"apiGroups": [""], "resources": ["nodes", "pods"], "verbs": ["list", "watch"]},
]


def _binding(kind: str, name: str, namespace: str | None, subject: dict) -> dict:
    metadata = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    return {
        "apiVersion": f"{RBAC_API}/v1",
        "kind": f"{kind}Binding",
        "metadata": metadata,
        "roleRef": {"apiGroup": RBAC_API, "kind": kind, "name": name},
        "subjects": [subject],
    }


def hub_rbac_objects(
    service_account: str,
    sa_namespace: str,
    notebook_namespace: str,
    *,
    kueue: bool = True,
    pvc_homes: bool = True,
    availability: bool = True,
    name: str = NAME,
) -> list[dict]:
    """Role + RoleBinding in ``notebook_namespace``, ClusterRole + ClusterRoleBinding.

    ``name`` prefixes every object; change it only to run two hubs in one
    cluster (the ClusterRole's name must differ between them).
    """
    subject = {"kind": "ServiceAccount", "name": service_account, "namespace": sa_namespace}
    rules = POD_RULES + (PVC_RULES if pvc_homes else []) + (KUEUE_RULES if kueue else [])
    objects = [
        {
            "apiVersion": f"{RBAC_API}/v1",
            "kind": "Role",
            "metadata": {"name": name, "namespace": notebook_namespace},
            "rules": rules,
        },
        _binding("Role", name, notebook_namespace, subject),
    ]
    if availability:
        cluster_name = f"{name}-availability"
        objects += [
            {
                "apiVersion": f"{RBAC_API}/v1",
                "kind": "ClusterRole",
                "metadata": {"name": cluster_name},
                "rules": AVAILABILITY_RULES,
            },
            _binding("ClusterRole", cluster_name, None, subject),
        ]
    return copy.deepcopy(objects)  # callers may edit them; the rule tables stay as they are


HEADER = """\
# RBAC of the hub's ServiceAccount (labfleet/labfleet-hub) in Kubernetes mode: a Role in
# the notebook namespace (labfleet) and a read-only ClusterRole (nodes and pods, for the
# spawn form's availability). Generated by
#   python -m labfleet_spawner.rbac > spawner/manifests/rbac.yaml
# from labfleet_spawner.rbac.hub_rbac_objects("labfleet-hub", "labfleet", "labfleet");
# the rules and why each is needed are in that module's docstring.
"""


def manifest_yaml(
    service_account: str = NAME,
    sa_namespace: str = "labfleet",
    notebook_namespace: str = "labfleet",
) -> str:
    """The shipped manifest's text: the header, then one YAML document per object."""
    objects = hub_rbac_objects(service_account, sa_namespace, notebook_namespace)
    return HEADER + yaml.safe_dump_all(objects, sort_keys=False, explicit_start=True)


if __name__ == "__main__":
    print(manifest_yaml(), end="")
