"""Group quotas on a single node, the pure half: the one group-admin rule, the local
limits as quota entries, the validation shared with Kubernetes mode, the live store."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from labfleet_accounting.authz import Identity, may_manage_group, may_set_caps
from labfleet_accounting.local_quotas import changes_body
from labfleet_accounting.quota_page import describe_change, render_quota_page
from labfleet_accounting.quotas import Cap, Change, OverCap, QuotaError, check_caps, parse_changes
from labfleet_batch.authz import Caller, Policy
from labfleet_batch.local_limits import (
    LimitsStore,
    LimitsStoreError,
    check_changes,
    differences,
    limit_entries,
    overlay,
    quota_data,
    quota_from_entries,
    usage_entries,
)
from labfleet_batch.queues import parse_queue_config
from labfleet_hub.groupadmin import administered_groups, may_change_caps, may_change_quotas
from labfleet_hub.service_page import HubNav
from labfleet_spawner.catalogue import load_catalogue

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(ROOT / "config" / "catalogue.yaml")
A100 = ("labfleet-a100", "nvidia.com/gpu")


@pytest.fixture
def config():
    return parse_queue_config(
        {"groups": {
            "ml": {"cpu": 8, "memory": "32Gi", "accelerators": {"t4": 1, "a100": 1},
                   "max_running": 4},
            "cms": {"cpu": 4, "memory": "16Gi"},
        }},
        CATALOGUE,
    )  # fmt: skip


# -- who may change what: one rule ----------------------------------------------------


def test_one_group_admin_rule_for_both_services():
    assert administered_groups("bob", {"users", "ml-admins"}) == {"ml"}
    assert administered_groups("carol", {"ml"}, configured={"ml": ["carol"]}) == {"ml"}
    assert administered_groups("eve", {"ml", "admins"}) == frozenset()  # "-admins" alone: no
    assert administered_groups("x", {"adm-ml"}, pattern="adm-{group}") == {"ml"}
    assert may_change_quotas(False, {"ml"}, "ml") and not may_change_quotas(False, {"ml"}, "cms")
    assert may_change_quotas(True, (), "cms")
    assert may_change_caps(True) and not may_change_caps(False)
    # the accounting service's identity and the batch service's policy use it
    model = {"name": "bob", "admin": False, "groups": ["ml", "ml-admins"]}
    identity = Identity.from_model(model)
    assert may_manage_group(identity, "ml") and not may_manage_group(identity, "cms")
    assert not may_set_caps(identity) and may_set_caps(Identity("root", admin=True))
    assert Policy().is_group_admin(Caller.from_hub_model(model), "ml")
    # the batch service adds membership: an admin of ml who left ml does not see its jobs
    outside = {"name": "bob", "groups": ["ml-admins"]}
    assert Identity.from_model(outside).administers == {"ml"}
    assert not Policy().is_group_admin(Caller.from_hub_model(outside), "ml")
    configured = Policy(configured_admins={"ml": ["carol"]})
    assert configured.is_group_admin(Caller("carol", frozenset({"ml"})), "ml")
    assert not configured.is_group_admin(Caller("dave", frozenset({"ml"})), "ml")


# -- local limits as quota entries -------------------------------------------------------


def test_local_limits_are_entries_named_as_the_kueue_layout(config):
    entries = limit_entries(config, CATALOGUE, config.groups["ml"])
    keys = [(e["flavor"], e["resource"], e["nominalQuota"]) for e in entries]
    assert keys == [
        ("labfleet-default", "cpu", "8"),
        ("labfleet-default", "memory", "32Gi"),
        ("labfleet-default", "jobs", "4"),
        ("labfleet-a100", "nvidia.com/gpu", "1"),
        ("labfleet-t4", "nvidia.com/gpu", "1"),
    ]
    used = {"cpu": 4, "memory": 2**30, "acc:a100": 1, "jobs": 1}
    uses = {(u["flavor"], u["resource"]): u for u in
            usage_entries(config, CATALOGUE, config.groups["ml"], used)}  # fmt: skip
    assert uses[A100] == {"flavor": A100[0], "resource": A100[1], "used": "1", "over": False}
    assert uses[("labfleet-default", "memory")]["used"] == "1Gi"  # as the YAML writes it
    lowered = quota_from_entries(config.groups["ml"], check_changes(entries, [Change(*A100, "0")]))
    assert lowered.accelerators == {"t4": 1, "a100": 0} and lowered.cpu == 8
    over = {(u["flavor"], u["resource"]): u["over"] for u in
            usage_entries(config, CATALOGUE, lowered, used)}  # fmt: skip
    assert over[A100] is True and over[("labfleet-default", "cpu")] is False
    # no limit on running jobs (0) is never "over"
    cms = config.groups["cms"]
    assert not any(u["over"] for u in usage_entries(config, CATALOGUE, cms, {"jobs": 9}))


def test_changes_are_applied_and_every_refusal_names_the_field(config):
    entries = limit_entries(config, CATALOGUE, config.groups["ml"])
    after = check_changes(
        entries,
        [Change("labfleet-default", "cpu", "2500m"), Change("labfleet-default", "memory", "8Gi"),
         Change("labfleet-default", "jobs", "2"), Change(*A100, "3")],
    )  # fmt: skip
    quota = quota_from_entries(config.groups["ml"], after)
    assert (quota.cpu, quota.memory, quota.max_running) == (2.5, "8Gi", 2)
    assert quota.accelerators == {"t4": 1, "a100": 3}
    assert config.groups["ml"].accelerators["a100"] == 1  # the YAML's is untouched
    refusals = [
        ([Change("labfleet-h100", "nvidia.com/gpu", "1")], r"quotas\[0\]\.flavor: .*h100"),
        ([Change(*A100, "1"), Change(*A100, None, "1")], r"quotas\[1\]\.borrowingLimit"),
        ([Change(*A100, "1500m")], r"quotas\[0\]\.nominalQuota: 1500m is not a whole"),
        ([Change("labfleet-default", "jobs", "0.5")], r"quotas\[0\]\.nominalQuota"),
    ]
    for changes, message in refusals:
        with pytest.raises(QuotaError, match=message):
            check_changes(entries, changes)
    # negative and malformed values: refused while parsing, naming the field
    for value in ("-1", "lots", -2):
        body = {"quotas": [{"flavor": A100[0], "resource": A100[1], "nominalQuota": value}]}
        with pytest.raises(QuotaError, match=r"quotas\[0\]\.nominalQuota: "):
            parse_changes(body)


def test_the_cap_is_the_same_400_in_both_modes():
    caps = {
        A100: Cap(*A100, "2"),
        ("labfleet-default", "jobs"): Cap("labfleet-default", "jobs", "4"),
    }
    check_caps("ml", [Change(*A100, "2")], caps)
    with pytest.raises(OverCap, match=r"quotas\[1\]\.nominalQuota: 3 of nvidia.com/gpu") as e:
        check_caps("ml", [Change(*A100, "1"), Change(*A100, "3")], caps)
    assert isinstance(e.value, QuotaError)  # the handlers answer every QuotaError with 400
    with pytest.raises(OverCap, match=r"quotas\[0\]\.flavor: group 'ml' has no cap for cpu"):
        check_caps("ml", [Change("labfleet-default", "cpu", "1")], caps)
    # 0 running jobs means no limit: above any cap
    with pytest.raises(OverCap, match="0 jobs means no limit"):
        check_caps("ml", [Change("labfleet-default", "jobs", "0")], caps)
    assert changes_body([Change(*A100, "1")]) == {
        "quotas": [{"flavor": A100[0], "resource": A100[1], "nominalQuota": "1"}]
    }


# -- live values: overlay, differences, the store -----------------------------------------


def test_live_values_win_over_the_yaml_and_check_config_reports_them(config):
    live = {
        "ml": {
            "cpu": 8,
            "memory": "16Gi",
            "accelerators": {"a100": 2, "h100": 5},
            "max_running": 4,
        },
        "gone": {"cpu": 1},
    }
    current = overlay(config, live)
    ml = current.groups["ml"]
    assert ml.memory == "16Gi" and ml.accelerators == {"t4": 1, "a100": 2}  # no h100: not in YAML
    assert "gone" not in current.groups and config.groups["ml"].memory == "32Gi"
    assert differences(config, live) == [
        "batch.queues.groups.ml.memory: 32Gi in the YAML, 16Gi live",
        "batch.queues.groups.ml.accelerators.a100: 1 in the YAML, 2 live",
    ]
    assert differences(config, {"ml": quota_data(config.groups["ml"])}) == []


def test_store_is_private_atomic_and_refuses_what_it_cannot_read(tmp_path):
    store = LimitsStore(tmp_path / "batch")
    assert store.load() == {}
    store.save({"ml": {"cpu": 2}})
    assert store.load() == {"ml": {"cpu": 2}}
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.folder).st_mode) == 0o700
    assert [p.name for p in store.folder.iterdir()] == ["group-limits.json"]  # no temporary left
    store.path.write_text("{not json")
    with pytest.raises(LimitsStoreError, match="group-limits.json is not JSON"):
        store.load()
    store.path.write_text(json.dumps({"version": 2, "groups": {}}))
    with pytest.raises(LimitsStoreError, match="not a version 1"):
        store.load()
    store.path.unlink()
    os.symlink(tmp_path / "elsewhere", store.path)  # never followed
    with pytest.raises(LimitsStoreError, match="cannot read"):
        store.load()


# -- the page --------------------------------------------------------------------------------


def test_audit_lines_say_before_and_after():
    before = [{"flavor": "f", "resource": "r", "nominalQuota": "1"},
              {"flavor": "f", "resource": "s", "nominalQuota": "2"}]  # fmt: skip
    after = [dict(before[0], nominalQuota="0"), before[1]]
    assert describe_change(before, after) == "f/r: 1 → 0"
    assert describe_change({}, {"f/r": {"max_nominal": "2"}}) == "f/r: (none) → max_nominal 2"
    assert describe_change(before, before) == "no change"


def test_page_is_read_only_for_members_and_escapes_everything():
    state = {
        "group": "ml<b>", "where": "the local batch queue (single node)",
        "quotas": [{"flavor": "labfleet-a100", "resource": "nvidia.com/gpu", "nominalQuota": "0",
                    "cap": {"max_nominal": "2", "max_borrowing": "0"}, "in_use": "1",
                    "over": True, "configured": "1"}],
    }  # fmt: skip
    audit = [{"at": 0, "actor": "<script>x</script>", "action": "quota.set",
              "before": [], "after": []}]  # fmt: skip
    nav, user = HubNav(), {"name": "alice", "admin": False}
    read_only = render_quota_page(nav, user, state, audit, editable=False, local=True, xsrf="t")
    assert (
        'aria-label="limit of labfleet-a100/nvidia.com/gpu" name="nominal-0" value="0" disabled'
        in read_only
    )
    assert "<button" not in read_only.split('id="quotas"')[1].split("</form>")[0]
    assert "Read only" in read_only and 'id="over-limit"' in read_only
    assert "<script>x</script>" not in read_only and "ml&lt;b&gt;" in read_only
    editable = render_quota_page(nav, user, state, audit, editable=True, local=True, xsrf="t")
    assert 'value="0">' in editable and 'type="submit"' in editable
    assert "they are not stopped" in editable


def test_check_config_reports_live_limits_that_differ_from_the_yaml(tmp_path):
    import shutil
    import subprocess
    import sys

    import yaml

    for name in ("labfleet.yaml", "catalogue.yaml", "accounts.yaml"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    path = tmp_path / "labfleet.yaml"
    data = yaml.safe_load(path.read_text())
    data["hub"]["state_dir"] = "state"
    data["spawner"]["storage_root"] = "storage"
    path.write_text(yaml.safe_dump(data))

    def check():
        return subprocess.run(
            [sys.executable, "-m", "labfleet_hub.cli", "check-config", "--config", str(path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    result = check()
    assert result.returncode == 0 and "live group limits" not in result.stdout
    store = LimitsStore(tmp_path / "state" / "batch")
    store.save({"ml": {"cpu": 8, "memory": "32Gi", "accelerators": {"t4": 1, "a100": 0},
                       "max_running": 4}})  # fmt: skip
    result = check()
    assert result.returncode == 0, result.stderr
    assert "live group limits differ from the YAML" in result.stdout
    assert str(store.path) in result.stdout
    assert "batch.queues.groups.ml.accelerators.a100: 1 in the YAML, 0 live" in result.stdout
    store.path.write_text("garbage")
    result = check()
    assert result.returncode == 1 and "is not JSON" in result.stderr


def test_usage_page_links_the_quota_pages_a_group_admin_manages():
    from labfleet_accounting.usage_page import quota_links

    assert quota_links([]) == ""
    links = quota_links(["ml", "a&b"], "/services/accounting/")
    assert 'href="/services/accounting/quotas?group=ml">ml</a>' in links
    assert 'href="/services/accounting/quotas?group=a%26b">a&amp;b</a>' in links


def test_the_batch_policy_follows_the_platform_pattern():
    policy = Policy(admin_group_pattern="adm-{group}")
    assert policy.is_group_admin(Caller("x", frozenset({"ml", "adm-ml"})), "ml")
    assert not policy.is_group_admin(Caller("x", frozenset({"ml", "ml-admins"})), "ml")
    assert Identity.from_model(
        {"name": "x", "groups": ["ml", "adm-ml"]}, "adm-{group}"
    ).administers == {"ml"}
    # no suffix and no pattern: only the configured lists
    assert not Policy(admin_group_suffix="").is_group_admin(Caller("x", frozenset({"ml"})), "ml")


def test_the_file_keeps_only_what_was_set_so_yaml_edits_still_apply(config):
    import dataclasses

    from labfleet_batch.local_limits import live_file

    ml = quota_from_entries(
        config.groups["ml"],
        check_changes(limit_entries(config, CATALOGUE, config.groups["ml"]), [Change(*A100, "2")]),
    )
    current = dataclasses.replace(config, groups={**config.groups, "ml": ml})
    live = live_file(config, current)
    assert live == {"ml": {"accelerators": {"a100": 2}}}  # cms never changed: not there
    # the administrator edits the YAML afterwards: what nobody set follows it
    edited = parse_queue_config(
        {"groups": {"ml": {"cpu": 16, "memory": "64Gi", "accelerators": {"t4": 1, "a100": 1},
                           "max_running": 4},
                    "cms": {"cpu": 6, "memory": "16Gi"}}},
        CATALOGUE,
    )  # fmt: skip
    after_restart = overlay(edited, live)
    assert after_restart.groups["ml"].cpu == 16 and after_restart.groups["ml"].memory == "64Gi"
    assert after_restart.groups["ml"].accelerators == {"t4": 1, "a100": 2}
    assert after_restart.groups["cms"].cpu == 6
    # set back to the YAML's value: nothing left to keep
    assert live_file(config, config) == {}
