"""One identity-provider account per hub user: labfleet_hub.subject_binding on a real database."""

from __future__ import annotations

import pytest
from jupyterhub import orm
from labfleet_hub import subject_binding
from labfleet_hub.authenticator import IAMAuthenticator
from labfleet_hub.refusal import SubjectMismatch
from tornado import web


@pytest.fixture
def db(tmp_path):
    # the hub's own database layer, on a file like the single-node hub's
    session = orm.new_session_factory(f"sqlite:///{tmp_path / 'jupyterhub.sqlite'}")()
    yield session
    session.close()


def test_first_login_binds_and_the_same_account_passes(db):
    assert subject_binding.bound_subject(db, "alice") is None
    assert subject_binding.bind(db, "alice", "sub-a", "https://iam/") == "sub-a"
    assert subject_binding.bind(db, "alice", "sub-a", "https://iam/") == "sub-a"
    # another account for the same name gets the owner's sub back, and changes nothing
    assert subject_binding.bind(db, "alice", "sub-A", "https://iam/") == "sub-a"
    assert subject_binding.bound_subject(db, "alice") == "sub-a"


def test_binding_outlives_the_hub_user(db, tmp_path):
    subject_binding.bind(db, "bob", "sub-b")
    db.close()
    # a new session (a restarted hub) on the same database
    again = orm.new_session_factory(f"sqlite:///{tmp_path / 'jupyterhub.sqlite'}")()
    assert subject_binding.bound_subject(again, "bob") == "sub-b"
    again.close()


@pytest.mark.parametrize("bad", [None, "", "  ", 42, "x" * 256, "é"])
def test_unusable_subject_is_refused_naming_the_claim(bad):
    with pytest.raises(subject_binding.InvalidSubject, match="'sub'"):
        subject_binding.check_subject("sub", bad)


def model(name, sub, login_name=None):
    userinfo = {"sub": sub, "preferred_username": login_name or name}
    return {"name": name, "auth_state": {"oauth_user": userinfo}}


async def test_authenticator_refuses_another_account_for_a_bound_name(db):
    auth = IAMAuthenticator(refusal_contact="support@example.org")
    await auth.bind_subject(db, model("alice", "sub-alice"))
    await auth.bind_subject(db, model("alice", "sub-alice"))  # the owner again: fine
    # IAM's "Alice" (another account) becomes hub user "alice" too
    with pytest.raises(SubjectMismatch) as info:
        await auth.bind_subject(db, model("alice", "sub-Alice", login_name="Alice"))
    assert info.value.status_code == 403
    message = info.value.jupyterhub_message
    assert "hub user alice belongs to another identity-provider account" in message
    assert "'Alice'" in message and "sub-Alice" in message
    assert "support@example.org" in message
    assert "sub-alice" not in message  # the owner's subject is not shown to others


async def test_authenticator_refuses_a_login_without_sub(db):
    auth = IAMAuthenticator()
    with pytest.raises(web.HTTPError) as info:
        await auth.bind_subject(db, {"name": "carol", "auth_state": {"oauth_user": {}}})
    assert info.value.status_code == 403
    assert "no 'sub' claim" in info.value.log_message
    assert subject_binding.bound_subject(db, "carol") is None


async def test_binding_can_be_turned_off(db):
    auth = IAMAuthenticator(bind_subject_claim="")
    await auth.bind_subject(db, model("dave", "sub-1"))
    await auth.bind_subject(db, model("dave", "sub-2"))
    assert subject_binding.bound_subject(db, "dave") is None


def test_release_name_hands_the_name_to_the_next_account(config_dir, capsys):
    import yaml
    from labfleet_hub import cli

    config = config_dir / "labfleet.yaml"
    data = yaml.safe_load(config.read_text())
    data["hub"]["state_dir"] = str(config_dir / "state")
    data["spawner"]["storage_root"] = str(config_dir / "storage")
    config.write_text(yaml.safe_dump(data))
    values = cli.config_values(str(config))
    assert values is not None, capsys.readouterr().err
    (config_dir / "state").mkdir(mode=0o700)
    session = orm.new_session_factory(values["hub"]["db_url"])()
    try:
        subject_binding.bind(session, "alice", "sub-old", "https://iam/")
    finally:
        session.close()

    assert cli.main(["release-name", "Alice", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "'alice'" in out and "sub-old" in out and f"{config_dir}/storage/home/alice" in out

    session = orm.new_session_factory(values["hub"]["db_url"])()
    try:
        assert subject_binding.bound_subject(session, "alice") is None
        assert subject_binding.bind(session, "alice", "sub-new", "https://iam/") == "sub-new"
    finally:
        session.close()
    # releasing a name bound to nobody says so and changes nothing
    assert cli.main(["release-name", "bob", "--config", str(config)]) == 0
    assert "nothing to release" in capsys.readouterr().out
