"""The notebook's secret environment (labfleet_spawner.secretenv) as plain dicts."""

from __future__ import annotations

import base64

from labfleet_spawner.secretenv import (
    DEFAULT_SECRET_PATTERN,
    env_secret,
    env_secret_name,
    pod_owner,
    split_env,
)

ENV = {
    "JUPYTERHUB_API_TOKEN": "tok",
    "JPY_API_TOKEN": "tok",
    "JUPYTERHUB_CLIENT_ID": "jupyterhub-user-alice",
    "JUPYTERHUB_OAUTH_SCOPES": '["access:servers!server=alice/"]',
    "AWS_SECRET_ACCESS_KEY": "aws",
    "db_password": "pw",
    "MY.PRIVATE_KEY": "pem",
    "HOME": "/home/jovyan",
}


def ref(name: str, key: str, secret: str = "jupyter-alice-env") -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def test_tokens_and_secret_names_move_the_rest_stays():
    refs, data = split_env(ENV, "jupyter-alice-env")
    moved = ["JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "AWS_SECRET_ACCESS_KEY", "db_password",
             "MY.PRIVATE_KEY"]  # fmt: skip
    assert list(refs) == moved
    assert refs == {name: ref(name, name) for name in moved}
    assert data == {name: ENV[name] for name in moved}
    # the OAuth client id and scopes are not secrets, and stay readable in the spec
    assert "JUPYTERHUB_CLIENT_ID" not in refs and "JUPYTERHUB_OAUTH_SCOPES" not in refs


def test_empty_pattern_moves_only_the_servers_tokens():
    refs, data = split_env(ENV, "s", pattern="")
    assert list(refs) == ["JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN"]
    assert data == {"JUPYTERHUB_API_TOKEN": "tok", "JPY_API_TOKEN": "tok"}


def test_a_name_that_cannot_be_a_secret_key_gets_a_key_of_its_own():
    refs, data = split_env({"A TOKEN": "x", "B:SECRET": "y"}, "s", always=())
    assert refs == {
        "A TOKEN": ref("A TOKEN", "env-0", "s"),
        "B:SECRET": ref("B:SECRET", "env-1", "s"),
    }
    assert data == {"env-0": "x", "env-1": "y"}


def test_pattern_is_the_one_the_local_spawner_filters_with():
    from labfleet_spawner import local

    assert local.DEFAULT_SECRET_PATTERN is DEFAULT_SECRET_PATTERN


def test_secret_manifest_and_owner_patch():
    assert env_secret_name("jupyter-alice") == "jupyter-alice-env"
    secret = env_secret("jupyter-alice-env", "nb", {"JUPYTERHUB_API_TOKEN": "tok"}, {"a": "b"})
    assert secret == {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": "jupyter-alice-env", "namespace": "nb", "labels": {"a": "b"}},
        "data": {"JUPYTERHUB_API_TOKEN": base64.b64encode(b"tok").decode()},
    }
    assert pod_owner("jupyter-alice", "uid-1") == {
        "metadata": {
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": "jupyter-alice", "uid": "uid-1"}
            ]
        }
    }
