"""Storage layout: pure planning, directory creation, modes, ownership."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from labfleet_spawner.storage import (
    StorageError,
    apply_storage,
    check_id_ranges,
    mapped_gid,
    mapped_uid,
    plan_storage,
    prepare_storage,
)

is_root = os.geteuid() == 0


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_plan_is_pure_and_complete(tmp_path):
    root = tmp_path / "srv"
    layout = plan_storage(root, "alice@example.org", 200001, 200001, {"ml": 300002, "fpga": 300003})
    assert not root.exists(), "planning touches nothing"
    assert layout.home == root / "home" / "alice@example.org"
    assert layout.group_dirs == {"fpga": root / "groups" / "fpga", "ml": root / "groups" / "ml"}
    assert layout.supplementary_gids == [300002, 300003]
    assert layout.env() == {
        "LABFLEET_HOME": str(root / "home" / "alice@example.org"),
        "LABFLEET_GROUP_DIRS": f"{root}/groups/fpga:{root}/groups/ml",
        "LABFLEET_PUBLIC": str(root / "public"),
        "LABFLEET_ENVS": str(root / "envs"),
    }


def test_no_groups():
    layout = plan_storage("/srv/labfleet", "bob", 200002, 200002)
    assert layout.group_dirs == {} and layout.env()["LABFLEET_GROUP_DIRS"] == ""


@pytest.mark.parametrize(
    "username",
    ["", ".", "..", "../etc", "a/b", ".hidden", "-rf", "a..b", "bad name", "x" * 129, "a\nb", None],
)
def test_unsafe_usernames_are_refused(username):
    with pytest.raises(StorageError, match="cannot be a directory name; allowed: letters"):
        plan_storage("/srv/labfleet", username, 200001, 200001)


@pytest.mark.parametrize("group", ["", "..", "ml/x", "ML", "-ml", "a" * 64, "ai-infn/users"])
def test_unsafe_group_names_are_refused(group):
    with pytest.raises(StorageError, match="group name .* cannot be a directory name"):
        plan_storage("/srv/labfleet", "alice", 200001, 200001, {group: 300001})


def test_relative_root_is_refused():
    with pytest.raises(StorageError, match="absolute path"):
        plan_storage("srv/labfleet", "alice", 200001, 200001)


def test_id_mapping():
    assert mapped_uid(1) == 200001 and mapped_uid(7, base=500000) == 500007
    assert mapped_gid(2) == 300002
    with pytest.raises(StorageError):
        mapped_uid(0)


def test_id_ranges_must_not_overlap():
    check_id_ranges(200000, 300000, 99999, [1, 5000])
    with pytest.raises(StorageError, match="raise gid_base"):
        check_id_ranges(200000, 300000, 100001, [])
    with pytest.raises(StorageError, match="both 200000"):
        check_id_ranges(200000, 200000, 1, [])
    check_id_ranges(300000, 200000, 1, [99999])
    with pytest.raises(StorageError, match="raise uid_base"):
        check_id_ranges(300000, 200000, 1, [100001])


def test_apply_without_root_sets_modes_and_never_chowns(tmp_path):
    calls = []
    layout = prepare_storage(
        tmp_path / "srv",
        "alice",
        200001,
        200001,
        {"ml": 300002},
        as_root=False,
        chown=lambda *a: calls.append(a),
    )
    assert calls == []
    assert mode(layout.home) == 0o700
    assert mode(layout.group_dirs["ml"]) == 0o2770
    assert mode(layout.public) == 0o1777
    assert mode(layout.envs) == 0o755
    assert mode(layout.root / "home") == 0o755 and mode(layout.root / "groups") == 0o755


def test_apply_as_root_chowns_each_directory(tmp_path):
    calls = {}
    layout = plan_storage(tmp_path / "srv", "alice", 200001, 200001, {"ml": 300002})
    apply_storage(
        layout,
        as_root=True,
        owner_uid=0,
        chown=lambda path, uid, gid: calls.__setitem__(Path(path).name, (uid, gid)),
    )
    hub_gid = os.getegid()
    assert calls == {
        "home": (0, hub_gid),
        "groups": (0, hub_gid),
        "alice": (200001, 200001),
        "ml": (0, 300002),
        "public": (0, hub_gid),
        "envs": (0, hub_gid),
    }


@pytest.mark.skipif(not is_root, reason="chown to other uids needs root")
def test_real_ownership_as_root(tmp_path):
    layout = prepare_storage(tmp_path / "srv", "alice", 200001, 200001, {"ml": 300002})
    home, group = layout.home.stat(), layout.group_dirs["ml"].stat()
    assert (home.st_uid, home.st_gid) == (200001, 200001)
    assert (group.st_uid, group.st_gid) == (0, 300002)
    # chown clears setgid; the mode must have been set afterwards.
    assert mode(layout.group_dirs["ml"]) == 0o2770


def test_apply_is_idempotent_and_repairs_modes(tmp_path):
    layout = prepare_storage(tmp_path / "srv", "alice", 1, 1, {"ml": 2}, as_root=False)
    os.chmod(layout.home, 0o755)
    (layout.home / "notebook.ipynb").write_text("{}")
    prepare_storage(tmp_path / "srv", "alice", 1, 1, {"ml": 2}, as_root=False)
    assert mode(layout.home) == 0o700
    assert (layout.home / "notebook.ipynb").read_text() == "{}", "existing work is kept"


def test_symlinked_home_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    os.chmod(elsewhere, 0o755)
    (tmp_path / "srv" / "home").mkdir(parents=True)
    (tmp_path / "srv" / "home" / "alice").symlink_to(elsewhere)
    with pytest.raises(StorageError, match="symbolic link"):
        prepare_storage(tmp_path / "srv", "alice", 1, 1, as_root=False)
    assert mode(elsewhere) == 0o755, "the link target is left alone"


def test_a_file_in_the_way_is_reported(tmp_path):
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "public").write_text("")
    with pytest.raises(StorageError, match="exists and is not a directory"):
        prepare_storage(tmp_path / "srv", "alice", 1, 1, as_root=False)
