"""Platform YAML -> JupyterHub config: validation names file and field; apply only sets."""

from pathlib import Path

import pytest
import yaml
from labfleet_hub.configurer import (
    ConfigError,
    apply_config,
    devidp_withheld_groups,
    ensure_secrets,
    load_values,
    parse_values,
    with_secrets,
)
from traitlets.config import Config

ROOT = Path(__file__).resolve().parents[2]


def edit(path, change):
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def test_bundled_config_is_valid_and_paths_resolved(config_dir):
    values = load_values(config_dir / "labfleet.yaml")
    assert values["catalogue"] == str(config_dir / "catalogue.yaml")
    assert values["hub"]["state_dir"] == str((config_dir / ".." / ".labfleet").resolve())
    assert values["hub"]["db_url"].startswith("sqlite:///")
    assert values["iam"]["group_prefix"] == "ai-infn/"


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["hub"].update(port=70000), "labfleet.yaml: field hub.port:"),
        (lambda d: d["iam"].update(issuer="ftp://x"), "field iam.issuer:"),
        (lambda d: d["iam"].update(allowed_groups=["Bad Group"]), "field iam.allowed_groups.0:"),
        (lambda d: d["iam"].update(groups_claims=["roles"]), "field iam.groups_claims.0:"),
        (lambda d: d["spawner"].update(kind="docker"), "field spawner.kind:"),
        (
            lambda d: d["spawner"].update(unavailable_profiles="grey"),
            "field spawner.unavailable_profiles:",
        ),
        (lambda d: d["spawner"].update(jupyter_news="yes"), "field spawner.jupyter_news:"),
        (lambda d: d.update(colour="red"), "field (top level): Additional properties"),
        (lambda d: d.pop("iam"), "'iam' is a required property"),
    ],
)
def test_invalid_config_names_file_and_field(config_dir, change, expected):
    edit(config_dir / "labfleet.yaml", change)
    with pytest.raises(ConfigError) as info:
        load_values(config_dir / "labfleet.yaml")
    assert expected in str(info.value)


def test_invalid_catalogue_stops_config_loading(config_dir):
    edit(config_dir / "catalogue.yaml", lambda d: d["sizes"][0].update(cpu="many"))
    with pytest.raises(ConfigError, match=r"catalogue.yaml: sizes\[0\] 'small': field cpu:"):
        load_values(config_dir / "labfleet.yaml")


def test_missing_accounts_file(config_dir):
    (config_dir / "accounts.yaml").unlink()
    with pytest.raises(ConfigError, match="field devidp.accounts: no such file"):
        load_values(config_dir / "labfleet.yaml")


def test_secrets_created_once_private(config_dir):
    values = load_values(config_dir / "labfleet.yaml")
    values["hub"]["state_dir"] = str(config_dir / "state")
    with pytest.raises(ConfigError, match="secret client_secret not readable"):
        with_secrets(values)
    ensure_secrets(values)
    first = with_secrets(values)["secrets"]
    ensure_secrets(values)
    assert with_secrets(values)["secrets"] == first
    secret_file = config_dir / "state" / "secrets" / "iam-client-secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert len(first["client_secret"]) == 64


def test_apply_config_sets_hub_traits(config_dir):
    values = parse_values(
        yaml.safe_load((config_dir / "labfleet.yaml").read_text()), "x.yaml", config_dir
    )
    values = {**values, "secrets": {"client_secret": "s" * 64, "crypt_key": "k" * 64}}
    before = repr(values)
    c = Config()
    apply_config(values, c)
    assert repr(values) == before  # only sets, never mutates its input
    assert c.JupyterHub.authenticator_class == "iam"
    assert c.JupyterHub.spawner_class == "labfleet-local"
    assert c.IAMAuthenticator.issuer == "http://127.0.0.1:8900/"
    assert c.IAMAuthenticator.allowed_groups == {"users"}
    assert c.IAMAuthenticator.admin_groups == {"admins"}
    assert c.IAMAuthenticator.refusal_contact == "labfleet-admins@example.org"
    assert c.IAMAuthenticator.oauth_callback_url == "http://127.0.0.1:8000/hub/oauth_callback"
    assert c.LocalGPUSpawner.catalogue_path == str(config_dir / "catalogue.yaml")
    assert "custom:labfleet:iam-token!user" in c.Spawner.server_token_scopes
    assert c.CryptKeeper["keys"] == [b"k" * 64]


def test_spawn_form_settings_reach_both_spawners(config_dir):
    data = yaml.safe_load((config_dir / "labfleet.yaml").read_text())
    secrets = {"client_secret": "s" * 64, "crypt_key": "k" * 64}
    c = Config()
    apply_config({**parse_values(data, "x.yaml", config_dir), "secrets": secrets}, c)
    assert c.LocalGPUSpawner.unavailable_profiles == "collapse"
    assert c.LocalGPUSpawner.jupyter_news == "never"
    data["spawner"].update(kind="kubernetes", unavailable_profiles="hide")
    c = Config()
    apply_config({**parse_values(data, "x.yaml", config_dir), "secrets": secrets}, c)
    assert c.PlatformKubeSpawner.unavailable_profiles == "hide"


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d["hub"].update(ip="0.0.0.0"), "field hub.ip: '0.0.0.0'"),
        (lambda d: d["hub"].update(ip="192.0.2.10"), "field hub.ip: '192.0.2.10'"),
        (lambda d: d["hub"].update(ip="::"), "field hub.ip: '::'"),
        (lambda d: d["hub"].update(public_url="http://hub.example.org"), "field hub.public_url"),
        (lambda d: d["iam"].update(issuer="https://iam.example.org/"), "field iam.issuer"),
        # the loopback, but not the development IdP's own port or scheme
        (lambda d: d["iam"].update(issuer="http://127.0.0.1:9999/"), "field iam.issuer"),
        (lambda d: d["iam"].update(issuer="https://127.0.0.1:8900/"), "field iam.issuer"),
        (lambda d: d["iam"].update(issuer="http://127.0.0.1:8900/realm"), "field iam.issuer"),
    ],
)
def test_devidp_only_with_a_loopback_hub_and_its_own_issuer(config_dir, change, field):
    edit(config_dir / "labfleet.yaml", change)
    with pytest.raises(ConfigError) as info:
        load_values(config_dir / "labfleet.yaml")
    assert field in str(info.value) and "devidp.enabled" in str(info.value)
    # the same configuration with the development IdP off is valid
    edit(config_dir / "labfleet.yaml", lambda d: d["devidp"].update(enabled=False))
    load_values(config_dir / "labfleet.yaml")


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_devidp_with_loopback_hub_addresses(config_dir, ip):
    edit(config_dir / "labfleet.yaml", lambda d: d["hub"].update(ip=ip))
    load_values(config_dir / "labfleet.yaml")


def test_no_demo_admin_unless_asked(config_dir):
    values = load_values(config_dir / "labfleet.yaml")
    assert devidp_withheld_groups(values) == ["ai-infn/admins"]
    edit(config_dir / "labfleet.yaml", lambda d: d["devidp"].update(demo_admin=True))
    assert devidp_withheld_groups(load_values(config_dir / "labfleet.yaml")) == []
