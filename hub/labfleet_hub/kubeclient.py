"""One way for labfleet's services (and the hub) to reach the Kubernetes API.

- :func:`api_client`: a ``kubernetes_asyncio`` ApiClient from a kubeconfig or
  the in-cluster service account;
- :class:`KubeAPI`: plain JSON requests through it (no model classes), and
  server-side apply; an HTTP error is a :class:`KubeError` with the status.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

#: The field manager of labfleet's server-side applies (the batch queue layout).
FIELD_MANAGER = "labfleet-batch"


async def api_client(kubeconfig: str = ""):
    """A ``kubernetes_asyncio`` ApiClient: the given kubeconfig, else in-cluster, else $KUBECONFIG.

    In a pod the service account is used; outside a cluster (a developer's
    machine, the test cluster) the kubeconfig the hub passes to its services.
    """
    from kubernetes_asyncio import client, config

    if kubeconfig:
        return await config.new_client_from_config(config_file=kubeconfig)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        await config.load_kube_config()
    return client.ApiClient()


class KubeError(Exception):
    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.body = body


class KubeAPI:
    """JSON requests to the API server through a ``kubernetes_asyncio`` ApiClient.

    Auth, TLS and connection pooling come from the injected client; its model
    (de)serialisation is skipped, which costs more than the HTTP round trip at
    batch submission rates.
    """

    def __init__(self, api_client):
        self.api_client = api_client

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict | None = None,
        content_type: str = "application/json",
        raw: bool = False,
    ) -> Any:
        client = self.api_client
        headers = {
            **client.default_headers,
            "Accept": "application/json",
            "Content-Type": content_type,
        }
        params = list((query or {}).items())
        # The client's own auth step (it honours token refresh hooks), then
        # straight to its REST layer and connection pool: ApiClient.call_api
        # would first walk the whole body through sanitize_for_serialization,
        # the largest CPU cost of a submission in the profile (our bodies are
        # plain JSON data already).
        await client.update_params_for_auth(headers, params, ["BearerToken"])
        resp = await client.rest_client.request(
            method,
            client.configuration.host + path,
            query_params=params,
            headers=headers,
            body=body,
            _preload_content=False,
        )
        try:
            data = await resp.read()
        finally:
            resp.release()
        if resp.status >= 400:
            try:
                parsed = json.loads(data)
                message = parsed.get("message", "")
            except (ValueError, AttributeError):
                parsed, message = None, data.decode(errors="replace")[:500]
            raise KubeError(resp.status, message, parsed)
        if raw:
            return data.decode(errors="replace")
        return json.loads(data) if data else None

    async def apply(self, obj: dict) -> dict:
        """Server-side apply (create or update in place; never delete-and-recreate)."""
        return await self.request(
            "PATCH",
            object_path(obj),
            body=obj,
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",
        )


_PLURALS = {
    "Namespace": "namespaces",
    "NetworkPolicy": "networkpolicies",
    "ResourceFlavor": "resourceflavors",
    "ClusterQueue": "clusterqueues",
    "LocalQueue": "localqueues",
    "WorkloadPriorityClass": "workloadpriorityclasses",
    "Job": "jobs",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "ServiceAccount": "serviceaccounts",
}


def object_path(obj: dict) -> str:
    api_version, kind = obj["apiVersion"], obj["kind"]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    meta = obj["metadata"]
    ns = f"/namespaces/{meta['namespace']}" if meta.get("namespace") else ""
    return f"{base}{ns}/{_PLURALS[kind]}/{quote(meta['name'])}"
