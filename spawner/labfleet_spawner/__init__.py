"""labfleet_spawner."""
