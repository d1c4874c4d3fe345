"""The services' shared hub-auth rule (labfleet_hub.hubauth): one setting, one class."""

from __future__ import annotations

import pytest
from labfleet_accounting.app import AccountingApp
from labfleet_batch.service import BatchService
from labfleet_hub.hubauth import AUTH_CACHE_SECONDS, AuthCacheConfig, FreshHubOAuth, reads
from traitlets.config import Config


@pytest.mark.parametrize(
    "method, cached",
    [("GET", True), ("HEAD", True), ("get", True), ("POST", False), ("PUT", False),
     ("PATCH", False), ("DELETE", False), ("OPTIONS", False)],
)  # fmt: skip
def test_only_reads_may_be_answered_from_the_cache(method, cached):
    assert reads(method) is cached


@pytest.mark.parametrize("app_class", [BatchService, AccountingApp])
def test_both_services_take_the_setting_and_build_the_same_hub_auth(app_class, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "t")
    assert issubclass(app_class, AuthCacheConfig)
    trait = app_class.class_traits()["auth_cache_seconds"]
    assert trait.metadata.get("config") and "revoked" in trait.help
    assert app_class().make_hub_auth().cache_max_age == AUTH_CACHE_SECONDS == 5
    config = Config()
    setattr(config, app_class.__name__, Config(auth_cache_seconds=2))
    hub_auth = app_class(config=config).make_hub_auth()
    assert isinstance(hub_auth, FreshHubOAuth) and hub_auth.cache_max_age == 2
