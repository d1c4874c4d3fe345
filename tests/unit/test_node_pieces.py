"""`labfleet setup` installs the Node.js pieces before anything needs them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from labfleet_hub import cli, node_pieces


def fake_npm(tmp_path: Path, exit_code: int = 0) -> str:
    """An npm that 'installs' configurable-http-proxy under --prefix, or fails."""
    script = tmp_path / "npm"
    script.write_text(
        "#!/bin/sh\n"
        'while [ "$1" != --prefix ]; do shift; done; prefix=$2\n'
        f"[ {exit_code} = 0 ] || {{ echo 'npm ERR! 404'; exit {exit_code}; }}\n"
        'mkdir -p "$prefix/node_modules/.bin"\n'
        'printf "#!/bin/sh\\n" > "$prefix/node_modules/.bin/configurable-http-proxy"\n'
        'echo "$prefix" >> "$(dirname "$0")/calls"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_ensure_proxy_installs_once_into_the_cache(tmp_path):
    npm = fake_npm(tmp_path)
    cache = tmp_path / "cache"
    said = []
    binary = node_pieces.ensure_proxy(cache, npm=npm, progress=said.append)
    assert Path(binary).is_file()
    assert binary == str(node_pieces.proxy_path(cache))
    assert said and node_pieces.CHP_VERSION in said[0]
    # installed into a staging folder, then renamed: nothing partial is left
    assert not list(cache.glob("*.partial"))
    # the second call finds it and runs npm no more
    assert node_pieces.ensure_proxy(cache, npm="/nonexistent/npm") == binary
    assert len((tmp_path / "calls").read_text().splitlines()) == 1


def test_failed_npm_leaves_nothing_that_looks_installed(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(node_pieces.NodePiecesError, match="npm ERR! 404"):
        node_pieces.ensure_proxy(cache, npm=fake_npm(tmp_path, exit_code=1), progress=print)
    assert not node_pieces.proxy_path(cache).exists()
    assert not list(cache.glob("*"))


def test_setup_command_installs_both_pieces(monkeypatch, capsys):
    monkeypatch.setattr(
        cli, "install_all", lambda progress: {"configurable-http-proxy": "/c/chp", "idp": "/c/i"}
    )
    assert cli.main(["setup"]) == 0
    assert "configurable-http-proxy: /c/chp" in capsys.readouterr().out

    def broken(progress):
        raise node_pieces.NodePiecesError("npm is not installed")

    monkeypatch.setattr(cli, "install_all", broken)
    assert cli.main(["setup"]) == 1
    assert "npm is not installed" in capsys.readouterr().err


def test_up_says_at_once_when_users_cannot_be_isolated():
    values = {"spawner": {"kind": "local", "isolate_users": "auto"}}
    assert "spawner.isolate_users: no" in cli.isolation_notice(values, 1000)
    assert cli.isolation_notice(values, 0) == ""
    one_person = {"spawner": {"kind": "local", "isolate_users": "no"}}
    assert cli.isolation_notice(one_person, 1000) == ""
    kube = {"spawner": {"kind": "kubernetes", "isolate_users": "auto"}}
    assert cli.isolation_notice(kube, 1000) == ""
