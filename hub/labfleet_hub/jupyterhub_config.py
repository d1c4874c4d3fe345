"""JupyterHub configuration for labfleet: the platform YAML, applied.

Thin on purpose; all logic lives in :mod:`labfleet_hub.configurer`. The path of
the platform YAML comes from ``LABFLEET_CONFIG`` (set by ``labfleet up``).
"""

import os

from labfleet_hub.configurer import apply_config, load_values, with_secrets

c = get_config()  # noqa: F821 -- provided by JupyterHub when it loads this file
apply_config(with_secrets(load_values(os.environ["LABFLEET_CONFIG"])), c)
