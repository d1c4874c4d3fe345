"""labfleet_hub.posix_registry on JupyterHub's own schema (SQLite, as the hub creates it).

The numbers behind uids and gids are never handed to another name, although the
hub's SQLite tables reuse the id of the newest user or group deleted; the ids in
use before the registry existed stay as they were.
"""

from __future__ import annotations

import os
import sqlite3
from types import SimpleNamespace

from jupyterhub import orm
from labfleet_hub.posix_registry import GROUP, USER, numbers, posix_ids

from tests.unit.test_local_spawner import make_spawner


def hub_db(tmp_path):
    return orm.new_session_factory(f"sqlite:///{tmp_path}/jupyterhub.sqlite")()


def add_user(db, name, groups=()):
    user = orm.User(name=name)
    db.add(user)
    for group_name in groups:
        group = db.query(orm.Group).filter_by(name=group_name).first()
        if group is None:
            group = orm.Group(name=group_name)
            db.add(group)
        user.groups.append(group)
    db.commit()
    return user


def delete(db, row):
    db.delete(row)
    db.commit()


def test_existing_ids_stay_and_deleted_ones_are_never_given_again(tmp_path):
    db = hub_db(tmp_path)
    users = {n: add_user(db, n, ["ml"]) for n in ("a", "b", "c", "d")}
    delete(db, users.pop("c"))  # a hole at 3, deleted before the upgrade
    before = {n: u.id for n, u in users.items()}
    assert before == {"a": 1, "b": 2, "d": 4}
    # the first use after the upgrade: every existing user keeps its hub id
    assert {n: posix_ids(u, db)[0] for n, u in users.items()} == before
    e = add_user(db, "e")
    assert e.id == 5 and posix_ids(e, db)[0] == 5  # new and above all: its own id
    delete(db, e)
    f = add_user(db, "f")
    assert f.id == 5  # SQLite gives the deleted newest user's id again ...
    assert posix_ids(f, db)[0] == 6  # ... but not its uid
    g = add_user(db, "g")
    assert g.id == 6 and posix_ids(g, db)[0] == 7  # 6 is f's
    # a name created again is the same account: its number back
    e = add_user(db, "e")
    assert posix_ids(e, db)[0] == 5
    # every number belongs to one name
    with sqlite3.connect(f"{tmp_path}/jupyterhub.sqlite") as conn:
        rows = conn.execute("SELECT name, number FROM labfleet_posix_ids WHERE kind = 'user'")
        table = dict(rows.fetchall())
    assert table == {"a": 1, "b": 2, "d": 4, "e": 5, "f": 6, "g": 7}
    # kept in the hub's own database, no other file
    assert sorted(os.listdir(tmp_path)) == ["jupyterhub.sqlite"]


def test_groups_too(tmp_path):
    db = hub_db(tmp_path)
    u = add_user(db, "u", ["ml", "cms"])
    assert posix_ids(u, db)[1] == {"ml": 1, "cms": 2}
    delete(db, db.query(orm.Group).filter_by(name="cms").one())
    v = add_user(db, "v", ["phys"])
    assert v.groups[0].id == 2  # the hub's id of the deleted group
    assert posix_ids(v, db)[1] == {"phys": 3}
    assert numbers(db, GROUP, [("ml", 1)]) == {"ml": 1}
    assert numbers(db, USER, []) == {}


def test_a_second_session_sees_the_same_numbers(tmp_path):
    db = hub_db(tmp_path)
    a = add_user(db, "a")
    delete(db, a)
    b = add_user(db, "b")
    other = hub_db(tmp_path)
    assert posix_ids(b, db) == posix_ids(other.query(orm.User).filter_by(name="b").one(), other)


def test_the_notebook_spawner_uses_the_numbers(tmp_path):
    db = hub_db(tmp_path)
    old = add_user(db, "old", ["ml"])
    before = make_spawner(tmp_path, user=SimpleNamespace(**vars_of(old), db=db)).plan_layout()
    delete(db, old)
    delete(db, db.query(orm.Group).filter_by(name="ml").one())
    new = add_user(db, "new", ["cms"])
    assert (new.id, new.groups[0].id) == (1, 1)  # the deleted user's and group's hub ids
    layout = make_spawner(tmp_path, user=SimpleNamespace(**vars_of(new), db=db)).plan_layout()
    assert layout.uid != before.uid and layout.uid == 200002
    assert layout.group_gids == {"cms": 300002} != before.group_gids


def vars_of(user):
    return {
        "name": user.name,
        "id": user.id,
        "escaped_name": user.name,
        "url": f"/user/{user.name}/",
        "groups": list(user.groups),
    }
