"""Writ ledger server (Starlette)."""
