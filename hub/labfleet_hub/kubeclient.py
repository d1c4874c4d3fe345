"""One way for labfleet's services to reach the Kubernetes API."""

from __future__ import annotations


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
