"""The spawner-side budget check and the one charged-group rule (CatalogueSpawnerMixin)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from labfleet_accounting import db
from labfleet_accounting.budgets import BudgetChecker
from labfleet_spawner.base import CatalogueSpawnerMixin
from labfleet_spawner.catalogue import load_catalogue
from tornado import web

CATALOGUE = load_catalogue(Path(__file__).resolve().parents[2] / "config" / "catalogue.yaml")


class Spawner(CatalogueSpawnerMixin):
    """Just the mixin: the check runs before any spawner-specific start code."""

    _log_name = "alice"

    def __init__(self, groups, **kw):
        super().__init__(catalogue_data=CATALOGUE, **kw)
        self.user = SimpleNamespace(groups=[SimpleNamespace(name=g) for g in groups])
        self.log = SimpleNamespace(warning=lambda *a: None, error=lambda *a: None)


@pytest.fixture
def checker(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    db.upgrade(engine)
    return BudgetChecker(engine)


def test_charged_group_skips_umbrella_groups_and_follows_the_granting_group():
    s = Spawner(["users", "ml", "cms"])
    s.apply_selection({"profile": "gpu-a100"})
    assert s.charged_group() == "ml"  # the A100 is granted to ml (and admins)
    s.apply_selection({"profile": "cpu"})
    assert s.charged_group() == "cms"  # users is an umbrella group
    s = Spawner(["users"])
    s.apply_selection({"profile": "cpu"})
    assert s.charged_group() == "users"


def test_exhausted_budget_refuses_gpu_but_not_cpu(checker):
    checker.set_budget("ml", gpu_hours=0.0)
    s = Spawner(["users", "ml"], budget_checker=checker)
    with pytest.raises(web.HTTPError) as info:
        s.apply_selection({"profile": "gpu-a100"})
    assert info.value.status_code == 403
    assert "GPU-hours" in info.value.log_message and "'ml'" in info.value.log_message
    assert s.apply_selection({"profile": "cpu"}).profile.name == "cpu"


def test_budget_from_database_url(tmp_path, checker):
    checker.set_budget("ml", gpu_hours=100.0)
    url = str(checker.engine.url)
    s = Spawner(["users", "ml"], budget_db_url=url)
    assert s.apply_selection({"profile": "gpu-a100"}).accelerator.name == "a100"
    assert s.budget_message == ""


def test_configurer_points_the_spawner_at_the_ledger(tmp_path):
    import yaml
    from labfleet_hub.configurer import apply_config, parse_values
    from traitlets.config import Config

    root = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((root / "config" / "labfleet.yaml").read_text())
    values = parse_values(data, "labfleet.yaml", tmp_path)
    values = {**values, "secrets": {"client_secret": "s" * 64, "crypt_key": "k" * 64}}
    c = Config()
    apply_config(values, c)
    assert c.LocalGPUSpawner.budget_db_url == values["accounting"]["db_url"]
    assert c.LocalGPUSpawner.budget_db_url.startswith("sqlite:///")


def test_unreadable_ledger_allows_the_spawn(tmp_path):
    s = Spawner(["users", "ml"], budget_db_url=f"sqlite:///{tmp_path / 'no-tables.db'}")
    assert s.apply_selection({"profile": "gpu-a100"}).profile.name == "gpu-a100"
