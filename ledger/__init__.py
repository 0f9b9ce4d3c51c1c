"""Writ ledger core: encoding, records, tree, state, notes; storage."""
