"""Storage layout: pure planning, directory creation, modes, ownership."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
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
        chown=lambda *a: calls.append(a),  # never called without root
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
        chown=lambda fd, uid, gid: calls.__setitem__(
            Path(os.readlink(f"/proc/self/fd/{fd}")).name, (uid, gid)
        ),
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


# -- a user attacking the storage as root prepares it ------------------------------
# (attacks as the user's uid would make them: only what that uid can write)

ALICE = 200001


def snapshot(path: Path):
    st = path.lstat()
    files = sorted(os.listdir(path)) if path.is_dir() else None
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), files


def root_target(tmp_path) -> Path:
    """An /etc-like folder of root's, 0755, with a file in it."""
    etc = tmp_path / "etc"
    etc.mkdir()
    os.chmod(etc, 0o755)
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    return etc


@pytest.mark.skipif(not is_root, reason="attacks by another uid need root")
def test_users_cannot_replace_their_home_or_group_folders(tmp_path):
    """Home and group folders sit in folders of the platform (0755, root's)."""
    reachable = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is root's 0700
    os.chmod(reachable, 0o755)
    try:
        _users_cannot_replace(reachable)
    finally:
        shutil.rmtree(reachable)


def _users_cannot_replace(base: Path):
    layout = prepare_storage(base / "srv", "alice", ALICE, ALICE, {"ml": 300002})
    for parent in (layout.home.parent, layout.root / "groups"):
        st = parent.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    pid = os.fork()
    if pid == 0:  # the user, trying to swap their home and group folder for links
        code = 2  # anything unexpected fails the test
        try:
            os.setgroups([300002])
            os.setgid(ALICE)
            os.setuid(ALICE)
            moved = False
            for path in (layout.home, layout.group_dirs["ml"]):
                os.listdir(path)  # reachable: a refusal below is the parent's doing
                try:
                    os.rename(path, path.with_name("moved"))
                    moved = True
                except PermissionError:
                    pass
            code = 1 if moved else 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0, "a user could move their home or group folder"


@pytest.mark.skipif(not is_root, reason="chown to other uids needs root")
@pytest.mark.parametrize("which", ["home", "group", "public", "envs", "groups"])
def test_a_folder_replaced_by_a_link_to_roots_folder_is_refused_untouched(tmp_path, which):
    """Whoever could plant a link (an earlier layout, a careless admin): nothing follows it."""
    etc = root_target(tmp_path)
    before = snapshot(etc)
    layout = prepare_storage(tmp_path / "srv", "alice", ALICE, ALICE, {"ml": 300002})
    path = {
        "home": layout.home,
        "group": layout.group_dirs["ml"],
        "public": layout.public,
        "envs": layout.envs,
        "groups": layout.root / "groups",
    }[which]
    os.rmdir(path) if which != "groups" else (os.rmdir(path / "ml"), os.rmdir(path))
    path.symlink_to(etc)
    with pytest.raises(StorageError, match="symbolic link; refusing"):
        prepare_storage(tmp_path / "srv", "alice", ALICE, ALICE, {"ml": 300002})
    assert snapshot(etc) == before, "the link's target keeps its owner, mode and contents"
    assert (etc / "passwd").read_text().startswith("root:")


@pytest.mark.skipif(not is_root, reason="chown to other uids needs root")
def test_links_inside_home_and_group_folders_are_not_followed(tmp_path):
    """What members write inside (links named like anything) is never chowned or chmodded."""
    etc = root_target(tmp_path)
    before = snapshot(etc)
    layout = prepare_storage(tmp_path / "srv", "alice", ALICE, ALICE, {"ml": 300002})
    (layout.group_dirs["ml"] / "ml").symlink_to(etc)
    (layout.home / "alice").symlink_to(etc)
    (layout.public / "envs").symlink_to(etc)
    prepare_storage(tmp_path / "srv", "alice", ALICE, ALICE, {"ml": 300002})
    assert snapshot(etc) == before
    home = layout.home.stat()
    assert (home.st_uid, home.st_gid, mode(layout.home)) == (ALICE, ALICE, 0o700)
