"""Seam 5: the chart's values against the code's schemas (no cluster, no helm)."""

from pathlib import Path

import jsonschema
import pytest
import yaml
from labfleet_hub.configurer import parse_values

ROOT = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((ROOT / "helm" / "labfleet" / "values.yaml").read_text())
Z2JH = ROOT.parent / "shared" / "reference" / "z2jh"
Z2JH_SCHEMA = Z2JH / "values.schema.yaml"


def merged(defaults, overrides):
    """What helm does with a subchart's defaults and the parent's values."""
    out = dict(defaults)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def test_labfleet_values_pass_the_platform_schema():
    values = parse_values(VALUES["labfleet"], "values.yaml:labfleet", Path("/etc/labfleet"))
    assert values["spawner"]["kind"] == "kubernetes"
    assert values["catalogue"] == "/etc/labfleet/catalogue.yaml"


def test_jupyterhub_values_pass_the_z2jh_schema():
    if not Z2JH_SCHEMA.exists():
        pytest.skip(f"{Z2JH_SCHEMA} not present (it is beside the checkout in CI)")
    schema = yaml.safe_load(Z2JH_SCHEMA.read_text())
    defaults = yaml.safe_load((Z2JH / "values.yaml").read_text())
    jsonschema.validate(merged(defaults, VALUES["jupyterhub"]), schema)


def test_z2jh_schema_rejects_a_typo():
    if not Z2JH_SCHEMA.exists():
        pytest.skip(f"{Z2JH_SCHEMA} not present")
    schema = yaml.safe_load(Z2JH_SCHEMA.read_text())
    defaults = yaml.safe_load((Z2JH / "values.yaml").read_text())
    with pytest.raises(jsonschema.ValidationError, match="imagee"):
        jsonschema.validate(merged(defaults, {"hub": {"imagee": {}}}), schema)


def test_notebook_pods_get_the_z2jh_network_policy_without_metadata_or_private_ranges():
    if not Z2JH_SCHEMA.exists():
        pytest.skip(f"{Z2JH_SCHEMA} not present")
    defaults = yaml.safe_load((Z2JH / "values.yaml").read_text())
    policy = merged(defaults, VALUES["jupyterhub"])["singleuser"]["networkPolicy"]
    assert policy["enabled"] is True
    rules = policy["egressAllowRules"]
    # other pods, nodes and the metadata service are out of reach; the hub's and the
    # proxy's pods are allowed by the chart's own rules (docs/security.md)
    assert rules["cloudMetadataServer"] is False and rules["privateIPs"] is False
    assert policy["egress"] == [] and not policy.get("ingress")
