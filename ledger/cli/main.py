"""`writ`: the integrator's and the server's command line.

Every command prints exactly one JSON object on stdout (human text goes to
stderr) and never a traceback for a user error. Exit codes:

    0  success
    1  refused or failed (a WritError that is not one of the below)
    2  usage: bad flags, bad hex, unknown or ambiguous name
    3  verification failed: the data does not verify (audit, sync)
    4  the server could not be reached or answered with an HTTP error

Each command group is a module with ``register(subparsers)``; a handler
returns the JSON object to print (or raises a WritError). This module only
runs a list of groups it is given: the list itself, and so the ``writ``
command, is assembled in one place, the composition root ``api/main.py``
(``ledger`` imports nothing of the project).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast

from ..errors import TransportError, UsageError, VerificationError, WritError

Handler = Callable[[argparse.Namespace], dict[str, Any]]
#: a command group's ``register(subparsers)``.
Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_VERIFY, EXIT_TRANSPORT = 0, 1, 2, 3, 4


class CommandFailed(WritError):
    """A command's own non-zero outcome that is not an error of the tree
    (for example a refusal that must still print JSON)."""

    type = "failed"

    def __init__(self, payload: dict[str, Any], code: int) -> None:
        super().__init__(str(payload.get("error", "failed")))
        self.payload = payload
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def exit_code(exc: WritError) -> int:
    if isinstance(exc, CommandFailed):
        return exc.code
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, VerificationError):
        return EXIT_VERIFY
    if isinstance(exc, TransportError):
        return EXIT_TRANSPORT
    return EXIT_FAILED


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def build_parser(groups: Sequence[Registrar]) -> argparse.ArgumentParser:
    """The ``writ`` parser with the commands of ``groups``."""
    parser = _Parser(
        prog="writ", description="Writ: a revocation ledger signed against one offline root key."
    )
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser),
    )
    for register in groups:
        register(sub)
    return parser


def run(argv: Sequence[str] | None = None, *, groups: Sequence[Registrar]) -> int:
    """Parse ``argv`` with ``groups``, run the command, print its JSON; the exit code."""
    try:
        parser = build_parser(groups)
        args = parser.parse_args(argv)
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            raise UsageError("a command is required (see writ --help)")
        emit(handler(args))
        return EXIT_OK
    except CommandFailed as exc:
        emit(exc.payload)
        return exc.code
    except WritError as exc:
        emit(exc.to_json())
        sys.stderr.write(f"writ: {exc.message}\n")
        return exit_code(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C, or a command's own stop signal (the demo's SIGTERM)
        how = f" by {exc.args[0]}" if exc.args and isinstance(exc.args[0], str) else ""
        emit({"error": "interrupted", "message": f"interrupted{how}"})
        sys.stderr.write(f"writ: interrupted{how}\n")
        return 130
