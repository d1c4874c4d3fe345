"""Secrets in a notebook's environment, and where they may live (pure).

A pod's ``env`` is part of its spec: whoever may ``list`` or ``get`` pods
(the accounting service, the GPU exporter, the hub's availability watch,
any monitoring agent) reads every value there. A notebook server's own
``JUPYTERHUB_API_TOKEN`` can call the hub's API as its user, which hands
out the user's IAM access token (``auth_state``), so it must not be there.

The Kubernetes spawner therefore puts every variable named like a secret
(:data:`DEFAULT_SECRET_PATTERN`, and always the server's tokens,
:data:`SERVER_TOKENS`) into a Secret of its own per server and references it
with ``valueFrom.secretKeyRef``: a reader of pods learns the Secret's name
and key, never the value. The Secret belongs to the pod (an
``ownerReference``, so the garbage collector removes it with the pod) and
is deleted when the server stops.

The local spawner uses the same pattern to keep such variables out of a
notebook's environment altogether (:func:`labfleet_spawner.local.filter_secret_env`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping

#: Names of environment variables that hold secrets (matched anywhere, any case).
DEFAULT_SECRET_PATTERN = r"SECRET|PASSWORD|PASSWD|PRIVATE_KEY|TOKEN|CRYPT_KEY|API_KEY|CREDENTIAL"
#: The notebook server's own credentials (JupyterHub sets both to the same token).
SERVER_TOKENS = ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN")

_SECRET_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")


def env_secret_name(pod_name: str) -> str:
    """The per-server Secret's name: beside KubeSpawner's ``{pod_name}`` (internal SSL)."""
    return f"{pod_name}-env"


def split_env(
    env: Mapping[str, str],
    secret_name: str,
    pattern: str = DEFAULT_SECRET_PATTERN,
    always: Iterable[str] = SERVER_TOKENS,
) -> tuple[dict[str, dict], dict[str, str]]:
    """Which plain ``env`` values move into the Secret ``secret_name``.

    Returns ``(refs, data)``: ``refs`` maps each moved variable's name to its
    ``EnvVar`` (``{"name", "valueFrom": {"secretKeyRef": ...}}``), ``data`` the
    Secret's keys to the values. Variables in ``always`` move whatever
    ``pattern`` says; an empty ``pattern`` moves only those.
    """
    name_re = re.compile(pattern, re.IGNORECASE) if pattern else None
    always = set(always)
    refs: dict[str, dict] = {}
    data: dict[str, str] = {}
    for name, value in env.items():
        if name not in always and (name_re is None or not name_re.search(name)):
            continue
        # Secret keys are [-._a-zA-Z0-9]+; an environment name may hold more.
        key = name if _SECRET_KEY_RE.match(name) else f"env-{len(data)}"
        data[key] = value
        refs[name] = {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}},
        }
    return refs, data


def env_secret(
    name: str, namespace: str, data: Mapping[str, str], labels: Mapping[str, str]
) -> dict:
    """The Secret manifest (``data`` base64-encoded, as the API stores it)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def pod_owner(pod_name: str, pod_uid: str) -> dict:
    """A merge patch making the pod the Secret's owner (garbage-collected with it).

    No ``blockOwnerDeletion``: that would need ``update`` on ``pods/finalizers``
    where the OwnerReferencesPermissionEnforcement admission plugin runs.
    """
    owner = {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid}
    return {"metadata": {"ownerReferences": [owner]}}
