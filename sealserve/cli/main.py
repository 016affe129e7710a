"""The ``sealserve`` command.

One module per subcommand (found by name in this package), each exposing
``register(subparsers)`` which adds its parser and sets ``func`` to a handler
``(args) -> int``. Subcommand modules import
heavy dependencies (onnxruntime, scipy) inside their handlers, so ``sealserve verify``
stays light. This is the only place that turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from sealserve import __version__
from sealserve.cli._extras import missing as missing_extra
from sealserve.errors import ConfigError, CryptoError, SealserveError

# Order is the order shown in --help.
# Shown first in --help, in this order; any other subcommand module follows by name.
ORDER: tuple[str, ...] = (
    "demo",
    "serve",
    "encrypt",
    "broker",
    "token",
    "platform",
    "measure",
    "verify",
)
_NOT_COMMANDS = {"main"}


def subcommands() -> list[str]:
    """Every module in sealserve.cli with a ``register`` function is a subcommand."""
    import pkgutil

    import sealserve.cli

    found = {
        m.name
        for m in pkgutil.iter_modules(sealserve.cli.__path__)
        if not m.name.startswith("_") and m.name not in _NOT_COMMANDS
    }
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# Commands whose errors are one line, configuration errors exiting EXIT_USAGE
# (docs/operator-guide.md).
ONE_LINE_CONFIG_ERRORS = frozenset({"serve"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sealserve",
        description=(
            "Serve proprietary ONNX models so that they cannot be stolen: attested "
            "confidential serving with an anti-extraction layer."
        ),
    )
    parser.add_argument("--version", action="version", version=f"sealserve {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in subcommands():
        module = importlib.import_module(f"sealserve.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    # Before anything else: a command whose extra is not installed says which, in one line.
    lacking = missing_extra(args)
    if lacking is not None:
        print(f"error: {lacking}", file=sys.stderr)
        return EXIT_USAGE
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except SealserveError as exc:
        if args.command in ONE_LINE_CONFIG_ERRORS:
            # One line an operator can act on: the file, the key, what is wrong, the fix.
            print(f"error: {exc.message} (fix: {exc.remedy})", file=sys.stderr)
            # A config the operator wrote, or a file it names that does not open.
            return EXIT_USAGE if isinstance(exc, ConfigError | CryptoError) else EXIT_FAILED
        print(f"error: {exc.message}", file=sys.stderr)
        print(f"hint: {exc.remedy}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
