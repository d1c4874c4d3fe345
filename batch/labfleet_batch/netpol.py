"""NetworkPolicies of the group batch namespaces (pure builders).

A batch job needs no network: its files come from the shared filesystem,
which the kubelet mounts (not the pod), its logs are read through the
kubelet, it never calls the hub, the batch service or the Kubernetes API
(no ServiceAccount token is mounted). So each group namespace gets, from
``labfleet sync-queues`` (:func:`labfleet_batch.queues.queue_objects`):

- ``labfleet-default-deny``: every pod of the namespace, no ingress and no
  egress (another pod, the GPU exporters, the cloud metadata address
  169.254.169.254, the API server: nothing);
- ``labfleet-allow-dns`` with ``network.dns: true``: egress to the cluster's
  DNS pods only (``kube-system``, ``k8s-app=kube-dns``, port 53 UDP and TCP);
- ``labfleet-allow-egress`` with ``network.egress: [CIDR, ...]`` (for example
  ``["0.0.0.0/0"]`` for the internet): egress to those ranges, except every
  range of ``network.blocked`` inside them (default: the private, shared and
  link-local ranges, where pods, nodes, the exporters and the metadata
  service live) and always the cloud metadata addresses.

Policies only add up (a pod is allowed what any of them allows), so these
three are all there is. They are enforced only by a network plugin that
implements NetworkPolicy (Calico, Cilium, Antrea, kube-router, ...); without
one they are stored and ignored (docs/security.md).

Configuration, under ``batch.queues``::

    network:
      dns: false            # egress to the cluster DNS (needed for names in egress)
      egress: []            # CIDRs jobs may reach, e.g. ["0.0.0.0/0", "::/0"]
      blocked: [...]        # ranges cut out of egress (default DEFAULT_BLOCKED)
      dns_namespace: kube-system
      dns_labels: {k8s-app: kube-dns}
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from labfleet_hub import contract

API = "networking.k8s.io/v1"
DENY_NAME = "labfleet-default-deny"
DNS_NAME = "labfleet-allow-dns"
EGRESS_NAME = "labfleet-allow-egress"

#: Cloud metadata services (AWS/GCP/Azure/OpenStack, and AWS' IPv6 one): never reachable.
METADATA = ("169.254.169.254/32", "fd00:ec2::254/128")
#: Ranges cut out of any allowed egress range unless configured otherwise: private
#: (RFC 1918, unique local), shared (RFC 6598), loopback and link-local.
DEFAULT_BLOCKED = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "fc00::/7",
    "fe80::/10",
)


class NetworkConfigError(ValueError):
    """The ``network`` section is invalid; the message names the field."""


@dataclass(frozen=True)
class NetworkConfig:
    dns: bool = False
    egress: tuple[str, ...] = ()
    blocked: tuple[str, ...] = DEFAULT_BLOCKED
    dns_namespace: str = "kube-system"
    dns_labels: dict[str, str] = field(default_factory=lambda: {"k8s-app": "kube-dns"})


def _networks(values: Any, where: str) -> tuple[str, ...]:
    if not isinstance(values, list | tuple):
        raise NetworkConfigError(f"{where}: must be a list of CIDRs, not {values!r}")
    result = []
    for value in values:
        try:
            result.append(str(ipaddress.ip_network(str(value), strict=True)))
        except ValueError as e:
            raise NetworkConfigError(f"{where}: {value!r} is not a CIDR ({e})") from None
    return tuple(result)


def parse_network(data: Any, where: str = "network") -> NetworkConfig:
    """Validate the ``network`` section; errors name the field."""
    if data is None:
        return NetworkConfig()
    if not isinstance(data, dict):
        raise NetworkConfigError(f"{where}: must be a mapping")
    known = {"dns", "egress", "blocked", "dns_namespace", "dns_labels"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise NetworkConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    if "dns" in data:
        if not isinstance(data["dns"], bool):
            raise NetworkConfigError(f"{where}.dns: must be true or false")
        kwargs["dns"] = data["dns"]
    if "egress" in data:
        kwargs["egress"] = _networks(data["egress"] or [], f"{where}.egress")
        for cidr in kwargs["egress"]:
            if cidr in METADATA:
                raise NetworkConfigError(
                    f"{where}.egress: {cidr} is the cloud metadata service, which jobs never reach"
                )
    if "blocked" in data:
        kwargs["blocked"] = _networks(data["blocked"] or [], f"{where}.blocked")
    if "dns_namespace" in data:
        kwargs["dns_namespace"] = str(data["dns_namespace"])
    if "dns_labels" in data:
        labels = data["dns_labels"]
        if not isinstance(labels, dict) or not labels:
            raise NetworkConfigError(f"{where}.dns_labels: must be a non-empty mapping")
        kwargs["dns_labels"] = {str(k): str(v) for k, v in labels.items()}
    return NetworkConfig(**kwargs)


def cut_out(cidr: str, blocked: Iterable[str]) -> list[str]:
    """The ranges of ``blocked`` (and the metadata addresses) strictly inside ``cidr``.

    A blocked range that contains ``cidr`` is not cut: the administrator allowed
    that narrower range on purpose (e.g. one internal service's /32).
    """
    net = ipaddress.ip_network(cidr)
    result = []
    for value in (*blocked, *METADATA):
        other = ipaddress.ip_network(value)
        if other.version == net.version and other != net and other.subnet_of(net):
            if str(other) not in result:
                result.append(str(other))
    # an except inside another except is redundant (and some plugins reject it)
    nets = [ipaddress.ip_network(r) for r in result]
    return [str(n) for n in nets if not any(o != n and n.subnet_of(o) for o in nets)]


def _policy(namespace: str, name: str, types: list[str], **spec: Any) -> dict:
    return {
        "apiVersion": API,
        "kind": "NetworkPolicy",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {contract.LABEL_KIND: contract.KIND_BATCH},
        },
        "spec": {"podSelector": {}, "policyTypes": types, **spec},
    }


def batch_network_policies(namespace: str, network: NetworkConfig) -> list[dict]:
    """The policies of one group's batch namespace (see the module docstring)."""
    policies = [_policy(namespace, DENY_NAME, ["Ingress", "Egress"])]
    if network.dns:
        dns_peer = {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": network.dns_namespace}
            },
            "podSelector": {"matchLabels": dict(network.dns_labels)},
        }
        ports = [{"protocol": p, "port": 53} for p in ("UDP", "TCP")]
        policies.append(
            _policy(namespace, DNS_NAME, ["Egress"], egress=[{"to": [dns_peer], "ports": ports}])
        )
    if network.egress:
        peers = []
        for cidr in network.egress:
            block: dict[str, Any] = {"cidr": cidr}
            excepted = cut_out(cidr, network.blocked)
            if excepted:
                block["except"] = excepted
            peers.append({"ipBlock": block})
        policies.append(_policy(namespace, EGRESS_NAME, ["Egress"], egress=[{"to": peers}]))
    return policies


HEADER = """\
# NetworkPolicies of the batch namespaces (labfleet-ml, labfleet-cms) with the default
# network section (deny everything in and out). `labfleet sync-queues` applies them with
# the queue layout for your groups and `batch.queues.network`; generated by
#   python -m labfleet_batch.netpol > batch/manifests/networkpolicies.yaml
# They need a network plugin that enforces NetworkPolicy (docs/security.md).
"""


def manifest_yaml(groups: Iterable[str] = ("cms", "ml"), prefix: str = "labfleet-") -> str:
    """The shipped manifest's text: the header, then one YAML document per policy."""
    import yaml

    objects = [
        policy
        for group in groups
        for policy in batch_network_policies(
            contract.group_namespace(group, prefix=prefix), NetworkConfig()
        )
    ]
    return HEADER + yaml.safe_dump_all(objects, sort_keys=False, explicit_start=True)


if __name__ == "__main__":
    print(manifest_yaml(), end="")
