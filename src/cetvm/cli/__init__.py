"""The `cetvm` command line."""
