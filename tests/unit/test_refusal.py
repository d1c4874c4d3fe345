"""A refused login says why (the allowed groups, the person's own) and whom to ask."""

import pytest
from labfleet_hub.refusal import REASON, LoginRefused, claimed_groups, login_refusal

CLAIMS = {"groups": ["other-org/users", "other-org/ml"], "wlcg.groups": ["/other-org/users"]}
KEYS = ["groups", "wlcg.groups"]


def test_refusal_names_allowed_groups_as_the_identity_provider_does():
    refusal = login_refusal("mallory", CLAIMS, KEYS, {"users", "ml"}, "ai-infn/", "x@example.org")
    assert refusal.allowed_groups == ("ai-infn/ml", "ai-infn/users")
    assert refusal.user_groups == ("other-org/users", "other-org/ml")
    assert refusal.reason == "mallory is not in a group allowed on this platform"
    assert refusal.text() == (
        "mallory is not in a group allowed on this platform (allowed: ai-infn/ml, "
        "ai-infn/users; your groups: other-org/users, other-org/ml). To get access, "
        "ask x@example.org to add you to one of the allowed groups."
    )


def test_refusal_without_groups_or_contact():
    refusal = login_refusal("eve", {}, KEYS, {"users"}, "", "", no_longer=True)
    assert refusal.allowed_groups == ("users",) and refusal.user_groups == ()
    assert "eve is no longer a member of a group allowed" in refusal.text()
    assert "your groups: none" in refusal.text()
    assert "ask the platform's administrators" in refusal.text()


@pytest.mark.parametrize(
    "contact, href",
    [
        ("support@example.org", "mailto:support@example.org"),
        ("https://help.example.org/access", "https://help.example.org/access"),
        ("the AI_INFN support team, support@example.org", ""),
        ("javascript:alert(1)", ""),
        ('x@example.org" onclick="y', ""),
    ],
)
def test_contact_becomes_a_link_only_when_it_is_an_address_or_url(contact, href):
    assert login_refusal("m", {}, KEYS, {"users"}, "", contact).contact_href == href


def test_claimed_groups_skip_non_strings_and_keep_order():
    assert claimed_groups({"groups": ["/a/b", 3, "", "a/b", "c"]}, ["groups"]) == ("a/b", "c")
    assert claimed_groups({"groups": "solo"}, ["groups"]) == ("solo",)


def test_login_refused_is_a_403_with_the_reason_once():
    error = LoginRefused(login_refusal("mallory", CLAIMS, KEYS, {"users"}, "ai-infn/"))
    assert error.status_code == 403 and error.reason == REASON
    # JupyterHub's page heading is the reason, its text the explanation: not the same line twice
    assert error.jupyterhub_message != error.reason
    assert error.get_message() == error.jupyterhub_message
