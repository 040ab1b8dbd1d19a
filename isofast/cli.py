"""The `isofast` command line: one subcommand per module in `isofast.commands`.

Each command module defines ``add_parser(subparsers)`` (which registers its parser and sets
``func``) so commands live beside the code they drive, not in one growing file.
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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
