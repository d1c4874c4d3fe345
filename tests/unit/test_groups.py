"""IAM group claims -> hub groups."""

from labfleet_hub.groups import map_iam_groups

CLAIMS = {
    "groups": ["ai-infn/users", "ai-infn/ml", "other-vo/users"],
    "wlcg.groups": ["/ai-infn/users", "/ai-infn/cms", "/ai-infn/Bad Name"],
}


def test_prefix_is_stripped_and_foreign_groups_ignored():
    groups, dropped = map_iam_groups(CLAIMS, ["groups", "wlcg.groups"], "ai-infn/")
    assert groups == {"users", "ml", "cms"}
    assert dropped == ["'/ai-infn/Bad Name' (not a valid hub group name, in claim wlcg.groups)"]


def test_only_configured_claims_are_read():
    groups, _ = map_iam_groups(CLAIMS, ["groups"], "ai-infn/")
    assert groups == {"users", "ml"}
    groups, _ = map_iam_groups(CLAIMS, ["wlcg.groups"], "ai-infn/")
    assert groups == {"users", "cms"}


def test_without_prefix_nested_names_are_not_hub_groups():
    groups, dropped = map_iam_groups({"groups": ["ai-infn/users", "atlas"]}, ["groups"])
    assert groups == {"atlas"}
    assert "ai-infn/users" in dropped[0]


def test_missing_and_odd_claims():
    assert map_iam_groups({}, ["groups"], "x/") == (set(), [])
    groups, dropped = map_iam_groups({"groups": "x/single"}, ["groups"], "x/")
    assert groups == {"single"}
    groups, dropped = map_iam_groups({"groups": [7]}, ["groups"])
    assert groups == set() and "not a string" in dropped[0]
