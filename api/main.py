"""The composition root of the ``writ`` command: the one module that knows every group.

``writ`` is assembled here from the command groups of three packages, each
imported by name, so a group that fails to import fails the command loudly
instead of vanishing from it. Dependencies keep pointing one way: the groups
import ``ledger`` (and ``api``'s server group its own package); nothing imports
this module but the tests, which run the same parser in-process. The console
script ``writ`` is :func:`main` (``pyproject.toml``); ``python -m api.main`` is
the same program. The import-linter contracts in ``pyproject.toml`` (run by
``.ci/run``) check the direction.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from typing import NoReturn

from device_sim import demo
from ledger.cli import audit, keys, offline, receipts, records, root, status
from ledger.cli import main as cli

from . import cli as server
from . import witness_cli

__all__ = ["GROUPS", "build_parser", "main", "run"]

#: every command group of ``writ``, in ``writ --help`` order. A new group is one
#: more import above and one more entry here.
GROUPS: tuple[cli.Registrar, ...] = (
    root.register,  # root init / recover, rotate
    keys.register,  # key init / public / import-token
    records.register,  # genesis, grant, revoke, push
    status.register,  # status
    offline.register,  # bundle export, mirror import / status, sign
    audit.register,  # audit, show, log
    receipts.register,  # receipts import
    server.register,  # server init, serve
    witness_cli.register,  # witness init, serve
    demo.register,  # demo
)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``writ`` parser."""
    return cli.build_parser(GROUPS)


def run(argv: Sequence[str] | None = None) -> int:
    """``writ ARGV`` in this process; the exit code."""
    return cli.run(argv, groups=GROUPS)


#: the young generation of the cyclic garbage collector, in tracked objects. A
#: ``writ`` process handles records in bulk (a server batch of 1,000 makes about
#: 10,000 short-lived tracked objects); at CPython's default of 700 a batch set
#: off some 15 young and a few full collections over the whole heap. Measured on
#: 2 cores: batches of 1,000 per POST went from about 20,500 to 23,000 records/s,
#: the same as with the collector off. Cycles are still collected, a little later.
GC_YOUNG = 10_000


def main() -> NoReturn:
    gc.set_threshold(GC_YOUNG, 10, 10)  # process-wide policy: this is the process's entry point
    # the process exits next: a landed command keeps its 0 even if Ctrl-C follows
    sys.exit(cli.run(groups=GROUPS, restore_signals=False))


if __name__ == "__main__":
    main()
