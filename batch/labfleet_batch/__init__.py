"""labfleet_batch."""
