"""Names for the mapped uids (nss_wrapper) and terminals with the notebook's PATH."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from labfleet_spawner import accounts, terminal

SYSTEM_PASSWD = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n"
SYSTEM_GROUP = "root:x:0:\nusers:x:100:\n"


def account(name="bob", uid=200007, groups=None):
    return accounts.Account(name, uid, uid, f"/srv/home/{name}", groups or {"ml": 300002})


def test_render_passwd_adds_platform_users_after_the_machines_own():
    text = accounts.render_passwd(SYSTEM_PASSWD, [account("bob", 200007)])
    lines = text.splitlines()
    assert lines[:2] == SYSTEM_PASSWD.splitlines()
    assert lines[2] == "bob:x:200007:200007:bob (labfleet):/srv/home/bob:/bin/bash"


def test_render_never_shadows_a_system_name_or_id():
    text = accounts.render_passwd(
        SYSTEM_PASSWD, [account("root", 200001), account("eve", 0), account("alice", 200002)]
    )
    assert text == SYSTEM_PASSWD  # root's name, uid 0 and a local alice all stay the machine's


def test_render_group_has_private_groups_and_hub_groups_with_members():
    text = accounts.render_group(
        SYSTEM_GROUP,
        [account("bob", 200007, {"ml": 300002}), account("carol", 200008, {"ml": 300002})],
    )
    assert text.splitlines()[2:] == [
        "bob:x:200007:",
        "carol:x:200008:",
        "ml:x:300002:bob,carol",
    ]


def test_registry_files_are_readable_names_replaced_atomically(tmp_path):
    (tmp_path / "passwd").write_text(SYSTEM_PASSWD)
    (tmp_path / "group").write_text(SYSTEM_GROUP)
    reg = accounts.AccountsRegistry(tmp_path / "accounts", tmp_path / "passwd", tmp_path / "group")
    assert reg.register(account("bob", 200007)) is True
    assert reg.register(account("bob", 200007)) is False  # nothing changed, nothing written
    assert reg.register(account("carol", 200008)) is True
    # the hub user renamed (same hub id, same uid): the old name goes
    assert reg.register(account("robert", 200007)) is True
    passwd = (tmp_path / "accounts" / "passwd").read_text()
    assert "robert:x:200007" in passwd and "bob:" not in passwd and "carol:x:200008" in passwd
    folder = tmp_path / "accounts"
    assert stat.S_IMODE((folder / "passwd").stat().st_mode) == 0o644
    assert stat.S_IMODE((folder / "group").stat().st_mode) == 0o644
    assert stat.S_IMODE((folder / "accounts.json").stat().st_mode) == 0o600
    assert not [p for p in folder.iterdir() if p.name.startswith(".passwd")]


def test_nss_wrapper_gives_a_mapped_uid_its_name(tmp_path):
    """The real library, a real unprivileged process: what a terminal's prompt asks."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process under a mapped uid")
    library = accounts.find_nss_wrapper()
    assert library, "libnss-wrapper is not installed (tools/bootstrap.sh installs it as root)"
    # pytest's tmp folders are 0700: the unprivileged process could not read the files
    tmp_path = Path(tempfile.mkdtemp(prefix="labfleet-accounts-"))
    tmp_path.chmod(0o755)
    folder = tmp_path / "accounts"
    reg = accounts.AccountsRegistry(folder)
    reg.register(accounts.Account("labfleet-test-bob", 299991, 299991, "/", {"ml": 399992}))
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 299991, 399992)

    def as_user():
        os.setgroups([399992])
        os.setgid(299991)
        os.setuid(299991)

    try:
        out = _run_as_user(as_user, folder, library, home)
    finally:
        shutil.rmtree(tmp_path)
    assert out == ["labfleet-test-bob", "labfleet-test-bob", "labfleet-test-bob ml",
                   "labfleet-test-bob ml"]  # fmt: skip


def _run_as_user(as_user, folder, library, home):
    return subprocess.run(
        ["sh", "-c", f'whoami; id -gn; id -Gn; stat -c "%U %G" {home}'],
        env={"PATH": "/usr/bin:/bin", **accounts.nss_env(folder, library)},
        preexec_fn=as_user,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()


def test_terminal_keeps_the_notebooks_path_and_reads_the_users_profile(tmp_path):
    nb_bin = tmp_path / "notebook-env" / "bin"
    nb_bin.mkdir(parents=True)
    tool = nb_bin / "labfleet-batch-standin"
    tool.write_text("#!/bin/sh\necho found\n")
    tool.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".profile").write_text('export FROM_PROFILE=yes\nPATH="$HOME/mine:$PATH"\n')
    command = terminal.shell_command()
    assert command and command[1:] == ["--init-file", str(terminal.PROFILE), "-i"]
    out = subprocess.run(
        [*command, "-c", 'labfleet-batch-standin; echo "$FROM_PROFILE"; echo "$PATH"'],
        env={"PATH": f"{nb_bin}:/usr/bin:/bin", "HOME": str(home), "TERM": "dumb"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0] == "found" and out[1] == "yes"
    path = out[2].split(":")
    # the user's profile first, then the notebook's environment, then the system's
    assert path[0] == f"{home}/mine" and path[1] == str(nb_bin)
    assert "/usr/bin" in path[2:]
    assert terminal.server_arg(command).startswith("--ServerApp.terminado_settings=shell_command=[")


def test_spawner_passes_names_and_terminal_to_isolated_notebooks(tmp_path):
    from tests.unit.test_local_spawner import make_spawner

    spawner = make_spawner(
        tmp_path, accounts_dir=str(tmp_path / "acc"), nss_wrapper_library="/lib/nss.so"
    )
    spawner.isolated = True
    env = spawner.get_env()
    assert env["LD_PRELOAD"] == "/lib/nss.so"
    assert env["NSS_WRAPPER_PASSWD"] == str(tmp_path / "acc" / "passwd")  # not filtered as secret
    assert any("terminado_settings" in a for a in spawner.get_args())
    spawner.isolated = False  # the hub's own user: the machine knows its name
    assert "LD_PRELOAD" not in spawner.get_env()
