"""The batch namespaces' NetworkPolicies (labfleet_batch.netpol) as plain dicts."""

from __future__ import annotations

from pathlib import Path

import pytest
from labfleet_batch import netpol
from labfleet_batch.netpol import NetworkConfig, batch_network_policies, cut_out, parse_network
from labfleet_batch.queues import QueueConfigError, parse_queue_config, queue_objects
from labfleet_spawner.catalogue import load_catalogue

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(ROOT / "config" / "catalogue.yaml")
LABELS = {"labfleet.io/kind": "batch"}


def test_default_is_one_policy_that_denies_everything():
    assert batch_network_policies("labfleet-ml", NetworkConfig()) == [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "labfleet-default-deny", "namespace": "labfleet-ml",
                         "labels": LABELS},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
        }
    ]  # fmt: skip


def test_dns_allows_the_cluster_dns_pods_on_port_53_only():
    deny, dns = batch_network_policies("ns", parse_network({"dns": True}))
    assert deny["metadata"]["name"] == "labfleet-default-deny"
    assert dns["metadata"] == {"name": "labfleet-allow-dns", "namespace": "ns", "labels": LABELS}
    assert dns["spec"] == {
        "podSelector": {},
        "policyTypes": ["Egress"],  # no ingress rule: the deny policy's stands
        "egress": [
            {
                "to": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                        },
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    }
                ],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            }
        ],
    }


def test_internet_egress_cuts_out_private_link_local_and_metadata():
    policies = batch_network_policies("ns", parse_network({"egress": ["0.0.0.0/0", "::/0"]}))
    assert [p["metadata"]["name"] for p in policies] == [
        "labfleet-default-deny",
        "labfleet-allow-egress",
    ]
    (rule,) = policies[1]["spec"]["egress"]
    assert "ports" not in rule
    v4, v6 = (peer["ipBlock"] for peer in rule["to"])
    assert v4 == {
        "cidr": "0.0.0.0/0",
        "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                   "127.0.0.0/8", "169.254.0.0/16"],
    }  # fmt: skip
    # the metadata /32 is inside 169.254.0.0/16: not listed twice
    assert v6 == {"cidr": "::/0", "except": ["fc00::/7", "fe80::/10"]}  # fd00:ec2::254 in fc00::/7


def test_metadata_is_cut_even_when_link_local_is_not_blocked():
    network = parse_network({"egress": ["169.254.0.0/16", "0.0.0.0/0"], "blocked": []})
    (rule,) = batch_network_policies("ns", network)[1]["spec"]["egress"]
    assert [peer["ipBlock"] for peer in rule["to"]] == [
        {"cidr": "169.254.0.0/16", "except": ["169.254.169.254/32"]},
        {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]},
    ]


def test_a_narrow_internal_range_is_allowed_as_asked():
    # a blocked range that contains the allowed one does not cut it: the admin meant it
    assert cut_out("10.96.0.10/32", netpol.DEFAULT_BLOCKED) == []
    assert cut_out("10.0.0.0/8", ["10.1.0.0/16", "10.1.2.0/24"]) == ["10.1.0.0/16"]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"egress": ["169.254.169.254/32"]}, "network.egress: 169.254.169.254/32 is the cloud"),
        ({"egress": ["10.0.0.1/8"]}, "network.egress: '10.0.0.1/8' is not a CIDR"),
        ({"egress": "0.0.0.0/0"}, "network.egress: must be a list"),
        ({"dns": "yes"}, "network.dns: must be true or false"),
        ({"blocked": ["nope"]}, "network.blocked: 'nope' is not a CIDR"),
        ({"dns_labels": {}}, "network.dns_labels: must be a non-empty mapping"),
        ({"ingress": []}, "network: unknown field(s) ingress"),
    ],
)
def test_bad_network_sections_are_refused_naming_the_field(raw, message):
    with pytest.raises(QueueConfigError) as e:
        parse_queue_config({"groups": {"ml": {}}, "network": raw}, CATALOGUE, source="q.yaml")
    assert f"q.yaml: {message}" in str(e.value)


def test_queue_layout_has_the_policies_of_every_group_after_its_namespace():
    config = parse_queue_config(
        {"groups": {"ml": {}, "cms": {}}, "network": {"dns": True}}, CATALOGUE
    )
    objects = queue_objects(config, CATALOGUE)
    kinds = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    for ns in ("labfleet-ml", "labfleet-cms"):
        mine = [k for k in kinds if k[0] == "NetworkPolicy" and k[1] == ns]
        assert [k[2] for k in mine] == ["labfleet-default-deny", "labfleet-allow-dns"]
        assert kinds.index(("Namespace", None, ns)) < kinds.index(mine[0])


def test_shipped_manifest_is_what_sync_queues_applies_by_default():
    import yaml

    text = (ROOT / "batch" / "manifests" / "networkpolicies.yaml").read_text()
    assert text == netpol.manifest_yaml()  # regenerate: python -m labfleet_batch.netpol
    config = parse_queue_config({"groups": {"cms": {}, "ml": {}}}, CATALOGUE)
    applied = [o for o in queue_objects(config, CATALOGUE) if o["kind"] == "NetworkPolicy"]
    assert list(yaml.safe_load_all(text)) == applied
