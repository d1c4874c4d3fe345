"""OAuthenticator 17.4's own ``test_generic.py``, run against ``IAMAuthenticator``.

The test bodies are upstream's, imported unchanged from the installed package
(``oauthenticator/tests/test_generic.py``); this module only substitutes the
class they build (the module-level name ``GenericOAuthenticator`` they look
up) with a subclass of ``IAMAuthenticator``.
"""

from __future__ import annotations

import re
import subprocess
import sys

import oauthenticator.tests.test_generic as upstream
import pytest
from labfleet_hub.authenticator import IAMAuthenticator
from oauthenticator.generic import GenericOAuthenticator
from oauthenticator.tests.conftest import client  # noqa: F401  (upstream's fixture)
from oauthenticator.tests.test_generic import *  # noqa: F403  (upstream's tests and fixtures)
from traitlets import default


class UnderTest(IAMAuthenticator):
    """IAMAuthenticator as upstream's tests see it.

    Named like the class it replaces: upstream's expected messages name the class
    (``GenericOAuthenticator.admin_groups requires GenericOAuthenticator.manage_groups``).
    """

    async def get_authenticated_user(self, handler, data):
        # JupyterHub 6.1 adds ``user_info: None`` to every auth model; OAuthenticator
        # 17.4's tests predate it and compare the model's keys exactly
        model = await super().get_authenticated_user(handler, data)
        if model is not None and model.get("user_info", ...) is None:
            model.pop("user_info")
        return model


UnderTest.__name__ = UnderTest.__qualname__ = "GenericOAuthenticator"

#: Upstream tests that assume a stock default which labfleet deliberately changes
#: (docs/identity.md, "Differences from GenericOAuthenticator"): they run with
#: exactly those defaults put back, everything else ours. (test, variant ids) -> traits.
DELIBERATE = {
    # ``groups`` is in every auth model: manage_groups is on
    ("test_generic", ("-01-", "-02-", "-04-")): ("manage_groups",),
    # admin_groups/allowed_groups/auth_state_groups_key need no explicit manage_groups
    ("test_generic_manage_groups_required", ()): ("manage_groups",),
    # the hub name is preferred_username (IAM's login name), not ``username``
    ("test_generic_data", ()): ("username_claim",),
    ("test_modify_auth_state_hook", ()): ("username_claim",),
    ("test_allowed_scopes", ()): ("username_claim",),
    ("test_generic_claim_groups_key_callable", ()): ("username_claim",),
    ("test_generic_claim_groups_key_nested_strings", ()): ("username_claim",),
    ("test_generic_auth_state_groups_key_callable", ()): ("username_claim",),
    ("test_generic_auth_state_groups_key_nested_strings", ()): ("username_claim",),
    ("test_generic_auth_state_groups_key_invalid", ()): ("username_claim",),
    # and its first step expects refresh_user to do nothing without auth state
    ("test_refresh_user", ()): ("username_claim", "enable_auth_state"),
}

#: labfleet's defaults for those traits (asserted before each such test runs).
OURS = {"manage_groups": True, "username_claim": "preferred_username", "enable_auth_state": True}


def stock_default(trait: str):
    return getattr(GenericOAuthenticator(), trait)


def deliberate_traits(name: str, variant: str = "") -> tuple[str, ...]:
    """The traits put back to stock for upstream test ``name`` (parameter id ``variant``)."""
    for (listed, variants), traits in DELIBERATE.items():
        if name == listed and (not variants or any(v in f"-{variant}-" for v in variants)):
            return traits
    return ()


def with_stock_defaults(traits: tuple[str, ...]) -> type:
    """UnderTest with ``traits`` defaulting as in GenericOAuthenticator (config still wins)."""
    namespace = {}
    for trait in traits:
        value = stock_default(trait)
        namespace[f"_stock_{trait}"] = default(trait)(lambda self, value=value: value)
    return type("GenericOAuthenticator", (UnderTest,), namespace)


@pytest.fixture(autouse=True)
def _substitute_class(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    traits = deliberate_traits(request.node.originalname, callspec.id if callspec else "")
    for trait in traits:
        # the difference is real and is the documented one, or this list is stale
        assert getattr(IAMAuthenticator(), trait) == OURS[trait] != stock_default(trait), trait
    cls = with_stock_defaults(traits) if traits else UnderTest
    monkeypatch.setattr(upstream, "GenericOAuthenticator", cls)


# -- the deliberate differences, with labfleet's own defaults ------------------


def test_the_differences_are_exactly_the_listed_tests():
    """64 upstream tests run here; the listed differences are 22 of them, by name."""
    collected = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    upstream_names = {n for n in dir(upstream) if n.startswith("test_")}
    ours = []
    for line in collected.stdout.splitlines():
        match = re.fullmatch(r"\S+::(test_\w+)(?:\[(.*)\])?", line.strip())
        if match and match[1] in upstream_names:
            ours.append((match[1], match[2] or ""))
    assert len(ours) == 64, collected.stdout + collected.stderr
    different = [test for test in ours if deliberate_traits(*test)]
    assert len(different) == 22, different
    # each listed test name matched something (no stale entries)
    assert {name for name, _ in DELIBERATE} == {name for name, _ in different}


def test_identity_docs_list_every_difference():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "identity.md").read_text()
    section = doc.split("## Differences from GenericOAuthenticator", 1)[1].split("\n## ", 1)[0]
    for trait, value in OURS.items():
        assert f"`{trait}`" in section, trait
        assert str(value).lower() in section.lower(), (trait, value)


async def test_ours_name_from_preferred_username_groups_managed(get_authenticator, generic_client):
    authenticator = get_authenticator(allowed_groups={"group1"})
    assert authenticator.manage_groups and authenticator.enable_auth_state
    handler = generic_client.handler_for_user(
        upstream.user_model("user1", preferred_username="Alice.R")
    )
    model = await authenticator.get_authenticated_user(handler, None)
    # the hub name is IAM's login name (lowercased by JupyterHub), not ``username``
    assert model["name"] == "alice.r"
    assert model["groups"] == ["group1"]
    assert model["auth_state"]["oauth_user"]["username"] == "user1"


async def test_ours_refresh_reads_groups_again_with_auth_state_on(
    get_authenticator, generic_client
):
    authenticator = get_authenticator(allow_all=True)
    userinfo = upstream.user_model("user1", preferred_username="user1", groups=["round1"])
    handler = generic_client.handler_for_user(userinfo)
    model = await authenticator.get_authenticated_user(handler, None)
    userinfo["groups"] = ["round2"]
    refreshed = await authenticator.refresh_user(upstream.MockUser(model), handler)
    # stock GenericOAuthenticator (auth state off) answers True and learns nothing
    assert refreshed["groups"] == ["round2"]


def test_ours_group_settings_need_no_explicit_manage_groups():
    authenticator = IAMAuthenticator(admin_groups={"admins"}, allowed_groups={"users"})
    assert authenticator.admin_groups == {"admins"}
    with pytest.raises(ValueError, match="requires IAMAuthenticator.manage_groups"):
        IAMAuthenticator(manage_groups=False, allowed_groups={"users"})
