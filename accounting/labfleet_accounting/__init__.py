"""labfleet_accounting."""
