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
import signal
import sys
import threading
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


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with every default shown (``(default: ...)``), but no ``(default: None)`` noise."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Commands)

    def error(self, message: str) -> NoReturn:
        # argparse quotes the offending arguments: a URI with a PIN must not come back
        raise UsageError(redact(f"{self.prog}: {message}"))


class _Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Sub-commands whose own ``--help`` starts with their one-line help (each its own description)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if "description" not in kwargs and kwargs.get("help"):
            text = str(kwargs["help"])
            kwargs["description"] = text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")
        return cast(argparse.ArgumentParser, super().add_parser(name, **kwargs))


def version() -> str:
    """This installation's version, from the package metadata."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("writ")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Version(argparse.Action):
    """``writ --version``: plain text on stdout (not JSON), exit 0."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        raise _VersionShown


class _VersionShown(Exception):
    pass


def hold_interrupts() -> None:
    """The command has landed (an append went through, or its answer is printed): from here on
    Ctrl-C cannot turn a success into exit 130. Ignores SIGINT; :func:`run` restores it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser),
    )
    for register in groups:
        register(sub)
    return parser


def run(
    argv: Sequence[str] | None = None, *, groups: Sequence[Registrar], restore_signals: bool = True
) -> int:
    """Parse ``argv`` with ``groups``, run the command, print its JSON; the exit code.
    SIGINT's handler is restored on return unless ``restore_signals`` is false (the
    process is about to exit: keep a landed command's 0)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        parser = build_parser(groups)
        args = parser.parse_args(argv)
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            raise UsageError("a command is required (see writ --help)")
        out = handler(args)
        hold_interrupts()  # done: a Ctrl-C now must not turn the printed success into 130
        emit(out)
        return EXIT_OK
    except _VersionShown:
        sys.stdout.write(f"writ {version()}\n")
        sys.stdout.flush()
        return EXIT_OK
    except CommandFailed as exc:
        emit(redact_fields(exc.payload))
        return exc.code
    except WritError as exc:
        emit(redact_fields(exc.to_json()))
        message = exc.message if exc.message.startswith(("writ:", "writ ")) else f"writ: {exc.message}"
        sys.stderr.write(redact(message) + "\n")
        return exit_code(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C, or a command's own stop signal (the demo's SIGTERM)
        how = f" by {exc.args[0]}" if exc.args and isinstance(exc.args[0], str) else ""
        emit(Interrupted(f"interrupted{how}").to_json())
        sys.stderr.write(f"writ: interrupted{how}\n")
        return EXIT_INTERRUPTED
    finally:
        if restore_signals and previous is not None:
            signal.signal(signal.SIGINT, previous)
