"""Subcommands of the `isofast` CLI, one module each (discovered by `isofast.cli`)."""
