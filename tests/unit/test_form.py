"""The spawn form renders only what the user's groups allow; reading it picks one profile."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
from labfleet_spawner.catalogue import load_catalogue, offered_profiles
from labfleet_spawner.form import (
    MAX_FIELD_LENGTH,
    options_from_form,
    render_form,
    split_by_presence,
)

CATALOGUE = load_catalogue(Path(__file__).resolve().parents[2] / "config" / "catalogue.yaml")


def test_form_offers_only_allowed_profiles():
    html = render_form(offered_profiles(CATALOGUE, ["users"]))
    assert 'value="gpu-t4"' in html and 'value="cpu"' in html
    assert 'value="gpu-a100"' not in html and "vitis" not in html
    # the default profile is preselected
    assert 'id="profile-cpu"\n           value="cpu" checked' in html


def test_form_shows_availability_and_none_free():
    html = render_form(offered_profiles(CATALOGUE, ["users"]), {"t4": (3, 8), "a30": (0, 1)})
    assert "3 of 8 free" in html
    assert "none free (1 in total)" in html
    assert 'data-none-free="true"' in html


def fieldset_ids(html: str) -> list[str]:
    return re.findall(r'id="fieldset-([^"]+)"', html)


# this machine has one A30 and none of the other accelerators
NO_GPUS_BUT_A30 = {"t4": (0, 0), "rtx5000": (0, 0), "a30": (1, 1), "mig-1g.10gb": (0, 0)}


def test_form_lists_what_is_here_first_and_collapses_the_rest():
    html = render_form(offered_profiles(CATALOGUE, ["users"]), NO_GPUS_BUT_A30)
    here, _, absent = html.partition('<details class="labfleet-unavailable')
    assert fieldset_ids(here) == ["cpu", "gpu-a30"]
    assert fieldset_ids(absent) == ["gpu-t4", "gpu-rtx5000", "mig-small"]
    assert "1 of 1 free" in here and "disabled" not in here
    # collapsed (no "open"), said once, and not in red
    assert re.search(r'<details class="labfleet-unavailable[^"]*" id="labfleet-unavailable">', html)
    assert "Not available here: 3 profiles" in absent
    assert absent.count("not available here") == 3
    assert absent.count("disabled") == 3
    assert "text-danger" not in absent


def test_form_can_hide_what_is_not_here():
    html = render_form(offered_profiles(CATALOGUE, ["users"]), NO_GPUS_BUT_A30, unavailable="hide")
    assert fieldset_ids(html) == ["cpu", "gpu-a30"]
    assert "<details" not in html and "not available here" not in html.lower()
    with pytest.raises(ValueError, match="collapse, hide"):
        render_form(offered_profiles(CATALOGUE, ["users"]), {}, unavailable="grey")


def test_form_without_availability_lists_everything_in_order():
    choices = offered_profiles(CATALOGUE, ["users"])
    html = render_form(choices)
    assert fieldset_ids(html) == [c.profile.name for c in choices]
    assert "<details" not in html
    here, absent = split_by_presence(choices, {"t4": (2, 2)})
    assert [c.profile.name for c in here] == [c.profile.name for c in choices] and not absent


def test_form_preselects_a_profile_that_can_run_here():
    choices = [
        replace(c, profile=replace(c.profile, default=c.profile.name == "gpu-t4"))
        for c in offered_profiles(CATALOGUE, ["users"])
    ]
    html = render_form(choices, NO_GPUS_BUT_A30)
    assert re.search(r'id="profile-cpu"\s+value="cpu" checked', html)
    assert not re.search(r'id="profile-gpu-t4"\s+value="gpu-t4" checked', html)
    html = render_form(choices, {"t4": (1, 1)})
    assert re.search(r'id="profile-gpu-t4"\s+value="gpu-t4" checked', html)


def test_form_escapes_message():
    html = render_form(offered_profiles(CATALOGUE, ["users"]), message="<script>x</script>")
    assert "<script>x" not in html and "&lt;script&gt;" in html


def test_options_from_form_reads_only_the_chosen_profile():
    form = {
        "profile": ["gpu-t4"],
        "gpu-t4.image": ["pytorch-cuda"],
        "gpu-t4.size": ["small"],
        "gpu-t4.count": ["2"],
        "cpu.size": ["large"],
    }
    assert options_from_form(form) == {
        "profile": "gpu-t4",
        "image": "pytorch-cuda",
        "size": "small",
        "count": "2",
    }
    assert options_from_form({}) == {}


def test_options_from_form_rejects_oversized_fields():
    with pytest.raises(ValueError, match="longer than"):
        options_from_form({"profile": ["x" * (MAX_FIELD_LENGTH + 1)]})
