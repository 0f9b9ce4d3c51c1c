"""`writ`: the integrator's and the server's command line.

Every command prints exactly one JSON object on stdout (human text goes to
stderr) and never a traceback for a user error; an error is
``{"error": TYPE, "message": TEXT, ...}``. The exit codes are
:data:`EXIT_CODES`, the one table that ``writ --help`` prints and
docs/operations.md (section "Exit codes") repeats.

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

from ..errors import CorruptLedger, Interrupted, TransportError, UsageError, VerificationError, WritError
from ..redact import redact, redact_fields

Handler = Callable[[argparse.Namespace], dict[str, Any]]
#: a command group's ``register(subparsers)``.
Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_VERIFY, EXIT_TRANSPORT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

#: every exit status of ``writ``, and what it means: the one table (``writ --help``, the docs).
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_FAILED, "refused or failed (nothing was signed or appended unless the message says so)"),
    (EXIT_USAGE, "usage: bad flags or arguments, bad hex, an unknown or ambiguous name"),
    (
        EXIT_VERIFY,
        "verification failed: data from a server, a bundle or a database does not verify"
        " (audit, sync, a mirror, `writ serve` refusing a corrupt ledger, wrong-anchor)",
    ),
    (EXIT_TRANSPORT, "the server could not be reached, or answered with an HTTP error"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)


def exit_codes_text() -> str:
    """:data:`EXIT_CODES` as the plain-text table of ``writ --help``."""
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES)


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
        # argparse quotes the offending arguments: a URI with a PIN must not come back
        raise UsageError(redact(f"{self.prog}: {message}"))


def exit_code(exc: WritError) -> int:
    if isinstance(exc, CommandFailed):
        return exc.code
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, VerificationError | CorruptLedger):
        return EXIT_VERIFY  # a stored ledger that fails verification is a verification failure too
    if isinstance(exc, TransportError):
        return EXIT_TRANSPORT
    return EXIT_FAILED


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def build_parser(groups: Sequence[Registrar]) -> argparse.ArgumentParser:
    """The ``writ`` parser with the commands of ``groups``."""
    parser = _Parser(
        prog="writ",
        description="Writ: a revocation ledger signed against one offline root key.",
        epilog=exit_codes_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        emit(redact_fields(exc.payload))
        return exc.code
    except WritError as exc:
        emit(redact_fields(exc.to_json()))
        sys.stderr.write(f"writ: {redact(exc.message)}\n")
        return exit_code(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C, or a command's own stop signal (the demo's SIGTERM)
        how = f" by {exc.args[0]}" if exc.args and isinstance(exc.args[0], str) else ""
        emit(Interrupted(f"interrupted{how}").to_json())
        sys.stderr.write(f"writ: interrupted{how}\n")
        return EXIT_INTERRUPTED
