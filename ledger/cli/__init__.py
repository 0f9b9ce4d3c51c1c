"""The `writ` command line: one module per command group."""
