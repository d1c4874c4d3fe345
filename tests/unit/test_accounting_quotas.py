"""Quota changes: parsing, caps and the new ClusterQueue resourceGroups (pure)."""

from decimal import Decimal

import pytest
from labfleet_accounting.quotas import (
    Cap,
    Change,
    OverCap,
    QuotaError,
    apply_changes,
    check_caps,
    parse_changes,
    quantity,
    quota_entries,
)

GROUPS = [
    {"coveredResources": ["cpu", "memory"], "flavors": [{"name": "d", "resources": [
        {"name": "cpu", "nominalQuota": 8}, {"name": "memory", "nominalQuota": "32Gi"}]}]},
    {"coveredResources": ["nvidia.com/gpu"], "flavors": [
        {"name": "t4", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 2}]},
        {"name": "a100", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 1,
                                        "borrowingLimit": 0}]}]},
]  # fmt: skip


def test_quantities_compare_exactly():
    assert quantity("500m") == Decimal("0.5") and quantity(4) == 4
    assert quantity("1Gi") > quantity("1G") and quantity("1.5Ki") == 1536
    for bad in ("-1", "4 cores", "1GB", True, -2):
        with pytest.raises(QuotaError):
            quantity(bad)


def test_parse_changes_names_the_entry():
    body = {"quotas": [{"flavor": "t4", "resource": "nvidia.com/gpu", "nominalQuota": 3}]}
    assert parse_changes(body) == [Change("t4", "nvidia.com/gpu", "3", None)]
    for bad, message in [
        ({}, "body must be"),
        ({"quotas": []}, "nothing to change"),
        ({"quotas": [{"flavor": "t4"}]}, "quotas[0]: flavor and resource"),
        ({"quotas": [{"flavor": "t4", "resource": "x", "nominal": 1}]}, "unknown field(s) nominal"),
        ({"quotas": [{"flavor": "t4", "resource": "x", "nominalQuota": "x"}]}, "not a quantity"),
        ({"quotas": [{"flavor": "a", "resource": "x"}] * 2}, "appears twice"),
    ]:
        with pytest.raises(QuotaError) as info:
            parse_changes(bad)
        assert message in str(info.value)


def test_caps():
    caps = {("t4", "nvidia.com/gpu"): Cap("t4", "nvidia.com/gpu", "4", "2")}
    check_caps("ml", [Change("t4", "nvidia.com/gpu", "4", "2")], caps)
    with pytest.raises(OverCap, match="exceeds the cap 4"):
        check_caps("ml", [Change("t4", "nvidia.com/gpu", "4500m")], caps)
    with pytest.raises(OverCap, match=r"quotas\[0\]\.borrowingLimit: 3 "):
        check_caps("ml", [Change("t4", "nvidia.com/gpu", None, "3")], caps)
    with pytest.raises(OverCap, match="no cap for cpu on flavor 'd'"):
        check_caps("ml", [Change("d", "cpu", "1")], caps)


def test_apply_changes_edits_only_the_named_entries():
    new = apply_changes(GROUPS, [Change("t4", "nvidia.com/gpu", "3", "1"), Change("d", "cpu", "6")])
    assert GROUPS[1]["flavors"][0]["resources"][0]["nominalQuota"] == 2  # input untouched
    entries = {(e["flavor"], e["resource"]): e for e in quota_entries(new)}
    assert entries[("t4", "nvidia.com/gpu")] == {
        "flavor": "t4", "resource": "nvidia.com/gpu", "nominalQuota": "3", "borrowingLimit": "1"
    }  # fmt: skip
    assert entries[("d", "cpu")]["nominalQuota"] == "6"
    assert entries[("d", "memory")]["nominalQuota"] == "32Gi"
    assert entries[("a100", "nvidia.com/gpu")]["borrowingLimit"] == "0"
    assert [rg["coveredResources"] for rg in new] == [rg["coveredResources"] for rg in GROUPS]
    with pytest.raises(QuotaError, match="no nvidia.com/gpu on flavor 'v100'; it has: a100/"):
        apply_changes(GROUPS, [Change("v100", "nvidia.com/gpu", "1")])
