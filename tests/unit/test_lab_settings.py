"""The platform's JupyterLab defaults: no Jupyter news question for every new user."""

import json
import logging
import os

import pytest
from jupyterhub.spawner import LocalProcessSpawner
from labfleet_spawner.lab_settings import (
    NOTIFICATION_PLUGIN,
    LabSettingsMixin,
    app_settings_dir,
    environment_prefix,
    lab_overrides,
    main,
    write_overrides,
)
from labfleet_spawner.local import LocalGPUSpawner
from labfleet_spawner.safefs import UnsafePathError, check_private_folder
from traitlets import HasTraits, List, Unicode


def test_overrides_for_each_choice():
    never = {NOTIFICATION_PLUGIN: {"fetchNews": "false", "checkForUpdates": False}}
    assert lab_overrides("never") == never
    assert lab_overrides("always") == {NOTIFICATION_PLUGIN: {"fetchNews": "true"}}
    assert lab_overrides("ask") == {}  # JupyterLab's own default: ask each user
    with pytest.raises(ValueError, match="never, ask, always"):
        lab_overrides("sometimes")


def test_environment_prefix_of_the_single_user_command():
    assert str(environment_prefix("/opt/venv/bin/jupyterhub-singleuser")) == "/opt/venv"
    assert environment_prefix("jupyterhub-singleuser") is None
    assert environment_prefix("/opt/venv/jupyterhub-singleuser") is None
    assert str(app_settings_dir("/opt/venv")) == "/opt/venv/share/jupyter/lab/settings"


def test_write_overrides_is_readable_by_all_idempotent_and_leaves_others(tmp_path):
    other = tmp_path / "overrides.d" / "site.json"
    other.parent.mkdir()
    other.write_text("{}")
    assert write_overrides(tmp_path, lab_overrides("never")) is True
    target = tmp_path / "overrides.d" / "labfleet.json"
    assert json.loads(target.read_text()) == lab_overrides("never")
    assert target.stat().st_mode & 0o777 == 0o644
    assert write_overrides(tmp_path, lab_overrides("never")) is False
    assert write_overrides(tmp_path, lab_overrides("always")) is True
    assert json.loads(target.read_text())[NOTIFICATION_PLUGIN]["fetchNews"] == "true"
    assert write_overrides(tmp_path, {}) is True and not target.exists()
    assert write_overrides(tmp_path, {}) is False
    assert other.read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == ["site.json"]  # no temp files


class FakeSpawner(LabSettingsMixin, HasTraits):
    cmd = List(Unicode())
    log = logging.getLogger("test_lab_settings")


def test_spawner_writes_into_its_command_environment(tmp_path, caplog):
    prefix = tmp_path / "env"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "share" / "jupyter" / "lab").mkdir(parents=True)
    single_user = prefix / "bin" / "jupyterhub-singleuser"
    single_user.write_text("#!/bin/sh\n")
    single_user.chmod(0o755)
    spawner = FakeSpawner(cmd=[str(single_user)])
    spawner.ensure_lab_settings()
    written = prefix / "share/jupyter/lab/settings/overrides.d/labfleet.json"
    assert json.loads(written.read_text()) == lab_overrides("never")
    # an explicit directory wins; no JupyterLab found: a warning, no failure
    spawner = FakeSpawner(cmd=[str(single_user)], jupyter_news="always")
    spawner.lab_app_settings_dir = str(tmp_path / "elsewhere")
    spawner.ensure_lab_settings()
    assert (tmp_path / "elsewhere" / "overrides.d" / "labfleet.json").exists()
    FakeSpawner(cmd=[str(tmp_path / "nowhere" / "bin" / "x")]).ensure_lab_settings()
    assert "JupyterLab settings not written" in caplog.text


def test_local_spawner_writes_before_the_process_starts():
    mro = LocalGPUSpawner.__mro__
    assert mro.index(LabSettingsMixin) < mro.index(LocalProcessSpawner)
    assert LocalGPUSpawner().jupyter_news == "never"


def test_image_build_command(tmp_path, capsys):
    assert main(["never", "--prefix", str(tmp_path)]) == 0
    written = tmp_path / "share/jupyter/lab/settings/overrides.d/labfleet.json"
    assert json.loads(written.read_text()) == lab_overrides("never")
    assert "Jupyter news: never" in capsys.readouterr().out


@pytest.mark.parametrize(
    "how",
    [
        "writable",
        pytest.param(
            "owned", marks=pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
        ),
    ],
)
def test_nothing_is_written_where_a_user_could_change_the_folder(tmp_path, caplog, how):
    """The hub runs as root: a settings folder a user can write is not written into."""
    env = tmp_path / "env"
    settings = env / "share" / "jupyter" / "lab" / "settings"
    settings.mkdir(parents=True)
    if how == "writable":
        env.chmod(0o777)  # no sticky bit: anyone could swap share/ for a link
    else:
        os.chown(env, 200001, 200001)  # a user's folder
    spawner = FakeSpawner(cmd=["jupyterhub-singleuser"])
    spawner.lab_app_settings_dir = str(settings)
    spawner.ensure_lab_settings()
    assert not (settings / "overrides.d").exists()
    assert "Cannot write JupyterLab defaults" in caplog.text
    assert str(env) in caplog.text


def test_sticky_ancestors_like_tmp_are_accepted(tmp_path):
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "env").mkdir(mode=0o755)
    check_private_folder(sticky / "env" / "missing" / "settings")
    with pytest.raises(UnsafePathError, match="writable by other users"):
        check_private_folder(sticky)
