"""``python -m ledger.cli``: the same as the ``writ`` console script."""

from .main import main

main()
