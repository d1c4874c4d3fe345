"""The spawn form renders only what the user's groups allow; reading it picks one profile."""

from pathlib import Path

import pytest
from labfleet_spawner.catalogue import load_catalogue, offered_profiles
from labfleet_spawner.form import MAX_FIELD_LENGTH, options_from_form, render_form

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


def test_form_disables_accelerators_the_fleet_does_not_have():
    html = render_form(offered_profiles(CATALOGUE, ["users"]), {"t4": (0, 0), "a30": (1, 1)})
    t4 = html[html.index('id="profile-gpu-t4"') : html.index('id="fieldset-gpu-rtx5000"')]
    assert "disabled" in t4 and "not available here" in t4
    a30 = html[html.index('id="profile-gpu-a30"') : html.index('id="fieldset-mig-small"')]
    assert "disabled" not in a30 and "1 of 1 free" in a30


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
