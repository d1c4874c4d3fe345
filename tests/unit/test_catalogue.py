"""The catalogue: schema errors name file, entry and field; offers follow groups."""

from pathlib import Path

import pytest
import yaml
from labfleet_spawner.catalogue import (
    CatalogueError,
    SelectionError,
    load_catalogue,
    offered_profiles,
    parse_catalogue,
    parse_quantity,
    validate_selection,
)

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "config" / "catalogue.yaml"


@pytest.fixture
def data():
    return yaml.safe_load(CATALOGUE.read_text())


@pytest.fixture
def catalogue():
    return load_catalogue(CATALOGUE)


def names(choices):
    return [c.profile.name for c in choices]


def test_bundled_catalogue_is_valid(catalogue):
    assert "cpu" in catalogue.profiles
    assert catalogue.accelerators["mig-1g.10gb"].kind == "mig"
    assert catalogue.accelerators["u55c"].resource.startswith("amd.com/xilinx_u55c")


def test_offers_follow_groups(catalogue):
    plain = names(offered_profiles(catalogue, ["users"]))
    assert "gpu-a100" not in plain and "fpga-u55c" not in plain
    assert plain[0] == "cpu"
    ml = names(offered_profiles(catalogue, ["users", "ml"]))
    assert "gpu-a100" in ml and "fpga-u55c" not in ml
    fpga = offered_profiles(catalogue, ["fpga"])
    assert "fpga-u55c" in names(fpga)


def test_image_restricted_to_group_is_hidden(catalogue):
    cpu = next(c for c in offered_profiles(catalogue, ["users"]) if c.profile.name == "cpu")
    assert [i.name for i in cpu.images] == ["scipy", "pytorch-cuda"]


def test_selection_defaults(catalogue):
    sel = validate_selection(catalogue, ["users"], {})
    assert (sel.profile.name, sel.image.name, sel.size.name, sel.count) == (
        "cpu",
        "scipy",
        "small",
        0,
    )
    sel = validate_selection(catalogue, ["users"], {"profile": "gpu-t4"})
    assert sel.accelerator.name == "t4" and sel.count == 1


@pytest.mark.parametrize(
    "groups, options, message",
    [
        (
            ["users"],
            {"profile": "gpu-a100"},
            "profile 'gpu-a100' is not available to you; allowed:",
        ),
        (["users"], {"profile": "cpu", "image": "evil/miner:latest"}, "image 'evil/miner:latest'"),
        (["users"], {"profile": "cpu", "size": "huge"}, "size 'huge' is not offered"),
        (["users"], {"profile": "gpu-t4", "count": "3"}, "allowed: 1 to 2"),
        (["users"], {"profile": "gpu-t4", "count": "-1"}, "count -1 of t4 is out of range"),
        (["users"], {"profile": "gpu-t4", "count": "1e9"}, "is not a whole number"),
        (["users"], {"profile": "cpu", "count": "2"}, "has no accelerator"),
        (["users"], {"profile": "cpu", "cpu": "-4"}, "unknown option(s) cpu"),
        (["users"], {"profile": "cpu", "mem_limit": "900T"}, "unknown option(s) mem_limit"),
        (["users"], {"profile": "x" * 500}, "is not available to you"),
    ],
)
def test_forged_options_are_rejected(catalogue, groups, options, message):
    with pytest.raises(SelectionError) as info:
        validate_selection(catalogue, groups, options)
    assert message in str(info.value)
    assert len(str(info.value)) < 400  # never echoes a huge forged value back


def test_no_profile_for_groups(data):
    for profile in data["profiles"]:
        profile["groups"] = ["admins"]
    catalogue = parse_catalogue(data, "c.yaml")
    with pytest.raises(SelectionError, match="no profile in the catalogue is available"):
        validate_selection(catalogue, ["users"], {})


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["sizes"][1].update(cpu=-3), "c.yaml: sizes[1] 'medium': field cpu:"),
        (
            lambda d: d["profiles"][2].update(sizes=["huge"]),
            "c.yaml: profiles[2] 'gpu-rtx5000': field sizes: 'huge' is not defined",
        ),
        (
            lambda d: d["profiles"][1].update(accelerator="h100"),
            "profiles[1] 'gpu-t4': field accelerator: 'h100' is not defined",
        ),
        (lambda d: d["accelerators"][0].update(kind="tpu"), "accelerators[0] 't4': field kind:"),
        (
            lambda d: d["accelerators"][4].pop("mig_profile"),
            "accelerators[4] 'mig-1g.10gb': field mig_profile: required for kind mig",
        ),
        (
            lambda d: d["images"].append(dict(d["images"][0])),
            "images[3] 'scipy': field name: duplicate of images[0]",
        ),
        (lambda d: d["sizes"][0].update(memory="lots"), "sizes[0] 'small': field memory:"),
        (lambda d: d["profiles"][0].update(colour="red"), "profiles[0] 'cpu': field (entry):"),
        (
            lambda d: d.pop("profiles"),
            "c.yaml: (top level): field (entry): 'profiles' is a required",
        ),
        (lambda d: d["profiles"][1].update(default=True), "only one profile may be the default"),
    ],
)
def test_invalid_catalogue_names_file_entry_field(data, mutate, expected):
    mutate(data)
    with pytest.raises(CatalogueError) as info:
        parse_catalogue(data, "c.yaml")
    assert expected in str(info.value)


def test_unreadable_and_broken_files(tmp_path):
    with pytest.raises(CatalogueError, match="cannot read the catalogue"):
        load_catalogue(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("images: [\n")
    with pytest.raises(CatalogueError, match="broken.yaml: not valid YAML"):
        load_catalogue(broken)


def test_quantities_and_mig_fraction(catalogue):
    assert parse_quantity("2Gi") == 2 * 2**30
    assert parse_quantity("500M") == 500 * 10**6
    assert catalogue.sizes["medium"].shm_bytes == 2 * 2**30
    with pytest.raises(ValueError):
        parse_quantity("-1Gi")
    assert catalogue.accelerators["mig-1g.10gb"].gpu_fraction == pytest.approx(1 / 7, rel=1e-3)
