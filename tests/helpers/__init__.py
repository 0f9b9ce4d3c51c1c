"""Shared test helpers (see tests/helpers/server.py)."""
