"""The label and annotation contract shared by every labfleet component.

The spawners and the batch service write these keys on pods and Jobs; the
accounting collectors read them. Keep every key here, and import it: a key
copied as a string literal elsewhere is a bug waiting for a rename.
"""

import re

#: Prefix of every labfleet label and annotation key.
DOMAIN = "labfleet.io"

LABEL_USER = f"{DOMAIN}/user"
LABEL_GROUP = f"{DOMAIN}/group"
LABEL_PROFILE = f"{DOMAIN}/profile"
LABEL_ACCELERATOR = f"{DOMAIN}/accelerator"
#: "interactive" for notebook servers, "batch" for batch jobs.
LABEL_KIND = f"{DOMAIN}/kind"
KIND_INTERACTIVE = "interactive"
KIND_BATCH = "batch"

ANNOTATION_ACCELERATOR_COUNT = f"{DOMAIN}/accelerator-count"
ANNOTATION_USER = f"{DOMAIN}/username"  # unescaped user name (labels are escaped)
ANNOTATION_GROUPS = f"{DOMAIN}/groups"

#: Kueue keys (see the Kueue documentation).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_MANAGED_LABEL = "kueue.x-k8s.io/managed"
KUEUE_ADMISSION_GATE = "kueue.x-k8s.io/admission"

#: Node taint that reserves a node to one group: ``reserved=<group>:NoSchedule``.
RESERVED_TAINT_KEY = "reserved"
#: interLink virtual nodes.
VIRTUAL_NODE_LABEL = ("type", "virtual-kubelet")
VIRTUAL_NODE_TAINT_KEY = "virtual-node.interlink/no-schedule"

#: Hub group names: what IAM sends after the prefix is stripped must look like this.
GROUP_NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
_GROUP_RE = re.compile(GROUP_NAME_PATTERN)


def is_valid_group_name(name: str) -> bool:
    """True when ``name`` can be a hub group, a namespace suffix and a label value."""
    return bool(_GROUP_RE.match(name))


def group_namespace(group: str, prefix: str = "labfleet-") -> str:
    """The Kubernetes namespace that holds a group's batch jobs."""
    return f"{prefix}{group}"


def group_local_queue(group: str) -> str:
    """The Kueue LocalQueue name of a group (in its namespace)."""
    return f"{group}-queue"
