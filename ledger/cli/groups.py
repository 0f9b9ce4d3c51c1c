"""The list of command groups (each module has ``register(subparsers)``)."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

#: modules providing ``register``; missing optional ones are skipped.
GROUPS = (
    "ledger.cli.keys",  # root init / recover, key init, rotate
    "ledger.cli.records",  # genesis, grant, revoke, push, sign, bundle, status
    "ledger.cli.audit",  # audit, show, log
    "api.cli",  # server init, serve
    "api.witness_cli",  # witness init, witness serve
    "device_sim.demo",  # demo
)


def registrars() -> list[Registrar]:
    out: list[Registrar] = []
    for name in GROUPS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        out.append(mod.register)
    return out
