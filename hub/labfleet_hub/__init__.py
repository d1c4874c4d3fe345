"""labfleet_hub."""
