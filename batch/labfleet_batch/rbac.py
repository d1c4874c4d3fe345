"""RBAC for the batch service's ServiceAccount: a Role and RoleBinding per group namespace.

Nothing cluster-wide: the service can create Jobs only in the groups'
namespaces, read their pods, logs and Kueue Workloads, and ask Kueue's
visibility API for positions there. Creating the queue layout
(:func:`labfleet_batch.queues.sync_queues`: namespaces, flavors,
ClusterQueues) needs cluster-scoped rights and is done by the platform admin
(or a Helm hook), not by the service.
"""

from __future__ import annotations

from .queues import QueueConfig

ROLE_NAME = "labfleet-batch"

RULES = [
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {
        "apiGroups": ["kueue.x-k8s.io"],
        "resources": ["workloads", "localqueues"],
        "verbs": ["get", "list"],
    },
    {
        "apiGroups": ["visibility.kueue.x-k8s.io"],
        "resources": ["localqueues/pendingworkloads"],
        "verbs": ["get"],
    },
]


def rbac_objects(config: QueueConfig, service_account: str, sa_namespace: str) -> list[dict]:
    objects = []
    for group in sorted(config.groups):
        ns = config.namespace(group)
        objects.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": ROLE_NAME, "namespace": ns},
                "rules": RULES,
            }
        )
        objects.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": ROLE_NAME, "namespace": ns},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": ROLE_NAME,
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": service_account, "namespace": sa_namespace}
                ],
            }
        )
    return objects
