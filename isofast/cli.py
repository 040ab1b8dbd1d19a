"""The `isofast` command line: one subcommand per module in `isofast.commands`.

Each command module defines ``add_parser(subparsers)`` (which registers its parser and sets
``func``) so commands live beside the code they drive, not in one growing file.

An error the user can fix (a bad option value, a missing or unreadable file, an unavailable backend
or device) ends the command with one line on stderr and exit status 2, as argparse's own errors do;
``--debug`` (anywhere on the command line) shows the Python traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import __version__, commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isofast", description="Train and sample DDPM models with the Iso-Diffusion objective, fast."
    )
    parser.add_argument("--version", action="version", version=f"isofast {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also accepted after the command)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted after the command too, where its parser does not know it
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if debug or not _is_user_error(exc):
            raise
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _is_user_error(exc: Exception) -> bool:
    """Errors of the input, not of isofast: reported in one line (`main`). CheckpointError and ResumeError are
    ValueErrors; a missing optional extra (diffusers, wandb) is an ImportError subclass that names what to install."""
    from .diffusers_bridge import DiffusersMissingError
    from .ops.backends import BackendUnavailable
    from .train_loggers import LoggerMissingError

    return isinstance(exc, (ValueError, TypeError, OSError, BackendUnavailable, DiffusersMissingError,
                            LoggerMissingError))


if __name__ == "__main__":
    sys.exit(main())
